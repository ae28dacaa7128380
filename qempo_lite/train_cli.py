"""The training commands: ``qempo-lite train offline`` and ``qempo-lite train online``.

Each reads a YAML recipe (keys of the trainer config, :class:`~qempo_lite.runs.ModelArgs` and
its run arguments; ``--key value`` flags override), loads the data and the model, trains,
and saves the adapter with ``qempo_lite.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .configs import COEFFICIENT_NAMES, QEMPOConfig, QEMPOOnlineConfig
from .errors import QempoError
from .guards import train_unless_finished
from .methods import method_names
from .runs import (ModelArgs, check_evaluation, checkpoint_to_resume, load_model_for, lora_metadata,
                   run_metadata, run_training_command, save_finished_run, take_over_hub_push, use_rich_progress,
                   write_run_metadata)

# ----------------------------------------------------------------------------------------------
# qempo-lite train offline


@dataclass
class OfflineRunArgs:
    """What to train and evaluate on, and whether to resume."""

    dataset: str = field(metadata={"help": "Hub dataset name or local .jsonl/.json/.parquet preference file."})
    dataset_split: str | None = field(default=None, metadata={"help": "Training split of a Hub dataset (default "
                                                                     "train); a local file has none."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Evaluation pairs: a local file or a Hub "
                                                                     "dataset (default: the training dataset)."})
    eval_split: str | None = field(default=None, metadata={"help": "Evaluation split of a Hub dataset."})
    eval_fraction: float | None = field(default=None, metadata={"help": "Hold out this fraction of the training "
                                                                        "pairs (seeded) for evaluation."})
    on_bad_rows: str = field(default="error", metadata={"help": "error or skip malformed rows."})
    limit: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    eval_limit: int | None = field(default=None, metadata={"help": "Use at most this many evaluation pairs."})
    max_row_bytes: int = field(default=1_000_000, metadata={"help": "Largest accepted row of a data file, bytes."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last complete checkpoint in output_dir."})

    def __post_init__(self):
        from .data import ON_BAD_ROWS, is_local_source

        if self.on_bad_rows not in ON_BAD_ROWS:
            raise QempoError(f"on_bad_rows must be one of {', '.join(ON_BAD_ROWS)}, got {self.on_bad_rows!r}")
        for name in ("limit", "eval_limit", "max_row_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise QempoError(f"{name} must be a positive number, got {value!r}")
        if self.eval_fraction is not None:
            if not 0.0 < self.eval_fraction < 1.0:
                raise QempoError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction!r}")
            if self.eval_dataset is not None or self.eval_split is not None:
                raise QempoError("eval_fraction holds out training pairs; do not combine it with eval_dataset or "
                                 "eval_split")
        if is_local_source(self.dataset) and self.dataset_split is not None:
            raise QempoError(f"dataset_split={self.dataset_split!r} applies to Hub datasets; the local file "
                             f"{self.dataset} has no splits: remove dataset_split")
        eval_source = self.eval_dataset or self.dataset
        if self.eval_split is not None and is_local_source(eval_source):
            raise QempoError(f"eval_split={self.eval_split!r} applies to Hub datasets, but the evaluation data is the "
                             f"local file {eval_source}; name an evaluation file with eval_dataset or hold out "
                             "training pairs with eval_fraction")
        if self.eval_dataset is not None and not is_local_source(self.eval_dataset) and self.eval_split is None:
            raise QempoError(f"eval_dataset {self.eval_dataset!r} is a Hub dataset; name its split with eval_split")
        if (self.eval_dataset is None and self.eval_split is not None and not is_local_source(self.dataset)
                and self.eval_split == (self.dataset_split or "train")):
            raise QempoError(f"eval_split={self.eval_split!r} is the training split; evaluate on another split or "
                             "hold out training pairs with eval_fraction")

    @property
    def has_eval(self) -> bool:
        return self.eval_dataset is not None or self.eval_split is not None or self.eval_fraction is not None


_OFFLINE_TYPES = (QEMPOConfig, ModelArgs, OfflineRunArgs)
_OFFLINE_HINT = "see 'qempo-lite train offline --help'"


def _usage(mode: str, task: str, run_args: type, config: type, objective_keys: tuple[str, ...], trl_config: str,
           examples: str) -> str:
    from .recipe import describe_keys

    lines = [
        f"usage: qempo-lite train {mode} --config RECIPE [--key value ...] [--resume]",
        "",
        f"Train a LoRA/QLoRA adapter {task} with {', '.join(method_names(mode))}.",
        f"Keys come from the YAML recipe: a file, or a shipped recipe's name ('qempo-lite recipes list {mode}');",
        "--key value flags override them.",
        "",
        "model keys:", *describe_keys(ModelArgs),
        "",
        "data and run keys:", *describe_keys(run_args),
        "",
        "objective keys:",
        *[line for line in describe_keys(config) if line.split("(")[0].strip() in objective_keys],
        "",
        f"training keys: the fields of trl.{trl_config} / transformers.TrainingArguments that leave the objective",
        "  alone (listed in qempo_lite/trl_fields.py; any other is refused), e.g. output_dir, learning_rate,",
        f"  {examples}.",
    ]
    return "\n".join(lines)


def offline_usage() -> str:
    return _usage("offline", "on preference pairs", OfflineRunArgs, QEMPOConfig, ("loss_method",) + COEFFICIENT_NAMES,
                  "DPOConfig", "num_train_epochs, max_steps, per_device_train_batch_size, gradient_accumulation_steps,"
                  "\n  max_length, gradient_checkpointing, bf16, save_steps, logging_steps, precompute_ref_log_probs, seed")


def load_eval_pairs(run_args: OfflineRunArgs, train, seed: int):
    """``(train, evaluation, description)``: evaluation pairs from their own file/split, or held out of ``train``.

    Never the training rows themselves: a local file has no splits, so its evaluation pairs come
    from ``eval_dataset`` or a seeded ``eval_fraction`` of the distinct training pairs (every copy
    of a held-out pair leaves the training set, and the copies are counted: ``duplicates``). An
    evaluation file's pairs that are training pairs too are counted (``also_in_training``).
    """
    from .data import is_local_source, load_preferences
    from .data.splits import hold_out_by_content, pairs_also_in

    if run_args.eval_fraction is not None:
        train, evaluation, duplicates = hold_out_by_content(train, run_args.eval_fraction, seed)
        if duplicates:
            print(f"{duplicates} training rows repeat an earlier pair; held out by content: no copy of an "
                  "evaluation pair is trained on", flush=True)
        if run_args.eval_limit is not None:
            evaluation = evaluation.select(range(min(run_args.eval_limit, len(evaluation))))
        return train, evaluation, {"held_out_fraction": run_args.eval_fraction, "seed": seed,
                                   "rows": len(evaluation), "duplicates": duplicates}
    if not run_args.has_eval:
        return train, None, None
    source = run_args.eval_dataset or run_args.dataset
    split = None if is_local_source(source) else run_args.eval_split
    evaluation, report = load_preferences(source, split=split or "train", on_bad_rows=run_args.on_bad_rows,
                                          limit=run_args.eval_limit, max_row_bytes=run_args.max_row_bytes,
                                          return_report=True)
    shared = pairs_also_in(evaluation, train)
    if shared:
        print(f"warning: {shared} of the {len(evaluation)} evaluation pairs are also training pairs", flush=True)
    return train, evaluation, {"dataset": source, "split": split, "rows": len(evaluation), "skipped": report.skipped,
                               "also_in_training": shared}


def train_offline(config: QEMPOConfig, model_args: ModelArgs, run_args: OfflineRunArgs) -> Path:
    """Load data and model, train, save the adapter + tokenizer + ``qempo_lite.json`` in ``config.output_dir``."""
    from .console import quiet_setup
    from .data import is_local_source, load_preferences
    from .offline import QEMPOTrainer

    check_evaluation(config, run_args.has_eval)
    checkpoint = checkpoint_to_resume(config.output_dir, run_args.resume, needs_optimizer=not config.save_only_model)
    split = None if is_local_source(run_args.dataset) else (run_args.dataset_split or "train")
    with quiet_setup():
        print(f"loading preference pairs from {run_args.dataset}", flush=True)
        train, report = load_preferences(run_args.dataset, split=split or "train", on_bad_rows=run_args.on_bad_rows,
                                         limit=run_args.limit, max_row_bytes=run_args.max_row_bytes,
                                         return_report=True)
        train, evaluation, eval_data = load_eval_pairs(run_args, train, config.seed)
        repo_id = take_over_hub_push(config)
        model, tokenizer, peft_config = load_model_for(model_args, config)
        trainer = QEMPOTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                               processing_class=tokenizer, peft_config=peft_config)
    dropped = trainer.dropped_for_length
    if dropped.get("train") or dropped.get("eval"):
        print(f"dropped for length (the prompt alone fills max_length={config.max_length} tokens, or chosen and "
              f"rejected are the same once cut to it): {dropped.get('train', 0)} training and "
              f"{dropped.get('eval', 0)} evaluation pairs")
    if eval_data is not None:
        eval_data["dropped_for_length"] = dropped.get("eval", 0)
    rows = len(train) - dropped.get("train", 0)
    facts = dict(base_model=model_args.model_name_or_path, quantization=model_args.quantization,
                 lora=lora_metadata(model_args, config),
                 data={"dataset": run_args.dataset, "split": split, "rows": rows, "skipped": report.skipped,
                       "dropped_for_length": dropped.get("train", 0), "eval": eval_data})
    trainer.run_description = lambda steps: run_metadata(config, steps=steps, **facts)  # each saved folder's card
    use_rich_progress(trainer)
    train_unless_finished(trainer, checkpoint, config.max_steps)
    return save_finished_run(trainer, config, repo_id,
                             lambda steps: write_run_metadata(config.output_dir, config, steps=steps, **facts))


def offline_cli(argv: list[str]) -> int:
    """``qempo-lite train offline --config recipe.yaml [--key value ...] [--resume]``."""
    return run_training_command(argv, offline_usage, _OFFLINE_TYPES, _OFFLINE_HINT, train_offline, "offline")


# ----------------------------------------------------------------------------------------------
# qempo-lite train online


@dataclass
class OnlineRunArgs:
    """The prompts to train on, the rewards that score them, and whether to resume."""

    datasets: list[str] = field(metadata={"help": "GSM8K / MATH sources (reward math), or any prompt data: Hub "
                                                  "names or local .jsonl files with a 'prompt' column."})
    reward_funcs: list[str] = field(default_factory=lambda: ["math"], metadata={
        "help": "Rewards, summed with reward_weights: built-ins math (column 'answer', GSM8K/MATH data) and "
                "answer_set (column 'answers': the accepted answers), or module:function / path/to/file.py:function "
                "with TRL's signature (keywords prompts, completions, every dataset column; **kwargs)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of each Hub dataset."})
    on_bad_rows: str = field(default="error", metadata={"help": "error or skip malformed rows."})
    limit: int | None = field(default=None, metadata={"help": "Use at most this many problems of each dataset."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir."})

    def __post_init__(self):
        from .data import ON_BAD_ROWS

        if not self.datasets:
            raise QempoError("datasets is empty; list at least one GSM8K or MATH source")
        if not self.reward_funcs or not all(isinstance(name, str) and name for name in self.reward_funcs):
            raise QempoError(f"reward_funcs must be a list of reward names, got {self.reward_funcs!r}")
        if self.on_bad_rows not in ON_BAD_ROWS:
            raise QempoError(f"on_bad_rows must be one of {', '.join(ON_BAD_ROWS)}, got {self.on_bad_rows!r}")
        if self.limit is not None and self.limit < 1:
            raise QempoError(f"limit must be a positive number of problems, got {self.limit!r}")


_ONLINE_HINT = "see 'qempo-lite train online --help'"


_ONLINE_TYPES = (QEMPOOnlineConfig, ModelArgs, OnlineRunArgs)


def online_usage() -> str:
    objective = ("loss_method", "beta", "beta1", "beta2", "gate", "advantage", "correct_threshold", "rollout",
                 "vllm_max_lora_rank", "vllm_dtype", "vllm_quantization", "vllm_gpu_memory_utilization",
                 "vllm_enable_sleep_mode", "vllm_max_model_length", "vllm_server_url", "vllm_server_adapter_dir",
                 "vllm_server_retries", "vllm_server_request_timeout")
    return _usage("online", "online on math problems (verifiable reward)", OnlineRunArgs, QEMPOOnlineConfig,
                  objective, "GRPOConfig", "max_steps, num_train_epochs, num_generations, per_device_train_batch_size,"
                  "\n  gradient_accumulation_steps, max_completion_length, temperature, bf16, save_steps, logging_steps, "
                  "seed")


def load_problems(run_args: OnlineRunArgs, seed: int):
    """All datasets of the run, concatenated and shuffled: math problems (:func:`qempo_lite.data.load_math`)
    when the rewards are ``math`` alone, else prompt rows with every column (:func:`qempo_lite.data.prompts.load_prompts`)."""
    from datasets import concatenate_datasets

    from .data import load_math
    from .data.prompts import load_prompts

    kwargs = dict(split=run_args.dataset_split, on_bad_rows=run_args.on_bad_rows, limit=run_args.limit)
    if run_args.reward_funcs == ["math"]:
        parts = [load_math(source, **kwargs).select_columns(["prompt", "answer"]) for source in run_args.datasets]
    else:
        parts = [load_prompts(source, **kwargs) for source in run_args.datasets]
        columns = [set(part.column_names) for part in parts]
        if any(c != columns[0] for c in columns):
            raise QempoError(f"the datasets have different columns ({'; '.join(', '.join(sorted(c)) for c in columns)})"
                             "; give every dataset the columns the rewards read")
    return concatenate_datasets(parts).shuffle(seed=seed)


def _online_facts(config: QEMPOOnlineConfig, model_args, run_args: OnlineRunArgs, rows: int) -> dict:
    """The keywords of :func:`~qempo_lite.runs.run_metadata` for an online run, but the steps."""
    return dict(
        base_model=model_args.model_name_or_path, quantization=model_args.quantization,
        lora=lora_metadata(model_args, config),
        data={"datasets": run_args.datasets, "split": run_args.dataset_split, "rows": rows}, mode="online",
        extra={"online": {"rollout": config.rollout, "num_generations": config.num_generations,
                          "temperature": config.temperature, "gate": config.gate, "advantage": config.advantage,
                          "correct_threshold": config.correct_threshold, "reward": run_args.reward_funcs}},
    )


def train_online(config: QEMPOOnlineConfig, model_args, run_args: OnlineRunArgs) -> Path:
    """Load problems and model, train, save adapter + tokenizer + ``qempo_lite.json`` in ``config.output_dir``."""
    from .console import quiet_setup

    checkpoint = checkpoint_to_resume(config.output_dir, run_args.resume, needs_optimizer=not config.save_only_model)
    with quiet_setup():
        # Inside: importing TRL's GRPO trainer imports vLLM when installed, which prints to stderr.
        from .online import QEMPOOnlineTrainer
        from .rewards.plugins import load_reward_funcs

        print(f"loading prompts from {', '.join(run_args.datasets)}", flush=True)
        problems = load_problems(run_args, config.seed)
        rewards = load_reward_funcs(run_args.reward_funcs, problems.column_names)
        if config.reward_weights is not None and len(config.reward_weights) != len(rewards):
            raise QempoError(f"reward_weights has {len(config.reward_weights)} values for {len(rewards)} reward_funcs; "
                             "give one weight per reward")
        repo_id = take_over_hub_push(config)
        model, tokenizer, peft_config = load_model_for(model_args, config)
        trainer = QEMPOOnlineTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=problems,
                                     processing_class=tokenizer, peft_config=peft_config)
    facts = _online_facts(config, model_args, run_args, len(problems))
    trainer.run_description = lambda steps: run_metadata(config, steps=steps, **facts)  # each saved folder's card
    use_rich_progress(trainer)
    try:
        train_unless_finished(trainer, checkpoint, config.max_steps)
    finally:
        trainer.close_rollout()
    return save_finished_run(trainer, config, repo_id,
                             lambda steps: write_run_metadata(config.output_dir, config, steps=steps, **facts))


def online_cli(argv: list[str]) -> int:
    """``qempo-lite train online --config recipe.yaml [--key value ...] [--resume]``."""
    return run_training_command(argv, online_usage, _ONLINE_TYPES, _ONLINE_HINT, train_online, "online")


__all__ = ["OfflineRunArgs", "OnlineRunArgs", "load_eval_pairs", "load_problems", "offline_cli", "offline_usage",
           "online_cli", "online_usage", "train_offline", "train_online"]
