"""`qempo-lite train offline`: a YAML recipe end to end, --resume, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from qempo_lite.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "tests" / "data" / "offline_tiny.yaml"


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _train(tiny_model_dir, output_dir, *flags) -> int:
    return main(["train", "offline", "--config", str(TINY_YAML), "--model_name_or_path", str(tiny_model_dir),
                 "--output_dir", str(output_dir), *flags])


@pytest.fixture
def in_repo_root(monkeypatch):
    # The recipe names its data file relative to the repository, as a user's recipe would relative to theirs.
    monkeypatch.chdir(ROOT)


@pytest.mark.slow
def test_recipe_trains_end_to_end_and_resumes_to_the_same_adapter(tiny_model_dir, tmp_path, in_repo_root, capsys):
    straight = tmp_path / "straight"
    assert _train(tiny_model_dir, straight) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "qempo_lite.json",
                 "training_args.json", "checkpoint-2", "checkpoint-4"):
        assert (straight / name).exists(), name
    assert not list(straight.glob("*.bin"))
    meta = json.loads((straight / "qempo_lite.json").read_text())
    assert meta["method"] == "qempo" and meta["coefficients"] == {"beta": 0.1}
    assert meta["base_model"] == str(tiny_model_dir) and meta["quantization"] is None
    assert meta["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    assert meta["data"] == {"dataset": "tests/data/offline_tiny_prefs.jsonl", "split": None, "rows": 12,
                            "skipped": 0, "dropped_for_length": 0, "eval": None}
    assert meta["steps"] == 4 and meta["mode"] == "offline" and meta["qempo_lite_version"]
    log = json.loads((straight / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]

    # Stopped after the step-2 checkpoint, then resumed to step 4 (constant LR: the same schedule as straight).
    resumed = tmp_path / "resumed"
    assert _train(tiny_model_dir, resumed, "--max_steps", "2") == 0
    assert _train(tiny_model_dir, resumed) == 2  # checkpoints there, no --resume: refused
    assert "pass --resume" in capsys.readouterr().err
    assert _train(tiny_model_dir, resumed, "--resume") == 0
    assert json.loads((resumed / "qempo_lite.json").read_text())["steps"] == 4
    expected, got = _adapter(straight), _adapter(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


def _one_line_error(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, err
    return err


def _recipe_with(tmp_path, extra: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_YAML.read_text() + extra)
    return path


def test_unknown_yaml_key_is_one_line_with_a_suggestion(tiny_model_dir, tmp_path, in_repo_root, capsys):
    recipe = _recipe_with(tmp_path, "learnin_rate: 1.0e-4\n")
    code = main(["train", "offline", "--config", str(recipe), "--model_name_or_path", str(tiny_model_dir)])
    _one_line_error(capsys, code, "unknown config key 'learnin_rate'", "did you mean 'learning_rate'?")


@pytest.mark.parametrize("extra, flags, fragments", [
    ("max_steps: four\n", [], ("'max_steps' expects int", "'four'")),
    ("", ["--beta", "big"], ("'beta' expects float", "'big'")),
    ("lora_r: 2.5\n", [], ("'lora_r' expects int", "2.5")),
    ("quantization: 3bit\n", [], ("quantization must be 4bit, 8bit or none", "'3bit'")),
    ("loss_method: ipo\n", [], ("loss_method must be one of",)),
])
def test_wrong_type_or_value_is_one_line(tiny_model_dir, tmp_path, in_repo_root, capsys, extra, flags, fragments):
    recipe = _recipe_with(tmp_path, extra)
    code = main(["train", "offline", "--config", str(recipe), "--model_name_or_path", str(tiny_model_dir),
                 "--output_dir", str(tmp_path / "out"), *flags])
    _one_line_error(capsys, code, *fragments)


def test_missing_dataset_file_is_one_line(tiny_model_dir, tmp_path, in_repo_root, capsys):
    code = _train(tiny_model_dir, tmp_path / "out", "--dataset", str(tmp_path / "nowhere.jsonl"))
    _one_line_error(capsys, code, "nowhere.jsonl")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_missing_config_file_and_required_key(tmp_path, in_repo_root, capsys):
    code = main(["train", "offline", "--config", str(tmp_path / "absent.yaml")])
    _one_line_error(capsys, code, "absent.yaml", "not found")
    code = main(["train", "offline", "--config", str(TINY_YAML), "--output_dir", str(tmp_path / "out")])
    _one_line_error(capsys, code, "missing required config key 'model_name_or_path'")


@pytest.mark.slow
def test_the_installed_command_exits_non_zero_with_one_line(tmp_path):
    recipe = _recipe_with(tmp_path, "learnin_rate: 1.0e-4\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "qempo_lite.cli", "train", "offline", "--config", str(recipe)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: unknown config key 'learnin_rate' in {recipe}; did you mean 'learning_rate'? "
        "see 'qempo-lite train offline --help'"
    ]
    # The other command-line tests fork each command from a process that imported torch and TRL once
    # (tests/cli_runner.py): it ends the same way, byte for byte.
    forked = run_cli(["train", "offline", "--config", str(recipe)], ROOT, env=env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (result.returncode, result.stdout, result.stderr)


def test_help_lists_the_keys(capsys):
    assert main(["train", "offline", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("model_name_or_path", "quantization", "dataset", "eval_split", "loss_method", "beta1", "--resume"):
        assert key in out


# ------------------------------------------------------------------------ recipe parsing


def test_flags_override_yaml_and_strings_are_typed(tmp_path):
    from qempo_lite.offline import QEMPOConfig
    from qempo_lite.runs import ModelArgs
    from qempo_lite.train_cli import OfflineRunArgs
    from qempo_lite.recipe import parse_recipe

    recipe = _recipe_with(tmp_path, "learning_rate: 5e-7\ntarget_modules: [q_proj, v_proj]\nlimit: ~\n")
    config, model_args, run_args = parse_recipe(
        ["--config", str(recipe), "--model_name_or_path", "m", "--beta=0.25", "--max-steps", "7",
         "--resume", "--gradient_checkpointing", "false", "--output_dir", str(tmp_path / "o")],
        (QEMPOConfig, ModelArgs, OfflineRunArgs))
    assert config.learning_rate == 5e-7  # YAML 1.1 reads 5e-7 as a string; it is a float here
    assert config.beta == 0.25 and config.max_steps == 7 and config.gradient_checkpointing is False
    assert config.lr_scheduler_type == "constant"  # from the YAML, untouched by flags
    assert model_args.target_modules == ["q_proj", "v_proj"] and model_args.quantization is None
    assert run_args.resume is True and run_args.limit is None


def test_malformed_yaml_names_the_line(tmp_path):
    from qempo_lite.errors import QempoError
    from qempo_lite.recipe import read_yaml

    path = tmp_path / "broken.yaml"
    path.write_text("beta: 0.1\nmax_steps: [1, 2\n")
    with pytest.raises(QempoError, match=r"not valid YAML at line \d+") as err:
        read_yaml(path)
    assert "\n" not in str(err.value)
    path.write_text("- just\n- a list\n")
    with pytest.raises(QempoError, match="must be a YAML mapping"):
        read_yaml(path)
    path.write_text("")
    with pytest.raises(QempoError, match="is empty; write the recipe's key: value lines"):
        read_yaml(path)
    with pytest.raises(QempoError, match="is a directory, not a file; pass an existing YAML file"):
        read_yaml(tmp_path)


def test_a_bare_flag_sets_booleans_only(tmp_path):
    from qempo_lite.errors import QempoError
    from qempo_lite.offline import QEMPOConfig
    from qempo_lite.recipe import parse_recipe
    from qempo_lite.runs import ModelArgs
    from qempo_lite.train_cli import OfflineRunArgs

    types = (QEMPOConfig, ModelArgs, OfflineRunArgs)
    base = ["--config", str(_recipe_with(tmp_path, "")), "--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    assert parse_recipe([*base, "--resume"], types)[2].resume is True
    with pytest.raises(QempoError, match=r"--max_steps needs a value \(int\): write --max_steps VALUE"):
        parse_recipe([*base, "--max_steps"], types)
    with pytest.raises(QempoError, match="--dataset needs a value"):  # not a dataset named 'true'
        parse_recipe([*base, "--dataset", "--resume"], types)


@pytest.mark.parametrize("line, words", [
    ("per_device_train_batch_size: 0", "per_device_train_batch_size must be a whole number >= 1, got 0"),
    ("gradient_accumulation_steps: -1", "gradient_accumulation_steps must be a whole number >= 1, got -1"),
    ("learning_rate: -1.0e-3", "learning_rate must be a positive number, got -0.001"),
    ("learning_rate: 0", "learning_rate must be a positive number, got 0"),
    ("max_steps: 0", "max_steps must be a number of optimizer steps >= 1"),
    ("max_steps: -1\nnum_train_epochs: 0", "num_train_epochs must be a positive number"),
])
def test_step_and_batch_settings_are_checked_before_loading(tmp_path, line, words):
    """Refused while the recipe is read: transformers would refuse them only after loading the model
    (a bare ValueError), or train nothing (learning_rate 0)."""
    from qempo_lite.configs import QEMPOOnlineConfig
    from qempo_lite.errors import QempoError
    from qempo_lite.offline import QEMPOConfig
    from qempo_lite.recipe import parse_recipe
    from qempo_lite.runs import ModelArgs
    from qempo_lite.train_cli import OfflineRunArgs, OnlineRunArgs

    recipe = _recipe_with(tmp_path, line + "\n")
    flags = ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(QempoError, match=words):
        parse_recipe(["--config", str(recipe), *flags], (QEMPOConfig, ModelArgs, OfflineRunArgs))
    online = tmp_path / "online.yaml"
    online.write_text(f"datasets: [d.jsonl]\nuse_cpu: true\nbf16: false\nnum_generations: 2\n"
                      f"per_device_train_batch_size: 2\n{line}\n")
    with pytest.raises(QempoError, match=words):
        parse_recipe(["--config", str(online), *flags], (QEMPOOnlineConfig, ModelArgs, OnlineRunArgs))
