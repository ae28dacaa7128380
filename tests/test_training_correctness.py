"""What the trainers accept is exactly what they train: refusals, evaluation data, dropped rows, references."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from trl import DPOConfig

from qempo_lite import trl_fields
from qempo_lite.errors import QempoError
from qempo_lite.offline import QEMPOConfig, QEMPOTrainer
from qempo_lite.runs import checkpoint_problem
from qempo_lite.train_cli import OfflineRunArgs, load_eval_pairs
from qempo_lite.online import QEMPOOnlineConfig
from qempo_lite.trl_fields import refuse_unlisted_fields

from test_offline import make_config, make_trainer, toy_pairs, training_settings

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "tests" / "data" / "offline_tiny_prefs.jsonl"


# ------------------------------------------------------------------ offline: settings refused


@pytest.mark.parametrize("overrides, fragment", [
    ({"loss_weights": [0.0]}, "loss_weights"),
    ({"label_smoothing": 0.1}, "label_smoothing"),
    ({"sync_ref_model": True}, "sync_ref_model"),
    ({"use_liger_kernel": True}, "use_liger_kernel"),
    ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ({"model_init_kwargs": {"dtype": "float16"}}, "model_init_kwargs"),
    ({"discopop_tau": 0.1}, "discopop_tau"),
    ({"padding_free": True}, "padding_free"),
    ({"truncation_mode": "keep_middle"}, "truncation_mode"),
    ({"max_length": 1}, "max_length"),
])
def test_offline_settings_that_change_the_objective_are_refused(tmp_path, overrides, fragment):
    with pytest.raises(QempoError, match=fragment) as err:
        make_config(tmp_path, "qempo", **overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method, coefficients, fragment", [
    ("qempo_kl", {"beta": 0.1}, "beta is not a coefficient of loss_method qempo_kl"),
    ("dpo", {"beta": 0.1, "alpha": 0.2}, "alpha is not a coefficient of loss_method dpo"),
    ("dpo", {"beta": 0.1, "beta1": 0.2}, "beta1 is not a coefficient"),
    ("qempo", {"beta": 0.1, "beta2": 0.2}, "beta2 is not a coefficient"),
    ("spl", {"alpha": 0.2, "beta": 0.1, "beta1": 0.1}, "beta1 is not a coefficient"),
])
def test_coefficients_of_another_method_are_refused(tmp_path, method, coefficients, fragment):
    with pytest.raises(QempoError, match=fragment):
        QEMPOConfig(loss_method=method, **coefficients, **training_settings(tmp_path))


def test_allowed_settings_at_their_defaults_or_changed_are_accepted(tmp_path):
    config = make_config(tmp_path, "qempo", loss_type="sigmoid", label_smoothing=0.0, weight_decay=0.1,
                         optim="adamw_torch", warmup_steps=2, eval_strategy="no")
    assert config.weight_decay == 0.1 and config.loss_type == ["sigmoid"]


def test_a_field_added_by_a_future_trl_is_refused_by_default(tmp_path):
    @dataclasses.dataclass
    class FutureDPOConfig(DPOConfig):
        brand_new_knob: float = 0.0

    refuse_unlisted_fields(FutureDPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True), FutureDPOConfig, trl_fields.DPO, "QEMPOConfig")
    with pytest.raises(QempoError, match="brand_new_knob=1.0 is not accepted"):
        refuse_unlisted_fields(FutureDPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, brand_new_knob=1.0), FutureDPOConfig,
                               trl_fields.DPO, "QEMPOConfig")


# ------------------------------------------------------------------ offline: evaluation data


def test_a_local_file_has_no_splits(tmp_path):
    with pytest.raises(QempoError, match="eval_fraction"):
        OfflineRunArgs(dataset=str(PAIRS), eval_split="test")
    with pytest.raises(QempoError, match="has no splits"):
        OfflineRunArgs(dataset=str(PAIRS), dataset_split="test")
    with pytest.raises(QempoError, match="is the training split"):
        OfflineRunArgs(dataset="org/prefs", eval_split="train")
    with pytest.raises(QempoError, match="between 0 and 1"):
        OfflineRunArgs(dataset=str(PAIRS), eval_fraction=1.0)


def test_eval_fraction_holds_out_pairs_never_trained_on(tmp_path):
    from qempo_lite.data import load_preferences

    everything = load_preferences(str(PAIRS))
    run_args = OfflineRunArgs(dataset=str(PAIRS), eval_fraction=0.25)
    train, evaluation, described = load_eval_pairs(run_args, everything, seed=3)
    key = lambda row: json.dumps([row["prompt"], row["chosen"], row["rejected"]])  # noqa: E731
    assert len(train) + len(evaluation) == len(everything) and len(evaluation) == 3
    assert not {key(r) for r in train} & {key(r) for r in evaluation}
    assert described == {"held_out_fraction": 0.25, "seed": 3, "rows": 3, "duplicates": 0}
    # Seeded: the same split again.
    assert [key(r) for r in load_eval_pairs(run_args, everything, seed=3)[1]] == [key(r) for r in evaluation]


def test_an_eval_file_is_read_as_its_own_data(tmp_path):
    from qempo_lite.data import load_preferences

    other = tmp_path / "eval.jsonl"
    other.write_text("".join(line + "\n" for line in PAIRS.read_text().splitlines()[:5]))
    run_args = OfflineRunArgs(dataset=str(PAIRS), eval_dataset=str(other))
    train, evaluation, described = load_eval_pairs(run_args, load_preferences(str(PAIRS)), seed=0)
    assert len(train) == 12 and len(evaluation) == 5
    assert described == {"dataset": str(other), "split": None, "rows": 5, "skipped": 0, "also_in_training": 5}


def test_trls_explicit_prompt_conversational_rows_are_accepted(tmp_path, tiny_model_dir):
    from qempo_lite.data import load_preferences

    rows = tmp_path / "explicit.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in toy_pairs()))
    loaded = load_preferences(str(rows))
    assert loaded[0]["prompt"] == [{"role": "user", "content": "Name a colour."}]
    assert loaded[0]["chosen"] == [{"role": "assistant", "content": "Red."}]
    # The loader's own output, read back, is the same data.
    again = tmp_path / "again.jsonl"
    again.write_text("".join(json.dumps(row) + "\n" for row in loaded))
    assert load_preferences(str(again)).to_list() == loaded.to_list()


# ------------------------------------------------------------------ offline: what TRL drops, which reference


def test_pairs_dropped_for_length_are_counted(tmp_path, tiny_model_dir):
    from datasets import Dataset

    long_prompt = " ".join(["colour"] * 80)
    rows = toy_pairs().to_list() + [
        {"prompt": [{"role": "user", "content": long_prompt}], "chosen": [{"role": "assistant", "content": "Red."}],
         "rejected": [{"role": "assistant", "content": "No."}]}] * 3
    config = make_config(tmp_path, "qempo", max_length=48)
    from qempo_lite.models import load_policy

    model, tokenizer, peft_config = load_policy(str(tiny_model_dir), lora_r=8, lora_alpha=16)
    trainer = QEMPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                           eval_dataset=Dataset.from_list(rows[-2:]), processing_class=tokenizer,
                           peft_config=peft_config)
    assert trainer.dropped_for_length == {"train": 3, "eval": 2}
    assert len(trainer.train_dataset) == len(toy_pairs())


def test_qempo_keeps_no_reference_adapter_of_a_starting_peft_model(tmp_path, tiny_model_dir):
    from peft import get_peft_model

    from qempo_lite.models import load_policy

    for method, keeps_ref in (("qempo", False), ("dpo", True)):
        model, tokenizer, peft_config = load_policy(str(tiny_model_dir), lora_r=8, lora_alpha=16)
        peft_model = get_peft_model(model, peft_config)
        trainer = QEMPOTrainer(model=peft_model, args=make_config(tmp_path, method), train_dataset=toy_pairs(),
                               processing_class=tokenizer)
        # dpo: TRL's frozen copy of the starting adapter is the reference (as documented); qempo needs none.
        assert ("ref" in trainer.model.peft_config) is keeps_ref


def test_evaluate_on_a_new_dataset_after_training_qempo_on_a_full_model(tmp_path, tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, make_config(tmp_path, "qempo", max_steps=1), peft=False, with_eval=False)
    trainer.train()
    metrics = trainer.evaluate(toy_pairs())
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_metadata_records_the_dropout_actually_applied(tmp_path, tiny_model_dir):
    from qempo_lite.runs import ModelArgs, lora_metadata

    model_args = ModelArgs(model_name_or_path=str(tiny_model_dir), lora_dropout=0.1)
    assert lora_metadata(model_args, make_config(tmp_path, "qempo"))["dropout"] == 0.0  # TRL's disable_dropout
    assert lora_metadata(model_args, make_config(tmp_path, "qempo", disable_dropout=False))["dropout"] == 0.1


# ------------------------------------------------------------------ online: settings refused


def _online(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, max_steps=1,
                    bf16=False, use_cpu=True, report_to=[])
    settings.update(overrides)
    return QEMPOOnlineConfig(**settings)


@pytest.mark.parametrize("overrides, fragment", [
    ({"num_iterations": 2}, "num_iterations"),
    ({"steps_per_generation": 2}, "steps_per_generation=2 spans several optimizer steps"),
    ({"generation_batch_size": 8}, "spans several optimizer steps"),
    ({"num_generations_eval": 1}, "num_generations_eval must be at least 2"),
    ({"generation_kwargs": {"top_k": 5}}, "generation_kwargs"),
    ({"scale_rewards": "batch"}, "scale_rewards"),
    ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
    ({"top_p": 0.9}, "top_p=0.9 samples from a truncated distribution"),
    ({"loss_method": "qempo_kl", "beta": 0.01}, "beta is not a coefficient of loss_method qempo_kl"),
    ({"loss_method": "qempo", "beta1": 0.01}, "beta1 is not a coefficient"),
    ({"loss_method": "gvpo", "beta2": 0.01}, "beta2 is not a coefficient"),
    ({"epsilon": 0.3}, "epsilon"),
    ({"cache_implementation": "static"}, "cache_implementation"),
])
def test_online_settings_that_change_the_objective_are_refused(tmp_path, overrides, fragment):
    with pytest.raises(QempoError, match=fragment) as err:
        _online(tmp_path, **overrides)
    assert "\n" not in str(err.value)


def test_online_accepts_settings_that_keep_the_objective(tmp_path):
    config = _online(tmp_path, gradient_accumulation_steps=2, steps_per_generation=1, num_generations_eval=2,
                     temperature=0.7, reward_weights=[1.0])
    assert config.steps_per_generation == 1 and config.method_args == {"beta": 4e-3}


def test_online_weights_use_the_log_probs_with_dropout_off(tmp_path, tiny_model_dir):
    from peft import LoraConfig

    from qempo_lite.models import load_tokenizer
    from qempo_lite.online import QEMPOOnlineTrainer
    from transformers import AutoModelForCausalLM

    from datasets import Dataset

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": "Name a colour."}]}] * 4)
    trainer = QEMPOOnlineTrainer(
        model=model, reward_funcs=lambda completions, **_: [1.0] * len(completions),
        args=_online(tmp_path, max_completion_length=4), train_dataset=prompts, processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, target_modules="all-linear",
                               init_lora_weights=False))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    output = {"prompt_ids": torch.tensor([ids] * 2), "prompt_mask": torch.ones(2, len(ids), dtype=torch.long),
              "completion_ids": torch.tensor([[5, 6, 7], [8, 9, 10]]),
              "completion_mask": torch.ones(2, 3, dtype=torch.long)}
    trainer.model.train()
    first, second = trainer._sequence_logps(output), trainer._sequence_logps(output)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # two passes over the same rows agree
    assert trainer.model.training  # and training mode is back
    trainer.model.eval()
    torch.testing.assert_close(trainer._sequence_logps(output), first, rtol=0, atol=0)


# ------------------------------------------------------------------ resume: the last complete checkpoint


def _checkpoints(tmp_path, tiny_model_dir):
    from qempo_lite.cli import main

    out = tmp_path / "run"
    code = main(["train", "offline", "--config", str(ROOT / "tests" / "data" / "offline_tiny.yaml"),
                 "--model_name_or_path", str(tiny_model_dir), "--dataset", str(PAIRS), "--output_dir", str(out),
                 "--max_steps", "2", "--save_steps", "1"])
    assert code == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage, reason", [
    (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_st'), "trainer_state.json is missing or unreadable"),
    (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]), "optimizer.pt"),
    (lambda c: (c / "adapter_model.safetensors").write_bytes((c / "adapter_model.safetensors").read_bytes()[:-64]),
     "adapter_model.safetensors is truncated"),
    (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
])
def test_resume_skips_a_checkpoint_whose_save_was_cut_short(tmp_path, tiny_model_dir, capsys, damage, reason):
    from qempo_lite.cli import main

    out = _checkpoints(tmp_path, tiny_model_dir)
    assert checkpoint_problem(out / "checkpoint-2") is None
    broken = out / "checkpoint-3"
    shutil.copytree(out / "checkpoint-2", broken)
    damage(broken)
    assert reason in checkpoint_problem(broken)
    capsys.readouterr()
    code = main(["train", "offline", "--config", str(ROOT / "tests" / "data" / "offline_tiny.yaml"),
                 "--model_name_or_path", str(tiny_model_dir), "--dataset", str(PAIRS), "--output_dir", str(out),
                 "--max_steps", "3", "--save_steps", "1", "--resume"])
    assert code == 0
    assert f"skipping checkpoint-3: {reason}" in capsys.readouterr().err
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and checkpoint_problem(out / "checkpoint-3") is None
