"""Completions that could not be judged: they score 0, never raise, and are counted here.

The count covers None or non-text completions, empty ones, ones over ``MAX_COMPLETION_CHARS``,
no answer found, a cut-off ``\\boxed{``, an answer over ``MAX_ANSWER_CHARS``, and a checker
error or timeout. Hedged and wrong answers score 0 too but are not counted.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("qempo_lite")

_malformed = 0
_malformed_lock = threading.Lock()


def malformed_count() -> int:
    """Completions scored 0 since start (or the last reset) because they could not be judged."""
    return _malformed


def reset_malformed_count() -> None:
    global _malformed
    with _malformed_lock:
        _malformed = 0


def count_malformed(why: str) -> bool:
    """Count one completion that could not be judged (``why`` goes to the debug log); False, its score."""
    global _malformed
    with _malformed_lock:
        _malformed += 1
    logger.debug("malformed completion scored 0: %s", why)
    return False
