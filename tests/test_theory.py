"""Closed forms of Table 1, the multiplier search, and the entropy orderings (Props. 4, 6)."""

import math

import pytest
import torch

from qempo_lite.theory import entropy, expected_reward, kl_divergence, optimal_policy, solve_multiplier


def _instance(seed, k=8):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand(k, generator=gen, dtype=torch.float64)
    ref = torch.softmax(2 * torch.randn(k, generator=gen, dtype=torch.float64), 0)
    return rewards, ref, gen


def test_closed_forms():
    r = torch.tensor([0.0, 0.01, 0.02, 0.005, 0.015], dtype=torch.float64)
    ref = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1], dtype=torch.float64)
    torch.testing.assert_close(optimal_policy("qempo", r, beta=4e-3), torch.softmax(r / 4e-3, 0))
    dpo = ref * torch.exp(r / 1e-2)
    torch.testing.assert_close(optimal_policy("dpo", r, ref, beta=1e-2), dpo / dpo.sum())
    torch.testing.assert_close(optimal_policy("rlhf", r, ref, beta=1e-2), dpo / dpo.sum())
    # Prop. 3 in the paper's own multipliers: λ1 = 1/β1, λ2 = β2/β1
    lam1, lam2 = 1 / 4e-3, 1e-2 / 4e-3
    kl = ref ** (lam2 / (lam2 + 1)) * torch.exp(lam1 / (lam2 + 1) * r)
    torch.testing.assert_close(optimal_policy("qempo_kl", r, ref, beta1=4e-3, beta2=1e-2), kl / kl.sum())
    spl = ref ** (0.01 / 0.02) * torch.exp(r / 0.02)
    torch.testing.assert_close(optimal_policy("spl", r, ref, alpha=0.02, beta=0.01), spl / spl.sum())


def test_closed_form_bad_arguments():
    r = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="beta"):
        optimal_policy("qempo", r)
    with pytest.raises(ValueError, match="ref_probs"):
        optimal_policy("dpo", r, beta=0.1)
    with pytest.raises(ValueError, match="not beta1"):
        optimal_policy("qempo", r, beta=0.1, beta1=0.2)


def test_entropy_values():
    assert math.isclose(float(entropy(torch.full((4,), 0.25))), math.log(4))
    assert float(entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0
    with pytest.raises(ValueError):
        entropy(torch.tensor([0.5, 0.6]))


@pytest.mark.parametrize("method", ["qempo", "dpo", "qempo_kl"])
def test_multiplier_makes_quality_constraint_tight(method):
    rewards, ref, _ = _instance(0)
    floor = float(expected_reward(ref if method != "qempo" else torch.full_like(ref, 1 / len(ref)), rewards))
    target = floor + 0.6 * (float(rewards.max()) - floor)
    kw = {"lambda2": 2.5} if method == "qempo_kl" else {}
    coefs = solve_multiplier(method, rewards, target, ref, **kw)
    policy_coefs = {k: v for k, v in coefs.items() if k.startswith("beta")}
    policy = optimal_policy(method, rewards, ref, **policy_coefs)
    assert abs(float(expected_reward(policy, rewards)) - target) < 1e-8
    with pytest.raises(ValueError, match="not reachable"):
        solve_multiplier(method, rewards, float(rewards.max()) + 0.1, ref, **kw)


@pytest.mark.parametrize("seed", range(25))
def test_proposition_4_qempo_kl_entropy_above_rlhf(seed):
    """Prop. 4: with 1/β = λ1/λ2, H(π_QEMPO-KL) ≥ H(π_RLHF)."""
    rewards, ref, gen = _instance(seed)
    beta = float(torch.rand(1, generator=gen)) * 2 + 0.05
    lam2 = float(torch.rand(1, generator=gen)) * 5 + 0.01
    lam1 = lam2 / beta
    rlhf = optimal_policy("rlhf", rewards, ref, beta=beta)
    qempo_kl = optimal_policy("qempo_kl", rewards, ref, beta1=1 / lam1, beta2=lam2 / lam1)
    assert float(entropy(qempo_kl)) >= float(entropy(rlhf)) - 1e-12


@pytest.mark.parametrize("seed", range(25))
def test_proposition_6_qempo_entropy_above_qempo_kl(seed):
    """Prop. 6: with λ ≤ λ1/(λ2+1) and (λ2/λ1)λ small, H(π_QEMPO) ≥ H(π_QEMPO-KL)."""
    rewards, ref, gen = _instance(seed)
    lam1 = float(torch.rand(1, generator=gen)) * 10 + 1
    lam2 = 1e-3
    lam = float(torch.rand(1, generator=gen) * 0.8 + 0.1) * lam1 / (lam2 + 1)
    qempo = optimal_policy("qempo", rewards, beta=1 / lam)
    qempo_kl = optimal_policy("qempo_kl", rewards, ref, beta1=1 / lam1, beta2=lam2 / lam1)
    assert float(entropy(qempo)) >= float(entropy(qempo_kl))


def test_quality_constrained_ordering_at_equal_quality():
    """Props. 1/3/5 together: at the same expected reward R, max-entropy QEMPO has the most
    entropy (Prop. 5); QEMPO-KL sits between it and RLHF: RLHF has the least KL for that
    quality (Prop. 1), so it is feasible for QEMPO-KL's max-entropy problem (Prop. 3)."""
    rewards, ref, _ = _instance(7)
    uniform = torch.full_like(ref, 1 / len(ref))
    floor = max(float(expected_reward(ref, rewards)), float(expected_reward(uniform, rewards)))
    target = floor + 0.5 * (float(rewards.max()) - floor)
    rlhf = optimal_policy("rlhf", rewards, ref, beta=solve_multiplier("rlhf", rewards, target, ref)["beta"])
    qempo = optimal_policy("qempo", rewards, beta=solve_multiplier("qempo", rewards, target)["beta"])
    kl_coefs = solve_multiplier("qempo_kl", rewards, target, ref, lambda2=3.0)
    qempo_kl = optimal_policy("qempo_kl", rewards, ref, beta1=kl_coefs["beta1"], beta2=kl_coefs["beta2"])
    assert float(entropy(qempo)) >= float(entropy(qempo_kl)) - 1e-9
    assert float(entropy(qempo_kl)) >= float(entropy(rlhf)) - 1e-9
    assert float(kl_divergence(rlhf, ref)) <= float(kl_divergence(qempo_kl, ref)) + 1e-9
