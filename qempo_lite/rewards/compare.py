"""Comparing an extracted answer with the gold answer: exact numbers, then strings, then math-verify.

Rules 3 and 4 of :mod:`qempo_lite.rewards`:

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
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from fractions import Fraction

from ..errors import QempoError
from .malformed import count_malformed


def _drop_timeout_disabled_notice(record: logging.LogRecord) -> bool:
    # Disabling math-verify's timer off the main thread is deliberate (see _math_verify).
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_drop_timeout_disabled_notice)

VERIFY_TIMEOUT_S = 5
"""math-verify's per-call limit; its timer is SIGALRM, which only the main thread can use."""

SCALE_WORD = r"(?:hundred|thousand|million|billion|trillion|dozen)s?"

_LATEX_NOISE = re.compile(
    r"(?<!\\)\\[,;:! ]|\\left\b|\\right\b|\\displaystyle\b|\{,\}|\*\*|\\\$|\$|\\[()\[\]]|\\%"
)
TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mbox|mathbf|mathit|operatorname)\s*\{([^{}]*)\}"
)
_UNICODE = str.maketrans({
    "−": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "½": " 1/2", "⅓": " 1/3", "⅔": " 2/3", "¼": " 1/4",
    "¾": " 3/4", "⅕": " 1/5", "⅛": " 1/8", "⅜": " 3/8", "⅝": " 5/8", "⅞": " 7/8",
})
_ASSIGNMENT = re.compile(r"^[A-Za-z]\w*\s*=\s*")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_SIGN = re.compile(r"\s*([-+]?)\s*[$€£¥₹]?\s*([-+]?)\s*")
_A_SCALE = re.compile(rf"(half\s+)?an?\s+(?={SCALE_WORD}\b)", re.IGNORECASE)
# A LaTeX fraction (\frac{3}{4}, \dfrac{3}{4}, \frac34), {0} the pattern of a number in braces (a bare one is
# one digit); groups: numerator in braces, bare numerator, denominator in braces, bare denominator.
_LATEX_FRACTION = r"\\[dtc]?frac\s*(?:\{{\s*({0})\s*\}}|(\d))\s*(?:\{{\s*({0})\s*\}}|(\d))"
_LATEX_FRAC = re.compile(_LATEX_FRACTION.format(r"\d+(?:\.\d+)?"))
_DECIMAL = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(?:[eE]([-+]?\d+))?")
_MIXED = re.compile(  # the fraction after an integer: 1\frac{1}{2}, 1 1/2, 2 and 1/2, 2 and a half
    r"(?:\s*(?=\\)|\s+(?=\d)|\s+and\s+)"
    + "(?:" + _LATEX_FRACTION.format(r"\d+") + r"|(\d+)\s*/\s*(\d+)(?![\d.])|a\s+(half|quarter)\b)",
    re.IGNORECASE,
)
_SLASH = re.compile(r"\s*/\s*(\d+(?:\.\d+)?)(?![\d.])")
_TIMES_TEN = re.compile(r"\s*(?:\\times|\\cdot|×|·|\*|x)\s*10\s*(?:\^|\*\*)\s*(?:\{\s*([-+]?\d+)\s*\}|([-+]?\d+))")
_POWER = re.compile(r"\s*(?:\^|\*\*)\s*(?:\{\s*([-+]?\d+)\s*\}|([-+]?\d+))")
_SCALE = re.compile(rf"\s*({SCALE_WORD})\b", re.IGNORECASE)
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


def clean(answer: str) -> str:
    """LaTeX spacing, ``$``, ``\\left``, ``**`` and ``\\text{}`` wrappers removed; unicode minus and fractions read."""
    return _LATEX_NOISE.sub("", TEXT_WRAPPER.sub(r" \1 ", answer.translate(_UNICODE)))


def normalise(answer: str) -> str:
    return clean(answer).strip().rstrip(".").strip()


def _int(*groups: str | None) -> int:
    return int(next(group for group in groups if group is not None))


_INTEGER = re.compile(r"\s*(-?\d+)\s*")


@functools.lru_cache(maxsize=4096)
def as_number(answer: str) -> Fraction | None:
    """``answer`` as an exact number when it is one number, maybe with scale words and units; else None.

    Read in order (rule 3, see the module docstring): a sign and a currency symbol, the number
    (``1,800``, ``18.0``, ``1.5e6``, ``.5``, ``3/4``, ``\\frac{3}{4}``), a mixed fraction after
    an integer (``1 1/2``, ``1\\frac{1}{2}``, ``2 and 1/2``, ``2 and a half``), ``× 10^n``
    (or ``10^n`` alone), scale words that multiply (``5 thousand`` = 5000, ``2 dozen`` = 24,
    ``a dozen`` = 12), then units that leave the value unchanged (``dollars``, ``cm^2``,
    ``%``: ``18%`` is 18). A second number, or a unit word that is a hedge word (``7 or
    more``, ``7 at least``), makes it not one number.
    """
    if integer := _INTEGER.fullmatch(answer):
        return Fraction(int(integer.group(1)))
    text = THOUSANDS.sub("", _ASSIGNMENT.sub("", normalise(answer)))
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
        return count_malformed("answer too costly to evaluate")
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
        return count_malformed(f"math-verify failed: {type(err).__name__}")


def _words(answer: str) -> set[str]:
    return {word.lower() for word in re.findall(r"[A-Za-z]{2,}", _COMMAND.sub(" ", normalise(answer)))}


def answers_match(gold: str, pred: str) -> bool:
    """Do two extracted final answers agree? Numbers, then strings, then math-verify (rules 3 and 4).

    Hedges are not looked at here (see :func:`qempo_lite.rewards.math_correct`).
    """
    gold_number, pred_number = as_number(gold), as_number(pred)
    if gold_number is not None and pred_number is not None:
        return numbers_equal(gold_number, pred_number)
    if normalise(gold).replace(" ", "").lower() == normalise(pred).replace(" ", "").lower():
        return True
    if gold_number is not None:
        # math-verify drops a trailing \text{...}: "7 \text{ onwards}" would be 7. Words, commands must be known.
        if _words(pred) - _UNIT_WORDS - _words(gold):
            return False
        if set(_COMMAND.findall(normalise(pred))) - _VERIFY_COMMANDS:
            return False
    return _math_verify(gold, pred)
