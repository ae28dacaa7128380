"""Shared fixtures: tiny real models built on the spot (never downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

# Tiny models are dominated by per-op overhead: one thread is as fast on an idle machine and
# many times faster on a busy one (thread oversubscription).
torch.set_num_threads(1)

# Real third-party data, each folder with its licence: GSM8K test and HH-RLHF harmless-base test
# here; MT-Bench's questions and judge prompts ship inside the package (the default of 'eval').
REAL_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64, head_dim 32) with a BPE tokenizer trained in the fixture."""
    from qempo_lite.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


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
