"""Online QEMPO: GRPO's loop with the per-sequence weights of Eq. 8/9 and adapter-only rollout sync.

``QEMPOOnlineTrainer`` is a thin subclass of ``trl.GRPOTrainer`` (written against trl 1.16; the
private TRL members it overrides or calls are listed in :mod:`qempo_lite.trl_internals`, which
``tests/test_online.py`` checks against the installed TRL). It keeps GRPO's data pipeline,
reward calling, batching and logging, and replaces three things:

1. **Generation** (``_generate_single_turn``) goes through a rollout engine of
   :mod:`qempo_lite.rollout` (``rollout: hf``, ``vllm`` or ``vllm_server``, or a registered one),
   driven by :class:`~qempo_lite.rollout.driver.RolloutDriver`: the adapter alone is synced after
   each optimizer step, never merged, so a 4-bit QLoRA base works. TRL's ``use_vllm`` path
   (which merges the adapter and pushes every weight) is refused.
2. **Scoring** (``_generate_and_score_completions``): where GRPO computes advantages, the
   weights of Eq. 8/9 (:mod:`qempo_lite.online_scoring`) are computed once per group from the
   rewards, the summed log-probs ℓ of the completions under the policy at rollout time and, for
   methods that read it, ℓ_ref of the base model with the adapter disabled (``qempo`` never
   computes it). They ride along with the batch under ``qempo_weights``.
3. **Loss** (``_compute_loss``): ``-(w * ℓ).sum()`` over the micro-batch, ℓ the summed completion
   log-prob under the current policy: no PPO ratio, no clipping, no extra KL term; its gradient
   is exactly ``-∇J`` of Eq. 8/9, normalised so that every optimizer step follows the group-mean
   objective whatever the accumulation and the number of processes (``docs/math.md``, "How the
   online loss is normalised").

``loss_method: grpo`` keeps GRPO's own scoring and loss untouched (only the rollouts go through
the engine), with TRL's anti-collapse settings allowed for it alone. The method and its
coefficients are resolved once, by the config (``args.method_settings``); TRL's own KL
coefficient ``beta`` is 0 there, so TRL builds no reference model, loads no "ref" adapter and
adds no KL penalty. Eq. 8/9 are implemented as written (:mod:`qempo_lite.losses`), not as the
paper's Listings 3-4 (see ``docs/math.md``).
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from .configs import QEMPOOnlineConfig
from .errors import QempoError
from .online_scoring import score_batch
from .rollout import Engine
from .rollout.driver import RolloutDriver
from .runs import TRL_VERSION_RANGE, PickleFreeSave, warn_if_untested_trl


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class QEMPOOnlineTrainer(PickleFreeSave, GRPOTrainer):
    """GRPOTrainer optimising Eq. 8/9 with per-sequence weights; see the module docstring.

    Same constructor as ``GRPOTrainer`` (model, reward_funcs, args, train_dataset,
    processing_class, peft_config, ...) plus ``rollout_engine``: an already-created engine
    of :mod:`qempo_lite.rollout` to sample with (default: one built from ``args.rollout``).
    Multi-turn tools, environments and custom ``rollout_func`` are not supported: every
    completion is one sample of the policy, which is what the weights assume.
    """

    _tag_names = ["trl", "qempo", "qempo-lite"]
    _name = "QEMPO (online)"

    def __init__(self, model, reward_funcs=None, args: QEMPOOnlineConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, *, rollout_engine=None):
        if args is None:
            args = QEMPOOnlineConfig(output_dir="qempo-online")
        if not isinstance(args, QEMPOOnlineConfig):
            raise QempoError(f"args must be a QEMPOOnlineConfig, got {type(args).__name__}; build one from your settings")
        if rollout_engine is not None and not isinstance(rollout_engine, Engine):
            raise QempoError(f"rollout_engine must be a qempo_lite.rollout.Engine, got "
                             f"{type(rollout_engine).__name__}; subclass it (see docs/where-things-live.md)")
        warn_if_untested_trl("QEMPOOnlineTrainer", "tests/test_online.py")
        super().__init__(  # args.beta, TRL's KL coefficient, is 0 (the config set it)
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class,
            reward_processing_classes=reward_processing_classes, callbacks=callbacks, optimizers=optimizers,
            quantization_config=quantization_config, peft_config=peft_config,
        )
        self.method_settings = args.method_settings
        # grpo: TRL's own scoring and loss, unchanged (only the rollouts go through qempo-lite's engines).
        self.trl_loss = self.method_settings.method.trl_loss
        if self.method_settings.needs_reference and not _is_peft(self.accelerator.unwrap_model(self.model)):
            raise QempoError(
                f"loss_method {args.loss_method} needs reference log-probs, taken from the base model with the "
                "adapter disabled; train a LoRA adapter (pass peft_config or a PEFT model)"
            )
        self.ref_logp_calls = 0  # forward passes of the reference (adapter disabled); 0 for qempo
        self.last_scored: dict[str, torch.Tensor] = {}
        self._rewards_per_func = None
        self.rollout = RolloutDriver(self, rollout_engine)

    @property
    def rollout_engine(self) -> Engine | None:
        """The engine the rollouts come from."""
        return self.rollout.engine

    def close_rollout(self) -> None:
        """Shut down the rollout engine if this trainer created it."""
        self.rollout.close()

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise QempoError("QEMPO online training is text-only; remove image fields from the dataset")
        return self.rollout.generate(prompt_ids, num_generations)

    # ------------------------------------------------------------------ scoring
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Kept for the weights: GRPO turns these into advantages and drops them.
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    @torch.no_grad()
    def _sequence_logps(self, output: dict) -> torch.Tensor:
        """Summed completion log-probs ℓ under the current policy (no grad, dropout off), one per row."""
        from trl.models.utils import disable_gradient_checkpointing

        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        training = self.model.training
        batch_size = self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size
        self.model.eval()  # ℓ of the policy itself: LoRA dropout would make it a random draw
        try:
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                per_token, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, mask, output["completion_ids"].size(1), batch_size=batch_size
                )
        finally:
            self.model.train(training)
        return (per_token * output["completion_mask"]).sum(dim=1)

    @torch.no_grad()
    def _reference_logps(self, output: dict) -> torch.Tensor:
        """ℓ_ref: the base model's summed log-probs, the adapter disabled (no second copy)."""
        self.ref_logp_calls += 1
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            return self._sequence_logps(output)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.trl_loss:
            return output
        k = self.num_generations if self.model.training else self.num_generations_eval
        old = output.get("old_per_token_logps")
        local_logps = (old * output["completion_mask"]).sum(dim=1) if old is not None else self._sequence_logps(output)
        ref_logps = self._reference_logps(output) if self.method_settings.needs_reference else None
        output["qempo_weights"] = score_batch(self, output, self._rewards_per_func, local_logps, ref_logps, k)
        return output

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        """``-(w ℓ).sum()``: its gradient is ``-Σ w_i ∇ℓ_i``, i.e. ``-∇J`` of Eq. 8/9 for this micro-batch.

        ℓ_i = Σ_t log π(y_it | x_i, y_i<t) under the current policy; ``w`` from the scoring step.
        ``loss_method: grpo`` trains TRL's GRPO loss instead, unchanged.
        """
        if self.trl_loss:
            return super()._compute_loss(model, inputs)
        completion_mask = inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].size(1), compute_entropy=True
        )
        logps = (per_token_logps * completion_mask).sum(dim=1)
        loss = -(inputs["qempo_weights"].to(logps.dtype) * logps).sum()
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            loss = loss * (self.args.steps_per_generation / self.current_gradient_accumulation_steps)
        loss = loss * self.accelerator.num_processes

        totals = self.accelerator.reduce(
            torch.stack([(entropies.detach() * completion_mask).sum(), completion_mask.sum().float()]), reduction="sum"
        )
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss


__all__ = ["QEMPOOnlineConfig", "QEMPOOnlineTrainer", "TRL_VERSION_RANGE"]
