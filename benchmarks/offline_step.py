"""Training-step time of QEMPOTrainer against stock TRL DPOTrainer, LoRA on a Llama-shaped model.

CPU (default): a small Llama built from its config (4 layers, hidden 256, vocabulary 8192),
sequences of 256 tokens, LoRA r=16 on all linear layers, 4 pairs per step. Four trainers on
the same data and seed, stepped round-robin so that background load hits them alike:

    qempo           QEMPOTrainer, loss_method=qempo (no reference forward)
    qempo_kl+pre    QEMPOTrainer, loss_method=qempo_kl, precompute_ref_log_probs=True
    dpo             stock trl.DPOTrainer (reference forward with the adapter disabled)
    dpo+pre         stock trl.DPOTrainer, precompute_ref_log_probs=True

A step is what the Trainer loop does per update: ``training_step`` (forward, TRL's loss and
metrics, backward) then the optimizer step. Warm-up steps are dropped; the median is reported,
in wall time and in process CPU time (steadier on a shared machine). Reference precomputation
is an up-front cost, reported as set-up time and folded into an "epoch" figure (set-up + one
pass over the benchmark's pairs). Per step, ``qempo`` and ``dpo+pre`` do the same work (one
policy forward and backward); ``qempo`` saves the precompute pass. Ratios print last.

The GPU counterpart, on the paper models' real shapes, is ``benchmarks/gpu_suite.py``.

    python benchmarks/offline_step.py [--steps 8] [--warmup 2]

Results go to ``benchmarks/results/offline_step_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from stepping import Stepper  # benchmarks/stepping.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the quick brown fox jumps over lazy dog name a colour red blue green yellow purple orange what is two "
         "plus three answer write short poem about sea and sky like apples bananas cherries strawberries please "
         "question in one word numbers hello how can help you today").split()


def synthetic_pairs(n: int, prompt_words: int, answer_words: int, seed: int = 0):
    """Conversational pairs long enough that every sequence is truncated to max_length (equal cost)."""
    from datasets import Dataset

    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": text(prompt_words)}],
         "chosen": [{"role": "assistant", "content": text(answer_words)}],
         "rejected": [{"role": "assistant", "content": text(answer_words)}]}
        for _ in range(n)
    ])


def small_llama(tokenizer, *, hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def cpu_benchmark(args) -> dict:
    from trl import DPOConfig, DPOTrainer

    from qempo_lite.models import lora_config
    from qempo_lite.offline import QEMPOConfig, QEMPOTrainer
    from qempo_lite.tiny import train_tokenizer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    tokenizer = train_tokenizer()
    pairs = synthetic_pairs(args.pairs, prompt_words=40, answer_words=200)
    common = dict(max_length=args.seq, per_device_train_batch_size=args.batch, learning_rate=1e-4,
                  lr_scheduler_type="constant", bf16=False, use_cpu=True, gradient_checkpointing=False,
                  report_to=[], disable_tqdm=True, save_strategy="no", seed=0, logging_steps=1_000_000)
    peft_config = lora_config(lora_r=16, lora_alpha=32, lora_dropout=0.0)
    tmp = Path(tempfile.mkdtemp(prefix="offline-step-"))

    def build(name, trainer_cls, config):
        model = small_llama(tokenizer, hidden=args.hidden, layers=args.layers, vocab=args.vocab)
        start = time.perf_counter()
        trainer = trainer_cls(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                              peft_config=peft_config)
        return Stepper(trainer, seq_len=args.seq, name=name, setup_s=time.perf_counter() - start)

    steppers = [
        build("qempo", QEMPOTrainer, QEMPOConfig(output_dir=str(tmp / "a"), loss_method="qempo", **common)),
        build("qempo_kl+pre", QEMPOTrainer, QEMPOConfig(output_dir=str(tmp / "b"), loss_method="qempo_kl",
                                                        precompute_ref_log_probs=True, **common)),
        build("dpo", DPOTrainer, DPOConfig(output_dir=str(tmp / "c"), beta=0.01, **common)),
        build("dpo+pre", DPOTrainer, DPOConfig(output_dir=str(tmp / "d"), beta=0.01, precompute_ref_log_probs=True,
                                               **common)),
    ]
    tokens = 2 * args.batch * args.seq
    for i in range(args.warmup + args.steps):
        for stepper in (steppers if i % 2 == 0 else steppers[::-1]):
            stepper.step(record=i >= args.warmup)
    rows = {s.name: {"median_step_ms": _median_ms(s.times), "median_step_cpu_ms": _median_ms(s.cpu_times),
                     "tokens_per_s": tokens / statistics.median(s.times), "setup_s": s.setup_s,
                     # One epoch over the benchmark's pairs: set-up (the reference precompute, if any) + its steps.
                     "epoch_s": s.setup_s + len(s.batches) * statistics.median(s.times),
                     "step_ms": [1000 * t for t in s.times], "step_cpu_ms": [1000 * t for t in s.cpu_times]}
            for s in steppers}
    compared = [("qempo", "dpo"), ("qempo", "dpo+pre"), ("qempo_kl+pre", "dpo+pre")]
    ratios = {f"{a} / {b}": rows[a]["median_step_ms"] / rows[b]["median_step_ms"] for a, b in compared}
    cpu_ratios = {f"{a} / {b}": rows[a]["median_step_cpu_ms"] / rows[b]["median_step_cpu_ms"] for a, b in compared}
    epoch_ratios = {f"{a} / {b}": rows[a]["epoch_s"] / rows[b]["epoch_s"] for a, b in compared}
    return {
        "device": "cpu", "threads": torch.get_num_threads(), "platform": platform.platform(),
        "model": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "lora_r": 16},
        "seq_len": args.seq, "pairs_per_step": args.batch, "warmup_steps": args.warmup, "measured_steps": args.steps,
        "load_average": os.getloadavg(), "results": rows, "ratios": ratios, "cpu_time_ratios": cpu_ratios,
        "epoch_ratios": epoch_ratios,
        "targets": {"qempo / dpo": "<= 0.92", "qempo / dpo+pre": "<= 1.0"},
    }


def print_cpu(result: dict) -> None:
    print(f"\nCPU, {result['threads']} threads: Llama {result['model']['layers']} layers x {result['model']['hidden']}, "
          f"vocabulary {result['model']['vocab']}, LoRA r=16, {result['pairs_per_step']} pairs x "
          f"{result['seq_len']} tokens, median of {result['measured_steps']} steps")
    print(f"{'trainer':<14}{'median step (ms)':>18}{'CPU time (ms)':>15}{'tokens/s':>10}{'setup (s)':>11}"
          f"{'epoch (s)':>11}")
    for name, row in result["results"].items():
        print(f"{name:<14}{row['median_step_ms']:>18.1f}{row['median_step_cpu_ms']:>15.1f}{row['tokens_per_s']:>10.0f}"
              f"{row['setup_s']:>11.1f}{row['epoch_s']:>11.1f}")
    print(f"\nratios, load average {result['load_average'][0]:.1f}: median step (wall), median step (process CPU "
          "time), one epoch with set-up (wall; the set-up holds the reference precompute)")
    for name, value in result["ratios"].items():
        target = result["targets"].get(name, "")
        print(f"  {name:<24}{value:>7.3f}  {result['cpu_time_ratios'][name]:>7.3f}  "
              f"{result['epoch_ratios'][name]:>7.3f}   {('target (step) ' + target) if target else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps dropped")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    args.pairs = 8 * args.batch
    result = cpu_benchmark(args)
    output = args.output or RESULTS / "offline_step_cpu.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {output}")
    print_cpu(result)


if __name__ == "__main__":
    main()
