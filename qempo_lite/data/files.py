"""The reading layer: a data source as ``(where, row)`` pairs, before any schema check.

``where`` names the row for error messages as an editor shows it: ``"line 59"`` is the 59th
physical line of a JSON Lines file (blank lines count; lines split on ``\\n`` only), ``"row 3"``
the third row (1-based) of a JSON list, a parquet file or a Hub dataset. ``row`` is a dict, or
a :class:`BadRow` for a line that cannot be a row (not JSON, not UTF-8, over the size cap).
Problems with the file as a whole (missing, unsupported suffix, truncated gzip, undecodable
JSON document, a Hub dataset that cannot be loaded) raise :class:`QempoError` at once.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import QempoError

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
MAX_ROW_BYTES = 1_000_000
"""Default cap on one row: a JSON Lines line of more bytes, or another source's row with more
characters of text, is a bad row (one long row can take gigabytes once tokenized)."""

Row = dict[str, Any]


class BadRow(Exception):
    """A row that cannot be used; ``field`` is the column at fault (None: the whole row)."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field = field
        self.problem = problem

    def describe(self, where: str) -> str:
        """``where`` is the row's place in its source: ``"line 59"`` or ``"row 3"`` (both 1-based)."""
        field = f"field {self.field!r} " if self.field else ""
        return f"{where}: {field}{self.problem}"


Located = tuple[str, "Row | BadRow"]


