"""The one engine protocol, and the registry every sampler builds its engine from.

An :class:`Engine` holds one base model and serves adapters on it: the adapter being trained
(:meth:`Engine.sync`, served under the name :data:`TRAINED`), and any number of saved adapters
loaded by name (:meth:`Engine.load_adapter`). :meth:`Engine.generate` samples ``n`` completions of
every prompt from several of them at once, each completion with its token ids and the log-prob
of each sampled token (:class:`~qempo_lite.rollout.common.Completion`). The online trainer
(through :class:`~qempo_lite.rollout.driver.RolloutDriver`), the evaluation
:class:`~qempo_lite.evaluate.sampling.Sampler` and the app all sample through this protocol; an
engine is built by name, for training (:func:`make_engine`, ``rollout: NAME`` in a recipe) or for
serving (:func:`make_serving_engine`, ``--backend NAME``), and nothing else picks a backend.

Seeds: ``seed=None`` samples from the engine's own random stream (torch's global generator for
transformers, the engine's seed for vLLM). An integer seeds every request from (``seed``, label,
prompt index) with :func:`request_seed`, so a prompt's draws do not depend on what else is sampled
in the call. The one exception is the live model of the transformers engine (the :data:`TRAINED`
adapter of an engine built for training), sampled as ``model.generate`` with ``seed`` set once
per call.

Two flags tell the trainer how to drive an engine:

* ``samples_live_weights``: generation reads the training model itself (no adapter to move: the
  trainer neither gathers a sharded adapter for it nor waits for a sync; under ZeRO-3 it
  gathers the weights for generation instead).
* ``serves_all_processes``: the main process samples every training process's prompts (one
  engine outside the training processes); otherwise each process samples its own rows.

Adding an engine is one class and one registry line::

    class MyEngine(Engine):
        @classmethod
        def for_training(cls, policy, tokenizer, args, *, num_processes): return cls(...)   # rollout: mine
        @classmethod
        def for_serving(cls, base_model, tokenizer, eos_token_ids, **settings): return cls(...)  # --backend mine
        def generate(self, adapters, prompts, *, n, temperature=1.0, top_p=1.0, max_new_tokens=256,
                     seed=None, progress=False): ...
        def sync(self, peft_model, state_dict=None): ...          # to train with it
        def load_adapter(self, name, path): ...                   # to serve saved adapters
        def unload_adapter(self, name): ...

    register_engine("mine", MyEngine)

(``docs/rollout-engines.md`` describes the protocol and has worked examples that the tests run.)
"""

from __future__ import annotations

import abc
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import QempoError
from .common import Completion, SyncInfo

TRAINED = "qempo-lite:trained"  # the adapter sync() serves: before the first sync, the base model
AUTO_ORDER = ("vllm", "hf")  # what backend "auto" tries, in order: the first that can start here serves


def request_seed(seed: int, label: str, prompt_index: int, chunk: int = 0) -> int:
    """A seed per (label, prompt): reproducible whatever else is sampled in the same call,
    and different across prompts, so their random streams are independent."""
    return zlib.crc32(f"{seed}:{label}:{prompt_index}:{chunk}".encode()) & 0x7FFFFFFF


