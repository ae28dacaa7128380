"""The evaluation report: ``report.json``, ``report.md`` (Table 2 layout) and the two figures.

``qempo-lite eval diversity``, ``judge`` and ``passk`` each write a JSON file with a
``"kind"``; the report merges any of them by adapter name:

    report.json = {"adapters": {name: {"lexical", "semantic", "syntactic", "average", "judge",
                                       "pass@1", "pass@k": {k: value}, "details": {...}}},
                   "protocol": "guo2024", "parser": spaCy pipeline, "encoder": sentence encoder,
                   "encoder_dtype", "diversity": {...}, "judge": {...}, "passk": {...}, "inputs": [...]}

Diversity is x100 as in the paper, by Guo et al. (2024)'s protocol (``"protocol": "guo2024"``,
see :mod:`qempo_lite.evaluate.diversity`); ``parser`` and ``encoder`` name the models it used
(``null`` without a diversity input). Missing values are ``null`` (and "–" in the table). Name
each adapter after its directory: the model card of ``qempo-lite push`` finds its row by that
name in a ``report.json`` next to (or one or two levels above) the adapter.

Figures (matplotlib, Agg): ``diversity_quality.png`` — average diversity against the judge
score (or, without one, pass@1), one labelled point per adapter, as the paper's Figure 2 —
and ``passk.png`` — pass@k against k on a log2 axis, one line per adapter, as Figure 3.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qempo_lite.errors import QempoError, not_a_file

from .diversity import PROTOCOL
from .metrics import AVERAGE, SCORES, TABLE2, definition_difference, definition_of

logger = logging.getLogger("qempo_lite")

KINDS = ("diversity", "judge", "passk")
DIVERSITY = tuple(SCORES)
COLUMNS = (*((label.capitalize(), key) for key, label in SCORES.items()), ("Judge", "judge"))  # (header, key)
FILES = {"json": "report.json", "markdown": "report.md", "scatter": "diversity_quality.png", "passk": "passk.png"}


def load_inputs(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The JSON outputs of ``eval diversity``/``judge``/``passk``, checked for their ``kind``."""
    if not paths:
        raise QempoError("no inputs; pass the JSON files of 'qempo-lite eval diversity', 'judge' or 'passk'")
    inputs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise QempoError(f"report input {path} {not_a_file(path)}; pass files written by 'qempo-lite eval ...'")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise QempoError(f"report input {path} is not JSON ({err.msg}); pass files written by "
                             "'qempo-lite eval'") from None
        if not isinstance(data, dict) or data.get("kind") not in KINDS or not isinstance(data.get("adapters"), dict):
            raise QempoError(f"report input {path} is not a diversity, judge or passk result (field 'kind' or "
                             "'adapters'); pass files written by 'qempo-lite eval diversity|judge|passk'")
        problem = _row_problem(data)
        if problem:
            raise QempoError(f"report input {path}: {problem}; pass files written by 'qempo-lite eval "
                             f"{data['kind']}' (or write it again)")
        data["_path"] = str(path)
        inputs.append(data)
    return inputs


def _is_score(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _row_problem(data: dict) -> str | None:
    """What is wrong with the per-adapter values of a result file (None when they are as 'eval' writes them)."""
    for name, values in data["adapters"].items():
        where = f"adapter {name!r}"
        if not isinstance(values, dict):
            return f"{where} holds {str(values)[:40]!r}, not an object of scores"
        if data["kind"] == "diversity":
            for key in (*DIVERSITY, "n_texts", "n_sentences"):
                if not _is_score(values.get(key)):
                    return f"{where}: field '{key}' is {values[key]!r}, not a number"
        elif data["kind"] == "judge":
            if not _is_score(values.get("judge")):
                return f"{where}: field 'judge' is {values['judge']!r}, not a number"
        else:
            curve = values.get("pass@k")
            if curve is None:
                continue
            if not isinstance(curve, dict):
                return f"{where}: field 'pass@k' is {str(curve)[:40]!r}, not an object of k: value"
            for k, value in curve.items():
                if not str(k).isdigit() or int(k) < 1 or not _is_score(value):
                    return f"{where}: field 'pass@k' has {k!r}: {value!r}, not a whole k >= 1 and a number"
    return None


def _refuse_mixed_definitions(diversity: Sequence[dict]) -> None:
    """One line when a diversity input was scored by metrics of another version than this code's, or when two
    inputs were scored differently (their rows would share a table without being comparable)."""
    current = {m.name: m.version for m in TABLE2}
    for data in diversity:
        recorded = (data.get("definition") or {}).get("metrics")
        if recorded is not None and recorded != current:
            raise QempoError(f"report input {data.get('_path')} was scored by other metric versions ({recorded}, "
                             f"now {current}); score the samples again with 'qempo-lite eval diversity'")
    for data in diversity[1:]:
        changed = definition_difference(definition_of(diversity[0]), definition_of(data))
        if changed:
            raise QempoError(f"report inputs {diversity[0].get('_path')} and {data.get('_path')} were scored "
                             f"differently ({changed}); score both the same way before reporting them together")


def build_report(inputs: Sequence[dict]) -> dict[str, Any]:
    """Merge result files by adapter into the report.json structure (see the module docstring)."""
    report: dict[str, Any] = {"adapters": {}, "protocol": None, "parser": None, "encoder": None, "inputs": []}
    for data in inputs:
        if data["kind"] == "diversity" and data.get("protocol") != PROTOCOL:
            raise QempoError(f"report input {data.get('_path')} was scored by another diversity protocol "
                             f"({data.get('protocol')!r}, not {PROTOCOL!r}); score the samples again with "
                             "'qempo-lite eval diversity'")
    _refuse_mixed_definitions([data for data in inputs if data["kind"] == "diversity"])

    def row(name: str) -> dict:
        return report["adapters"].setdefault(name, {**{k: None for k in DIVERSITY}, "judge": None, "pass@1": None,
                                                    "pass@k": {}, "details": {}})

    for data in inputs:
        kind = data["kind"]
        report["inputs"].append({"kind": kind, "path": data.get("_path")})
        for name, values in data["adapters"].items():
            target = row(name)
            if kind == "diversity":
                for key in DIVERSITY:
                    target[key] = values.get(key)
                target["details"].update({k: values[k] for k in ("n_texts", "n_sentences", "per_question")
                                          if k in values})
            elif kind == "judge":
                target["judge"] = values.get("judge")
                target["details"].update({k: v for k, v in values.items() if k != "judge"})
            else:
                target["pass@k"] = dict(values.get("pass@k") or {})
                target["pass@1"] = target["pass@k"].get("1")
                target["details"].update({k: values[k] for k in ("n", "n_problems", "accuracy") if k in values})
        if kind == "diversity":
            report.update({k: data.get(k) for k in ("protocol", "parser", "encoder", "encoder_dtype")})
            report["diversity"] = {k: data[k] for k in ("samples", "sample_sizes", "seed", "definition") if k in data}
        elif kind == "judge":
            report["judge"] = data.get("judge", {})
        else:
            report["passk"] = {k: data[k] for k in ("data", "n", "temperature") if k in data}
    return report


# ------------------------------------------------------------------------------ markdown


def _cell(value: Any, digits: int = 2) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "–"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict[str, Any], figures: Sequence[str] = ()) -> str:
    """report.md: the Table 2 layout, the per-question means, pass@k, and the figures."""
    adapters = report["adapters"]
    lines = ["# Evaluation report", ""]
    judge = report.get("judge") or {}
    notes = []
    if report.get("protocol"):
        dtype = f" ({report['encoder_dtype']})" if report.get("encoder_dtype") else ""
        metrics = ", ".join(label for key, label in SCORES.items() if key != AVERAGE)
        notes.append(f"Diversity ×100 by Guo et al. (2024)'s protocol (`{report['protocol']}`: {metrics}), "
                     f"pooled over all samples of each adapter; parser: spaCy `{report.get('parser')}`, "
                     f"sentence encoder: `{report.get('encoder')}`{dtype}.")
    if judge:
        notes.append(f"Judge: `{judge.get('model', '?')}`, MT-Bench single-answer grading (1–10), mean over the "
                     "rated samples.")
    elif report.get("no_judge"):
        notes.append(report["no_judge"])
    lines += notes + ([""] if notes else [])
    lines += _table(["Adapter", *(c for c, _ in COLUMNS)],
                    [[name, *(_cell(r.get(k)) for _, k in COLUMNS)] for name, r in adapters.items()])
    per_question = {n: r["details"].get("per_question") for n, r in adapters.items()
                    if isinstance(r.get("details", {}).get("per_question"), dict)}
    if per_question:
        lines += ["", "## Diversity per question", "",
                  "Mean over the sets of samples answering one question turn (a 16-sample set each in the "
                  "MT-Bench protocol).", ""]
        lines += _table(["Adapter", *(header for header, key in COLUMNS if key in SCORES)],
                        [[n, *(_cell(pq.get(k)) for k in DIVERSITY)] for n, pq in per_question.items()])
    ks = sorted({int(k) for r in adapters.values() for k in r.get("pass@k", {})})
    if ks:
        passk = report.get("passk") or {}
        title = "## pass@k"
        if passk.get("data"):
            title += f" on {passk['data']}"
        if passk.get("n"):
            title += f" (n = {passk['n']} samples per problem)"
        lines += ["", title, ""]
        lines += _table(["Adapter", *(f"pass@{k}" for k in ks)],
                        [[n, *(_cell(r["pass@k"].get(str(k)), 3) for k in ks)] for n, r in adapters.items()
                         if r.get("pass@k")])
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def plot_diversity_quality(report: dict[str, Any], path: str | os.PathLike) -> bool:
    """Figure 2 style: average diversity (x) against the judge score, else pass@1 (y); False if no data."""
    adapters = report["adapters"]
    quality_key = "judge" if any(r.get("judge") is not None for r in adapters.values()) else "pass@1"
    points = [(n, r["average"], r[quality_key]) for n, r in adapters.items()
              if r.get("average") is not None and r.get(quality_key) is not None]
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for i, (name, x, y) in enumerate(points):
        ax.scatter([x], [y], s=60, color=f"C{i % 10}", zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=9)
    ax.set_xlabel("average diversity (×100)")
    ax.set_ylabel("judge score (1–10)" if quality_key == "judge" else "pass@1")
    ax.set_title("Diversity and quality")
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_passk(report: dict[str, Any], path: str | os.PathLike) -> bool:
    """Figure 3 style: pass@k against k (log2 axis), one line per adapter; False if no pass@k."""
    curves = {n: sorted((int(k), v) for k, v in r["pass@k"].items()) for n, r in report["adapters"].items()
              if r.get("pass@k")}
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    ks = sorted({k for curve in curves.values() for k, _ in curve})
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot([k for k, _ in curve], [v for _, v in curve], marker="o", color=f"C{i % 10}", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 1.0))  # a probability: no axis room below 0 or above 1
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    passk = report.get("passk") or {}
    ax.set_title(f"pass@k{' on ' + Path(str(passk['data'])).name if passk.get('data') else ''}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and whichever figures have data; returns what was written."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for key, plot in (("scatter", plot_diversity_quality), ("passk", plot_passk)):
        if plot(report, out / FILES[key]):
            written[key] = out / FILES[key]
        else:
            logger.info("no data for %s; not drawn", FILES[key])
    (out / FILES["json"]).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / FILES["markdown"]).write_text(markdown(report, [str(p) for p in written.values()]), encoding="utf-8")
    return {"json": out / FILES["json"], "markdown": out / FILES["markdown"], **written}


__all__ = ["load_inputs", "build_report", "markdown", "plot_diversity_quality", "plot_passk", "write_report"]
