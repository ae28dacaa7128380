"""The built wheel, installed on its own into a fresh virtual environment, run from a folder outside the checkout.

The wheel is built from a copy of the checkout without build isolation (no network), installed with
``--no-deps --no-index``; the new environment reuses this one's installed dependencies through a
``.pth`` line naming their site-packages (a plain path: that folder's own ``.pth`` files, such as an
editable install of this checkout, are not run). ``PYTHONPATH`` is cleared, so nothing is imported
from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = (".git", ".venv", "build", "dist", "__pycache__", "*.egg-info", ".pytest_cache", "outputs", "qempo-demo")

pytestmark = pytest.mark.slow


def _run(command, cwd, timeout=600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The wheel and the sdist, built from a copy of the checkout."""
    source = tmp_path_factory.mktemp("source") / "qempo-lite"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LEFT_OUT))
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", dist, source],
         cwd=source)
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
         cwd=source)
    return {"wheel": next(dist.glob("qempo_lite-*.whl")), "sdist": next(dist.glob("qempo_lite-*.tar.gz"))}


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel, reusing this environment's dependencies."""
    env = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", env], cwd=env.parent)
    python = env / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=env).strip())
    (site / "reuse_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", built["wheel"]], cwd=env)
    return env


def test_the_sdist_carries_the_tests_their_data_and_the_licence(built):
    with tarfile.open(built["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for name in ("LICENSE", "README.md", ".ci/run", "tests/conftest.py", "tests/test_repo.py",
                 "tests/data/gsm8k/test.jsonl", "tests/data/gsm8k/LICENSE", "tests/data/hh_rlhf_harmless/test.jsonl.gz",
                 "tests/data/offline_tiny.yaml", "qempo_lite/recipes/offline/qwen2.5-1.5b-qempo.yaml",
                 "qempo_lite/evaluate/data/mt_bench/question.jsonl", "benchmarks/results/gpu_offline.json"):
        assert name in names, name


def test_the_installed_wheel_runs_every_shipped_file_from_outside_the_checkout(venv, tiny_model_dir, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    cli, python = venv / "bin" / "qempo-lite", venv / "bin" / "python"
    where = _run([python, "-c", "import qempo_lite; print(qempo_lite.__file__)"], cwd=work).strip()
    assert where.startswith(str(venv)) and not where.startswith(str(ROOT)), where
    assert "recipes" in _run([cli, "--help"], cwd=work)
    names = _run([cli, "recipes", "list"], cwd=work).split()
    assert len(names) == 26 and "offline/qwen2.5-1.5b-qempo" in names and "accelerate/ddp" in names
    ddp = Path(_run([cli, "recipes", "path", "ddp"], cwd=work).strip())
    assert ddp.is_file() and str(ddp).startswith(str(venv))
    _run([cli, "recipes", "copy", "qwen2.5-1.5b-qempo", "mine.yaml"], cwd=work)
    assert "loss_method: qempo" in (work / "mine.yaml").read_text()

    # The shipped recipe by name, made tiny: the local tiny model and preference pairs, 2 steps on the CPU.
    shutil.copyfile(ROOT / "tests" / "data" / "offline_tiny_prefs.jsonl", work / "pairs.jsonl")
    tiny = ["--model_name_or_path", tiny_model_dir, "--dataset", "pairs.jsonl", "--dataset_split", "null",
            "--eval_split", "null", "--eval_strategy", "no", "--load_best_model_at_end", "false", "--dtype", "float32", "--bf16", "false",
            "--use_cpu", "true", "--gradient_checkpointing", "false", "--max_steps", "2", "--max_length", "64",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--save_steps", "1",
            "--report_to", "none", "--output_dir", "run"]
    _run([cli, "train", "offline", "--config", "qwen2.5-1.5b-qempo", *tiny], cwd=work)
    assert (work / "run" / "adapter_model.safetensors").is_file()
    assert "- **steps**: 2 optimizer steps" in (work / "run" / "README.md").read_text()
    assert (work / "run" / "checkpoint-2" / "README.md").is_file()

    # MT-Bench's questions and judge prompts, from the package.
    counts = _run([python, "-c", "from qempo_lite.evaluate.mtbench import load_questions\n"
                   "from qempo_lite.evaluate.judge import load_judge_prompts\n"
                   "print(len(load_questions('mtbench')), len(load_judge_prompts('mtbench')))"], cwd=work).split()
    assert int(counts[0]) == 80 and int(counts[1]) >= 4
