"""Offline QEMPO: ``QEMPOConfig`` / ``QEMPOTrainer``, thin subclasses of TRL's ``DPOConfig`` / ``DPOTrainer``.

Every offline method is TRL's stock DPO ``sigmoid`` loss with ``beta = a`` and reference
log-probs scaled by ``c / a`` (see :func:`qempo_lite.losses.offline_loss`)::

    -log σ(a·Δlog π − c·Δlog π_ref) = -log σ(a·(Δlog π − (c/a)·Δlog π_ref))

So, besides its constructor (the coefficients; no reference model for ``qempo``), the trainer
overrides three public methods and nothing else of ``DPOTrainer``:

* ``compute_ref_log_probs``: zeros for ``qempo`` (c = 0), with no forward pass; otherwise
  TRL's (the base model with the adapter disabled, or the precomputed values);
* ``compute_loss``: puts the scaled reference log-probs into the batch, then lets TRL's loss
  read them exactly as it reads precomputed ones. Logging is TRL's: ``rewards/chosen`` is then
  the implicit reward ``a·log π(y+) − c·log π_ref(y+)``, ``rewards/margins`` its chosen−rejected
  difference, ``logps/*`` the policy log-probs and ``entropy`` the policy's mean per-token
  entropy, all from the one policy forward;
* ``save_model`` (:class:`qempo_lite.runs.PickleFreeSave`): the final directory gets
  ``training_args.json`` instead of a pickle.

``dpo`` alone may also take TRL's f-DPO ``f_divergence_type`` (``js_divergence``, ``forward_kl``):
its c/a is 1, so the reference log-probs reach TRL's f-divergence scores unscaled and the loss is
stock TRL's f-DPO (tested equal to it).

A registered method outside the family (its own ``Method.offline_loss``) is trained on the summed
completion log-probs of one policy forward, with the reference log-probs TRL provides when the
method reads them; TRL's loss and metrics are then not used, only the loss is logged.

``qempo`` therefore builds no reference model, never disables the adapter and runs one policy
forward (chosen and rejected concatenated) per micro-batch.

The config is :class:`qempo_lite.configs.QEMPOConfig`; the command ``qempo-lite train offline`` is
:mod:`qempo_lite.train_cli`.
"""

from __future__ import annotations

import inspect

import torch
from trl import DPOTrainer

from .configs import QEMPOConfig
from .errors import QempoError
from .losses import offline_loss
from .runs import TRL_VERSION_RANGE, PickleFreeSave, warn_if_untested_trl


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


def _same_once_cut(example, max_length: int | None, truncation_mode: str) -> bool:
    """Whether a tokenized pair's chosen and rejected sequences (with their completion masks) are the same once
    TRL's collator cuts them to ``max_length``: such a pair has Δlog π = 0, so it trains nothing but the
    weight decay, and its loss is ln 2 whatever the policy."""
    prompt = example["prompt_ids"]
    sequences = []
    for name in ("chosen_ids", "rejected_ids"):
        ids, mask = prompt + example[name], [0] * len(prompt) + [1] * len(example[name])
        if max_length is not None:
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, mask = ids[cut], mask[cut]
        sequences.append((ids, mask))
    return sequences[0] == sequences[1]


def _drop_same_once_cut(dataset, args):
    """``dataset`` without the pairs :func:`_same_once_cut` finds (a dict of evaluation sets: each one)."""
    if isinstance(dataset, dict):
        return {name: _drop_same_once_cut(part, args) for name, part in dataset.items()}
    if dataset is None or _size(dataset) is None:
        return dataset
    return dataset.filter(lambda example: not _same_once_cut(example, args.max_length, args.truncation_mode),
                          desc="Dropping pairs whose answers are the same once cut to max_length")


def _is_peft_model(model) -> bool:
    from accelerate.utils import is_peft_model

    return not isinstance(model, str) and is_peft_model(model)


