"""Offline QEMPO: ``QEMPOConfig`` / ``QEMPOTrainer``, thin subclasses of TRL's ``DPOConfig`` / ``DPOTrainer``.

Every offline method is TRL's stock DPO ``sigmoid`` loss with ``beta = a`` and reference
log-probs scaled by ``c / a`` (see :func:`qempo_lite.losses.offline_loss`)::

    -log σ(a·Δlog π − c·Δlog π_ref) = -log σ(a·(Δlog π − (c/a)·Δlog π_ref))

So the trainer overrides three public methods and nothing else of ``DPOTrainer``:

* ``compute_ref_log_probs``: zeros for ``qempo`` (c = 0), with no forward pass; otherwise
  TRL's (the base model with the adapter disabled, or the precomputed values);
* ``compute_loss``: puts the scaled reference log-probs into the batch, then lets TRL's loss
  read them exactly as it reads precomputed ones. Logging is TRL's: ``rewards/chosen`` is then
  the implicit reward ``a·log π(y+) − c·log π_ref(y+)``, ``rewards/margins`` its chosen−rejected
  difference, ``logps/*`` the policy log-probs and ``entropy`` the policy's mean per-token
  entropy, all from the one policy forward;
* ``save_model``: the final directory gets ``training_args.json`` instead of a pickle.

``qempo`` therefore builds no reference model, never disables the adapter and runs one policy
forward (chosen and rejected concatenated) per micro-batch.

``cli(argv)`` is ``qempo-lite train offline --config recipe.yaml [--key value ...]``.
"""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from . import __version__
from . import trl_fields
from .adapters import METADATA_FILE
from .errors import QempoError
from .losses import OFFLINE_METHODS
from .methods import coefficient_help, get_method, loss_coefficients, method_help, method_names, with_defaults
from .trl_fields import refuse_unlisted_fields

# The TRL releases whose DPOTrainer internals this module was written against (see
# check_trl_compatibility); outside this range QEMPOTrainer warns and the compatibility test fails.
TRL_VERSION_RANGE = ">=1.16,<1.17"

COEFFICIENT_NAMES = ("beta", "beta1", "beta2", "alpha")  # QEMPOConfig's fields; each method takes some


