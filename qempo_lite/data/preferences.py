"""Preference pairs in TRL ``DPOTrainer`` format, from three input shapes.

* ``messages``: UltraFeedback-binarized rows, whose ``chosen``/``rejected`` are whole
  conversations ending in the answer, or TRL's explicit-prompt conversational rows (a
  ``prompt`` message list and one-message ``chosen``/``rejected`` continuations);
* ``hh``: HH-RLHF ``chosen``/``rejected`` transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``);
* ``plain``: ``prompt``/``chosen``/``rejected`` strings.

The shape is detected from the first row that shows it, or forced with ``shape=``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import QempoError
from .files import MAX_ROW_BYTES, BadRow, Row
from .rows import load_rows, messages_field, text_field

PREFERENCE_SHAPES = ("messages", "hh", "plain")


def _answer(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def _convert_messages(row: Row) -> Row:
    """UltraFeedback-binarized: ``chosen``/``rejected`` are whole conversations ending in the answer."""
    chosen, rejected = messages_field(row, "chosen"), messages_field(row, "rejected")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1]["role"] != "assistant":
            raise BadRow(name, f"should end with an assistant message, ends with {conversation[-1]['role']!r}")
        if not conversation[-1]["content"].strip():
            raise BadRow(name, "is empty")
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("rejected", "has different turns before the answer than 'chosen'")
    if isinstance(row.get("prompt"), list):
        # TRL's explicit-prompt conversational format: the prompt's messages, then the two continuations.
        prompt = messages_field(row, "prompt") + chosen[:-1]
    else:
        prompt = chosen[:-1] or [{"role": "user", "content": text_field(row, "prompt")}]
    if not any(message["role"] == "user" for message in prompt):
        raise BadRow("chosen", "has no user message before the answer")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise BadRow("rejected", "is identical to 'chosen'")
    return {"prompt": prompt, "chosen": _answer(chosen[-1]["content"]), "rejected": _answer(rejected[-1]["content"])}


def _convert_plain(row: Row) -> Row:
    prompt, chosen, rejected = text_field(row, "prompt"), text_field(row, "chosen"), text_field(row, "rejected")
    if chosen == rejected:
        raise BadRow("rejected", "is identical to 'chosen'")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_messages(transcript: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages; a speaker's consecutive turns are merged.

    Merging keeps the roles alternating, which strict chat templates require; HH-RLHF has
    a few transcripts where the assistant speaks twice in a row.
    """
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def _convert_hh(row: Row) -> Row:
    """HH-RLHF transcripts: the shared conversation is the prompt, the last answers differ.

    The prompt ends at the last ``"\\n\\nAssistant:"`` inside the common prefix of the two
    transcripts, not at each transcript's own last turn: some answers in HH-RLHF contain a
    turn marker of their own, which would otherwise make the two prompts disagree.
    An explicitly empty final turn (``"...\\n\\nAssistant:"`` and nothing after it) is kept:
    in HH-RLHF it is the labeller preferring silence to a harmful reply.
    """
    # Some copies of HH-RLHF drop the leading blank line: "Human: ..." is the same transcript.
    chosen, rejected = (_with_leading_break(text_field(row, name)) for name in ("chosen", "rejected"))
    if chosen == rejected:
        raise BadRow("rejected", "is identical to 'chosen'")
    shorter = min(len(chosen), len(rejected))
    common = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), shorter)
    cut = _last_shared_assistant_marker(chosen, rejected, common)
    if cut < 0:
        raise BadRow("chosen", "is not an HH-RLHF transcript ('Human: ... Assistant: ...') ending in an answer")
    try:
        prompt = _hh_messages(chosen[:cut])
    except ValueError as err:
        raise BadRow("chosen", f"cannot be parsed as a transcript: {err}") from None
    if not prompt or prompt[0]["role"] != "user":
        raise BadRow("chosen", "has no 'Human:' turn before the answer")
    marker = len("\n\nAssistant:")
    answers = {"chosen": chosen[cut + marker:].strip(), "rejected": rejected[cut + marker:].strip()}
    if answers["chosen"] == answers["rejected"]:
        raise BadRow("rejected", "has the same answer as 'chosen'")
    return {"prompt": prompt, "chosen": _answer(answers["chosen"]), "rejected": _answer(answers["rejected"])}


