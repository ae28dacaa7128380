"""The trainer configs: ``QEMPOConfig`` (offline, a ``trl.DPOConfig``) and ``QEMPOOnlineConfig`` (online, a
``trl.GRPOConfig``), kept apart from the trainers as TRL keeps ``DPOConfig`` from ``DPOTrainer``.

Each adds the method and its coefficients (:mod:`qempo_lite.methods`; unset coefficients take
the paper's values, another method's are refused) and checks what it inherits from TRL
against qempo-lite's allowlist (:mod:`qempo_lite.trl_fields`), so that what a config accepts
is exactly what its trainer trains.

Coefficients. The method is resolved once, when the config is built (:func:`resolve_method`):
its coefficients end up in ``method_args`` (``{"beta": 0.004}``) and in the frozen
:attr:`method_settings` the trainers read. ``beta``, ``beta1``, ``beta2`` and ``alpha`` on the
command line or in a recipe are spellings of ``method_args`` entries (the paper's names); a
method registered with another coefficient name takes it in ``method_args`` only. Afterwards
TRL's own ``beta`` holds TRL's meaning: offline the policy coefficient ``a`` that multiplies
TRL's sigmoid loss, online GRPO's KL coefficient, 0 (Eq. 8/9 carry their own reference term).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig, GRPOConfig

from . import trl_fields
from .bounds import check_config_numbers
from .errors import QempoError, one_line, short_repr
from .losses import ADVANTAGES, GATES, OFFLINE_METHODS
from .methods import MethodSettings, coefficient_help, get_method, method_help, method_names, resolve
from .rollout import engine_names
from .rollout.transport import check_server_settings
from .trl_fields import refuse_unlisted_fields

COEFFICIENT_NAMES = ("beta", "beta1", "beta2", "alpha")  # the paper's names, spelled as config fields


def _method_args_field(spellings: str):
    """The ``method_args`` field; ``spellings`` names the coefficients also taken on their own."""
    return field(default=None, metadata={
        "help": "The method's coefficients by name, e.g. {beta: 0.004}; unset ones take the method's defaults. "
                f"{spellings} may also be given on their own."})


def _coefficient_field(name: str, mode: str, note: str = ""):
    """The field of a coefficient spelled on its own (the paper's name), unset by default; its help lists
    what it means for each method of ``mode`` (then ``note``)."""
    return field(default=None, metadata={"help": coefficient_help(name, mode) + note})


def resolve_method(config, mode: str, parent: type) -> MethodSettings:
    """Resolve ``config.loss_method`` once: its coefficients (``method_args`` and the top-level spellings),
    checked and completed with the defaults, and the TRL settings only some methods may use.

    One-line QempoError for a coefficient the method does not take, one given twice with two
    values, an invalid value, or a method-only TRL setting (``Method.trl_settings``) set for
    another method. Leaves the coefficients in ``config.method_args`` and the top-level spellings unset."""
    method = get_method(config.loss_method, mode)
    given = config.method_args if config.method_args is not None else {}
    if not isinstance(given, dict) or not all(isinstance(key, str) for key in given):
        raise QempoError(f"method_args must map coefficient names to numbers, got {short_repr(given)}")
    given = dict(given)
    for name in COEFFICIENT_NAMES:
        value = getattr(config, name, None)
        if value is None:
            continue
        if name not in method.defaults:
            uses = ", ".join(method.coefficient_names) or "no coefficients"
            raise QempoError(f"{name} is not a coefficient of loss_method {method.name} (it uses {uses}); "
                             f"remove {name}")
        if given.get(name) not in (None, value):
            raise QempoError(f"{name} is given twice, {value!r} and method_args {name}: {given[name]!r}; keep one")
        given[name] = value
    try:
        settings = resolve(method.name, given, mode)
    except ValueError as err:
        raise QempoError(f"{err}; fix the coefficient in the config") from None
    _check_trl_settings(config, method, mode, parent)
    config.method_args = dict(settings.coefficients)
    for name in COEFFICIENT_NAMES:
        if hasattr(config, name):
            setattr(config, name, None)
    return settings


def _check_trl_settings(config, method, mode: str, parent: type) -> None:
    """Refuse a TRL setting that only other methods may change (``Method.trl_settings``), or a value not allowed."""
    import dataclasses

    defaults = {f.name: trl_fields.field_default(f) for f in dataclasses.fields(parent)}
    owners: dict[str, list[str]] = {}
    for name in method_names(mode):
        for key in get_method(name).trl_settings:
            owners.setdefault(key, []).append(name)
    for key, names in owners.items():
        value = getattr(config, key)
        if value == defaults.get(key):
            continue
        allowed = method.trl_settings.get(key, ())
        if key not in method.trl_settings:
            loss = parent.__name__.removesuffix("Config")
            raise QempoError(f"{key}={short_repr(value)} shapes {loss}'s loss, which {method.name} replaces; remove "
                             f"{key} (it applies to loss_method {' / '.join(names)} only)")
        if allowed is not None and value not in allowed:
            raise QempoError(f"{key} {value!r} is not allowed with loss_method {method.name}: use one of "
                             f"{', '.join(map(str, allowed))}")


def method_only_fields(mode: str) -> frozenset[str]:
    """The TRL settings some method of ``mode`` may change (checked by :func:`resolve_method`)."""
    return frozenset(key for name in method_names(mode) for key in get_method(name).trl_settings)


def _positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def check_training_numbers(config) -> None:
    """One-line errors for step and batch settings that transformers would only refuse (or silently
    accept) once the model is loaded: batch sizes and accumulation steps below 1, a learning rate
    that is not a positive finite number, ``max_steps: 0`` and no epochs to train; then the
    bounds of :func:`qempo_lite.bounds.check_config_numbers`."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise QempoError(f"{name} must be a whole number >= 1, got {value!r}; fix it in the config")
    if not _positive_finite(config.learning_rate):
        raise QempoError(f"learning_rate must be a positive number, got {config.learning_rate!r} (0 would train "
                         "nothing); fix it in the config")
    if isinstance(config.max_steps, bool) or not isinstance(config.max_steps, int) or config.max_steps == 0 \
            or config.max_steps < -1:
        raise QempoError(f"max_steps must be a number of optimizer steps >= 1 (or -1: train num_train_epochs), got "
                         f"{config.max_steps!r}")
    if config.max_steps == -1 and not _positive_finite(config.num_train_epochs):
        raise QempoError(f"num_train_epochs must be a positive number when max_steps is not set, got "
                         f"{config.num_train_epochs!r}")
    check_config_numbers(config)


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
    belongs to this family; other ``loss_type`` values, ``use_weighting`` and ``ld_alpha`` are
    refused. ``loss_method: dpo`` alone also takes TRL's f-DPO ``f_divergence_type``
    ``js_divergence`` or ``forward_kl`` (TRL's loss, outside the family: no Table 1 closed form);
    the other methods scale the reference, which TRL's f-divergence would then misread, and refuse
    it. ``qempo`` ignores ``precompute_ref_log_probs`` (there is nothing to precompute).
    """

    loss_method: str = field(
        default="qempo",
        metadata={"help": "Offline objective. " + method_help("offline"), "choices": list(OFFLINE_METHODS)},
    )
    method_args: dict | None = _method_args_field("beta, beta1, beta2 and alpha")
    beta: float | None = _coefficient_field("beta", "offline", ". Afterwards TRL's beta: the policy coefficient a.")
    beta1: float | None = _coefficient_field("beta1", "offline")
    beta2: float | None = _coefficient_field("beta2", "offline")
    alpha: float | None = _coefficient_field("alpha", "offline")

    def __post_init__(self):
        check_training_numbers(self)
        if self.loss_method not in method_names("offline"):
            raise QempoError(f"loss_method must be one of {', '.join(method_names('offline'))}, got "
                             f"{self.loss_method!r}")
        self.method_settings = resolve_method(self, "offline", DPOConfig)
        # TRL's β multiplies its sigmoid loss; the trainer scales the reference by c/a (module docstring).
        self.beta = self.method_settings.policy_coef if self.method_settings.method.in_family else 1.0
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss_types != ["sigmoid"]:
            raise QempoError(f"loss_type must be 'sigmoid' for the QEMPO family, got {self.loss_type!r}; remove it")
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
        return dict(self.method_settings.coefficients)



@dataclass
class QEMPOOnlineConfig(GRPOConfig):
    """GRPOConfig plus the QEMPO online settings.

    ``beta`` given here is the QEMPO coefficient (moved into ``method_args``; see the module
    docstring); once built, the field holds GRPO's KL coefficient, 0. Defaults follow the paper: β = 4e-3 (qempo), β = 1e-2 (gvpo), β1 = 4e-3 and
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
    method_args: dict | None = _method_args_field("beta, beta1 and beta2")
    beta: float | None = _coefficient_field("beta", "online", ". Not GRPO's KL coefficient, which stays 0.")
    beta1: float | None = _coefficient_field("beta1", "online")
    beta2: float | None = _coefficient_field("beta2", "online")
    gate: str | None = field(
        default=None,
        metadata={"help": "Quality gate of the variance term: correct, group or none. Default: the method's, "
                          "correct for qempo and qempo_kl (the paper's gate), none for gvpo (GVPO as published)."},
    )
    advantage: str = field(default="center", metadata={"help": "center: r - mean(r); grpo: (r - mean(r)) / std(r)."})
    correct_threshold: float = field(
        default=0.0, metadata={"help": "A completion counts as correct when its total reward is above this."}
    )
    rollout: str = field(default="hf", metadata={
        "help": "hf (transformers generate), vllm (an in-process vLLM engine serving the LoRA) or vllm_server "
                "(a vLLM server started with qempo-lite serve; adapter-only sync, any number of processes), or another "
                "engine registered with qempo_lite.rollout.register_engine."})
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
        check_training_numbers(self)
        if self.loss_method not in method_names("online"):
            raise QempoError(f"loss_method {self.loss_method!r} is unknown; use one of "
                             f"{', '.join(method_names('online'))}")
        if self.gate is None:
            self.gate = get_method(self.loss_method, "online").gate
        if self.gate not in GATES:
            raise QempoError(f"gate {self.gate!r} is unknown; use one of {', '.join(GATES)}")
        if self.advantage not in ADVANTAGES:
            raise QempoError(f"advantage {self.advantage!r} is unknown; use one of {', '.join(ADVANTAGES)}")
        if self.rollout not in engine_names():
            raise QempoError(f"rollout {self.rollout!r} is unknown; use one of {', '.join(engine_names())}")
        if self.use_vllm:
            raise QempoError(
                "use_vllm selects TRL's vLLM path, which merges the adapter into the base; "
                "set rollout: vllm or rollout: vllm_server instead (adapter-only sync)"
            )
        check_server_settings(self.vllm_server_url, self.vllm_server_retries, self.vllm_server_request_timeout)
        self.method_settings = resolve_method(self, "online", GRPOConfig)
        self.beta = 0.0  # GRPO's KL coefficient: Eq. 8/9 carry their own reference term, grpo trains without one
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
            raise QempoError(f"{key}={value!r} shapes GRPO's loss, which qempo-lite does not train; remove {key}")
        refuse_unlisted_fields(self, GRPOConfig, trl_fields.GRPO | method_only_fields("online"), "QEMPOOnlineConfig")
        try:
            super().__post_init__()
        except ValueError as err:  # GRPOConfig's own checks (batch sizes vs num_generations, ...)
            raise QempoError(one_line(err)) from err
        if self.steps_per_generation > self.gradient_accumulation_steps:
            raise QempoError(
                f"steps_per_generation={self.steps_per_generation} spans several optimizer steps, so later steps would "
                f"train on log-probs of an older policy; set it (or generation_batch_size) to at most "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}")

    def _ignored_grpo_options(self) -> dict[str, Any]:
        """GRPO options set away from their defaults that the QEMPO objective would silently ignore."""
        checks = {
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            # Masked completions would enter the group weights with log-prob 0.
            "mask_truncated_completions": self.mask_truncated_completions,
            # The reference is the base model with the adapter disabled; there is nothing to sync.
            "sync_ref_model": self.sync_ref_model,
        }
        return {key: getattr(self, key) for key, bad in checks.items() if bad}

    def coefficients(self) -> dict[str, float]:
        """The coefficients the method uses, as recorded in ``qempo_lite.json``."""
        return dict(self.method_settings.coefficients)



__all__ = ["COEFFICIENT_NAMES", "QEMPOConfig", "QEMPOOnlineConfig", "check_training_numbers", "method_only_fields",
           "resolve_method"]
