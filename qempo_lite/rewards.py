"""Verifiable rewards: is a completion's final answer to a math problem right?

``math_correct(completion, gold)`` grades one completion; ``math_reward`` wraps it as a TRL
reward function. The grading rules, exactly as implemented (``docs/rewards.md`` shows examples):

1. **The last answer stated wins**, whatever phrase states it (:func:`extract_answer`). The
   statements are: the last ``\\boxed{x}`` / ``\\fbox{x}`` that is not empty (nested braces
   handled; among the last three; ``\\boxed x`` too); the last ``#### x`` (not a markdown
   heading: ``#### Final Answer``); "answer(s) [to / for / of ...] is / are / was / were /
   will be / would be / should be / must be / equals / = / : x" anywhere in a line ("answer"
   in lower, capital or upper case; the last 16 such phrases are tried); and a line ``A: x``.
   The statement that starts last in the text is the final answer. A phrase, ``####`` or
   ``A:`` answer runs to the end of its clause: the line end, a "." or "!" before a space,
   ", " or "; " before a letter, " (" after a word or number, an unmatched closing bracket,
   or one of the words because, since, as, which, so, given, where, when, for, after,
   before, but, while, or "and" before a word (not "and a half").
   A phrase whose answer is empty or only confirms (starts with correct, right, consistent,
   reasonable, plausible, valid, verified, confirmed, indeed, (as) follows, shown, given,
   clear, obvious, straightforward, simple, that, this, the same, boxed, in the box, found,
   calculated, computed, obtained, determined) is not a statement. A final ``\\boxed{`` that
   is never closed is a cut-off answer: 0, counted as malformed. With no statement at all,
   the answer is the number holding the last digit of the text, with its fraction, exponent
   and scale words.
2. **Any hedge scores 0**, looked for in four places (:func:`hedge_categories`, ``_hedge``):
   (a) *inside the answer*, by category: or (or, either, nor, ``\\lor``, ``\\vee``), and
   (and, ``&``, ``\\land``; not in a mixed number ``2 and 1/2``, ``2 and a half``), list (a
   comma or semicolon once thousands separators are removed), range (to, through, from,
   between, ``12–15``, ``12--15``), bound (at least / most / minimum / maximum, more / less /
   fewer / greater / larger / smaller / higher / lower than, up to, over, under, above,
   below, beyond, exceeding, upwards, minimum, maximum, max, plus, ``< > ≤ ≥ ≠``, ``\\geq``,
   ``\\leq``, ``\\gt``, ``\\lt``, ``\\neq``, ``\\gtrsim``, ..., a ``+`` closing the
   answer), approx (approximately, approx, about, around, roughly, nearly, almost, circa, ca,
   close to, some, ish, ``~ ≈``, ``\\approx``, ``\\sim``, ``\\simeq``), pm (``± ∓``,
   ``\\pm``, ``\\mp``, ``+/-``), doubt (maybe, perhaps, possibly, probably, likely, guess,
   estimate(d), unsure, uncertain, if, unless, assuming, ``?``), not (not, no, never, isn't,
   aren't, wrong, incorrect, except, excluding, neither, ``\\neg``), etc (``...``, ``…``,
   ``\\dots``, etc). A category that the gold answer itself contains is allowed: a MATH gold
   ``\\{1, 2\\}`` may be answered with a list, ``1 \\pm \\sqrt{2}`` with ``\\pm``.
   (b) *Just before the answer* in its sentence (which starts after the last ". ", "! ",
   "? ", ".<tab>" or newline, at most 400 characters back), past box markup, ``$``, ``*``,
   ``_`` and ``\\(``: a last word or sign in ``_LEAD_WORDS`` (or, either, over, between,
   about, approximately, maybe, not, ``≈``, ``\\geq``, ...), a last pair in ``_LEAD_PAIRS``
   (at least, up to, more than, ...), a number or ``}`` followed by ``, ; / & and or to – —
   --``, ``\\lor`` or ``\\vee``, or a whole ``\\boxed{...}`` right before
   (``\\boxed{7}\\boxed{8}``).
   (c) *Just after the answer*, on its line (``TRAIL_HEDGE``): past closing markup, one
   optional ``,`` ``;`` ``:`` or ``(``, and at most two words: or (not "or equivalently" /
   "or in other words"), nor, and/or, give or take, more or less, at least / most,
   approx(imately), roughly, about, around, max(imum), minimum, plus, ish, upwards, and up /
   above / below / over / more / less, if, unless, assuming, maybe, perhaps, possibly,
   probably, -ish, a ``+`` not before a digit, ``±``, ``\\pm``, ``+/-``, ``?``; or
   ``, ; / & and to – — --`` followed by a number, ``$``, ``\\(`` or a box; or, right after
   a ". " / "! ", a sentence opening with Or, Maybe, Perhaps, Possibly, Probably,
   Approximately or Roughly (``NEXT_SENTENCE_HEDGE``).
   (d) *Anywhere in the answer's sentence* (``SENTENCE_HEDGE``): approximately, approx,
   roughly, nearly, almost, circa, maybe, perhaps, possibly, probably, likely, guess(ing),
   estimate(d), estimation, unsure, uncertain, not sure, not certain, no idea, ballpark, or
   so, give or take, more or less, or thereabouts, could / might (also) be, either (not
   "either way"), ``≈``, ``\\approx``.
3. **Numbers are read exactly** (:func:`as_number`): a sign and a currency symbol (``$ € £
   ¥ ₹``), ``x =``, thousands separators, then the number: ``18``, ``18.0``, ``.5``,
   ``1.5e6``, ``3/4``, ``\\frac{3}{4}``, ``\\frac34``; after an integer a proper mixed
   fraction (``1 1/2``, ``1\\frac{1}{2}``, ``2 and 1/2``, ``2 and a half``, ``2 and a quarter``,
   ``1½``); ``× 10^n`` (``\\times``, ``\\cdot``, ``x``, ``*``, ``·``) or ``10^n`` alone; then
   scale words that multiply, chained (hundred, thousand, million, billion, trillion, dozen,
   plural too; ``a dozen`` = 12, ``half a dozen`` = 6); then units that leave the value
   unchanged (words after a space, ``%``, ``°``, ``^\\circ``, ``/h``, ``^2``: ``18%`` is 18,
   as GSM8K golds are bare numbers). A second number, or a unit word in ``_NOT_UNITS`` (or,
   and, to, than, least, about, maybe, not, ...), means the answer is not one number. An
   integer gold must be matched exactly, any other gold to a relative 1e-6.
4. **Otherwise** the normalised strings are compared, then math-verify decides (LaTeX:
   ``\\sqrt{2}``, intervals, sets, expressions). When the gold is a number, math-verify is
   only asked if every word of the answer (two letters or more, outside LaTeX commands) is a
   unit in ``_UNIT_WORDS`` or a word of the gold, and every LaTeX command is in
   ``_VERIFY_COMMANDS`` (frac, sqrt, cdot, times, pi, ...): math-verify drops a trailing
   ``\\text{...}`` and would read ``7 \\text{ onwards}`` as 7.

Malformed completions (None, not text, empty, over ``MAX_COMPLETION_CHARS``, no answer
found, a cut-off ``\\boxed{``, an answer over ``MAX_ANSWER_CHARS``, a checker error or
timeout) never raise: they score 0 and are counted, see :func:`malformed_count`. Hedged and
wrong answers score 0 and are not counted. Grading takes tens of microseconds per completion
and stays linear in its length (only a bounded window around the answer is searched).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from fractions import Fraction
from typing import Any, NamedTuple

from .data import gsm8k_answer, last_boxed
from .errors import QempoError

logger = logging.getLogger("qempo_lite")


def _drop_timeout_disabled_notice(record: logging.LogRecord) -> bool:
    # Disabling math-verify's timer off the main thread is deliberate (see _math_verify).
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_drop_timeout_disabled_notice)

MAX_COMPLETION_CHARS = 200_000
"""Longer completions (about 50k tokens) are malformed: no generation budget produces them."""
MAX_ANSWER_CHARS = 1_000
"""Longer extracted answers are not handed to sympy, whose time on them is unbounded."""
VERIFY_TIMEOUT_S = 5
"""math-verify's per-call limit; its timer is SIGALRM, which only the main thread can use."""
_ZONE = 400
"""Characters looked at before and after the final answer for hedges (one sentence is shorter)."""

