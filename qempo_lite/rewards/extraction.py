"""Finding the final answer a completion states, and the gold answer of a reference solution.

Rule 1 of :mod:`qempo_lite.rewards`, **the last answer stated wins**, whatever phrase states it
(:func:`extract_answer`). The statements are: the last ``\\boxed{x}`` / ``\\fbox{x}`` that is
not empty (nested braces handled; among the last three; ``\\boxed x`` too); the last ``#### x``
(not a markdown heading: ``#### Final Answer``); "answer(s) [to / for / of ...] is / are / was
/ were / will be / would be / should be / must be / equals / = / : x" anywhere in a line
("answer" in lower, capital or upper case; the last 16 such phrases are tried); and a line
``A: x``. The statement that starts last in the text is the final answer. A phrase, ``####`` or
``A:`` answer runs to the end of its clause: the line end, a "." or "!" before a space, ", " or
"; " before a letter, " (" after a word or number, an unmatched closing bracket, or one of the
words because, since, as, which, so, given, where, when, for, after, before, but, while, or
"and" before a word (not "and a half"). A phrase whose answer is empty or only confirms (starts
with correct, right, consistent, reasonable, plausible, valid, verified, confirmed, indeed,
(as) follows, shown, given, clear, obvious, straightforward, simple, that, this, the same,
boxed, in the box, found, calculated, computed, obtained, determined) is not a statement. A
final ``\\boxed{`` that is never closed is a cut-off answer: 0, counted as malformed. With no
statement at all, the answer is the number holding the last digit of the text, with its
fraction, exponent and scale words.

A gold reference (:func:`gold_answer`) is read with the dataset loaders' own parsers
(:mod:`qempo_lite.data.math_problems`): the value after ``####`` (GSM8K), else the last
``\\boxed{}`` (MATH), else the bare value; completions' boxes are matched by the same
:func:`~qempo_lite.data.box_end`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..data import BOX_START, box_end, gsm8k_answer, last_boxed
from .compare import SCALE_WORD

MAX_ANSWER_CHARS = 1_000
"""Longer extracted answers are not handed to sympy, whose time on them is unbounded."""

BOX_BARE = re.compile(r"\\boxed[ \t]+([^\s${}\\]+)")
HASHES = re.compile(r"####[ \t]*")
ANSWER_PHRASE = re.compile(
    r"(?<![A-Za-z])answers?\b(?:[ \t]+(?:to|for|of)\b[^.\n:=]{0,60}?)?[ \t*_]*"
    r"(?:\b(?:is|are|was|were|will\s+be|would\s+be|should\s+be|must\s+be|equals)\b|=|:)[ \t*_:]*",
    re.IGNORECASE,
)
A_LINE = re.compile(r"A[ \t]*:[ \t]*")
CONFIRMS = re.compile(
    r"(?:correct|right|consistent|reasonable|plausible|valid|verified|confirmed|indeed|as\s+follows|"
    r"follows|shown|given|clear|obvious|straightforward|simple|that|this|the\s+same|boxed|in\s+the\s+box|"
    r"found|calculated|computed|obtained|determined|in\s+(?:the\s+)?(?:box|\\boxed))\b",
    re.IGNORECASE,
)
_CLAUSE_WORD = re.compile(
    r"\s+(?:because|since|as|which|so|given|where|when|for|after|before|but|while|"
    r"and(?!\s+a\s+(?:half|quarter)\b)(?=\s+[a-z]))\b"
)
_NUM = r"(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
VALUE = re.compile(
    rf"-?{_NUM}(?:[eE][-+]?\d+)?"
    r"(?:\s*(?:\\times|\\cdot|×|·|\*|x)\s*10\s*(?:\^|\*\*)\s*\{?\s*[-+]?\d+\s*\}?)?"
    r"(?:\s+\d+\s*/\s*\d+|\s*/\s*\d+(?:\.\d+)?|\s+and\s+(?:a\s+(?:half|quarter)|\d+\s*/\s*\d+))?"
    rf"(?:\s+{SCALE_WORD}\b)*",
    re.IGNORECASE,
)


class Statement(NamedTuple):
    """Where the final answer is: its statement starts at ``start``, its value is ``[value_start, value_end)``."""

    kind: str  # box, bare_box, hashes, phrase, a_line, cut_box, last_number
    start: int
    value_start: int
    value_end: int


def _clause_end(text: str, pos: int) -> int:
    """Where a stated answer beginning at ``pos`` ends: the end of its clause (see the module docstring)."""
    line_end = text.find("\n", pos)
    end = min(len(text) if line_end < 0 else line_end, pos + MAX_ANSWER_CHARS + 1)
    depth, i = 0, pos
    while i < end:
        char = text[i]
        if char == "\\" and i + 1 < end:
            i += 2  # an escaped character (\$, \{, \,) never ends a clause
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return i  # an unmatched closer: the answer sat inside a bracket or a box
            depth -= 1
        elif depth == 0:
            rest = text[i:i + 16]
            if char in ".!" and (i + 1 == end or text[i + 1].isspace()) and text[i - 1] != ".":
                return i
            if char in ",;" and re.match(r"[,;]\s+[A-Za-z]", rest):
                return i
            if char.isspace() and i > pos and (
                (text[i - 1].isalnum() or text[i - 1] in "%$") and re.match(r"\s+\(", rest)
                or _CLAUSE_WORD.match(text, i, end)
            ):
                return i
        i += 1
    return end


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    found = None
    for found in pattern.finditer(text):
        pass
    return found


def _starts(text: str, needles: tuple[str, ...]) -> list[int]:
    """Every index where one of ``needles`` occurs, in order (str.find is far faster than a regex scan)."""
    found = []
    for needle in needles:
        index = text.find(needle)
        while index >= 0:
            found.append(index)
            index = text.find(needle, index + 1)
    return sorted(found)


_MAX_PHRASES_TRIED = 16
"""Only the last few "answer is" phrases are tried, so that a flood of them costs O(n)."""


def _last_phrase(text: str) -> Statement | None:
    """The last "answer is x" / "Answer: x" statement whose value is not empty and not a confirmation."""
    tried = 0
    for index in reversed(_starts(text, ("answer", "Answer", "ANSWER"))):
        found = ANSWER_PHRASE.match(text, index)
        if not found or (index and text[index - 1].isalpha()):
            continue
        end = _clause_end(text, found.end())
        value = text[found.end():end].strip(" \t*_.")
        if value and not CONFIRMS.match(value):
            return Statement("phrase", index, found.end(), end)
        tried += 1
        if tried == _MAX_PHRASES_TRIED:
            return None
    return None


def _last_a_line(text: str) -> re.Match | None:
    """The last line that starts with ``A:``."""
    for index in reversed(_starts(text, ("A:", "A :", "A\t:"))):
        before = index
        while before and text[before - 1] in " \t":
            before -= 1
        if before == 0 or text[before - 1] == "\n":
            return A_LINE.match(text, index)
    return None


def final_statement(text: str) -> Statement | None:
    """The answer statement that starts last in ``text``, else the last number, else None."""
    candidates: list[Statement] = []
    # The last box that is not empty ("in \\boxed{}" restates the instruction); only the last
    # few starts are tried, so that unclosed braces cannot cost O(n^2).
    box_starts = _starts(text, ("\\boxed", "\\fbox"))
    boxes = [box for box in (BOX_START.match(text, index) for index in box_starts) if box]
    for box in reversed(boxes[-3:]):
        close = box_end(text, box.end())
        if close is None:
            candidates.append(Statement("cut_box", box.start(), box.end(), len(text)))
            break
        if text[box.end():close].strip():
            candidates.append(Statement("box", box.start(), box.end(), close))
            break
    bare = next((found for found in (BOX_BARE.match(text, index) for index in reversed(box_starts)) if found), None)
    if bare:
        candidates.append(Statement("bare_box", bare.start(), bare.start(1), bare.end(1)))
    hashes = text.rfind("####")
    if hashes >= 0:
        found = HASHES.match(text, hashes)
        if not text[found.end():found.end() + 1].isalpha():  # "#### Final Answer" is a markdown heading
            candidates.append(Statement("hashes", hashes, found.end(), _clause_end(text, found.end())))
    a_line = _last_a_line(text)
    if a_line:
        candidates.append(Statement("a_line", a_line.start(), a_line.end(), _clause_end(text, a_line.end())))
    phrase = _last_phrase(text)
    if phrase:
        candidates.append(phrase)
    if candidates:
        return max(candidates, key=lambda statement: statement.start)
    last_digit = max(text.rfind(digit) for digit in "0123456789")
    if last_digit < 0:
        return None
    # The number holding the last digit, with its fraction, exponent and scale words.
    number = _last_match(VALUE, text[max(0, last_digit - 80):last_digit + 80])
    offset = max(0, last_digit - 80)
    end = offset + number.start() + len(number.group().rstrip(","))
    return Statement("last_number", offset + number.start(), offset + number.start(), end)


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``, or None (rule 1, see the module docstring).

    The value of the statement that starts last: a ``\\boxed{}``'s content, the clause after
    ``####`` / "the answer is" / ``Answer:`` / ``A:``; failing any statement, the last number.
    None for no answer or a final ``\\boxed{`` that was never closed.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    statement = final_statement(text)
    if statement is None or statement.kind == "cut_box":
        return None
    return statement_value(text, statement) or None


def statement_value(text: str, statement: Statement) -> str:
    """The value a statement gives, without markdown emphasis around it or a closing full stop."""
    return text[statement.value_start:statement.value_end].strip(" \t*_").rstrip(".").strip()


def gold_answer(gold: str | int | float) -> str | None:
    """The final answer of a gold reference: ``#### x`` (GSM8K), last ``\\boxed{}`` (MATH), or the bare value."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip():
        return None
    if "####" in gold:
        return gsm8k_answer(gold)
    return last_boxed(gold) or gold.strip()
