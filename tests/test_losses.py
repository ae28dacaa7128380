"""The math core: offline family optimum, online weights = autograd, gates, bad input."""

import subprocess
import sys

import pytest
import torch

from qempo_lite.losses import (
    ADVANTAGES,
    GATES,
    ONLINE_METHODS,
    offline_loss,
    online_objective,
    online_weights,
)
from qempo_lite.theory import optimal_policy

OFFLINE_COEFS = {
    "qempo": {"beta": 0.5},
    "qempo_kl": {"beta1": 0.3, "beta2": 0.4},
    "dpo": {"beta": 0.5},
    "spl": {"alpha": 0.6, "beta": 0.25},
}
ONLINE_COEFS = {"qempo": {"beta": 0.3}, "qempo_kl": {"beta1": 0.2, "beta2": 0.5}, "gvpo": {"beta": 0.4}}


def _tv(p, q):
    return 0.5 * (p - q).abs().sum().item()


def _expected_bt_loss(method, theta, rewards, ref_logp, coefs):
    """Exact expected loss over all ordered pairs, labelled by Bradley-Terry P(i ≻ j) = σ(r_i − r_j)."""
    logp = torch.log_softmax(theta, dim=0)
    k = len(rewards)
    i, j = torch.triu_indices(k, k, offset=1)
    p_i_wins = torch.sigmoid(rewards[i] - rewards[j])
    loss_i_wins = offline_loss(method, logp[i], logp[j], ref_logp[i], ref_logp[j], **coefs)
    loss_j_wins = offline_loss(method, logp[j], logp[i], ref_logp[j], ref_logp[i], **coefs)
    return (p_i_wins * loss_i_wins + (1 - p_i_wins) * loss_j_wins).mean()


@pytest.mark.parametrize("method", list(OFFLINE_COEFS))
def test_offline_minimiser_is_table1_closed_form(method):
    gen = torch.Generator().manual_seed(1)
    k = 7
    rewards = torch.rand(k, generator=gen, dtype=torch.float64) * 1.5
    ref = torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample() * 0.9 + 0.1 / k
    theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _expected_bt_loss(method, theta, rewards, ref.log(), OFFLINE_COEFS[method])
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    learned = torch.softmax(theta.detach(), dim=0)
    target = optimal_policy(method, rewards, ref, **OFFLINE_COEFS[method])
    assert _tv(learned, target) < 1e-3
    # and it is not trivially the reference or uniform
    assert _tv(target, ref) > 1e-2 and _tv(target, torch.full_like(ref, 1 / k)) > 1e-2


def test_offline_family_values():
    w, l = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    rw, rl = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -6.0])
    import torch.nn.functional as F

    assert torch.allclose(offline_loss("qempo", w, l, beta=0.1), -F.logsigmoid(0.1 * (w - l)))
    assert torch.allclose(offline_loss("dpo", w, l, rw, rl, beta=0.1), -F.logsigmoid(0.1 * ((w - rw) - (l - rl))))
    eq6 = 0.2 * w + 0.3 * (w - rw) - 0.2 * l - 0.3 * (l - rl)  # Eq. 6 as written in the paper
    assert torch.allclose(offline_loss("qempo_kl", w, l, rw, rl, beta1=0.2, beta2=0.3), -F.logsigmoid(eq6))
    assert torch.allclose(offline_loss("spl", w, l, rw, rl, alpha=0.7, beta=0.2),
                          -F.logsigmoid(0.7 * (w - l) - 0.2 * (rw - rl)))


def test_qempo_never_needs_reference():
    w, l = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert offline_loss("qempo", w, l, beta=0.1).shape == (1,)


@pytest.mark.parametrize("method,coefs,missing", [
    ("dpo", {"beta": 0.1}, "ref_chosen_logps"),
    ("qempo_kl", {"beta1": 0.1}, "beta2"),
    ("spl", {"beta": 0.1}, "alpha"),
    ("qempo", {}, "beta"),
])
def test_offline_missing_inputs_are_named(method, coefs, missing):
    with pytest.raises(ValueError, match=missing):
        offline_loss(method, torch.tensor([-1.0]), torch.tensor([-2.0]), **coefs)


def test_offline_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="rejected_logps"):
        offline_loss("qempo", torch.zeros(3), torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="chosen_logps"):
        offline_loss("qempo", torch.tensor([float("nan")]), torch.zeros(1), beta=0.1)
    with pytest.raises(ValueError, match="unknown offline method"):
        offline_loss("ppo", torch.zeros(1), torch.zeros(1), beta=0.1)


def _online_batch(groups=3, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logps = torch.randn(groups * k, generator=gen, dtype=torch.float64) * 3 - 20
    rewards = (torch.rand(groups * k, generator=gen) > 0.5).double()
    rewards[:k] = 1.0  # one all-correct group
    rewards[k:2 * k] = 0.0  # one all-wrong group
    ref = logps.detach() + torch.randn(groups * k, generator=gen, dtype=torch.float64)
    return logps, rewards, ref


@pytest.mark.parametrize("method", ONLINE_METHODS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("advantage", ADVANTAGES)
def test_online_weights_equal_autograd(method, gate, advantage):
    logps, rewards, ref = _online_batch(groups=4)
    logps.requires_grad_(True)
    kw = dict(ref_logps=ref, gate=gate, advantage=advantage, **ONLINE_COEFS[method])
    (grad,) = torch.autograd.grad(online_objective(method, logps, rewards, 4, **kw), logps)
    weights = online_weights(method, logps, rewards, 4, **kw)
    assert not weights.requires_grad
    torch.testing.assert_close(weights, grad, atol=1e-10, rtol=0)

    # A group split across two micro-batches: weights computed once per group, the
    # loss -(w * logp).sum() accumulated over the halves gives the whole gradient.
    acc = torch.zeros_like(logps)
    for rows in (slice(0, 6), slice(6, None)):
        part = logps.detach().clone().requires_grad_(True)
        (-(weights[rows] * part[rows]).sum()).backward()
        acc += part.grad
    torch.testing.assert_close(-acc, grad, atol=1e-10, rtol=0)

    # A group's weights do not depend on which other groups share the call, beyond the
    # 1/num_groups of averaging J over groups.
    for g in range(4):
        rows = slice(4 * g, 4 * g + 4)
        alone = online_weights(method, logps[rows], rewards[rows], 4, **{**kw, "ref_logps": ref[rows]})
        torch.testing.assert_close(alone, 4 * weights[rows], atol=1e-10, rtol=0)


def test_online_closed_form_weights():
    logps, rewards, ref = _online_batch(groups=1, seed=3)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    a, c, k = 0.7, 0.5, 4
    w = online_weights("qempo_kl", logps, rewards, k, ref_logps=ref, gate="none", beta1=a - c, beta2=c)
    expected = (2 * a / k) * ((rewards - rewards.mean()) - a * (logps - logps.mean()) + c * (ref - ref.mean()))
    torch.testing.assert_close(w, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["qempo", "qempo_kl"])
def test_online_fixed_point_is_closed_form(method):
    """Gradient ascent with the per-sequence weights on a full-support tabular group (each
    output once, gate "none") converges to the Table 1 optimum."""
    gen = torch.Generator().manual_seed(4)
    k = 6
    rewards = torch.rand(k, generator=gen, dtype=torch.float64)
    ref_probs = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    coefs = ONLINE_COEFS[method]
    a = coefs.get("beta", 0) + coefs.get("beta1", 0) + coefs.get("beta2", 0)
    theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    # J is a quadratic in log-probs with curvature 2a²/k: step size k/(2a²) is well inside stability.
    opt = torch.optim.SGD([theta], lr=k / (2 * a * a))
    for _ in range(3000):
        logp = torch.log_softmax(theta, 0)
        w = online_weights(method, logp, rewards, k, ref_logps=ref_probs.log(), gate="none", **coefs)
        opt.zero_grad()
        (-(w * logp).sum()).backward()
        opt.step()
    learned = torch.softmax(theta.detach(), 0)
    target = optimal_policy(method, rewards, ref_probs, **coefs)
    assert _tv(learned, target) < 1e-6
    assert _tv(target, torch.full_like(target, 1 / k)) > 1e-2


def test_gate_semantics():
    gen = torch.Generator().manual_seed(5)
    logps = torch.randn(4, generator=gen, dtype=torch.float64) - 10
    kw = dict(beta=0.3)
    all_correct = torch.ones(4, dtype=torch.float64)
    for gate in ("correct", "group"):
        torch.testing.assert_close(online_weights("qempo", logps, all_correct, 4, gate=gate, **kw),
                                   online_weights("qempo", logps, all_correct, 4, gate="none", **kw))
        torch.testing.assert_close(online_objective("qempo", logps, all_correct, 4, gate=gate, **kw),
                                   online_objective("qempo", logps, all_correct, 4, gate="none", **kw))

    all_wrong = torch.zeros(4, dtype=torch.float64)
    for gate in ("correct", "group"):
        assert online_weights("qempo", logps, all_wrong, 4, gate=gate, **kw).abs().max() == 0
        assert online_objective("qempo", logps, all_wrong, 4, gate=gate, **kw) == 0

    mixed = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    w = online_weights("qempo", logps, mixed, 4, gate="correct", **kw)
    reward_only = (2 * 0.3 / 4) * (mixed - mixed.mean())
    wrong = mixed == 0
    torch.testing.assert_close(w[wrong], reward_only[wrong], atol=1e-12, rtol=0)
    # correct completions are pulled towards the mean log-prob of the correct ones
    correct_lp = logps[~wrong]
    expected = reward_only[~wrong] - (2 * 0.3 / 4) * 0.3 * (correct_lp - correct_lp.mean())
    torch.testing.assert_close(w[~wrong], expected, atol=1e-12, rtol=0)
    # the group gate switches the variance term off for the whole mixed group
    torch.testing.assert_close(online_weights("qempo", logps, mixed, 4, gate="group", **kw), reward_only)
    # an explicit `correct` overrides `rewards > 0`
    w_explicit = online_weights("qempo", logps, mixed, 4, correct=torch.ones(4, dtype=torch.bool), **kw)
    torch.testing.assert_close(w_explicit, online_weights("qempo", logps, mixed, 4, gate="none", **kw))


def test_online_bad_input_names_argument():
    logps, rewards, ref = _online_batch(groups=2)
    with pytest.raises(ValueError, match="group_size"):
        online_weights("qempo", logps[:7], rewards[:7], 4, beta=0.1)
    with pytest.raises(ValueError, match="rewards"):
        online_weights("qempo", logps, rewards[:4], 4, beta=0.1)
    with pytest.raises(ValueError, match="ref_logps"):
        online_weights("qempo_kl", logps, rewards, 4, ref_logps=ref[:4], beta1=0.1, beta2=0.1)
    with pytest.raises(ValueError, match="ref_logps"):
        online_weights("gvpo", logps, rewards, 4, beta=0.1)
    bad = logps.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="logps"):
        online_objective("qempo", bad, rewards, 4, beta=0.1)
    with pytest.raises(ValueError, match="gate"):
        online_weights("qempo", logps, rewards, 4, gate="always", beta=0.1)
    with pytest.raises(ValueError, match="advantage"):
        online_weights("qempo", logps, rewards, 4, advantage="rloo", beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        online_weights("qempo", logps, rewards, 4)


def test_math_core_imports_no_frameworks():
    code = ("import sys, qempo_lite.losses, qempo_lite.theory; "
            "bad = [m for m in ('trl', 'transformers', 'peft', 'vllm') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_method_registry_is_the_one_table_every_layer_reads(tmp_path):
    """A method registered once is known to the losses, the theory, both configs and the model card."""
    from qempo_lite import methods
    from qempo_lite.hub import _method_text
    from qempo_lite.losses import offline_coefficients
    from qempo_lite.offline import QEMPOConfig
    from qempo_lite.theory import optimal_policy

    toy = methods.Method("toy", ("offline",), {"beta": 0.5}, policy_coef=lambda k: 2 * k["beta"],
                         ref_coef=lambda k: k["beta"], title="a test method", card_text="Toy card text.")
    methods.register_method(toy)
    try:
        assert "toy" in methods.method_names("offline") and "toy" not in methods.method_names("online")
        assert offline_coefficients("toy", beta=0.5) == (1.0, 0.5)
        rewards, ref = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
        expected = torch.softmax(rewards / 1.0 + 0.5 * torch.log(ref.double()), 0)
        torch.testing.assert_close(optimal_policy("toy", rewards, ref, beta=0.5), expected.double())
        assert _method_text("toy") == "Toy card text."
        with pytest.raises(ValueError, match="takes beta, not beta1"):
            methods.loss_coefficients("toy", {"beta": 0.5, "beta1": 1.0})
        # The trainers' configs validate against the registry, not a list of their own.
        config = QEMPOConfig(output_dir=str(tmp_path), loss_method="toy", use_cpu=True, bf16=False)
        assert config.coefficients() == {"beta": 0.5}
        with pytest.raises(ValueError, match="alpha is not a coefficient of loss_method toy"):
            QEMPOConfig(output_dir=str(tmp_path), loss_method="toy", alpha=1.0, use_cpu=True, bf16=False)
        with pytest.raises(ValueError, match="already registered"):
            methods.register_method(toy)
    finally:
        methods._REGISTRY.pop("toy")


def test_math_core_imports_only_the_registry_from_the_package():
    code = ("import sys, qempo_lite.losses, qempo_lite.theory; "
            "print(sorted(m for m in sys.modules if m.startswith('qempo_lite')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "['qempo_lite', 'qempo_lite.losses', 'qempo_lite.methods', 'qempo_lite.theory']"
