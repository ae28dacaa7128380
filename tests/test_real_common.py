"""What the real-model demos share: each method trains from the same random state, whatever ran before it."""

import json

import torch

from qempo_lite.demo.real_common import train_seeded


def _lora_init(tiny_model_dir):
    """A function training nothing: it wraps the tiny model in a fresh LoRA and records lora_A's initial values."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def train(name, adapter):
        policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        adapter.mkdir(parents=True, exist_ok=True)
        first = next(p for n, p in policy.named_parameters() if "lora_A" in n)
        (adapter / "init.json").write_text(json.dumps(first.detach().flatten()[:16].tolist()))

    return train


def test_a_method_trains_the_same_whichever_methods_ran_before_it(tiny_model_dir, tmp_path):
    train = _lora_init(tiny_model_dir)
    train_seeded(train, "first", tmp_path / "first", seed=3)
    torch.rand(10_000)  # what an earlier method's training and sampling would have drawn
    train_seeded(train, "second", tmp_path / "second", seed=3)
    first, second = (json.loads((tmp_path / m / "init.json").read_text()) for m in ("first", "second"))
    assert first == second
    assert json.loads((tmp_path / "second" / "train_seconds.json").read_text())["seconds"] >= 0
    # Without the seeding, the same draws before a method change its LoRA initialisation.
    torch.rand(10_000)
    train("unseeded", tmp_path / "unseeded")
    assert json.loads((tmp_path / "unseeded" / "init.json").read_text()) != first
