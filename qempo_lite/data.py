"""Preference and math datasets: reading, schema checks, and TRL's row formats.

Both loaders read a Hub dataset by name (``datasets.load_dataset``) or a local ``.jsonl``,
``.jsonl.gz``, ``.json``, ``.json.gz`` or ``.parquet`` file, check every row, and return a
``datasets.Dataset`` in the format the TRL trainers take:

* ``load_preferences`` -> ``prompt`` / ``chosen`` / ``rejected`` for ``DPOTrainer``
  (conversational message lists, or plain strings when the source is plain strings);
* ``load_math`` -> ``prompt`` (conversational) / ``answer`` (gold final answer) /
  ``solution`` for ``GRPOTrainer`` with :func:`qempo_lite.rewards.math_reward`.

A bad row (missing field, wrong type, empty or identical responses, unparseable
transcript, not JSON, not UTF-8, over ``max_row_bytes``) is an error naming where it is and
its field, or, with ``on_bad_rows="skip"``, is dropped and counted in a :class:`LoadReport`.
Rows are named as an editor shows them: ``line 59`` is the 59th physical line of a JSON Lines
file (blank lines count; lines split on ``\\n`` only), ``row 3`` the third row (1-based) of a
JSON list, a parquet file or a Hub dataset. A truncated gzip file is an error naming the line
it breaks off in.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tqdm.auto import tqdm

from .errors import QempoError

logger = logging.getLogger("qempo_lite")

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to every math question: the answer checker grades the last answer the completion states
(a ``\\boxed{}`` among them; see :mod:`qempo_lite.rewards`)."""

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
PREFERENCE_SHAPES = ("messages", "hh", "plain")
ON_BAD_ROWS = ("error", "skip")
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


# ----------------------------------------------------------------------------- reading
#
# The reading layer turns a source into ``(where, row)`` pairs: ``where`` names the row for
# error messages ("line 59", the 1-based physical line of a JSON Lines file; "row 3", the
# 1-based position in a JSON list, a parquet file or a Hub dataset), ``row`` is a dict or a
# BadRow for a line that cannot be a row (not JSON, not UTF-8, over the size cap). Problems
# with the file as a whole (missing, truncated gzip, undecodable JSON document) raise
# QempoError at once.

Located = tuple[str, "Row | BadRow"]


