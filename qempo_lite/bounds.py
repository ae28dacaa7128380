"""Bounds on a recipe's numbers, checked while it is read: before any data or model is loaded.

A value outside them would otherwise fail late (an "unexpected" error after the model loaded:
a seed numpy cannot take, a batch size torch cannot index) or, worse, train in silence to a
NaN adapter (an infinite weight decay, a learning rate of 1e30). Each is one
:class:`~qempo_lite.errors.QempoError` line naming the key, the value and the range.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

from .errors import QempoError

MAX_SEED = 2**32 - 1  # numpy's RandomState, which transformers' set_seed seeds too
MAX_BATCH = 2**20  # rows per device per step, and accumulation steps: far beyond any memory
MAX_LEARNING_RATE = 1.0  # above it every Adam step moves each weight by more than 1
MAX_LORA_RANK = 4096
MAX_REQUEST_SECONDS = 86_400.0  # a day: beyond it the socket layer overflows (1e300) or the run waits for ever
MAX_RETRIES = 100


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def refuse_non_finite(settings: Any) -> None:
    """Every float of a dataclass (and every float in its lists) is finite: NaN compares false to every
    bound, so it would slip past each range check below."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise QempoError(f"{f.name} must be a finite number, got {value!r}; fix it in the config")


def _in_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
              whole: bool = False, why: str = "") -> None:
    ok = (isinstance(value, int) if whole else _number(value)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        kind = "a whole number" if whole else "a number"
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise QempoError(f"{name} must be {kind} in {left}{low:g}, {high:g}{right}{why}, got {value!r}; fix it in "
                         "the config")


def check_optimizer_numbers(config) -> None:
    """The optimiser, seed and batch settings of a trainer config (``TrainingArguments`` fields)."""
    refuse_non_finite(config)
    for name in ("seed", "data_seed"):
        value = getattr(config, name, None)
        if value is not None:
            _in_range(name, value, 0, MAX_SEED, whole=True, why=" (numpy's seed range)")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(config, name)
        if isinstance(value, int) and value > MAX_BATCH:
            raise QempoError(f"{name}={value} is beyond any memory (at most {MAX_BATCH:,}); fix it in the config")
    lr = config.learning_rate
    if _number(lr) and lr > MAX_LEARNING_RATE:
        raise QempoError(f"learning_rate={lr:g} is above {MAX_LEARNING_RATE:g}: every optimizer step would move each "
                         "weight by more than 1 and the adapter diverges to NaN; use a rate such as 1e-5 .. 1e-3")
    _in_range("weight_decay", config.weight_decay, 0, math.inf, high_open=True)
    if _number(lr) and lr * config.weight_decay >= 1:
        raise QempoError(f"weight_decay={config.weight_decay:g} with learning_rate={lr:g} shrinks every weight by "
                         "lr * weight_decay >= 1 per step (to zero or past it); use a weight_decay such as 0.0 .. 0.1")
    for name in ("adam_beta1", "adam_beta2"):
        _in_range(name, getattr(config, name), 0, 1, high_open=True)
    _in_range("adam_epsilon", config.adam_epsilon, 0, 1, low_open=True, why=" (0 divides by zero)")
    if config.max_grad_norm is not None:
        _in_range("max_grad_norm", config.max_grad_norm, 0, math.inf, high_open=True)
    _in_range("warmup_steps", config.warmup_steps, 0, math.inf, high_open=True)


__all__ = ["MAX_BATCH", "MAX_LEARNING_RATE", "MAX_LORA_RANK", "MAX_REQUEST_SECONDS", "MAX_RETRIES", "MAX_SEED",
           "check_optimizer_numbers", "refuse_non_finite"]