class QEMPOTrainer(PickleFreeSave, DPOTrainer):
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

    Pairs whose prompt alone fills ``max_length`` are dropped by TRL, and pairs whose chosen and
    rejected sequences are the same once cut to ``max_length`` (they differ only past it) by
    this trainer; their number is ``dropped_for_length`` (``{"train": n, "eval": m}``).

    A dataset an earlier trainer prepared (its ``train_dataset``: ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``, and ``ref_chosen_logps``/``ref_rejected_logps`` when it precomputed the
    reference) is used as it is, so that several methods trained on the same data, tokenizer,
    ``max_length`` and reference tokenize it and score it with the reference once; with reference
    log-probs in it, ``precompute_ref_log_probs`` must be off (they are read from the batch).
    """

    _tag_names = ["trl", "qempo-lite", "qempo"]
    _name = "QEMPO"
    _paper = {"title": "Quality-constrained Entropy Maximization Policy Optimization for LLM Diversity",
              "id": "2602.15894", "citation": None}

    def __init__(self, model, ref_model=None, args: QEMPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        warn_if_untested_trl("QEMPOTrainer", "tests/test_offline.py")
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = QEMPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-QEMPO")
        if not isinstance(args, QEMPOConfig):
            raise QempoError(f"QEMPOTrainer needs a QEMPOConfig, got {type(args).__name__}; build QEMPOConfig(...)")
        self.method_settings = args.method_settings
        full_model_qempo = False
        if not args.method_settings.needs_reference:
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
        # TRL's sigmoid loss is -logsigmoid(self.beta * (Δlogπ - Δref)) with self.beta = args.beta = a (the config
        # set it); compute_loss feeds it ref·c/a.
        if not args.method_settings.needs_reference:
            # TRL copies a starting PeftModel's adapter into a frozen "ref" adapter; qempo never reads it.
            policy = self.accelerator.unwrap_model(self.model)
            if _is_peft_model(policy) and "ref" in policy.peft_config:
                policy.delete_adapter("ref")
            if full_model_qempo:
                # The precompute flag only served to skip the reference copy; compute_loss supplies the zeros,
                # so evaluate() on a new dataset needs no reference either.
                self.precompute_ref_logps = False
        self.train_dataset = _drop_same_once_cut(self.train_dataset, args)
        self.eval_dataset = _drop_same_once_cut(self.eval_dataset, args)
        self.dropped_for_length = {
            name: before - after for name, before, after in
            (("train", sizes["train"], _size(self.train_dataset)), ("eval", sizes["eval"], _size(self.eval_dataset)))
            if before is not None and after is not None
        }
        if _size(self.train_dataset) == 0:
            raise QempoError(f"every training pair's prompt fills max_length={args.max_length} tokens, or its chosen "
                             "and rejected answers are the same once cut to it, so all were dropped; raise max_length")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenization and length filter, or ``dataset`` itself when an earlier trainer prepared it."""
        columns = set(getattr(dataset, "column_names", None) or ())
        if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.precompute_ref_log_probs and "ref_chosen_logps" in columns:
            raise QempoError(f"the {dataset_name} dataset already holds the reference's log-probs (ref_chosen_logps, "
                             "ref_rejected_logps); set precompute_ref_log_probs=False to train with them, or remove "
                             "those columns to compute them again")
        return dataset

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of a batch (chosen, rejected); zeros for ``qempo``, with no forward pass."""
        if not self.method_settings.needs_reference:
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
        if not self.method_settings.method.in_family:
            return self._method_loss(model, inputs, ref_chosen, ref_rejected, return_outputs)
        scale = self.method_settings.ref_coef / self.method_settings.policy_coef
        inputs = {**inputs, "ref_chosen_logps": ref_chosen * scale, "ref_rejected_logps": ref_rejected * scale}
        # TRL's loss reads the reference log-probs from the batch only under this flag.
        precomputed, self.precompute_ref_logps = self.precompute_ref_logps, True
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self.precompute_ref_logps = precomputed

    def _method_loss(self, model, inputs, ref_chosen, ref_rejected, return_outputs):
        """Mean over pairs of the method's own ``offline_loss`` on the summed completion log-probs."""
        from trl.trainer.utils import selective_log_softmax

        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        mask = inputs["completion_mask"][:, 1:]
        logps = (selective_log_softmax(outputs.logits[:, :-1], inputs["input_ids"][:, 1:]) * mask).sum(dim=1)
        chosen, rejected = logps.chunk(2, dim=0)  # the batch is [chosen, rejected]
        settings = self.method_settings
        reference = (ref_chosen, ref_rejected) if settings.needs_reference else (None, None)
        loss = offline_loss(settings.name, chosen, rejected, *reference, **settings.coefficients).mean()
        return (loss, outputs) if return_outputs else loss


# ----------------------------------------------------------------------------------------------
# Guard against TRL changing underneath


def check_trl_compatibility() -> None:
    """Raise RuntimeError, saying what changed, if TRL's DPOTrainer no longer fits QEMPOTrainer.

    QEMPOTrainer relies on: ``compute_loss(model, inputs, return_outputs, num_items_in_batch)``,
    ``compute_ref_log_probs(model, inputs)``, ``save_model(output_dir, _internal_call)`` and
    ``_prepare_dataset(dataset, processing_class, args, dataset_name)`` (overridden); the private
    ``_compute_loss`` reading ``inputs["ref_chosen_logps"]`` when ``self.precompute_ref_logps`` is set,
    applying ``-F.logsigmoid(self.beta * delta_score)`` and, for ``loss_method: dpo`` with
    ``f_divergence_type`` js_divergence or forward_kl, TRL's f-DPO scores;
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
        "_prepare_dataset": ["self", "dataset", "processing_class", "args", "dataset_name"],
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
    needles = {  # by method: the lines of its source relied on, and what it means when one is missing
        "_compute_loss": {
            "if self.precompute_ref_logps:": "_compute_loss no longer branches on self.precompute_ref_logps",
            'inputs["ref_chosen_logps"]': "_compute_loss no longer reads inputs['ref_chosen_logps']",
            "-F.logsigmoid(self.beta * delta_score)": "the sigmoid loss is no longer -logsigmoid(self.beta * delta)",
            "chosen_rewards = self.beta * chosen_logratios": "the logged rewards are no longer beta * logratio",
            # dpo's f-DPO divergences: f' of the log-ratio from the batch's reference log-probs (unscaled, c/a = 1).
            'elif self.f_divergence_type == "js_divergence":': "_compute_loss lost the js_divergence branch",
            'elif self.f_divergence_type == "forward_kl":': "_compute_loss lost the forward_kl branch",
            "delta_score = chosen_scores - rejected_scores":
                "the loss is no longer made of the divergence's chosen - rejected scores",
        },
        "__init__": {
            "self.precompute_ref_logps = args.precompute_ref_log_probs": "__init__ no longer sets precompute_ref_logps",
            "self.beta = args.beta": "__init__ no longer sets self.beta from args.beta",
        },
    }
    try:
        sources = {name: inspect.getsource(getattr(DPOTrainer, name)) for name in needles}
    except (OSError, TypeError, AttributeError):
        sources = dict.fromkeys(needles, "")
    problems += [message for name, lines in needles.items() for needle, message in lines.items()
                 if needle not in sources[name]]
    if problems:
        raise RuntimeError("QEMPOTrainer does not fit this TRL: " + "; ".join(problems)
                           + ". Re-check qempo_lite/offline.py against trl/trainer/dpo_trainer.py.")


__all__ = ["QEMPOConfig", "QEMPOTrainer", "TRL_VERSION_RANGE", "check_trl_compatibility"]
