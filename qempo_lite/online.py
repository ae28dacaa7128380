"""Online QEMPO: GRPO's loop with the per-sequence weights of Eq. 8/9 and adapter-only vLLM sync.

``QEMPOOnlineTrainer`` is a thin subclass of ``trl.GRPOTrainer`` (written against trl 1.16;
``tests/test_online.py`` fails loudly if the private methods overridden here change). It keeps
GRPO's data pipeline, reward calling, batching and logging, and replaces three things:

1. **Generation** (``_generate_single_turn``) goes through a rollout engine of
   :mod:`qempo_lite.rollout`: ``rollout="hf"`` (``model.generate``, each process its own rows),
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

Normalisation. ``w`` already carries ``1/(G k)`` for the G groups of one generation batch,
so summing ``-(w ℓ)`` over the micro-batches of that batch gives ``-J`` averaged over its
groups. One optimizer step accumulates ``gradient_accumulation_steps`` micro-batches while a
generation batch spans ``steps_per_generation`` of them (equal by default), so each
micro-batch loss is multiplied by ``steps_per_generation / gradient_accumulation_steps``:
every optimizer step then follows the group-mean objective whatever the accumulation, and
the ``grad / gradient_accumulation_steps`` rescaling of ``Trainer`` is off
(``loss_is_scaled_for_ga``, inherited from GRPO). With several processes the weights are
computed on the gathered batch and DDP averages gradients, so the loss is also multiplied
by the number of processes. Settings that would train on a batch after the policy has moved
(``num_iterations > 1``, a generation batch spanning several optimizer steps) are refused:
the weights hold the log-probs ℓ of the policy that sampled the batch, and ℓ is computed with
dropout off.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from . import trl_fields
from .errors import QempoError
from .trl_fields import refuse_unlisted_fields
from .losses import ADVANTAGES, GATES, online_objective, online_weights
from .methods import coefficient_help, get_method, loss_coefficients, method_help, method_names, with_defaults

TRL_VERSION_RANGE = ">=1.16,<1.17"  # the GRPOTrainer internals overridden here; see tests/test_online.py
ROLLOUTS = ("hf", "vllm", "vllm_server")
# The paper's coefficients (§4.2, reused online in §4.4).


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@dataclass
class QEMPOOnlineConfig(GRPOConfig):
    """GRPOConfig plus the QEMPO online settings.

    ``beta`` here is the QEMPO coefficient (see the module docstring), not GRPO's KL
    coefficient. Defaults follow the paper: β = 4e-3 (qempo), β = 1e-2 (gvpo), β1 = 4e-3 and
    β2 = 1e-2 (qempo_kl), a constant learning rate, temperature 1.

    vLLM settings reuse GRPOConfig's names where they exist (``vllm_gpu_memory_utilization``,
    ``vllm_enable_sleep_mode``, ``vllm_max_model_length``) and add ``vllm_max_lora_rank``,
    ``vllm_dtype`` and ``vllm_quantization`` (``"bitsandbytes"`` serves a 4-bit base to match
    a QLoRA run). They apply when ``rollout="vllm"``. ``rollout="vllm_server"`` reads
    ``vllm_server_url``, ``vllm_server_adapter_dir``, ``vllm_server_retries`` and
    ``vllm_server_request_timeout`` instead; the server's own options (rank, memory, context,
    quantization) are given to ``qempo-lite serve``. TRL's server settings (``vllm_mode``,
    ``vllm_server_base_url``, ...) belong to its merging path and are refused.
    """

    loss_method: str = field(default="qempo", metadata={"help": "Online objective. " + method_help("online")})
    beta: float | None = field(
        default=None, metadata={"help": coefficient_help("beta", "online") + ". Not GRPO's KL coefficient."})
    beta1: float | None = field(default=None, metadata={"help": coefficient_help("beta1", "online")})
    beta2: float | None = field(default=None, metadata={"help": coefficient_help("beta2", "online")})
    gate: str = field(
        default="correct",
        metadata={"help": "Quality gate of the variance term: correct (default), group or none."},
    )
    advantage: str = field(default="center", metadata={"help": "center: r - mean(r); grpo: (r - mean(r)) / std(r)."})
    correct_threshold: float = field(
        default=0.0, metadata={"help": "A completion counts as correct when its total reward is above this."}
    )
    rollout: str = field(default="hf", metadata={
        "help": "hf (transformers generate), vllm (an in-process vLLM engine serving the LoRA) or vllm_server "
                "(a vLLM server started with qempo-lite serve; adapter-only sync, any number of processes)."})
    vllm_server_url: str = field(default="http://127.0.0.1:8000",
                                 metadata={"help": "rollout: vllm_server: the server's address."})
    vllm_server_adapter_dir: str | None = field(default=None, metadata={
        "help": "rollout: vllm_server: where each synced adapter is written, a directory the server reads at the "
                "same path (default: OUTPUT_DIR/served-adapters)."})
    vllm_server_retries: int = field(default=5, metadata={
        "help": "rollout: vllm_server: retries of a request that found the server down (waits of 1, 2, 4, ... s)."})
    vllm_server_request_timeout: float = field(default=600.0, metadata={
        "help": "rollout: vllm_server: seconds one request may take before it is retried."})
    vllm_max_lora_rank: int = field(default=64, metadata={"help": "Largest LoRA rank the vLLM engine accepts."})
    vllm_dtype: str = field(default="auto", metadata={"help": "dtype of the vLLM engine's base weights."})
    vllm_quantization: str | None = field(
        default=None, metadata={"help": "vLLM quantization of the base, e.g. bitsandbytes for a QLoRA run."}
    )
    lr_scheduler_type: str = field(default="constant", metadata={"help": "The paper trains with a constant rate."})

    def __post_init__(self):
        if self.loss_method not in method_names("online"):
            raise QempoError(f"loss_method {self.loss_method!r} is unknown; use one of "
                             f"{', '.join(method_names('online'))}")
        if self.gate not in GATES:
            raise QempoError(f"gate {self.gate!r} is unknown; use one of {', '.join(GATES)}")
        if self.advantage not in ADVANTAGES:
            raise QempoError(f"advantage {self.advantage!r} is unknown; use one of {', '.join(ADVANTAGES)}")
        if self.rollout not in ROLLOUTS:
            raise QempoError(f"rollout {self.rollout!r} is unknown; use one of {', '.join(ROLLOUTS)}")
        if self.use_vllm:
            raise QempoError(
                "use_vllm selects TRL's vLLM path, which merges the adapter into the base; "
                "set rollout: vllm or rollout: vllm_server instead (adapter-only sync)"
            )
        if not str(self.vllm_server_url).startswith(("http://", "https://")):
            raise QempoError(f"vllm_server_url must be an http(s) URL such as http://127.0.0.1:8000, got "
                             f"{self.vllm_server_url!r}")
        if not isinstance(self.vllm_server_retries, int) or self.vllm_server_retries < 0:
            raise QempoError(f"vllm_server_retries must be a whole number >= 0, got {self.vllm_server_retries!r}")
        if not self.vllm_server_request_timeout > 0:
            raise QempoError(f"vllm_server_request_timeout must be > 0 seconds, got {self.vllm_server_request_timeout!r}")
        method = get_method(self.loss_method, "online")
        for name in ("beta", "beta1", "beta2"):
            if name not in method.defaults and getattr(self, name) is not None:
                raise QempoError(f"{name} is not a coefficient of loss_method {self.loss_method} (it uses "
                                 f"{', '.join(method.coefficient_names)}); remove {name}")
        for name, value in with_defaults(self.loss_method, self.coefficients(), "online").items():
            setattr(self, name, value)
        if (self.top_k or 0) > 0 or self.min_p is not None or self.repetition_penalty != 1.0:
            raise QempoError("top_k, min_p and repetition_penalty are not supported by the rollout engines; remove them")
        if self.top_p != 1.0:
            # ℓ in the weights is the log-prob of the full distribution; a truncated sampler is another policy.
            raise QempoError(f"top_p={self.top_p} samples from a truncated distribution while the weights use the "
                             "policy's own log-probs; remove top_p (1.0)")
        if self.num_iterations != 1:
            raise QempoError(f"num_iterations={self.num_iterations} reuses rollouts after the policy has moved, but the "
                             "weights (Eq. 8/9) hold the log-probs of the policy that sampled them; remove num_iterations")
        if self.num_generations_eval is not None and self.num_generations_eval < 2:
            raise QempoError(f"num_generations_eval must be at least 2 (a group needs two completions to centre "
                             f"rewards), got {self.num_generations_eval}")
        for key, value in self._ignored_grpo_options().items():
            raise QempoError(f"{key}={value!r} shapes GRPO's loss, which QEMPO replaces (Eq. 8/9); remove {key}")
        refuse_unlisted_fields(self, GRPOConfig, trl_fields.GRPO, "QEMPOOnlineConfig")
        try:
            loss_coefficients(self.loss_method, self.coefficients(), "online")
        except ValueError as err:
            raise QempoError(f"{err}; fix the coefficient in the config") from err
        try:
            super().__post_init__()
        except ValueError as err:  # GRPOConfig's own checks (batch sizes vs num_generations, ...)
            raise QempoError(_first_line(err)) from err
        if self.steps_per_generation > self.gradient_accumulation_steps:
            raise QempoError(
                f"steps_per_generation={self.steps_per_generation} spans several optimizer steps, so later steps would "
                f"train on log-probs of an older policy; set it (or generation_batch_size) to at most "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}")

    def _ignored_grpo_options(self) -> dict[str, Any]:
        """GRPO options set away from their defaults that the QEMPO objective would silently ignore."""
        checks = {
            "entropy_coef": self.entropy_coef != 0.0,
            "use_adaptive_entropy": self.use_adaptive_entropy,
            "top_entropy_quantile": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            # Masked completions would enter the group weights with log-prob 0.
            "mask_truncated_completions": self.mask_truncated_completions,
            # The reference is the base model with the adapter disabled; there is nothing to sync.
            "sync_ref_model": self.sync_ref_model,
        }
        return {key: getattr(self, key) for key, bad in checks.items() if bad}

    def coefficients(self) -> dict[str, float]:
        """The coefficients the method uses, as recorded in ``qempo_lite.json``."""
        return {name: getattr(self, name) for name in get_method(self.loss_method, "online").coefficient_names}


@contextlib.contextmanager
def _trl_kl_off(args: QEMPOOnlineConfig):
    """Show GRPOTrainer.__init__ a KL coefficient of 0 (no ref model, no "ref" adapter)."""
    qempo_beta = args.beta
    args.beta = 0.0
    try:
        yield
    finally:
        args.beta = qempo_beta


def _warn_if_untested_trl() -> None:
    import warnings

    import trl
    from packaging.specifiers import SpecifierSet

    if trl.__version__ not in SpecifierSet(TRL_VERSION_RANGE):
        warnings.warn(f"QEMPOOnlineTrainer overrides GRPOTrainer internals of trl{TRL_VERSION_RANGE}, found trl "
                      f"{trl.__version__}; run tests/test_online.py before trusting it", stacklevel=3)


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _unique_prompts(prompt_ids: list[list[int]], k: int) -> tuple[list[list[int]], int]:
    """``(prompts, n)``: GRPO's sampler repeats each prompt k times in a row, so sample k from each unique one.

    A batch holding part of a group (a group split across processes) is sampled one completion per row.
    """
    grouped = len(prompt_ids) % k == 0 and all(prompt_ids[i] == prompt_ids[i - i % k] for i in range(len(prompt_ids)))
    return (prompt_ids[::k], k) if grouped else (prompt_ids, 1)


class QEMPOOnlineTrainer(GRPOTrainer):
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
        _warn_if_untested_trl()
        with _trl_kl_off(args):
            super().__init__(
                model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                eval_dataset=eval_dataset, processing_class=processing_class,
                reward_processing_classes=reward_processing_classes, callbacks=callbacks, optimizers=optimizers,
                quantization_config=quantization_config, peft_config=peft_config,
            )
        self.beta = 0.0  # TRL's KL coefficient; QEMPO's β lives in args.beta
        self.policy_coef, self.ref_coef = loss_coefficients(args.loss_method, args.coefficients(), "online")
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
        from .rollout import HFRollout, VLLMLoRARollout, VLLMServerRollout, eos_token_ids

        policy = self.accelerator.unwrap_model(self.model)
        if self.args.rollout == "hf":
            return HFRollout(policy, self._tokenizer)
        if not _is_peft(policy):
            raise QempoError(f"rollout: {self.args.rollout} serves a LoRA adapter on the base model; train a LoRA "
                             "(pass peft_config)")
        if self.args.rollout == "vllm_server":
            adapter_dir = self.args.vllm_server_adapter_dir or Path(self.args.output_dir) / "served-adapters"
            engine = VLLMServerRollout(
                self.args.vllm_server_url, tokenizer=self._tokenizer, adapter_dir=adapter_dir,
                eos_token_ids=eos_token_ids(self._tokenizer, getattr(policy, "generation_config", None)),
                retries=self.args.vllm_server_retries, request_timeout=self.args.vllm_server_request_timeout)
            self._on_main_then_everywhere(engine.probe)
            return engine
        if self.accelerator.num_processes > 1:
            # One in-process engine per training process would share a seed and land on the first GPU.
            raise QempoError(f"rollout: vllm runs one in-process engine and supports one training process, found "
                             f"{self.accelerator.num_processes}; use rollout: vllm_server (one vLLM server for every "
                             "process, see qempo-lite serve) or rollout: hf")
        return VLLMLoRARollout(
            policy.get_base_model(),
            max_lora_rank=self.args.vllm_max_lora_rank,
            max_model_len=self.args.vllm_max_model_length or 2048,
            gpu_memory_utilization=self.args.vllm_gpu_memory_utilization,
            dtype=self.args.vllm_dtype,
            enable_sleep_mode=self.args.vllm_enable_sleep_mode,
            quantization=self.args.vllm_quantization,
            seed=self.args.seed,
            tokenizer=self._tokenizer,
        )

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
                    err = QempoError(f"{type(err).__name__}: {_first_line(err)}")
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
        from .rollout import HFRollout

        if self._synced_step == self.state.global_step or isinstance(self.rollout_engine, HFRollout):
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
        from .rollout import HFRollout
        from trl.models import unwrap_model_for_generation

        prompt_ids = [list(ids) for ids in prompt_ids]
        k = num_generations
        if getattr(self.rollout_engine, "serves_all_processes", False):
            return self._generate_for_all_processes(prompt_ids, k)
        self._sync_rollout_engine(self._adapter_for_sync())
        prompts, n = _unique_prompts(prompt_ids, k)
        kwargs = dict(n=n, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_completion_length)
        if isinstance(self.rollout_engine, HFRollout):
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
        """
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter; the final directory gets ``training_args.json`` instead of the pickled ``.bin``.

        That directory is what gets pushed and loaded elsewhere, so it stays pickle-free;
        checkpoints (``_internal_call``) keep theirs, which ``resume_from_checkpoint`` reads.
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
# Command line: qempo-lite train online


