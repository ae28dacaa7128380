"""The training step both benchmarks time: one trainer driven one update at a time, as Trainer's inner loop does."""

from __future__ import annotations

import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stepper:
    """One update per :meth:`step`: ``training_step`` (forward, the trainer's loss, backward), then the optimizer step.

    ``seq_len``: refuse batches whose sequences are not all that many tokens (the timings assume it).
    ``name`` and ``setup_s`` label the stepper in a report; :meth:`step` keeps the wall and process CPU
    times of the steps asked to ``record`` (CPU time is steadier than wall time on a shared machine).
    """

    def __init__(self, trainer, *, seq_len: int | None = None, name: str = "", setup_s: float = 0.0):
        self.name, self.trainer, self.setup_s = name, trainer, setup_s
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch per update
        self.model = trainer.model
        self.model.train()
        self.batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()]
        if seq_len is not None:
            lengths = {int(n) for b in self.batches for n in b["attention_mask"].sum(1)}
            if lengths != {seq_len}:
                raise RuntimeError(f"sequences are not all {seq_len} tokens: {sorted(lengths)}")
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.index = 0

    def step(self, record: bool = True) -> float:
        """One update; its wall time in seconds."""
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        _sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.trainer.training_step(self.model, batch)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        _sync()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if record:
            self.times.append(wall)
            self.cpu_times.append(cpu)
        return wall
