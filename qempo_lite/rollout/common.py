"""What every rollout engine returns (:class:`Completion`, :class:`SyncInfo`), the LoRA check before a sync, and the
checks that a separate server samples from the policy's own model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QempoError


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


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def served_lora_name(peft_model, max_lora_rank: int | None) -> str:
    """The active adapter's name, after checking that vLLM can serve it: a LoRA within ``max_lora_rank``."""
    from peft import PeftModel

    from ..distributed import active_adapter_name

    if not isinstance(peft_model, PeftModel):
        raise QempoError("sync needs a PEFT model with a LoRA adapter; wrap the model with peft.get_peft_model first")
    active = active_adapter_name(peft_model)
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


def check_served_model(listed: dict, expected: str | None, url: str, *, serving: bool = False) -> None:
    """Refuse a server whose model (vLLM's ``/v1/models`` entry: ``id``, the served name, and ``root``, the
    model it loaded) is not ``expected``, the policy's base model (``serving``: the base model eval or the app
    was given): its samples would be another model's.

    Names compare as :func:`qempo_lite.adapters.same_base_model` does (a local copy of a Hub model
    matches), so ``qempo-lite serve BASE`` for a run of ``model_name_or_path: BASE`` always passes.
    """
    from ..adapters import same_base_model

    if expected is None:
        return
    names = [name for name in (listed.get("id"), listed.get("root")) if isinstance(name, str) and name]
    if not any(same_base_model(name, expected) for name in names):
        role, setting = ("given", "--vllm-server-url") if serving else ("being trained", "vllm_server_url")
        raise QempoError(f"the vLLM server at {url} serves {listed.get('id')!r}, not the base model {role} "
                         f"({expected}), so its samples would be another model's; start it with qempo-lite serve "
                         f"{expected} or point {setting} at a server of that model")


def check_token_ids(token_ids: list[int], vocab_size: int | None, url: str) -> None:
    """Refuse token ids outside the policy's vocabulary (a server of another model), before they index anything."""
    if vocab_size is None:
        return
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise QempoError(f"the vLLM server at {url} returned token id {bad}, outside the policy's vocabulary of "
                         f"{vocab_size}; it serves another model: start it with qempo-lite serve on the base model "
                         "being trained")
