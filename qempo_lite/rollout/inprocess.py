"""An in-process vLLM engine serving the base model with adapters as native LoRAs: rollouts of the adapter being
trained (:class:`VLLMLoRARollout`), and several adapters sampled side by side for evaluation and the app
(:class:`VLLMServing`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import QempoError
from ..generation import (
    Prompt,
    VLLMEngine,
    check_sampling,
    checkpoint_eos_token_ids,
    import_vllm,
    prompt_token_ids,
    vllm_on_cpu,
)
from .common import Completion, SyncInfo, directory_bytes, served_lora_name
from .engine import RolloutEngine, require_lora
from .serving import ServingEngine, context_length, meta_parameter_shapes, model_config, request_seed

logger = logging.getLogger("qempo_lite")

NO_VLLM = "or set rollout: hf, which samples with transformers and needs no vLLM"


def _base_model_path(base_model) -> str:
    if isinstance(base_model, (str, os.PathLike)):
        return str(base_model)
    config = getattr(base_model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(base_model, "name_or_path", None)
    if not name:
        raise QempoError("cannot tell which checkpoint the model was loaded from; pass the base model's path or Hub name")
    return str(name)


def completions(output) -> list[Completion]:
    """The completions of one vLLM request output (sampled with ``logprobs=0``)."""
    group = []
    for sample in output.outputs:
        tokens = list(sample.token_ids)
        logprobs = [step[token].logprob for step, token in zip(sample.logprobs, tokens)]
        group.append(Completion(text=sample.text, token_ids=tokens, logprobs=logprobs, finish_reason=sample.finish_reason))
    return group


class VLLMLoRARollout(RolloutEngine):
    """vLLM serving the base model, with the trained adapter served natively as a LoRA.

    Create one engine per run (start-up is the expensive part) and call :meth:`sync` after
    each optimizer step; until the first sync, the base model is sampled. On a GPU the engine
    is colocated with training: ``gpu_memory_utilization`` is the share of the card vLLM takes
    (weights + KV cache), and ``enable_sleep_mode`` frees it between rollouts (level 1: the
    weights go to CPU memory, the KV cache is dropped). ``quantization="bitsandbytes"`` serves a
    4-bit base to match a QLoRA run. Use as a context manager, or call :meth:`close`.
    ``LoRARequest`` equality is by *name*, so each sync uses a fresh name and id.
    """

    def __init__(self, base_model, *, max_lora_rank: int = 64, max_model_len: int = 2048,
                 gpu_memory_utilization: float = 0.3, dtype: str = "auto", enable_sleep_mode: bool = False,
                 quantization: str | None = None, seed: int = 0, tokenizer=None, **engine_kwargs: Any):
        environ = dict(os.environ)  # close() gives it back, as it was before vLLM was imported
        _, self._SamplingParams, self._TokensPrompt, self._LoRARequest = import_vllm(NO_VLLM)
        from transformers import AutoTokenizer

        self.base_model = _base_model_path(base_model)
        self.on_cpu = vllm_on_cpu()
        if enable_sleep_mode and self.on_cpu:
            logger.warning("vLLM has no sleep mode on CPU; enable_sleep_mode is ignored")
            enable_sleep_mode = False
        self.enable_sleep_mode = enable_sleep_mode
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.base_model, trust_remote_code=False)
        self.eos_token_ids = checkpoint_eos_token_ids(self.tokenizer, self.base_model)
        self._engine = VLLMEngine(
            self.base_model, owner="VLLMLoRARollout", gpu_memory_utilization=gpu_memory_utilization,
            engine_kwargs=engine_kwargs, environ=environ, max_lora_rank=max_lora_rank, max_loras=1,
            max_model_len=max_model_len, dtype=dtype, quantization=quantization, seed=seed,
            enable_sleep_mode=enable_sleep_mode)
        self.llm = self._engine.llm
        self._lora = None  # the LoRARequest being served
        self._lora_dir: str | None = None
        self._next_id = 1
        self._asleep = False
        if self.enable_sleep_mode:
            self._sleep()

    @classmethod
    def for_training(cls, policy, tokenizer, args, *, num_processes: int) -> "VLLMLoRARollout":
        policy = require_lora(policy, "vllm")
        if num_processes > 1:
            # One in-process engine per training process would share a seed and land on the first GPU.
            raise QempoError(f"rollout: vllm runs one in-process engine and supports one training process, found "
                             f"{num_processes}; use rollout: vllm_server (one vLLM server for every process, see "
                             "qempo-lite serve) or rollout: hf")
        return cls(policy.get_base_model(), max_lora_rank=args.vllm_max_lora_rank,
                   max_model_len=args.vllm_max_model_length or 2048,
                   gpu_memory_utilization=args.vllm_gpu_memory_utilization, dtype=args.vllm_dtype,
                   enable_sleep_mode=args.vllm_enable_sleep_mode, quantization=args.vllm_quantization, seed=args.seed,
                   tokenizer=tokenizer)

    # ------------------------------------------------------------------ adapter sync
    def sync(self, peft_model, state_dict: dict[str, torch.Tensor] | None = None) -> SyncInfo:
        """Serve ``peft_model``'s active adapter from now on; only the adapter is written.

        The adapter is saved with ``save_pretrained`` (safetensors) to a fresh temporary
        directory, loaded into the engine under a fresh LoRA id, and the previous adapter is
        unloaded and its directory removed. The base weights are never touched. ``state_dict``
        is the gathered adapter of a sharded (ZeRO-3 / FSDP) model, from
        :func:`qempo_lite.distributed.gathered_adapter_state`.
        """
        from ..distributed import save_adapter

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
        return SyncInfo(lora_id=lora_id, nbytes=directory_bytes(Path(tmp)), seconds=time.perf_counter() - start,
                        path=path)

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
        check_sampling(n, temperature, top_p, max_new_tokens)
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
        return [completions(output) for output in outputs]

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
        """Shut the engine down, free its memory, remove the adapter directory and give the environment back."""
        if getattr(self, "llm", None) is None:
            return
        with contextlib.suppress(Exception):
            self._drop_current()
        self._engine.close()
        self.llm = None

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


DEFAULT_MAX_MODEL_LEN = 4096


class VLLMServing(ServingEngine):
    """One in-process vLLM engine with ``enable_lora=True``: each adapter a ``LoRARequest``, and one ``generate``
    call carries the requests of every adapter, so vLLM batches them together (multi-LoRA). Every request
    has its own seed (:func:`~qempo_lite.rollout.serving.request_seed`). Closing it gives the environment
    back. ``max_model_len`` defaults to the model's context, at most 4096; the base model is read from
    safetensors only unless ``load_format`` says otherwise. ``lora=False`` leaves vLLM's LoRA layers out
    (the base model only): on the CPU backend they gather a copy of the LoRA weights per token, the
    output layer's included, which costs most of a step once a batch holds hundreds of sequences.
    """

    title = "vLLM"
    mixes_adapters = True
    settings = ("dtype", "max_lora_rank", "max_loras", "gpu_memory_utilization", "max_model_len", "seed", "lora")

    def __init__(self, base_model: str, tokenizer, eos_token_ids: list[int], *, max_lora_rank: int = 64,
                 max_loras: int = 1, gpu_memory_utilization: float = 0.9, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, lora: bool = True, **engine_kwargs: Any):
        environ = dict(os.environ)  # close() gives it back, as it was before vLLM was imported
        _, self._SamplingParams, self._TokensPrompt, self._LoRARequest = import_vllm(
            "or use backend 'hf', which samples with transformers")
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.on_cpu = vllm_on_cpu()
        self.base_shapes, self.vocab_size = meta_parameter_shapes(base_model)
        self.max_lora_rank = max_lora_rank
        if max_model_len is None:
            context = context_length(model_config(base_model))
            max_model_len = min(DEFAULT_MAX_MODEL_LEN, context or DEFAULT_MAX_MODEL_LEN)
        engine_kwargs.setdefault("load_format", "safetensors")  # pickled weights are never loaded
        try:
            self._engine = VLLMEngine(base_model, owner="the Sampler", gpu_memory_utilization=gpu_memory_utilization,
                                      engine_kwargs=engine_kwargs, environ=environ, enable_lora=lora,
                                      max_loras=max_loras,
                                      max_lora_rank=max_lora_rank, max_model_len=max_model_len, dtype=dtype, seed=seed)
        except ValueError as err:  # vLLM's config checks (pydantic errors included): the user's to fix
            reason = " ".join(str(err).split())[:400]
            raise QempoError(f"vLLM refused the engine settings ({reason}); adjust --max-model-len, "
                             "--gpu-memory-utilization or --dtype") from None
        self.llm = self._engine.llm
        self.max_model_len = self.context_length = self.llm.llm_engine.model_config.max_model_len
        self._loras: dict[str, Any] = {}  # adapter name -> its LoRARequest
        self._next_id = 1

    @classmethod
    def unavailable(cls, *, gpu_only: bool = False) -> tuple[str, str] | None:
        import importlib.util

        if gpu_only and not torch.cuda.is_available():
            return ("no GPU here, and vLLM's CPU backend would reserve most of this machine's memory",
                    "--backend vllm --gpu-memory-utilization F to use it anyway")
        if importlib.util.find_spec("vllm") is None:
            return "vLLM is not installed", "pip install 'qempo-lite[vllm]'"
        return None

    @classmethod
    def for_serving(cls, base_model: str, tokenizer, eos_token_ids: list[int], **settings: Any) -> "VLLMServing":
        return cls(base_model, tokenizer, eos_token_ids, **settings)

    def load_adapter(self, name: str, path: Path) -> None:
        lora_id, self._next_id = self._next_id, self._next_id + 1
        request = self._LoRARequest(f"{name}-{lora_id}", lora_id, str(path))
        self.llm.llm_engine.add_lora(request)  # load now: a broken adapter fails here, not mid-batch
        self._loras[name] = request

    def unload_adapter(self, name: str) -> None:
        self.llm.llm_engine.remove_lora(self._loras.pop(name).lora_int_id)

    def generate(self, adapters: Mapping[str, str | None], prompts: Sequence[list[int]], *, n: int,
                 temperature: float, top_p: float, max_new_tokens: int, seed: int,
                 progress: bool = False) -> dict[str, list[list[Completion]]]:
        requests, params, loras, owners = [], [], [], []
        for label, name in adapters.items():
            lora = None if name is None else self._loras[name]
            for p, x in enumerate(prompts):
                requests.append(self._TokensPrompt(prompt_token_ids=x))
                # vLLM wants n=1 for greedy decoding: its n identical draws are copied below.
                params.append(self._SamplingParams(
                    n=1 if temperature == 0 else n, temperature=temperature, top_p=top_p, top_k=0,
                    max_tokens=max_new_tokens, logprobs=0, seed=request_seed(seed, label, p),
                    stop_token_ids=self.eos_token_ids, skip_special_tokens=True))
                loras.append(lora)
                owners.append((label, p))
        # One call for every adapter: the scheduler mixes their requests in the same batches. Except
        # on vLLM's CPU backend, whose torch LoRA ops index the adapter slots with -1 for
        # base-model tokens and so apply the last slot's adapter to them in a mixed batch: there
        # the base model's requests go in a call of their own.
        calls = [list(range(len(requests)))]
        if self.on_cpu and None in loras and any(lora is not None for lora in loras):
            calls = [[i for i, lora in enumerate(loras) if lora is not None],
                     [i for i, lora in enumerate(loras) if lora is None]]
        outputs: list[Any] = [None] * len(requests)
        for call in calls:
            done = self.llm.generate([requests[i] for i in call], [params[i] for i in call],
                                     lora_request=[loras[i] for i in call], use_tqdm=progress)
            for i, output in zip(call, done):
                outputs[i] = output
        drawn: dict[str, list[list[Completion]]] = {label: [[] for _ in prompts] for label in adapters}
        for (label, p), output in zip(owners, outputs):
            group = completions(output)
            drawn[label][p] = group * n if temperature == 0 else group
        return drawn

    def close(self) -> None:
        """Shut the engine down, free its memory and give the environment back."""
        self._loras.clear()
        self._engine.close()
        self.llm = None
