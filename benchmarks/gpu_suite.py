"""GPU figures of the paper's four models on one GPU: offline step memory/speed/MFU and one online step.

Offline, per model (real shapes from ``qempo_lite.models.PAPER_MODELS``, random weights, built
on the GPU and saved as safetensors so that QLoRA quantises them on load as a user's run does):
LoRA on bf16 weights for Llama-3.2-1B and Qwen2.5-1.5B, QLoRA (NF4, double quantisation, bf16
compute) for Qwen2.5-7B and Llama-3.1-8B; LoRA r=16 on all linear layers; sequences of exactly
1024 tokens (512 prompt + 512 completion); gradient checkpointing; pair batch 1 and the
recipes' micro-batch (4 for the LoRA models, 2 for the QLoRA ones). Four trainers, each on a
freshly loaded model, side by side in one run:

    qempo           QEMPOTrainer, loss_method=qempo (no reference anywhere)
    dpo             stock trl.DPOTrainer, reference forward on the fly (adapter disabled)
    dpo+pre         stock trl.DPOTrainer, precompute_ref_log_probs=True
    qempo_kl+pre    QEMPOTrainer, loss_method=qempo_kl, precompute_ref_log_probs=True

A step is one update of one micro-batch (forward, loss, backward, optimizer step), median of
the measured steps after warm-up. Peak memory is taken over the measured steps only (the
allocator's cache emptied and the peak reset after the set-up and reference precompute);
``setup_peak_reserved_gb`` covers loading and set-up. GB = 10^9 bytes.

MFU counts the useful floating-point work of a step against the GPU's dense bf16 peak (989.4
TFLOP/s for H100/H200 SXM): per policy sequence a forward (2 FLOPs per weight per token for
every linear layer, the LM head on the completion positions only, as TRL's fused head
projects only those, and causal attention 2·L·d_q·S²) plus the backward to the activations
(the same again; the frozen base needs no weight gradient, the LoRA weights' share is
negligible); a reference forward adds one forward when it runs inside the step. Gradient
checkpointing's recomputation is not counted (it is hardware work, not model work).

Online: one ``QEMPOOnlineTrainer`` optimizer step on the Qwen2.5-1.5B shape (LoRA, bf16), HF
rollouts, k = 8 completions of exactly 256 new tokens per prompt, 4 prompts per step, qempo
(gate correct) against gvpo: rollout, scoring (log-probs; gvpo adds the reference pass) and
training time of the second step (the first warms up), with peak memory over that step. A
third row runs the 1.5B online recipe's micro-batch (10 completions of 1024 tokens) and
reports the peak memory of its training phase (after the rollout) against the recipe's budget.

    python benchmarks/gpu_suite.py --part offline --models llama3.2-1b qwen2.5-1.5b --output-dir DIR
    python benchmarks/gpu_suite.py --part online --output-dir DIR
    python benchmarks/gpu_suite.py --dry-run          # the same code on CPU with tiny shapes (tests)
    python benchmarks/gpu_suite.py --merge A.json B.json --output benchmarks/results/gpu_offline.json

Needs on the GPU machine: torch (CUDA), transformers, peft, accelerate, trl, bitsandbytes,
datasets and this repository on PYTHONPATH. Results: ``gpu_offline.json`` and
``gpu_online.json`` in ``--output-dir`` (default ``benchmarks/results``); rows are merged into
files already there, so several runs build one table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1e9
# Dense bf16 tensor-core peak of the SXM parts (NVIDIA datasheets); MFU is reported against it.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

# name -> (PAPER_MODELS key, adapter, the recipes' per-device pair batch)
OFFLINE_MODELS = {
    "llama3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", "lora", 4),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", "lora", 4),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", "qlora", 2),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", "qlora", 2),
}
METHODS = ("qempo", "dpo", "dpo+pre", "qempo_kl+pre")
WORDS = ("the quick brown fox jumps over lazy dog name colour red blue green yellow purple orange what is two plus "
         "three answer write short poem about sea and sky like apples bananas please question in one word numbers "
         "hello how can help you today").split()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Models and data


def single_token_words(tokenizer) -> list[str]:
    """Words that are one token both after a space and at the start, so a text of n words is n tokens."""
    words = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
             and len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < 4:
        raise RuntimeError("the benchmark tokenizer has too few single-token words")
    return words


def exact_length_pairs(tokenizer, n: int, prompt_tokens: int, completion_tokens: int, seed: int = 0):
    """Plain-text pairs whose prompt is exactly ``prompt_tokens`` tokens and each completion (with eos) exactly
    ``completion_tokens``, so every sequence costs the same and is never truncated."""
    import random

    from datasets import Dataset

    words = single_token_words(tokenizer)
    rng = random.Random(seed)

    def text(k: int, lead: str) -> str:
        return lead + " ".join(rng.choice(words) for _ in range(k))

    rows = [{"prompt": text(prompt_tokens, ""), "chosen": text(completion_tokens - 1, " "),
             "rejected": text(completion_tokens - 1, " ")} for _ in range(n)]
    return Dataset.from_list(rows)


def write_random_model(config, folder: str, tokenizer, device: str) -> float:
    """Random weights of ``config``'s shape in bf16, saved as safetensors with the tokenizer; returns seconds."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    start = time.perf_counter()
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    torch.manual_seed(0)
    with torch.device(device):  # initialising 8B parameters takes minutes on a CPU, seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    release_memory()
    return time.perf_counter() - start


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def memory_now() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"allocated_gb": torch.cuda.memory_allocated() / GB, "reserved_gb": torch.cuda.memory_reserved() / GB}


