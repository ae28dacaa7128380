"""Nothing wrong trains or saves in silence: diverged adapters, out-of-range numbers, finished runs resumed.

Each case runs the installed command in a fresh process (``python -m qempo_lite.cli``), as a
user's shell does, and checks its exit status, its one stderr line and what it left on disk.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_adapter
from test_cli_errors import _offline, _online, _run


def _one_line(result, *fragments: str) -> str:
    """Exit 2 and one error line, the last on stderr (a failure during training follows the loading's progress
    bars, which a successful setup shows), with no traceback."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == 2 and errors == lines[-1:] and "Traceback" not in result.stderr, \
        f"exit {result.returncode}, stderr {result.stderr[-1500:]!r}"
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _refused_before_loading(tmp_path: Path, cases: list[tuple[str, list[str], str]]) -> None:
    """Every case: exit 2, one line with its fragment, and no model loaded (refused while the recipe is read)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: _run(case[1], tmp_path), cases))
    failures = []
    for (name, _, fragment), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        ok = (result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
              and "preparing the trainer" not in result.stdout)
        if not ok:
            failures.append(f"{name}: exit {result.returncode}, stdout {result.stdout[-300:]!r}, "
                            f"stderr {result.stderr.strip()[-400:]!r}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------- item 1


@pytest.fixture(scope="module")
def diverging_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with one infinite weight in its final norm: every forward pass gives NaN, and so does
    every gradient, whatever the settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    out = tmp_path_factory.mktemp("diverging-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_a_diverged_adapter_stops_the_run_before_any_save(tmp_path, diverging_model_dir):
    argv = _offline(tmp_path, diverging_model_dir, "diverged", max_steps=4, save_steps=2)
    result = _run(argv, tmp_path)
    _one_line(result, "after step 2", "NaN or infinite", "nothing was saved")
    out = tmp_path / "diverged" / "out"
    assert not (out / "checkpoint-2").exists()
    assert not list(out.rglob("*.safetensors"))


def test_settings_that_diverge_are_refused_before_loading(tmp_path, tiny_model_dir):
    o = lambda name, **kw: _offline(tmp_path, tiny_model_dir, name, **kw)  # noqa: E731
    _refused_before_loading(tmp_path, [
        ("weight_decay inf", o("wd-inf", weight_decay=float("inf")), "weight_decay must be a finite number"),
        ("weight_decay too large", o("wd-big", weight_decay=1e6), "lr * weight_decay >= 1"),
        ("weight_decay negative", o("wd-neg", weight_decay=-0.1), "weight_decay must be a number in [0, inf)"),
        ("learning_rate 1e30", o("lr", learning_rate=1e30), "learning_rate=1e+30 is above 1"),
        ("beta 1e300", o("beta", beta=1e300), "beta=1e+300 is above 1000"),
        ("max_grad_norm nan", o("clip", max_grad_norm=float("nan")), "max_grad_norm must be a finite number"),
    ])


def test_push_refuses_non_finite_weights(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=0)
    weights = load_file(adapter / "adapter_model.safetensors")
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors")
    stage = tmp_path / "stage"
    result = _run(["push", str(adapter), "--repo-id", "user/name", "--base-model-id", "user/base", "--dry-run",
                   str(stage)], tmp_path)
    _one_line(result, name, "NaN or infinite")
    assert not stage.exists()


# ---------------------------------------------------------------------------------------------- item 2


def _steps(out: Path) -> int:
    return json.loads((out / "qempo_lite.json").read_text())["steps"]


def test_resuming_a_finished_offline_run_trains_nothing(tmp_path, tiny_model_dir):
    argv = _offline(tmp_path, tiny_model_dir, "finished", max_steps=2, save_steps=2)
    out = tmp_path / "finished" / "out"
    assert _run(argv, tmp_path).returncode == 0
    finished = load_file(out / "adapter_model.safetensors")
    # A rerun, and a kill during the final save (the checkpoint complete, the final adapter not written).
    for _ in range(2):
        result = _run(argv + ["--resume"], tmp_path)
        assert result.returncode == 0, result.stderr[-800:]
        assert _steps(out) == 2 and not (out / "checkpoint-3").exists()  # not one step past the end
        assert "checkpoint-2 already reached step 2 (max_steps=2): nothing left to train" in result.stdout
        again = load_file(out / "adapter_model.safetensors")
        assert again.keys() == finished.keys() and all(torch.equal(again[k], finished[k]) for k in finished)
        (out / "adapter_model.safetensors").unlink()


def test_resuming_a_finished_online_run_trains_nothing(tmp_path, tiny_model_dir):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + 1?",
                                            "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n" for i in range(4)))
    argv = _online(tmp_path, tiny_model_dir, problems, "online", learning_rate=1e-2, lr_scheduler_type="constant")
    out = tmp_path / "online" / "out"
    assert _run(argv, tmp_path).returncode == 0
    finished = load_file(out / "adapter_model.safetensors")
    result = _run(argv + ["--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-800:]
    assert _steps(out) == 1 and not (out / "checkpoint-2").exists()
    assert "checkpoint-1 already reached step 1 (max_steps=1): nothing left to train" in result.stdout
    again = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(again[k], finished[k]) for k in finished)


# ---------------------------------------------------------------------------------------------- item 6


def test_pairs_the_same_once_cut_to_max_length_are_dropped_and_counted(tmp_path, tiny_model_dir):
    story = "the red fox ran over the green hill and the blue river to the old stone house " * 3
    rows = [{"prompt": f"Tell story {i}.", "chosen": story + "Red.", "rejected": story + "Blue."} for i in range(3)]
    rows += [{"prompt": f"Name colour {i}.", "chosen": "Red.", "rejected": "I will not."} for i in range(5)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = _offline(tmp_path, tiny_model_dir, "cut", dataset=str(data), max_length=24, max_steps=1)
    result = _run(argv, tmp_path)
    assert result.returncode == 0, result.stderr[-1500:]
    assert "the same once cut to it): 3 training and 0 evaluation pairs" in result.stdout
    recorded = json.loads((tmp_path / "cut" / "out" / "qempo_lite.json").read_text())["data"]
    assert recorded["dropped_for_length"] == 3 and recorded["rows"] == 5


# ---------------------------------------------------------------------------------------------- item 7


def test_correct_threshold_is_finite_and_recorded(tmp_path, tiny_model_dir):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + 1?",
                                            "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n" for i in range(4)))
    n = lambda name, **kw: _online(tmp_path, tiny_model_dir, problems, name, **kw)  # noqa: E731
    _refused_before_loading(tmp_path, [
        ("correct_threshold nan", n("nan", correct_threshold=float("nan")), "correct_threshold must be a finite"),
        ("correct_threshold inf", n("inf", correct_threshold=float("inf")), "correct_threshold must be a finite"),
    ])
    result = _run(n("half", correct_threshold=0.5), tmp_path)
    assert result.returncode == 0, result.stderr[-1500:]
    online = json.loads((tmp_path / "half" / "out" / "qempo_lite.json").read_text())["online"]
    assert online["correct_threshold"] == 0.5 and online["gate"] == "correct"


# ---------------------------------------------------------------------------------------------- item 19


def test_values_that_failed_after_loading_are_refused_before(tmp_path, tiny_model_dir):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    o = lambda name, **kw: _offline(tmp_path, tiny_model_dir, name, **kw)  # noqa: E731
    n = lambda name, **kw: _online(tmp_path, tiny_model_dir, problems, name, **kw)  # noqa: E731
    _refused_before_loading(tmp_path, [
        ("seed 1e29", o("seed-big", seed=10**29), "seed must be a whole number in [0, 4,294,967,295]"),
        ("seed -1", o("seed-neg", seed=-1), "seed must be a whole number in [0, 4,294,967,295]"),
        ("adam_beta1 nan", o("beta1", adam_beta1=float("nan")), "adam_beta1 must be a finite number"),
        ("adam_epsilon -1", o("eps", adam_epsilon=-1.0), "adam_epsilon must be a number in (0, 1]"),
        ("batch size 1e20", o("batch", per_device_train_batch_size=10**20), "beyond any memory"),
        ("lora_r 1e9", o("rank", lora_r=10**9), "lora_r must be a whole number in [1, 4,096]"),
        ("unknown scheduler option", o("sched", lr_scheduler_type="cosine", lr_scheduler_kwargs={"bogus": 1}),
         "lr_scheduler_kwargs 'bogus' is not an option of lr_scheduler_type 'cosine' (it takes num_cycles)"),
        ("scheduler option ignored", o("const", lr_scheduler_kwargs={"num_cycles": 2}),
         "is not an option of lr_scheduler_type 'constant' (it takes none)"),
        ("request timeout 1e300", n("timeout", vllm_server_request_timeout=1e300),
         "vllm_server_request_timeout must be a number in (0, 86,400] seconds"),
    ])
