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


def _show(bound: float) -> str:
    return f"{int(bound):,}" if math.isfinite(bound) and float(bound).is_integer() else f"{bound:g}"


def _in_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
              whole: bool = False, why: str = "") -> None:
    ok = (isinstance(value, int) if whole else _number(value)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        kind = "a whole number" if whole else "a number"
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise QempoError(f"{name} must be {kind} in {left}{_show(low)}, {_show(high)}{right}{why}, got {repr(value)[:40]}; "
                         "fix it in the config")


def check_config_numbers(config) -> None:
    """Every number of a trainer config: finite floats, then the optimiser, seed, batch, scheduler and (online)
    rollout settings."""
    refuse_non_finite(config)
    _check_optimizer_numbers(config)
    check_scheduler_kwargs(config.lr_scheduler_type, config.lr_scheduler_kwargs)
    if hasattr(config, "vllm_server_request_timeout"):
        _check_rollout_numbers(config)


def _check_optimizer_numbers(config) -> None:
    """The optimiser, seed and batch settings of a trainer config (``TrainingArguments`` fields)."""
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


def check_scheduler_kwargs(scheduler: Any, kwargs: Any) -> None:
    """``lr_scheduler_kwargs`` must be options of ``lr_scheduler_type``'s schedule (transformers ignores them for
    the constant schedules and fails on unknown ones only once the optimizer exists)."""
    if not kwargs:
        return
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    if not isinstance(kwargs, dict):
        raise QempoError(f"lr_scheduler_kwargs must be a mapping of option: value, got {type(kwargs).__name__}")
    try:
        kind = SchedulerType(getattr(scheduler, "value", scheduler))
    except ValueError:
        return  # an unknown scheduler: TrainingArguments refuses it in one line of its own
    parameters = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[kind]).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    fixed = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")
    accepted = [] if kind in (SchedulerType.CONSTANT, SchedulerType.CONSTANT_WITH_WARMUP) else \
        [p.name for p in parameters if p.name not in fixed]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = f"takes {', '.join(accepted)}" if accepted else "takes none"
        raise QempoError(f"lr_scheduler_kwargs {', '.join(map(repr, unknown))} is not an option of lr_scheduler_type "
                         f"{kind.value!r} (it {takes}); remove it")


def _check_rollout_numbers(config) -> None:
    """The online config's sampling and vLLM server settings."""
    _in_range("temperature", config.temperature, 0, math.inf, low_open=True, high_open=True)
    _in_range("vllm_server_request_timeout", config.vllm_server_request_timeout, 0, MAX_REQUEST_SECONDS,
              low_open=True, why=" seconds")
    _in_range("vllm_server_retries", config.vllm_server_retries, 0, MAX_RETRIES, whole=True)
    _in_range("vllm_gpu_memory_utilization", config.vllm_gpu_memory_utilization, 0, 1, low_open=True)
    for name in ("num_generations", "max_completion_length"):
        _in_range(name, getattr(config, name), 1, MAX_BATCH, whole=True)


def check_model_numbers(model_args) -> None:
    """The LoRA settings of :class:`~qempo_lite.runs.ModelArgs`."""
    refuse_non_finite(model_args)
    _in_range("lora_r", model_args.lora_r, 1, MAX_LORA_RANK, whole=True)
    _in_range("lora_alpha", model_args.lora_alpha, 0, math.inf, low_open=True, high_open=True)
    _in_range("lora_dropout", model_args.lora_dropout, 0, 1, high_open=True)


__all__ = ["MAX_BATCH", "MAX_LEARNING_RATE", "MAX_LORA_RANK", "MAX_REQUEST_SECONDS", "MAX_RETRIES", "MAX_SEED",
           "check_config_numbers", "check_model_numbers", "check_scheduler_kwargs", "refuse_non_finite"]
