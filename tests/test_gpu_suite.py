"""benchmarks/gpu_suite.py: its --dry-run runs the GPU code path on the CPU with tiny shapes."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from cli_runner import command_env, run_python

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_flops_count_the_reference_forward_as_half_a_policy_step():
    from qempo_lite.models import paper_model_config

    suite = _suite()
    config = paper_model_config("Qwen/Qwen2.5-7B-Instruct")
    policy_only = suite.offline_step_flops(config, 2, 1024, 512, reference_forward=False)
    with_reference = suite.offline_step_flops(config, 2, 1024, 512, reference_forward=True)
    assert with_reference == pytest.approx(1.5 * policy_only)
    # 2 pairs = 4 sequences of 1024 tokens, forward + input-gradient backward: about 4·N·T for N ≈ 6.5e9
    # linear weights, plus the LM head on 512 positions and causal attention.
    linear = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    assert policy_only > 4 * linear * 4 * 1024
    assert policy_only < 1.1 * 4 * linear * 4 * 1024 + 4 * 4 * 152064 * 3584 * 512


def test_exact_length_pairs_tokenise_to_the_requested_lengths():
    from qempo_lite.tiny import train_tokenizer

    suite = _suite()
    tokenizer = train_tokenizer()
    pairs = suite.exact_length_pairs(tokenizer, 3, 20, 12)
    for row in pairs:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        both = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert len(prompt) == 20
        assert len(both) == 32


def test_merge_replaces_rows_of_the_same_configuration(tmp_path):
    suite = _suite()
    path = tmp_path / "r.json"
    a = {"model": "m", "adapter": "lora", "method": "qempo", "micro_batch": 1, "seq_len": 8, "step_s": 1.0}
    b = {**a, "method": "dpo", "step_s": 2.0}
    suite.merge_rows(path, [a, b], suite.OFFLINE_KEYS, {"device": "d", "versions": {}})
    merged = suite.merge_rows(path, [{**a, "step_s": 0.5}], suite.OFFLINE_KEYS, {"device": "d", "versions": {}})
    assert sorted((r["method"], r["step_s"]) for r in merged["rows"]) == [("dpo", 2.0), ("qempo", 0.5)]
    assert suite.offline_ratios(merged["rows"])[("m", 1)]["qempo / dpo"] == 0.25


@pytest.mark.slow
def test_dry_run_measures_every_configuration_and_the_online_step(tmp_path):
    # python benchmarks/gpu_suite.py ..., forked from a process that imported torch and TRL once (tests/cli_runner.py)
    result = run_python([SUITE, "--dry-run", "--methods", "qempo", "dpo", "--no-online-recipe",
                         "--output-dir", tmp_path], tmp_path, env=command_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    offline = json.loads((tmp_path / "gpu_offline.json").read_text())
    assert offline["dry_run"] is True and offline["versions"]["trl"]
    seen = {(r["model"], r["adapter"], r["method"], r["micro_batch"]) for r in offline["rows"]}
    assert seen == {(m, a, method, b) for m, a in (("tiny-llama", "qlora"), ("tiny-qwen2", "lora"))
                    for method in ("qempo", "dpo") for b in (1, 2)}
    for row in offline["rows"]:
        assert "error" not in row, row
        assert row["step_s"] > 0 and math.isfinite(row["step_s"])
        assert row["tokens_per_s"] == pytest.approx(2 * row["micro_batch"] * row["seq_len"] / row["step_s"])
        assert row["mfu"] is None and row["peak_reserved_gb"] is None  # no GPU: nothing invented
    online = json.loads((tmp_path / "gpu_online.json").read_text())
    rows = {r["method"]: r for r in online["rows"]}
    assert set(rows) == {"qempo", "gvpo"}
    for method, row in rows.items():
        assert "error" not in row, row
        assert row["steps_run"] == 2 and row["weights_finite"]
        assert row["rollout_s"] > 0 and row["train_s"] > 0 and row["scoring_s"] >= 0
        assert row["step_s"] == pytest.approx(row["rollout_s"] + row["scoring_s"] + row["train_s"])
    # qempo never computes reference log-probs; gvpo does once per generation batch.
    assert rows["qempo"]["reference_passes"] == 0
    assert rows["gvpo"]["reference_passes"] == 2
