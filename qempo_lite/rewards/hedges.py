"""Hedged answers: a final answer that offers more than one value, a bound or a doubt scores 0.

Rule 2 of :mod:`qempo_lite.rewards`, **any hedge scores 0**, looked for in four places
(:func:`hedge_categories`, :func:`hedge_reason`):
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
"""

from __future__ import annotations

import functools
import re

from .compare import TEXT_WRAPPER, THOUSANDS, clean
from .extraction import Statement

_ZONE = 400
"""Characters looked at before and after the final answer for hedges (one sentence is shorter)."""

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
    text = _MIXED_AND.sub(r"\1 ", THOUSANDS.sub("", clean(answer)))
    return frozenset(match.lastgroup for match in _ANY_HEDGE.finditer(text))


def hedge_reason(text: str, statement: Statement, reference: str) -> str | None:
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
    lead = _SPACING.sub(" ", TEXT_WRAPPER.sub(r" \1 ", text[sentence_start:statement.value_start]))
    if _lead_hedged(lead):
        return "hedge or another candidate before the answer"
    trail = text[statement.value_end:statement.value_end + _ZONE]
    line_end = trail.find("\n")
    trail = _SPACING.sub(" ", TEXT_WRAPPER.sub(r" \1 ", trail if line_end < 0 else trail[:line_end]))
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
