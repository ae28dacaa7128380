"""Speed of the ``guo2024`` diversity metrics against the grakel pipeline, on 1,280 real texts.

Scores 1,280 texts (the size of one model's first-turn MT-Bench samples, 80 questions x 16)
with qempo_lite.evaluate.diversity and, side by side, with qempo_lite.evaluate.reference — the
protocol written after Guo et al.'s released scripts:

- lexical:   regex tokens, list-built n-grams, seeded samples of 40,000 of each order;
- syntactic: one ``nlp(sentence)`` call per sampled sentence with the whole spaCy pipeline,
             networkx graphs and grakel's ``WeisfeilerLehman(n_iter=2, normalize=True)``;
- semantic:  one ``encode`` call with the scripts' batch size 8 in float32, a full cosine matrix
             (qempo-lite: batch 64, in bfloat16 where the CPU computes it natively).

Both split texts into sentences with spaCy's rule-based sentencizer; the reference splits once
per sentence metric, as each script does. The texts are real: the assistant turns of the first
1,280 dialogues of the HH-RLHF harmless test split (``tests/data/hh_rlhf_harmless``), joined per dialogue.
Model loading is not timed (both pipelines share the loaded models). Each measurement runs
``--repeats`` times, the two pipelines alternating, and the fastest run counts; wall and CPU
time (all threads of the process) are recorded, with the load averages before and after, since
other processes may share the machine. Run manually:

    python benchmarks/eval_speed.py [--output benchmarks/results/eval_speed.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from qempo_lite.evaluate import diversity, diversity_models, metrics, reference

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "hh_rlhf_harmless" / "test.jsonl.gz"


def load_texts(path: Path, count: int) -> list[str]:
    """The assistant turns of the first ``count`` dialogues (their 'chosen' side), one text per dialogue."""
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            turns = re.split(r"\n\nAssistant: ", json.loads(line)["chosen"])[1:]
            text = "\n\n".join(t.split("\n\nHuman:")[0].strip() for t in turns).strip()
            if text:
                texts.append(text)
            if len(texts) == count:
                break
    return texts


def timed(fn, *args, **kwargs) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu, value


def default_encoder() -> str:
    """The offline MiniLM package when installed, else the protocol's default encoder."""
    stand_in = "sentence-transformers/all-MiniLM-L6-v2"
    return stand_in if diversity_models._bundled_encoder(stand_in) is not None else diversity_models.DEFAULT_ENCODER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="HH-RLHF test.jsonl.gz")
    parser.add_argument("--texts", type=int, default=1280, help="number of texts scored (1280)")
    parser.add_argument("--spacy-model", default=None, help="spaCy pipeline (default: as the package resolves it)")
    parser.add_argument("--encoder", default=None, help="encoder name or directory (default: offline MiniLM)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size of the fast path (64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest is kept (3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 keeps CPU time exact on a shared machine, where "
                             "idle threads of a busy one spin")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "eval_speed.json")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    texts = load_texts(args.data, args.texts)
    words = [len(t.split()) for t in texts]
    sentences = diversity.split_sentences(texts)
    console.print(f"{len(texts)} texts, {min(words)}-{max(words)} words (mean {np.mean(words):.0f}), "
                  f"{len(sentences)} sentences")

    encoder_name = args.encoder or default_encoder()
    nlp = diversity.load_nlp(args.spacy_model)
    # The grakel pipeline computes in float32, as the scripts; qempo-lite in its default dtype.
    encoder = diversity.load_encoder(encoder_name, device="cpu")
    reference_encoder = diversity.load_encoder(encoder_name, device="cpu", dtype="float32")
    for model in (encoder, reference_encoder):
        model.encode(sentences[:16])  # the first call pays one-off kernel set-up
    split = reference.sentencizer_sentences
    split(texts[:2])

    # Each measurement is repeated, the two pipelines alternating, and the fastest run kept: on a
    # shared machine the minimum is the best estimate of the uncontended time.
    measures = [
        ("lexical", lambda: diversity.lexical_diversity(texts), lambda: reference.reference_lexical(texts)),
        ("syntactic", lambda: diversity.syntactic_diversity(texts, nlp),
         lambda: reference.reference_syntactic(texts, nlp, split=split)),
        ("semantic", lambda: diversity.semantic_diversity(texts, encoder, batch_size=args.batch_size),
         lambda: reference.reference_semantic(texts, encoder=reference_encoder, split=split)),
    ]
    # End to end, as a user runs it: one scorer, the texts split once for both sentence metrics.
    scorer = metrics.DiversityScorer(args.spacy_model, encoder_name, device="cpu", batch_size=args.batch_size)
    runs: dict[str, list] = {}
    for repeat in range(1, args.repeats + 1):
        for metric, fast, slow in measures:
            for who, fn in (("fast", fast), ("reference", slow)):
                with console.status(f"run {repeat}/{args.repeats}, {metric}: {who}"):
                    runs.setdefault((metric, who), []).append(timed(fn))
            console.print(f"run {repeat}, {metric}: qempo-lite {runs[metric, 'fast'][-1][0]:.1f} s, grakel pipeline "
                          f"{runs[metric, 'reference'][-1][0]:.1f} s (load {os.getloadavg()[0]:.1f})")
        with console.status(f"run {repeat}/{args.repeats}, all three: qempo-lite DiversityScorer"):
            runs.setdefault(("end to end", "fast"), []).append(timed(scorer.score, texts))
        console.print(f"run {repeat}, end to end: qempo-lite {runs['end to end', 'fast'][-1][0]:.1f} s")

    def best(metric: str, who: str) -> tuple[float, float, Any]:
        return min(runs[metric, who], key=lambda run: run[0])

    rows = []
    for metric, _, _ in measures:
        (fast_s, fast_cpu, fast_score), (ref_s, ref_cpu, ref_score) = best(metric, "fast"), best(metric, "reference")
        rows.append({"metric": metric, "fast_s": fast_s, "fast_cpu_s": fast_cpu, "reference_s": ref_s,
                     "reference_cpu_s": ref_cpu, "speedup": ref_s / fast_s, "fast_score": fast_score,
                     "reference_score": ref_score, "abs_diff": abs(fast_score - ref_score),
                     "fast_runs_s": [r[0] for r in runs[metric, "fast"]],
                     "reference_runs_s": [r[0] for r in runs[metric, "reference"]]})
    e2e_s, e2e_cpu, e2e = best("end to end", "fast")
    ref_total = sum(r["reference_s"] for r in rows)
    ref_cpu_total = sum(r["reference_cpu_s"] for r in rows)

    table = Table(title=f"guo2024 diversity of {len(texts)} texts ({len(sentences)} sentences)")
    for column in ("metric", "qempo-lite s", "grakel pipeline s", "speedup", "CPU s (fast / ref)", "qempo-lite",
                   "grakel pipeline", "|diff|"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for r in rows:
        table.add_row(r["metric"], f"{r['fast_s']:.2f}", f"{r['reference_s']:.2f}", f"{r['speedup']:.1f}x",
                      f"{r['fast_cpu_s']:.1f} / {r['reference_cpu_s']:.1f}", f"{r['fast_score']:.3f}",
                      f"{r['reference_score']:.3f}", f"{r['abs_diff']:.2e}")
    table.add_row("end to end", f"{e2e_s:.2f}", f"{ref_total:.2f}", f"{ref_total / e2e_s:.1f}x",
                  f"{e2e_cpu:.1f} / {ref_cpu_total:.1f}", "", "", "")
    result = {
        "protocol": diversity.PROTOCOL,
        "data": os.path.relpath(args.data, Path(__file__).resolve().parents[1]),  # from the repository root
        "n_texts": len(texts),
        "n_sentences": len(sentences),
        "words_mean": float(np.mean(words)),
        "parser": scorer.parser,
        "encoder": encoder_name,
        "encoder_batch_size": args.batch_size,
        "encoder_dtype": {"qempo-lite": str(encoder.dtype), "reference": str(reference_encoder.dtype)},
        "sample_sizes": metrics.PROTOCOL_SAMPLES,
        "seed": diversity.DEFAULT_SEED,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        # other processes share the CPU: the 1-, 5- and 15-minute load averages before and after
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "metrics": rows,
        "end_to_end": {"fast_s": e2e_s, "fast_cpu_s": e2e_cpu, "reference_s": ref_total,
                       "reference_cpu_s": ref_cpu_total, "speedup": ref_total / e2e_s,
                       "fast_runs_s": [r[0] for r in runs["end to end", "fast"]],
                       "cpu_speedup": ref_cpu_total / e2e_cpu,
                       "scores": {k: e2e[k] for k in ("lexical", "syntactic", "semantic", "average")}},
        "max_abs_diff": max(r["abs_diff"] for r in rows),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    console.print(table)
    console.print(f"results written to {args.output}")
    console.print(f"end to end: qempo-lite {e2e_s:.1f} s, grakel pipeline {ref_total:.1f} s, speedup "
                  f"{result['end_to_end']['speedup']:.2f}x (CPU time {result['end_to_end']['cpu_speedup']:.2f}x); "
                  f"largest score difference {result['max_abs_diff']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
