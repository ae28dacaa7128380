"""The shipped recipes: `qempo-lite recipes` (list, show, copy, path) and `--config NAME`."""

from __future__ import annotations

from pathlib import Path

from qempo_lite.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["recipes", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_names_every_shipped_recipe_and_config(capsys):
    code, out, _ = _run(capsys, "list")
    names = out.split()
    assert code == 0
    assert len([n for n in names if n.startswith("offline/")]) == 16
    assert len([n for n in names if n.startswith("online/")]) == 6
    assert [n for n in names if n.startswith("accelerate/")] == [
        "accelerate/ddp", "accelerate/deepspeed_zero2", "accelerate/deepspeed_zero3", "accelerate/fsdp"]
    assert _run(capsys, "list", "accelerate")[1].split() == names[-4:]


def test_show_and_path_give_the_shipped_file(capsys):
    code, out, _ = _run(capsys, "path", "ddp")
    path = Path(out.strip())
    assert code == 0 and path.is_file() and path.name == "ddp.yaml"
    assert "distributed_type: MULTI_GPU" in path.read_text()
    code, out, _ = _run(capsys, "show", "online/qwen2.5-1.5b-qempo")
    assert code == 0 and "loss_method: qempo" in out and "num_generations: 10" in out
    # A bare name shared by both modes is the offline recipe; KIND/NAME picks the other.
    assert "dataset: HuggingFaceH4/ultrafeedback_binarized" in _run(capsys, "show", "qwen2.5-1.5b-qempo")[1]


def test_copy_writes_an_editable_file_and_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    code, out, _ = _run(capsys, "copy", "qwen2.5-1.5b-qempo", str(dest))
    assert code == 0 and "copied offline/qwen2.5-1.5b-qempo" in out
    assert dest.read_text() == _run(capsys, "show", "offline/qwen2.5-1.5b-qempo")[1]
    dest.write_text("mine: true\n")
    code, _, err = _run(capsys, "copy", "qwen2.5-1.5b-qempo", str(dest))
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert dest.read_text() == "mine: true\n"
    assert _run(capsys, "copy", "accelerate/fsdp", str(tmp_path))[0] == 0
    assert (tmp_path / "fsdp.yaml").is_file()


def test_unknown_names_are_one_line_errors_with_a_suggestion(tmp_path, capsys):
    code, _, err = _run(capsys, "show", "qwen2.5-1.5b-qempp")
    assert code == 2 and "no shipped recipe named 'qwen2.5-1.5b-qempp'" in err and "did you mean" in err
    assert len(err.strip().splitlines()) == 1
    assert _run(capsys, "frobnicate")[0] == 2
    code = main(["train", "offline", "--config", "llama3.2-1b-qempp", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "nor is it a shipped recipe" in err and "'llama3.2-1b-qempo'" in err


def test_config_takes_a_recipe_name_of_the_command_s_mode_or_a_file(tmp_path, monkeypatch):
    from qempo_lite.recipe import parse_recipe
    from qempo_lite.train_cli import _OFFLINE_TYPES, _ONLINE_TYPES

    gpu_free = ["--bf16", "false"]  # the recipes are written for a GPU; this only parses them
    online = parse_recipe(["--config", "qwen2.5-1.5b-qempo", *gpu_free], _ONLINE_TYPES, mode="online")
    assert online[0].num_generations == 10 and online[2].datasets
    offline = parse_recipe(["--config", "qwen2.5-1.5b-qempo.yaml", *gpu_free], _OFFLINE_TYPES, mode="offline")
    assert offline[2].dataset == "HuggingFaceH4/ultrafeedback_binarized" and offline[0].beta == 4e-3
    # A file of that name in the working directory wins over the shipped recipe.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qwen2.5-1.5b-qempo.yaml").write_text(
        "model_name_or_path: m\ndataset: d.jsonl\nloss_method: dpo\nbeta: 0.2\n")
    mine = parse_recipe(["--config", "qwen2.5-1.5b-qempo.yaml", *gpu_free], _OFFLINE_TYPES, mode="offline")
    assert mine[0].loss_method == "dpo" and mine[0].beta == 0.2
