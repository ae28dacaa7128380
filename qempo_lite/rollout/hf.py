"""Sampling with ``model.generate`` (transformers): the engine that samples the live (PEFT) model being trained,
the reference the vLLM engines are tested against, and serves saved adapters of one base side by side for
evaluation and the app (:class:`HFEngine`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from ..errors import QempoError
from ..generation import (eos_token_ids as model_eos_token_ids, first_eos, hf_generate, sampling_seed,
                          shared_prompt_sample, temporary_env)
from .common import Completion, SyncInfo
from .engine import TRAINED, Engine, request_seed
from .serving import context_length


class HFEngine(Engine):
    """transformers + PEFT on one model, no second copy of its weights ever made.

    * :data:`~qempo_lite.rollout.engine.TRAINED` is the model as it stands (the live weights, with
      its active adapter): ``sync`` has nothing to move. It is sampled in eval mode (dropout off,
      so the reported log-probs are the policy's), the mode given back after, at most
      ``max_batch_prompts`` prompts (each with its ``n`` completions) per ``generate`` call (None:
      all at once), as ``model.generate`` with ``seed`` set once per call. ``shared_prompts=True``
      computes each prompt once for its ``n`` samples
      (:func:`~qempo_lite.generation.shared_prompt_sample`), faster for short answers to long
      prompts (1.9x measured on the real-model demos' workload), with the same draws (tested).
    * Saved adapters are loaded under their own names (``load_adapter``) and switched with
      ``set_adapter``; the base model samples inside ``disable_adapter()``. They are sampled one
      after the other, ``batch_size`` sequences per ``generate`` call, each call seeded with
      :func:`~qempo_lite.rollout.engine.request_seed` of its first prompt (and its chunk of the ``n``
      samples, when ``n`` exceeds ``batch_size``).
    """

    title = "transformers"
    settings = ("dtype", "device", "batch_size")
    samples_live_weights = True

    def __init__(self, model, tokenizer, *, eos_token_ids: list[int] | None = None, batch_size: int = 64,
                 max_batch_prompts: int | None = None, shared_prompts: bool = False):
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise QempoError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before sampling")
        self.model = model  # becomes a PeftModel with the first saved adapter, when it is not one
        self.tokenizer = tokenizer
        self.eos_token_ids = (list(eos_token_ids) if eos_token_ids is not None
                              else model_eos_token_ids(tokenizer, getattr(model, "generation_config", None)))
        self.batch_size = batch_size
        self.max_batch_prompts = max_batch_prompts
        self.shared_prompts = shared_prompts
        self.base_shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
        self.vocab_size = getattr(model.config, "vocab_size", None)
        self.context_length = context_length(model.config)
        self._handles: dict[str, str] = {}  # adapter name -> PEFT's name for it
        self._next_id = 1

    @classmethod
    def for_training(cls, policy, tokenizer, args, *, num_processes: int) -> "HFEngine":
        return cls(policy, tokenizer)

    @classmethod
    def for_serving(cls, base_model: str, tokenizer, eos_token_ids: list[int], *, dtype: str = "auto",
                    device: str | None = None, batch_size: int = 64, **options) -> "HFEngine":
        from transformers import AutoModelForCausalLM

        if options:
            raise QempoError(f"{', '.join(options)}: vLLM engine options do not apply to backend 'hf'")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = dtype if dtype == "auto" else getattr(torch, str(dtype), None)
        if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
            raise QempoError(f"dtype {dtype!r} is not a torch dtype; use auto, float32, bfloat16 or float16")
        with temporary_env(**({"HF_HUB_OFFLINE": "1"} if Path(base_model).is_dir() else {})):
            base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype, trust_remote_code=False,
                                                        use_safetensors=True)
        return cls(base.to(device).eval(), tokenizer, eos_token_ids=eos_token_ids, batch_size=batch_size)

    # ------------------------------------------------------------------ adapters
    def sync(self, peft_model=None, state_dict=None) -> SyncInfo:
        """Nothing to move: generation reads the live weights."""
        return SyncInfo(lora_id=0, nbytes=0, seconds=0.0)

    def load_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        # PEFT keeps adapters in a ModuleDict, whose keys cannot hold dots: use an internal name.
        handle, self._next_id = f"adapter_{self._next_id}", self._next_id + 1
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=handle, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=handle,
                                                   is_trainable=False).eval()
        self._handles[name] = handle

    def unload_adapter(self, name: str) -> None:
        self.model.delete_adapter(self._handles.pop(name))

    @contextlib.contextmanager
    def _active(self, name: str | None) -> Iterator[None]:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            yield  # no adapter loaded: the plain base model
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(self._handles[name])
            yield

    # ------------------------------------------------------------------ sampling
    def generate(self, adapters: Mapping[str, str | None], prompts: Sequence[list[int]], *, n: int,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None,
                 progress: bool = False) -> dict[str, list[list[Completion]]]:
        from rich.progress import Progress

        sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        drawn: dict[str, list[list[Completion]]] = {}
        with Progress(disable=not progress, transient=True) as bar:
            for label, name in adapters.items():
                task = bar.add_task(f"sampling {label}", total=None)
                if name == TRAINED:
                    drawn[label] = self._sample_live(prompts, n, seed, **sampling)
                else:
                    drawn[label] = self._sample_saved(label, name, prompts, n, seed, lambda: bar.advance(task),
                                                      **sampling)
                bar.update(task, visible=False)
        return drawn

    def _sample_live(self, prompts: Sequence[list[int]], n: int, seed: int | None, **sampling) -> list[list[Completion]]:
        step = self.max_batch_prompts or max(len(prompts), 1)
        was_training = self.model.training
        self.model.eval()
        try:
            with sampling_seed(seed):
                out: list[list[Completion]] = []
                for start in range(0, len(prompts), step):
                    out.extend(sample_batch(self.model, self.tokenizer, prompts[start:start + step],
                                            eos_ids=self.eos_token_ids, n=n, shared_prompts=self.shared_prompts,
                                            **sampling))
        finally:
            self.model.train(was_training)
        return out

    def _batches(self, n_prompts: int, n: int) -> list[tuple[list[int], int, int]]:
        """(prompt indices, samples per prompt, chunk number) per generate call, at most batch_size sequences."""
        per_call = min(n, self.batch_size)
        chunks = [min(per_call, n - start) for start in range(0, n, per_call)]
        batches = []
        for chunk, count in enumerate(chunks):
            step = max(1, self.batch_size // count)
            batches += [(list(range(s, min(s + step, n_prompts))), count, chunk) for s in range(0, n_prompts, step)]
        return batches

    def _sample_saved(self, label: str, name: str | None, prompts: Sequence[list[int]], n: int, seed: int | None,
                      advance, **sampling) -> list[list[Completion]]:
        groups: list[list[Completion]] = [[] for _ in prompts]
        with self._active(name):
            for rows, count, chunk in self._batches(len(prompts), n):
                # Seeded per batch, in a forked RNG, so the caller's random stream is untouched.
                with sampling_seed(None if seed is None else request_seed(seed, label, rows[0], chunk)):
                    drawn = sample_batch(self.model, self.tokenizer, [prompts[p] for p in rows],
                                         eos_ids=self.eos_token_ids, n=count, **sampling)
                for p, group in zip(rows, drawn):
                    groups[p] += group
                advance()
        return groups

    def close(self) -> None:
        self.model = None
        self._handles.clear()


def sample_batch(model, tokenizer, ids: Sequence[Sequence[int]], *, eos_ids: Sequence[int], n: int, temperature: float,
                 top_p: float, max_new_tokens: int, shared_prompts: bool = False) -> list[list[Completion]]:
    """``n`` completions of each prompt (token ids) in one ``generate`` call (or one shared-prompt pass), with
    the log-probs of the sampled tokens; ``temperature == 0`` decodes greedily, the ``n`` completions repeated."""
    if shared_prompts:
        new_tokens, token_logps = shared_prompt_sample(model, tokenizer, ids, eos_ids=eos_ids, n=n,
                                                       temperature=temperature, top_p=top_p,
                                                       max_new_tokens=max_new_tokens)
    else:
        recorder = _SampledTokenLogprobs()
        new_tokens = hf_generate(model, tokenizer, ids, eos_ids=eos_ids, n=n, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, logits_processors=[recorder])
        repeats = n if temperature == 0 else 1  # greedy: one row per prompt was decoded, then repeated
        token_logps = recorder.finish(new_tokens[::repeats]).repeat_interleave(repeats, dim=0)
    token_logps = token_logps.cpu()
    groups: list[list[Completion]] = []
    for row, tokens in enumerate(new_tokens.cpu().tolist()):
        eos = first_eos(tokens, eos_ids)
        end = len(tokens) if eos is None else eos + 1
        completion = Completion(
            text=tokenizer.decode(tokens[:eos], skip_special_tokens=True),  # as vLLM: without the stop token
            token_ids=tokens[:end],
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