def reset_peak() -> None:
    if torch.cuda.is_available():
        release_memory()
        torch.cuda.reset_peak_memory_stats()


def peak() -> dict:
    if not torch.cuda.is_available():
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(config, seq_len: int, projected: int) -> float:
    """Forward FLOPs of one sequence: 2 per weight per token in every linear layer, the LM head on the
    ``projected`` positions only, causal attention 2·L·d_q·S² (QKᵀ and AV, half the square)."""
    from qempo_lite.models import _shape

    s = _shape(config)
    h, i, L = s["hidden"], s["inter"], s["layers"]
    linear = L * (2 * h * s["q"] + 2 * h * s["kv"] + 3 * h * i)
    return 2.0 * linear * seq_len + 2.0 * s["vocab"] * h * projected + 2.0 * L * s["q"] * seq_len ** 2


def offline_step_flops(config, pairs: int, seq_len: int, completion: int, reference_forward: bool) -> float:
    """Useful FLOPs of one offline step: policy forward + backward to the activations, plus a reference forward."""
    per_sequence = forward_flops(config, seq_len, completion)
    return 2 * pairs * per_sequence * (2 + (1 if reference_forward else 0))


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------------------------
# Offline


def build_offline_trainer(method: str, folder: str, adapter: str, batch: int, pairs, args, output_dir: str):
    from trl import DPOConfig, DPOTrainer

    from qempo_lite.models import load_policy
    from qempo_lite.offline import QEMPOConfig, QEMPOTrainer

    on_gpu = torch.cuda.is_available()
    policy, tokenizer, peft_config = load_policy(
        folder, quantization="4bit" if adapter == "qlora" else None, dtype="bfloat16" if on_gpu else None,
        lora_r=16, lora_alpha=32, lora_dropout=0.0, gradient_checkpointing=True, attn_implementation="sdpa")
    common = dict(output_dir=output_dir, max_length=args.seq, per_device_train_batch_size=batch,
                  learning_rate=1e-5, lr_scheduler_type="constant", bf16=on_gpu, use_cpu=not on_gpu,
                  gradient_checkpointing=True, report_to=[], disable_tqdm=True, save_strategy="no", seed=0,
                  logging_steps=1_000_000, dataloader_num_workers=0)
    if method == "qempo":
        config, cls = QEMPOConfig(loss_method="qempo", **common), QEMPOTrainer
    elif method == "qempo_kl+pre":
        config, cls = QEMPOConfig(loss_method="qempo_kl", precompute_ref_log_probs=True, **common), QEMPOTrainer
    elif method == "dpo":
        config, cls = DPOConfig(beta=0.01, **common), DPOTrainer
    elif method == "dpo+pre":
        config, cls = DPOConfig(beta=0.01, precompute_ref_log_probs=True, **common), DPOTrainer
    else:
        raise ValueError(method)
    return cls(model=policy, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=peft_config)


