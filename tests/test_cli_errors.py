"""Every failure of the installed command is exit status 2 and exactly one stderr line.

Each bad input runs ``python -m qempo_lite.cli`` in a fresh process (:mod:`cli_runner`: forked from
one that imported torch and TRL once), two at a time. What a library prints while it is imported
(bitsandbytes does on CPUs with AVX512-BF16) is checked by
``tests/test_cli_offline.py::test_the_installed_command_exits_non_zero_with_one_line``, which starts
Python itself.
"""

from __future__ import annotations

import gzip
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from cli_runner import command_env, run_cli

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_YAML = ROOT / "tests" / "data" / "offline_tiny.yaml"
PAIRS = ROOT / "tests" / "data" / "offline_tiny_prefs.jsonl"


def _offline(tmp_path: Path, model: Path, name: str, **changes) -> list[str]:
    values = yaml.safe_load(OFFLINE_YAML.read_text())
    values.update(model_name_or_path=str(model), dataset=str(PAIRS), output_dir=str(tmp_path / name / "out"))
    values.update(changes)
    path = tmp_path / name / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return ["train", "offline", "--config", str(path)]


def _online(tmp_path: Path, model: Path, problems: Path, name: str, **changes) -> list[str]:
    values = dict(model_name_or_path=str(model), quantization="none", lora_r=8, lora_alpha=16,
                  datasets=[str(problems)], loss_method="qempo", rollout="hf", output_dir=str(tmp_path / name / "out"),
                  num_generations=4, per_device_train_batch_size=4, max_completion_length=4, max_steps=1,
                  bf16=False, use_cpu=True, report_to="none")
    values.update(changes)
    path = tmp_path / name / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return ["train", "online", "--config", str(path)]


