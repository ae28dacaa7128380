"""An in-process vLLM engine serving the base model with adapters as native LoRAs: the adapter being trained
(synced after every optimizer step, never merged) and saved adapters sampled side by side (:class:`VLLMLoRAEngine`)."""

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
from ..generation import VLLMEngine, checkpoint_eos_token_ids, import_vllm, vllm_on_cpu
from .common import Completion, SyncInfo, directory_bytes, served_lora_name
from .engine import TRAINED, Engine, request_seed, require_lora
from .serving import context_length, meta_parameter_shapes, model_config

logger = logging.getLogger("qempo_lite")

NO_VLLM = "or use rollout: hf (backend 'hf'), which samples with transformers and needs no vLLM"
DEFAULT_MAX_MODEL_LEN = 4096


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


class VLLMLoRAEngine(Engine):
    """vLLM serving the base model, every adapter a native LoRA (``enable_lora=True`` + ``LoRARequest``).

    Create one engine per run (start-up is the expensive part). :meth:`sync` writes only the
    trained adapter (``save_pretrained``, safetensors) to a fresh temporary directory and serves it
    under a fresh LoRA id (``LoRARequest`` equality is by *name*): nothing is merged, so the
    training side may hold a 4-bit base (QLoRA), and a sync moves megabytes, not the model. Until
    the first sync, :data:`~qempo_lite.rollout.engine.TRAINED` is the base model. Saved adapters
    are loaded by name (:meth:`load_adapter`), and one ``generate`` call carries the requests of
    every adapter, so vLLM batches them together (multi-LoRA); every request has its own seed
    (:func:`~qempo_lite.rollout.engine.request_seed`, unseeded when ``seed`` is None).

    On a GPU the engine is colocated with training: ``gpu_memory_utilization`` is the share of the
    card vLLM takes (weights + KV cache; on vLLM's CPU backend, of the machine's memory), and
    ``enable_sleep_mode`` frees it between rollouts (level 1: the weights go to CPU memory, the KV
    cache is dropped). ``quantization="bitsandbytes"`` serves a 4-bit base to match a QLoRA run.
    ``max_model_len`` defaults to the model's context, at most 4096; weights are read from
    safetensors only unless ``load_format`` says otherwise. ``lora=False`` leaves vLLM's LoRA layers
    out (the base model only): on the CPU backend they gather a copy of the LoRA weights per token,
    the output layer's included, which costs most of a step once a batch holds hundreds of
    sequences. Use as a context manager, or call :meth:`close` (which gives the environment back).
    """

    title = "vLLM"
    mixes_adapters = True
    length_fix = "raise vllm_max_model_length or shorten the prompt"
    settings = ("dtype", "max_lora_rank", "max_loras", "gpu_memory_utilization", "max_model_len", "seed", "lora")

    def __init__(self, base_model, *, tokenizer=None, eos_token_ids: list[int] | None = None, max_lora_rank: int = 64,
                 max_loras: int = 1, max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto", enable_sleep_mode: bool = False, quantization: str | None = None, seed: int = 0,
                 lora: bool = True, **engine_kwargs: Any):
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
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.base_model, trust_remote_code=False)
        self.eos_token_ids = (list(eos_token_ids) if eos_token_ids is not None
                              else checkpoint_eos_token_ids(self.tokenizer, self.base_model))
        if max_model_len is None:
            context = context_length(model_config(self.base_model))
            max_model_len = min(DEFAULT_MAX_MODEL_LEN, context or DEFAULT_MAX_MODEL_LEN)
        engine_kwargs.setdefault("load_format", "safetensors")  # pickled weights are never loaded
        try:
            self._engine = VLLMEngine(
                self.base_model, owner=type(self).__name__, gpu_memory_utilization=gpu_memory_utilization,
                engine_kwargs=engine_kwargs, environ=environ, enable_lora=lora, max_lora_rank=max_lora_rank,
                max_loras=max_loras, max_model_len=max_model_len, dtype=dtype, quantization=quantization, seed=seed,
                enable_sleep_mode=enable_sleep_mode)
        except ValueError as err:  # vLLM's config checks (pydantic errors included): the user's to fix
            reason = " ".join(str(err).split())[:400]
            raise QempoError(f"vLLM refused the engine settings ({reason}); adjust max_model_len, "
                             "gpu_memory_utilization or dtype") from None
        self.llm = self._engine.llm
        self.max_model_len = self.context_length = self.llm.llm_engine.model_config.max_model_len
        self._loras: dict[str, Any] = {}  # adapter name (TRAINED included) -> its LoRARequest
        self._sync_dir: str | None = None  # the trained adapter's temporary directory
        self._next_id = 1
        self._asleep = False
        if self.enable_sleep_mode:
            self._sleep()

    @classmethod
    def for_training(cls, policy, tokenizer, args, *, num_processes: int) -> "VLLMLoRAEngine":
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

    @classmethod
    def for_serving(cls, base_model: str, tokenizer, eos_token_ids: list[int], **settings: Any) -> "VLLMLoRAEngine":
        engine = cls(base_model, tokenizer=tokenizer, eos_token_ids=eos_token_ids,
                     **{"gpu_memory_utilization": 0.9, **settings})
        engine.base_shapes, engine.vocab_size = meta_parameter_shapes(base_model)
        return engine

    @classmethod
    def unavailable(cls, *, gpu_only: bool = False) -> tuple[str, str] | None:
        import importlib.util

        if gpu_only and not torch.cuda.is_available():
            return ("no GPU here, and vLLM's CPU backend would reserve most of this machine's memory",
                    "--backend vllm --gpu-memory-utilization F to use it anyway")
        if importlib.util.find_spec("vllm") is None:
            return "vLLM is not installed", "pip install 'qempo-lite[vllm]'"
        return None

    # ------------------------------------------------------------------ adapters
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
        previous = self._loras.get(TRAINED), self._sync_dir
        try:
            path = str(save_adapter(peft_model, Path(tmp) / "adapter", adapter_name=adapter_name,
                                    state_dict=state_dict))
            self._wake()
            self._add(TRAINED, path)  # left awake: the next call is a rollout, which puts the engine back to sleep
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._sync_dir = tmp
        self._drop(*previous)
        return SyncInfo(lora_id=self._loras[TRAINED].lora_int_id, nbytes=directory_bytes(Path(tmp)),
                        seconds=time.perf_counter() - start, path=path)

    def _add(self, name: str, path: str) -> None:
        lora_id, self._next_id = self._next_id, self._next_id + 1
        request = self._LoRARequest(f"{name}-{lora_id}", lora_id, path)
        self.llm.llm_engine.add_lora(request)  # load now: a broken adapter fails here, not mid-batch
        self._loras[name] = request

    def _drop(self, request, directory: str | None) -> None:
        if request is not None:
            self.llm.llm_engine.remove_lora(request.lora_int_id)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    @property
    def lora_request(self):
        """The LoRARequest of the trained adapter (None before the first sync: the base model)."""
        return self._loras.get(TRAINED)

    def load_adapter(self, name: str, path: Path) -> None:
        self._add(name, str(path))

    def unload_adapter(self, name: str) -> None:
        self._drop(self._loras.pop(name), None)

    # ------------------------------------------------------------------ sampling
    def generate(self, adapters: Mapping[str, str | None], prompts: Sequence[list[int]], *, n: int,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None,
                 progress: bool = False) -> dict[str, list[list[Completion]]]:
        requests, params, loras, owners = [], [], [], []
        for label, name in adapters.items():
            lora = None if name is None else self._loras.get(TRAINED) if name == TRAINED else self._loras[name]
            for p, x in enumerate(prompts):
                requests.append(self._TokensPrompt(prompt_token_ids=x))
                # vLLM wants n=1 for greedy decoding: its n identical draws are copied below.
                params.append(self._SamplingParams(
                    n=1 if temperature == 0 else n, temperature=temperature, top_p=top_p, top_k=0,
                    max_tokens=max_new_tokens, logprobs=0,  # the sampled token's log-prob only
                    seed=None if seed is None else request_seed(seed, label, p),
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
        self._wake()
        try:
            for call in calls:
                done = self.llm.generate([requests[i] for i in call], [params[i] for i in call],
                                         lora_request=[loras[i] for i in call], use_tqdm=progress)
                for i, output in zip(call, done):
                    outputs[i] = output
        finally:
            if self.enable_sleep_mode:
                self._sleep()
        drawn: dict[str, list[list[Completion]]] = {label: [[] for _ in prompts] for label in adapters}
        for (label, p), output in zip(owners, outputs):
            group = completions(output)
            drawn[label][p] = group * n if temperature == 0 else group
        return drawn

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
            self._drop(self._loras.pop(TRAINED, None), self._sync_dir)
        self._sync_dir = None
        self._loras.clear()
        self._engine.close()
        self.llm = None

    def __del__(self):
        # Last resort for an engine never closed; module globals may be gone at exit.
        try:
            if getattr(self, "_sync_dir", None) is not None:
                shutil.rmtree(self._sync_dir, ignore_errors=True)
        except Exception:
            pass
