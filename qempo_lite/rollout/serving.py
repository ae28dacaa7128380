"""Serving engines: one base model, several named LoRA adapters (and the base itself) sampled side by side.

What evaluation (:class:`qempo_lite.evaluate.sampling.Sampler`) and the app ask of an engine,
beside :class:`~qempo_lite.rollout.engine.RolloutEngine`'s one-adapter protocol for training: load
and unload adapters by name from their directories, and sample many of them in one call with
:meth:`ServingEngine.generate`, each prompt's ``n`` completions with their token ids and
sampled log-probs (:class:`~qempo_lite.rollout.common.Completion`). Two shipped engines, each
beside its rollout engine: ``hf`` (:class:`~qempo_lite.rollout.hf.HFServing`) and ``vllm``
(:class:`~qempo_lite.rollout.inprocess.VLLMServing`).

The one rule on randomness: the draws of a (``seed``, label, prompt index) never depend on what
else is sampled in the call, so engines seed every request with :func:`request_seed`.

Adding an engine is one class and one registry line::

    class MyServing(ServingEngine):
        title = "my engine"
        @classmethod
        def for_serving(cls, base_model, tokenizer, eos_token_ids, **settings): return cls(...)
        def load_adapter(self, name, path): ...
        def unload_adapter(self, name): ...
        def generate(self, adapters, prompts, *, n, temperature, top_p, max_new_tokens, seed, progress=False): ...

    register_serving_engine("mine", MyServing)   # then Sampler(..., backend="mine"), --backend mine
"""

from __future__ import annotations

import abc
import logging
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import QempoError
from .common import Completion

logger = logging.getLogger("qempo_lite")

AUTO_ORDER = ("vllm", "hf")  # what backend "auto" tries, in order: the first that can start here serves


def request_seed(seed: int, label: str, prompt_index: int, chunk: int = 0) -> int:
    """A seed per (label, prompt): reproducible whatever else is sampled in the same call,
    and different across prompts, so their random streams are independent."""
    return zlib.crc32(f"{seed}:{label}:{prompt_index}:{chunk}".encode()) & 0x7FFFFFFF


class ServingEngine(abc.ABC):
    """A base model serving named LoRA adapters side by side; see the module docstring.

    Class attributes: ``title`` names the engine on the page and in logs; ``mixes_adapters``:
    one :meth:`generate` call batches the adapters together (multi-LoRA), so callers send them
    all at once rather than one by one; ``settings``: the Sampler settings the engine reads
    (``dtype``, ``device``, ``batch_size``, ``max_lora_rank``, ``max_loras``,
    ``gpu_memory_utilization``, ``max_model_len``, ``seed``), the others being ignored.
    Instance attributes, set by the engine: ``max_model_len`` (prompt + answer tokens it takes;
    None: no limit of its own), ``context_length`` (the most tokens the model takes, for callers
    that cap prompts), ``max_lora_rank`` (None: any rank), and the base model's parameter shapes
    ``base_shapes`` / ``vocab_size`` that adapters are checked against.
    """

    title: str = ""
    mixes_adapters: bool = False
    settings: tuple[str, ...] = ()

    max_model_len: int | None = None
    context_length: int | None = None
    max_lora_rank: int | None = None
    base_shapes: dict[str, tuple[int, ...]] = {}
    vocab_size: int | None = None

    @classmethod
    def unavailable(cls, *, gpu_only: bool = False) -> tuple[str, str] | None:
        """Why ``auto`` should not pick this engine here, as (reason, how to get it), or None.
        ``gpu_only``: the caller wants an engine that runs well on this machine's CPU too."""
        return None

    @classmethod
    @abc.abstractmethod
    def for_serving(cls, base_model: str, tokenizer, eos_token_ids: list[int], **settings: Any) -> "ServingEngine":
        """The engine serving ``base_model`` (a local directory or a Hub id); ``settings``: the Sampler's
        (see the class docstring) and any engine options. Refuse what it cannot serve with a
        one-line :class:`~qempo_lite.errors.QempoError`."""

    @abc.abstractmethod
    def load_adapter(self, name: str, path: Path) -> None:
        """Load the (already checked) adapter directory ``path`` under ``name``; a broken one fails here."""

    @abc.abstractmethod
    def unload_adapter(self, name: str) -> None:
        """Unload the adapter ``name`` and free its memory."""

    @abc.abstractmethod
    def generate(self, adapters: Mapping[str, str | None], prompts: Sequence[list[int]], *, n: int,
                 temperature: float, top_p: float, max_new_tokens: int, seed: int,
                 progress: bool = False) -> dict[str, list[list[Completion]]]:
        """``n`` completions of every prompt (token ids) from every adapter: label -> one list per prompt.

        ``adapters``: label -> the loaded adapter's name, None for the base model. Requests are
        seeded with :func:`request_seed` (``seed``, label, prompt index). ``temperature == 0``
        decodes greedily: the ``n`` completions of a prompt are then one answer repeated."""

    def close(self) -> None:
        """Free what the engine holds. Nothing by default."""


