"""Rollouts with ``model.generate`` from the live (PEFT) model: the reference the vLLM engines are tested against."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import QempoError
from ..generation import (Prompt, check_sampling, eos_token_ids, first_eos, hf_generate, prompt_token_ids, sampling_seed,
                          shared_prompt_sample)
from .common import Completion, SyncInfo
from .engine import RolloutEngine


class HFRollout(RolloutEngine):
    """Sampling with ``model.generate`` from the live model (a PEFT model samples with its adapter).

    ``max_batch_prompts`` bounds how many prompts go through one ``generate`` call (each with
    its ``n`` completions); ``None`` sends them all at once. ``shared_prompts=True`` computes
    each prompt once for its ``n`` samples (:func:`~qempo_lite.generation.shared_prompt_sample`),
    faster for short answers to long prompts (1.9x measured on the real-model demos' workload), with the
    same draws as ``model.generate`` for the same seed (tested).
    """

    samples_live_weights = True

    def __init__(self, model, tokenizer, *, max_batch_prompts: int | None = None, shared_prompts: bool = False):
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise QempoError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before sampling")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_prompts = max_batch_prompts
        self.shared_prompts = shared_prompts
        self.eos_token_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))

    @classmethod
    def for_training(cls, policy, tokenizer, args, *, num_processes: int) -> "HFRollout":
        return cls(policy, tokenizer)

    def sync(self, peft_model=None, state_dict=None) -> SyncInfo:
        """Nothing to move: generation reads the live weights."""
        return SyncInfo(lora_id=0, nbytes=0, seconds=0.0)

    def generate(self, prompts: Sequence[Prompt], *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, seed: int | None = None) -> list[list[Completion]]:
        check_sampling(n, temperature, top_p, max_new_tokens)
        ids = prompt_token_ids(self.tokenizer, prompts)
        step = self.max_batch_prompts or max(len(ids), 1)
        was_training = self.model.training
        # Dropout off while sampling, so the reported log-probs are the policy's.
        self.model.eval()
        try:
            with sampling_seed(seed):
                out: list[list[Completion]] = []
                for start in range(0, len(ids), step):
                    out.extend(self._generate_batch(ids[start:start + step], n, temperature, top_p, max_new_tokens))
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, ids, n, temperature, top_p, max_new_tokens) -> list[list[Completion]]:
        if self.shared_prompts:
            new_tokens, token_logps = shared_prompt_sample(
                self.model, self.tokenizer, ids, eos_ids=self.eos_token_ids, n=n, temperature=temperature,
                top_p=top_p, max_new_tokens=max_new_tokens)
            token_logps = token_logps.cpu()
        else:
            recorder = _SampledTokenLogprobs()
            new_tokens = hf_generate(self.model, self.tokenizer, ids, eos_ids=self.eos_token_ids, n=n,
                                     temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                     logits_processors=[recorder])
            token_logps = recorder.finish(new_tokens).cpu()
        groups: list[list[Completion]] = []
        for row, tokens in enumerate(new_tokens.cpu().tolist()):
            eos = first_eos(tokens, self.eos_token_ids)
            end = len(tokens) if eos is None else eos + 1
            kept = tokens[:end]
            completion = Completion(
                text=self.tokenizer.decode(kept, skip_special_tokens=True),
                token_ids=kept,
                logprobs=token_logps[row, :end].tolist(),
                finish_reason="length" if eos is None else "stop",
            )
            if row % n == 0:  # generate repeats each prompt n times in a row
                groups.append([])
            groups[-1].append(completion)
        return groups


class _SampledTokenLogprobs:
    """A logits processor that keeps log softmax(raw logits) of each sampled token, one step at a time.

    At step t it receives the token sampled at step t-1 (the last input id) and that step's
    log-probs are still at hand, so only one (rows x vocabulary) tensor is ever held, where
    ``output_logits=True`` would keep them for every step.
    """

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = scores.float().log_softmax(-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(rows, generated steps) log-probs, once generation has returned its tokens."""
        if self.previous is not None and len(self.steps) < new_tokens.size(1):
            self.steps.append(self.previous.gather(-1, new_tokens[:, len(self.steps):len(self.steps) + 1]).squeeze(-1))
        self.previous = None
        return torch.stack(self.steps, dim=1) if self.steps else new_tokens.new_zeros(new_tokens.shape, dtype=torch.float)
