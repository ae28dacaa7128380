"""Checks a training run makes while it runs, so that nothing wrong is saved or trained in silence.

* :func:`refuse_non_finite_adapter`: before any save (checkpoints included) the trained
  weights are checked; a NaN or an infinity stops the run with one line naming the step, and
  nothing is written.
* :func:`finished_step` / :func:`restore_finished_run`: ``--resume`` from a checkpoint that
  already reached the run's last step trains nothing (transformers would take one more step);
  the final adapter is the checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def finished_step(checkpoint: str | None, max_steps: int) -> int | None:
    """The step a checkpoint reached when it is at or past the run's end, else None.

    The end is ``max_steps`` when set, else the total the run computed (recorded in the
    checkpoint's ``trainer_state.json``).
    """
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    step, end = state.get("global_step"), max_steps if max_steps > 0 else state.get("max_steps")
    if isinstance(step, int) and isinstance(end, int) and end > 0 and step >= end:
        return step
    return None


def train_unless_finished(trainer, checkpoint: str | None, max_steps: int) -> None:
    """``trainer.train(resume_from_checkpoint=checkpoint)``, or, when that checkpoint already reached the run's
    end, :func:`restore_finished_run` (training it would take a step past the end)."""
    step = finished_step(checkpoint, max_steps)
    if step is None:
        trainer.train(resume_from_checkpoint=checkpoint)
    else:
        restore_finished_run(trainer, checkpoint, step, max_steps)


def restore_finished_run(trainer, checkpoint: str, step: int, max_steps: int) -> None:
    """Put a finished checkpoint's adapter and trainer state into ``trainer`` without training, and say so."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    from .adapters import WEIGHTS_FILE

    weights = Path(checkpoint) / WEIGHTS_FILE
    if not weights.is_file():
        raise QempoError(f"{checkpoint} reached step {step} but holds no {WEIGHTS_FILE}; start a new run in another "
                         "output_dir")
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(policy, PeftModel):
        raise QempoError(f"{checkpoint} reached step {step}, the end of the run; there is nothing to resume")
    set_peft_model_state_dict(policy, load_file(weights))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    end = f"max_steps={max_steps}" if max_steps > 0 else f"the run's {trainer.state.max_steps} steps"
    if trainer.accelerator.is_main_process:
        print(f"{Path(checkpoint).name} already reached step {step} ({end}): nothing left to train; its adapter "
              "is saved as the final one (raise max_steps to train further)", flush=True)


__all__ = ["finished_step", "non_finite_values", "refuse_non_finite_adapter", "restore_finished_run",
           "train_unless_finished"]
