"""Sample completions from one base model and several LoRA adapters at once, for evaluation.

A :class:`Sampler` loads the base model once and serves any number of adapters of it, plus the
base model itself (an adapter entry of ``None``):

* ``backend="vllm"``: one engine with ``enable_lora=True``; each adapter is a ``LoRARequest``
  and one ``generate`` call carries the requests of every adapter, so vLLM batches them
  together (multi-LoRA). The engine runs in-process (:class:`qempo_lite.generation.VLLMEngine`,
  as the rollouts': closing it gives the environment back).
* ``backend="hf"``: one ``transformers`` model wrapped by PEFT, each adapter loaded under its
  own name (``load_adapter``), switched with ``set_adapter``; the base model samples inside
  ``disable_adapter()``. No second copy of the base weights is ever made.
* ``backend="auto"``: vLLM when it is installed, transformers otherwise.

Both backends sample exactly ``temperature`` + ``top_p``: no top-k, no repetition penalty from
the model's ``generation_config``, so they draw from the same distribution; ``temperature=0``
decodes greedily (the ``n`` draws of a prompt are then one answer). Prompts are
strings (one user message) or chats (lists of ``{"role", "content"}`` messages ending with a
user message, so multi-turn contexts work); the tokenizer's chat template is always applied.

Adapters are checked before anything is loaded (:func:`qempo_lite.adapters.check_adapter`): a
safetensors LoRA adapter directory (pickled weights are never loaded), recorded for this base
model (``qempo_lite.json``'s ``base_model`` or PEFT's ``base_model_name_or_path``), and with
weight shapes that fit the base model's modules (hidden size, vocabulary, layer count).

Samples and their JSONL files (:func:`save_samples` / :func:`load_samples`) are defined in
:mod:`qempo_lite.evaluate.samples` and importable from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterator

from qempo_lite.adapters import ANYWHERE, adapter_config, check_adapter, max_rank
from qempo_lite.errors import QempoError, missing_extra
from qempo_lite.evaluate.samples import Sample, load_samples, save_samples, to_messages
from qempo_lite.generation import (
    VLLMEngine,
    check_sampling,
    checkpoint_eos_token_ids,
    first_eos,
    free_memory,
    hf_generate,
    prompt_token_ids,
    sampling_seed,
    temporary_env,
    vllm_available,
    vllm_on_cpu,
)

logger = logging.getLogger("qempo_lite")

BACKENDS = ("auto", "vllm", "hf")
DEFAULT_MAX_MODEL_LEN = 4096

AdapterSpec = Mapping[str, "str | os.PathLike | None"] | Sequence[str] | str


def _request_seed(seed: int, adapter: str, prompt_index: int, chunk: int = 0) -> int:
    """A seed per (adapter, prompt): reproducible whatever else is sampled in the same call,
    and different across prompts, so their random streams are independent."""
    return zlib.crc32(f"{seed}:{adapter}:{prompt_index}:{chunk}".encode()) & 0x7FFFFFFF


# ------------------------------------------------------------------------------ the base model's shapes


def meta_parameter_shapes(base_model: str) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """Parameter shapes of ``base_model`` built on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - an architecture transformers cannot build: skip the shape check
        logger.warning("cannot build %s on the meta device (%s); adapter shapes are not checked", base_model,
                       type(err).__name__)
        return {}, None
    return {k: tuple(v.shape) for k, v in model.named_parameters()}, getattr(config, "vocab_size", None)


# ------------------------------------------------------------------------------ the sampler


def _context_length(base_model: str) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - vLLM reads the config itself and reports what is wrong
        return None
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


