"""The real-model demos' task: short questions with many correct answers, and how answers are scored.

66 questions ("Name a fruit.", "Name a country in Africa.", "Name a prime number below 50.")
with their accepted answers are in ``answer_sets.json`` (written for qempo-lite, same licence
as the package). A fixed, seeded split holds out :data:`HELD_OUT` questions that no training
ever sees; the rest are for training. Two more questions, never asked, are the worked
examples of the few-shot prompt: without them SmolLM2-135M-Instruct answers with a sentence
at temperature 1 (correct 8 % of the time), with them with one or two words (about 40 %).

Scoring (:func:`score_policy`) uses the set-of-answers checker of
:mod:`qempo_lite.rewards.answer_sets`: a sample is correct when it names exactly one accepted
answer, unhedged, and that answer (normalised) is what the diversity among correct answers is
measured on. Per question, from ``n`` samples: ``accuracy`` (fraction correct),
``correct_entropy`` (entropy, in nats, of the empirical distribution of the correct answers,
renormalised over them; 0 with no correct sample), ``distinct_correct`` (how many different
correct answers), ``pass_at_k`` (unbiased estimator); then the means over questions, with the
guo2024 lexical and semantic diversity of each question's samples averaged the same way.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from functools import lru_cache
from importlib import resources

SYSTEM_PROMPT = "Answer with one word."
SHOTS = (("Name a colour.", "Blue."), ("Name a fruit.", "Mango."))
HELD_OUT = 20
SPLIT_SEED = 2602  # fixed: every run and seed holds out the same questions
MAX_NEW_TOKENS = 6
KS = list(range(1, 17))


@lru_cache(maxsize=1)
def answer_sets() -> dict[str, list[str]]:
    """Every question of the task with its accepted answers (the two worked examples excluded)."""
    text = resources.files("qempo_lite.demo").joinpath("answer_sets.json").read_text(encoding="utf-8")
    shots = {question for question, _ in SHOTS}
    return {q: answers for q, answers in json.loads(text).items() if q not in shots}


def split() -> tuple[list[str], list[str]]:
    """``(train, held_out)`` questions: a fixed seeded split, disjoint."""
    questions = sorted(answer_sets())
    held_out = sorted(random.Random(SPLIT_SEED).sample(questions, HELD_OUT))
    return [q for q in questions if q not in held_out], held_out


def messages(question: str) -> list[dict]:
    """The chat prompt: a one-line system prompt (in place of the template's longer default) and two worked examples."""
    turns = [{"role": "system", "content": SYSTEM_PROMPT}]
    for asked, answered in SHOTS:
        turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return turns + [{"role": "user", "content": question}]


def rows(questions: list[str]) -> list[dict]:
    """Dataset rows for TRL: the chat prompt and the column ``answers`` that ``set_reward`` reads."""
    sets = answer_sets()
    return [{"prompt": messages(q), "answers": sets[q], "question": q} for q in questions]


def correct_answer(text: str, answers: list[str]) -> str | None:
    """The accepted answer (normalised) that ``text`` names, None when it is not a correct reply."""
    from ..rewards.answer_sets import found_answers, set_correct

    if not set_correct(text, answers):
        return None
    (answer,) = found_answers(text, answers)
    return answer


def entropy_of_counts(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def score_question(texts: list[str], answers: list[str]) -> dict:
    """accuracy, correct_entropy, distinct_correct and the correct count of one question's samples."""
    correct = [a for a in (correct_answer(t, answers) for t in texts) if a is not None]
    counts = Counter(correct)
    return {"accuracy": len(correct) / len(texts), "correct_entropy": entropy_of_counts(counts),
            "distinct_correct": len(counts), "correct": len(correct), "answers": dict(counts.most_common())}


def score_policy(samples: dict[str, list[str]], encoder=None) -> dict:
    """The report's numbers for one policy: means over questions (see the module docstring)."""
    from ..evaluate.diversity import lexical_diversity, semantic_diversity
    from ..evaluate.passk import pass_at_k_curve

    sets = answer_sets()
    per_question = {q: score_question(texts, sets[q]) for q, texts in samples.items()}
    n = len(next(iter(samples.values())))
    curve = pass_at_k_curve(n, [row["correct"] for row in per_question.values()], [k for k in KS if k <= n])

    def mean(key):
        return sum(row[key] for row in per_question.values()) / len(per_question)

    def diversity(metric):
        values = []
        for texts in samples.values():
            kept = [t for t in texts if t.strip()]
            if kept:
                values.append(metric(kept))
        return sum(values) / len(values) if values else float("nan")

    return {
        "accuracy": mean("accuracy"), "correct_entropy": mean("correct_entropy"),
        "distinct_correct": mean("distinct_correct"),
        "pass_at_k": {str(k): float(v) for k, v in curve.items()},
        "lexical": diversity(lexical_diversity),
        "semantic": diversity(lambda texts: semantic_diversity(texts, encoder)) if encoder is not None else None,
        "questions": per_question,
    }


__all__ = ["HELD_OUT", "KS", "MAX_NEW_TOKENS", "SHOTS", "SYSTEM_PROMPT", "answer_sets", "correct_answer", "messages",
           "rows", "score_policy", "score_question", "split"]
