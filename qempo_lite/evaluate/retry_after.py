"""How long an HTTP server asked a client to wait before retrying: ``Retry-After`` (seconds or an HTTP
date, RFC 9110) or OpenAI's ``retry-after-ms``, capped so that a misbehaving server cannot stall a run."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

MAX_WAIT_S = 60.0  # the OpenAI client's own ceiling for a server-requested wait


def retry_after_seconds(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """The wait the headers ask for (0 to :data:`MAX_WAIT_S`), or None when they ask for none or cannot be read.

    ``headers`` is looked up with lower-case names (an ``httpx.Headers``, as on an OpenAI error's response).
    """
    wait = None
    if headers and headers.get("retry-after-ms") is not None:
        wait = _number(headers["retry-after-ms"])
        wait = None if wait is None else wait / 1000
    if wait is None and headers and headers.get("retry-after") is not None:
        value = headers["retry-after"]
        wait = _number(value)
        if wait is None:
            try:
                wait = email.utils.parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
            except (TypeError, ValueError, IndexError):
                return None
    if wait is None:
        return None
    return min(max(wait, 0.0), MAX_WAIT_S)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN reads as no number


__all__ = ["MAX_WAIT_S", "retry_after_seconds"]
