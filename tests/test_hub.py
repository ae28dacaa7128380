"""Model card and push --dry-run on a real (tiny) PEFT adapter; the attacks on the push are in test_security.py."""

import json
import re
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


def _hub_stand_in(root, tiny_model_dir):
    """A folder laid out like the Hub: ``someone/tiny-base`` is the base model, so that a card's
    snippet run from ``root`` finds every repository it names as a local directory."""
    base = root / "someone" / "tiny-base"
    shutil.copytree(tiny_model_dir, base)
    return base


def test_dry_run_writes_adapter_and_card_only(adapter_dir, tmp_path, capsys):
    from huggingface_hub import ModelCard

    out = tmp_path / "upload"
    code, stdout, stderr = _push(capsys, adapter_dir, "--repo-id", "someone/tiny-qempo", "--base-model-id",
                                 "someone/tiny-base", "--dry-run", out)
    assert code == 0, stderr
    assert "adapter_model.safetensors" in stdout
    # the tokenizer is the base model's own, so it is not uploaded again
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    # PEFT and vLLM read the base from the uploaded config: the Hub id, not the local training path
    uploaded = json.loads((out / "adapter_config.json").read_text())
    original = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert uploaded == {**original, "base_model_name_or_path": "someone/tiny-base"}
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "someone/tiny-base"
    assert card.data.library_name == "peft"
    assert "qempo-lite" in card.data.tags and "arxiv:2602.15894" in card.data.tags
    text = card.text
    assert "beta" in text and "0.004" in text
    assert "41.500" in text and "7.100" in text  # the Table 2 row from report.json
    assert "--enable-lora --lora-modules tiny-qempo=someone/tiny-qempo --max-lora-rank 8" in text
    assert "vllm serve someone/tiny-base" in text
    assert "AutoPeftModelForCausalLM" in text
    # the data and steps as text, a local file by its name only (no path of this machine)
    assert "- **data**: a local file `toy.jsonl`, 12 rows used" in text
    assert "- **steps**: 3 optimizer steps" in text
    assert str(adapter_dir.parent) not in (out / "README.md").read_text()
    assert "{" not in text.split("## Training")[1].split("## Evaluation")[0]  # no raw JSON
    # the paper by its arXiv id, and no link to anything that does not exist
    assert "arXiv:2602.15894" in text
    links = set(re.findall(r"https?://[^\s)>\]]+", text))
    assert links == {"https://huggingface.co/someone/tiny-base", "https://arxiv.org/abs/2602.15894"}, links
    assert "Diversity measured with" not in text  # the report names no protocol