_malformed = 0
_malformed_lock = threading.Lock()


def malformed_count() -> int:
    """Completions scored 0 since start (or the last reset) because they could not be judged."""
    return _malformed


def reset_malformed_count() -> None:
    global _malformed
    with _malformed_lock:
        _malformed = 0


def _count_malformed(why: str) -> bool:
    global _malformed
    with _malformed_lock:
        _malformed += 1
    logger.debug("malformed completion scored 0: %s", why)
    return False


# --------------------------------------------------------------------- extraction

BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
BOX_BARE = re.compile(r"\\boxed[ \t]+([^\s${}\\]+)")
BRACE = re.compile(r"(?<!\\)[{}]|\\[{}]")
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
_SCALE_WORD = r"(?:hundred|thousand|million|billion|trillion|dozen)s?"
VALUE = re.compile(
    rf"-?{_NUM}(?:[eE][-+]?\d+)?"
    r"(?:\s*(?:\\times|\\cdot|×|·|\*|x)\s*10\s*(?:\^|\*\*)\s*\{?\s*[-+]?\d+\s*\}?)?"
    r"(?:\s+\d+\s*/\s*\d+|\s*/\s*\d+(?:\.\d+)?|\s+and\s+(?:a\s+(?:half|quarter)|\d+\s*/\s*\d+))?"
    rf"(?:\s+{_SCALE_WORD}\b)*",
    re.IGNORECASE,
)


