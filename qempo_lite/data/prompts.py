"""Prompts for online training with any reward: a ``prompt`` column and whatever columns the rewards read.

``load_prompts`` reads rows that have a ``prompt`` (a string, turned into one user message, or a
chat message list) and keeps every other column as it is, for TRL to pass to the reward
functions as keyword arguments (e.g. ``answers`` for the ``answer_set`` reward).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import MAX_ROW_BYTES, BadRow, Row
from .rows import load_rows, messages_field, text_field


def _convert(row: Row) -> Row:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        messages = messages_field(row, "prompt")
    else:
        messages = [{"role": "user", "content": text_field(row, "prompt")}]
    if not any(m["role"] == "user" for m in messages):
        raise BadRow("prompt", "has no user message")
    return {**row, "prompt": messages}


def _pick(row: Row):
    return ("prompt", _convert) if "prompt" in row else None


def load_prompts(source: str | Path | Any, *, split: str = "train", config: str | None = None,
                 on_bad_rows: str = "error", limit: int | None = None, max_row_bytes: int = MAX_ROW_BYTES):
    """A Dataset of ``prompt`` (chat messages) plus the source's other columns, every row checked."""
    dataset, _ = load_rows(source, _pick, split=split, config=config, on_bad_rows=on_bad_rows, limit=limit,
                           max_row_bytes=max_row_bytes, expected="'prompt' (a string or a list of messages)")
    return dataset


__all__ = ["load_prompts"]