def test_card_snippet_loads_the_staged_folder(adapter_dir, tmp_path, monkeypatch, tiny_model_dir):
    """Run the card's Python snippet as written, with local folders standing in for the Hub."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    hub = tmp_path / "hub"
    _hub_stand_in(hub, tiny_model_dir)
    push_adapter(adapter_dir, "someone/tiny-qempo", base_model_id="someone/tiny-base",
                 dry_run=hub / "someone" / "tiny-qempo")
    card = (hub / "someone" / "tiny-qempo" / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    assert 'AutoTokenizer.from_pretrained("someone/tiny-base")' in snippet  # where the tokenizer really is
    monkeypatch.chdir(hub)
    scope = {}
    exec(snippet, scope)  # noqa: S102 - the snippet a user would paste
    model, tokenizer = scope["model"], scope["tokenizer"]
    assert isinstance(model, PeftModel)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = dict(model.named_parameters())
    some = next(k for k in saved if "lora_A" in k)
    assert torch.equal(loaded[some.replace(".weight", ".default.weight")], saved[some])
    ids = tokenizer("Name a colour.", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)


def test_changed_tokenizer_is_uploaded_and_the_card_loads_it_from_the_adapter(adapter_dir, tmp_path, monkeypatch,
                                                                            tiny_model_dir):
    changed = tmp_path / "changed"
    shutil.copytree(adapter_dir, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    hub = tmp_path / "hub"
    _hub_stand_in(hub, tiny_model_dir)
    push_adapter(changed, "someone/tiny", base_model_id="someone/tiny-base", dry_run=hub / "someone" / "tiny")
    assert (hub / "someone" / "tiny" / "tokenizer_config.json").is_file()
    snippet = (hub / "someone" / "tiny" / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert 'AutoTokenizer.from_pretrained("someone/tiny")' in snippet
    monkeypatch.chdir(hub)
    scope = {}
    exec(snippet, scope)  # noqa: S102
    assert scope["tokenizer"].model_max_length == 77


def test_local_base_needs_a_hub_id(adapter_dir, tmp_path, capsys):
    code, _, stderr = _push(capsys, adapter_dir, "--repo-id", "someone/tiny", "--dry-run", tmp_path / "up")
    assert code == 2 and stderr.strip().count("\n") == 0
    assert "is a local directory, not a Hub id" in stderr and "--base-model-id OWNER/NAME" in stderr
    assert not (tmp_path / "up").exists()
    code, _, stderr = _push(capsys, adapter_dir, "--repo-id", "someone/tiny", "--base-model-id", "/models/base",
                            "--dry-run", tmp_path / "up")
    assert code == 2 and "is not a Hub model id" in stderr


@pytest.mark.parametrize("report, expected", [
    ({"protocol": "guo2024", "parser": "spacy en_core_web_sm 3.8", "encoder": "all-mpnet-base-v2"},
     "Diversity measured with protocol `guo2024`, parser `spacy en_core_web_sm 3.8`, encoder `all-mpnet-base-v2`."),
    ({"diversity": {"protocol": "guo2024"}, "models": {"encoder": "all-MiniLM-L6-v2"}},
     "Diversity measured with protocol `guo2024`, encoder `all-MiniLM-L6-v2`."),
    ({"protocol": 3}, None),
])
def test_card_names_the_diversity_protocol_when_the_report_does(adapter_dir, tmp_path, report, expected):
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run)
    (run / "report.json").write_text(json.dumps({**report, "adapters": {"run": {"lexical": 40.0, "average": 30.0}}}))
    push_adapter(run, "someone/tiny", base_model_id="someone/tiny-base", dry_run=tmp_path / "up")
    text = (tmp_path / "up" / "README.md").read_text()
    assert "40.000" in text
    if expected is None:
        assert "Diversity measured with" not in text
    else:
        assert expected in text


def test_missing_evaluation_warns(adapter_dir, tmp_path, capsys, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(adapter_dir, bare)
    (bare / "report.json").unlink()
    code, _, _ = _push(capsys, bare, "--repo-id", "someone/tiny", "--base-model-id", "someone/tiny-base",
                       "--dry-run", tmp_path / "up")
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


def test_dry_run_folder_that_is_a_file_is_one_line(adapter_dir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    code, _, stderr = _push(capsys, adapter_dir, "--repo-id", "someone/tiny", "--dry-run", a_file)
    assert code == 2 and stderr.strip().count("\n") == 0
    assert "dry-run folder" in stderr and "is a file" in stderr and "unexpected" not in stderr
    assert a_file.read_text() == "keep me"


def test_training_cli_takes_over_the_hub_push(tmp_path):
    from qempo_lite.errors import QempoError
    from qempo_lite.offline import QEMPOConfig
    from qempo_lite.runs import take_over_hub_push

    config = QEMPOConfig(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="someone/tiny", report_to=[], use_cpu=True)
    assert take_over_hub_push(config) == "someone/tiny"
    assert config.push_to_hub is False  # transformers must not upload checkpoints and pickles itself
    assert take_over_hub_push(QEMPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)) is None
    with pytest.raises(QempoError, match="hub-model-id"):
        take_over_hub_push(QEMPOConfig(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="tiny", report_to=[], use_cpu=True))


def test_card_of_an_adapter_trained_on_other_weights_says_so_under_usage(adapter_dir, tmp_path, capsys):
    """An adapter trained on re-quantised base weights (the real-model demos) warns where the snippet loads the base."""
    trained = tmp_path / "adapter"
    shutil.copytree(adapter_dir, trained)
    meta = json.loads((trained / "qempo_lite.json").read_text())
    (trained / "qempo_lite.json").write_text(json.dumps({**meta, "weights": "tiny weights after 4-bit quantisation"}))
    for folder, says in ((adapter_dir, False), (trained, True)):
        out = tmp_path / f"upload-{folder.name}"
        code, _, stderr = _push(capsys, folder, "--repo-id", "someone/tiny-qempo", "--base-model-id",
                                "someone/tiny-base", "--dry-run", out)
        assert code == 0, stderr
        usage = (out / "README.md").read_text().split("## Usage", 1)[1]
        assert ("trained on other base weights than the published `someone/tiny-base`" in usage) is says
        assert ("tiny weights after 4-bit quantisation" in usage) is says
