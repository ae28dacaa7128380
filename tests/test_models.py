"""load_policy (LoRA / QLoRA on a tiny real model), tokenizer checks, and the memory plan."""

from __future__ import annotations

import glob
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from qempo_lite.errors import QempoError
from qempo_lite.models import (PAPER_MODELS, count_parameters, load_policy, memory_plan, paper_model_config,
                               quantization_config)

ROOT = Path(__file__).resolve().parents[1]


def test_lora_policy_is_the_base_model_plus_a_lora_config(tiny_model_dir):
    from peft import LoraConfig, PeftModel

    model, tokenizer, peft_config = load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0)
    assert not isinstance(model, PeftModel)  # TRL wraps it, so the reference is the adapter-disabled base
    assert isinstance(peft_config, LoraConfig)
    assert (peft_config.r, peft_config.lora_alpha, peft_config.task_type) == (4, 8, "CAUSAL_LM")
    assert model.dtype == torch.float32  # CPU default
    assert tokenizer.chat_template and tokenizer.pad_token is not None


def test_qlora_policy_is_nf4_with_double_quantisation_and_a_frozen_base(tiny_model_dir):
    import bitsandbytes as bnb
    from peft import get_peft_model

    model, _, peft_config = load_policy(str(tiny_model_dir), quantization="4bit", lora_r=4)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every linear of the 2 blocks; the LM head stays unquantised
    state = quantized[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantisation
    assert quantized[0].compute_dtype == torch.float32  # bitsandbytes' CPU path
    assert not any(p.requires_grad for p in model.parameters())
    peft_model = get_peft_model(model, peft_config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = peft_model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    out.logits.sum().backward()  # gradients flow into the adapters through the 4-bit base
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_quantization_config_computes_in_half_precision_on_gpu():
    config = quantization_config("4bit", on_gpu=True)
    assert config.bnb_4bit_compute_dtype in (torch.bfloat16, torch.float16)  # bf16 where the GPU has it
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert quantization_config(None) is None and quantization_config("none") is None


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, target)
    return target


def _edit_tokenizer_config(path: Path, **changes):
    import json

    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))


def test_missing_pad_token_becomes_eos(model_copy):
    _edit_tokenizer_config(model_copy, pad_token=None)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model_copy).pad_token is None  # the edit took
    _, tokenizer, _ = load_policy(str(model_copy))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|end|>"


def test_missing_chat_template_is_a_one_line_error_with_the_fix(model_copy):
    (model_copy / "chat_template.jinja").unlink(missing_ok=True)
    _edit_tokenizer_config(model_copy, chat_template=None)
    with pytest.raises(QempoError, match="has no chat template; use an Instruct/chat model") as err:
        load_policy(str(model_copy))
    assert "\n" not in str(err.value)


def test_pickled_only_weights_are_refused(model_copy):
    from safetensors.torch import load_file

    weights = model_copy / "model.safetensors"
    torch.save(load_file(weights), model_copy / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(QempoError, match="no file named model.safetensors"):
        load_policy(str(model_copy))


@pytest.mark.parametrize("kwargs, match", [
    ({"quantization": "3bit"}, "quantization must be 4bit, 8bit or none"),
    ({"dtype": "float8"}, "dtype must be one of"),
    ({"target_modules": "q_proj,lm_head"}, "must not include lm_head"),
    ({"lora_r": 0}, "lora_r must be a positive integer"),
])
def test_bad_arguments_are_one_line_errors(tiny_model_dir, kwargs, match):
    with pytest.raises(QempoError, match=match):
        load_policy(str(tiny_model_dir), **kwargs)


def test_unknown_model_is_a_one_line_error(tmp_path):
    with pytest.raises(QempoError, match="cannot load the tokenizer"):
        load_policy(str(tmp_path / "no-such-model"))


# ------------------------------------------------------------------------------ memory plan


def test_parameter_count_matches_a_real_model(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, billions", [
    ("Qwen/Qwen2.5-1.5B-Instruct", 1.54), ("meta-llama/Llama-3.2-1B-Instruct", 1.24),
    ("Qwen/Qwen2.5-7B-Instruct", 7.62), ("meta-llama/Llama-3.1-8B-Instruct", 8.03),
])
def test_paper_model_shapes_have_their_published_sizes(name, billions):
    # Qwen2 adds q/k/v biases (< 0.1% of the parameters), which count_parameters leaves out.
    assert count_parameters(paper_model_config(name)) / 1e9 == pytest.approx(billions, rel=0.01)