class _Statement(NamedTuple):
    """Where the final answer is: its statement starts at ``start``, its value is ``[value_start, value_end)``."""

    kind: str  # box, bare_box, hashes, phrase, a_line, cut_box, last_number
    start: int
    value_start: int
    value_end: int


def _clause_end(text: str, pos: int) -> int:
    """Where a stated answer beginning at ``pos`` ends: the end of its clause (see module rules)."""
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


def _box_end(text: str, open_brace_end: int) -> int | None:
    """Index of the brace closing a box whose ``{`` ends at ``open_brace_end``; None when never closed."""
    depth = 1
    for brace in BRACE.finditer(text, open_brace_end):
        depth += 1 if brace.group().endswith("{") else -1
        if depth == 0:
            return brace.start()
    return None


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


def _last_phrase(text: str) -> _Statement | None:
    """The last "answer is x" / "Answer: x" statement whose value is not empty and not a confirmation."""
    tried = 0
    for index in reversed(_starts(text, ("answer", "Answer", "ANSWER"))):
        found = ANSWER_PHRASE.match(text, index)
        if not found or (index and text[index - 1].isalpha()):
            continue
        end = _clause_end(text, found.end())
        value = text[found.end():end].strip(" \t*_.")
        if value and not CONFIRMS.match(value):
            return _Statement("phrase", index, found.end(), end)
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


