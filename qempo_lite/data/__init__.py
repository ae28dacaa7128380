"""Preference and math datasets: reading, schema checks, and TRL's row formats.

Both loaders read a Hub dataset by name (``datasets.load_dataset``) or a local ``.jsonl``,
``.jsonl.gz``, ``.json``, ``.json.gz`` or ``.parquet`` file, check every row, and return a
``datasets.Dataset`` in the format the TRL trainers take:

* ``load_preferences`` -> ``prompt`` / ``chosen`` / ``rejected`` for ``DPOTrainer``
  (conversational message lists, or plain strings when the source is plain strings);
* ``load_math`` -> ``prompt`` (conversational) / ``answer`` (gold final answer) /
  ``solution`` for ``GRPOTrainer`` with :func:`qempo_lite.rewards.math_reward`.

A bad row (missing field, wrong type, empty or identical responses, a blank user message, a
chat role other than system/user/assistant, unparseable transcript, not JSON, not UTF-8, over
``max_row_bytes``) is an error naming where it is and
its field, or, with ``on_bad_rows="skip"``, is dropped and counted in a :class:`LoadReport`.
Rows are named as an editor shows them: ``line 59`` is the 59th physical line of a JSON Lines
file (blank lines count; lines split on ``\\n`` only), ``row 3`` the third row (1-based) of a
JSON list, a parquet file or a Hub dataset. A truncated gzip file is an error naming the line
it breaks off in.

Modules: :mod:`~qempo_lite.data.files` (sources to located rows), :mod:`~qempo_lite.data.rows`
(the checking loop, :class:`LoadReport`, field checks), :mod:`~qempo_lite.data.preferences`
and :mod:`~qempo_lite.data.math_problems` (the two loaders and their row shapes),
:mod:`~qempo_lite.data.splits` (evaluation pairs held out by content).
"""

from .files import LOCAL_SUFFIXES, MAX_ROW_BYTES, BadRow, Row, is_local_source, read_json_lines
from .math_problems import BOX_START, GSM8K_FINAL, MATH_INSTRUCTION, box_end, gsm8k_answer, last_boxed, load_math
from .preferences import HH_ROLES, HH_TURN, PREFERENCE_SHAPES, load_preferences
from .rows import ON_BAD_ROWS, LoadReport

__all__ = [
    "BOX_START", "GSM8K_FINAL", "HH_ROLES", "HH_TURN", "LOCAL_SUFFIXES", "MATH_INSTRUCTION", "MAX_ROW_BYTES",
    "ON_BAD_ROWS", "PREFERENCE_SHAPES", "BadRow", "LoadReport", "Row", "box_end", "gsm8k_answer",
    "is_local_source", "last_boxed", "load_math", "load_preferences", "read_json_lines",
]