def offline_row(name: str, method: str, batch: int, folder: str, pairs, args) -> dict:
    from stepping import Stepper  # benchmarks/stepping.py, beside this script

    key, adapter, config = args.model_key[name], args.adapter[name], args.configs[name]
    row = {"model": key, "adapter": adapter, "method": method, "micro_batch": batch, "seq_len": args.seq}
    reset_peak()
    row["memory_before_gb"] = memory_now().get("allocated_gb")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="run-") as output_dir:
        trainer = build_offline_trainer(method, folder, adapter, batch, pairs.select(range(batch * args.batches)),
                                        args, output_dir)
        stepper = Stepper(trainer, seq_len=args.seq)
        row["setup_s"] = time.perf_counter() - start
        row["setup_peak_reserved_gb"] = peak()["peak_reserved_gb"]
        reset_peak()
        times = [stepper.step() for _ in range(args.warmup + args.steps)][args.warmup:]
        row.update(peak())
        row["step_s"] = statistics.median(times)
        row["step_s_all"] = times
        row["tokens_per_s"] = 2 * batch * args.seq / row["step_s"]
        flops = offline_step_flops(config, batch, args.seq, args.completion, reference_forward=method == "dpo")
        row["flops_per_step"] = flops
        top = peak_flops()
        row["mfu"] = flops / row["step_s"] / top if top else None
        from qempo_lite.models import memory_plan

        row["memory_plan_gib"] = memory_plan(config, "4bit" if adapter == "qlora" else None, 16, args.seq, batch).total
        trainer.accelerator.free_memory()
        del stepper, trainer
    release_memory()
    return row


def run_offline(args, device: str) -> list[dict]:
    from qempo_lite.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    pairs = exact_length_pairs(tokenizer, 64, args.seq - args.completion, args.completion)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="paper-shape-", dir=args.scratch) as folder:
            log(f"{name}: writing random weights")
            write_s = write_random_model(args.configs[name], folder, tokenizer, device)
            log(f"{name}: written in {write_s:.0f} s")
            batches = sorted({1, args.recipe_batch[name]})
            for batch in batches:
                for method in args.methods:
                    try:
                        row = offline_row(name, method, batch, folder, pairs, args)
                    except Exception as err:  # one failed configuration must not lose the others
                        traceback.print_exc()
                        release_memory()
                        row = {"model": args.model_key[name], "adapter": args.adapter[name], "method": method,
                               "micro_batch": batch,
                               "seq_len": args.seq, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                    rows.append(row)
                    log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                    if k != "step_s_all"}))
                    args.save_offline(rows)
    return rows


# ----------------------------------------------------------------------------------------------
# Online