def _source_name(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"


def is_local_source(source: str | Path) -> bool:
    """True for a path to a local data file (it exists, or it has a data file's suffix); False for a Hub name."""
    path = Path(source)
    return path.exists() or str(source).endswith(LOCAL_SUFFIXES) or isinstance(source, Path)



def _check_max_row_bytes(max_row_bytes: Any) -> int:
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


def _read_rows(source: Any, split: str, config: str | None, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Located]:
    """``(where, row)`` pairs of any source (see the comment above)."""
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


def _load(
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
    name = _source_name(source)
    rows = _read_rows(source, split, config, _check_max_row_bytes(max_row_bytes))

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
        raise QempoError(f"{name}: no row has the expected columns ({expected}); check the dataset")
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


# ------------------------------------------------------------------------ row checks


def _text(row: Row, name: str, *, allow_empty: bool = False) -> str:
    """The string in ``row[name]``; BadRow when missing, not a string, or blank."""
    if name not in row or row[name] is None:
        raise BadRow(name, "is missing")
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(name, f"should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(name, "is empty")
    return value


def _messages(row: Row, name: str) -> list[dict[str, str]]:
    """``row[name]`` as a list of ``{"role", "content"}`` strings (extra keys dropped)."""
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
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


# ------------------------------------------------------------------ preference pairs


def _answer(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def _convert_messages(row: Row) -> Row:
    """UltraFeedback-binarized: ``chosen``/``rejected`` are whole conversations ending in the answer."""
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1]["role"] != "assistant":
            raise BadRow(name, f"should end with an assistant message, ends with {conversation[-1]['role']!r}")
        if not conversation[-1]["content"].strip():
            raise BadRow(name, "is empty")
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("rejected", "has different turns before the answer than 'chosen'")
    if isinstance(row.get("prompt"), list):
        # TRL's explicit-prompt conversational format: the prompt's messages, then the two continuations.
        prompt = _messages(row, "prompt") + chosen[:-1]
    else:
        prompt = chosen[:-1] or [{"role": "user", "content": _text(row, "prompt")}]
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise BadRow("rejected", "is identical to 'chosen'")
    return {"prompt": prompt, "chosen": _answer(chosen[-1]["content"]), "rejected": _answer(rejected[-1]["content"])}


def _convert_plain(row: Row) -> Row:
    prompt, chosen, rejected = _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")
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
    chosen, rejected = (_with_leading_break(_text(row, name)) for name in ("chosen", "rejected"))
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
            ``prompt`` message list and ``chosen``/``rejected`` continuations, the loader's own output), ``"hh"`` (HH-RLHF: ``chosen``/``rejected``
            transcripts, no ``prompt``), ``"plain"`` (``prompt``/``chosen``/``rejected`` strings).
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
    dataset, report = _load(
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


# ---------------------------------------------------------------------------- math


BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
BRACE = re.compile(r"[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included."""
    # Only the last few starts: an unclosed brace (a truncated generation) must not cost O(n^2).
    for start in reversed([m.end() for m in BOXED.finditer(text)][-3:]):
        depth = 1
        for brace in BRACE.finditer(text, start):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                return text[start: brace.start()].strip()
    return None


GSM8K_FINAL = re.compile(r"####\s*(.*?)\s*$", re.DOTALL)


def _math_prompt(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    prompt = [{"role": "user", "content": f"{question.strip()}\n{MATH_INSTRUCTION}"}]
    if system_prompt:
        prompt.insert(0, {"role": "system", "content": system_prompt})
    return prompt


def gsm8k_answer(solution: str) -> str | None:
    """The gold answer after ``####`` in a GSM8K solution, thousands separators removed."""
    found = GSM8K_FINAL.search(solution)
    if not found or not found.group(1):
        return None
    return found.group(1).replace(",", "").strip()


def _pick_math_converter(system_prompt: str | None):
    def gsm8k(row: Row) -> Row:
        question, solution = _text(row, "question"), _text(row, "answer")
        answer = gsm8k_answer(solution)
        if answer is None:
            raise BadRow("answer", "has no final '#### <answer>' line")
        return {"prompt": _math_prompt(question, system_prompt), "answer": answer, "solution": solution}

    def math(row: Row) -> Row:
        problem, solution = _text(row, "problem"), _text(row, "solution")
        answer = last_boxed(solution)
        if not answer and isinstance(row.get("answer"), str) and row["answer"].strip():
            answer = row["answer"].strip()  # MATH-500 style rows carry the answer separately
        if not answer:
            raise BadRow("solution", "has no \\boxed{...} final answer")
        return {"prompt": _math_prompt(problem, system_prompt), "answer": answer, "solution": solution}

    def pick(row: Row):
        if "question" in row and "answer" in row:
            return "gsm8k", gsm8k
        if "problem" in row and "solution" in row:
            return "math", math
        return None

    return pick


def load_math(
    source: str | Path | Any,
    *,
    split: str = "test",
    config: str | None = None,
    on_bad_rows: str = "error",
    limit: int | None = None,
    system_prompt: str | None = None,
    return_report: bool = False,
    max_row_bytes: int = MAX_ROW_BYTES,
):
    """Math problems with verifiable gold answers, for online training and pass@k.

    Reads GSM8K (``question``/``answer`` with a final ``#### x`` line; the Hub's
    ``openai/gsm8k`` gets config ``"main"`` by default) or MATH (``problem``/``solution``
    with the answer in the last ``\\boxed{}``). Arguments as in :func:`load_preferences`.

    Returns:
        A Dataset with ``prompt`` (``[{"role": "user", "content": question + MATH_INSTRUCTION}]``,
        after an optional system message), ``answer`` (the gold final answer as a string:
        GSM8K ``"#### 1,800"`` -> ``"1800"``; MATH the last ``\\boxed{}`` content) and
        ``solution`` (the original worked solution).
    """
    gsm8k_hub = isinstance(source, str) and source.rstrip("/").endswith("gsm8k") and not is_local_source(source)
    if config is None and gsm8k_hub:
        config = "main"
    dataset, report = _load(
        source,
        _pick_math_converter(system_prompt),
        split=split,
        config=config,
        on_bad_rows=on_bad_rows,
        limit=limit,
        max_row_bytes=max_row_bytes,
        expected="'question'/'answer' (GSM8K) or 'problem'/'solution' (MATH)",
    )
    return (dataset, report) if return_report else dataset