def _with_leading_break(transcript: str) -> str:
    stripped = transcript.lstrip()
    return "\n\n" + stripped if stripped.startswith(("Human:", "Assistant:")) else transcript


def _last_shared_assistant_marker(chosen: str, rejected: str, common: int) -> int:
    """Start of the last ``"\\n\\nAssistant:"`` that both transcripts contain at the same place."""
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker, 0, common + len(marker))
    while cut >= 0 and rejected[cut: cut + len(marker)] != marker:
        cut = chosen.rfind(marker, 0, cut)
    return cut


def _pick_preference_converter(shape: str | None) -> Callable[[Row], tuple[str, Callable[[Row], Row]] | None]:
    converters = {"messages": _convert_messages, "hh": _convert_hh, "plain": _convert_plain}

    def pick(row: Row):
        if shape is not None:
            return shape, converters[shape]
        chosen = row.get("chosen")
        if isinstance(chosen, list):
            return "messages", _convert_messages
        if isinstance(chosen, str):
            return ("plain", _convert_plain) if "prompt" in row else ("hh", _convert_hh)
        return None

    return pick


def load_preferences(
    source: str | Path | Any,
    *,
    split: str = "train",
    config: str | None = None,
    on_bad_rows: str = "error",
    limit: int | None = None,
    shape: str | None = None,
    return_report: bool = False,
    max_row_bytes: int = MAX_ROW_BYTES,
):
    """Preference pairs in TRL ``DPOTrainer`` format.

    Args:
        source: a local ``.jsonl``/``.jsonl.gz``/``.json``/``.json.gz``/``.parquet`` file, a Hub
            dataset name (``datasets.load_dataset(source, config, split=split)``), or a
            ``datasets.Dataset``.
        on_bad_rows: ``"error"`` (raise :class:`QempoError` at the first bad row, naming its
            line or row number and field) or ``"skip"`` (drop bad rows, log their count on the
            ``qempo_lite`` logger, and list them in the report).
        limit: stop once this many good rows are loaded.
        shape: force the input shape instead of detecting it from the first row:
            ``"messages"`` (UltraFeedback-binarized: ``chosen``/``rejected`` are conversations
            whose last message is the answer; or TRL's explicit-prompt conversational rows, a
            ``prompt`` message list and ``chosen``/``rejected`` continuations, the loader's own
            output), ``"hh"`` (HH-RLHF: ``chosen``/``rejected`` transcripts, no ``prompt``),
            ``"plain"`` (``prompt``/``chosen``/``rejected`` strings).
        return_report: also return the :class:`LoadReport`.
        max_row_bytes: the most bytes one JSON Lines line may hold (characters of text for
            other sources); a longer row is a bad row. Default 1,000,000.

    Returns:
        A Dataset with exactly the columns ``prompt``, ``chosen``, ``rejected``: message lists
        (``prompt`` the conversation so far, ``chosen``/``rejected`` one assistant message)
        for the ``messages`` and ``hh`` shapes, strings for ``plain``. With
        ``return_report=True``, the tuple ``(dataset, report)``.
    """
    if shape is not None and shape not in PREFERENCE_SHAPES:
        raise QempoError(f"unknown preference data shape {shape!r}; use one of {PREFERENCE_SHAPES}")
    dataset, report = load_rows(
        source,
        _pick_preference_converter(shape),
        split=split,
        config=config,
        on_bad_rows=on_bad_rows,
        limit=limit,
        max_row_bytes=max_row_bytes,
        expected="'chosen' and 'rejected', as strings or message lists",
    )
    return (dataset, report) if return_report else dataset
