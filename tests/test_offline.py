"""QEMPOTrainer on a tiny real Llama: the loss family through TRL's DPO path, LoRA and QLoRA."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from qempo_lite.errors import QempoError
from qempo_lite.losses import OFFLINE_METHODS, offline_coefficients, offline_loss
from qempo_lite.models import load_policy
from qempo_lite.offline import QEMPOConfig, QEMPOTrainer, check_trl_compatibility

# Larger than the paper's coefficients so that a few steps on a toy set move the loss visibly.
COEFS = {
    "qempo": {"beta": 0.1},
    "qempo_kl": {"beta1": 0.05, "beta2": 0.1},
    "dpo": {"beta": 0.1},
    "spl": {"alpha": 0.2, "beta": 0.1},
}

# Separable: the chosen answers are short colour words, the rejected ones unrelated sentences.
TOY = [
    ("Name a colour.", "Red.", "The quick brown fox jumps over the lazy dog."),
    ("Name a colour.", "Blue.", "Numbers: 7 8 9 10 11 12."),
    ("Tell me one colour.", "Green.", "I like apples and bananas."),
    ("Tell me one colour.", "Yellow.", "Write a short poem about the sea."),
    ("Name a colour.", "Purple.", "Hello! How can I help you today?"),
    ("Name a colour.", "Orange.", "The answer is 5."),
    ("Tell me one colour.", "Red.", "Please answer the question in one word."),
    ("Tell me one colour.", "Blue.", "The lazy dog jumps over the quick brown fox."),
]


def toy_pairs():
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}],
         "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for p, c, r in TOY
    ])


def training_settings(output_dir, **overrides) -> dict:
    """TrainingArguments for seconds-long CPU runs (shared by our config and stock TRL's)."""
    settings = dict(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=5e-3, lr_scheduler_type="constant", max_length=64, bf16=False, use_cpu=True,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return settings


def make_config(tmp_path, method, **overrides) -> QEMPOConfig:
    return QEMPOConfig(loss_method=method, **COEFS[method], **training_settings(tmp_path / f"run-{method}", **overrides))


def make_trainer(model_dir, config, *, quantization=None, peft=True, model=None, with_eval=True):
    loaded, tokenizer, peft_config = load_policy(str(model_dir), quantization=quantization, lora_r=8,
                                                 lora_alpha=16, lora_dropout=0.0)
    return QEMPOTrainer(model=model if model is not None else loaded, args=config, train_dataset=toy_pairs(),
                        eval_dataset=toy_pairs() if with_eval else None, processing_class=tokenizer,
                        peft_config=peft_config if peft else None)


def summed_logps(model, batch):
    """Completion log-probs from the model's plain logits, independent of TRL's fused head."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    token_logp = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    entropy = -(logp.exp() * logp).sum(-1)
    mean_entropy = (entropy * mask).sum() / mask.sum()
    chosen, rejected = (token_logp * mask).sum(1).chunk(2)
    return chosen, rejected, mean_entropy


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


# ----------------------------------------------------------------------------------- TRL guard


def test_trl_still_has_what_qempo_trainer_relies_on():
    check_trl_compatibility()


def test_trl_guard_fails_loudly_when_a_relied_on_method_changes(monkeypatch):
    from trl import DPOTrainer

    def _compute_loss(self, model, inputs):  # a changed signature, as a TRL refactor might leave it
        raise AssertionError

    monkeypatch.setattr(DPOTrainer, "_compute_loss", _compute_loss)
    with pytest.raises(RuntimeError, match=r"DPOTrainer\._compute_loss signature changed"):
        check_trl_compatibility()


# ----------------------------------------------------------------------------------- config


@pytest.mark.parametrize("method, a, c", [("qempo", 4e-3, 0.0), ("qempo_kl", 1.4e-2, 1e-2), ("dpo", 1e-2, 1e-2),
                                          ("spl", 2e-2, 1e-2)])
def test_config_defaults_are_the_paper_coefficients(tmp_path, method, a, c):
    config = QEMPOConfig(output_dir=str(tmp_path), loss_method=method, use_cpu=True)
    got_a, got_c = offline_coefficients(method, **config.coefficients())
    assert got_a == pytest.approx(a) and got_c == pytest.approx(c)


@pytest.mark.parametrize("overrides, match", [
    ({"loss_method": "ipo"}, "loss_method must be one of"),
    ({"loss_method": "dpo", "beta": -1.0}, "beta must be a positive"),
    ({"loss_method": "dpo", "loss_type": ["hinge"]}, "loss_type must be 'sigmoid'"),
    ({"loss_method": "qempo", "f_divergence_type": "js_divergence"}, "dpo only"),
    ({"loss_method": "spl", "f_divergence_type": "forward_kl"}, "dpo only"),
    ({"loss_method": "qempo_kl", "f_divergence_type": "forward_kl"}, "dpo only"),
    ({"loss_method": "dpo", "f_divergence_type": "alpha_divergence"}, "not allowed with loss_method dpo"),
    ({"loss_method": "qempo", "use_weighting": True}, "use_weighting"),
    ({"loss_method": "qempo_kl", "ld_alpha": 0.5}, "ld_alpha"),
])
def test_config_refuses_what_is_not_in_the_family(tmp_path, overrides, match):
    with pytest.raises(QempoError, match=match):
        QEMPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


@pytest.mark.parametrize("divergence", ["js_divergence", "forward_kl"])
def test_config_takes_trls_f_divergence_for_dpo(tmp_path, divergence):
    config = QEMPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_method="dpo", f_divergence_type=divergence)
    assert config.f_divergence_type == divergence


def test_trainer_refuses_a_plain_dpo_config(tiny_model_dir, tmp_path):
    from trl import DPOConfig

    model, tokenizer, peft_config = load_policy(str(tiny_model_dir))
    with pytest.raises(QempoError, match="needs a QEMPOConfig"):
        QEMPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path), use_cpu=True),
                     train_dataset=toy_pairs(), processing_class=tokenizer, peft_config=peft_config)


# ------------------------------------------------------------------------------ the loss itself


@pytest.mark.parametrize("method", OFFLINE_METHODS)
def test_loss_and_logged_metrics_equal_offline_loss_on_the_same_logps(tiny_model_dir, tmp_path, method):
    trainer = make_trainer(tiny_model_dir, make_config(tmp_path, method))
    # A fresh adapter is the identity (lora_B = 0); perturb it so policy and reference differ.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    batch = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        chosen, rejected, entropy = summed_logps(trainer.model, batch)
        with trainer.model.disable_adapter():
            ref_chosen, ref_rejected, _ = summed_logps(trainer.model, batch)
        loss = trainer.compute_loss(trainer.model, batch)
    expected = offline_loss(method, chosen, rejected, ref_chosen, ref_rejected, **COEFS[method]).mean()
    assert abs(chosen - ref_chosen).max() > 0.1  # the reference really differs from the policy
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)

    a, c = offline_coefficients(method, **COEFS[method])
    metrics = {key: values[-1] for key, values in trainer._metrics["eval"].items()}
    reward_chosen, reward_rejected = a * chosen - c * ref_chosen, a * rejected - c * ref_rejected
    assert metrics["rewards/chosen"] == pytest.approx(reward_chosen.mean().item(), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx((reward_chosen - reward_rejected).mean().item(), abs=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-4)
    assert metrics["logps/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-4)
    assert metrics["entropy"] == pytest.approx(entropy.item(), abs=1e-4)


# ------------------------------------------------------------------------------ reference use


def _count_calls(monkeypatch, counts: Counter, model):
    """Count backbone forwards (and their batch sizes), adapter disabling, and TRL reference passes."""
    from peft import PeftModel
    from trl import DPOTrainer

    disable_adapter = PeftModel.disable_adapter
    stock_reference = DPOTrainer.compute_ref_log_probs

    def counting_disable_adapter(self):
        counts["disable_adapter"] += 1
        return disable_adapter(self)

    def counting_reference(self, model, inputs):
        counts["reference_pass"] += 1
        return stock_reference(self, model, inputs)

    monkeypatch.setattr(PeftModel, "disable_adapter", counting_disable_adapter)
    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", counting_reference)

    def on_forward(module, args, kwargs, output):
        counts["forward"] += 1
        counts[f"rows={kwargs['input_ids'].shape[0]}"] += 1

    model.model.register_forward_hook(on_forward, with_kwargs=True)


@pytest.mark.parametrize("method, peft, precompute, init_forwards, forwards_per_step, disables_per_step", [
    ("qempo", True, False, 0, 1, 0),
    ("qempo", False, False, 0, 1, 0),       # a full model: still no reference copy, no reference pass
    ("dpo", True, False, 0, 2, 1),          # control: the counters do see a reference
    ("qempo_kl", True, True, 2, 1, 0),      # precomputed once (2 batches of 4 pairs), then one forward a step
])
def test_reference_forwards(tiny_model_dir, tmp_path, monkeypatch, method, peft, precompute, init_forwards,
                            forwards_per_step, disables_per_step):
    from transformers import AutoModelForCausalLM

    steps = 3
    counts: Counter = Counter()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    _count_calls(monkeypatch, counts, model)
    config = make_config(tmp_path, method, max_steps=steps, precompute_ref_log_probs=precompute)
    trainer = make_trainer(tiny_model_dir, config, peft=peft, model=model, with_eval=False)
    assert trainer.ref_model is None
    assert counts["forward"] == init_forwards
    trainer.train()
    assert counts["forward"] == init_forwards + forwards_per_step * steps
    assert counts["rows=8"] == counts["forward"]  # chosen and rejected of 4 pairs in one forward
    assert counts["disable_adapter"] == init_forwards + disables_per_step * steps
    if method == "qempo":
        assert counts["reference_pass"] == 0


def _first_step_losses(trainer, steps=1):
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:steps]


def test_precomputed_reference_gives_the_on_the_fly_loss(tiny_model_dir, tmp_path):
    on_the_fly = make_trainer(tiny_model_dir, make_config(tmp_path / "a", "qempo_kl", max_steps=1))
    precomputed = make_trainer(tiny_model_dir, make_config(tmp_path / "b", "qempo_kl", max_steps=1,
                                                           precompute_ref_log_probs=True))
    assert "ref_chosen_logps" in precomputed.train_dataset.column_names
    assert "ref_chosen_logps" not in on_the_fly.train_dataset.column_names
    first, = _first_step_losses(on_the_fly)
    second, = _first_step_losses(precomputed)
    assert first == pytest.approx(second, abs=1e-5)
    assert first != pytest.approx(0.6931, abs=1e-3)  # qempo_kl starts off log 2: the reference term matters


@pytest.mark.parametrize("method", ["qempo_kl", "qempo"])
def test_a_dataset_tokenized_with_its_reference_trains_as_the_precompute_pass_does(tiny_model_dir, tmp_path, method):
    from datasets import Dataset
    from trl import DPOTrainer

    precomputed = make_trainer(tiny_model_dir, make_config(tmp_path / "a", "qempo_kl", max_steps=2,
                                                           precompute_ref_log_probs=True), with_eval=False)
    tokenized = Dataset.from_list(precomputed.train_dataset.to_list())  # as the real-model demo reuses it
    assert "ref_chosen_logps" in tokenized.column_names
    config = make_config(tmp_path / "b", method, max_steps=2)
    loaded, tokenizer, peft_config = load_policy(str(tiny_model_dir), lora_r=8, lora_alpha=16, lora_dropout=0.0)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the tokenized dataset was tokenized again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DPOTrainer, "_prepare_dataset", no_tokenizing)
        given = QEMPOTrainer(model=loaded, args=config, train_dataset=tokenized, processing_class=tokenizer,
                             peft_config=peft_config)

    def no_reference_pass(model, inputs):
        raise AssertionError("the dataset's reference log-probs were computed again")

    given.compute_ref_log_probs = no_reference_pass
    ours = _first_step_losses(given, steps=2)
    expected = make_trainer(tiny_model_dir, make_config(tmp_path / "c", method, max_steps=2,
                                                        precompute_ref_log_probs=True), with_eval=False)
    assert ours == pytest.approx(_first_step_losses(expected, steps=2), abs=1e-6)


def test_a_dataset_with_reference_log_probs_is_not_scored_again_by_a_precompute_pass(tiny_model_dir, tmp_path):
    precomputed = make_trainer(tiny_model_dir, make_config(tmp_path / "a", "dpo", max_steps=1,
                                                           precompute_ref_log_probs=True), with_eval=False)
    loaded, tokenizer, peft_config = load_policy(str(tiny_model_dir), lora_r=8, lora_alpha=16, lora_dropout=0.0)
    with pytest.raises(QempoError, match=r"already holds the reference's log-probs .*precompute_ref_log_probs=False"):
        QEMPOTrainer(model=loaded, args=make_config(tmp_path / "b", "dpo", precompute_ref_log_probs=True),
                     train_dataset=precomputed.train_dataset, processing_class=tokenizer, peft_config=peft_config)


def test_dpo_matches_stock_trl_dpo_trainer(tiny_model_dir, tmp_path):
    from trl import DPOConfig, DPOTrainer

    config = make_config(tmp_path / "ours", "dpo", max_steps=2)
    ours = _first_step_losses(make_trainer(tiny_model_dir, config, with_eval=False), steps=2)
    stock_config = DPOConfig(beta=COEFS["dpo"]["beta"], **training_settings(tmp_path / "stock", max_steps=2))
    model, tokenizer, peft_config = load_policy(str(tiny_model_dir), lora_r=8, lora_alpha=16, lora_dropout=0.0)
    stock = DPOTrainer(model=model, args=stock_config, train_dataset=toy_pairs(), processing_class=tokenizer,
                       peft_config=peft_config)
    theirs = _first_step_losses(stock, steps=2)
    assert ours == pytest.approx(theirs, abs=1e-6)  # step 2 also checks the gradients of step 1 matched


@pytest.mark.parametrize("divergence, precompute", [("js_divergence", False), ("forward_kl", True)])
def test_dpo_with_an_f_divergence_matches_stock_trl_f_dpo(tiny_model_dir, tmp_path, divergence, precompute):
    from trl import DPOConfig, DPOTrainer

    settings = dict(max_steps=3, precompute_ref_log_probs=precompute)
    config = make_config(tmp_path / "ours", "dpo", f_divergence_type=divergence, **settings)
    ours = _first_step_losses(make_trainer(tiny_model_dir, config, with_eval=False), steps=3)
    stock_config = DPOConfig(beta=COEFS["dpo"]["beta"], f_divergence_type=divergence,
                             **training_settings(tmp_path / "stock", **settings))
    model, tokenizer, peft_config = load_policy(str(tiny_model_dir), lora_r=8, lora_alpha=16, lora_dropout=0.0)
    stock = DPOTrainer(model=model, args=stock_config, train_dataset=toy_pairs(), processing_class=tokenizer,
                       peft_config=peft_config)
    assert ours == pytest.approx(_first_step_losses(stock, steps=3), abs=1e-6)
    # The divergence is what trains: after the first step (where every f-DPO loss is log 2) reverse KL differs.
    reverse = _first_step_losses(make_trainer(tiny_model_dir, make_config(tmp_path / "rkl", "dpo", **settings),
                                              with_eval=False), steps=3)
    assert ours[0] == pytest.approx(reverse[0], abs=1e-6)
    assert abs(ours[2] - reverse[2]) > 1e-4, (ours, reverse)


# ------------------------------------------------------------------------- training, LoRA & QLoRA


@pytest.mark.parametrize("quantization, steps", [(None, 4), ("4bit", 2)])
@pytest.mark.parametrize("method", OFFLINE_METHODS)
def test_training_lowers_the_loss_and_the_adapter_reloads(tiny_model_dir, tmp_path, method, quantization, steps):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = make_trainer(tiny_model_dir, make_config(tmp_path, method, max_steps=steps),
                           quantization=quantization)
    if quantization == "4bit":
        assert trainer.model.get_base_model().is_loaded_in_4bit
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 1e-3, (before, after)
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"], (before, after)

    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    trained = get_peft_model_state_dict(trainer.model)
    for name, value in get_peft_model_state_dict(reloaded).items():
        torch.testing.assert_close(value.float(), trained[name].float().cpu())
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


# ---------------------------------------------------------------------------------- resume


def test_resume_after_a_kill_ends_where_an_uninterrupted_run_does(tiny_model_dir, tmp_path):
    from peft import get_peft_model_state_dict
    from transformers import TrainerCallback

    class KillAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    # A decaying schedule: resuming must restore the optimizer, scheduler and data position, not just weights.
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear")
    straight = make_trainer(tiny_model_dir, make_config(tmp_path / "straight", "qempo", **settings))
    straight.train()

    killed = make_trainer(tiny_model_dir, make_config(tmp_path / "killed", "qempo", **settings))
    killed.add_callback(KillAfterStep2())
    killed.train()
    assert killed.state.global_step == 2
    resumed = make_trainer(tiny_model_dir, make_config(tmp_path / "killed", "qempo", **settings))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4

    expected = get_peft_model_state_dict(straight.model)
    got = get_peft_model_state_dict(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    interrupted = get_peft_model_state_dict(killed.model)
    assert any((interrupted[n] - expected[n]).abs().max() > 1e-4 for n in expected)  # steps 3-4 did change it
