"""``qempo-lite eval``: sample, score diversity, judge, pass@k, report — one step per sub-command.

A full MT-Bench + GSM8K evaluation of two adapters and the base model::

    qempo-lite eval sample --base-model B --adapter qempo=runs/qempo --adapter dpo=runs/dpo \\
        --include-base --prompts mtbench --n 16 --output eval/samples.jsonl
    qempo-lite eval diversity --samples eval/samples.jsonl --output eval/diversity.json
    qempo-lite eval judge --samples eval/samples.jsonl --questions mtbench \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4o-2024-08-06 --output eval/judge.json
    qempo-lite eval passk --base-model B --adapter qempo=runs/qempo --adapter dpo=runs/dpo \\
        --include-base --data gsm8k/test.jsonl --n 100 --output eval/passk.json
    qempo-lite eval report --inputs eval/diversity.json eval/judge.json eval/passk.json --output-dir eval

Each step writes a file the next one reads, so any step can be rerun alone (the judge also
keeps a cache of its ratings). ``qempo-lite eval table2`` runs sample (MT-Bench), diversity,
judge and report in one resumable command (see :mod:`qempo_lite.evaluate.table2`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qempo_lite.console import input_read
from qempo_lite.errors import QempoError, not_a_file

from . import options


# ------------------------------------------------------------------------------ sample


def _read_prompt_file(source: str, limit: int | None):
    """MT-Bench-shaped questions (rows with 'turns') or plain prompts (rows with 'prompt', optional 'id')."""
    from .mtbench import MTBENCH, load_questions
    from .sampling import to_messages

    if source == MTBENCH:
        return load_questions(source, limit=limit), None
    path = Path(source)
    if not path.is_file():
        raise QempoError(f"prompts file {path} {not_a_file(path)}; pass 'mtbench' or a JSONL file")
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if line.strip()]
    try:
        first = json.loads(lines[0][1]) if lines else None
    except json.JSONDecodeError as err:
        raise QempoError(f"{path} row {lines[0][0]}: not JSON ({err.msg}); fix the row") from None
    if isinstance(first, dict) and "turns" in first:
        return load_questions(path, limit=limit), None
    ids, prompts = [], []
    for index, line in lines[:limit]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise QempoError(f"{path} row {index}: not JSON ({err.msg}); fix the row") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise QempoError(f"{path} row {index}: field 'prompt' is missing; each row needs 'prompt' (a string or "
                             "a chat), or use MT-Bench's shape with 'turns'")
        try:
            prompts.append(to_messages(row["prompt"], index))
        except QempoError as err:
            raise QempoError(f"{path} row {index}: field 'prompt': {err}") from None
        ids.append(row.get("id", index))
    if not prompts:
        raise QempoError(f"{path} holds no prompts")
    return None, (ids, prompts)


def _cmd_sample(args) -> int:
    from .mtbench import sample_mtbench
    from .sampling import save_samples

    options.check_output(args.output, "--output")
    adapters = options.adapters_from_args(args)
    questions, plain = _read_prompt_file(args.prompts, args.limit)
    decoding = {"n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    with options.sampler_from_args(args, adapters) as sampler:
        if questions is not None:
            samples = sample_mtbench(sampler, adapters, questions, **decoding)
        else:
            ids, prompts = plain
            samples = sampler.sample(adapters, prompts, prompt_ids=ids, **decoding)
    path = save_samples(args.output, samples)
    print(f"{len(samples)} samples from {len(adapters)} model(s) written to {path}")
    return 0


# ------------------------------------------------------------------------------ diversity


def _cmd_diversity(args) -> int:
    from .metrics import SCORES
    from .mtbench import diversity_scores
    from .sampling import load_samples

    options.check_output(args.output, "--output")
    samples = load_samples(args.samples)
    scorer = options.scorer_from_args(args)
    scores = diversity_scores(samples, scorer, per_question=not args.no_per_question)
    result = options.diversity_result(scorer, scores, str(args.samples))
    options.write_json(args.output, result)
    options.print_table(["adapter", *SCORES.values(), "texts", "sentences"],
                 [[n, *(r[k] for k in SCORES), r["n_texts"], r["n_sentences"]] for n, r in scores.items()])
    options.say_models(result)
    print(f"diversity written to {args.output}")
    return 0


# ------------------------------------------------------------------------------ judge


def _cmd_judge(args) -> int:
    from .judge import Judge, build_items, load_judge_prompts, summarize
    from .mtbench import load_questions
    from .sampling import load_samples

    extra_body = options.extra_body(args)
    options.check_output(args.output, "--output")
    samples = load_samples(args.samples)
    templates = load_judge_prompts(args.judge_prompts)
    questions = load_questions(args.questions) if args.questions else None
    items = build_items(samples, templates, questions, per_prompt=args.per_prompt)
    cache = args.cache or str(Path(args.output).with_name("judge_cache.jsonl"))
    judge = Judge(args.judge_url, args.judge_model, api_key_env=args.api_key_env, templates=templates,
                  concurrency=args.concurrency, max_attempts=args.max_attempts, timeout=args.timeout,
                  temperature=args.judge_temperature, max_tokens=args.max_tokens, extra_body=extra_body,
                  cache_path=cache)
    verdicts = judge.judge(items)
    scores = summarize(verdicts)
    result = {"kind": "judge", "samples": str(args.samples), "cache": cache,
              "judge": {"model": args.judge_model, "url": judge.base_url, "temperature": args.judge_temperature,
                        "prompts": sorted({i.template for i in items})},
              "items": len(items), "failures": judge.stats["failures"], "requests": judge.stats["requests"],
              "cached": judge.stats["cached"], "adapters": scores}
    options.write_json(args.output, result)
    options.print_table(["adapter", "judge", "rated", "failed"],
                 [[n, r["judge"], r["n_rated"], r["n_failed"]] for n, r in scores.items()])
    print(f"{len(items)} samples judged ({judge.stats['cached']} from the cache, {judge.stats['failures']} without a "
          f"rating); written to {args.output}")
    return 0


# ------------------------------------------------------------------------------ pass@k


def _cmd_passk(args) -> int:
    from qempo_lite.data import load_math

    from .math_eval import evaluate_math
    from .sampling import save_samples

    options.check_output(args.output, "--output")
    if args.samples_output:
        options.check_output(args.samples_output, "--samples-output")
    ks = None
    if args.ks:
        try:
            ks = [int(k) for k in args.ks.split(",")]
        except ValueError:
            raise QempoError(f"--ks {args.ks!r} must be comma-separated integers, e.g. 1,2,4,8") from None
        wrong = [k for k in ks if not 1 <= k <= args.n]
        if wrong:
            raise QempoError(f"--ks {args.ks!r}: each k must be between 1 and --n {args.n} (the samples per problem), "
                             f"not {wrong[0]}; lower k or raise --n")
    adapters = options.adapters_from_args(args)
    dataset = load_math(args.data, split=args.split, limit=args.limit, on_bad_rows=args.on_bad_rows)
    with options.sampler_from_args(args, adapters) as sampler:
        results, samples = evaluate_math(sampler, adapters, dataset, n=args.n, ks=ks, temperature=args.temperature,
                                         top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.samples_output:
        save_samples(args.samples_output, samples)
    result = {"kind": "passk", "data": str(args.data), "split": args.split, "n": args.n,
              "temperature": args.temperature, "adapters": results}
    options.write_json(args.output, result)
    ks_shown = list(next(iter(results.values()))["pass@k"])
    options.print_table(["adapter", *(f"pass@{k}" for k in ks_shown)],
                 [[n, *r["pass@k"].values()] for n, r in results.items()])
    print(f"pass@k written to {args.output}")
    return 0


# ------------------------------------------------------------------------------ report


def _cmd_report(args) -> int:
    from .report import build_report, load_inputs, write_report

    options.check_output(args.output_dir, "--output-dir", folder=True)
    written = write_report(build_report(load_inputs(args.inputs)), args.output_dir)
    for kind, path in written.items():
        print(f"{kind:>8}: {path}")
    return 0


# ------------------------------------------------------------------------------ table2


def _cmd_table2(args) -> int:
    from .table2 import run

    args.extra_body = options.extra_body(args)
    options.check_output(args.output_dir, "--output-dir", folder=True)
    return run(args)


# ------------------------------------------------------------------------------ parser


def _command(commands, name: str, run, **parser_options) -> argparse.ArgumentParser:
    """The sub-command ``name``, carried out by ``run(args)``; its arguments are added to what this returns."""
    parser = commands.add_parser(name, **parser_options)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    example = __doc__.split("::\n\n", 1)[1].split("\n\n")[0]
    parser = argparse.ArgumentParser(
        prog="qempo-lite eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate adapters as the paper does: sample, diversity, judge, pass@k, report.",
        epilog=f"example (two adapters and the base model):\n{example}\n\n"
               "Each step writes the file the next one reads. Run 'qempo-lite eval COMMAND --help' for its options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = _command(
        commands, "sample", _cmd_sample, help="sample completions from adapters and the base model",
        description="Sample --n completions per prompt from every adapter (and with --include-base the base model), "
                    "loading the base model once. With MT-Bench questions (--prompts mtbench, or a file of rows with "
                    "'turns') the paper's protocol runs: n first-turn samples per question, then n second-turn "
                    "samples, each after a random first-turn sample. Other JSONL files have rows with 'prompt' (a "
                    "string or a chat) and optional 'id'. Writes one JSON line per sample.")
    options.add_model_options(sample)
    sample.add_argument("--prompts", default="mtbench", help="'mtbench' (default) or a JSONL file")
    sample.add_argument("--limit", type=options.positive_int, help="use only the first LIMIT questions or prompts")
    sample.add_argument("--n", type=options.positive_int, default=16,
                        help="samples per prompt and turn (16, as the paper)")
    sample.add_argument("--max-new-tokens", type=options.positive_int, default=1024,
                        help="longest answer in tokens (1024)")
    sample.add_argument("--output", required=True, help="the samples JSONL file to write")

    diversity = _command(
        commands, "diversity", _cmd_diversity, help="lexical, semantic and syntactic diversity of samples",
        description="Score the diversity (x100) of each adapter's samples by Guo et al. (2024)'s released protocol "
                    "(guo2024), pooled over all its samples (the paper's Table 2) and per question turn (mean over "
                    "the sets). The result names the protocol, the spaCy parser and the sentence encoder used.")
    diversity.add_argument("--samples", required=True, help="samples JSONL from 'qempo-lite eval sample'")
    diversity.add_argument("--output", required=True, help="the diversity JSON file to write")
    diversity.add_argument("--no-per-question", action="store_true", help="skip the per-question scores")
    options.add_diversity_options(diversity)

    judge = _command(
        commands, "judge", _cmd_judge, help="rate samples 1-10 with an LLM judge (MT-Bench single-answer grading)",
        description="Rate every sample with an LLM behind an OpenAI-compatible endpoint, using MT-Bench's "
                    "single-answer prompts (the multi-turn one for second-turn samples). The API key is read from "
                    "--api-key-env, $QEMPO_JUDGE_API_KEY or $OPENAI_API_KEY and never printed. Failed requests are "
                    "retried, then counted; ratings are cached in a JSONL file so reruns only ask what is missing.")
    judge.add_argument("--samples", required=True, help="samples JSONL from 'qempo-lite eval sample'")
    judge.add_argument("--output", required=True, help="the judge JSON file to write")
    judge.add_argument("--questions", help="'mtbench' or the questions file sampled from: grades math, reasoning "
                                           "and coding answers against its reference answers, as MT-Bench does")
    options.add_judge_options(judge, required=True)
    judge.add_argument("--max-attempts", type=options.positive_int, default=3,
                       help="requests per sample before it counts as failed (3)")
    judge.add_argument("--timeout", type=float, default=120.0, help="seconds per request (120)")
    judge.add_argument("--cache", help="ratings cache (default: judge_cache.jsonl beside --output)")

    passk = _command(
        commands, "passk", _cmd_passk, help="pass@k on math problems (GSM8K, MATH)",
        description="Sample --n answers per math problem from every adapter, check each final answer against the "
                    "gold one, and estimate pass@k (unbiased) for k = 1, 2, 4, ... up to n.")
    options.add_model_options(passk)
    passk.add_argument("--data", required=True, help="GSM8K/MATH JSONL file or Hub dataset (e.g. openai/gsm8k)")
    passk.add_argument("--split", default="test", help="dataset split (test)")
    passk.add_argument("--limit", type=options.positive_int, help="use only the first LIMIT problems")
    passk.add_argument("--n", type=options.positive_int, default=100, help="samples per problem (100, as the paper)")
    passk.add_argument("--ks", help="comma-separated k values (default: 1,2,4,... and n)")
    passk.add_argument("--on-bad-rows", choices=("error", "skip"), default="error",
                       help="a malformed problem stops the run (error, default) or is left out (skip)")
    passk.add_argument("--max-new-tokens", type=options.positive_int, default=1024,
                       help="longest answer in tokens (1024)")
    passk.add_argument("--output", required=True, help="the pass@k JSON file to write")
    passk.add_argument("--samples-output", help="also save the answers as samples JSONL")

    table2 = _command(
        commands, "table2", _cmd_table2,
        help="one command for Table 2: MT-Bench sampling, diversity, judge and report, resumable",
        description="Run the paper's Table 2 evaluation for every model in one go: the MT-Bench protocol (n "
                    "first-turn samples per question, then n second-turn ones), the three diversity scores "
                    "(guo2024), the judge's MT-Bench rating when --judge-url and --judge-model are given, and the "
                    "report. Every stage keeps its results in --output-dir (samples per model, diversity.json, "
                    "judge_cache.jsonl), so a rerun continues where the last one stopped and redoes only what "
                    "changed. Without a judge the report has diversity only, and says so.",
        epilog="example:\n  qempo-lite eval table2 --base Qwen/Qwen2.5-1.5B-Instruct --include-base \\\n"
               "      --adapter qempo=runs/qempo --adapter dpo=runs/dpo \\\n"
               "      --judge-url https://api.openai.com/v1 --judge-model gpt-4o-2024-08-06 --output-dir eval/table2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model_options(table2)
    table2.add_argument("--output-dir", required=True, help="folder for samples/, diversity.json, judge.json, "
                                                            "judge_cache.jsonl and the report")
    table2.add_argument("--questions", default="mtbench", help="'mtbench' (default) or an MT-Bench-shaped file")
    table2.add_argument("--limit", type=options.positive_int, help="use only the first LIMIT questions")
    table2.add_argument("--per-category", type=options.positive_int, metavar="K",
                        help="use only the first K questions of each category (a fixed subset covering all eight; "
                             "applied before --limit)")
    table2.add_argument("--merge-adapters", action="store_true",
                        help="sample each adapter merged into a copy of the base (W + (alpha/r) B A in float32, "
                             "saved in the base's dtype): the same model at the base's speed, for engines whose "
                             "LoRA path is slow (vLLM on CPU: about 4x fewer tokens/s with an adapter); the merge holds the "
                             "base in float32 in CPU memory")
    table2.add_argument("--n", type=options.positive_int, default=16,
                        help="samples per question and turn (16, as the paper)")
    table2.add_argument("--max-new-tokens", type=options.positive_int, default=1024,
                        help="longest answer in tokens (1024)")
    table2.add_argument("--per-question", action="store_true",
                        help="also score each question turn's samples as a set (not in Table 2; slower)")
    options.add_diversity_options(table2, seed_flag="--diversity-seed")
    options.add_judge_options(table2.add_argument_group("judge (optional: without it the report has diversity only)"),
                       required=False, prefix="judge-")

    report = _command(
        commands, "report", _cmd_report, help="merge results into report.json, report.md and figures",
        description="Merge the JSON files of 'eval diversity', 'eval judge' and 'eval passk' by adapter into "
                    "report.json and report.md (Table 2 layout: Lexical, Semantic, Syntactic, Average, Judge) and "
                    "draw diversity_quality.png (average diversity vs judge score, or pass@1) and passk.png "
                    "(pass@k vs k, log2 axis).")
    report.add_argument("--inputs", nargs="+", required=True, help="result JSON files")
    report.add_argument("--output-dir", required=True, help="folder for report.json, report.md and the figures")
    return parser


def cli(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return int(exit_.code or 0)
    input_read()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    return args.run(args)


__all__ = ["cli", "build_parser"]
