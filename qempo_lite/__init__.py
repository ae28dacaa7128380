"""qempo-lite: QEMPO / QEMPO-KL post-training for LoRA and QLoRA adapters on one GPU."""

__version__ = "0.1.0"
