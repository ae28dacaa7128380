"""Verifiable rewards: is a completion's final answer to a math problem right?

``math_correct(completion, gold)`` grades one completion; ``math_reward`` wraps it as a TRL
reward function. The grading rules, each stated in full (every word list) in the docstring of
the module that applies it (``docs/rewards.md`` shows examples):

1. **The last answer stated wins** (:mod:`~qempo_lite.rewards.extraction`): the last non-empty
   ``\\boxed{x}``, ``#### x``, "the answer is x", "Answer: x" or ``A: x`` line, each running to
   the end of its clause; a final ``\\boxed{`` never closed is a cut-off answer; with no
   statement, the last number.
2. **Any hedge scores 0** (:mod:`~qempo_lite.rewards.hedges`): inside the answer (or, and,
   list, range, bound, approx, ±, doubt, not, etc; a category the gold contains is allowed),
   just before it, just after it on its line, or anywhere in its sentence.
3. **Numbers are read exactly** (:mod:`~qempo_lite.rewards.compare`): sign, currency,
   separators, decimals, fractions, mixed numbers, powers of ten, scale words, then units that
   leave the value unchanged; an integer gold must match exactly, any other to a relative 1e-6.
4. **Otherwise** (:mod:`~qempo_lite.rewards.compare`) the normalised strings are compared,
   then math-verify decides; against a numeric gold only for answers whose words are units and
   whose LaTeX commands are plain arithmetic.

Malformed completions (None, not text, empty, over ``MAX_COMPLETION_CHARS``, no answer
found, a cut-off ``\\boxed{``, an answer over ``MAX_ANSWER_CHARS``, a checker error or
timeout) never raise: they score 0 and are counted, see :func:`malformed_count`. Hedged and
wrong answers score 0 and are not counted. Grading takes tens of microseconds per completion
and stays linear in its length (only a bounded window around the answer is searched).
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import QempoError
from .compare import VERIFY_TIMEOUT_S, answers_match, as_number, numbers_equal
from .extraction import MAX_ANSWER_CHARS, extract_answer, final_statement, gold_answer, statement_value
from .hedges import hedge_categories, hedge_reason
from .malformed import count_malformed, malformed_count, reset_malformed_count

__all__ = [
    "MAX_ANSWER_CHARS", "MAX_COMPLETION_CHARS", "VERIFY_TIMEOUT_S", "answers_match", "as_number",
    "completion_text", "extract_answer", "gold_answer", "hedge_categories", "malformed_count", "math_correct",
    "math_reward", "numbers_equal", "reset_malformed_count",
]

logger = logging.getLogger("qempo_lite")

MAX_COMPLETION_CHARS = 200_000
"""Longer completions (about 50k tokens) are malformed: no generation budget produces them."""


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

    The final answer is the last one stated (rule 1 of the package docstring); any hedge in
    it, just before or after it, or in its sentence scores 0 (rule 2); values are compared as
    exact numbers, then strings, then through math-verify (rules 3 and 4). ``gold`` may be a
    GSM8K solution (``#### x``), a MATH solution (last ``\\boxed{}``) or a bare value (string
    or number). Malformed inputs return False and add one to :func:`malformed_count`.
    """
    text = completion_text(completion)
    if text is None:
        return count_malformed(f"not text: {type(completion).__name__}")
    if len(text) > MAX_COMPLETION_CHARS:
        return count_malformed(f"{len(text)} characters, over {MAX_COMPLETION_CHARS}")
    reference = gold_answer(gold)
    if not reference:
        return count_malformed("gold answer unreadable")
    statement = final_statement(text) if text.strip() else None
    if statement is None:
        return count_malformed("no final answer found")
    if statement.kind == "cut_box":
        return count_malformed("the final \\boxed{ is never closed")
    pred = statement_value(text, statement)
    if not pred:
        return count_malformed("no final answer found")
    if len(pred) > MAX_ANSWER_CHARS:
        return count_malformed(f"final answer of {len(pred)} characters")
    try:
        hedged = hedge_reason(text, statement, reference)
        if hedged:
            logger.debug("hedged answer scored 0: %s", hedged)
            return False
        return answers_match(reference, pred)
    except QempoError:
        raise  # a missing extra: the user must install it, not train on zero rewards
    except Exception:  # a checker bug must not end a training run; it is logged and counted
        logger.warning("answer check failed on %r vs gold %r", pred[:200], reference[:200], exc_info=True)
        return count_malformed("answer check raised")


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

