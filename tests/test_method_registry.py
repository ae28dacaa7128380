"""A method is one registration: a new coefficient name and a new loss, trained offline and online, no other file.

The method registered here, ``ipo_test``, is outside the two-coefficient family: offline it is
IPO's squared loss ``(Δlog(π/π_ref) − 1/(2τ))²`` and online a group objective of our own,
``J = mean_groups[ mean_i(A_i ℓ_i) − τ · mean_i((ℓ_i − ℓref_i)²) ]``, both with a coefficient
``tau`` that no built-in method has. Everything below goes through the public trainers and
configs, which know nothing of it but what :func:`qempo_lite.methods.register_method` gave them.
"""

from __future__ import annotations

import pytest
import torch

from qempo_lite import methods
from qempo_lite.errors import QempoError

TAU = 0.3


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, *, tau):
    return ((chosen - rejected) - (ref_chosen - ref_rejected) - 1.0 / (2.0 * tau)) ** 2


def anchored_objective(logps, rewards, group_size, *, ref_logps, correct, gate, advantage, tau):
    l, r, lref = logps.view(-1, group_size), rewards.view(-1, group_size).to(logps.dtype), ref_logps.view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    return ((centred * l).mean(dim=1) - tau * ((l - lref) ** 2).mean(dim=1)).mean()


@pytest.fixture
def ipo_method():
    method = methods.register_method(methods.Method(
        "ipo_test", ("offline", "online"), {"tau": 0.1}, title="IPO (a test method)", meanings={"tau": "IPO's τ"},
        card_text="IPO card text.", offline_loss=ipo_loss, online_objective=anchored_objective, uses_reference=True))
    yield method
    methods.unregister_method("ipo_test")


def test_a_method_outside_the_family_must_bring_its_loss():
    with pytest.raises(ValueError, match="give its offline_loss"):
        methods.register_method(methods.Method("lossless", ("offline",), {"tau": 1.0}))
    assert "lossless" not in methods.method_names()


def test_its_coefficient_is_configured_checked_and_recorded(ipo_method, tmp_path):
    from qempo_lite.configs import QEMPOConfig, QEMPOOnlineConfig
    from qempo_lite.hub import _method_text

    config = QEMPOConfig(output_dir=str(tmp_path), loss_method="ipo_test", method_args={"tau": TAU}, use_cpu=True)
    assert config.coefficients() == {"tau": TAU} and config.method_settings.needs_reference
    assert QEMPOConfig(output_dir=str(tmp_path), loss_method="ipo_test", use_cpu=True).method_args == {"tau": 0.1}
    online = QEMPOOnlineConfig(output_dir=str(tmp_path), loss_method="ipo_test", method_args={"tau": TAU}, bf16=False)
    assert online.coefficients() == {"tau": TAU} and online.beta == 0.0  # TRL's KL coefficient untouched
    for bad, message in (({"gamma": 1.0}, "takes tau, not gamma"), ({"tau": -1.0}, "tau must be a positive")):
        with pytest.raises(QempoError, match=message):
            QEMPOConfig(output_dir=str(tmp_path), loss_method="ipo_test", method_args=bad, use_cpu=True)
    with pytest.raises(QempoError, match="beta is not a coefficient of loss_method ipo_test"):
        QEMPOConfig(output_dir=str(tmp_path), loss_method="ipo_test", beta=0.1, use_cpu=True)
    assert _method_text("ipo_test") == "IPO card text."
    assert "tau" in methods.coefficient_names("online")


def test_it_trains_offline_with_its_own_loss(ipo_method, tiny_model_dir, tmp_path):
    from test_offline import first_batch, make_trainer, summed_logps, training_settings

    from qempo_lite.configs import QEMPOConfig

    config = QEMPOConfig(loss_method="ipo_test", method_args={"tau": TAU}, **training_settings(tmp_path / "run"))
    trainer = make_trainer(tiny_model_dir, config, with_eval=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        chosen, rejected, _ = summed_logps(model, batch)
        with model.disable_adapter():
            ref_chosen, ref_rejected, _ = summed_logps(model, batch)
    # The loss the trainer minimises is the registered one, on the policy's and the base model's log-probs.
    torch.testing.assert_close(loss, ipo_loss(chosen, rejected, ref_chosen, ref_rejected, tau=TAU).mean(),
                               rtol=1e-4, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == config.max_steps
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "no adapter weight changed"
    history = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(history) == config.max_steps and all(torch.isfinite(torch.tensor(history)))


def test_it_trains_online_with_weights_from_its_own_objective(ipo_method, tiny_model_dir, tmp_path):
    from datasets import Dataset
    from test_online import K, _config, _trainer
    from transformers import AutoTokenizer

    from qempo_lite.online import QEMPOOnlineTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_rows = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Name a colour, number {i}."}]
                                                for i in range(8)]})
    args = _config(tmp_path, loss_method="ipo_test", method_args={"tau": TAU}, beta=None)
    trainer = _trainer(QEMPOOnlineTrainer, tiny_model_dir, tokenizer, prompt_rows, args)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    scored = trainer.last_scored
    assert scored["ref_logps"] is not None and trainer.ref_logp_calls == args.max_steps
    # w = ∂J/∂ℓ of the registered objective, recomputed here by hand: w_i = (A_i − 2τ(ℓ_i − ℓref_i)) / (G k).
    l, lref, r = scored["logps"].double(), scored["ref_logps"].double(), scored["rewards"].double()
    groups = l.numel() // K
    centred = (r.view(-1, K) - r.view(-1, K).mean(dim=1, keepdim=True)).reshape(-1)
    expected = (centred - 2 * TAU * (l - lref)) / (groups * K)
    torch.testing.assert_close(scored["weights"].double(), expected, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_its_loss_is_checked_like_the_familys(ipo_method):
    from qempo_lite.losses import offline_loss

    chosen, rejected = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.0])
    with pytest.raises(ValueError, match="needs reference log-probs"):
        offline_loss("ipo_test", chosen, rejected, tau=TAU)
    with pytest.raises(ValueError, match="takes tau, not beta"):
        offline_loss("ipo_test", chosen, rejected, chosen, rejected, beta=0.1)
    ref = torch.tensor([-3.5, -1.5])
    torch.testing.assert_close(offline_loss("ipo_test", chosen, rejected, ref, ref, tau=TAU),
                               ((chosen - rejected) - 1 / (2 * TAU)) ** 2)