class Sampler:
    """The base model loaded once, serving several LoRA adapters (and itself) for sampling.

    ``adapters`` given here are checked and loaded up front (and size vLLM's ``max_loras``);
    more can be passed to :meth:`sample` later, so one Sampler can serve a long-lived app.
    ``gpu_memory_utilization``, ``max_model_len`` (default: the model's context, at most
    4096) and ``max_lora_rank`` configure the vLLM engine (on vLLM's CPU backend the first is
    the share of *CPU* memory it reserves);
    ``batch_size`` is the number of sequences per ``generate`` call of the transformers backend.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, base_model: str | os.PathLike, *, backend: str = "auto",
                 adapters: Mapping[str, str | os.PathLike | None] | None = None, max_lora_rank: int = 64,
                 max_loras: int | None = None, gpu_memory_utilization: float = 0.9, dtype: str = "auto",
                 max_model_len: int | None = None, batch_size: int = 64, device: str | None = None,
                 allow_base_mismatch: bool = False, seed: int = 0, **engine_kwargs: Any):
        environ = dict(os.environ)  # what close() gives back, as it was before vLLM was imported
        if backend not in BACKENDS:
            raise QempoError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "auto":
            backend = "vllm" if vllm_available() else "hf"
            if backend == "hf":
                logger.info("vLLM is not installed: sampling with transformers (pip install 'qempo-lite[vllm]' "
                            "for faster multi-LoRA sampling)")
        elif backend == "vllm" and not vllm_available():
            raise missing_extra("vllm", "vllm", "or use backend 'hf', which samples with transformers")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise QempoError(f"batch_size must be a positive integer, got {batch_size!r}")
        local = Path(base_model).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise QempoError(f"base model {base_model} is a local path without config.json; pass a model directory "
                             "or a Hub id")
        self.base_model = str(local) if local.exists() else str(base_model)
        self.backend = backend
        self.batch_size = batch_size
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self.allow_base_mismatch = allow_base_mismatch
        self._adapters: dict[str, tuple[Path, Any]] = {}  # name -> (directory, backend handle)
        self._next_id = 1
        self.model = self.llm = self._engine = None

        from transformers import AutoTokenizer

        try:
            with temporary_env(**({"HF_HUB_OFFLINE": "1"} if local.exists() else {})):
                self.tokenizer = AutoTokenizer.from_pretrained(self.base_model, trust_remote_code=False)
        except OSError as err:
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise QempoError(f"cannot load base model {self.base_model} ({reason}); pass a local model directory "
                             "or a Hub id reachable from here") from None
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise QempoError(f"the tokenizer of {self.base_model} has no chat template; use an instruct model "
                             "(or save a tokenizer with chat_template set) as the base model")
        self.eos_token_ids = checkpoint_eos_token_ids(self.tokenizer, self.base_model)
        if not self.eos_token_ids:
            raise QempoError(f"{self.base_model} declares no end-of-sequence token; set eos_token in its tokenizer")

        initial = {k: v for k, v in (adapters or {}).items() if v is not None}
        if backend == "vllm":
            self._start_vllm(max_loras or max(1, len(initial)), gpu_memory_utilization, dtype, seed, engine_kwargs,
                             environ)
        else:
            if engine_kwargs:
                raise QempoError(f"{', '.join(engine_kwargs)}: vLLM engine options do not apply to backend 'hf'")
            self._start_hf(dtype, device)
        for name, path in initial.items():
            self.add_adapter(name, path)

    # -------------------------------------------------------------------------- engines
    def _start_vllm(self, max_loras: int, gpu_memory_utilization: float, dtype: str, seed: int,
                    engine_kwargs: dict, environ: dict[str, str]) -> None:
        self._on_cpu = vllm_on_cpu()
        self._shapes, self._vocab_size = meta_parameter_shapes(self.base_model)
        if self.max_model_len is None:
            self.max_model_len = min(DEFAULT_MAX_MODEL_LEN, _context_length(self.base_model) or DEFAULT_MAX_MODEL_LEN)
        try:
            self._engine = VLLMEngine(self.base_model, owner="the Sampler", gpu_memory_utilization=gpu_memory_utilization,
                                      engine_kwargs=engine_kwargs, environ=environ, max_loras=max_loras,
                                      max_lora_rank=self.max_lora_rank, max_model_len=self.max_model_len, dtype=dtype,
                                      seed=seed)
        except ValueError as err:  # vLLM's config checks (pydantic errors included): the user's to fix
            reason = " ".join(str(err).split())[:400]
            raise QempoError(f"vLLM refused the engine settings ({reason}); adjust --max-model-len, "
                             "--gpu-memory-utilization or --dtype") from None
        self.llm = self._engine.llm
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def _start_hf(self, dtype: str, device: str | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = dtype if dtype == "auto" else getattr(torch, str(dtype), None)
        if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
            raise QempoError(f"dtype {dtype!r} is not a torch dtype; use auto, float32, bfloat16 or float16")
        offline = {"HF_HUB_OFFLINE": "1"} if Path(self.base_model).is_dir() else {}
        with temporary_env(**offline):
            base = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=torch_dtype, trust_remote_code=False,
                                                        use_safetensors=True)
        self.model = base.to(self.device).eval()  # becomes a PeftModel with the first adapter
        self._shapes = {k: tuple(v.shape) for k, v in base.named_parameters()}
        self._vocab_size = getattr(base.config, "vocab_size", None)

    # -------------------------------------------------------------------------- adapters
    @property
    def adapters(self) -> dict[str, Path]:
        """The adapters loaded so far: name -> directory."""
        return {name: path for name, (path, _) in self._adapters.items()}

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Check and load an adapter under ``name`` (a name already loaded from another path is replaced)."""
        self._check_open()
        if not isinstance(name, str) or not name.strip():
            raise QempoError(f"adapter names must be non-empty strings, got {name!r}")
        adapter_dir = check_adapter(name, path, self.base_model, base_shapes=self._shapes, vocab_size=self._vocab_size,
                                    allow_base_mismatch=self.allow_base_mismatch)
        rank = self._adapter_rank(name, adapter_dir)
        if name in self._adapters:
            if self._adapters[name][0].resolve() == adapter_dir.resolve():
                return
            self.remove_adapter(name)
        lora_id, self._next_id = self._next_id, self._next_id + 1
        if self.backend == "vllm":
            from vllm.lora.request import LoRARequest

            handle = LoRARequest(f"{name}-{lora_id}", lora_id, str(adapter_dir))
            self.llm.llm_engine.add_lora(handle)  # load now: a broken adapter fails here, not mid-batch
        else:
            from peft import PeftModel

            # PEFT keeps adapters in a ModuleDict, whose keys cannot hold dots: use an internal name.
            handle = f"adapter_{lora_id}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter_dir), adapter_name=handle, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=handle,
                                                       is_trainable=False).eval()
        logger.info("adapter %r (rank %d) loaded from %s", name, rank, adapter_dir)
        self._adapters[name] = (adapter_dir, handle)

    def _adapter_rank(self, name: str, adapter_dir: Path) -> int:
        rank = max_rank(adapter_config(adapter_dir, ANYWHERE, f"adapter {name!r} at {adapter_dir}"))
        if self.backend == "vllm" and rank > self.max_lora_rank:
            raise QempoError(f"adapter {name!r} has rank {rank}, above max_lora_rank={self.max_lora_rank}; "
                             f"raise max_lora_rank (--max-lora-rank) to at least {rank}")
        return rank

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; its memory is freed."""
        if name not in self._adapters:
            return
        _, handle = self._adapters.pop(name)
        if self.backend == "vllm":
            self.llm.llm_engine.remove_lora(handle.lora_int_id)
        else:
            self.model.delete_adapter(handle)

    def _resolve(self, adapters: AdapterSpec) -> dict[str, Any]:
        """name -> backend handle (None: the base model), loading new adapters on the way."""
        if isinstance(adapters, str):
            adapters = [adapters]
        if isinstance(adapters, Mapping):
            for name, path in adapters.items():
                if path is not None:
                    self.add_adapter(name, path)
            names = list(adapters)
            base = {name for name, path in adapters.items() if path is None}
        else:
            names, base = list(adapters), set()
            unknown = [n for n in names if n not in self._adapters]
            if unknown:
                raise QempoError(f"adapter(s) {', '.join(map(repr, unknown))} not loaded; pass a mapping "
                                 "name -> adapter directory (None for the base model)")
        if not names:
            raise QempoError("no adapter to sample from; pass at least one (None as the path means the base model)")
        return {name: None if name in base else self._adapters[name][1] for name in names}

    # -------------------------------------------------------------------------- sampling
    def encode(self, prompt: Any, index: int = 0) -> list[int]:
        """Token ids of a prompt with the chat template and the generation prompt applied."""
        return prompt_token_ids(self.tokenizer, [to_messages(prompt, index)])[0]

    def _check_open(self) -> None:
        if self.model is None and getattr(self, "llm", None) is None:
            raise QempoError("this Sampler was closed; create a new one")

    def sample(self, adapters: AdapterSpec, prompts: Sequence[Any], *, n: int = 1, temperature: float = 1.0,
               top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0,
               prompt_ids: Sequence[str | int] | None = None, progress: bool = True) -> list[Sample]:
        """``n`` completions of every prompt from every adapter: ``len(adapters) * len(prompts) * n`` Samples.

        ``adapters``: name -> adapter directory, ``None`` for the base model (names of adapters
        loaded earlier may be passed alone). ``prompts``: strings or chats. ``prompt_ids`` name
        the prompts in the Samples (default: their index). Results are ordered by adapter,
        then prompt, then ``sample_index``; a given (seed, adapter, prompt) always gives the
        same draws on one backend, whatever else is sampled alongside.
        """
        self._check_open()
        check_sampling(n, temperature, top_p, max_new_tokens, greedy=True)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise QempoError("prompts must be a non-empty list (strings or chats); wrap a single prompt in a list")
        prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
        if len(prompt_ids) != len(prompts):
            raise QempoError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts; pass one id per prompt")
        handles = self._resolve(adapters)
        chats = [to_messages(p, i) for i, p in enumerate(prompts)]
        ids = [self.encode(chat, i) for i, chat in enumerate(chats)]
        if self.backend == "vllm":
            too_long = [i for i, x in enumerate(ids) if len(x) >= self.max_model_len]
            if too_long:
                raise QempoError(f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens, not below max_model_len="
                                 f"{self.max_model_len}; raise max_model_len (--max-model-len) or shorten it")
            drawn = self._sample_vllm(handles, ids, n, temperature, top_p, max_new_tokens, seed, progress)
        else:
            drawn = self._sample_hf(handles, ids, n, temperature, top_p, max_new_tokens, seed, progress)
        samples = []
        for name in handles:
            for p, (chat, prompt_id) in enumerate(zip(chats, prompt_ids)):
                for j, (text, num_tokens, finish) in enumerate(drawn[name][p]):
                    samples.append(Sample(prompt_id=prompt_id, adapter=name, sample_index=j, text=text,
                                          num_tokens=num_tokens, finish_reason=finish, prompt=chat))
        return samples

    def _sample_vllm(self, handles, ids, n, temperature, top_p, max_new_tokens, seed, progress):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests, params, loras, owners = [], [], [], []
        for name, lora in handles.items():
            for p, x in enumerate(ids):
                requests.append(TokensPrompt(prompt_token_ids=x))
                # vLLM wants n=1 for greedy decoding: its n identical draws are copied below.
                params.append(SamplingParams(n=1 if temperature == 0 else n, temperature=temperature, top_p=top_p,
                                             top_k=0,
                                             max_tokens=max_new_tokens, seed=_request_seed(seed, name, p),
                                             stop_token_ids=self.eos_token_ids, skip_special_tokens=True))
                loras.append(lora)
                owners.append((name, p))
        # One call for every adapter: the scheduler mixes their requests in the same batches. Except
        # on vLLM's CPU backend, whose torch LoRA ops index the adapter slots with -1 for
        # base-model tokens and so apply the last slot's adapter to them in a mixed batch: there
        # the base model's requests go in a call of their own.
        calls = [list(range(len(requests)))]
        if self._on_cpu and None in loras and any(lora is not None for lora in loras):
            calls = [[i for i, lora in enumerate(loras) if lora is not None],
                     [i for i, lora in enumerate(loras) if lora is None]]
        outputs = [None] * len(requests)
        for call in calls:
            done = self.llm.generate([requests[i] for i in call], [params[i] for i in call],
                                     lora_request=[loras[i] for i in call], use_tqdm=progress)
            for i, output in zip(call, done):
                outputs[i] = output
        drawn: dict[str, list] = {name: [None] * len(ids) for name in handles}
        for (name, p), output in zip(owners, outputs):
            draws = [(o.text, self._count(list(o.token_ids)), o.finish_reason) for o in output.outputs]
            drawn[name][p] = draws * n if temperature == 0 else draws
        return drawn

    def _count(self, tokens: list[int]) -> int:
        return len(tokens) - 1 if tokens and tokens[-1] in self.eos_token_ids else len(tokens)

    def _batches(self, n_prompts: int, n: int) -> list[tuple[list[int], int, int]]:
        """(prompt indices, samples per prompt, chunk number) per generate call, at most batch_size sequences."""
        per_call = min(n, self.batch_size)
        chunks = [min(per_call, n - start) for start in range(0, n, per_call)]
        batches = []
        for chunk, count in enumerate(chunks):
            step = max(1, self.batch_size // count)
            batches += [(list(range(s, min(s + step, n_prompts))), count, chunk) for s in range(0, n_prompts, step)]
        return batches

    def _sample_hf(self, handles, ids, n, temperature, top_p, max_new_tokens, seed, progress):
        from rich.progress import Progress

        batches = self._batches(len(ids), n)
        drawn: dict[str, list] = {name: [[] for _ in ids] for name in handles}
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("sampling", total=len(handles) * len(batches))
            for name, handle in handles.items():
                bar.update(task, description=f"sampling {name}")
                with self._active(handle):
                    for prompts, count, chunk in batches:
                        # Seeded per batch, in a forked RNG, so the caller's random stream is untouched.
                        with sampling_seed(_request_seed(seed, name, prompts[0], chunk)):
                            out = self._generate([ids[p] for p in prompts], count, temperature, top_p, max_new_tokens)
                        for row, p in enumerate(prompts):
                            drawn[name][p] += out[row * count:(row + 1) * count]
                        bar.advance(task)
        return drawn

    @contextlib.contextmanager
    def _active(self, handle: str | None) -> Iterator[None]:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            yield  # no adapter loaded yet: the plain base model
        elif handle is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(handle)
            yield

    def _generate(self, ids: list[list[int]], count: int, temperature: float, top_p: float,
                  max_new_tokens: int) -> list[tuple[str, int, str]]:
        new_tokens = hf_generate(self.model, self.tokenizer, ids, eos_ids=self.eos_token_ids, n=count,
                                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        out = []
        for tokens in new_tokens.tolist():
            end = first_eos(tokens, self.eos_token_ids)
            kept = tokens if end is None else tokens[:end]
            out.append((self.tokenizer.decode(kept, skip_special_tokens=True), len(kept),
                        "length" if end is None else "stop"))
        return out

    # -------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Free the model (the vLLM engine is shut down, so another can start in this process, and the
        environment variables vLLM set are given back)."""
        if getattr(self, "_engine", None) is not None:
            self._engine.close()
            self._engine = None
        self.model = self.llm = None
        self._adapters.clear()
        free_memory()

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sample(base_model: str | os.PathLike, adapters: Mapping[str, str | os.PathLike | None], prompts: Sequence[Any], *,
           n: int, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0,
           backend: str = "auto", **sampler_options: Any) -> list[Sample]:
    """Load ``base_model`` once, sample every adapter (None: the base) on every prompt, free it.

    A one-shot :class:`Sampler`; ``sampler_options`` go to its constructor.
    """
    with Sampler(base_model, backend=backend, adapters=adapters, **sampler_options) as sampler:
        return sampler.sample(adapters, prompts, n=n, temperature=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens, seed=seed)


__all__ = ["Sample", "Sampler", "sample", "save_samples", "load_samples", "check_adapter", "to_messages"]
