"""A training run killed during its first checkpoint save: the advice given afterwards leads somewhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cli_runner import run_cli
from qempo_lite.runs import checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "tests" / "data" / "offline_tiny.yaml"


def _train(tiny_model_dir, output_dir, *flags) -> subprocess.CompletedProcess:
    return run_cli(["train", "offline", "--config", str(TINY_YAML), "--model_name_or_path", str(tiny_model_dir),
                    "--output_dir", str(output_dir), *flags], ROOT)


def test_a_kill_during_the_first_checkpoint_save_is_resumed_from_step_0(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cut = out / "checkpoint-2"
    cut.mkdir(parents=True)  # what a kill during the first save leaves: a weights file cut short, nothing else
    (cut / "adapter_model.safetensors").write_bytes((400).to_bytes(8, "little") + b'{"__metadata__"')
    assert checkpoint_problem(cut) is not None

    refused = _train(tiny_model_dir, out)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr.strip().splitlines()[-1]
    resumed = _train(tiny_model_dir, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint-2" in resumed.stderr and "starting from step 0" in resumed.stderr
    assert json.loads((out / "qempo_lite.json").read_text())["steps"] == 4
    assert checkpoint_problem(cut) is None and checkpoint_problem(out / "checkpoint-4") is None  # saved anew
