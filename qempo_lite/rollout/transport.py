"""One JSON request to a server within a total deadline, however slowly the server answers.

``urllib``'s ``timeout`` bounds each socket operation, not the request: a server that sends a
byte every second keeps a request with a 2 s timeout waiting forever. :func:`send_json` also
starts a timer for the whole request (connect, headers, body); when it runs out, the
request's socket is shut down, which wakes the blocked read, and the request raises
:class:`TimeoutError`.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from typing import Any


def check_server_settings(url: Any, retries: Any, request_timeout: Any, *, url_name: str = "vllm_server_url") -> None:
    """Refuse, in one line, a server URL that is not http(s) with a host, retries that are not a whole number
    >= 0, or a request timeout that is not > 0 (the recipe fields ``vllm_server_*`` the messages name; ``url_name``:
    what the URL is called where it was given)."""
    from urllib.parse import urlparse

    from ..errors import QempoError

    parsed = urlparse(str(url))
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise QempoError(f"{url_name} must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
    if not isinstance(retries, int) or retries < 0:
        raise QempoError(f"vllm_server_retries must be a whole number >= 0, got {retries!r}")
    if not request_timeout > 0:
        raise QempoError(f"vllm_server_request_timeout must be > 0 seconds, got {request_timeout!r}")


class _Deadline:
    """The sockets of one request, shut down when its time is up."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(min(seconds, threading.TIMEOUT_MAX), self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _opener(deadline: _Deadline, direct: bool) -> urllib.request.OpenerDirector:
    """An opener whose connections report their socket to ``deadline``; ``direct`` ignores proxy settings."""

    class HTTP(http.client.HTTPConnection):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    class HTTPS(http.client.HTTPSConnection):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(HTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(HTTPS, req, context=self._context)

    handlers = [HTTPHandler(), HTTPSHandler()]
    if direct:
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def _exchange(opener: urllib.request.OpenerDirector, request: urllib.request.Request,
              timeout: float) -> tuple[int, bytes]:
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:  # an answer all the same: 4xx / 5xx with the server's message
        return err.code, err.read()


def send_json(method: str, url: str, payload: dict | None, timeout: float, *, direct: bool = False) -> tuple[int, Any]:
    """``(HTTP status, body)`` of one request, the body parsed as JSON when it is JSON (else its text).

    The whole request, from connecting to the last byte of the body, takes at most ``timeout``
    seconds, else :class:`TimeoutError`; connection failures raise ``OSError`` (``URLError``
    among them) or ``http.client.HTTPException``, as ``urllib`` does.
    """
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with _Deadline(timeout) as deadline:
        try:
            status, raw = _exchange(_opener(deadline, direct), request, timeout)
        except (OSError, http.client.HTTPException):
            if deadline.expired:
                raise TimeoutError(f"no complete answer within {timeout:g} s") from None
            raise
    if deadline.expired:  # the body may have been cut short when the socket was shut down
        raise TimeoutError(f"no complete answer within {timeout:g} s")
    try:
        return status, json.loads(raw.decode("utf-8") or "null")
    except (UnicodeDecodeError, ValueError):
        return status, raw.decode("utf-8", errors="replace")


__all__ = ["send_json"]
