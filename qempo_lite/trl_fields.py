"""Which settings of TRL's trainer configs qempo-lite accepts: an allowlist, so a new TRL field is refused.

``QEMPOConfig`` (a ``trl.DPOConfig``) and ``QEMPOOnlineConfig`` (a ``trl.GRPOConfig``) inherit
dozens of fields. Many shape the loss that QEMPO replaces (label smoothing, loss weights, PPO
clipping, reward scaling...), so setting them would change or silently void the objective.
Rather than list the dangerous ones, which a TRL release can extend at any time, qempo-lite
lists the fields known to leave the objective alone: bookkeeping, batching, optimiser,
precision, logging, saving, distribution. Any other inherited field whose value differs from
its default is refused with one line naming it. Fields that qempo-lite itself defines or
checks with a rule of its own (``loss_type``, ``top_p``, ...) are validated by the configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from .errors import QempoError, short_repr

# transformers.TrainingArguments: none of these changes the loss being optimised.
TRAINING_ARGUMENTS = frozenset({
    "output_dir", "do_train", "do_eval", "do_predict", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start",
    "eval_accumulation_steps", "eval_do_concat_batches", "eval_use_gather_object", "batch_eval_metrics",
    "prediction_loss_only", "include_for_metrics", "include_num_input_tokens_seen",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
    "optim_args", "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "seed", "data_seed", "full_determinism", "bf16", "fp16", "bf16_full_eval", "fp16_full_eval", "tf32", "use_cpu",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "enable_jit_checkpoint", "torch_compile",
    "activation_checkpointing", "activation_checkpointing_kwargs",  # its new names (transformers 5.25)
    "torch_compile_backend", "torch_compile_mode", "torch_empty_cache_steps", "use_cache",
    "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id",
    "trackio_bucket_id", "trackio_static_space_id", "skip_memory_metrics", "debug",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node",
    "restore_callback_states_from_checkpoint", "load_best_model_at_end", "metric_for_best_model",
    "greater_is_better", "ignore_data_skip",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push", "hub_revision",
    "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "dataloader_in_order",
    "train_sampling_strategy", "length_column_name",
    "local_rank", "ddp_backend", "ddp_timeout", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers", "ddp_static_graph", "fsdp", "fsdp_config", "deepspeed", "accelerator_config",
    "parallelism_config",
})

# trl.DPOConfig beyond TrainingArguments. loss_type, f_divergence_type, truncation_mode and the
# coefficients are checked by QEMPOConfig itself.
DPO = TRAINING_ARGUMENTS | frozenset({
    "trust_remote_code", "disable_dropout", "dataset_num_proc", "max_length", "truncation_mode",
    "pad_to_multiple_of", "pad_token", "precompute_ref_log_probs", "precompute_ref_batch_size",
    "activation_offloading", "loss_type", "f_divergence_type", "beta",
})

# trl.GRPOConfig beyond TrainingArguments. top_p, top_k, min_p, repetition_penalty, use_vllm,
# num_generations_eval, num_iterations, steps_per_generation and beta are checked by
# QEMPOOnlineConfig itself; vllm_* are the names its rollout engine reuses.
GRPO = TRAINING_ARGUMENTS | frozenset({
    "trust_remote_code", "disable_dropout", "cast_lm_head_to_fp32", "num_generations", "num_generations_eval",
    "max_completion_length", "ds3_gather_for_generation", "shuffle_dataset", "pad_to_multiple_of",
    "generation_batch_size", "steps_per_generation", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "chat_template_kwargs", "use_vllm", "vllm_enable_sleep_mode",
    "vllm_gpu_memory_utilization", "vllm_max_model_length", "beta", "num_iterations", "reward_weights",
    "log_completions", "num_completions_to_print", "log_unique_prompts", "log_multimodal",
})

# Why some often-tried fields are refused (the message otherwise says it may change the objective).
REASONS = {
    "label_smoothing": "conservative DPO changes the loss, and the QEMPO family's optimum with it",
    "label_smoothing_factor": "the preference losses ignore it",
    "loss_weights": "it reweights the loss terms; the QEMPO family is one sigmoid loss",
    "sync_ref_model": "it moves the reference during training; the QEMPO family's reference is fixed",
    "use_liger_kernel": "Liger's fused DPO loss bypasses the QEMPO coefficients",
    "liger_kernel_config": "Liger's fused losses bypass the QEMPO coefficients",
    "neftune_noise_alpha": "it adds noise to the embeddings of every forward pass",
    "generation_kwargs": "the rollout engines sample with temperature and top_p only, so they would be ignored",
    "scale_rewards": "QEMPO's reward centring is set by 'advantage' (center or grpo)",
    "multi_objective_aggregation": "QEMPO sums the weighted rewards (reward_weights) before centring",
    "loss_type": "QEMPO replaces GRPO's loss (Eq. 8/9)",
    "epsilon": "QEMPO has no PPO clipping", "epsilon_high": "QEMPO has no PPO clipping",
    "delta": "QEMPO has no PPO clipping", "importance_sampling_level": "QEMPO has no importance ratio",
    "padding_free": "TRL turns it off for preference training", "model_init_kwargs":
    "the model is loaded by qempo-lite (use the model keys: dtype, quantization, attn_implementation)",
    "resume_from_checkpoint": "the training commands resume with --resume",
    "hub_token": "a token given to the run would be saved with every checkpoint; the push reads HF_TOKEN or the "
                 "login of `hf auth login`",
    **{name: "TRL's vLLM server mode merges the adapter and streams every weight; set rollout: vllm_server and "
             "vllm_server_url (adapter-only sync)"
       for name in ("vllm_mode", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
                    "vllm_server_timeout", "vllm_group_port")},
}


SECRETS = frozenset({"hub_token"})  # refused without their value being printed


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def refuse_unlisted_fields(config, inherited_from: type, allowed: Iterable[str], what: str) -> None:
    """QempoError for the first field of ``inherited_from`` not in ``allowed`` that ``config`` sets away from
    its default (``config``'s own class defaults count, so a subclass may change a default)."""
    allowed = set(allowed)
    inherited = {f.name for f in dataclasses.fields(inherited_from)}
    for f in dataclasses.fields(type(config)):
        if not f.init or f.name not in inherited or f.name in allowed:
            continue
        default = field_default(f)
        value = getattr(config, f.name)
        if default is dataclasses.MISSING or _same(value, default):
            continue
        reason = REASONS.get(f.name, "qempo-lite does not support it: it may change the objective being trained")
        shown = "..." if f.name in SECRETS else short_repr(value)
        raise QempoError(f"{f.name}={shown} is not accepted by {what} ({reason}); remove {f.name}")


def _same(value: Any, default: Any) -> bool:
    if value == default:
        return True
    # A scalar given where the default is a one-element list (TRL accepts both), e.g. loss_type.
    return isinstance(default, list) and len(default) == 1 and value == default[0]


__all__ = ["DPO", "GRPO", "REASONS", "SECRETS", "TRAINING_ARGUMENTS", "field_default", "refuse_unlisted_fields"]
