"""The paper's MT-Bench diversity protocol (Table 2) and diversity scores of sample sets.

Protocol, per adapter: 16 samples of each question's first turn; then 16 second-turn samples,
each answering the second question after a first-turn sample drawn at random (seeded per
adapter) as the context. Diversity is then scored

* pooled: one set of every sample of the adapter (both turns, all questions), as Table 2;
* per question: one set per (question, turn) — the answers to the same request — averaged
  over the sets.

Questions come from MT-Bench's ``question.jsonl`` (``question_id``, ``category``, ``turns``,
optional ``reference``) or any file of that shape; ``"mtbench"`` names the copy shipped in the
package (``qempo_lite/evaluate/data/mt_bench/``: FastChat's 80 questions and its judge prompts,
Apache-2.0, licence beside them).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qempo_lite.errors import QempoError, not_a_file
from qempo_lite.resources import package_file

from .sampling import Sample, Sampler

SAMPLES_PER_TURN = 16
MTBENCH = "mtbench"


@dataclass
class Question:
    """One MT-Bench question: its turns (one or two user messages) and optional reference answers."""

    question_id: str | int
    category: str
    turns: list[str]
    reference: list[str] | None = None


def resolve_mtbench_file(source: str | os.PathLike, kind: str = "questions") -> Path:
    """A questions (or ``kind="judge_prompts"``) file: ``source`` itself, or the MT-Bench copy for ``"mtbench"``."""
    if str(source) != MTBENCH:
        path = Path(source).expanduser()
        if not path.is_file():
            raise QempoError(f"{kind.replace('_', ' ')} file {path} {not_a_file(path)}; pass an existing JSONL file or "
                             "'mtbench'")
        return path
    return package_file("evaluate", "data", "mt_bench",
                        "question.jsonl" if kind == "questions" else "judge_prompts.jsonl")


def load_questions(source: str | os.PathLike = MTBENCH, *, limit: int | None = None,
                   per_category: int | None = None) -> list[Question]:
    """MT-Bench-shaped questions; a bad row raises QempoError naming its index and field.

    ``per_category`` keeps the first that many questions of each category (in file order), a fixed
    subset that still covers every category; ``limit`` then keeps the first ``limit`` of those.
    """
    path = resolve_mtbench_file(source)
    questions, seen, taken = [], set(), Counter()
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{path} row {index}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise QempoError(f"{where}: not JSON ({err.msg}); fix or remove the row") from None
        if not isinstance(row, dict):
            raise QempoError(f"{where}: expected a JSON object; fix or remove the row")
        qid = row.get("question_id", index)
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise QempoError(f"{where}: field 'question_id' must be an integer or a string; fix the row")
        if qid in seen:
            raise QempoError(f"{where}: field 'question_id' {qid!r} repeats an earlier row; make ids unique")
        turns = row.get("turns")
        if not isinstance(turns, list) or not 1 <= len(turns) <= 2 or not all(isinstance(t, str) and t.strip()
                                                                              for t in turns):
            raise QempoError(f"{where}: field 'turns' must be a list of one or two non-empty strings; fix the row")
        category = row.get("category", "")
        if not isinstance(category, str):
            raise QempoError(f"{where}: field 'category' must be a string; fix the row")
        reference = row.get("reference")
        if reference is not None and not (isinstance(reference, list) and all(isinstance(r, str) for r in reference)):
            raise QempoError(f"{where}: field 'reference' must be a list of strings; fix the row")
        seen.add(qid)
        if per_category is not None and taken[category] >= per_category:
            continue
        taken[category] += 1
        questions.append(Question(qid, category, list(turns), reference))
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise QempoError(f"{path} holds no questions; pass an MT-Bench question.jsonl")
    return questions


def sample_mtbench(sampler: Sampler, adapters: Mapping[str, Any] | Sequence[str], questions: Sequence[Question], *,
                   n: int = SAMPLES_PER_TURN, temperature: float = 1.0, top_p: float = 1.0,
                   max_new_tokens: int = 1024, seed: int = 0, progress: bool = True) -> list[Sample]:
    """The two-turn protocol: ``n`` first-turn samples per question, then ``n`` second-turn samples,
    each after a first-turn sample drawn at random (seeded) as the context.

    Second-turn Samples carry ``turn=2``, ``sample_index`` 0..n-1 and ``context_index``, the
    ``sample_index`` of the first-turn answer they continue.
    """
    options = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "progress": progress}
    first = sampler.sample(adapters, [[{"role": "user", "content": q.turns[0]}] for q in questions], n=n, seed=seed,
                           prompt_ids=[q.question_id for q in questions], **options)
    by_key = {(s.adapter, s.prompt_id, s.sample_index): s for s in first}
    prompts, plan = defaultdict(list), defaultdict(list)  # per adapter: the chats and (question, j, context)
    names = list(dict.fromkeys(s.adapter for s in first))
    for name in names:
        # Seeded per adapter: its contexts do not depend on which other adapters are sampled alongside.
        rng = random.Random(f"{seed}:{name}")
        for q in questions:
            if len(q.turns) < 2:
                continue
            for j in range(n):
                context = by_key[(name, q.question_id, rng.randrange(n))]
                prompts[name].append([{"role": "user", "content": q.turns[0]},
                                      {"role": "assistant", "content": context.text},
                                      {"role": "user", "content": q.turns[1]}])
                plan[name].append((q.question_id, j, context.sample_index))
    second = []
    for name in names:
        if not prompts[name]:
            continue
        # Every context differs, so each second-turn sample is its own prompt with n=1.
        spec = {name: adapters[name]} if isinstance(adapters, Mapping) else [name]
        drawn = sampler.sample(spec, prompts[name], n=1,
                               seed=seed + 1, **options)
        for s, (qid, j, context) in zip(drawn, plan[name]):
            second.append(replace(s, prompt_id=qid, sample_index=j, turn=2, context_index=context))
    return first + second


def group_texts(samples: Sequence[Sample]) -> dict[str, dict[tuple, list[str]]]:
    """adapter -> (prompt_id, turn) -> texts, in sample order."""
    groups: dict[str, dict[tuple, list[str]]] = defaultdict(lambda: defaultdict(list))
    for s in sorted(samples, key=lambda s: (s.adapter, str(s.prompt_id), s.turn, s.sample_index)):
        groups[s.adapter][(s.prompt_id, s.turn)].append(s.text)
    return groups


def diversity_scores(samples: Sequence[Sample], scorer, *, per_question: bool = True,
                     progress: bool = True) -> dict[str, dict[str, Any]]:
    """Per adapter: diversity of the pooled samples (Table 2) and, averaged, of each (question, turn) set.

    ``scorer`` is a :class:`~qempo_lite.evaluate.metrics.DiversityScorer`. Returns
    ``{adapter: {<each of metrics.SCORES>, n_texts, n_sentences, "per_question": {<each of
    metrics.SCORES>, n_sets}}}``; sets of fewer than two sentences are skipped in the
    per-question mean.
    """
    from rich.progress import Progress

    from .diversity import split_sentences
    from .metrics import SCORES

    groups = group_texts(samples)
    results: dict[str, dict[str, Any]] = {}
    with Progress(disable=not progress, transient=True) as bar:
        total = sum(1 + (len(g) if per_question else 0) for g in groups.values())
        task = bar.add_task("diversity", total=total)
        for adapter, sets in groups.items():
            bar.update(task, description=f"diversity of {adapter}")
            pooled = [t for texts in sets.values() for t in texts]
            if len(split_sentences(pooled)) < 2:
                raise QempoError(f"adapter {adapter!r}: its {len(pooled)} sample(s) hold fewer than 2 sentences; "
                                 "diversity needs at least 2: sample more (n >= 2, longer answers)")
            scored = scorer.score(pooled)
            row = {k: scored[k] for k in SCORES}
            row.update(n_texts=scored["n_texts"], n_sentences=scored["n_sentences"])
            bar.advance(task)
            if per_question:
                means = {k: 0.0 for k in SCORES}
                count = 0
                for texts in sets.values():
                    bar.advance(task)
                    if len(split_sentences(texts)) < 2:
                        continue
                    one = scorer.score(texts)
                    for k in SCORES:
                        means[k] += one[k]
                    count += 1
                row["per_question"] = {**{k: (v / count if count else None) for k, v in means.items()},
                                       "n_sets": count}
            results[adapter] = row
    return results


__all__ = ["Question", "load_questions", "resolve_mtbench_file", "sample_mtbench", "diversity_scores", "group_texts",
           "SAMPLES_PER_TURN"]
