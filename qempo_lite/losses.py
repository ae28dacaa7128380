"""The QEMPO objectives, offline (Eq. 6-7) and online (Eq. 8-9), in pure torch.

Notation: ``logps`` are *summed* log-probabilities of whole completions (sum over the
completion's tokens, not the mean). This module imports only the method registry
(:mod:`qempo_lite.methods`, pure Python) from qempo_lite, and nothing from trl / transformers /
peft, so the math can be read and tested on its own.

Offline, every method is one member of a two-coefficient family (see ``docs/math.md``)::

    loss = -logsigmoid( a * (logp_w - logp_l) - c * (ref_logp_w - ref_logp_l) )

whose population minimiser under Bradley-Terry preferences is
``pi ∝ pi_ref^(c/a) * exp(r / a)`` (Table 1 of the paper).

Online, the group objectives J of Eq. 8 / Eq. 9 are maximised; their gradients are
per-sequence weights ``w`` so that the training loss is ``-(w * logps).sum()``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .methods import get_method, loss_coefficients, method_names, resolve

OFFLINE_METHODS = method_names("offline")
# The online members of the two-coefficient family (grpo trains TRL's own loss and has no weights here).
ONLINE_METHODS = tuple(name for name in method_names("online") if not get_method(name).trl_loss)
GATES = ("correct", "group", "none")
ADVANTAGES = ("center", "grpo")

# GRPO's std normalisation guard (same value TRL uses).
_GRPO_STD_EPS = 1e-4


def offline_coefficients(method: str, **coefficients: float | None) -> tuple[float, float]:
    """Return ``(a, c)``, the policy and reference coefficients of an offline method (:mod:`qempo_lite.methods`).

    ============  ===================  ==========================================
    method        (a, c)               coefficients
    ============  ===================  ==========================================
    ``qempo``     (beta, 0)            Eq. 7, beta = 1/λ
    ``qempo_kl``  (beta1+beta2, beta2) Eq. 6, beta1 = 1/λ1, beta2 = λ2/λ1
    ``dpo``       (beta, beta)         Eq. 4 (the paper's "RLHF")
    ``spl``       (alpha, beta)        Soft Preference Learning
    ============  ===================  ==========================================
    """
    return loss_coefficients(method, coefficients, "offline")


def _check_tensor(name: str, value, shape: torch.Size | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per sequence), got shape {tuple(value.shape)}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but {tuple(shape)} was expected")
    if not torch.isfinite(value.detach()).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def offline_loss(
    method: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    **coefficients: float | None,
) -> torch.Tensor:
    """Unreduced per-pair offline loss of ``method`` (``coefficients``: its named coefficients, e.g. ``beta=4e-3``).

    ``loss = -logsigmoid(a * (logp_w - logp_l) - c * (ref_logp_w - ref_logp_l))``

    with ``(a, c)`` from :func:`offline_coefficients`:

    * ``qempo`` (Eq. 7): ``-log σ(β log π(y+) - β log π(y-))``; no reference log-probs.
    * ``qempo_kl`` (Eq. 6): ``-log σ(β1 Δlog π + β2 Δlog(π/π_ref))``.
    * ``dpo`` (Eq. 4): ``-log σ(β Δlog(π/π_ref))``.
    * ``spl``: ``-log σ(α Δlog π - β Δlog π_ref)``.

    A registered method outside the family computes its own (``Method.offline_loss``).
    """
    chosen_logps = _check_tensor("chosen_logps", chosen_logps)
    rejected_logps = _check_tensor("rejected_logps", rejected_logps, chosen_logps.shape)
    if not get_method(method, "offline").in_family:
        settings = resolve(method, coefficients, "offline")
        if settings.needs_reference:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError(f"method {method!r} needs reference log-probs: ref_chosen_logps and ref_rejected_logps")
            ref_chosen_logps = _check_tensor("ref_chosen_logps", ref_chosen_logps, chosen_logps.shape)
            ref_rejected_logps = _check_tensor("ref_rejected_logps", ref_rejected_logps, chosen_logps.shape)
        return settings.method.offline_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                            **settings.coefficients)
    a, c = offline_coefficients(method, **coefficients)
    logits = a * (chosen_logps - rejected_logps)
    if c != 0.0:
        missing = [n for n, v in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)) if v is None]
        if missing:
            raise ValueError(f"method {method!r} needs reference log-probs: {', '.join(missing)} missing")
        ref_chosen_logps = _check_tensor("ref_chosen_logps", ref_chosen_logps, chosen_logps.shape)
        ref_rejected_logps = _check_tensor("ref_rejected_logps", ref_rejected_logps, chosen_logps.shape)
        logits = logits - c * (ref_chosen_logps - ref_rejected_logps)
    return -F.logsigmoid(logits)


def online_coefficients(method: str, **coefficients: float | None) -> tuple[float, float]:
    """Return ``(a, c)`` of an online method: ``qempo`` (β, 0), ``qempo_kl`` (β1+β2, β2), ``gvpo`` (β, β)."""
    if method not in ONLINE_METHODS and method in method_names("online"):
        raise ValueError(f"method {method!r} trains TRL's own loss: it has no Eq. 8/9 weights; use one of "
                         f"{', '.join(ONLINE_METHODS)}")
    return loss_coefficients(method, coefficients, "online")


def _grouped_inputs(method, logps, rewards, group_size, ref_logps=None, correct=None, gate="correct",
                    advantage="center", coefficients=None):
    """Validate the online inputs; ``(a, c, ℓ, ℓ_ref, A, variance mask)``, each (num_groups, group_size).

    Defaults as :func:`online_objective`'s. ``(a, c)`` are None for a method outside the family."""
    coefficients = coefficients or {}
    if get_method(method, "online").in_family:
        a, c = online_coefficients(method, **coefficients)
        needs_reference = c != 0.0
    else:
        settings = resolve(method, coefficients, "online")
        a = c = None
        needs_reference = settings.needs_reference
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}, got {advantage!r}")
    logps = _check_tensor("logps", logps)
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    if logps.numel() == 0 or logps.numel() % group_size != 0:
        raise ValueError(
            f"logps has {logps.numel()} rows, not a positive multiple of group_size={group_size}; "
            "each prompt's completions must form one consecutive block"
        )
    rewards = _check_tensor("rewards", torch.as_tensor(rewards) if not isinstance(rewards, torch.Tensor) else rewards, logps.shape)
    rewards = rewards.to(logps.dtype)
    if correct is None:
        correct = rewards > 0
    else:
        if not isinstance(correct, torch.Tensor):
            correct = torch.as_tensor(correct)
        if correct.shape != logps.shape:
            raise ValueError(f"correct has shape {tuple(correct.shape)} but {tuple(logps.shape)} was expected")
        correct = correct.bool()
    if needs_reference:
        if ref_logps is None:
            raise ValueError(f"method {method!r} needs ref_logps (reference log-probs of the completions)")
        ref_logps = _check_tensor("ref_logps", ref_logps, logps.shape).detach().to(logps.dtype)
    k = group_size
    advantages = _advantages(rewards.detach().view(-1, k), advantage)
    variance_mask = _variance_mask(correct.to(logps.device).view(-1, k), gate)
    return a, c, logps.view(-1, k), ref_logps.view(-1, k) if needs_reference else None, advantages, variance_mask


