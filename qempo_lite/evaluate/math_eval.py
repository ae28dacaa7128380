"""pass@k on math problems (the paper's Figure 3): sample n answers per problem, check each, estimate.

Every adapter answers every problem ``n`` times (the paper: n = 100, temperature 1) through one
:class:`~qempo_lite.evaluate.sampling.Sampler`, so the base model is loaded once and vLLM
batches all adapters together. Each answer is checked with
:func:`qempo_lite.rewards.math_correct` against the gold answer, and the counts of correct
answers per problem give the unbiased pass@k of :func:`qempo_lite.evaluate.passk.pass_at_k_curve`
for k = 1, 2, 4, ... up to n.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qempo_lite.errors import QempoError

from .passk import pass_at_k_curve
from .sampling import Sample, Sampler

PAPER_N = 100


def _problems(dataset: Iterable[Mapping[str, Any]]) -> list[tuple[Any, str]]:
    problems = []
    for index, row in enumerate(dataset):
        if not isinstance(row, Mapping) or "prompt" not in row or not isinstance(row.get("answer"), str):
            raise QempoError(f"math problem {index}: needs 'prompt' and a string 'answer'; "
                             "load the data with qempo_lite.data.load_math")
        problems.append((row["prompt"], row["answer"]))
    if not problems:
        raise QempoError("no math problems to evaluate; check the data file and --limit")
    return problems


def score_samples(samples: Sequence[Sample], answers: Sequence[str], *, progress: bool = True) -> dict[str, list[int]]:
    """Correct answers per problem for each adapter: ``{adapter: [c_0, c_1, ...]}`` (prompt_id = problem index)."""
    from rich.progress import track

    from qempo_lite.rewards import math_correct

    correct: dict[str, list[int]] = {}
    # Checked in this thread on purpose: math-verify's time limit works in the main thread only.
    for s in track(samples, description="checking answers", disable=not progress, transient=True):
        counts = correct.setdefault(s.adapter, [0] * len(answers))
        counts[s.prompt_id] += bool(math_correct(s.text, answers[s.prompt_id]))
    return correct


def evaluate_math(sampler: Sampler, adapters: Mapping[str, Any] | Sequence[str],
                  dataset: Iterable[Mapping[str, Any]], *, n: int = PAPER_N, ks: Sequence[int] | None = None,
                  temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 1024, seed: int = 0,
                  progress: bool = True) -> tuple[dict[str, dict[str, Any]], list[Sample]]:
    """pass@k of every adapter on ``dataset`` (rows with a chat ``prompt`` and a gold ``answer``).

    Returns ``({adapter: {"n", "n_problems", "accuracy", "pass@k": {k: value}, "correct": [c per
    problem]}}, samples)``; ``accuracy`` is the mean fraction of correct samples (= pass@1).
    """
    problems = _problems(dataset)
    samples = sampler.sample(adapters, [p for p, _ in problems], n=n, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    correct = score_samples(samples, [a for _, a in problems], progress=progress)
    results = {}
    for adapter, counts in correct.items():
        curve = pass_at_k_curve(n, counts, ks)
        results[adapter] = {"n": n, "n_problems": len(counts), "accuracy": sum(counts) / (n * len(counts)),
                            "pass@k": {str(k): v for k, v in curve.items()}, "correct": counts}
    return results, samples


__all__ = ["evaluate_math", "score_samples", "PAPER_N"]