@dataclass
class OnlineRunArgs:
    """The math problems to train on, and whether to resume."""

    datasets: list[str] = field(metadata={"help": "GSM8K / MATH sources: Hub names or local .jsonl files."})
    dataset_split: str = field(default="train", metadata={"help": "Split of each Hub dataset."})
    on_bad_rows: str = field(default="error", metadata={"help": "error or skip malformed rows."})
    limit: int | None = field(default=None, metadata={"help": "Use at most this many problems of each dataset."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir."})

    def __post_init__(self):
        from .data import ON_BAD_ROWS

        if not self.datasets:
            raise QempoError("datasets is empty; list at least one GSM8K or MATH source")
        if self.on_bad_rows not in ON_BAD_ROWS:
            raise QempoError(f"on_bad_rows must be one of {', '.join(ON_BAD_ROWS)}, got {self.on_bad_rows!r}")
        if self.limit is not None and self.limit < 1:
            raise QempoError(f"limit must be a positive number of problems, got {self.limit!r}")


_HELP_HINT = "see 'qempo-lite train online --help'"


def _config_types():
    from .offline import ModelArgs

    return (QEMPOOnlineConfig, ModelArgs, OnlineRunArgs)


def usage() -> str:
    from .offline import ModelArgs
    from .recipe import describe_keys

    objective = ("loss_method", "beta", "beta1", "beta2", "gate", "advantage", "correct_threshold", "rollout",
                 "vllm_max_lora_rank", "vllm_dtype", "vllm_quantization", "vllm_gpu_memory_utilization",
                 "vllm_enable_sleep_mode", "vllm_max_model_length", "vllm_server_url", "vllm_server_adapter_dir",
                 "vllm_server_retries", "vllm_server_request_timeout")
    lines = [
        "usage: qempo-lite train online --config RECIPE.yaml [--key value ...] [--resume]",
        "",
        "Train a LoRA/QLoRA adapter online on math problems (verifiable reward) with qempo, qempo_kl or gvpo.",
        "Keys come from the YAML recipe (see recipes/online/); --key value flags override them.",
        "",
        "model keys:", *describe_keys(ModelArgs),
        "",
        "data and run keys:", *describe_keys(OnlineRunArgs),
        "",
        "objective and rollout keys:",
        *[line for line in describe_keys(QEMPOOnlineConfig) if line.split("(")[0].strip() in objective],
        "",
        "training keys: the fields of trl.GRPOConfig / transformers.TrainingArguments that leave the objective",
        "  alone (listed in qempo_lite/trl_fields.py; any other is refused), e.g. output_dir,",
        "  learning_rate, max_steps, num_train_epochs, num_generations, per_device_train_batch_size,",
        "  gradient_accumulation_steps, max_completion_length, temperature, bf16, save_steps, logging_steps, seed.",
    ]
    return "\n".join(lines)


def load_problems(run_args: OnlineRunArgs, seed: int):
    """All datasets of the run, each read by :func:`qempo_lite.data.load_math`, concatenated and shuffled."""
    from datasets import concatenate_datasets

    from .data import load_math

    parts = [load_math(source, split=run_args.dataset_split, on_bad_rows=run_args.on_bad_rows, limit=run_args.limit)
             for source in run_args.datasets]
    columns = ["prompt", "answer"]
    return concatenate_datasets([part.select_columns(columns) for part in parts]).shuffle(seed=seed)


def _write_metadata(config: QEMPOOnlineConfig, model_args, run_args: OnlineRunArgs, rows: int, steps: int) -> Path:
    from .offline import lora_metadata, write_run_metadata

    return write_run_metadata(
        config.output_dir, config, base_model=model_args.model_name_or_path, quantization=model_args.quantization,
        lora=lora_metadata(model_args, config),
        data={"datasets": run_args.datasets, "split": run_args.dataset_split, "rows": rows},
        steps=steps, mode="online",
        extra={"online": {"rollout": config.rollout, "num_generations": config.num_generations,
                          "temperature": config.temperature, "gate": config.gate, "advantage": config.advantage,
                          "reward": "math_reward"}},
    )


def train_online(config: QEMPOOnlineConfig, model_args, run_args: OnlineRunArgs) -> Path:
    """Load problems and model, train, save adapter + tokenizer + ``qempo_lite.json`` in ``config.output_dir``."""
    from .console import quiet_setup
    from .models import check_model_source
    from .offline import checkpoint_to_resume, push_finished_adapter, take_over_hub_push, use_rich_progress
    from .rewards import math_reward

    checkpoint = checkpoint_to_resume(config.output_dir, run_args.resume, needs_optimizer=not config.save_only_model)
    with quiet_setup():
        print(f"loading problems from {', '.join(run_args.datasets)}", flush=True)
        problems = load_problems(run_args, config.seed)
        repo_id = take_over_hub_push(config)
        check_model_source(model_args.model_name_or_path)
        print(f"loading {model_args.model_name_or_path} and preparing the trainer", flush=True)
        model, tokenizer, peft_config = model_args.load(config)
        trainer = QEMPOOnlineTrainer(model=model, reward_funcs=math_reward, args=config, train_dataset=problems,
                                     processing_class=tokenizer, peft_config=peft_config)
    use_rich_progress(trainer)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        trainer.close_rollout()
    trainer.save_model(config.output_dir)  # adapter (safetensors) + tokenizer; every process (sharded models gather)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        _write_metadata(config, model_args, run_args, len(problems), trainer.state.global_step)
    push_finished_adapter(config, repo_id)  # the main process only
    return Path(config.output_dir)


def cli(argv: list[str]) -> int:
    """``qempo-lite train online --config recipe.yaml [--key value ...] [--resume]``."""
    from .console import input_read
    from .recipe import parse_recipe

    if not argv or any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    config, model_args, run_args = parse_recipe(argv, _config_types(), help_hint=_HELP_HINT)
    input_read()
    output_dir = train_online(config, model_args, run_args)
    print(f"adapter, tokenizer and qempo_lite.json saved to {output_dir}")
    return 0


__all__ = ["TRL_VERSION_RANGE", "OnlineRunArgs", "QEMPOOnlineConfig", "QEMPOOnlineTrainer", "cli", "load_problems",
           "train_online", "usage"]
