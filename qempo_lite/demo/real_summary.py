"""Mean ± standard deviation over seeds of the real-model demos' reports, and the goals checked on them.

``python -m qempo_lite.demo.real_summary OUT.md RUN_DIR [RUN_DIR ...]`` reads each run's
``report.json`` (one per seed, same settings), writes a markdown table of every metric as
mean ± sample standard deviation, the goal's checks (the online or the offline one, from the
methods present) on the means with each seed's gap, and ``OUT_entropy_vs_accuracy.png`` beside
``OUT.md`` with one point per method and seed plus the means.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METRICS = (("accuracy", "accuracy", ".3f"), ("correct_entropy", "correct entropy", ".3f"),
           ("distinct_correct", "distinct correct", ".2f"), ("pass@1", "pass@1", ".3f"),
           ("pass@16", "pass@16", ".3f"), ("lexical", "lexical", ".1f"), ("semantic", "semantic", ".1f"))


def _value(row: dict, key: str):
    if key.startswith("pass@"):
        return row["pass_at_k"].get(key[5:])
    return row.get(key)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(reports: list[dict]) -> dict:
    """``{method: {metric: (mean, std, [values])}}`` over the reports (methods present in all of them)."""
    methods = [m for m in reports[0]["methods"] if all(m in r["methods"] for r in reports)]
    table = {}
    for method in methods:
        table[method] = {}
        for key, _, _ in METRICS:
            values = [_value(r["methods"][method], key) for r in reports]
            if all(v is not None for v in values):
                table[method][key] = (*mean_std(values), values)
    return table


def _gap(table: dict, a: str, b: str, key: str, margin: float = 0.0) -> tuple[float, str]:
    """``mean(a) − mean(b) − margin`` of ``key``, and the per-seed gaps ``a − b`` as text."""
    per_seed = [x - y for x, y in zip(table[a][key][2], table[b][key][2])]
    gap = table[a][key][0] - table[b][key][0]
    return gap - margin, f"{gap:+.3f}; per seed " + ", ".join(f"{g:+.3f}" for g in per_seed)


def offline_goal(table: dict) -> list[tuple[str, bool, str]]:
    """Issue goal (offline): correct_entropy ordered qempo ≥ qempo_kl ≥ dpo, qempo ≥ dpo + 0.2 nats and ≥ both
    f-DPO variants, at accuracy ≥ dpo's − 0.03 (means over seeds)."""
    if not {"qempo", "dpo"} <= set(table):
        return []
    checks = []
    if "qempo_kl" in table:
        for a, b in (("qempo", "qempo_kl"), ("qempo_kl", "dpo")):
            excess, detail = _gap(table, a, b, "correct_entropy")
            checks.append((f"correct entropy {a} ≥ {b}", excess >= 0, detail + " nats"))
    excess, detail = _gap(table, "qempo", "dpo", "correct_entropy", 0.2)
    checks.append(("correct entropy qempo ≥ dpo + 0.2", excess >= 0, detail + " nats"))
    for other in [m for m in table if m.startswith("dpo_")]:
        excess, detail = _gap(table, "qempo", other, "correct_entropy")
        checks.append((f"correct entropy qempo ≥ {other}", excess >= 0, detail + " nats"))
    excess, detail = _gap(table, "qempo", "dpo", "accuracy", -0.03)
    checks.append(("accuracy qempo ≥ dpo − 0.03", excess >= 0, detail))
    return checks


def online_goal(table: dict) -> list[tuple[str, bool, str]]:
    """Issue goal (online): qempo's correct_entropy ≥ every GRPO variant's + 0.2 and ≥ gvpo's, at accuracy ≥ the
    best variant's − 0.03 (means over seeds)."""
    if "qempo" not in table:
        return []
    q = table["qempo"]
    grpos = [m for m in table if m.startswith("grpo")]
    checks = []
    for other in grpos:
        excess, detail = _gap(table, "qempo", other, "correct_entropy", 0.2)
        checks.append((f"qempo correct entropy ≥ {other}'s + 0.2", excess >= 0, detail + " nats"))
    if "gvpo" in table:
        excess, detail = _gap(table, "qempo", "gvpo", "correct_entropy")
        checks.append(("qempo correct entropy ≥ gvpo's", excess >= 0, detail + " nats"))
    if grpos or "gvpo" in table:
        best = max(table[m]["accuracy"][0] for m in grpos + (["gvpo"] if "gvpo" in table else []))
        checks.append(("qempo accuracy ≥ the best baseline's − 0.03", q["accuracy"][0] >= best - 0.03,
                       f"{q['accuracy'][0]:.3f} vs {best:.3f}"))
    return checks


def markdown(table: dict, checks: list, seeds: list) -> str:
    header = ["policy"] + [label for _, label, _ in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in table.items():
        cells = [method] + [f"{format(row[key][0], spec)} ± {format(row[key][1], spec)}" if key in row else "n/a"
                            for key, _, spec in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± standard deviation over seeds {', '.join(str(s) for s in seeds)}.", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: {name} ({detail})" for name, ok, detail in checks]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, row in table.items():
        points = ax.scatter(row["accuracy"][2], row["correct_entropy"][2], s=14, alpha=0.45)
        ax.errorbar(row["accuracy"][0], row["correct_entropy"][0], xerr=row["accuracy"][1],
                    yerr=row["correct_entropy"][1], fmt="o", color=points.get_facecolor()[0], capsize=3, label=method)
    ax.set(xlabel="accuracy (held-out)", ylabel="correct-answer entropy (nats)",
           title="Correct-answer entropy against accuracy (mean ± std; dots: seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    out, runs = Path(argv[0]), [Path(a) for a in argv[1:]]
    reports = [json.loads((run / "report.json").read_text()) for run in runs]
    table = summarise(reports)
    checks = online_goal(table) if any(m.startswith("grpo") or m == "gvpo" for m in table) else offline_goal(table)
    out.write_text(markdown(table, checks, [r["seed"] for r in reports]))
    plot(table, out.with_name(out.stem + "_entropy_vs_accuracy.png"))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