def _final_statement(text: str) -> _Statement | None:
    """The answer statement that starts last in ``text``, else the last number, else None."""
    candidates: list[_Statement] = []
    # The last box that is not empty ("in \\boxed{}" restates the instruction); only the last
    # few starts are tried, so that unclosed braces cannot cost O(n^2).
    box_starts = _starts(text, ("\\boxed", "\\fbox"))
    boxes = [box for box in (BOX_START.match(text, index) for index in box_starts) if box]
    for box in reversed(boxes[-3:]):
        close = _box_end(text, box.end())
        if close is None:
            candidates.append(_Statement("cut_box", box.start(), box.end(), len(text)))
            break
        if text[box.end():close].strip():
            candidates.append(_Statement("box", box.start(), box.end(), close))
            break
    bare = next((found for found in (BOX_BARE.match(text, index) for index in reversed(box_starts)) if found), None)
    if bare:
        candidates.append(_Statement("bare_box", bare.start(), bare.start(1), bare.end(1)))
    hashes = text.rfind("####")
    if hashes >= 0:
        found = HASHES.match(text, hashes)
        if not text[found.end():found.end() + 1].isalpha():  # "#### Final Answer" is a markdown heading
            candidates.append(_Statement("hashes", hashes, found.end(), _clause_end(text, found.end())))
    a_line = _last_a_line(text)
    if a_line:
        candidates.append(_Statement("a_line", a_line.start(), a_line.end(), _clause_end(text, a_line.end())))
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
    return _Statement("last_number", offset + number.start(), offset + number.start(), end)


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``, or None (rule 1 of the module docstring).

    The value of the statement that starts last: a ``\\boxed{}``'s content, the clause after
    ``####`` / "the answer is" / ``Answer:`` / ``A:``; failing any statement, the last number.
    None for no answer or a final ``\\boxed{`` that was never closed.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    statement = _final_statement(text)
    if statement is None or statement.kind == "cut_box":
        return None
    return text[statement.value_start:statement.value_end].strip(" \t*_").rstrip(".").strip() or None


def gold_answer(gold: str | int | float) -> str | None:
    """The final answer of a gold reference: ``#### x`` (GSM8K), last ``\\boxed{}`` (MATH), or the bare value."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip():
        return None
    if "####" in gold:
        return gsm8k_answer(gold)
    return last_boxed(gold) or gold.strip()


# ------------------------------------------------------------------------- hedges

_W = r"(?<![\\A-Za-z])"  # a word, not the tail of a LaTeX command or of another word
_HEDGE_CATEGORIES = {
    "or": re.compile(rf"{_W}(?:or|either|nor)\b|\\lor\b|\\vee\b|∨|\||\\mid\b|\\vert\b", re.IGNORECASE),
    "and": re.compile(rf"{_W}and\b|&|\\land\b|∧", re.IGNORECASE),
    "list": re.compile(r"[,;]|\\\\"),  # a comma, a semicolon or a LaTeX line break
    "range": re.compile(rf"{_W}(?:to|through|from|between)\b|\d\s*(?:--|–|—)\s*-?\d", re.IGNORECASE),
    "bound": re.compile(
        rf"{_W}(?:at\s+(?:least|most|minimum|maximum)|(?:more|less|fewer|greater|larger|smaller|higher|lower)\s+than"
        rf"|up\s+to|over|under|above|below|beyond|exceeding|upwards|minimum|maximum|max|plus)\b"
        r"|[<>≤≥≠]|\\(?:geq?|leq?|gt|lt|neq?|geqslant|leqslant|gtrsim|lesssim|ll|gg)\b"
        r"|\+(?=\s*(?:$|[)}\],;]))",
        re.IGNORECASE,
    ),
    "approx": re.compile(
        rf"{_W}(?:approximately|approx|about|around|roughly|nearly|almost|circa|ca|close\s+to|some|ish)\b"
        r"|~|∼|≈|\\(?:approx|sim|simeq|thicksim|thickapprox)\b",
        re.IGNORECASE,
    ),
    "pm": re.compile(r"±|∓|\\pm\b|\\mp\b|\+\s*/\s*-|\+-|-/\+"),
    "doubt": re.compile(
        rf"{_W}(?:maybe|perhaps|possibly|probably|likely|guess|guessing|estimated?|estimate|unsure|uncertain"
        r"|if|unless|assuming)\b|\?",
        re.IGNORECASE,
    ),
    "not": re.compile(
        rf"{_W}(?:not|no|never|isn't|aren't|wrong|incorrect|except|excluding|neither)\b|n't\b|\\neg\b|¬",
        re.IGNORECASE,
    ),
    "etc": re.compile(rf"\.\.\.|…|\\[lcv]?dots\b|{_W}etc\b", re.IGNORECASE),
}
_MIXED_AND = re.compile(r"(\d)\s+and\s+(?=a\s+(?:half|quarter)\b|\d+\s*/\s*\d|\\[dtc]?frac)", re.IGNORECASE)
_LEAD_MARKUP = re.compile(r"(?:\\(?:boxed|fbox)\s*\{|[\s$*_{]|\\[(\[])+$")
_LEAD_TOKEN = re.compile(r"\\[A-Za-z]+|[A-Za-z']+|\d+(?:\.\d+)?|\S")
_LEAD_WORDS = frozenset(
    "or nor either over under above below beyond between about around approximately approx roughly nearly almost "
    "circa maybe perhaps possibly probably likely not never isn't ~ ∼ ≈ < > ≤ ≥ ≠ ± \\approx \\sim \\simeq "
    "\\geq \\ge \\leq \\le \\gt \\lt \\neq \\ne \\pm \\mp \\gtrsim \\lesssim".split()
)
_LEAD_PAIRS = frozenset(
    [("at", "least"), ("at", "most"), ("at", "minimum"), ("at", "maximum"), ("up", "to"), ("close", "to"),
     ("is", "not"), ("upwards", "of"), ("excess", "of"), ("approx", ".")]
    + [(word, "than") for word in "more less fewer greater larger smaller higher lower".split()]
)
_CONNECTORS = frozenset([",", ";", "/", "&", "\\&", "and", "or", "to", "–", "—", "\\lor", "\\vee"])
_BOX_BEFORE = re.compile(r"\\(?:boxed|fbox)\s*\{[^{}]*\}")


def _lead_hedged(lead: str) -> bool:
    """Does the text just before the answer end in a hedge or in another candidate (rule 2b)?"""
    tail = _LEAD_MARKUP.sub("", lead[-120:])
    tokens = [token.lower() for token in _LEAD_TOKEN.findall(tail[-80:])]
    if not tokens:
        return False
    if tokens[-1] in _LEAD_WORDS or tuple(tokens[-2:]) in _LEAD_PAIRS:
        return True
    if tokens[-2:] == ["-", "-"]:
        tokens[-2:] = ["--"]
    previous = tokens[-2] if len(tokens) > 1 else ""
    if (tokens[-1] in _CONNECTORS or tokens[-1] == "--") and (previous[-1:].isdigit() or previous == "}"):
        return True
    box = max(tail.rfind("\\boxed"), tail.rfind("\\fbox"))
    return box >= 0 and _BOX_BEFORE.fullmatch(tail, box) is not None

_TRAIL_MARKUP = r"^(?:[\s}$*_)\]]|\\[)\]])*"
_OR = r"or(?!\s*,?\s*(?:equivalently|in\s+other\s+words))"  # "or equivalently" adds no candidate
TRAIL_HEDGE = re.compile(
    _TRAIL_MARKUP + r"(?:[,;:]\s*)?(?:\(\s*)?(?:[A-Za-z]+\s+){0,2}?"
    rf"(?:(?:{_OR}|nor|and/or|give\s+or\s+take|more\s+or\s+less|at\s+(?:least|most|minimum|maximum)"
    r"|approx|approximately|roughly|about|around|max|maximum|minimum|plus|ish|upwards"
    r"|and\s+(?:up|above|below|over|more|less)"
    r"|if|unless|assuming|maybe|perhaps|possibly|probably)\b"
    r"|-ish\b|\+(?!\s*\d)|\^\s*\{?\s*\+|±|\\pm\b|\+/-|\?"
    r"|(?:,|;|/|&|\band\b|\bto\b|–|—|--)\s*(?:\$|\\\(|\\boxed|\\fbox|-?\d))",
    re.IGNORECASE,
)
NEXT_SENTENCE_HEDGE = re.compile(
    _TRAIL_MARKUP + rf"[.!]\s*(?:\(\s*)?(?:{_OR}|maybe|perhaps|possibly|probably|approximately|roughly)\b",
    re.IGNORECASE,
)
_SENTENCE_HINTS = (
    "approx", "rough", "nearly", "almost", "circa", "maybe", "perhaps", "possibl", "probabl", "likely", "guess",
    "estimat", "unsure", "uncertain", "not sure", "not certain", "no idea", "ballpark", "or so", "give or take",
    "more or less", "thereabouts", "could", "might", "either", "≈",
)
"""Lower-case substrings without which SENTENCE_HEDGE cannot match: a cheap test before the regex."""
SENTENCE_HEDGE = re.compile(
    rf"{_W}(?:approximately|approx|roughly|nearly|almost|circa|maybe|perhaps|possibly|probably|likely|guess|guessing"
    r"|estimated?|estimation|unsure|uncertain|not\s+sure|not\s+certain|no\s+idea|ballpark|or\s+so|give\s+or\s+take"
    r"|more\s+or\s+less|or\s+thereabouts|(?:could|might)\s+(?:also\s+)?be|either(?!\s+way))\b|≈|\\approx\b",
    re.IGNORECASE,
)
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|\$")
_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")


_ANY_HEDGE = re.compile(
    "|".join(f"(?P<{name}>{pattern.pattern})" for name, pattern in _HEDGE_CATEGORIES.items()), re.IGNORECASE
)
_PLAIN_NUMBER = re.compile(r"[-+]?\$?\d{1,3}(?:,\d{3})*(?:\.\d+)?|[-+]?\$?\d+(?:\.\d+)?")


@functools.lru_cache(maxsize=4096)
def hedge_categories(answer: str) -> frozenset[str]:
    """The hedge categories (rule 2a) present in an extracted answer or a gold answer."""
    if _PLAIN_NUMBER.fullmatch(answer.strip()):
        return frozenset()  # the common case, a bare number, has none
    text = _MIXED_AND.sub(r"\1 ", _THOUSANDS.sub("", _clean(answer)))
    return frozenset(match.lastgroup for match in _ANY_HEDGE.finditer(text))


def _hedge(text: str, statement: _Statement, reference: str) -> str | None:
    """Why the final answer is hedged (rule 2), or None when it is not."""
    value = text[statement.value_start:statement.value_end]
    extra = hedge_categories(value) - hedge_categories(reference)
    if extra:
        return f"hedge inside the answer: {', '.join(sorted(extra))}"
    zone_start = max(0, statement.start - _ZONE)
    sentence_start = zone_start
    for end in (". ", "! ", "? ", ".\t", "\n"):
        found = text.rfind(end, zone_start, statement.start)
        if found >= 0:
            sentence_start = max(sentence_start, found + len(end))
    lead = _SPACING.sub(" ", _TEXT_WRAPPER.sub(r" \1 ", text[sentence_start:statement.value_start]))
    if _lead_hedged(lead):
        return "hedge or another candidate before the answer"
    trail = text[statement.value_end:statement.value_end + _ZONE]
    line_end = trail.find("\n")
    trail = _SPACING.sub(" ", _TEXT_WRAPPER.sub(r" \1 ", trail if line_end < 0 else trail[:line_end]))
    if TRAIL_HEDGE.match(trail) or NEXT_SENTENCE_HEDGE.match(trail):
        return "hedge or another candidate after the answer"
    # The rest of the sentence: skip the closing markup, then stop at the first sentence end.
    closing = re.match(_TRAIL_MARKUP, trail)
    sentence_end = _SENTENCE_END.search(trail, closing.end() if closing else 0)
    rest = trail[: sentence_end.start() if sentence_end else None]
    sentence = text[sentence_start:statement.value_start] + " " + rest
    lowered = sentence.lower()
    if any(hint in lowered for hint in _SENTENCE_HINTS) and SENTENCE_HEDGE.search(sentence):
        return "hedge in the answer's sentence"
    return None


# ---------------------------------------------------------------------- comparison

_LATEX_NOISE = re.compile(
    r"(?<!\\)\\[,;:! ]|\\left\b|\\right\b|\\displaystyle\b|\{,\}|\*\*|\\\$|\$|\\[()\[\]]|\\%"
)
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mbox|mathbf|mathit|operatorname)\s*\{([^{}]*)\}"
)
_UNICODE = str.maketrans({
    "−": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "½": " 1/2", "⅓": " 1/3", "⅔": " 2/3", "¼": " 1/4",
    "¾": " 3/4", "⅕": " 1/5", "⅛": " 1/8", "⅜": " 3/8", "⅝": " 5/8", "⅞": " 7/8",
})
_ASSIGNMENT = re.compile(r"^[A-Za-z]\w*\s*=\s*")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_SIGN = re.compile(r"\s*([-+]?)\s*[$€£¥₹]?\s*([-+]?)\s*")
_A_SCALE = re.compile(rf"(half\s+)?an?\s+(?={_SCALE_WORD}\b)", re.IGNORECASE)
_LATEX_FRAC = re.compile(r"\\[dtc]?frac\s*(?:\{\s*(\d+(?:\.\d+)?)\s*\}|(\d))\s*(?:\{\s*(\d+(?:\.\d+)?)\s*\}|(\d))")
_DECIMAL = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(?:[eE]([-+]?\d+))?")
_MIXED = re.compile(
    r"(?:\s*(?=\\)|\s+(?=\d)|\s+and\s+)"
    r"(?:\\[dtc]?frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))|(\d+)\s*/\s*(\d+)(?![\d.])"
    r"|a\s+(half|quarter)\b)",
    re.IGNORECASE,
)
_SLASH = re.compile(r"\s*/\s*(\d+(?:\.\d+)?)(?![\d.])")
_TIMES_TEN = re.compile(r"\s*(?:\\times|\\cdot|×|·|\*|x)\s*10\s*(?:\^|\*\*)\s*(?:\{\s*([-+]?\d+)\s*\}|([-+]?\d+))")
_POWER = re.compile(r"\s*(?:\^|\*\*)\s*(?:\{\s*([-+]?\d+)\s*\}|([-+]?\d+))")
_SCALE = re.compile(rf"\s*({_SCALE_WORD})\b", re.IGNORECASE)
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "trillion": 10**12, "dozen": 12}
_MAX_EXPONENT = 400
# A unit word needs a space before it, so that "2x" is not read as 2.
_UNIT = r"(?:%|°|\^?\s*\\circ|/\s*[A-Za-z]+|\s[A-Za-z][A-Za-z'.]*(?:\^\{?[23]\}?|[²³])?)"
_UNITS = re.compile(rf"^(?:\s*{_UNIT})*\s*\.?$")
_WORD = re.compile(r"[A-Za-z][A-Za-z']*")
# Words that are never a unit: with one of them after it, an answer is not one number.
_NOT_UNITS = frozenset(
    "or nor either and to through from between than least most at up upwards upward onwards onward over under "
    "above below beyond exceeding max maximum minimum plus minus ish approximately approx about around roughly "
    "nearly almost circa ca close some maybe perhaps possibly probably likely guess estimate estimated unsure "
    "uncertain if unless assuming not no never isn't aren't wrong incorrect except excluding neither but so give "
    "take thereabouts etc".split()
)
# With a numeric gold, math-verify only sees answers whose words are these units or the gold's own words.
_UNIT_WORDS = frozenset(
    "units unit square sq cubic cm mm km inches inch in ft feet foot yd yards yard miles mile meters meter metres "
    "metre degrees degree dollars dollar cents cent hours hour hrs hr minutes minute mins min seconds second secs sec "
    "days day weeks week months month years year kg grams gram g pounds pound lbs lb ounces ounce oz liters liter "
    "litres litre ml gallons gallon mph kmh percent".split()
)
_VERIFY_COMMANDS = frozenset(
    "frac dfrac tfrac cfrac sqrt cdot times div pi exp log ln lg sin cos tan binom dbinom tbinom "
    "big Big bigl bigr Bigl Bigr lfloor rfloor lceil rceil circ quad".split()
)
_COMMAND = re.compile(r"\\([A-Za-z]+)")


def _clean(answer: str) -> str:
    """LaTeX spacing, ``$``, ``\\left``, ``**`` and ``\\text{}`` wrappers removed; unicode minus and fractions read."""
    return _LATEX_NOISE.sub("", _TEXT_WRAPPER.sub(r" \1 ", answer.translate(_UNICODE)))


def _normalise(answer: str) -> str:
    return _clean(answer).strip().rstrip(".").strip()


def _int(*groups: str | None) -> int:
    return int(next(group for group in groups if group is not None))


_INTEGER = re.compile(r"\s*(-?\d+)\s*")


@functools.lru_cache(maxsize=4096)
def as_number(answer: str) -> Fraction | None:
    """``answer`` as an exact number when it is one number, maybe with scale words and units; else None.

    Read in order (rule 3 of the module docstring): a sign and a currency symbol, the number
    (``1,800``, ``18.0``, ``1.5e6``, ``.5``, ``3/4``, ``\\frac{3}{4}``), a mixed fraction after
    an integer (``1 1/2``, ``1\\frac{1}{2}``, ``2 and 1/2``, ``2 and a half``), ``× 10^n``
    (or ``10^n`` alone), scale words that multiply (``5 thousand`` = 5000, ``2 dozen`` = 24,
    ``a dozen`` = 12), then units that leave the value unchanged (``dollars``, ``cm^2``,
    ``%``: ``18%`` is 18). A second number, or a unit word that is a hedge word (``7 or
    more``, ``7 at least``), makes it not one number.
    """
    if integer := _INTEGER.fullmatch(answer):
        return Fraction(int(integer.group(1)))
    text = _THOUSANDS.sub("", _ASSIGNMENT.sub("", _normalise(answer)))
    sign = _SIGN.match(text)
    negative = (sign.group(1) == "-") != (sign.group(2) == "-")
    pos = sign.end()
    half_a = _A_SCALE.match(text, pos)
    if half_a:
        value, pos = Fraction(1, 2 if half_a.group(1) else 1), half_a.end()
    elif frac := _LATEX_FRAC.match(text, pos):
        numerator, denominator = Fraction(frac.group(1) or frac.group(2)), Fraction(frac.group(3) or frac.group(4))
        if denominator == 0:
            return None
        value, pos = numerator / denominator, frac.end()
    elif number := _DECIMAL.match(text, pos):
        value, pos = Fraction(number.group(1)), number.end()
        if number.group(2) is not None:
            exponent = int(number.group(2))
            if abs(exponent) > _MAX_EXPONENT:
                return None
            value *= Fraction(10) ** exponent
        elif (mixed := _MIXED.match(text, pos)) and "." not in number.group(1):
            if mixed.group(7):
                part = Fraction(1, 2 if mixed.group(7).lower() == "half" else 4)
            else:
                part = Fraction(_int(mixed.group(1), mixed.group(2), mixed.group(5)),
                                _int(mixed.group(3), mixed.group(4), mixed.group(6)))
            if not 0 < part < 1:
                return None
            value, pos = value + part, mixed.end()
        elif slash := _SLASH.match(text, pos):
            denominator = Fraction(slash.group(1))
            if denominator == 0:
                return None
            value, pos = value / denominator, slash.end()
        if power := _TIMES_TEN.match(text, pos):
            exponent = _int(power.group(1), power.group(2))
            if abs(exponent) > _MAX_EXPONENT:
                return None
            value, pos = value * Fraction(10) ** exponent, power.end()
        elif number.group() == "10" and (power := _POWER.match(text, pos)):
            exponent = _int(power.group(1), power.group(2))
            if abs(exponent) > _MAX_EXPONENT:
                return None
            value, pos = Fraction(10) ** exponent, power.end()
    else:
        return None
    while scale := _SCALE.match(text, pos):
        value, pos = value * _SCALES[scale.group(1).lower().rstrip("s")], scale.end()
    rest = text[pos:]
    if not _UNITS.match(rest) or any(word.lower() in _NOT_UNITS for word in _WORD.findall(rest)):
        return None
    return -value if negative else value


def numbers_equal(gold: Fraction, pred: Fraction) -> bool:
    """Exact for integer golds; relative 1e-6 otherwise, so ``0.333333`` matches ``1/3``."""
    if gold.denominator == 1:
        return pred == gold
    return abs(pred - gold) <= Fraction(1, 10**6) * abs(gold)


_POW = r"(?:\^|\*\*)"
_COSTLY = re.compile(
    rf"{_POW}\s*\{{[^{{}}]*{_POW}"  # tower with a braced exponent: 9^{9^9}
    rf"|{_POW}\s*[\w.]+\s*{_POW}"  # tower without braces: 9^9^9
    rf"|{_POW}\s*\{{?\s*\d{{6,}}"  # exponent of a million or more
    r"|\d{5,}\s*!"  # factorial of ten thousand or more
)


def _math_verify(gold: str, pred: str) -> bool:
    # sympy evaluates these exactly and never returns; outside the main thread no alarm stops it.
    if _COSTLY.search(pred):
        return _count_malformed("answer too costly to evaluate")
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError as err:
        raise QempoError("math-verify is not installed (needed to compare LaTeX answers): "
                         "pip install 'math-verify>=0.9,<0.10'") from err
    # SIGALRM timers raise ValueError outside the main thread (e.g. a reward worker thread).
    timeout = VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        pred_parsed = parse(f"${pred}$", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except (Exception, TimeoutException) as err:  # TimeoutException is a BaseException
        return _count_malformed(f"math-verify failed: {type(err).__name__}")


def _words(answer: str) -> set[str]:
    return {word.lower() for word in re.findall(r"[A-Za-z]{2,}", _COMMAND.sub(" ", _normalise(answer)))}


def answers_match(gold: str, pred: str) -> bool:
    """Do two extracted final answers agree? Numbers, then strings, then math-verify (rules 3 and 4).

    Hedges are not looked at here (see :func:`math_correct`).
    """
    gold_number, pred_number = as_number(gold), as_number(pred)
    if gold_number is not None and pred_number is not None:
        return numbers_equal(gold_number, pred_number)
    if _normalise(gold).replace(" ", "").lower() == _normalise(pred).replace(" ", "").lower():
        return True
    if gold_number is not None:
        # math-verify drops a trailing \text{...}: "7 \text{ onwards}" would be 7. Words, commands must be known.
        if _words(pred) - _UNIT_WORDS - _words(gold):
            return False
        if set(_COMMAND.findall(_normalise(pred))) - _VERIFY_COMMANDS:
            return False
    return _math_verify(gold, pred)


def completion_text(completion: Any) -> str | None:
    """The text of a completion: a string, a message, or a message list (TRL conversational)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        return content if isinstance(content, str) else None
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        # GRPOTrainer passes [{"role": "assistant", "content": ...}] for chat prompts.
        return completion_text(completion[-1])
    return None


def math_correct(completion: Any, gold: str | int | float) -> bool:
    """Is the final answer of ``completion`` equal to the gold answer, unhedged? Never raises on bad text.

    The final answer is the last one stated (rule 1 of the module docstring); any hedge in
    it, just before or after it, or in its sentence scores 0 (rule 2); values are compared as
    exact numbers, then strings, then through math-verify (rules 3 and 4). ``gold`` may be a
    GSM8K solution (``#### x``), a MATH solution (last ``\\boxed{}``) or a bare value (string
    or number). Malformed inputs return False and add one to :func:`malformed_count`.
    """
    text = completion_text(completion)
    if text is None:
        return _count_malformed(f"not text: {type(completion).__name__}")
    if len(text) > MAX_COMPLETION_CHARS:
        return _count_malformed(f"{len(text)} characters, over {MAX_COMPLETION_CHARS}")
    reference = gold_answer(gold)
    if not reference:
        return _count_malformed("gold answer unreadable")
    statement = _final_statement(text) if text.strip() else None
    if statement is None:
        return _count_malformed("no final answer found")
    if statement.kind == "cut_box":
        return _count_malformed("the final \\boxed{ is never closed")
    pred = text[statement.value_start:statement.value_end].strip(" \t*_").rstrip(".").strip()
    if not pred:
        return _count_malformed("no final answer found")
    if len(pred) > MAX_ANSWER_CHARS:
        return _count_malformed(f"final answer of {len(pred)} characters")
    try:
        hedged = _hedge(text, statement, reference)
        if hedged:
            logger.debug("hedged answer scored 0: %s", hedged)
            return False
        return answers_match(reference, pred)
    except QempoError:
        raise  # a missing extra: the user must install it, not train on zero rewards
    except Exception:  # a checker bug must not end a training run; it is logged and counted
        logger.warning("answer check failed on %r vs gold %r", pred[:200], reference[:200], exc_info=True)
        return _count_malformed("answer check raised")


def math_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 where :func:`math_correct` grades a completion right against its ``answer``, else 0.0.

    ``GRPOTrainer`` calls it with ``completions`` (strings, or message lists for chat prompts)
    and every dataset column as a keyword, so a :func:`qempo_lite.data.load_math` dataset
    supplies ``answer``; other keywords are ignored.
    """
    if isinstance(answer, str) or len(answer) != len(completions):
        count = "a string" if isinstance(answer, str) else f"{len(answer)} answers"
        raise QempoError(
            f"math_reward needs one gold answer per completion: got {len(completions)} completions and {count}; "
            "pass the dataset's 'answer' column"
        )
    return [1.0 if math_correct(completion, gold) else 0.0 for completion, gold in zip(completions, answer)]
