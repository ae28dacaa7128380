"""Closed-form optimal policies (Table 1), entropy, and the quality multiplier search.

Over a discrete output set with rewards ``r`` and reference probabilities ``π_ref``, every
method the package trains has the optimum ``π ∝ π_ref^(c/a) · exp(r / a)``, with ``(a, c)``
its policy / reference coefficients (the registry, :mod:`qempo_lite.methods`). Pure torch;
imports nothing else from qempo_lite.
"""

from __future__ import annotations

import math

import torch

from .methods import loss_coefficients

def _as_tensor(name: str, value) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector over the output set, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _coefficients(method: str, coefs: dict) -> tuple[float, float]:
    """(a, c) of a method (``rlhf`` is ``dpo``), with coefficients named as in ``offline_loss``."""
    return loss_coefficients(method, coefs)


def tempered_policy(rewards, ref_probs=None, *, reward_scale: float, ref_exponent: float = 0.0) -> torch.Tensor:
    """``π ∝ π_ref^ref_exponent · exp(reward_scale · r)``, computed in log space."""
    r = _as_tensor("rewards", rewards)
    logits = reward_scale * r
    if ref_exponent != 0.0:
        if ref_probs is None:
            raise ValueError("ref_probs is needed when the reference exponent is non-zero")
        ref = _as_tensor("ref_probs", ref_probs)
        if ref.shape != r.shape:
            raise ValueError(f"ref_probs has shape {tuple(ref.shape)} but rewards has {tuple(r.shape)}")
        if (ref <= 0).any():
            raise ValueError("ref_probs must be strictly positive (full support)")
        logits = logits + ref_exponent * torch.log(ref)
    return torch.softmax(logits, dim=0)


def optimal_policy(method: str, rewards, ref_probs=None, **coefs) -> torch.Tensor:
    """Table 1 closed form of ``method`` over a discrete output set (float64).

    * ``dpo`` / ``rlhf`` (β):          π ∝ π_ref · exp(r / β)                       (Prop. 1)
    * ``qempo`` (β = 1/λ):            π ∝ exp(λ r) = softmax(r / β)                 (Prop. 5)
    * ``qempo_kl`` (β1 = 1/λ1, β2 = λ2/λ1):
                                      π ∝ π_ref^(λ2/(λ2+1)) · exp(λ1/(λ2+1) · r)    (Prop. 3)
    * ``spl`` (α, β):                 π ∝ π_ref^(β/α) · exp(r / α)

    All are ``π ∝ π_ref^(c/a) exp(r/a)`` with (a, c) the coefficients of ``offline_loss``.
    """
    a, c = _coefficients(method, coefs)
    return tempered_policy(rewards, ref_probs, reward_scale=1.0 / a, ref_exponent=c / a)


def entropy(probs) -> torch.Tensor:
    """Shannon entropy ``H(π) = −Σ π log π`` in nats (0 log 0 = 0)."""
    p = _as_tensor("probs", probs)
    if (p < 0).any() or abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError("probs must be a probability vector (non-negative, summing to 1)")
    return -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum()


def expected_reward(probs, rewards) -> torch.Tensor:
    """``E_π[r]``."""
    return (_as_tensor("probs", probs) * _as_tensor("rewards", rewards)).sum()


def kl_divergence(p, q) -> torch.Tensor:
    """``KL(p ‖ q) = Σ p log(p / q)``."""
    p, q = _as_tensor("p", p), _as_tensor("q", q)
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p)).sum()


def solve_multiplier(method: str, rewards, target_reward: float, ref_probs=None, *, lambda2: float | None = None,
                     tol: float = 1e-12, max_iter: int = 500) -> dict[str, float]:
    """Find the Lagrange multiplier that makes the quality constraint ``E_π[r] ≥ R`` tight.

    Solves ``E_π[r] = R`` for the method's optimal-policy family:

    * ``dpo`` / ``rlhf`` (Prop. 1): π ∝ π_ref exp(λ r); returns λ and β = 1/λ.
    * ``qempo`` (Prop. 5): π ∝ exp(λ r); returns λ and β = 1/λ.
    * ``qempo_kl`` (Prop. 3) for a given ``lambda2`` (the KL multiplier λ2 = β2/β1):
      π ∝ π_ref^(λ2/(λ2+1)) exp(λ1/(λ2+1) r); returns λ1, λ2, β1 = 1/λ1, β2 = λ2/λ1.

    ``E_π[r]`` is non-decreasing in the reward scale (its derivative is Var_π(r) ≥ 0), so
    the root is found by bracketing and bisection. ``R`` must lie in
    ``[E_π[r] at λ = 0, max r)``; otherwise no finite non-negative multiplier exists.
    """
    if method not in ("dpo", "rlhf", "qempo", "qempo_kl"):
        raise ValueError(f"solve_multiplier supports dpo, rlhf, qempo and qempo_kl, not {method!r}")
    r = _as_tensor("rewards", rewards)
    if method == "qempo":
        ref_exponent = 0.0
    elif method == "qempo_kl":
        if lambda2 is None or not lambda2 > 0:
            raise ValueError("qempo_kl needs lambda2 > 0 (the KL multiplier, β2/β1)")
        ref_exponent = lambda2 / (lambda2 + 1.0)
    else:
        ref_exponent = 1.0
    if ref_exponent != 0.0 and ref_probs is None:
        raise ValueError(f"method {method!r} needs ref_probs")

    def mean_reward(scale: float) -> float:
        return float(expected_reward(tempered_policy(r, ref_probs, reward_scale=scale, ref_exponent=ref_exponent), r))

    low, high = 0.0, 1.0
    floor, ceiling = mean_reward(0.0), float(r.max())
    if not floor - tol <= target_reward < ceiling:
        raise ValueError(
            f"target_reward {target_reward} is not reachable: it must lie in [{floor:.6g}, {ceiling:.6g}) "
            "(below, the constraint is slack at multiplier 0; the best reward itself needs an infinite one)"
        )
    while mean_reward(high) < target_reward:
        low, high = high, high * 2.0
        if high > 1e12:
            raise ValueError(f"no multiplier below 1e12 reaches target_reward {target_reward}")
    for _ in range(max_iter):
        mid = 0.5 * (low + high)
        if mean_reward(mid) < target_reward:
            low = mid
        else:
            high = mid
        if high - low <= tol * max(1.0, high):
            break
    scale = 0.5 * (low + high)
    if method == "qempo_kl":
        lambda1 = scale * (lambda2 + 1.0)
        return {"lambda1": lambda1, "lambda2": float(lambda2), "beta1": 1.0 / lambda1 if lambda1 else math.inf,
                "beta2": lambda2 / lambda1 if lambda1 else math.inf}
    return {"lambda": scale, "beta": 1.0 / scale if scale else math.inf}
