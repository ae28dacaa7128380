"""Math problems with verifiable gold answers (GSM8K, MATH) for online training and pass@k.

GSM8K rows (``question``/``answer``) carry the gold answer after a final ``#### x`` line;
MATH rows (``problem``/``solution``) in the solution's last ``\\boxed{}``. The box parsing here
(:data:`BOX_START`, :func:`box_end`) is also the one :mod:`qempo_lite.rewards` grades
completions with.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .files import MAX_ROW_BYTES, BadRow, Row, is_local_source
from .rows import load_rows, text_field

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to every math question: the answer checker grades the last answer the completion states
(a ``\\boxed{}`` among them; see :mod:`qempo_lite.rewards`)."""

BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
"""The opening of a box, up to its brace: ``\\boxed{``, ``\\fbox {``."""
_BRACE = re.compile(r"(?<!\\)[{}]|\\[{}]")


def box_end(text: str, open_brace_end: int) -> int | None:
    """Index of the brace closing a box whose ``{`` ends at ``open_brace_end``; None when never closed.

    Braces nest; an escaped ``\\{`` or ``\\}`` counts as a brace too, and a box it closes ends
    before its backslash.
    """
    depth = 1
    for brace in _BRACE.finditer(text, open_brace_end):
        depth += 1 if brace.group().endswith("{") else -1
        if depth == 0:
            return brace.start()
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included."""
    # Only the last few starts: an unclosed brace (a truncated generation) must not cost O(n^2).
    for start in reversed([m.end() for m in BOX_START.finditer(text)][-3:]):
        end = box_end(text, start)
        if end is not None:
            return text[start:end].strip()
    return None


GSM8K_FINAL = re.compile(r"####\s*(.*?)\s*$", re.DOTALL)


def _math_prompt(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    prompt = [{"role": "user", "content": f"{question.strip()}\n{MATH_INSTRUCTION}"}]
    if system_prompt:
        prompt.insert(0, {"role": "system", "content": system_prompt})
    return prompt


def gsm8k_answer(solution: str) -> str | None:
    """The gold answer after ``####`` in a GSM8K solution, thousands separators removed."""
    found = GSM8K_FINAL.search(solution)
    if not found or not found.group(1):
        return None
    return found.group(1).replace(",", "").strip()


def _pick_math_converter(system_prompt: str | None):
    def gsm8k(row: Row) -> Row:
        question, solution = text_field(row, "question"), text_field(row, "answer")
        answer = gsm8k_answer(solution)
        if answer is None:
            raise BadRow("answer", "has no final '#### <answer>' line")
        return {"prompt": _math_prompt(question, system_prompt), "answer": answer, "solution": solution}

    def math(row: Row) -> Row:
        problem, solution = text_field(row, "problem"), text_field(row, "solution")
        answer = last_boxed(solution)
        if not answer and isinstance(row.get("answer"), str) and row["answer"].strip():
            answer = row["answer"].strip()  # MATH-500 style rows carry the answer separately
        if not answer:
            raise BadRow("solution", "has no \\boxed{...} final answer")
        return {"prompt": _math_prompt(problem, system_prompt), "answer": answer, "solution": solution}

    def pick(row: Row):
        if "question" in row and "answer" in row:
            return "gsm8k", gsm8k
        if "problem" in row and "solution" in row:
            return "math", math
        return None

    return pick


def load_math(
    source: str | Path | Any,
    *,
    split: str = "test",
    config: str | None = None,
    on_bad_rows: str = "error",
    limit: int | None = None,
    system_prompt: str | None = None,
    return_report: bool = False,
    max_row_bytes: int = MAX_ROW_BYTES,
):
    """Math problems with verifiable gold answers, for online training and pass@k.

    Reads GSM8K (``question``/``answer`` with a final ``#### x`` line; the Hub's
    ``openai/gsm8k`` gets config ``"main"`` by default) or MATH (``problem``/``solution``
    with the answer in the last ``\\boxed{}``). Arguments as in :func:`load_preferences`.

    Returns:
        A Dataset with ``prompt`` (``[{"role": "user", "content": question + MATH_INSTRUCTION}]``,
        after an optional system message), ``answer`` (the gold final answer as a string:
        GSM8K ``"#### 1,800"`` -> ``"1800"``; MATH the last ``\\boxed{}`` content) and
        ``solution`` (the original worked solution).
    """
    gsm8k_hub = isinstance(source, str) and source.rstrip("/").endswith("gsm8k") and not is_local_source(source)
    if config is None and gsm8k_hub:
        config = "main"
    dataset, report = load_rows(
        source,
        _pick_math_converter(system_prompt),
        split=split,
        config=config,
        on_bad_rows=on_bad_rows,
        limit=limit,
        max_row_bytes=max_row_bytes,
        expected="'question'/'answer' (GSM8K) or 'problem'/'solution' (MATH)",
    )
    return (dataset, report) if return_report else dataset
