"""rollout: vllm_server against a misbehaving server: a real HTTP server on loopback, in a thread, that speaks
vLLM's API (models, adapter loading, completions) and then trickles, or answers with malformed bodies.

What a real vLLM server does is tested in tests/test_vllm_server.py; here the server is one a
test can make slow or broken on purpose.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (QuietHandler, http_answer, loopback_http, server_rollout_trainer,
                      stopped_with_checkpoint)
from qempo_lite.rollout import RolloutServerError, VLLMServerEngine

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Name a colour."]


class FakeVLLM(QuietHandler):
    """vLLM's routes; ``server.mode`` says how /v1/completions answers."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        self._json(200, {"object": "list", "data": [{"id": self.server.model_id, "parent": None,
                                                     "max_model_len": 256}]})

    def do_POST(self):  # noqa: N802
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions":
            self._json(200, "Success")  # load / unload an adapter
            return
        self.server.completions += 1
        mode = self.server.mode
        if mode == "bad-once":
            mode = "html" if self.server.completions == 1 else "good"
        n = payload["n"]
        choices = [{"index": j, "text": "red", "token_ids": [5 + j, 6, 7], "finish_reason": "length",
                    "logprobs": {"token_logprobs": [-1.0, -2.0, -0.5]}} for j in range(n)]
        if mode == "html":
            http_answer(self, 200, b"<html><body>502 Bad Gateway (but a 200)</body></html>", "text/html")
        elif mode == "one-short":
            self._json(200, {"choices": choices[:-1]})
        elif mode == "logprobs-null":
            self._json(200, {"choices": [dict(c, logprobs=None) for c in choices]})
        elif mode == "no-token-ids":
            self._json(200, {"choices": [{k: v for k, v in c.items() if k != "token_ids"} for c in choices]})
        elif mode.startswith("trickle"):
            self._trickle(json.dumps({"choices": choices}).encode(), headers_too=mode == "trickle-headers")
        else:
            self._json(200, {"choices": choices})

    def _trickle(self, body: bytes, headers_too: bool, seconds: float = 20.0) -> None:
        """A padding sent one byte every 0.1 s, in a header or before the body: every read is quick, the
        whole answer takes ``seconds``."""
        padding = int(seconds * 10)
        if headers_too:
            head, slow = b"HTTP/1.1 200 OK\r\nX-Slow: ", b"s" * padding
            rest = f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        else:
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body) + padding}"
                    "\r\n\r\n").encode()
            slow, rest = b" " * padding, body
        try:
            self.wfile.write(head)
            for i in range(padding):
                self.wfile.write(slow[i:i + 1])
                time.sleep(0.1)
            self.wfile.write(rest)
        except OSError:  # the client gave up
            pass
        self.close_connection = True

    def _json(self, status: int, body) -> None:
        http_answer(self, status, json.dumps(body))



@pytest.fixture
def fake(tiny_model_dir):
    with loopback_http(FakeVLLM) as server:
        server.mode, server.completions, server.model_id = "good", 0, str(tiny_model_dir)
        server.url = f"http://127.0.0.1:{server.server_port}"
        yield server


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _engine(url, adapter_dir, tokenizer, **kwargs) -> VLLMServerEngine:
    return VLLMServerEngine(url, tokenizer=tokenizer, adapter_dir=adapter_dir, **kwargs)


# ---------------------------------------------------------------------------------- a trickling server


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trickle-body", "trickle-headers"])
def test_a_trickling_server_times_out_within_the_request_timeout(fake, tokenizer, tmp_path, mode):
    engine = _engine(fake.url, tmp_path, tokenizer, request_timeout=1.5, retries=1, retry_wait=0.1)
    engine.probe()
    fake.mode = mode
    start = time.monotonic()
    with pytest.raises(RolloutServerError) as err:
        engine.sample(PROMPTS, n=2, max_new_tokens=3, seed=0)
    assert time.monotonic() - start < 8  # two attempts of 1.5 s, not two of the 20 s the answer takes
    message = str(err.value)
    assert "\n" not in message and "after 2 attempts" in message and "within 1.5 s" in message
    assert fake.completions == 2


# ---------------------------------------------------------------------------------- malformed answers


@pytest.mark.parametrize("mode, problem", [("html", "no 'choices'"), ("one-short", "1 choices"),
                                           ("logprobs-null", "no log-prob per token"),
                                           ("no-token-ids", "no list of token ids")])
