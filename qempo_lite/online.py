"""Online QEMPO: GRPO's loop with the per-sequence weights of Eq. 8/9 and adapter-only vLLM sync.

``QEMPOOnlineTrainer`` is a thin subclass of ``trl.GRPOTrainer`` (written against trl 1.16; the
private TRL members it overrides or calls are listed in :mod:`qempo_lite.trl_internals`, which
``tests/test_online.py`` checks against the installed TRL). It keeps
GRPO's data pipeline, reward calling, batching and logging, and replaces three things:

1. **Generation** (``_generate_single_turn``) goes through a rollout engine of
   :mod:`qempo_lite.rollout` (a :class:`~qempo_lite.rollout.RolloutEngine`, built by
   :func:`~qempo_lite.rollout.make_engine` from ``rollout``; its flags ``samples_live_weights``
   and ``serves_all_processes`` say how it is driven): ``rollout="hf"`` (``model.generate``, each process its own rows),
   ``rollout="vllm"`` (an in-process vLLM engine serving the adapter natively; one training
   process) or ``rollout="vllm_server"`` (a vLLM server started separately, for any number of
   processes: the main process sends every process's prompts, whole groups with one seed each,
   and each process keeps its slice). The adapter alone is synced after each optimizer step,
   gathered first when ZeRO-3 / FSDP shard it, never merged, so a 4-bit QLoRA base works.
   TRL's ``use_vllm`` path is refused: it merges the adapter and pushes every weight. When the
   server stays down past its retries, every process saves a checkpoint of the last completed
   step and the run stops with one line (``--resume`` continues).
2. **Scoring** (``_generate_and_score_completions``): where GRPO computes advantages, the
   weights of :func:`qempo_lite.losses.online_weights` are computed once per group, from the
   rewards, the summed log-probs ℓ of the completions under the policy at rollout time, and
   (``qempo_kl`` / ``gvpo`` only) the reference log-probs ℓ_ref of the base model with the
   adapter disabled. ``qempo`` never computes reference log-probs. The weights ride along
   with the batch under ``qempo_weights``, so a group may be split across micro-batches.
3. **Loss** (``_compute_loss``): ``-(w * ℓ).sum()`` over the micro-batch, with ℓ the summed
   completion log-prob under the current policy. No PPO ratio, no clipping, no extra KL term:
   the gradient is exactly ``-∇J`` of Eq. 8/9. As everywhere in TRL, ℓ is computed from
   ``logits / temperature``; at the paper's temperature 1 it is the model's own log-prob.

Normalisation: each micro-batch loss is scaled so that every optimizer step follows the
group-mean objective whatever the accumulation and the number of processes; the derivation is
in ``docs/math.md`` ("How the online loss is normalised"). Settings that would train on a batch
after the policy has moved (``num_iterations > 1``, a generation batch spanning several
optimizer steps) are refused, and ℓ for the weights is computed with dropout off.

Baseline. ``loss_method: grpo`` keeps GRPO's own scoring and loss untouched (only the rollouts
go through the engine), with TRL's anti-collapse settings allowed for it alone.

Coefficients. ``beta`` of :class:`QEMPOOnlineConfig` is QEMPO's β = 1/λ (``qempo``) or GVPO's
β (``gvpo``), and ``beta1`` / ``beta2`` are QEMPO-KL's 1/λ1 and λ2/λ1: the meanings of
``docs/math.md``, not GRPO's KL coefficient. The trainer keeps TRL's own KL coefficient
(``self.beta``) at 0 during and after construction, so TRL builds no reference model, loads no
"ref" adapter and adds no KL penalty; Eq. 8/9 carry their own reference term.

Eq. 8/9 are implemented as written (through :mod:`qempo_lite.losses`), not as the paper's
Listings 3-4, whose variance term lacks the ½ and whose covariance term has the wrong
coefficient, sign and log-probs (see ``docs/math.md``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from .configs import QEMPOOnlineConfig
from .errors import QempoError, one_line
from .losses import online_objective, online_weights
from .methods import get_method, loss_coefficients
from .rollout import RolloutEngine, make_engine
from .runs import TRL_VERSION_RANGE, PickleFreeSave, warn_if_untested_trl


@contextlib.contextmanager
def _trl_kl_off(args: QEMPOOnlineConfig):
    """Show GRPOTrainer.__init__ a KL coefficient of 0 (no ref model, no "ref" adapter)."""
    qempo_beta = args.beta
    args.beta = 0.0
    try:
        yield
    finally:
        args.beta = qempo_beta


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _unique_prompts(prompt_ids: list[list[int]], k: int) -> tuple[list[list[int]], int]:
    """``(prompts, n)``: GRPO's sampler repeats each prompt k times in a row, so sample k from each unique one.

    A batch holding part of a group (a group split across processes) is sampled one completion per row.
    """
    grouped = len(prompt_ids) % k == 0 and all(prompt_ids[i] == prompt_ids[i - i % k] for i in range(len(prompt_ids)))
    return (prompt_ids[::k], k) if grouped else (prompt_ids, 1)


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
        if rollout_engine is not None and not isinstance(rollout_engine, RolloutEngine):
            raise QempoError(f"rollout_engine must be a qempo_lite.rollout.RolloutEngine, got "
                             f"{type(rollout_engine).__name__}; subclass it (see docs/where-things-live.md)")
        warn_if_untested_trl("QEMPOOnlineTrainer", "tests/test_online.py")
        with _trl_kl_off(args):
            super().__init__(
                model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                eval_dataset=eval_dataset, processing_class=processing_class,
                reward_processing_classes=reward_processing_classes, callbacks=callbacks, optimizers=optimizers,
                quantization_config=quantization_config, peft_config=peft_config,
            )
        self.beta = 0.0  # TRL's KL coefficient; QEMPO's β lives in args.beta
        self.policy_coef, self.ref_coef = loss_coefficients(args.loss_method, args.coefficients(), "online")
        # grpo: TRL's own scoring and loss, unchanged (only the rollouts go through qempo-lite's engines).
        self.trl_loss = get_method(args.loss_method, "online").trl_loss
        policy = self.accelerator.unwrap_model(self.model)
        if self.ref_coef != 0.0 and not _is_peft(policy):
            raise QempoError(
                f"loss_method {args.loss_method} needs reference log-probs, taken from the base model with the "
                "adapter disabled; train a LoRA adapter (pass peft_config or a PEFT model)"
            )
        self.ref_logp_calls = 0  # forward passes of the reference (adapter disabled); 0 for qempo
        self.last_scored: dict[str, torch.Tensor] = {}
        self._rewards_per_func = None
        self._synced_step = None
        self._sharded = None  # ZeRO-3 / FSDP: known once training has wrapped the model
        self._seed_step, self._seed_calls = None, 0
        self._owns_engine = rollout_engine is None
        self.rollout_engine = rollout_engine if rollout_engine is not None else self._make_rollout_engine()

    # ------------------------------------------------------------------ rollout engine
    def _make_rollout_engine(self):
        engine = make_engine(self.args.rollout, self.accelerator.unwrap_model(self.model), self._tokenizer, self.args,
                             num_processes=self.accelerator.num_processes)
        if engine.serves_all_processes:
            self._on_main_then_everywhere(engine.probe)
        else:
            engine.probe()
        return engine

    def _on_main_then_everywhere(self, work):
        """Run ``work()`` on the main process; every process returns its result or raises its QempoError.

        A failure on the main process alone would leave the others waiting in the next collective.
        """
        from accelerate.utils import broadcast_object_list

        outcome = [None]
        if self.accelerator.is_main_process:
            try:
                outcome = [work()]
            except Exception as err:  # handed to every process, so that none is left waiting
                if not isinstance(err, QempoError) and self.accelerator.num_processes == 1:
                    raise
                if not isinstance(err, QempoError):
                    err = QempoError(f"{type(err).__name__}: {one_line(err)}")
                outcome = [err]
        if self.accelerator.num_processes > 1:
            outcome = broadcast_object_list(outcome, from_process=0)
        if isinstance(outcome[0], QempoError):
            raise outcome[0]
        return outcome[0]

    def close_rollout(self) -> None:
        """Shut down the rollout engine if this trainer created it."""
        if self._owns_engine and self.rollout_engine is not None:
            self.rollout_engine.close()
            self.rollout_engine = None

    def _adapter_for_sync(self):
        """The adapter's LoRA tensors gathered whole when a sync is due and the model is sharded (ZeRO-3 / FSDP).

        A collective: every process calls it at the same point. None when nothing needs gathering.
        """
        from .distributed import gathered_adapter_state, is_sharded

        if self._synced_step == self.state.global_step or self.rollout_engine.samples_live_weights:
            return None
        if self._sharded is None:
            self._sharded = is_sharded(self.model_wrapped)
        return gathered_adapter_state(self.model_wrapped) if self._sharded else None

    def _sync_rollout_engine(self, state_dict=None) -> None:
        # Once per optimizer step, before the step's first rollout: adapter only.
        if self._synced_step == self.state.global_step:
            return
        info = self.rollout_engine.sync(self.accelerator.unwrap_model(self.model), state_dict=state_dict)
        self._synced_step = self.state.global_step
        if info.nbytes:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["rollout/sync_seconds"].append(info.seconds)
            self._metrics[mode]["rollout/sync_megabytes"].append(info.nbytes / 2**20)

    def _rollout_seed(self) -> int:
        """A seed for one rollout call: a function of ``seed``, the step and the call's rank within the step.

        So the samples of a step are the same whatever the number of processes, and a resumed run
        draws what the uninterrupted run would have drawn.
        """
        step = self.state.global_step
        if self._seed_step != step:
            self._seed_step, self._seed_calls = step, 0
        self._seed_calls += 1
        return (((self.args.seed * 1_000_003 + step) * 64 + self._seed_calls) << 20) % (1 << 62)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise QempoError("QEMPO online training is text-only; remove image fields from the dataset")
        from trl.models import unwrap_model_for_generation

        prompt_ids = [list(ids) for ids in prompt_ids]
        k = num_generations
        if self.rollout_engine.serves_all_processes:
            return self._generate_for_all_processes(prompt_ids, k)
        self._sync_rollout_engine(self._adapter_for_sync())
        prompts, n = _unique_prompts(prompt_ids, k)
        kwargs = dict(n=n, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_completion_length)
        if self.rollout_engine.samples_live_weights:  # ZeRO-3: the weights gathered for generation
            with unwrap_model_for_generation(
                self.model_wrapped, self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ):
                groups = self.rollout_engine.generate(prompts, **kwargs)
        else:
            groups = self.rollout_engine.generate(prompts, **kwargs)
        completions = [c for group in groups for c in group]
        return [c.token_ids for c in completions], [c.logprobs for c in completions]

    def _generate_for_all_processes(self, prompt_ids: list[list[int]], k: int):
        """The main process samples every process's prompts, whole groups, one seed per group; each keeps its slice.

        The prompts of all processes, gathered in process order, are the generation batch as
        GRPO's sampler laid it out (each prompt ``k`` times in a row), so a group split across
        processes is still sampled as one group of ``k``. A rollout that fails (the server down
        past its retries) stops every process after a checkpoint of the last completed step.
        """
        from accelerate.utils import gather_object

        everyone = gather_object(prompt_ids) if self.accelerator.num_processes > 1 else prompt_ids
        prompts, n = _unique_prompts(everyone, k)
        state = self._adapter_for_sync()  # collective under ZeRO-3 / FSDP, before the main process syncs

        def sample():
            self._sync_rollout_engine(state)
            groups = self.rollout_engine.generate(prompts, n=n, temperature=self.temperature, top_p=self.top_p,
                                                  max_new_tokens=self.max_completion_length, seed=self._rollout_seed())
            return [(c.token_ids, c.logprobs) for group in groups for c in group]

        try:
            sampled = self._on_main_then_everywhere(sample)
        except QempoError as err:
            self._stop_after_rollout_failure(err)
        if self._synced_step != self.state.global_step:
            self._synced_step = self.state.global_step  # the other processes follow the main one's sync
        start = self.accelerator.process_index * len(prompt_ids)
        mine = sampled[start:start + len(prompt_ids)]
        return [ids for ids, _ in mine], [logprobs for _, logprobs in mine]

    def _stop_after_rollout_failure(self, err: QempoError):
        """Checkpoint the last completed optimizer step (every process takes part), then raise the one-line error."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from .rollout import RolloutServerError

        step = self.state.global_step
        if step > 0 and self.model.training:
            self._save_checkpoint(self.model, trial=None)
            where = Path(self._get_output_dir(trial=None)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            hint = f"the training state after step {step} is saved in {where}; fix the server and run again with --resume"
        else:
            hint = "no training step was completed yet"
        raise (RolloutServerError if isinstance(err, RolloutServerError) else QempoError)(f"{err}; {hint}") from None

    # ------------------------------------------------------------------ scoring
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Kept for the weights: GRPO turns these into advantages and drops them.
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    @torch.no_grad()
    def _sequence_logps(self, output: dict[str, Any]) -> torch.Tensor:
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
    def _reference_logps(self, output: dict[str, Any]) -> torch.Tensor:
        """ℓ_ref: the base model's summed log-probs, the adapter disabled (no second copy)."""
        self.ref_logp_calls += 1
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            return self._sequence_logps(output)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.trl_loss:
            return output
        mode = "train" if self.model.training else "eval"
        k = self.num_generations if mode == "train" else self.num_generations_eval
        device = self.accelerator.device

        rewards = (self._rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(self._rewards_per_func).all(dim=1)
        correct = (rewards > self.args.correct_threshold) & ~unscorable

        old = output.get("old_per_token_logps")
        local_logps = (old * output["completion_mask"]).sum(dim=1) if old is not None else self._sequence_logps(output)
        logps = self.accelerator.gather(local_logps.float())
        ref_logps = None
        if self.ref_coef != 0.0:
            ref_logps = self.accelerator.gather(self._reference_logps(output).float())

        coefs = dict(beta=self.args.beta, beta1=self.args.beta1, beta2=self.args.beta2,
                     gate=self.args.gate, advantage=self.args.advantage)
        # float64: the weights are differences of log-probs in the hundreds, scaled by β ~ 1e-3.
        weights = online_weights(self.args.loss_method, logps.double(), rewards.double(), k,
                                 ref_logps=None if ref_logps is None else ref_logps.double(), correct=correct, **coefs)
        n_local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * n_local
        output["qempo_weights"] = weights[start:start + n_local].to(torch.float32)

        objective = online_objective(self.args.loss_method, logps.double(), rewards.double(), k,
                                     ref_logps=None if ref_logps is None else ref_logps.double(),
                                     correct=correct, **coefs)
        self.last_scored = {
            "rewards": rewards.cpu(), "logps": logps.cpu(), "correct": correct.cpu(), "weights": weights.cpu(),
            "ref_logps": None if ref_logps is None else ref_logps.cpu(), "objective": objective.cpu(),
        }
        self._log_scoring(mode, output, k, correct, local_logps)
        return output

    def _log_scoring(self, mode, output, k, correct, local_logps) -> None:
        from accelerate.utils import gather_object

        metrics = self._metrics[mode]
        groups = correct.view(-1, k)
        if self.args.gate == "none":
            active = torch.ones(groups.size(0), dtype=torch.bool)
        elif self.args.gate == "group":
            active = groups.all(dim=1)
        else:  # a variance over fewer than two correct completions is zero
            active = groups.sum(dim=1) >= 2
        metrics["qempo/frac_correct"].append(correct.float().mean().item())
        metrics["qempo/frac_variance_active"].append(active.float().mean().item())
        metrics["qempo/objective"].append(self.last_scored["objective"].item())
        completions = [
            tuple(ids[mask.bool()].tolist())
            for ids, mask in zip(output["completion_ids"].cpu(), output["completion_mask"].cpu())
        ]
        completions = gather_object(completions)
        distinct = [len(set(completions[i:i + k])) / k for i in range(0, len(completions), k)]
        metrics["qempo/distinct_ratio"].append(sum(distinct) / max(len(distinct), 1))
        sampled = output.get("sampling_per_token_logps")
        # The engines report temperature-1 log-probs; TRL's ℓ is that of logits / temperature. Every process
        # takes the same branch (settings only) and always joins the reduction, whatever its rows hold.
        if sampled is not None and self.temperature == 1.0:
            # How far the engine's log-probs are from the trainer's (vLLM kernels, precision).
            gap = ((sampled * output["completion_mask"]).sum(dim=1) - local_logps).abs()
            finite = ~torch.isnan(gap)
            totals = self.accelerator.reduce(
                torch.stack([gap[finite].sum(), finite.sum().to(gap.dtype)]).float(), reduction="sum")
            if totals[1] > 0:
                metrics["rollout/logp_abs_diff"].append((totals[0] / totals[1]).item())

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