def online_row(method: str, folder: str, args, *, k: int, new_tokens: int, prompts_per_step: int, steps: int,
               label: str) -> dict:
    from datasets import Dataset

    from qempo_lite.models import load_policy
    from qempo_lite.online import QEMPOOnlineConfig, QEMPOOnlineTrainer
    from transformers import TrainerCallback

    on_gpu = torch.cuda.is_available()
    policy, tokenizer, peft_config = load_policy(
        folder, dtype="bfloat16" if on_gpu else None, lora_r=16, lora_alpha=32, lora_dropout=0.0,
        gradient_checkpointing=True, attn_implementation="sdpa")
    words = single_token_words(tokenizer)
    prompts = Dataset.from_list([{"prompt": " ".join(words[(i + j) % len(words)] for j in range(args.online_prompt))}
                                 for i in range(prompts_per_step * steps)])

    def reward(completions, **kwargs):
        # A deterministic stand-in for a verifier that marks about half the completions correct.
        return [float(len(c) % 2) for c in completions]

    config = QEMPOOnlineConfig(
        output_dir=tempfile.mkdtemp(prefix="online-"), loss_method=method, gate="correct", rollout="hf",
        num_generations=k, max_completion_length=new_tokens, temperature=1.0, top_p=1.0,
        per_device_train_batch_size=k, gradient_accumulation_steps=prompts_per_step, max_steps=steps,
        learning_rate=1e-5, bf16=on_gpu, use_cpu=not on_gpu, gradient_checkpointing=True, report_to=[],
        disable_tqdm=True, save_strategy="no", logging_steps=1_000_000, seed=0, shuffle_dataset=False)
    trainer = QEMPOOnlineTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=prompts,
                                 processing_class=tokenizer, peft_config=peft_config)
    timings: list[dict] = []
    current: dict = {}
    generate, score = trainer._generate_single_turn, trainer._generate_and_score_completions

    def timed_generate(*a, **kw):
        sync()
        start = time.perf_counter()
        out = generate(*a, **kw)
        sync()
        current["rollout_s"] = current.get("rollout_s", 0.0) + time.perf_counter() - start
        current["completion_lengths"] = sorted({len(ids) for ids in out[0]})
        return out

    def timed_score(*a, **kw):
        sync()
        start = time.perf_counter()
        out = score(*a, **kw)
        sync()
        current["generate_and_score_s"] = current.get("generate_and_score_s", 0.0) + time.perf_counter() - start
        # From here on the step trains: its peak is the training phase's.
        current["rollout_peak"] = peak()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return out

    trainer._generate_single_turn, trainer._generate_and_score_completions = timed_generate, timed_score

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            current.clear()
            reset_peak()
            sync()
            current["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            current["step_s"] = time.perf_counter() - current.pop("start")
            current["train_peak"] = peak()
            timings.append(dict(current))

    trainer.add_callback(StepTimer())
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    last = timings[-1]
    rollout_peak, train_peak = last["rollout_peak"], last["train_peak"]
    row = {
        "label": label, "model": args.online_model, "adapter": "lora", "method": method, "k": k,
        "prompts_per_step": prompts_per_step, "max_new_tokens": new_tokens, "prompt_tokens": args.online_prompt,
        "completion_lengths": last.get("completion_lengths"), "steps_run": len(timings), "total_s": total,
        "step_s": last["step_s"], "rollout_s": last["rollout_s"],
        "scoring_s": last["generate_and_score_s"] - last["rollout_s"],
        "train_s": last["step_s"] - last["generate_and_score_s"],
        "rollout_tokens_per_s": k * prompts_per_step * new_tokens / last["rollout_s"],
        "reference_passes": trainer.ref_logp_calls,
        # The step's peak is the larger of the two phases (the allocator's peak was reset between them).
        "peak_allocated_gb": None if rollout_peak["peak_allocated_gb"] is None else max(
            rollout_peak["peak_allocated_gb"], train_peak["peak_allocated_gb"]),
        "peak_reserved_gb": None if rollout_peak["peak_reserved_gb"] is None else max(
            rollout_peak["peak_reserved_gb"], train_peak["peak_reserved_gb"]),
        "train_peak_allocated_gb": train_peak["peak_allocated_gb"],
        "train_peak_reserved_gb": train_peak["peak_reserved_gb"],
        "weights_finite": bool(torch.isfinite(trainer.last_scored["weights"]).all()),
    }
    trainer.close_rollout()
    trainer.accelerator.free_memory()
    del trainer, policy
    release_memory()
    return row


def run_online(args, device: str) -> list[dict]:
    from qempo_lite.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory(prefix="online-shape-", dir=args.scratch) as folder:
        write_random_model(args.configs[args.online_model_name], folder, tokenizer, device)
        plan = [(m, dict(k=args.online_k, new_tokens=args.online_tokens, prompts_per_step=4, steps=2, label="speed"))
                for m in ("qempo", "gvpo")]
        if args.online_recipe_tokens:
            plan.append(("qempo", dict(k=10, new_tokens=args.online_recipe_tokens, prompts_per_step=1, steps=1,
                                       label="recipe micro-batch")))
        for method, kwargs in plan:
            try:
                row = online_row(method, folder, args, **kwargs)
            except Exception as err:
                traceback.print_exc()
                release_memory()
                row = {"label": kwargs["label"], "method": method, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            rows.append(row)
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
            args.save_online(rows)
    return rows


# ----------------------------------------------------------------------------------------------
# Output


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    for name in ("transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"


def merge_rows(path: Path, rows: list[dict], keys: tuple[str, ...], extra: dict) -> dict:
    """Rows of ``path`` (if any) with the same-key rows replaced by ``rows``; written back to ``path``."""
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    fresh = {tuple(r.get(k) for k in keys) for r in rows}
    merged = [r for r in old.get("rows", []) if tuple(r.get(k) for k in keys) not in fresh] + rows
    result = {"device": extra.get("device", old.get("device")), "versions": extra.get("versions", old.get("versions")),
              **{k: v for k, v in extra.items() if k not in ("device", "versions")}, "rows": merged}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


OFFLINE_KEYS = ("model", "adapter", "method", "micro_batch", "seq_len")
ONLINE_KEYS = ("label", "model", "method")


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def offline_table(result: dict) -> str:
    lines = [f"{result['device']}", "| model | adapter | method | pairs | peak alloc GB | peak reserved GB | "
             "step s | tokens/s | MFU | plan GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('adapter', '')} | {r['method']} | {r['micro_batch']} | "
                         f"error: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['adapter']} | {r['method']} | {r['micro_batch']} | "
                     f"{fmt(r['peak_allocated_gb'], '.2f')} | {fmt(r['peak_reserved_gb'], '.2f')} | "
                     f"{fmt(r['step_s'], '.3f')} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['mfu'], '.1%')} | "
                     f"{fmt(r['memory_plan_gib'], '.1f')} |")
    ratios = offline_ratios(result["rows"])
    if ratios:
        lines += ["", "| model | pairs | qempo / dpo (on the fly) | qempo / dpo+pre | qempo_kl+pre / dpo+pre |",
                  "|---|---|---|---|---|"]
        for (model, batch), r in ratios.items():
            lines.append(f"| {model} | {batch} | {fmt(r.get('qempo / dpo'), '.3f')} | "
                         f"{fmt(r.get('qempo / dpo+pre'), '.3f')} | {fmt(r.get('qempo_kl+pre / dpo+pre'), '.3f')} |")
    return "\n".join(lines)


def offline_ratios(rows: list[dict]) -> dict:
    steps: dict = {}
    for r in rows:
        if "error" not in r:
            steps.setdefault((r["model"], r["micro_batch"]), {})[r["method"]] = r["step_s"]
    out = {}
    for key, s in steps.items():
        out[key] = {f"{a} / {b}": s[a] / s[b] for a, b in
                    (("qempo", "dpo"), ("qempo", "dpo+pre"), ("qempo_kl+pre", "dpo+pre")) if a in s and b in s}
    return out


def online_table(result: dict) -> str:
    lines = [f"{result['device']}", "| run | method | k x prompts | new tokens | rollout s | scoring s | train s | "
             "step s | peak alloc GB | peak reserved GB | train-phase reserved GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['method']} | error: {r['error'][:80]} | | | | | | | | |")
            continue
        lines.append(f"| {r['label']} | {r['method']} | {r['k']} x {r['prompts_per_step']} | {r['max_new_tokens']} | "
                     f"{fmt(r['rollout_s'], '.2f')} | {fmt(r['scoring_s'], '.2f')} | {fmt(r['train_s'], '.2f')} | "
                     f"{fmt(r['step_s'], '.2f')} | {fmt(r['peak_allocated_gb'], '.2f')} | "
                     f"{fmt(r['peak_reserved_gb'], '.2f')} | {fmt(r['train_peak_reserved_gb'], '.2f')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def tiny_configs(tokenizer) -> dict:
    """Dry run: a tiny Llama and a tiny Qwen2 (head_dim 32), standing in for the four paper models."""
    from transformers import AutoConfig

    shape = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False)
    return {"tiny-llama": AutoConfig.for_model("llama", **shape),
            "tiny-qwen2": AutoConfig.for_model("qwen2", **{**shape, "tie_word_embeddings": True})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("offline", "online", "all"), default="all")
    parser.add_argument("--models", nargs="*", default=list(OFFLINE_MODELS), choices=list(OFFLINE_MODELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=3, help="measured offline steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-online-recipe", action="store_true", help="skip the online recipe-memory row")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code path, for tests")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--scratch", default=None, help="where model weights are written (default: the temp dir)")
    parser.add_argument("--merge", nargs="*", type=Path, help="merge result files of several runs and print tables")
    parser.add_argument("--output", type=Path, default=None, help="with --merge: the merged file")
    args = parser.parse_args(argv)

    if args.merge:
        rows, first = [], None
        for path in args.merge:
            data = json.loads(path.read_text())
            first = first or data
            rows += data["rows"]
        keys = ONLINE_KEYS if rows and "label" in rows[0] else OFFLINE_KEYS
        out = args.output or args.merge[0]
        if out.exists() and out not in args.merge:
            out.unlink()
        result = merge_rows(out, rows, keys, {"device": first["device"], "versions": first["versions"]})
        print((online_table if keys == ONLINE_KEYS else offline_table)(result))
        return 0

    from qempo_lite.models import paper_model_config
    from qempo_lite.tiny import train_tokenizer

    if args.dry_run:
        device = "cpu"
        torch.set_num_threads(min(2, torch.get_num_threads()))
        args.configs = tiny_configs(train_tokenizer())
        args.models = list(args.configs)
        args.model_key = {n: n for n in args.models}
        # QLoRA on the Llama: bitsandbytes' CPU kernel adds a bias in place after an eval-mode pass (the
        # reference precompute), which fails on biased (Qwen2) layers on CPUs with AVX512-BF16; GPUs are unaffected.
        args.adapter = {"tiny-llama": "qlora", "tiny-qwen2": "lora"}
        args.recipe_batch = {n: 2 for n in args.models}
        args.seq, args.completion, args.batches = 64, 32, 2
        args.steps, args.warmup = 1, 1
        args.online_model_name, args.online_model = "tiny-llama", "tiny-llama"
        args.online_k, args.online_tokens, args.online_prompt = 4, 8, 8
        args.online_recipe_tokens = None if args.no_online_recipe else 16
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU; --dry-run runs the same code on the CPU with tiny shapes")
        device = "cuda"
        args.configs = {n: paper_model_config(OFFLINE_MODELS[n][0]) for n in list(OFFLINE_MODELS)}
        args.model_key = {n: OFFLINE_MODELS[n][0] for n in OFFLINE_MODELS}
        args.adapter = {n: OFFLINE_MODELS[n][1] for n in OFFLINE_MODELS}
        args.recipe_batch = {n: OFFLINE_MODELS[n][2] for n in OFFLINE_MODELS}
        args.seq, args.completion, args.batches = 1024, 512, 2
        args.online_model_name, args.online_model = "qwen2.5-1.5b", OFFLINE_MODELS["qwen2.5-1.5b"][0]
        args.online_k, args.online_tokens, args.online_prompt = 8, 256, 64
        args.online_recipe_tokens = None if args.no_online_recipe else 1024

    extra = {"device": device_name(), "versions": versions(), "dry_run": args.dry_run}
    offline_path, online_path = args.output_dir / "gpu_offline.json", args.output_dir / "gpu_online.json"
    args.save_offline = lambda rows: merge_rows(offline_path, rows, OFFLINE_KEYS, extra)
    args.save_online = lambda rows: merge_rows(online_path, rows, ONLINE_KEYS, extra)
    log(f"{extra['device']} {json.dumps(extra['versions'])}")
    failed = False
    if args.part in ("offline", "all"):
        rows = run_offline(args, device)
        failed |= any("error" in r for r in rows)
        print(offline_table(json.loads(offline_path.read_text())))
    if args.part in ("online", "all"):
        rows = run_online(args, device)
        failed |= any("error" in r for r in rows)
        print(online_table(json.loads(online_path.read_text())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