def test_a_malformed_answer_is_retried_within_the_bound_then_one_line(fake, tokenizer, tmp_path, mode, problem):
    engine = _engine(fake.url, tmp_path, tokenizer, retries=2, retry_wait=0.05)
    fake.mode = mode
    with pytest.raises(RolloutServerError) as err:
        engine.sample(PROMPTS, n=2, max_new_tokens=3, seed=0)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
    assert "after 3 attempts" in message and "a malformed answer" in message and problem in message
    assert fake.completions == 3


def test_one_malformed_answer_then_a_good_one_samples(fake, tokenizer, tmp_path):
    engine = _engine(fake.url, tmp_path, tokenizer, retries=2, retry_wait=0.05)
    fake.mode = "bad-once"
    groups = engine.sample(PROMPTS, n=2, max_new_tokens=3, seed=0)
    assert fake.completions == 2
    assert [c.token_ids for c in groups[0]] == [[5, 6, 7], [6, 6, 7]] and groups[0][0].logprobs == [-1.0, -2.0, -0.5]


@pytest.mark.slow
def test_training_checkpoints_and_stops_in_one_line_when_answers_turn_malformed(fake, tiny_model_dir, tokenizer,
                                                                                tmp_path):
    from transformers import TrainerCallback

    class MalformedAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                fake.mode = "logprobs-null"

    trainer = server_rollout_trainer(tiny_model_dir, tokenizer, fake.url, tmp_path / "run", 4, [MalformedAfterStep2()],
                                     max_completion_length=3)
    assert "a malformed answer" in stopped_with_checkpoint(trainer, tmp_path / "run", 2)


# ---------------------------------------------------------------------------------- served-adapter folders

_KILLED_RUN = """
import sys, time
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from qempo_lite.rollout import VLLMServerEngine

base, url, adapter_dir = sys.argv[1:]
model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
engine = VLLMServerEngine(url, tokenizer=AutoTokenizer.from_pretrained(base), adapter_dir=adapter_dir)
print(engine.sync(model).path, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_folders_of_ended_runs_are_deleted_on_start_and_finish_never_a_live_runs(fake, tiny_model_dir, tokenizer,
                                                                                  tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    served = tmp_path / "served"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tiny_model_dir), fake.url, str(served)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        killed_folder = Path(killed.stdout.readline().strip())
        assert killed_folder.parent == served and killed_folder.is_dir()
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, target_modules="all-linear"))
        live = _engine(fake.url, served, tokenizer)
        live_folder = Path(live.sync(model).path)
        assert killed_folder.is_dir()  # that run is still alive: its folder stays
    finally:
        killed.send_signal(signal.SIGKILL)  # an interrupted run: nothing of it runs after this
        killed.wait(timeout=30)
    older = served / "qempo-abcdef-7"  # left by a run of an older version, which took no lock
    older.mkdir()
    (older / "adapter_model.safetensors").write_bytes(b"x")

    third = _engine(fake.url, served, tokenizer)
    third_folder = Path(third.sync(model).path)  # on start: what ended runs left is deleted
    assert not killed_folder.exists() and not older.exists()
    assert live_folder.is_dir() and third_folder.is_dir()
    third.close()  # on finish: its own folder; the live run's stays
    assert not third_folder.exists() and live_folder.is_dir()
    live.close()
    assert not served.exists()


def test_the_server_engine_refuses_an_adapter_it_has_not_loaded_and_a_sync_when_built_for_serving(tiny_model_dir,
                                                                                               tmp_path):
    """It implements the one engine protocol: an adapter name it has not loaded is refused in one line, before any
    request; it is offered to evaluation and the app (--backend vllm_server), and an engine built for serving saved
    adapters (no adapter_dir) refuses to serve an adapter being trained."""
    from transformers import AutoTokenizer

    from qempo_lite.errors import QempoError
    from qempo_lite.rollout import serving_engine_names

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = VLLMServerEngine("http://127.0.0.1:9", tokenizer=tokenizer, adapter_dir=tmp_path / "served")
    with pytest.raises(QempoError, match="adapter 'saved' is not loaded on the vLLM server"):
        engine.generate({"a": "saved"}, [[1, 2]], n=1)
    assert "vllm_server" in serving_engine_names()
    engine.close()
    serving = VLLMServerEngine("http://127.0.0.1:9", tokenizer=tokenizer, adapter_dir=None)
    with pytest.raises(QempoError, match="serves saved adapters .* not an adapter being trained"):
        serving.sync(object())
    serving.close()

