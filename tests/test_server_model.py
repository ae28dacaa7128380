"""A vLLM server of another model is refused before training on its samples.

The server here is a small loopback HTTP server speaking the few routes of vLLM's OpenAI API that
training uses (``/v1/models``, the adapter routes, ``/v1/completions``); what it lists and
returns is what a server started on another base model would. The training runs are the
installed command in a fresh process.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_cli_errors import _online, _run


def _server(model_id: str, token_ids: list[int]):
    """A server listing ``model_id`` whose every completion is ``token_ids``; (its URL, a stop function)."""

    class OtherModel(BaseHTTPRequestHandler):
        def _answer(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer({"object": "list", "data": [{"id": model_id, "root": model_id, "parent": None,
                                                      "max_model_len": 256}]})

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path != "/v1/completions":
                self._answer({})
                return
            ids = token_ids[: payload["max_tokens"]]
            self._answer({"choices": [{"index": i, "text": "x", "token_ids": ids, "finish_reason": "length",
                                       "logprobs": {"token_logprobs": [-1.0] * len(ids)}}
                                      for i in range(payload["n"])]})

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), OtherModel)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}", httpd.shutdown


@pytest.fixture
def problems(tmp_path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                            + "\n" for i in range(4)))
    return path


def _train_against(tmp_path, tiny_model_dir, problems, name, model_id, token_ids):
    url, stop = _server(model_id, token_ids)
    try:
        argv = _online(tmp_path, tiny_model_dir, problems, name, rollout="vllm_server", vllm_server_url=url,
                       vllm_server_retries=0, save_steps=1)
        return _run(argv, tmp_path)
    finally:
        stop()


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == 2 and errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr[-1500:]
    return errors[0]


def test_a_server_of_another_base_model_is_refused_before_the_first_step(tmp_path, tiny_model_dir, problems):
    result = _train_against(tmp_path, tiny_model_dir, problems, "other", "Qwen/Qwen2.5-0.5B-Instruct", [5, 6, 7])
    line = _error_line(result)
    assert "serves 'Qwen/Qwen2.5-0.5B-Instruct', not the base model being trained" in line
    assert f"qempo-lite serve {tiny_model_dir}" in line
    assert not list((tmp_path / "other" / "out").glob("checkpoint-*"))


def test_token_ids_outside_the_policys_vocabulary_are_refused(tmp_path, tiny_model_dir, problems):
    # The server names the right model but samples ids the tiny model (a few hundred tokens) does not have.
    result = _train_against(tmp_path, tiny_model_dir, problems, "vocab", str(tiny_model_dir), [5, 100_000, 7])
    line = _error_line(result)
    assert "returned token id 100000, outside the policy's vocabulary of " in line
    assert not list((tmp_path / "vocab" / "out").glob("checkpoint-*"))