def _advantages(rewards: torch.Tensor, advantage: str) -> torch.Tensor:
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if advantage == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True) + _GRPO_STD_EPS)
    return centred


def _variance_mask(correct: torch.Tensor, gate: str) -> torch.Tensor:
    """Which completions the variance (entropy) term of Eq. 8/9 covers, as a float mask."""
    if gate == "none":
        return torch.ones_like(correct, dtype=torch.float64)
    if gate == "group":
        return correct.all(dim=1, keepdim=True).expand_as(correct).to(torch.float64)
    return correct.to(torch.float64)


def _gated_centre(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values - mean over the masked entries of the group`` (zero where the mask is empty)."""
    mask = mask.to(values.dtype)
    count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (values * mask).sum(dim=1, keepdim=True) / count
    return (values - mean) * mask


def online_objective(
    method: str,
    logps: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    *,
    ref_logps: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
    gate: str = "correct",
    advantage: str = "center",
    **coefficients: float | None,
) -> torch.Tensor:
    """The online objective J (to be maximised), averaged over groups (``coefficients``: the method's, e.g. ``beta``).

    For one group of k completions with rewards r_i and summed log-probs ℓ_i::

        Eq. 9  (qempo, β = 1/λ):               J = 2β [ mean(A ℓ) − ½ β Var_G(ℓ) ]
        Eq. 8  (qempo_kl, a = β1+β2, c = β2):  J = 2a [ mean(A ℓ) + c Cov(ℓ, ℓ_ref) − ½ a Var_G(ℓ) ]
        gvpo   (the paper's online RLHF):      Eq. 8 with a = c = β

    Means are plain means over the group (1/k). ``A`` is the advantage: ``r − r̄`` for
    ``advantage="center"`` (what the theory needs) or ``(r − r̄)/(std(r) + 1e-4)`` for
    ``advantage="grpo"`` (what the paper's experiments used; unbiased std as in TRL).

    ``Var_G`` is the quality-gated variance (paper §3.4 / §4.5: entropy is only pushed up
    on correct completions). With C the gated set of the group::

        Var_G(ℓ) = (1/k) Σ_{i∈C} (ℓ_i − mean_{j∈C} ℓ_j)²

    * ``gate="none"``: C is the whole group (plain Eq. 8/9).
    * ``gate="correct"`` (default): C is the correct completions. Each correct completion
      keeps the 1/k share it has in the ungated objective, so an all-correct group equals
      the ungated one and a wrong completion gets no variance-term weight at all.
    * ``gate="group"``: C is the whole group if every completion is correct, else empty
      (the paper's Listings 3-4).

    ``correct`` defaults to ``rewards > 0``. The covariance term is never gated. A registered
    method outside the family brings its own J (``Method.online_objective``), called with the same
    arguments, its rewards, reference log-probs and correctness checked here first.
    """
    a, c, l, lref, adv, mask = _grouped_inputs(
        method, logps, rewards, group_size, ref_logps, correct, gate, advantage, coefficients
    )
    if a is None:
        settings = resolve(method, coefficients, "online")
        return settings.method.online_objective(
            logps, rewards, group_size, ref_logps=None if lref is None else lref.reshape(-1),
            correct=torch.as_tensor(rewards) > 0 if correct is None else torch.as_tensor(correct).bool(), gate=gate,
            advantage=advantage, **settings.coefficients)
    k = group_size
    centred = _gated_centre(l, mask)
    inner = (adv * l).sum(dim=1) / k - 0.5 * a * (centred * centred).sum(dim=1) / k
    if lref is not None:
        lc = l - l.mean(dim=1, keepdim=True)
        rc = lref - lref.mean(dim=1, keepdim=True)
        inner = inner + c * (lc * rc).sum(dim=1) / k
    return (2.0 * a * inner).mean()


@torch.no_grad()
def online_weights(method: str, logps: torch.Tensor, rewards: torch.Tensor, group_size: int,
                   **settings: Any) -> torch.Tensor:
    """Detached per-sequence weights ``w = ∂J/∂ℓ`` of :func:`online_objective`, which takes the same
    arguments (``settings``: its keyword arguments ``ref_logps``, ``correct``, ``gate``, ``advantage``
    and the method's coefficients, e.g. ``beta``).

    For a group of k (G groups in the call, J averaged over them)::

        w_i = (2a / (G k)) [ A_i − a · 1[i∈C] (ℓ_i − mean_C ℓ) + c (ℓref_i − mean ℓref) ]

    (qempo: a = β, c = 0). The training loss is ``-(w * logps).sum()`` over any
    micro-batch: weights are computed once per group when the rollouts are scored, so a
    group may be split across micro-batches and gradient-accumulation steps. Equivalently
    J = −(1/k) Σ (ŝ_i − A_i)² + const with ŝ the centred implicit reward a ℓ − c ℓ_ref:
    a per-group regression whose optimum is the Table 1 closed form.

    For a registered method outside the family, ``w`` is the autograd gradient of its own J.
    """
    if not get_method(method, "online").in_family:
        with torch.enable_grad():
            leaf = logps.detach().clone().requires_grad_(True)
            (weights,) = torch.autograd.grad(online_objective(method, leaf, rewards, group_size, **settings), leaf)
        return weights
    known = ("ref_logps", "correct", "gate", "advantage")
    a, c, l, lref, adv, mask = _grouped_inputs(method, logps.detach(), rewards, group_size,
                                               **{key: settings[key] for key in known if key in settings},
                                               coefficients={k: v for k, v in settings.items() if k not in known})
    num_groups, k = l.shape
    inner = adv - a * _gated_centre(l, mask)
    if lref is not None:
        inner = inner + c * (lref - lref.mean(dim=1, keepdim=True))
    return (2.0 * a / (num_groups * k) * inner).reshape(-1)
