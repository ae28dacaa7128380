"""A verifiable reward for questions with a *set* of correct answers ("Name a fruit.").

``set_correct(completion, answers)`` grades one completion against the accepted answers of
its question; ``set_reward`` wraps it as a TRL reward function that reads the dataset column
``answers`` (a list of strings per row). The rules:

1. **One answer, normalised** (:func:`normalise`): lower-cased, accents and quotes kept as
   letters, every character that is not a letter, digit or space turned into a space, the
   words ``a``, ``an`` and ``the`` dropped, whitespace collapsed. An answer also matches in its
   plural form (``apples`` for ``apple``, ``cherries`` for ``cherry``, ``peaches`` for
   ``peach``).
2. **The answer is found in a short reply**: the whole normalised reply, or else each run of
   one to three of its words, is looked up in the set; the reply is correct when exactly one
   accepted answer is found (``"Blue."``, ``"A ripe mango"``). Replies longer than
   :data:`MAX_WORDS` words are not answers (0).
3. **A list or a hedge scores 0**: two different accepted answers (``"red, blue"``), a list
   separator between words (``,`` ``;`` ``/`` ``or`` ``and``), or a hedge word
   (:data:`HEDGES`: maybe, perhaps, probably, possibly, guess, think, not sure, like, e.g.,
   etc., such as) anywhere in the reply.

Grading is pure Python and never raises on bad input: a completion that is not text scores 0.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Iterable

from ..errors import QempoError

MAX_WORDS = 8
ARTICLES = frozenset({"a", "an", "the"})
HEDGES = ("maybe", "perhaps", "probably", "possibly", "guess", "think", "not sure", "like", "e g", "etc",
          "such as", "either", "any of")
LIST_WORDS = frozenset({"or", "and"})
_NON_WORD = re.compile(r"[^\w\s]+", re.UNICODE)
_SEPARATORS = re.compile(r"[,;/]|\s(?:or|and)\s|\n\s*\S", re.IGNORECASE)


def normalise(text: str) -> str:
    """Lower-case, punctuation to spaces, articles dropped, whitespace collapsed (NFKC first)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("_", " ")
    words = [w for w in _NON_WORD.sub(" ", text).split() if w not in ARTICLES]
    return " ".join(words)


def _singular_forms(word: str) -> set[str]:
    """The forms ``word`` may have as a singular: itself, without ``s`` / ``es``, ``ies`` → ``y``."""
    forms = {word}
    if word.endswith("ies") and len(word) > 4:
        forms.add(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.add(word[:-2])
    if word.endswith("s") and len(word) > 2:
        forms.add(word[:-1])
    return forms


def _lookup(phrase: str, accepted: dict[str, str]) -> str | None:
    """The accepted answer ``phrase`` names (its last word may be plural), or None."""
    if phrase in accepted:
        return accepted[phrase]
    head, _, last = phrase.rpartition(" ")
    for form in _singular_forms(last):
        candidate = f"{head} {form}" if head else form
        if candidate in accepted:
            return accepted[candidate]
    return None


def found_answers(reply: str, answers: Iterable[str]) -> set[str]:
    """The accepted answers (normalised) named in ``reply``: the whole reply first, else its 1–3-word runs."""
    accepted = {normalise(a): normalise(a) for a in answers if isinstance(a, str) and normalise(a)}
    text = normalise(reply)
    whole = _lookup(text, accepted)
    if whole is not None:
        return {whole}
    words = text.split()
    found = set()
    for size in (3, 2, 1):
        for start in range(len(words) - size + 1):
            hit = _lookup(" ".join(words[start:start + size]), accepted)
            if hit is not None:
                found.add(hit)
    # A one-word hit inside a longer hit ("green" in "green tea") is the same answer.
    return {a for a in found if not any(a != b and f" {a} " in f" {b} " for b in found)}


def hedge_or_list(reply: str) -> str | None:
    """Why ``reply`` is a hedge or a list of candidates (a short reason), or None."""
    if _SEPARATORS.search(reply.strip()):
        return "a list separator"
    text = f" {normalise(reply)} "
    for hedge in HEDGES:
        if f" {hedge} " in text:
            return f"the hedge {hedge!r}"
    return None


def set_correct(completion: Any, answers: Iterable[str]) -> bool:
    """Is ``completion`` one unhedged answer from ``answers``? (Rules in the module docstring.) Never raises."""
    from . import completion_text

    reply = completion_text(completion)
    if reply is None or not reply.strip():
        return False
    if len(normalise(reply).split()) > MAX_WORDS or hedge_or_list(reply):
        return False
    return len(found_answers(reply, answers)) == 1


def set_reward(completions: list, answers: list, **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 where :func:`set_correct` accepts a completion for its row's ``answers``, else 0.0.

    ``GRPOTrainer`` passes every dataset column as a keyword, so the dataset needs a column
    ``answers`` holding each question's accepted answers (a list of strings).
    """
    if len(answers) != len(completions) or any(isinstance(a, str) or not isinstance(a, (list, tuple))
                                               for a in answers):
        raise QempoError(f"set_reward needs one list of accepted answers per completion (a dataset column "
                         f"'answers'); got {len(completions)} completions and {type(answers).__name__} of "
                         f"{len(answers)}")
    return [1.0 if set_correct(c, a) else 0.0 for c, a in zip(completions, answers)]


__all__ = ["HEDGES", "MAX_WORDS", "found_answers", "hedge_or_list", "normalise", "set_correct", "set_reward"]