SERVING_ENGINES: dict[str, type[ServingEngine]] = {}


def register_serving_engine(name: str, engine: type[ServingEngine]) -> type[ServingEngine]:
    """Make ``engine`` the one ``Sampler(backend=name)`` and ``--backend name`` build."""
    if not (isinstance(engine, type) and issubclass(engine, ServingEngine)):
        raise TypeError(f"serving engine {name!r} must be a ServingEngine subclass, got {engine!r}")
    if name == "auto":
        raise ValueError("'auto' chooses among the serving engines; register under another name")
    SERVING_ENGINES[name] = engine
    return engine


def serving_engine_names() -> tuple[str, ...]:
    return tuple(SERVING_ENGINES)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_serving_engine(requested: str, *, gpu_only: bool = False) -> tuple[str, str, tuple[str, str] | None]:
    """(name, what serves, why ``auto`` passed over the engines before it): ``requested`` resolved.

    ``auto`` takes the first engine of :data:`AUTO_ORDER` that can start here
    (:meth:`ServingEngine.unavailable`); the reason is the last engine passed over's, as
    (reason, how to get it), None when none was.
    """
    if requested in SERVING_ENGINES:
        return requested, f"{SERVING_ENGINES[requested].title} (--backend {requested})", None
    if requested != "auto":
        raise QempoError(f"backend {requested!r} is not one of auto, {', '.join(SERVING_ENGINES)}")
    passed_over = None
    for name in (n for n in AUTO_ORDER if n in SERVING_ENGINES):
        reason = SERVING_ENGINES[name].unavailable(gpu_only=gpu_only)
        if reason is None:
            why = f": {'; '.join(passed_over)}" if passed_over else ""
            where = "GPU" if _on_gpu() else "CPU"
            return name, f"{SERVING_ENGINES[name].title} on the {where} (--backend auto{why})", passed_over
        passed_over = reason
    raise QempoError(f"no sampling engine can start here ({'; '.join(passed_over or ())}); pass --backend")


def make_serving_engine(name: str, base_model: str, tokenizer, eos_token_ids: list[int], settings: Mapping[str, Any],
                        **options: Any) -> ServingEngine:
    """The serving engine registered under ``name`` (:meth:`ServingEngine.for_serving`), given the ``settings`` it
    reads (:attr:`ServingEngine.settings`) and every engine option."""
    if name not in SERVING_ENGINES:
        raise QempoError(f"backend {name!r} is unknown; use one of auto, {', '.join(SERVING_ENGINES)}")
    engine = SERVING_ENGINES[name]
    return engine.for_serving(base_model, tokenizer, eos_token_ids,
                              **{key: value for key, value in settings.items() if key in engine.settings}, **options)


def completion_length(completion: Completion, eos_token_ids: Sequence[int]) -> int:
    """The completion's tokens without the end-of-sequence token that ended it."""
    tokens = completion.token_ids
    return len(tokens) - 1 if tokens and tokens[-1] in eos_token_ids else len(tokens)


# ------------------------------------------------------------------------------ the base model's shapes


def model_config(base_model: str):
    """``base_model``'s transformers config, None when transformers cannot read it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base_model, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - the engine reads the config itself and reports what is wrong
        return None


def context_length(config) -> int | None:
    """The most positions a model of ``config`` takes (a multimodal config's text part)."""
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


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
