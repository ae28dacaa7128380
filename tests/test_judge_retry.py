"""The judge waits as long as a rate-limited server asks (`Retry-After`), against a real HTTP server on loopback."""

from __future__ import annotations

import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qempo_lite.evaluate.judge import Judge
from qempo_lite.evaluate.retry_after import MAX_WAIT_S, retry_after_seconds

GOOD = {"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Rating: [[7]]"}}]}


class _Busy(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers its first chat request with 429 and the headers in ``busy``."""

    busy: dict[str, str] = {}
    posts: list[float] = []

    def do_GET(self):  # noqa: N802
        self._send(200, {}, {"object": "list", "data": [{"id": "judge", "object": "model"}]})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append(time.monotonic())
        if len(type(self).posts) == 1:
            headers = {k: (v() if callable(v) else v) for k, v in type(self).busy.items()}
            self._send(429, headers, {"error": {"message": "slow down", "type": "rate_limit_exceeded"}})
        else:
            self._send(200, {}, GOOD)

    def _send(self, status, headers, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def busy_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Busy.posts = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def _gap_before_retry(url, headers) -> float:
    _Busy.busy = headers
    judge = Judge(url, "judge", api_key="k", retry_wait=0.05, max_attempts=3, timeout=30)
    assert judge.rate_answers("Name a colour.", ["Blue."]) == [7.0]
    assert len(_Busy.posts) == 2
    return _Busy.posts[1] - _Busy.posts[0]


@pytest.mark.slow
def test_a_429_with_retry_after_seconds_is_waited_out(busy_server):
    assert 2.0 <= _gap_before_retry(busy_server, {"Retry-After": "2"}) < 2.0 + 1.5


@pytest.mark.slow
def test_a_429_with_an_http_date_is_waited_out(busy_server):
    gap = _gap_before_retry(busy_server, {"Retry-After": lambda: email.utils.formatdate(time.time() + 3, usegmt=True)})
    assert 1.9 <= gap < 3.0 + 1.5  # the date has whole seconds


def test_without_retry_after_the_back_off_is_the_judge_s_own(busy_server):
    assert _gap_before_retry(busy_server, {}) < 1.0  # retry_wait 0.05 s, not a server's wait


def test_retry_after_values():
    assert retry_after_seconds({"retry-after": "1.5"}) == 1.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10.0
    assert retry_after_seconds({"retry-after": "3600"}) == MAX_WAIT_S
    assert retry_after_seconds({"retry-after": "-4"}) == 0.0
    for unreadable in ("soon", "", "nan"):
        assert retry_after_seconds({"retry-after": unreadable}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None
