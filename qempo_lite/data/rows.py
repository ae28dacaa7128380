"""Checking rows: the loop shared by every loader, its report, and the field checks.

:func:`load_rows` reads a source through :mod:`qempo_lite.data.files`, picks the row shape
from the first row that shows it, converts every row, and either stops at the first bad row
(``on_bad_rows="error"``: a :class:`QempoError` naming its line or row and field) or drops it
and lists it in a :class:`LoadReport` (``"skip"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..errors import QempoError
from .files import MAX_ROW_BYTES, BadRow, Located, Row, check_max_row_bytes, read_rows, source_name

logger = logging.getLogger("qempo_lite")

ON_BAD_ROWS = ("error", "skip")
CHAT_ROLES = ("system", "user", "assistant")  # the roles a chat template renders


@dataclass
class LoadReport:
    """What a loader read: the detected shape, and the bad rows it skipped."""

    source: str
    shape: str
    rows_read: int = 0
    bad_rows: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad_rows)

    @property
    def rows_kept(self) -> int:
        return self.rows_read - self.skipped


def load_rows(
    source: Any,
    pick_converter: Callable[[Row], tuple[str, Callable[[Row], Row]] | None],
    *,
    split: str,
    config: str | None,
    on_bad_rows: str,
    limit: int | None,
    expected: str,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> tuple[Any, LoadReport]:
    """Read rows, pick the converter from the first row that shows the shape, check them all.

    ``pick_converter(row)`` returns ``(shape, convert)`` or None when the row does not tell;
    ``convert(row)`` returns the output row or raises :class:`BadRow`.
    """
    import datasets

    if on_bad_rows not in ON_BAD_ROWS:
        raise QempoError(f"on_bad_rows must be one of {ON_BAD_ROWS}, not {on_bad_rows!r}")
    if limit is not None and limit < 1:
        raise QempoError(f"limit must be a positive number of rows, not {limit!r}")
    name = source_name(source)
    rows = read_rows(source, split, config, check_max_row_bytes(max_row_bytes))

    # Rows read before the shape is known are converted afterwards, with the same rules.
    pending: list[Located] = []
    picked = None
    for where, row in rows:
        pending.append((where, row))
        if isinstance(row, dict):
            picked = pick_converter(row)
            if picked is not None:
                break
    if not pending:
        raise QempoError(f"{name} has no rows; check the file or the split name")
    if picked is None:
        unreadable = next(((where, row) for where, row in pending if isinstance(row, BadRow)), None)
        if unreadable:  # no row could be read at all: say why rather than "no expected columns"
            raise QempoError(f"{name}: {unreadable[1].describe(unreadable[0])}; fix the row")
        first = next((row for _, row in pending if isinstance(row, dict)), None)
        seen = "" if first is None else "; the first row has " + (", ".join(
            f"{key} ({type(value).__name__})" for key, value in list(first.items())[:6]) or "no columns")
        raise QempoError(f"{name}: no row has the expected columns ({expected}){seen}; check the dataset")
    shape, convert = picked

    report = LoadReport(source=name, shape=shape)
    out: list[Row] = []
    # A Hub-sized dataset (UltraFeedback: 60k rows) takes seconds; small files show no bar.
    progress = tqdm(_chain(pending, rows), desc=f"Checking {shape} rows", unit=" rows", delay=2.0)
    for where, row in progress:
        report.rows_read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, dict):
                raise BadRow(None, f"is a JSON {type(row).__name__}, not an object")
            out.append(convert(row))
        except BadRow as bad:
            message = bad.describe(where)
            if on_bad_rows == "error":
                raise QempoError(f"{name}: {message}; fix the row or pass --on-bad-rows skip") from None
            report.bad_rows.append(message)
        if limit is not None and len(out) >= limit:
            break
    progress.close()
    if report.skipped:
        logger.warning("skipped %d bad rows of %d (first: %s)", report.skipped, report.rows_read, report.bad_rows[0])
    if not out:
        raise QempoError(f"{name}: all {report.rows_read} rows are bad (first: {report.bad_rows[0]}); fix the data")
    return datasets.Dataset.from_list(out), report


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


# ------------------------------------------------------------------------ field checks


def text_field(row: Row, name: str, *, allow_empty: bool = False) -> str:
    """The string in ``row[name]``; BadRow when missing, not a string, or blank."""
    if name not in row or row[name] is None:
        raise BadRow(name, "is missing")
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(name, f"should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(name, "is empty")
    return value


def messages_field(row: Row, name: str) -> list[dict[str, str]]:
    """``row[name]`` as a list of ``{"role", "content"}`` strings (extra keys dropped); roles from
    :data:`CHAT_ROLES`, and no blank user message (the plain shape refuses a blank prompt too)."""
    if name not in row or row[name] is None:
        raise BadRow(name, "is missing")
    value = row[name]
    if not isinstance(value, list) or not value:
        raise BadRow(name, f"should be a non-empty list of messages, got {type(value).__name__}")
    messages = []
    for turn, message in enumerate(value):
        well_formed = isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))
        if not well_formed:
            raise BadRow(name, f"message {turn} should be {{'role': str, 'content': str}}")
        if message["role"] not in CHAT_ROLES:
            raise BadRow(name, f"message {turn} has role {message['role'][:40]!r}, not one of {', '.join(CHAT_ROLES)}")
        if message["role"] == "user" and not message["content"].strip():
            raise BadRow(name, f"message {turn} (user) is empty")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages
