"""The seed summary of the real-model demos: mean ± std per metric, and the goal checked on the means."""

import json
import statistics

from qempo_lite.demo import real_summary


def _report(seed, rows):
    return {"seed": seed, "methods": {m: {"accuracy": a, "correct_entropy": h, "distinct_correct": 5.0,
                                          "pass_at_k": {"1": a, "16": 0.9}, "lexical": 80.0, "semantic": 30.0}
                                      for m, (a, h) in rows.items()}}


def test_offline_summary_averages_seeds_and_checks_the_offline_goal(tmp_path):
    seeds = {0: {"dpo": (0.50, 1.20), "qempo_kl": (0.48, 1.30), "qempo": (0.49, 1.45), "dpo_js": (0.5, 1.25)},
             1: {"dpo": (0.52, 1.22), "qempo_kl": (0.47, 1.36), "qempo": (0.45, 1.39), "dpo_js": (0.5, 1.21)}}
    runs = []
    for seed, rows in seeds.items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "report.json").write_text(json.dumps(_report(seed, rows)))
        runs.append(str(tmp_path / f"seed{seed}"))
    out = tmp_path / "summary.md"
    assert real_summary.main([str(out), *runs]) == 0
    text = out.read_text()
    mean, std = statistics.fmean([1.45, 1.39]), statistics.stdev([1.45, 1.39])
    assert f"| qempo | 0.470 ± 0.028 | {mean:.3f} ± {std:.3f} |" in text
    # qempo − dpo: +0.21 nats on the mean (+0.25, +0.17 per seed), at accuracy 0.04 below dpo's.
    assert "- met: correct entropy qempo ≥ dpo + 0.2 (+0.210; per seed +0.250, +0.170 nats)" in text
    assert "- met: correct entropy qempo ≥ qempo_kl" in text and "- met: correct entropy qempo ≥ dpo_js" in text
    assert "- NOT met: accuracy qempo ≥ dpo − 0.03 (-0.040; per seed -0.010, -0.070)" in text
    assert (tmp_path / "summary_entropy_vs_accuracy.png").stat().st_size > 0


def test_online_summary_checks_the_online_goal(tmp_path):
    rows = {"qempo": (0.45, 1.40), "grpo": (0.48, 1.15), "gvpo": (0.47, 1.25)}
    (tmp_path / "s0").mkdir()
    (tmp_path / "s0" / "report.json").write_text(json.dumps(_report(0, rows)))
    out = tmp_path / "online.md"
    real_summary.main([str(out), str(tmp_path / "s0")])
    text = out.read_text()
    assert "- met: qempo correct entropy ≥ grpo's + 0.2" in text and "- met: qempo correct entropy ≥ gvpo's" in text
    assert "- met: qempo accuracy ≥ the best baseline's − 0.03 (0.450 vs 0.480)" in text
    assert "dpo" not in text
