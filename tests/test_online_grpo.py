"""``loss_method: grpo``: TRL's own GRPO loss through qempo-lite's rollouts, with TRL's anti-collapse settings."""

import math

import pytest
import torch

from qempo_lite.errors import QempoError
from qempo_lite.online import QEMPOOnlineTrainer
from test_online import K, _config, _rows, _trainer, contains_e, prompts, tokenizer  # noqa: F401 (fixtures)

ANTI_COLLAPSE = {"entropy_coef": 0.01, "use_adaptive_entropy": True, "epsilon_high": 0.28,
                 "top_entropy_quantile": 0.2}


@pytest.mark.parametrize("key, value", list(ANTI_COLLAPSE.items()))
def test_trls_anti_collapse_settings_are_for_grpo_only(tmp_path, key, value):
    assert getattr(_config(tmp_path, loss_method="grpo", **{key: value}), key) == value
    for method in ("qempo", "qempo_kl", "gvpo"):
        with pytest.raises(QempoError, match=f"{key}=") as err:
            _config(tmp_path, loss_method=method, **{key: value})
        assert "\n" not in str(err.value)


def test_grpo_takes_no_qempo_coefficient(tmp_path):
    with pytest.raises(QempoError, match="beta is not a coefficient of loss_method grpo"):
        _config(tmp_path, loss_method="grpo", beta=0.05)


@pytest.mark.slow
def test_grpo_loss_equals_stock_trl_grpo_on_the_same_batch(tiny_model_dir, tokenizer, prompts, tmp_path):
    """The same batch, the same adapter weights: the loss and its gradient are stock GRPOTrainer's."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from trl import GRPOConfig, GRPOTrainer

    shared = dict(num_generations=K, per_device_train_batch_size=K, gradient_accumulation_steps=2,
                  max_completion_length=8, max_steps=2, learning_rate=2e-2, bf16=False, report_to=[],
                  save_strategy="no", logging_steps=1, max_grad_norm=0.0, seed=0, epsilon_high=0.28,
                  entropy_coef=0.01)
    ours = _trainer(QEMPOOnlineTrainer, tiny_model_dir, tokenizer, prompts,
                    _config(tmp_path / "ours", loss_method="grpo", **shared))
    stock = _trainer(GRPOTrainer, tiny_model_dir, tokenizer, prompts,
                     GRPOConfig(output_dir=str(tmp_path / "stock"), use_cpu=True, **shared))
    # A non-zero adapter (B = 0 at initialisation would make both losses trivially alike), copied to both.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in ours.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    set_peft_model_state_dict(stock.model, get_peft_model_state_dict(ours.model))
    ours.model.train()
    stock.model.train()
    batch = ours._generate_and_score_completions([prompts[i] for i in range(2) for _ in range(K)])
    assert "qempo_weights" not in batch  # TRL's scoring, not qempo's weights
    rewards = torch.tensor(contains_e([[{"role": "assistant", "content": tokenizer.decode(c, skip_special_tokens=True)}]
                                       for _, c in _rows(batch)])).view(-1, K)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(batch["advantages"].view(-1, K), expected, rtol=1e-5, atol=1e-5)
    losses, grads = [], []
    for trainer in (ours, stock):
        trainer.current_gradient_accumulation_steps = 2  # set by the training loop, read by TRL's loss
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for n, p in trainer.model.named_parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.slow
def test_grpo_with_adaptive_entropy_trains_end_to_end(tiny_model_dir, tokenizer, prompts, tmp_path):
    args = _config(tmp_path, loss_method="grpo", use_adaptive_entropy=True, entropy_target=10.0)
    trainer = _trainer(QEMPOOnlineTrainer, tiny_model_dir, tokenizer, prompts, args)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss"]) for entry in logged)
    # The entropy is far below the target of 10 nats, so TRL's controller raised its coefficient.
    assert any(entry.get("entropy_coef", 0) > 0 for entry in logged), logged


@pytest.mark.slow
def test_clip_higher_changes_nothing_when_each_batch_is_used_once(tiny_model_dir, tokenizer, prompts, tmp_path):
    """On-policy (num_iterations 1, one optimizer step per generation batch, which qempo-lite's runs keep), the
    ratio π/π_old is exactly 1, so no clipping bound binds: DAPO's epsilon_high gives GRPO's loss and gradient."""
    args = _config(tmp_path, loss_method="grpo", epsilon_high=0.28)
    trainer = _trainer(QEMPOOnlineTrainer, tiny_model_dir, tokenizer, prompts, args)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    batch = trainer._generate_and_score_completions([prompts[i] for i in range(2) for _ in range(K)])
    results = []
    for high in (0.28, trainer.epsilon_low):
        trainer.epsilon_high = high
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters()
                                                  if p.grad is not None])))
    assert trainer.epsilon_low == 0.2 and results[0][1].abs().sum() > 0
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