def _bad_inputs(tmp_path: Path, model: Path) -> list[tuple[str, list[str], str]]:
    """(name, argv, a fragment the one line must contain)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    truncated = tmp_path / "pairs.jsonl.gz"
    truncated.write_bytes(gzip.compress(PAIRS.read_bytes())[:-40])
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model / "config.json").read_text())
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                                + "\n" for i in range(4)))
    no_hashes = tmp_path / "no-hashes.jsonl"
    no_hashes.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2"}) + "\n")
    o = lambda name, **kw: _offline(tmp_path, model, name, **kw)  # noqa: E731
    n = lambda name, **kw: _online(tmp_path, model, problems, name, **kw)  # noqa: E731
    return [
        ("unknown key", o("typo", learnin_rate=1e-3), "did you mean 'learning_rate'"),
        ("output_dir is a file", o("outfile", output_dir=str(a_file)), "is a file"),
        ("every prompt too long", o("maxlen", max_length=3), "raise max_length"),
        ("truncation mode", o("trunc", truncation_mode="keep_middle"), "truncation_mode"),
        ("eval strategy without data", o("evalnone", eval_strategy="steps", eval_steps=1), "needs evaluation data"),
        ("sync_ref_model", o("sync", sync_ref_model=True), "sync_ref_model"),
        ("loss_weights", o("weights", loss_weights=[0.0]), "loss_weights"),
        ("beta for qempo_kl", o("klbeta", loss_method="qempo_kl", beta=0.1), "beta is not a coefficient"),
        ("truncated gzip", o("gzip", dataset=str(truncated)), "pairs.jsonl.gz"),
        ("missing dataset", o("nodata", dataset=str(tmp_path / "nowhere.jsonl")), "nowhere.jsonl"),
        ("eval_split of a local file", o("split", eval_split="test"), "eval_fraction"),
        ("weights not safetensors", o("noweights", model_name_or_path=str(no_weights)), "safetensors"),
        ("resume with nothing to resume", o("resume") + ["--resume"], "no checkpoint to resume"),
        ("num_iterations", n("iters", num_iterations=2), "num_iterations"),
        ("top_p", n("topp", top_p=0.9), "top_p"),
        ("generation_kwargs", n("genkw", generation_kwargs={"top_k": 5}), "generation_kwargs"),
        ("stale generation batch", n("stale", steps_per_generation=2), "steps_per_generation"),
        # Loading the online trainer imports vLLM, which prints a line of its own to stderr.
        ("GSM8K answer without ####", n("hashes", datasets=[str(no_hashes)]), "no final '#### <answer>' line"),
        ("eval usage", ["eval", "bogus"], "invalid choice"),
        ("eval missing samples", ["eval", "diversity", "--samples", str(tmp_path / "none.jsonl"), "--output",
                                  str(tmp_path / "d.json")], "none.jsonl"),
        ("push missing adapter", ["push", str(tmp_path / "no-adapter"), "--repo-id", "user/name", "--dry-run",
                                  str(tmp_path / "stage")], "no-adapter"),
        ("push usage", ["push"], "required"),
        ("demo usage", ["demo", "--seed", "x"], "invalid int value"),
        ("app usage", ["app", "--port", "x"], "invalid int value"),
        ("unknown command", ["trian"], "unknown command"),
        ("eval report without inputs", ["eval", "report", "--inputs", str(tmp_path / "none.json"), "--output-dir",
                                        str(tmp_path / "rep")], "none.json"),
        ("eval judge usage", ["eval", "judge", "--samples", str(tmp_path / "none.jsonl")], "required"),
        ("eval server URL of another backend",
         ["eval", "sample", "--base-model", str(model), "--backend", "hf", "--vllm-server-url",
          "http://127.0.0.1:9", "--include-base", "--output", str(tmp_path / "s.jsonl")],
         "--vllm-server-url is the server of"),
        ("eval server without URL", ["eval", "sample", "--base-model", str(model), "--backend", "vllm_server",
                                     "--include-base", "--output", str(tmp_path / "s.jsonl")],
         "pass --vllm-server-url"),
        ("eval server URL not http", ["eval", "sample", "--base-model", str(model), "--backend", "vllm_server",
                                      "--vllm-server-url", "127.0.0.1:9", "--include-base", "--output",
                                      str(tmp_path / "s.jsonl")], "--vllm-server-url must be an http(s) URL"),
        ("app server URL of another backend", ["app", "--backend", "hf", "--vllm-server-url", "http://127.0.0.1:9"],
         "--vllm-server-url is the server of"),
        ("push a file", ["push", str(a_file), "--repo-id", "user/name", "--dry-run", str(tmp_path / "stage")],
         "not a directory"),
        ("push repo id", ["push", str(model), "--repo-id", "no-owner", "--dry-run", str(tmp_path / "stage")],
         "USER/NAME"),
        ("app adapter missing", ["app", "--adapter", str(tmp_path / "no-adapter")], "does not exist"),
        ("demo output is a file", ["demo", "--output", str(a_file)], "not a directory"),
    ]


def _run(argv: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """``python -m qempo_lite.cli *argv`` in a fresh process (:func:`cli_runner.run_cli`), tracebacks off unless asked."""
    return run_cli(argv, cwd, env=command_env(**{"QEMPO_LITE_DEBUG": "", **env}))


@pytest.mark.slow
def test_every_bad_input_is_exit_2_and_one_line(tmp_path, tiny_model_dir):
    cases = _bad_inputs(tmp_path, tiny_model_dir)
    assert len(cases) >= 25
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: _run(case[1], tmp_path), cases))
    failures = []
    for (name, _, fragment), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        ok = result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
        if not ok:
            failures.append(f"{name}: exit {result.returncode}, stderr {result.stderr.strip()[-600:]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path, tiny_model_dir):
    argv = _offline(tmp_path, tiny_model_dir, "debug", truncation_mode="keep_middle")
    result = _run(argv, tmp_path, QEMPO_LITE_DEBUG="1")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: truncation_mode")


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["train", "offline", "--help"], ["eval", "--help"]])
def test_help_is_shown_whole(tmp_path, argv):
    result = _run(argv, tmp_path)
    assert result.returncode == 0
    assert "usage: qempo-lite" in result.stdout and len(result.stdout.splitlines()) > 5
    assert result.stderr == ""  # nothing the libraries printed while the command was imported
