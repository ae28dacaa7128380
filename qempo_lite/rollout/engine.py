"""The rollout engine protocol and the registry the online trainer builds its engine from.

An engine samples ``n`` completions per prompt, each with its token ids and the log-prob of
each sampled token (:class:`~qempo_lite.rollout.common.Completion`), and serves the adapter being
trained (:meth:`RolloutEngine.sync`). Two flags tell the trainer how to drive it:

* ``samples_live_weights``: generation reads the training model itself (no adapter to move: the
  trainer neither gathers a sharded adapter for it nor waits for a sync; under ZeRO-3 it
  gathers the weights for generation instead).
* ``serves_all_processes``: the main process samples every training process's prompts (one
  engine outside the training processes); otherwise each process samples its own rows.

Adding an engine is one class and one registry line::

    class MyRollout(RolloutEngine):
        @classmethod
        def for_training(cls, policy, tokenizer, args, *, num_processes):
            return cls(...)
        def generate(self, prompts, *, n, temperature=1.0, top_p=1.0, max_new_tokens=256, seed=None): ...
        def sync(self, peft_model, state_dict=None): ...

    register_engine("mine", MyRollout)   # then rollout: mine in a recipe

(``docs/where-things-live.md`` has a worked example that the tests run; ``docs/rollout-engines.md`` describes
this protocol and the serving engines' of ``serving.py``, which evaluation and the app sample through.)
"""

from __future__ import annotations

import abc
from typing import Sequence

from ..errors import QempoError
from .common import Completion, SyncInfo


class RolloutEngine(abc.ABC):
    """What the online trainer asks of a rollout engine; see the module docstring."""

    samples_live_weights: bool = False
    serves_all_processes: bool = False

    @classmethod
    @abc.abstractmethod
    def for_training(cls, policy, tokenizer, args, *, num_processes: int) -> "RolloutEngine":
        """The engine an online run uses: ``policy`` the unwrapped (PEFT) model being trained, ``args`` its
        :class:`~qempo_lite.configs.QEMPOOnlineConfig`, ``num_processes`` the training processes.
        Refuse settings the engine cannot serve with a one-line :class:`~qempo_lite.errors.QempoError`."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence, *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, seed: int | None = None) -> list[list[Completion]]:
        """``n`` completions of every prompt (a string, a chat or token ids), one inner list per prompt.

        ``Completion.logprobs``: the model's own temperature-1 log-probs of the sampled tokens."""

    @abc.abstractmethod
    def sync(self, peft_model, state_dict=None) -> SyncInfo:
        """Sample ``peft_model``'s adapter from now on (``state_dict``: its LoRA tensors, gathered whole when
        the model is sharded)."""

    def probe(self) -> None:
        """Check, before the first step, that the engine can serve the run (called on the main process alone
        when the engine serves all processes). Nothing to check by default."""

    def close(self) -> None:
        """Free what the engine holds. Nothing by default."""


ENGINES: dict[str, type[RolloutEngine]] = {}


def register_engine(name: str, engine: type[RolloutEngine]) -> type[RolloutEngine]:
    """Make ``engine`` the one ``rollout: name`` builds."""
    if not (isinstance(engine, type) and issubclass(engine, RolloutEngine)):
        raise TypeError(f"rollout engine {name!r} must be a RolloutEngine subclass, got {engine!r}")
    ENGINES[name] = engine
    return engine


def engine_names() -> tuple[str, ...]:
    return tuple(ENGINES)


def make_engine(name: str, policy, tokenizer, args, *, num_processes: int = 1) -> RolloutEngine:
    """The engine registered under ``name``, built for an online run (:meth:`RolloutEngine.for_training`)."""
    if name not in ENGINES:
        raise QempoError(f"rollout {name!r} is unknown; use one of {', '.join(ENGINES)}")
    return ENGINES[name].for_training(policy, tokenizer, args, num_processes=num_processes)


def require_lora(policy, name: str):
    """The PEFT ``policy`` an engine serving the adapter on the base model needs, or a one-line refusal."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        raise QempoError(f"rollout: {name} serves a LoRA adapter on the base model; train a LoRA (pass peft_config)")
    return policy