def test_memory_plan_components(tiny_model_dir):
    name = "meta-llama/Llama-3.1-8B-Instruct"
    bf16, nf4 = memory_plan(name, None, 16, 1024, 2), memory_plan(name, "4bit", 16, 1024, 2)
    params = count_parameters(paper_model_config(name))
    assert bf16.weights == pytest.approx(2 * params / 1024**3, rel=0.01)  # bf16: 2 bytes a parameter
    assert nf4.weights < bf16.weights / 2  # 4-bit linear layers
    assert nf4.lora == bf16.lora and nf4.optimizer == pytest.approx(3 * nf4.lora)  # fp32 LoRA + AdamW
    longer = memory_plan(name, "4bit", 16, 2048, 2)
    assert longer.activations > nf4.activations and longer.weights == nf4.weights
    no_checkpointing = memory_plan(name, "4bit", 16, 1024, 2, gradient_checkpointing=False)
    assert no_checkpointing.activations > 2 * nf4.activations
    assert nf4.total == pytest.approx(nf4.weights + nf4.lora + nf4.optimizer + nf4.activations + nf4.overhead)


def test_every_offline_recipe_fits_a_24_gb_card_and_says_so():
    from qempo_lite.offline import QEMPOConfig
    from qempo_lite.runs import ModelArgs
    from qempo_lite.train_cli import OfflineRunArgs
    from qempo_lite.recipe import read_yaml
    from qempo_lite.resources import package_file

    recipes = sorted(glob.glob(str(package_file("recipes", "offline") / "*.yaml")))
    assert len(recipes) == 16
    results = json.loads((ROOT / "benchmarks" / "results" / "gpu_offline.json").read_text())
    measured = {(r["model"], r["method"], r["micro_batch"]): r for r in results["rows"] if "error" not in r}
    seen = set()
    for path in recipes:
        values = read_yaml(path)
        plan = memory_plan(values["model_name_or_path"], values["quantization"], values["lora_r"],
                           values["max_length"], values["per_device_train_batch_size"],
                           gradient_checkpointing=values["gradient_checkpointing"])
        assert plan.total <= 24 * 0.93, (path, plan)  # 24 GB = 22.35 GiB
        text = Path(path).read_text()
        # The comment states the peak measured on a GPU (benchmarks/gpu_suite.py) for this model, method and batch.
        stated = re.search(r"GPU memory, measured: ([\d.]+) GB peak reserved \(([\d.]+) GB allocated\)", text)
        assert stated, path
        bench = {"qempo": "qempo", "qempo_kl": "qempo_kl+pre", "dpo": "dpo+pre", "spl": "dpo+pre"}[values["loss_method"]]
        row = measured[(values["model_name_or_path"], bench, values["per_device_train_batch_size"])]
        assert (float(stated[1]), float(stated[2])) == (round(row["peak_reserved_gb"], 1),
                                                        round(row["peak_allocated_gb"], 1)), path
        assert row["peak_reserved_gb"] < 24 and "Budget: a 24 GB card" in text, path
        assert row["seq_len"] == values["max_length"] and row["adapter"] == (
            "qlora" if values["quantization"] == "4bit" else "lora"), path
        assert values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] == 128
        assert values["model_name_or_path"] in PAPER_MODELS
        seen.add((values["model_name_or_path"], values["loss_method"]))
        assert {"model_name_or_path", "dataset", "loss_method"} <= set(values)
        assert set(values) <= {f for cls in (QEMPOConfig, ModelArgs, OfflineRunArgs)
                               for f in cls.__dataclass_fields__}
    assert len(seen) == 16
