"""Evaluation pairs held out by content: a pair is its prompt and its two answers, wherever it appears.

A data file may hold the same pair several times (a scrape, a merge of two dumps). Holding
out a fraction of the *rows* would then leave copies of most held-out pairs in the training
set; :func:`hold_out_by_content` holds out a fraction of the *distinct* pairs, and every copy
of a held-out pair leaves the training set with it. :func:`pairs_also_in` counts the pairs of
a separate evaluation file that are training pairs too.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import QempoError


def pair_key(row: dict[str, Any]) -> str:
    """A pair's content: its prompt and its two answers (strings or message lists), as one string."""
    return json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True, ensure_ascii=False)


def hold_out_by_content(pairs, fraction: float, seed: int):
    """``(train, evaluation, duplicates)``: a seeded ``fraction`` of the distinct pairs for evaluation, the rest
    (every copy of each) for training, and how many rows repeat an earlier one.

    Without duplicates it is exactly ``pairs.train_test_split(test_size=fraction, seed=seed)``.
    """
    keys = [pair_key(row) for row in pairs]
    first: dict[str, int] = {}
    for index, key in enumerate(keys):
        first.setdefault(key, index)
    duplicates = len(keys) - len(first)
    distinct = pairs.select(sorted(first.values())) if duplicates else pairs
    if len(distinct) < 2:
        raise QempoError(f"eval_fraction needs at least 2 distinct training pairs, found {len(distinct)} "
                         f"(in {len(keys)} rows); add pairs or name an evaluation file with eval_dataset")
    parts = distinct.train_test_split(test_size=fraction, seed=seed)
    if not duplicates:
        return parts["train"], parts["test"], 0
    held = {pair_key(row) for row in parts["test"]}
    return pairs.select([i for i, key in enumerate(keys) if key not in held]), parts["test"], duplicates


def pairs_also_in(evaluation, train) -> int:
    """How many evaluation pairs are also training pairs (the same prompt and answers)."""
    trained = {pair_key(row) for row in train}
    return sum(pair_key(row) in trained for row in evaluation)


__all__ = ["hold_out_by_content", "pair_key", "pairs_also_in"]
