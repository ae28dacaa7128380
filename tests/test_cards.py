"""The model card written with every saved adapter folder (final and checkpoints), and the one a push publishes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_adapter

from qempo_lite.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "tests" / "data" / "offline_tiny.yaml"
TEMPLATE_LEFTOVERS = ("None", "More Information Needed", "Model Card for Model ID", "licence: license",
                      "huggingface.co/None", "{{", "[optional]")


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("card-run") / "run"
    code = main(["train", "offline", "--config", str(TINY_YAML), "--model_name_or_path", str(tiny_model_dir),
                 "--dataset", str(ROOT / "tests" / "data" / "offline_tiny_prefs.jsonl"), "--output_dir", str(out)])
    assert code == 0
    return out


def _training(text: str) -> str:
    return text.split("## Training")[1].split("## Evaluation")[0]


def test_every_saved_folder_has_its_own_card(run, tiny_model_dir):
    from huggingface_hub import ModelCard

    folders = {run: 4, run / "checkpoint-2": 2, run / "checkpoint-4": 4}
    for folder, steps in folders.items():
        text = (folder / "README.md").read_text()
        for leftover in TEMPLATE_LEFTOVERS:
            assert leftover not in text, (folder, leftover)
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model == str(tiny_model_dir)  # as given
        assert card.data.library_name == "peft" and card.data.license == "other"
        assert "arxiv:2602.15894" in card.data.tags and "qempo" in card.data.tags
        assert not card.data.datasets  # a local file is no Hub dataset
        assert "trained with **qempo**" in text and "| `beta` | 0.1 |" in text
        assert f"- **steps**: {steps} optimizer steps" in text
        assert "- **data**: a local file `offline_tiny_prefs.jsonl`, 12 rows used" in text
        assert f"- **licence**: the base model's (`{tiny_model_dir}`)" in text
        assert "- **LoRA**: rank 8, alpha 16, dropout 0.0, target modules all-linear" in text
        assert f'AutoPeftModelForCausalLM.from_pretrained("{folder}")' in text
        assert f'AutoTokenizer.from_pretrained("{folder}")' in text  # the tokenizer is saved with the adapter


def test_push_publishes_the_same_training_facts(run, tiny_model_dir, tmp_path, capsys):
    from huggingface_hub import ModelCard

    up = tmp_path / "up"
    assert main(["push", str(run), "--repo-id", "someone/tiny-qempo", "--base-model-id", "someone/tiny-base",
                 "--dry-run", str(up)]) == 0, capsys.readouterr().err
    saved, pushed = (run / "README.md").read_text(), (up / "README.md").read_text()
    assert _training(pushed) == _training(saved).replace(str(tiny_model_dir), "someone/tiny-base")
    card = ModelCard.load(up / "README.md")
    assert card.data.base_model == "someone/tiny-base" and card.data.license == "other"
    assert 'from_pretrained("someone/tiny-qempo")' in pushed and str(run) not in pushed


def test_a_paper_base_gets_its_licence_and_hub_datasets(tiny_model_dir, tmp_path):
    from huggingface_hub import ModelCard

    from qempo_lite.hub import write_adapter_card

    folder = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=0, r=8)
    meta = {"method": "qempo_kl", "coefficients": {"beta1": 0.004, "beta2": 0.01}, "steps": 480,
            "base_model": "meta-llama/Llama-3.2-1B-Instruct", "mode": "offline",
            "data": {"dataset": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs", "rows": 61135}}
    card = ModelCard.load(write_adapter_card(folder, meta, "runs/l1b"))
    assert card.data.license == "llama3.2" and card.data.datasets == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert card.data.base_model == "meta-llama/Llama-3.2-1B-Instruct"
    assert "- **licence**: `llama3.2`, the base model's" in card.text
    assert "vllm serve meta-llama/Llama-3.2-1B-Instruct --enable-lora --lora-modules l1b=runs/l1b" in card.text
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8


def test_a_whole_model_trained_without_lora_saves_without_a_card(tiny_model_dir, tmp_path):
    from test_offline import make_config, make_trainer

    config = make_config(tmp_path, "qempo", max_steps=1, save_strategy="steps", save_steps=1)
    trainer = make_trainer(tiny_model_dir, config, peft=False, with_eval=False)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    checkpoint = Path(config.output_dir) / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file() and (tmp_path / "final" / "model.safetensors").is_file()
    assert not (checkpoint / "README.md").exists() and not (tmp_path / "final" / "README.md").exists()
