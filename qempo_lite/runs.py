"""Run plumbing shared by the offline and online trainers and their commands.

The model and adapter keys (:class:`ModelArgs`), ``qempo_lite.json``, checkpoints and resuming,
the post-training Hub push, the progress display, and the final save that keeps the pushed
folder pickle-free. Neither trainer imports the other: both import this.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .adapters import METADATA_FILE, safetensors_header
from .errors import QempoError

# The TRL releases whose trainer internals qempo-lite's trainers were written against; outside it they warn and
# tests/test_offline.py / tests/test_online.py fail loudly.
TRL_VERSION_RANGE = ">=1.16,<1.17"


def warn_if_untested_trl(trainer: str, test_file: str) -> None:
    import trl
    from packaging.specifiers import SpecifierSet

    if trl.__version__ not in SpecifierSet(TRL_VERSION_RANGE):
        warnings.warn(f"qempo-lite's {trainer} was written against trl{TRL_VERSION_RANGE}, found trl "
                      f"{trl.__version__}; run {test_file} before trusting it", stacklevel=3)


class PickleFreeSave:
    """Trainer mixin: every save checks that the weights are finite; the final save holds the adapter (gathered
    first under ZeRO-3 / FSDP) and the arguments as JSON, never transformers' pickled ``training_args.bin``;
    every saved adapter folder gets its model card.

    The final directory is what gets pushed and loaded elsewhere, so it stays pickle-free;
    checkpoints (``_internal_call``) keep theirs, which ``resume_from_checkpoint`` reads. The card
    (:func:`qempo_lite.hub.write_adapter_card`) replaces PEFT's template README in the final folder and in
    each ``checkpoint-N``; TRL's template card is never written.
    """

    run_description = None  # steps -> the run's qempo_lite.json record (the training commands set it)

    def create_model_card(self, *args, **kwargs) -> None:
        """TRL's template card (its fields empty for a local run) is not written; see :meth:`save_model`."""

    def describe_run(self, steps: int) -> dict[str, Any]:
        """What the card says of the run: the command's record, else what the trainer itself knows."""
        if self.run_description is not None:
            return self.run_description(steps)
        from trl import GRPOConfig

        return run_metadata(self.args, base_model=None, data=None, steps=steps,
                            mode="online" if isinstance(self.args, GRPOConfig) else "offline")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from .distributed import save_sharded_adapter
        from .hub import write_adapter_card
        from .guards import refuse_non_finite_adapter

        refuse_non_finite_adapter(self)  # a NaN adapter is never saved, as a checkpoint or as the result
        if not save_sharded_adapter(self, output_dir):  # ZeRO-3 / FSDP: the LoRA tensors gathered first
            super().save_model(output_dir, _internal_call=_internal_call)
        if not self.args.should_save:
            return
        location = output_dir or self.args.output_dir
        output_dir = Path(location)
        write_adapter_card(output_dir, self.describe_run(self.state.global_step), str(location))
        if _internal_call:
            return
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        (output_dir / "training_args.json").write_text(self.args.to_json_string(), encoding="utf-8")


