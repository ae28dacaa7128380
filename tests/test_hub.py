"""Model card and push --dry-run on a real (tiny) PEFT adapter."""

import json
import shutil
import pytest

from qempo_lite.cli import main
from qempo_lite.hub import push_adapter


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("runs") / "qempo-adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    (out / "qempo_lite.json").write_text(json.dumps({
        "method": "qempo", "coefficients": {"beta": 0.004}, "base_model": str(tiny_model_dir),
        "data": {"dataset": "toy.jsonl", "rows": 12}, "steps": 3,
    }))
    (out / "report.json").write_text(json.dumps({"adapters": {"qempo-adapter": {
        "lexical": 41.5, "semantic": 12.25, "syntactic": 30.0, "average": 27.9, "judge": 7.1}}}))
    return out


def _push(capsys, *args):
    """``qempo-lite push ...`` in-process; returns (exit code, stdout, stderr)."""
    code = main(["push", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_writes_adapter_and_card_only(adapter_dir, tmp_path, capsys):
    from huggingface_hub import ModelCard

    out = tmp_path / "upload"
    code, stdout, stderr = _push(capsys, adapter_dir, "--repo-id", "someone/tiny-qempo", "--dry-run", out)
    assert code == 0, stderr
    assert "adapter_model.safetensors" in stdout
    # the tokenizer is the base model's own, so it is not uploaded again
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = ModelCard.load(out / "README.md")
    meta = json.loads((adapter_dir / "qempo_lite.json").read_text())
    assert card.data.base_model == meta["base_model"]
    assert card.data.library_name == "peft"
    assert "qempo-lite" in card.data.tags
    text = card.text
    assert "beta" in text and "0.004" in text
    assert "41.500" in text and "7.100" in text  # the Table 2 row from report.json
    assert "--enable-lora --lora-modules" in text
    assert "AutoPeftModelForCausalLM" in text


def test_changed_tokenizer_is_uploaded(adapter_dir, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(adapter_dir, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    push_adapter(changed, "someone/tiny", dry_run=tmp_path / "up")
    assert (tmp_path / "up" / "tokenizer_config.json").is_file()


def test_missing_evaluation_warns(adapter_dir, tmp_path, capsys, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(adapter_dir, bare)
    (bare / "report.json").unlink()
    code, _, _ = _push(capsys, bare, "--repo-id", "someone/tiny", "--dry-run", tmp_path / "up")
    assert code == 0
    assert "no evaluation results" in caplog.text
    assert "No evaluation results were found" in (tmp_path / "up" / "README.md").read_text()


def test_refuses_missing_adapter_and_pickles(adapter_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = _push(capsys, empty, "--repo-id", "someone/tiny", "--dry-run", tmp_path / "a")
    assert code == 2
    assert stderr.strip().count("\n") == 0 and "adapter_config.json" in stderr
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dir, pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    code, _, stderr = _push(capsys, pickled, "--repo-id", "someone/tiny", "--dry-run", tmp_path / "b")
    assert code == 2 and "pickled" in stderr
    assert not (tmp_path / "b").exists()


def test_training_cli_takes_over_the_hub_push(tmp_path):
    from qempo_lite.errors import QempoError
    from qempo_lite.offline import QEMPOConfig, take_over_hub_push

    config = QEMPOConfig(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="someone/tiny", report_to=[], use_cpu=True)
    assert take_over_hub_push(config) == "someone/tiny"
    assert config.push_to_hub is False  # transformers must not upload checkpoints and pickles itself
    assert take_over_hub_push(QEMPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)) is None
    with pytest.raises(QempoError, match="hub-model-id"):
        take_over_hub_push(QEMPOConfig(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="tiny", report_to=[], use_cpu=True))