def source_name(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"


def is_local_source(source: str | Path) -> bool:
    """True for a path to a local data file (it exists, or it has a data file's suffix); False for a Hub name."""
    path = Path(source)
    return path.exists() or str(source).endswith(LOCAL_SUFFIXES) or isinstance(source, Path)


def check_max_row_bytes(max_row_bytes: Any) -> int:
    if isinstance(max_row_bytes, bool) or not isinstance(max_row_bytes, int) or max_row_bytes < 1:
        raise QempoError(f"max_row_bytes must be a positive number of bytes, not {max_row_bytes!r}")
    return max_row_bytes


def _too_big(size: int, max_row_bytes: int, unit: str) -> BadRow:
    return BadRow(None, f"holds {size:,} {unit}, more than the {max_row_bytes:,} allowed per row "
                        "(max_row_bytes); shorten the row or raise the limit")


def _damaged(name: str, line: int | None, err: BaseException) -> QempoError:
    """A compressed stream that ends early or is corrupt, at ``line`` (the first one not read whole)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = f"{name} line {line}" if line else name
    return QempoError(f"{where}: the file is truncated or damaged ({reason}); download or compress it again")


def read_json_lines(handle: BinaryIO, name: str,
                    max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[tuple[int, Row | BadRow]]:
    """JSON Lines from a binary ``handle``: ``(line number, row or BadRow)`` for each non-blank line.

    Lines are split on ``\\n`` only (a U+2028 or a lone ``\\r`` inside a string is text, as in
    JSON), numbered from 1 as an editor shows them, blank ones included in the count. A line
    longer than ``max_row_bytes`` is never held in memory whole: it is read through and
    reported as a BadRow, as is a line that is not UTF-8 or not JSON. A gzip stream that ends
    early or is corrupt raises QempoError naming the line it breaks off in.
    """
    number = 0
    while True:
        try:
            line = handle.readline(max_row_bytes + 1)
        except (EOFError, OSError, zlib.error) as err:
            raise _damaged(name, number + 1, err) from None
        if not line:
            return
        number += 1
        if len(line) > max_row_bytes and not line.endswith(b"\n"):
            size = len(line)
            try:
                while not line.endswith(b"\n"):  # read the rest of the line through, keeping none of it
                    line = handle.readline(1 << 20)
                    if not line:
                        break
                    size += len(line)
            except (EOFError, OSError, zlib.error) as err:
                raise _damaged(name, number, err) from None
            yield number, _too_big(size - line.endswith(b"\n"), max_row_bytes, "bytes")
            continue
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            yield number, BadRow(None, f"is not UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1} of the "
                                       "line); re-encode the file as UTF-8")
            continue
        if not text.strip():  # blank lines are not rows, but they count as lines
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as err:
            yield number, BadRow(None, f"is not valid JSON ({err.msg} at column {err.colno})")


def read_written_lines(path: Path, what: str, *, repair: bool = False,
                       max_row_bytes: int = 64 * MAX_ROW_BYTES) -> list[tuple[int, Row]]:
    """The ``(line number, row)`` pairs of a JSON Lines file that a command writes (samples, a cache).

    A last line cut short (no newline after it, and not JSON or not UTF-8: a write that was
    interrupted) is dropped with a warning; with ``repair`` it is also cut from the file, so
    that lines appended later start on a line of their own. Any other bad line raises
    QempoError naming the file and the line.
    """
    import logging

    data = Path(path).read_bytes()
    rows = list(read_json_lines(io.BytesIO(data), str(path), max_row_bytes))
    torn = bool(data) and not data.endswith(b"\n")
    if torn and rows and isinstance(rows[-1][1], BadRow) and rows[-1][0] == data.count(b"\n") + 1:
        number, _ = rows.pop()
        logging.getLogger("qempo_lite").warning("%s line %d was cut short (an interrupted write); dropped", path,
                                                number)
        if repair:
            os.truncate(path, data.rfind(b"\n") + 1)
    for number, row in rows:
        if isinstance(row, BadRow):
            raise QempoError(f"{what} {path} line {number}: {row.problem}; fix or remove the line (or delete the "
                             "file)")
    return rows  # type: ignore[return-value]


def _text_size(value: Any, limit: int) -> int:
    """Characters of text in a row (strings and bytes, nested), counted until ``limit`` is passed."""
    if isinstance(value, (str, bytes)):
        return len(value)
    total = 0
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        total += _text_size(item, limit - total)
        if total > limit:
            break
    return total


def _rows(rows: Iterable[Any], max_row_bytes: int) -> Iterator[Located]:
    """Rows without line numbers (JSON list, parquet, Hub): ``"row N"``, 1-based, with the size cap."""
    for number, row in enumerate(rows, start=1):
        size = _text_size(row, max_row_bytes)
        yield f"row {number}", _too_big(size, max_row_bytes, "characters of text") if size > max_row_bytes else row


def _read_local(path: Path, max_row_bytes: int) -> Iterator[Located]:
    if not path.is_file():
        raise QempoError(f"data file not found: {path}; check the path")
    name = path.name.lower()
    if not name.endswith(LOCAL_SUFFIXES):
        raise QempoError(f"unsupported data file {path}: use one of {', '.join(LOCAL_SUFFIXES)}")
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise QempoError(f"cannot read parquet file {path}: {err}; re-export it") from err
        yield from _rows((row for batch in parquet.iter_batches() for row in batch.to_pylist()), max_row_bytes)
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            if ".jsonl" in name:
                for number, row in read_json_lines(handle, str(path), max_row_bytes):
                    yield f"line {number}", row
                return
            try:
                data = handle.read()
            except (EOFError, OSError, zlib.error) as err:
                raise _damaged(str(path), None, err) from None
    except OSError as err:  # could not open it (permissions, a directory)
        raise QempoError(f"cannot read {path}: {err.strerror or err}; check the file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise QempoError(f"{path} line {line}: not UTF-8 (byte 0x{data[err.start]:02x}); re-encode the file as "
                         "UTF-8") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        # Many ".json" files are JSON Lines; datasets.load_dataset accepts both too.
        for number, row in read_json_lines(io.BytesIO(data), str(path), max_row_bytes):
            yield f"line {number}", row
        return
    if isinstance(content, dict) and len(content) == 1 and isinstance(next(iter(content.values())), list):
        content = next(iter(content.values()))  # {"data": [...]}
    if not isinstance(content, list):
        raise QempoError(
            f"{path}: expected a JSON list of rows (or JSON Lines); got a JSON {type(content).__name__}"
        )
    yield from _rows(content, max_row_bytes)


def _read_hub(name: str, split: str, config: str | None) -> Iterator[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types (not found, offline, bad config/split)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QempoError(
            f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {first_line}; "
            f"check the name, config and split, or pass a local {'/'.join(LOCAL_SUFFIXES)} file"
        ) from err
    yield from dataset


def read_rows(source: Any, split: str, config: str | None, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Located]:
    """``(where, row)`` pairs of any source (see the module docstring)."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return _rows(source, max_row_bytes)
    if not isinstance(source, (str, Path)):
        raise QempoError(
            "data source must be a file path, a Hub dataset name or a datasets.Dataset, "
            f"not {type(source).__name__}"
        )
    if is_local_source(source):
        return _read_local(Path(source), max_row_bytes)
    return _rows(_read_hub(str(source), split, config), max_row_bytes)
