"""The page's HTML and chart for a comparison's result; every text from a model or a user is escaped."""

from __future__ import annotations

import html
import math
import re

from ..adapters import METADATA_FILE
from ..evaluate.metrics import METRICS


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def column_html(column: dict) -> str:
    """One column: header (name, method, coefficients), samples, metrics; all text escaped."""

    def esc(text: str) -> str:
        # Control characters (a small model emits some) would be invisible or break the layout.
        return html.escape(_CONTROL.sub("\ufffd", text))

    meta = column.get("metadata") or {}
    head = [f"<div class='qempo-name'>{esc(column['name'])}</div>"]
    if column.get("adapter") is None and column["name"] == "base":
        head.append("<div class='qempo-meta'>base model, no adapter</div>")
    if meta.get("method"):
        coefficients = ", ".join(f"{esc(str(k))}={esc(str(v))}" for k, v in (meta.get("coefficients") or {}).items())
        head.append(f"<div class='qempo-meta'>method <b>{esc(str(meta['method']))}</b>"
                    f"{' · ' + coefficients if coefficients else ''}</div>")
    elif column.get("adapter"):
        head.append(f"<div class='qempo-meta'>no {METADATA_FILE}: method unknown</div>")
    if column.get("adapter"):
        head.append(f"<div class='qempo-path'>{esc(column['adapter'])}</div>")
    parts = [f"<div class='qempo-column' data-name='{esc(column['name'])}'>",
             f"<div class='qempo-head'>{''.join(head)}</div>"]
    if column.get("error"):
        parts.append(f"<div class='qempo-error'>{esc(column['error'])}</div>")
    else:
        items = "".join(
            f"<li class='qempo-sample'>{esc(s['text']) if s['text'].strip() else '<i>(empty)</i>'}</li>"
            for s in column["samples"])
        parts.append(f"<ol class='qempo-samples'>{items}</ol>")
        m = column.get("metrics") or {}
        rows = [(metric.label, _fmt(m.get(metric.name), 3 if metric.fraction else 1)) for metric in METRICS]
        rows.append(("mean length (tokens)", _fmt(m.get("mean_tokens"))))
        if "judge" in m:
            rows.append(("mean judge score", _fmt(m.get("judge"), 2)))
        cells = "".join(f"<tr><td>{esc(k)}</td><td class='qempo-value'>{v}</td></tr>" for k, v in rows)
        parts.append(f"<table class='qempo-metrics'>{cells}</table>")
        parts += [f"<div class='qempo-note'>{esc(note)}</div>" for note in column.get("notes", [])]
    parts.append("</div>")
    return "".join(parts)


def comparison_chart(result: dict):
    """Grouped bars: one group per metric (x100), one bar per column.

    Labels are plain text (a run named ``run-$\\frac$`` is no math), and the figure is drawn once
    here, so that anything it cannot draw fails inside the request's error handling.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    columns = [c for c in result.get("columns", []) if c.get("metrics")]
    if not columns:
        return None
    with matplotlib.rc_context({"text.parse_math": False}):
        fig = _chart(columns)
        FigureCanvasAgg(fig).draw()
    return fig


def _chart(columns: list[dict]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        values = [column["metrics"].get(metric.name) for metric in METRICS]
        # A metric that could not be computed gets no bar (NaN), not a misleading zero.
        values = [math.nan if v is None else (100 * v if metric.fraction else v) for v, metric in zip(values, METRICS)]
        ax.bar([j + (i - (len(columns) - 1) / 2) * width for j in range(len(values))], values, width,
               label=column["name"])
    ax.set_xticks(range(len(METRICS)), [metric.label for metric in METRICS])
    ax.set_ylabel("score (x100)")
    ax.set_ylim(0, 100)
    ax.set_title("Diversity per column (higher is more diverse)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


_MARKDOWN = re.compile(r"([!-%'-/:;=?@\[-`{-~])")  # ASCII punctuation but & < > (written as HTML entities)


def plain_markdown(text: str) -> str:
    """``text`` shown as typed in a Markdown component: no HTML, link, image or emphasis of its own."""
    return html.escape(_MARKDOWN.sub(r"\\\1", text), quote=False)


def errors_markdown(result: dict) -> str:
    return "\n".join(f"**Error:** {plain_markdown(e)}  " for e in result.get("errors", []))
