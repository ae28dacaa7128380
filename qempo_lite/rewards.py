"""Verifiable rewards: is a completion's final answer to a math problem right?

``math_correct`` reads the final answer of a completion (:func:`extract_answer`), reads the
gold answer (a GSM8K solution, a MATH solution, or a bare value), and compares them:
first as plain numbers (``$1,800`` = ``1800.0``, ``18 cm`` = ``18``, ``3/4`` = ``0.75``),
then as normalised strings, then through math-verify (LaTeX: ``\\frac{3}{4}``,
``\\sqrt{2}``, intervals, expressions). ``math_reward`` wraps it as a TRL reward function.

Malformed completions (None, not text, empty, over ``MAX_COMPLETION_CHARS``, no answer
found, a checker error or timeout) never raise: they score 0 and are counted, see
:func:`malformed_count`.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from typing import Any

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

ANSWER_IS = re.compile(r"(?:final\s+)?answer\s+is\b\s*:?[ \t]*([^\n]+)", re.IGNORECASE)
ANSWER_LINE = re.compile(r"^[ \t>*#_]*(?:final\s+)?answer[ \t*_]*:[ \t*_]*([^\n]*\S)", re.IGNORECASE | re.MULTILINE)
A_LINE = re.compile(r"^[ \t]*A[ \t]*:[ \t]*([^\n]*\S)", re.MULTILINE)
BOXED_BARE = re.compile(r"\\boxed[ \t]+([^\s$]+)")
HASHES = re.compile(r"####[ \t]*([^\n]*\S)")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+")
SENTENCE_END = re.compile(r"\.(?:\s|$)")


def _last(pattern: re.Pattern, text: str) -> str | None:
    found = None
    for found in pattern.finditer(text):
        pass
    return found.group(1).strip() if found else None


def _sentence(answer: str) -> str:
    """``"18 dollars. She then..."`` -> ``"18 dollars"``; a decimal point is not a sentence end."""
    end = SENTENCE_END.search(answer)
    return (answer[: end.start()] if end else answer).strip().rstrip(".").strip()


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``, or None.

    In order: the content of the last ``\\boxed{...}`` (nested braces handled), the text
    after the last ``####``, the last "the (final) answer is x", the last ``Answer: x`` or
    ``A: x`` line, and failing all that the last number in the text.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = last_boxed(text) or _last(BOXED_BARE, text)
    if boxed:
        return boxed
    for pattern in (HASHES, ANSWER_IS, ANSWER_LINE, A_LINE):
        found = _last(pattern, text)
        if found:
            # The stated answer is whatever comes first in that sentence, e.g. a \boxed{}.
            return last_boxed(found) or _sentence(found) or None
    numbers = NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def gold_answer(gold: str | int | float) -> str | None:
    """The final answer of a gold reference: ``#### x`` (GSM8K), last ``\\boxed{}`` (MATH), or the bare value."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip():
        return None
    if "####" in gold:
        return gsm8k_answer(gold)
    return last_boxed(gold) or gold.strip()


# ---------------------------------------------------------------------- comparison

_LATEX_NOISE = re.compile(r"\\[,;:! ]|\\left|\\right|\\displaystyle|\{,\}|\*\*|\\\$|\$|\\%")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\s*\{\s*(\d+(?:\.\d+)?)\s*\}\s*\{\s*(\d+(?:\.\d+)?)\s*\}")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\w*\s*=\s*")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LEADING_NUMBER = re.compile(r"^(-?)\s*(\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*(\d+(?:\.\d+)?))?")
# A unit word needs a space before it, so that "2x" is not read as 2.
_UNIT = r"(?:%|°|\^?\s*\\circ|/\s*[A-Za-z]+|\s[A-Za-z][A-Za-z'.]*(?:\^\{?[23]\}?|[²³])?)"
_UNITS = re.compile(rf"^(?:\s*{_UNIT})*\s*\.?$")


def _normalise(answer: str) -> str:
    answer = _TEXT_WRAPPER.sub(r"\1", answer)
    answer = _LATEX_NOISE.sub("", answer)
    return answer.strip().rstrip(".").strip()


def as_number(answer: str) -> Fraction | None:
    """``answer`` as an exact number when it is one number, maybe with a unit; else None.

    ``"$1,800"``, ``"1800.00"``, ``"x = 1800"``, ``"1800 dollars"``, ``"18%"`` (the percent
    sign is read as a unit: GSM8K gold answers are bare numbers), ``"\\frac{3}{4}"``, ``"3/4"``.
    Anything with a second number (``"18 eggs at $2"``) is not one number.
    """
    text = _ASSIGNMENT.sub("", _normalise(answer))
    frac = _FRAC.match(text)
    if frac:
        sign, numerator, denominator, rest = frac.group(1), frac.group(2), frac.group(3), text[frac.end():]
    else:
        text = _THOUSANDS.sub("", text)
        number = _LEADING_NUMBER.match(text)
        if not number:
            return None
        sign, numerator, denominator, rest = number.group(1), number.group(2), number.group(3), text[number.end():]
    if not _UNITS.match(rest):
        return None
    try:
        value = Fraction(numerator) / (Fraction(denominator) if denominator else 1)
    except ZeroDivisionError:
        return None
    return -value if sign else value


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


def answers_match(gold: str, pred: str) -> bool:
    """Do two extracted final answers agree? Numbers, then strings, then math-verify."""
    gold_number, pred_number = as_number(gold), as_number(pred)
    if gold_number is not None and pred_number is not None:
        return numbers_equal(gold_number, pred_number)
    if _normalise(gold).replace(" ", "").lower() == _normalise(pred).replace(" ", "").lower():
        return True
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
    """Is the final answer of ``completion`` equal to the gold answer? Never raises on bad text.

    ``gold`` may be a GSM8K solution (``#### x``), a MATH solution (last ``\\boxed{}``) or a
    bare value (string or number). Malformed inputs return False and add one to :func:`malformed_count`.
    """
    text = completion_text(completion)
    if text is None:
        return _count_malformed(f"not text: {type(completion).__name__}")
    if len(text) > MAX_COMPLETION_CHARS:
        return _count_malformed(f"{len(text)} characters, over {MAX_COMPLETION_CHARS}")
    reference = gold_answer(gold)
    if not reference:
        return _count_malformed("gold answer unreadable")
    pred = extract_answer(text)
    if not pred:
        return _count_malformed("no final answer found")
    if len(pred) > MAX_ANSWER_CHARS:
        return _count_malformed(f"final answer of {len(pred)} characters")
    try:
        return answers_match(reference, pred)
    except QempoError:
        raise  # a missing extra: the user must install it, not train on zero rewards
    except Exception:  # a checker bug must not end a training run; it is logged and counted
        logger.warning("answer check failed on %r vs gold %r", pred[:200], reference[:200], exc_info=True)
        return _count_malformed("answer check raised")


def math_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when a completion's final answer equals the gold ``answer``, else 0.0.

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