@dataclass
class QEMPOConfig(DPOConfig):
    """``DPOConfig`` plus the choice of offline objective and its coefficients.

    ============  ========================  ==============================================
    loss_method   keys                      loss: −log σ(a·Δlog π − c·Δlog π_ref)
    ============  ========================  ==============================================
    ``qempo``     ``beta`` = 1/λ (4e-3)     a = beta, c = 0 (Eq. 7; no reference model)
    ``qempo_kl``  ``beta1`` = 1/λ1 (4e-3),  a = beta1 + beta2, c = beta2 (Eq. 6)
                  ``beta2`` = λ2/λ1 (1e-2)
    ``dpo``       ``beta`` (1e-2)           a = c = beta (Eq. 4, the paper's RLHF)
    ``spl``       ``alpha`` (2e-2),         a = alpha, c = beta (Soft Preference Learning)
                  ``beta`` (1e-2)
    ============  ========================  ==============================================

    Unset coefficients take the paper's values (DPO, QEMPO, QEMPO-KL). The paper gives none
    for SPL, whose optimum is π ∝ π_ref^{β/α} exp(r/α): the default keeps DPO's β = 1e-2 on
    the reference and doubles the policy coefficient (α = 2β, an SPL entropy weight of 2), so
    the optimum keeps half of the reference's log-probabilities where DPO keeps all of them.

    Only TRL's ``sigmoid`` loss on summed log-probs with the default ``reverse_kl`` divergence
    belongs to this family; other ``loss_type`` / ``f_divergence_type`` values, ``use_weighting``
    and ``ld_alpha`` are refused. ``qempo`` ignores
    ``precompute_ref_log_probs`` (there is nothing to precompute).
    """

    loss_method: str = field(
        default="qempo",
        metadata={"help": "Offline objective. " + method_help("offline"), "choices": list(OFFLINE_METHODS)},
    )
    beta: float | None = field(default=None, metadata={"help": coefficient_help("beta", "offline")})
    beta1: float | None = field(default=None, metadata={"help": coefficient_help("beta1", "offline")})
    beta2: float | None = field(default=None, metadata={"help": coefficient_help("beta2", "offline")})
    alpha: float | None = field(default=None, metadata={"help": coefficient_help("alpha", "offline")})

    def __post_init__(self):
        if self.loss_method not in method_names("offline"):
            raise QempoError(f"loss_method must be one of {', '.join(method_names('offline'))}, got "
                             f"{self.loss_method!r}")
        method = get_method(self.loss_method)
        for name in COEFFICIENT_NAMES:
            if name not in method.defaults and getattr(self, name) is not None:
                raise QempoError(f"{name} is not a coefficient of loss_method {self.loss_method} (it uses "
                                 f"{', '.join(method.coefficient_names)}); remove {name}")
        for name, value in with_defaults(self.loss_method, self.coefficients()).items():
            setattr(self, name, value)
        try:
            loss_coefficients(self.loss_method, self.coefficients())
        except ValueError as err:
            raise QempoError(f"{err}; fix the coefficient in the config") from None
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss_types != ["sigmoid"]:
            raise QempoError(f"loss_type must be 'sigmoid' for the QEMPO family, got {self.loss_type!r}; remove it")
        if self.f_divergence_type != "reverse_kl":
            raise QempoError(f"f_divergence_type must be 'reverse_kl' for the QEMPO family, got "
                             f"{self.f_divergence_type!r}; remove it")
        # Both change what the loss is made of (weighted pairs, length-discounted log-probs), so the
        # family's optimum π ∝ π_ref^(c/a) exp(r/a) would no longer be the one trained for.
        if self.use_weighting:
            raise QempoError("use_weighting (WPO) is not part of the QEMPO family; set use_weighting: false")
        if self.ld_alpha is not None:
            raise QempoError("ld_alpha (LD-DPO) is not part of the QEMPO family; remove it")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise QempoError(f"truncation_mode must be keep_start or keep_end, got {self.truncation_mode!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise QempoError(f"max_length must be a number of tokens >= 2 (or none), got {self.max_length!r}")
        refuse_unlisted_fields(self, DPOConfig, trl_fields.DPO, "QEMPOConfig")
        super().__post_init__()

    def coefficients(self) -> dict[str, float]:
        """The method's coefficients as :func:`~qempo_lite.losses.offline_loss` names them."""
        return {name: getattr(self, name) for name in get_method(self.loss_method).coefficient_names}


def _size(dataset) -> int | None:
    """Rows of a map-style dataset (None for iterable ones, or a dict of several evaluation sets: summed)."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        sizes = [_size(d) for d in dataset.values()]
        return None if None in sizes else sum(sizes)
    try:
        return len(dataset)
    except TypeError:
        return None


def _is_peft_model(model) -> bool:
    from accelerate.utils import is_peft_model

    return not isinstance(model, str) and is_peft_model(model)


class QEMPOTrainer(DPOTrainer):
    """``DPOTrainer`` training the QEMPO family; same constructor, with a :class:`QEMPOConfig`.

    ``QEMPOTrainer(model=..., args=QEMPOConfig(...), train_dataset=..., eval_dataset=...,
    processing_class=..., peft_config=...)``. The reference of ``qempo_kl``/``dpo``/``spl`` is,
    as in TRL:

    * a base model with ``peft_config``: that base model (the new adapter disabled);
    * a ``PeftModel`` (an adapter that may already be trained): a frozen copy of the starting
      adapter, which TRL keeps as a second adapter named ``"ref"``;
    * a full model: a second, frozen copy of it (or its precomputed log-probs).

    ``precompute_ref_log_probs=True`` computes the reference once over the dataset before
    training. ``qempo`` uses no reference at all: no copy, no "ref" adapter, no forward pass.

    Pairs whose prompt alone fills ``max_length`` are dropped by TRL; their number is
    ``dropped_for_length`` (``{"train": n, "eval": m}``).
    """

    _tag_names = ["trl", "qempo-lite", "qempo"]
    _name = "QEMPO"
    _paper = {"title": "Quality-constrained Entropy Maximization Policy Optimization for LLM Diversity",
              "id": "2602.15894", "citation": None}

    def __init__(self, model, ref_model=None, args: QEMPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        _warn_if_untested_trl()
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = QEMPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-QEMPO")
        if not isinstance(args, QEMPOConfig):
            raise QempoError(f"QEMPOTrainer needs a QEMPOConfig, got {type(args).__name__}; build QEMPOConfig(...)")
        self.policy_coef, self.ref_coef = loss_coefficients(args.loss_method, args.coefficients())
        full_model_qempo = False
        if self.ref_coef == 0.0:
            if ref_model is not None:
                raise QempoError("loss_method='qempo' uses no reference model; do not pass ref_model")
            # TRL copies a full model as a reference unless the reference log-probs are "precomputed".
            # qempo's are zeros made without a forward pass (compute_ref_log_probs), so a full model takes
            # the precompute path, which then costs one pass of collation and no model call.
            full_model_qempo = not (_is_peft_model(model) or peft_config is not None)
            args.precompute_ref_log_probs = full_model_qempo
        sizes = {"train": _size(train_dataset), "eval": _size(eval_dataset)}
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        # TRL's sigmoid loss is -logsigmoid(self.beta * (Δlogπ - Δref)); compute_loss feeds it ref·c/a.
        self.beta = self.policy_coef
        if self.ref_coef == 0.0:
            # TRL copies a starting PeftModel's adapter into a frozen "ref" adapter; qempo never reads it.
            policy = self.accelerator.unwrap_model(self.model)
            if _is_peft_model(policy) and "ref" in policy.peft_config:
                policy.delete_adapter("ref")
            if full_model_qempo:
                # The precompute flag only served to skip the reference copy; compute_loss supplies the zeros,
                # so evaluate() on a new dataset needs no reference either.
                self.precompute_ref_logps = False
        self.dropped_for_length = {
            name: before - after for name, before, after in
            (("train", sizes["train"], _size(self.train_dataset)), ("eval", sizes["eval"], _size(self.eval_dataset)))
            if before is not None and after is not None
        }
        if _size(self.train_dataset) == 0:
            raise QempoError(f"every training pair's prompt fills max_length={args.max_length} tokens, so TRL dropped "
                             "them all; raise max_length")

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of a batch (chosen, rejected); zeros for ``qempo``, with no forward pass."""
        if self.ref_coef == 0.0:
            zeros = torch.zeros(inputs["input_ids"].shape[0] // 2, device=inputs["input_ids"].device)
            return zeros, zeros
        return super().compute_ref_log_probs(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean over pairs of ``-log σ(a·Δlog π − c·Δlog π_ref)`` (``offline_loss``), through TRL's sigmoid loss.

        The reference log-probs are taken from the batch (precomputed) or computed here, scaled
        by c/a and put back in the batch; with ``self.beta = a`` TRL's loss
        ``-log σ(β·((log π(y+) − ref(y+)) − (log π(y-) − ref(y-))))`` is then the family's.
        """
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or model, inputs)
        scale = self.ref_coef / self.policy_coef
        inputs = {**inputs, "ref_chosen_logps": ref_chosen * scale, "ref_rejected_logps": ref_rejected * scale}
        # TRL's loss reads the reference log-probs from the batch only under this flag.
        precomputed, self.precompute_ref_logps = self.precompute_ref_logps, True
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self.precompute_ref_logps = precomputed

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter (safetensors) and tokenizer; the arguments as JSON rather than a pickle.

        transformers pickles the training arguments (``training_args.bin``) beside the weights. The final
        directory is what gets pushed and loaded elsewhere, so it stays pickle-free; checkpoints
        (``_internal_call``) keep theirs, which ``resume_from_checkpoint`` reads.
        """
        from .distributed import save_sharded_adapter

        if not save_sharded_adapter(self, output_dir):  # ZeRO-3 / FSDP: the LoRA tensors gathered first
            super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call or not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        (output_dir / "training_args.json").write_text(self.args.to_json_string(), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Guard against TRL changing underneath


def _warn_if_untested_trl() -> None:
    import trl
    from packaging.specifiers import SpecifierSet

    if trl.__version__ not in SpecifierSet(TRL_VERSION_RANGE):
        warnings.warn(f"qempo-lite's QEMPOTrainer was written against trl{TRL_VERSION_RANGE}, found trl "
                      f"{trl.__version__}; run tests/test_offline.py before trusting its losses", stacklevel=3)


def check_trl_compatibility() -> None:
    """Raise RuntimeError, saying what changed, if TRL's DPOTrainer no longer fits QEMPOTrainer.

    QEMPOTrainer relies on: ``compute_loss(model, inputs, return_outputs, num_items_in_batch)``,
    ``compute_ref_log_probs(model, inputs)`` and ``save_model(output_dir, _internal_call)``
    (overridden); the private ``_compute_loss`` reading ``inputs["ref_chosen_logps"]`` when
    ``self.precompute_ref_logps`` is set and applying ``-F.logsigmoid(self.beta * delta_score)``;
    ``__init__`` setting ``self.beta`` and ``self.precompute_ref_logps`` from the config.
    """
    import trl
    from packaging.specifiers import SpecifierSet

    problems = []
    if trl.__version__ not in SpecifierSet(TRL_VERSION_RANGE):
        problems.append(f"trl {trl.__version__} is outside the tested range {TRL_VERSION_RANGE}")
    expected = {
        "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
        "compute_ref_log_probs": ["self", "model", "inputs"],
        "_compute_loss": ["self", "model", "inputs", "return_outputs"],
        "save_model": ["self", "output_dir", "_internal_call"],
        "__init__": ["self", "model", "ref_model", "args", "data_collator", "train_dataset", "eval_dataset",
                     "processing_class", "compute_metrics", "callbacks", "optimizers", "quantization_config",
                     "peft_config"],
    }
    for name, params in expected.items():
        method = getattr(DPOTrainer, name, None)
        if method is None:
            problems.append(f"DPOTrainer.{name} no longer exists")
            continue
        found = list(inspect.signature(method).parameters)
        if found != params:
            problems.append(f"DPOTrainer.{name} signature changed from ({', '.join(params)}) to ({', '.join(found)})")
    try:
        loss_source = inspect.getsource(DPOTrainer._compute_loss)
        init_source = inspect.getsource(DPOTrainer.__init__)
    except (OSError, TypeError, AttributeError):
        loss_source = init_source = ""
    needles = [
        (loss_source, "if self.precompute_ref_logps:",
         "_compute_loss no longer branches on self.precompute_ref_logps"),
        (loss_source, 'inputs["ref_chosen_logps"]', "_compute_loss no longer reads inputs['ref_chosen_logps']"),
        (loss_source, "-F.logsigmoid(self.beta * delta_score)",
         "the sigmoid loss is no longer -logsigmoid(self.beta * delta)"),
        (loss_source, "chosen_rewards = self.beta * chosen_logratios",
         "the logged rewards are no longer beta * logratio"),
        (init_source, "self.precompute_ref_logps = args.precompute_ref_log_probs",
         "__init__ no longer sets precompute_ref_logps"),
        (init_source, "self.beta = args.beta", "__init__ no longer sets self.beta from args.beta"),
    ]
    problems += [message for source, needle, message in needles if needle not in source]
    if problems:
        raise RuntimeError("QEMPOTrainer does not fit this TRL: " + "; ".join(problems)
                           + ". Re-check qempo_lite/offline.py against trl/trainer/dpo_trainer.py.")


# ----------------------------------------------------------------------------------------------
# Command line: qempo-lite train offline


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
        from .models import check_dtype, normalise_quantization

        self.quantization = normalise_quantization(self.quantization)
        check_dtype(self.dtype)


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


_CONFIG_TYPES = (QEMPOConfig, ModelArgs, OfflineRunArgs)
_HELP_HINT = "see 'qempo-lite train offline --help'"


def usage() -> str:
    from .recipe import describe_keys

    lines = [
        "usage: qempo-lite train offline --config RECIPE.yaml [--key value ...] [--resume]",
        "",
        "Train a LoRA/QLoRA adapter on preference pairs with qempo, qempo_kl, dpo or spl.",
        "Keys come from the YAML recipe (see recipes/offline/); --key value flags override them.",
        "",
        "model keys:", *describe_keys(ModelArgs),
        "",
        "data and run keys:", *describe_keys(OfflineRunArgs),
        "",
        "objective keys:",
        *[line for line in describe_keys(QEMPOConfig)
          if line.split("(")[0].strip() in ("loss_method",) + COEFFICIENT_NAMES],
        "",
        "training keys: the fields of trl.DPOConfig / transformers.TrainingArguments that leave the objective",
        "  alone (listed in qempo_lite/trl_fields.py; any other is refused), e.g. output_dir,",
        "  learning_rate, num_train_epochs, max_steps, per_device_train_batch_size, gradient_accumulation_steps,",
        "  max_length, gradient_checkpointing, bf16, save_steps, logging_steps, precompute_ref_log_probs, seed.",
    ]
    return "\n".join(lines)


def write_run_metadata(output_dir: str | Path, args, *, base_model: str, data: dict[str, Any],
                       quantization: str | None = None, lora: dict[str, Any] | None = None,
                       steps: int | None = None, mode: str = "offline", extra: dict[str, Any] | None = None) -> Path:
    """Write ``qempo_lite.json`` (read by the model card and the app) next to the adapter."""
    output_dir = Path(output_dir)
    metadata = {
        "mode": mode,
        "method": args.loss_method,
        "coefficients": args.coefficients(),
        "base_model": base_model,
        "quantization": quantization,
        "lora": lora,
        "data": data,
        "steps": steps,
        "qempo_lite_version": __version__,
        **(extra or {}),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / METADATA_FILE
    path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return path


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

    Complete means: ``trainer_state.json`` parses, the weights' safetensors header parses, and
    (unless ``save_only_model``) the optimizer and scheduler states are readable archives (under
    DeepSpeed, its optimizer states are present; under FSDP, its sharded ones are complete).
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
            total = file.stat().st_size
            with file.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if size > total - 8:
                    return f"{file.name} is truncated"
                header = json.loads(handle.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if total < 8 + size + end:
                return f"{file.name} is truncated"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
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

    A checkpoint whose save was cut short (a kill during ``save``) is skipped, and said so on stderr.
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
    if found:
        raise QempoError(f"no complete checkpoint to resume from in {output_dir} (all {len(found)} were cut short); "
                         "drop --resume to start again")
    raise QempoError(f"no checkpoint to resume from in {output_dir}; drop --resume to start a new run")


def load_eval_pairs(run_args: OfflineRunArgs, train, seed: int):
    """``(train, evaluation, description)``: evaluation pairs from their own file/split, or held out of ``train``.

    Never the training rows themselves: a local file has no splits, so its evaluation pairs come
    from ``eval_dataset`` or a seeded ``eval_fraction`` of the training pairs.
    """
    from .data import is_local_source, load_preferences

    if run_args.eval_fraction is not None:
        if len(train) < 2:
            raise QempoError("eval_fraction needs at least 2 training pairs")
        parts = train.train_test_split(test_size=run_args.eval_fraction, seed=seed)
        evaluation = parts["test"]
        if run_args.eval_limit is not None:
            evaluation = evaluation.select(range(min(run_args.eval_limit, len(evaluation))))
        return parts["train"], evaluation, {"held_out_fraction": run_args.eval_fraction, "seed": seed,
                                            "rows": len(evaluation)}
    if not run_args.has_eval:
        return train, None, None
    source = run_args.eval_dataset or run_args.dataset
    split = None if is_local_source(source) else run_args.eval_split
    evaluation, report = load_preferences(source, split=split or "train", on_bad_rows=run_args.on_bad_rows,
                                          limit=run_args.eval_limit, max_row_bytes=run_args.max_row_bytes,
                                          return_report=True)
    return train, evaluation, {"dataset": source, "split": split, "rows": len(evaluation), "skipped": report.skipped}


def check_evaluation(config, has_eval: bool) -> None:
    """One-line refusals for evaluation settings that have no evaluation data to run on."""
    strategy = getattr(config.eval_strategy, "value", config.eval_strategy)
    if not has_eval and strategy != "no":
        raise QempoError(f"eval_strategy={strategy!r} needs evaluation data; set eval_dataset, eval_split or "
                         "eval_fraction, or set eval_strategy: 'no'")
    if not has_eval and config.load_best_model_at_end:
        raise QempoError("load_best_model_at_end needs evaluation data; set eval_dataset, eval_split or "
                         "eval_fraction, or remove load_best_model_at_end")


def train_offline(config: QEMPOConfig, model_args: ModelArgs, run_args: OfflineRunArgs) -> Path:
    """Load data and model, train, save the adapter + tokenizer + ``qempo_lite.json`` in ``config.output_dir``."""
    from .console import quiet_setup
    from .data import is_local_source, load_preferences
    from .models import check_model_source

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
        check_model_source(model_args.model_name_or_path)
        print(f"loading {model_args.model_name_or_path} and preparing the trainer", flush=True)
        model, tokenizer, peft_config = model_args.load(config)
        trainer = QEMPOTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                               processing_class=tokenizer, peft_config=peft_config)
    dropped = trainer.dropped_for_length
    if dropped.get("train") or dropped.get("eval"):
        print(f"dropped for length (prompt alone >= max_length={config.max_length} tokens): "
              f"{dropped.get('train', 0)} training and {dropped.get('eval', 0)} evaluation pairs")
    if eval_data is not None:
        eval_data["dropped_for_length"] = dropped.get("eval", 0)
    use_rich_progress(trainer)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.output_dir)  # adapter (safetensors) + tokenizer; every process (sharded models gather)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        write_run_metadata(
            config.output_dir, config, base_model=model_args.model_name_or_path,
            quantization=model_args.quantization, lora=lora_metadata(model_args, config),
            data={"dataset": run_args.dataset, "split": split, "rows": len(train) - dropped.get("train", 0),
                  "skipped": report.skipped, "dropped_for_length": dropped.get("train", 0), "eval": eval_data},
            steps=trainer.state.global_step,
        )
    push_finished_adapter(config, repo_id)  # the main process only
    return Path(config.output_dir)


def cli(argv: list[str]) -> int:
    """``qempo-lite train offline --config recipe.yaml [--key value ...] [--resume]``."""
    from .console import input_read
    from .recipe import parse_recipe

    if not argv or any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    config, model_args, run_args = parse_recipe(argv, _CONFIG_TYPES, help_hint=_HELP_HINT)
    input_read()
    output_dir = train_offline(config, model_args, run_args)
    print(f"adapter, tokenizer and {METADATA_FILE} saved to {output_dir}")
    return 0


__all__ = ["METADATA_FILE", "ModelArgs", "OfflineRunArgs", "QEMPOConfig", "QEMPOTrainer",
           "TRL_VERSION_RANGE", "check_trl_compatibility", "cli", "train_offline", "usage", "write_run_metadata"]