@dataclass
class ModelArgs:
    """The base model and adapter (keywords of :func:`qempo_lite.models.load_policy`)."""

    model_name_or_path: str = field(metadata={"help": "Hub id or local directory of the base (instruct) model."})
    quantization: str | None = field(default=None, metadata={"help": "none (LoRA), 4bit (QLoRA, NF4) or 8bit."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout; applies only with disable_dropout: "
                                                               "false (TRL's default turns dropout off offline)."})
    target_modules: str | list[str] = field(default="all-linear",
                                            metadata={"help": "Modules that get an adapter; all-linear or a list."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, flash_attention_2."})
    dtype: str | None = field(default=None, metadata={"help": "bfloat16, float16, float32 or auto (default: "
                                                              "bf16 on GPU, fp32 on CPU)."})

    def load(self, config):
        """``load_policy`` with these keys and the trainer config's checkpointing / remote-code flags."""
        from .models import load_policy

        return load_policy(
            self.model_name_or_path, quantization=self.quantization, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout, target_modules=self.target_modules,
            gradient_checkpointing=config.gradient_checkpointing, attn_implementation=self.attn_implementation,
            dtype=self.dtype, trust_remote_code=config.trust_remote_code)

    def __post_init__(self):
        # Checked here so that a typo fails before the data and the model are loaded.
        from .bounds import check_model_numbers
        from .models import check_dtype, normalise_quantization

        self.quantization = normalise_quantization(self.quantization)
        check_dtype(self.dtype)
        check_model_numbers(self)


def write_run_metadata(output_dir: str | Path, args, **facts) -> Path:
    """Write ``qempo_lite.json`` (read by the model card and the app) next to the adapter: :func:`run_metadata`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / METADATA_FILE
    path.write_text(json.dumps(run_metadata(args, **facts), indent=2) + "\n", encoding="utf-8")
    return path


def run_metadata(args, *, base_model: str | None, data: dict[str, Any] | None, quantization: str | None = None,
                 lora: dict[str, Any] | None = None, steps: int | None = None, mode: str = "offline",
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's record: method and coefficients (from the trainer config ``args``), base model, data, steps; a dpo run
    with TRL's f-DPO divergence also records its ``f_divergence_type``."""
    divergence = getattr(args, "f_divergence_type", "reverse_kl")
    return {
        "mode": mode,
        "method": args.loss_method,
        "coefficients": args.coefficients(),
        **({"f_divergence_type": divergence} if divergence != "reverse_kl" else {}),
        "base_model": base_model,
        "quantization": quantization,
        "lora": lora,
        "data": data,
        "steps": steps,
        "qempo_lite_version": __version__,
        **(extra or {}),
    }


def lora_metadata(model_args: "ModelArgs", config) -> dict[str, Any]:
    """The adapter's settings as trained: TRL's ``disable_dropout`` turns LoRA dropout off."""
    dropout = 0.0 if config.disable_dropout else model_args.lora_dropout
    return {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": dropout,
            "target_modules": model_args.target_modules}


def use_rich_progress(trainer) -> None:
    """Swap transformers' tqdm progress and dict printing for TRL's rich progress display."""
    from transformers import PrinterCallback, ProgressCallback
    from trl import RichProgressCallback

    if not trainer.args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(RichProgressCallback())


def take_over_hub_push(config) -> str | None:
    """The repository to push the finished adapter to, if ``push_to_hub`` is set.

    transformers' own push uploads the whole output directory (checkpoints, optimizer states,
    pickled arguments) at every save; qempo-lite turns it off and, after training, pushes only
    the adapter, the tokenizer if changed and a model card (:func:`qempo_lite.hub.push_adapter`).
    """
    if not config.push_to_hub:
        return None
    if not config.hub_model_id or config.hub_model_id.count("/") != 1:
        raise QempoError(f"push_to_hub needs hub_model_id as USER/NAME, got {config.hub_model_id!r}; "
                         "pass --hub-model-id USER/NAME")
    config.push_to_hub = False
    return config.hub_model_id


def push_finished_adapter(config, repo_id: str | None) -> None:
    """Push ``config.output_dir`` (adapter, tokenizer if changed, card) when :func:`take_over_hub_push` said so.

    With several processes only the main one pushes.
    """
    from accelerate import PartialState

    if repo_id and PartialState().is_main_process:
        from .hub import push_adapter

        print(f"pushed to {push_adapter(config.output_dir, repo_id, private=bool(config.hub_private_repo))}")


def checkpoint_problem(path: Path, *, needs_optimizer: bool = True) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from (a save cut short), or None if it is complete.

    Complete means: ``trainer_state.json`` parses, the weights are whole safetensors files (their header
    describes the file's exact size, :func:`~qempo_lite.adapters.safetensors_header`), and (unless
    ``save_only_model``) the optimizer and scheduler states are readable archives (under DeepSpeed, its
    optimizer states are present; under FSDP, its sharded ones are complete).
    """
    import zipfile

    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is missing or unreadable"
    weights = [path / name for name in ("adapter_model.safetensors", "model.safetensors") if (path / name).is_file()]
    weights += sorted(path.glob("model-*.safetensors"))
    if not weights:
        return "it holds no weights"
    for file in weights:
        try:
            safetensors_header(file, file.name, fix=None)
        except QempoError as err:
            return str(err)
        except OSError:
            return f"{file.name} is unreadable"
    if needs_optimizer:
        # DeepSpeed keeps the optimizer (and its scheduler) in the folder that `latest` names; FSDP writes
        # optimizer.bin, or a sharded optimizer_0/ folder (torch.distributed.checkpoint, .metadata last).
        if (path / "latest").is_file():
            tag = (path / "latest").read_text(encoding="utf-8", errors="replace").strip()
            found = tag and any((path / tag).glob("*optim_states.pt"))
            return None if found else "the DeepSpeed optimizer states are missing"
        if (path / "optimizer_0").is_dir() and not (path / "optimizer_0" / ".metadata").is_file():
            return "optimizer_0 (sharded optimizer states) is incomplete"
        optimizer = [] if (path / "optimizer_0").is_dir() else ["optimizer.bin" if (path / "optimizer.bin").exists()
                                                                 else "optimizer.pt"]
        for name in (*optimizer, "scheduler.pt"):
            file = path / name
            try:
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:
                        return f"{name} is corrupt"
            except (OSError, zipfile.BadZipFile):
                return f"{name} is missing or unreadable"
    return None


def checkpoint_to_resume(output_dir: str, resume: bool, *, needs_optimizer: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` of ``output_dir`` when resuming; refuse to overwrite one otherwise.

    A checkpoint whose save was cut short (a kill during ``save``) is skipped, and said so on stderr; when every
    one was cut short (a kill during the first save), ``--resume`` starts the run over.
    """
    import re
    import sys

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise QempoError(f"output_dir {output_dir} is a file; choose a directory")
    found = sorted((int(m.group(1)), p) for p in (out.iterdir() if out.is_dir() else [])
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    if not resume:
        if found:
            raise QempoError(f"{output_dir} already holds checkpoints ({found[-1][1].name}); pass --resume to "
                             "continue that run or choose another output_dir")
        return None
    for _, path in reversed(found):
        problem = checkpoint_problem(path, needs_optimizer=needs_optimizer)
        if problem is None:
            return str(path)
        print(f"skipping {path.name}: {problem} (its save was cut short)", file=sys.stderr)
    if found:  # a kill during the first save: nothing to lose, so the run starts over (its saves replace these)
        print(f"no complete checkpoint in {output_dir} (all {len(found)} were cut short): starting from step 0",
              file=sys.stderr)
        return None
    raise QempoError(f"no checkpoint to resume from in {output_dir}; drop --resume to start a new run")


def check_evaluation(config, has_eval: bool) -> None:
    """One-line refusals for evaluation settings that have no evaluation data to run on."""
    strategy = getattr(config.eval_strategy, "value", config.eval_strategy)
    if not has_eval and strategy != "no":
        raise QempoError(f"eval_strategy={strategy!r} needs evaluation data; set eval_dataset, eval_split or "
                         "eval_fraction, or set eval_strategy: 'no'")
    if not has_eval and config.load_best_model_at_end:
        raise QempoError("load_best_model_at_end needs evaluation data; set eval_dataset, eval_split or "
                         "eval_fraction, or remove load_best_model_at_end")


def load_model_for(model_args: ModelArgs, config):
    """Check the model source (one line if it cannot load), then load ``(model, tokenizer, peft_config)``."""
    from .models import check_model_source

    check_model_source(model_args.model_name_or_path)
    print(f"loading {model_args.model_name_or_path} and preparing the trainer", flush=True)
    return model_args.load(config)


def save_finished_run(trainer, config, repo_id: str | None, write_metadata) -> Path:
    """Save the adapter and the trainer state (every process: sharded models gather), ``qempo_lite.json`` through
    ``write_metadata(steps)`` and the Hub push (the main process only)."""
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        write_metadata(trainer.state.global_step)
    push_finished_adapter(config, repo_id)
    return Path(config.output_dir)


def run_training_command(argv: list[str], usage, config_types: tuple, help_hint: str, train, mode: str) -> int:
    """``--help`` or: parse the recipe and flags into ``config_types``, then ``train(config, model_args, run_args)``."""
    from .console import input_read
    from .recipe import parse_recipe

    if not argv or any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    config, model_args, run_args = parse_recipe(argv, config_types, help_hint=help_hint, mode=mode)
    input_read()
    output_dir = train(config, model_args, run_args)
    print(f"adapter, tokenizer and {METADATA_FILE} saved to {output_dir}")
    return 0


__all__ = ["METADATA_FILE", "ModelArgs", "PickleFreeSave", "TRL_VERSION_RANGE", "check_evaluation", "checkpoint_problem",
           "checkpoint_to_resume", "load_model_for", "lora_metadata", "push_finished_adapter", "run_metadata",
           "run_training_command",
           "save_finished_run", "take_over_hub_push", "use_rich_progress",
           "warn_if_untested_trl", "write_run_metadata"]
