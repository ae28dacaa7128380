"""What every rollout engine returns (:class:`Completion`, :class:`SyncInfo`) and the LoRA check before a sync."""

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