class Engine(abc.ABC):
    """A base model serving adapters side by side; see the module docstring.

    Class attributes: ``title`` names the engine on the page and in logs; ``mixes_adapters``: one
    :meth:`generate` call batches the adapters together (multi-LoRA), so callers send them all at
    once rather than one by one; ``settings``: the Sampler settings :meth:`for_serving` reads
    (``dtype``, ``device``, ``batch_size``, ``max_lora_rank``, ``max_loras``,
    ``gpu_memory_utilization``, ``max_model_len``, ``seed``, ``lora``), the others being left out;
    ``samples_live_weights`` and ``serves_all_processes`` (module docstring).
    Instance attributes, set by the engine: ``tokenizer``, ``eos_token_ids``, ``max_model_len``
    (prompt + answer tokens it takes; None: no limit of its own), ``context_length`` (the most
    tokens the model takes), ``max_lora_rank`` (None: any rank), and the base model's parameter
    shapes ``base_shapes`` / ``vocab_size`` that saved adapters are checked against.
    """

    title: str = ""
    mixes_adapters: bool = False
    settings: tuple[str, ...] = ()
    samples_live_weights: bool = False
    serves_all_processes: bool = False
    length_fix: str = "shorten the prompt"

    tokenizer: Any = None
    eos_token_ids: list[int] = []
    max_model_len: int | None = None
    context_length: int | None = None
    max_lora_rank: int | None = None
    base_shapes: dict[str, tuple[int, ...]] = {}
    vocab_size: int | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def for_training(cls, policy, tokenizer, args, *, num_processes: int) -> "Engine":
        """The engine an online run uses: ``policy`` the unwrapped (PEFT) model being trained, ``args`` its
        :class:`~qempo_lite.configs.QEMPOOnlineConfig`, ``num_processes`` the training processes.
        Refuse settings the engine cannot serve with a one-line :class:`~qempo_lite.errors.QempoError`."""
        raise QempoError(f"{cls.__name__} does not sample rollouts for training; set rollout: to one of "
                         f"{', '.join(engine_names())}")

    @classmethod
    def for_serving(cls, base_model: str, tokenizer, eos_token_ids: list[int], **settings: Any) -> "Engine":
        """The engine serving ``base_model`` (a local directory or a Hub id) to evaluation and the app;
        ``settings``: the Sampler's it reads (:attr:`settings`) and any engine options."""
        raise QempoError(f"{cls.__name__} does not serve saved adapters; use --backend "
                         f"{' or '.join(serving_engine_names())}")

    @classmethod
    def unavailable(cls, *, gpu_only: bool = False) -> tuple[str, str] | None:
        """Why ``auto`` should not pick this engine here, as (reason, how to get it), or None.
        ``gpu_only``: the caller wants an engine that runs well on this machine's CPU too."""
        return None

    # ------------------------------------------------------------------ adapters
    def sync(self, peft_model, state_dict=None) -> SyncInfo:
        """Serve ``peft_model``'s adapter as :data:`TRAINED` from now on (``state_dict``: its LoRA tensors,
        gathered whole when the model is sharded)."""
        raise QempoError(f"{type(self).__name__} does not serve an adapter being trained")

    def load_adapter(self, name: str, path: Path) -> None:
        """Load the (already checked) adapter directory ``path`` under ``name``; a broken one fails here."""
        raise QempoError(f"{type(self).__name__} serves the adapter being trained only, not saved ones")

    def unload_adapter(self, name: str) -> None:
        """Unload the adapter ``name`` and free its memory."""
        raise QempoError(f"{type(self).__name__} serves the adapter being trained only, not saved ones")

    # ------------------------------------------------------------------ sampling
    @abc.abstractmethod
    def generate(self, adapters: Mapping[str, str | None], prompts: Sequence[list[int]], *, n: int,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None,
                 progress: bool = False) -> dict[str, list[list[Completion]]]:
        """``n`` completions of every prompt (token ids) from every adapter: label -> one list per prompt.

        ``adapters``: label -> an adapter's name: one loaded with :meth:`load_adapter`, :data:`TRAINED`,
        or None for the base model. ``temperature == 0`` decodes greedily: the ``n`` completions of
        a prompt are then one answer repeated. ``Completion.logprobs``: the model's own
        temperature-1 log-probs of the sampled tokens (no top-p truncation)."""

    def sample(self, prompts: Sequence, *, n: int, temperature: float = 1.0, top_p: float = 1.0,
               max_new_tokens: int = 256, seed: int | None = None) -> list[list[Completion]]:
        """Rollouts of the adapter being trained (:data:`TRAINED`): ``n`` completions of every prompt (a string,
        a chat or token ids), one list per prompt. Sampling only: ``temperature`` must be above 0."""
        from ..generation import check_sampling, prompt_token_ids

        check_sampling(n, temperature, top_p, max_new_tokens)
        ids = prompt_token_ids(self.tokenizer, prompts)
        self.check_lengths(ids, max_new_tokens)
        return self.generate({TRAINED: TRAINED}, ids, n=n, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, seed=seed)[TRAINED]

    def check_lengths(self, prompts: Sequence[list[int]], max_new_tokens: int) -> None:
        """Refuse, in one line, a rollout prompt that leaves no room for ``max_new_tokens`` within
        :attr:`max_model_len` (``length_fix`` says what to do). Evaluation's Sampler checks its own prompts: an
        answer there may end at the model's context."""
        for index, ids in enumerate(prompts):
            if self.max_model_len is not None and len(ids) + max_new_tokens > self.max_model_len:
                raise QempoError(
                    f"prompt {index} has {len(ids)} tokens: with max_new_tokens={max_new_tokens} it needs a "
                    f"max_model_len of {len(ids) + max_new_tokens} ({self.title}: {self.max_model_len}); "
                    f"{self.length_fix}")

    # ------------------------------------------------------------------ lifetime
    def probe(self) -> None:
        """Check, before the first step, that the engine can serve the run (called on the main process alone
        when the engine serves all processes). Nothing to check by default."""

    def close(self) -> None:
        """Free what the engine holds. Nothing by default."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- the registry

ENGINES: dict[str, type[Engine]] = {}


def register_engine(name: str, engine: type[Engine]) -> type[Engine]:
    """Make ``engine`` the one ``rollout: name`` and ``--backend name`` build (each where the class overrides
    :meth:`Engine.for_training` / :meth:`Engine.for_serving`)."""
    if not (isinstance(engine, type) and issubclass(engine, Engine)):
        raise TypeError(f"engine {name!r} must be an Engine subclass, got {engine!r}")
    if name == "auto":
        raise ValueError("'auto' chooses among the serving engines; register under another name")
    ENGINES[name] = engine
    return engine


def _overrides(engine: type[Engine], method: str) -> bool:
    return getattr(engine, method).__func__ is not getattr(Engine, method).__func__


def engine_names() -> tuple[str, ...]:
    """The engines that sample rollouts for training (``rollout:``)."""
    return tuple(name for name, engine in ENGINES.items() if _overrides(engine, "for_training"))


def serving_engine_names() -> tuple[str, ...]:
    """The engines that serve saved adapters to evaluation and the app (``--backend``)."""
    return tuple(name for name, engine in ENGINES.items() if _overrides(engine, "for_serving"))


def make_engine(name: str, policy, tokenizer, args, *, num_processes: int = 1) -> Engine:
    """The engine registered under ``name``, built for an online run (:meth:`Engine.for_training`)."""
    if name not in engine_names():
        raise QempoError(f"rollout {name!r} is unknown; use one of {', '.join(engine_names())}")
    return ENGINES[name].for_training(policy, tokenizer, args, num_processes=num_processes)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_serving_engine(requested: str, *, gpu_only: bool = False) -> tuple[str, str, tuple[str, str] | None]:
    """(name, what serves, why ``auto`` passed over the engines before it): ``requested`` resolved.

    ``auto`` takes the first engine of :data:`AUTO_ORDER` that can start here
    (:meth:`Engine.unavailable`); the reason is the last engine passed over's, as
    (reason, how to get it), None when none was.
    """
    names = serving_engine_names()
    if requested in names:
        return requested, f"{ENGINES[requested].title} (--backend {requested})", None
    if requested != "auto":
        raise QempoError(f"backend {requested!r} is not one of auto, {', '.join(names)}")
    passed_over = None
    for name in (n for n in AUTO_ORDER if n in names):
        reason = ENGINES[name].unavailable(gpu_only=gpu_only)
        if reason is None:
            why = f": {'; '.join(passed_over)}" if passed_over else ""
            where = "GPU" if _on_gpu() else "CPU"
            return name, f"{ENGINES[name].title} on the {where} (--backend auto{why})", passed_over
        passed_over = reason
    raise QempoError(f"no sampling engine can start here ({'; '.join(passed_over or ())}); pass --backend")


def make_serving_engine(name: str, base_model: str, tokenizer, eos_token_ids: list[int], settings: Mapping[str, Any],
                        **options: Any) -> Engine:
    """The engine registered under ``name`` built for serving (:meth:`Engine.for_serving`), given the ``settings`` it
    reads (:attr:`Engine.settings`) and every engine option."""
    if name not in serving_engine_names():
        raise QempoError(f"backend {name!r} is unknown; use one of auto, {', '.join(serving_engine_names())}")
    engine = ENGINES[name]
    return engine.for_serving(base_model, tokenizer, eos_token_ids,
                              **{key: value for key, value in settings.items() if key in engine.settings}, **options)


def require_lora(policy, name: str):
    """The PEFT ``policy`` an engine serving the adapter on the base model needs, or a one-line refusal."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        raise QempoError(f"rollout: {name} serves a LoRA adapter on the base model; train a LoRA (pass peft_config)")
    return policy
