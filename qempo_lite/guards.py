"""Checks a training run makes while it runs, so that nothing wrong is saved or trained in silence.

* :func:`refuse_non_finite_adapter`: before any save (checkpoints included) the trained
  weights are checked; a NaN or an infinity stops the run with one line naming the step, and
  nothing is written.
"""

from __future__ import annotations

import torch

from .errors import QempoError


@torch.no_grad()
def non_finite_values(model) -> int:
    """How many entries of the trainable parameters (this process's shards) are NaN or infinite."""
    count = 0
    for param in model.parameters():
        if not param.requires_grad or not param.is_floating_point():
            continue
        data = getattr(param, "ds_tensor", None)  # DeepSpeed ZeRO-3 keeps this process's shard there
        data = param if data is None or param.numel() else data
        count += int((~torch.isfinite(data)).sum().item())
    return count


def refuse_non_finite_adapter(trainer) -> None:
    """QempoError, on every process, when the trained weights hold a NaN or an infinity.

    A collective under several processes: every process calls it, as every process saves.
    """
    count = non_finite_values(trainer.model)
    if trainer.accelerator.num_processes > 1:
        total = torch.tensor([count], dtype=torch.long, device=trainer.accelerator.device)
        count = int(trainer.accelerator.reduce(total, reduction="sum").item())
    if count:
        raise QempoError(
            f"training diverged: after step {trainer.state.global_step} the adapter holds {count:,} NaN or infinite "
            "values, so nothing was saved; lower learning_rate or the method's coefficients (or check the base "
            "model's weights and the data) and train again")


__all__ = ["non_finite_values", "refuse_non_finite_adapter"]
