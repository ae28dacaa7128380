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

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = Path(os.environ.get("QEMPO_SHARED_DATA", SHARED / "data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64, head_dim 32) with a BPE tokenizer trained in the fixture."""
    from qempo_lite.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set QEMPO_SHARED_DATA")
    return SHARED_DATA


def make_adapter(base_dir, out_dir, seed, r=8):
    """A LoRA adapter on ``base_dir`` with random (non-zero) A and B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir
