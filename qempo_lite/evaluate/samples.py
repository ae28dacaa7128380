"""Evaluation samples: the :class:`Sample` record, its JSONL files, and the chats it answers.

Samples are saved as JSONL (:func:`save_samples` / :func:`load_samples`), one line per
completion, so scoring and judging can be rerun without sampling again. A prompt is a string
(one user message) or a chat (a list of ``{"role", "content"}`` messages ending with a user
message): :func:`to_messages` turns either into a checked chat.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qempo_lite.data.files import read_written_lines
from qempo_lite.data.rows import CHAT_ROLES as ROLES
from qempo_lite.errors import QempoError, not_a_file

Messages = list[dict[str, str]]


@dataclass
class Sample:
    """One completion: which prompt, which adapter (``None`` path = base model), which draw.

    ``turn`` is 2 for a second-turn answer of a two-turn conversation; ``context_index`` is
    then the ``sample_index`` of the first-turn answer it continues. ``prompt`` is the chat
    the completion answers (kept so that a judge can read the question without the prompt
    file). ``num_tokens`` counts the generated tokens, without the end-of-sequence token.
    """

    prompt_id: str | int
    adapter: str
    sample_index: int
    text: str
    num_tokens: int
    turn: int = 1
    context_index: int | None = None
    finish_reason: str | None = None
    prompt: Messages | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------ JSONL files

_REQUIRED = {"prompt_id": (str, int), "adapter": str, "sample_index": int, "text": str, "num_tokens": int}
_OPTIONAL = {"turn": int, "context_index": (int, type(None)), "finish_reason": (str, type(None)),
             "prompt": (list, type(None))}


def save_samples(path: str | os.PathLike, samples: Sequence[Sample]) -> Path:
    """Write ``samples`` as JSONL, one completion per line (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps(asdict(sample), ensure_ascii=False) + "\n")
    # Written aside and renamed, so an interrupted run never leaves a truncated file behind.
    tmp.replace(path)
    return path


def load_samples(path: str | os.PathLike) -> list[Sample]:
    """Read a JSONL file written by :func:`save_samples`; a bad line raises QempoError naming it (a last line cut
    short is dropped with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise QempoError(f"samples file {path} {not_a_file(path)}; create it with 'qempo-lite eval sample --output "
                         f"{path}'")
    samples = [_sample_from_row(row, f"{path} line {number}")
               for number, row in read_written_lines(path, "samples file")]  # a cut-short last line is dropped
    if not samples:
        raise QempoError(f"{path} holds no samples; sample again with 'qempo-lite eval sample'")
    return samples


def _sample_from_row(row: Any, where: str) -> Sample:
    if not isinstance(row, dict):
        raise QempoError(f"{where}: expected a JSON object, got {type(row).__name__}; fix or remove the line")
    for name, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if name not in row:
            if name in _REQUIRED:
                raise QempoError(f"{where}: field '{name}' is missing; each line needs {', '.join(_REQUIRED)}")
            continue
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise QempoError(f"{where}: field '{name}' has the wrong type ({type(value).__name__}); "
                             "re-create the file with 'qempo-lite eval sample'")
    if row.get("prompt") is not None:
        _check_messages(row["prompt"], f"{where}: field 'prompt'")
    known = {f.name for f in fields(Sample)}
    return Sample(**{k: v for k, v in row.items() if k in known})


# ------------------------------------------------------------------------------ prompts


def to_messages(prompt: Any, index: int = 0) -> Messages:
    """A prompt as a chat: a string becomes one user message; a chat is checked and copied."""
    where = f"prompt {index}"
    if isinstance(prompt, str):
        if not prompt.strip():
            raise QempoError(f"{where} is empty; give every prompt some text")
        return [{"role": "user", "content": prompt}]
    _check_messages(prompt, where)
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise QempoError(f"{where} must be a string or a non-empty list of {{'role', 'content'}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise QempoError(f"{where}, message {i}: needs a string 'content'; fix the message")
        if message.get("role") not in ROLES:
            raise QempoError(f"{where}, message {i}: role {message.get('role')!r} is not one of {', '.join(ROLES)}")
    if messages[-1]["role"] != "user":
        raise QempoError(f"{where} ends with a message from the {messages[-1]['role']}; end it with the user "
                         "message to answer")

__all__ = ["Messages", "ROLES", "Sample", "load_samples", "save_samples", "to_messages"]
