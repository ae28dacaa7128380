"""``qempo-lite eval table2``: the paper's Table 2 rows from one command, resumable.

For every model (each ``--adapter`` and, with ``--include-base``, the base model) the stages
run in turn, each with its own progress bar, each keeping its results in the output folder so
that an interrupted or repeated run continues where the last one stopped:

1. sampling — the MT-Bench protocol (:func:`~qempo_lite.evaluate.mtbench.sample_mtbench`: n
   first-turn samples per question, then n second-turn ones) into ``samples/<name>.jsonl``,
   with ``samples/<name>.json`` recording what they were drawn with (base model, the SHA-256 of
   the adapter's config and weights and of the questions, decoding, backend, dtype, batch
   size) and the SHA-256 of the samples file itself. A model whose samples exist with the same
   record, unchanged since they were drawn, is not sampled again (the line says why it is);
   the base model is loaded only when some model needs sampling.
2. diversity — the ``guo2024`` scores of each model's pooled samples into ``diversity.json``
   (the same file as ``qempo-lite eval diversity`` writes), a row reused when the samples'
   SHA-256 and the row's definition (protocol, models, sample sizes, seed, each metric's
   version, library versions: ``metrics.definition_of``) are unchanged.
3. judge — MT-Bench single-answer grading by an OpenAI-compatible endpoint into ``judge.json``;
   every rating is appended to ``judge_cache.jsonl`` as it arrives, keyed on the judge's URL,
   model, temperature and extra body as well as the prompts, so a rerun asks only what is
   missing for the same judge. Without ``--judge-url``/``--judge-model`` this stage is skipped and the report
   says so.
4. report — ``report.json``, ``report.md`` (Lexical, Semantic, Syntactic, Average, Judge) and
   ``diversity_quality.png``, as ``qempo-lite eval report``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qempo_lite.adapters import CONFIG_FILE, WEIGHTS_FILE
from qempo_lite.errors import QempoError

logger = logging.getLogger("qempo_lite")

NO_JUDGE = ("No judge was given (--judge-url and --judge-model): the Judge column is empty and the report shows "
            "diversity only.")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sampling_record(base_model: str, adapter: str | None, questions: Path, args) -> dict[str, Any]:
    """Everything a model's samples depend on: the base, the adapter's config and weights, the questions, the
    decoding and the engine that ran it."""
    return {"base_model": str(base_model), "adapter": str(Path(adapter).resolve()) if adapter else None,
            "adapter_config_sha256": sha256_of(Path(adapter) / CONFIG_FILE) if adapter else None,
            "adapter_weights_sha256": sha256_of(Path(adapter) / WEIGHTS_FILE) if adapter else None,
            "questions_sha256": sha256_of(questions), "limit": args.limit,
            "per_category": args.per_category, "n": args.n,
            "merged": bool(adapter and args.merge_adapters),
            "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "backend": args.backend, "dtype": args.dtype, "batch_size": args.batch_size}


def _stale(samples: Path, saved: dict | None, record: dict[str, Any]) -> str | None:
    """Why the samples on disk cannot be reused for ``record`` (None: they can)."""
    if not samples.is_file() or saved is None:
        return "" if not samples.is_file() else "no record of how they were drawn"
    changed = next((key for key in record if saved.get(key) != record[key]), None)
    if changed is not None:
        return f"{changed} changed"
    if saved.get("samples_sha256") != sha256_of(samples):
        return f"{samples.name} is not the file that was drawn (cut short or edited)"
    return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def sample_stage(args, adapters: dict[str, str | None], out: Path) -> dict[str, Path]:
    """Samples of every model, drawn only where none with the same record exist; name -> samples file."""
    from .options import base_model_from_args, sampler_from_args
    from .mtbench import load_questions, resolve_mtbench_file, sample_mtbench
    from .sampling import save_samples

    questions_path = resolve_mtbench_file(args.questions)
    questions = load_questions(questions_path, limit=args.limit, per_category=args.per_category)
    base_model = base_model_from_args(args, adapters)
    folder = out / "samples"
    todo, files = {}, {}
    for name, adapter in adapters.items():
        if "/" in name or name in (".", ".."):
            raise QempoError(f"model name {name!r} cannot name a file; name the adapter with --adapter NAME=PATH")
        files[name] = folder / f"{name}.jsonl"
        record = _sampling_record(base_model, adapter, questions_path, args)
        stale = _stale(files[name], _read_json(folder / f"{name}.json"), record)
        if stale is None:
            print(f"[1/4] sampling: {name}: samples on disk ({files[name]}), not sampled again")
        else:
            todo[name] = (adapter, record, f" (sampled again: {stale})" if stale else "")
    if not todo:
        return files

    def draw(sampler, i, name, adapter, record, why, served):
        print(f"[1/4] sampling: {name} ({i}/{len(todo)}): {len(questions)} questions x {args.n} samples per turn"
              f"{why}")
        samples = sample_mtbench(sampler, {name: served}, questions, n=args.n, temperature=args.temperature,
                                 top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
        save_samples(files[name], samples)
        # The record last, with the hash of the file it describes: samples without it are drawn again.
        record = {**record, "samples_sha256": sha256_of(files[name])}
        (folder / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    # Numbered in the order they are drawn: the models one engine serves, then each merged copy.
    order = sorted(todo, key=lambda name: todo[name][1]["merged"])
    numbered = {name: (i, *todo[name]) for i, name in enumerate(order, start=1)}
    merged = {name: job for name, job in numbered.items() if job[2]["merged"]}
    served = {name: job for name, job in numbered.items() if name not in merged}
    if served:
        adapters_served = {name: job[1] for name, job in served.items()}
        # Without an adapter to serve, the engine is built without LoRA layers (much faster on vLLM's CPU backend).
        with sampler_from_args(args, adapters_served, lora=any(adapters_served.values())) as sampler:
            for name, (i, adapter, record, why) in served.items():
                draw(sampler, i, name, adapter, record, why, adapter)
    for leftover in out.glob(".merged-*") if merged else ():  # copies a killed run could not remove
        shutil.rmtree(leftover, ignore_errors=True)
    for name, (i, adapter, record, why) in merged.items():
        from .merged import merged_copy

        # One engine per merged model, on a copy of the base that is removed once its samples are saved.
        with tempfile.TemporaryDirectory(prefix=f".merged-{name}-", dir=out) as copy:
            merged_copy(base_model, adapter, copy, dtype=args.dtype)
            one = argparse.Namespace(**{**vars(args), "base_model": copy})
            with sampler_from_args(one, {name: None}, lora=False) as sampler:
                draw(sampler, i, name, adapter, record, why, None)
    return files


def diversity_stage(args, files: dict[str, Path], out: Path) -> Path:
    """diversity.json for every model, reusing the rows whose samples and settings are unchanged."""
    from .options import diversity_result, say_models, scorer_from_args, write_json
    from .metrics import definition_difference, definition_of
    from .mtbench import diversity_scores
    from .sampling import load_samples

    path = out / "diversity.json"
    scorer = scorer_from_args(args)
    fresh = diversity_result(scorer, {}, str(out / "samples"))
    previous = _read_json(path) or {}
    scores = {}
    for name, samples_file in files.items():
        digest = sha256_of(samples_file)
        row = (previous.get("adapters") or {}).get(name)
        # The row's own record of how it was scored: every key of the definition (metric versions included).
        changed = definition_difference(definition_of(row), definition_of(fresh)) if isinstance(row, dict) else None
        if isinstance(row, dict) and changed is None and row.get("samples_sha256") == digest:
            print(f"[2/4] diversity: {name}: scores on disk, not scored again")
            scores[name] = row
            continue
        why = (f" (scored again: {changed})" if changed else " (scored again: the samples changed)"
               if isinstance(row, dict) else "")
        print(f"[2/4] diversity: {name}{why}")
        row = diversity_scores(load_samples(samples_file), scorer, per_question=args.per_question)[name]
        scores[name] = {**row, "samples_sha256": digest, **definition_of(fresh)}
        write_json(path, {**fresh, "adapters": scores})  # kept as each model is done
    result = {**fresh, "adapters": scores}
    write_json(path, result)
    say_models(result)
    return path


def judge_stage(args, files: dict[str, Path], out: Path) -> Path | None:
    """judge.json from the cached ratings plus whatever the judge still has to rate; None without a judge."""
    if not (args.judge_url and args.judge_model):
        if args.judge_url or args.judge_model:
            raise QempoError("a judge needs both --judge-url and --judge-model; pass both, or neither for "
                             "diversity only")
        print(f"[3/4] judge: skipped. {NO_JUDGE}")
        return None
    from .options import write_json
    from .judge import Judge, build_items, load_judge_prompts, summarize
    from .mtbench import load_questions
    from .sampling import load_samples

    templates = load_judge_prompts(args.judge_prompts)
    questions = load_questions(args.questions)
    samples = [s for path in files.values() for s in load_samples(path)]
    items = build_items(samples, templates, questions, per_prompt=args.judge_per_prompt)
    cache = out / "judge_cache.jsonl"
    judge = Judge(args.judge_url, args.judge_model, api_key_env=args.api_key_env, templates=templates,
                  concurrency=args.concurrency, temperature=args.judge_temperature, max_tokens=args.judge_max_tokens,
                  extra_body=args.extra_body, cache_path=cache)
    print(f"[3/4] judge: {len(items)} samples with {args.judge_model}")
    verdicts = judge.judge(items)
    result = {"kind": "judge", "samples": str(out / "samples"), "cache": str(cache),
              "judge": {"model": args.judge_model, "url": judge.base_url, "temperature": args.judge_temperature,
                        "prompts": sorted({i.template for i in items})},
              "items": len(items), "failures": judge.stats["failures"], "requests": judge.stats["requests"],
              "cached": judge.stats["cached"], "adapters": summarize(verdicts)}
    print(f"[3/4] judge: {judge.stats['cached']} ratings from {cache.name}, {judge.stats['requests']} requests, "
          f"{judge.stats['failures']} samples without a rating (asked again on a rerun)")
    return write_json(out / "judge.json", result)


def run(args) -> int:
    """The four stages; prints the Table 2 rows and where the report is."""
    from .options import adapters_from_args, print_table
    from .report import COLUMNS, build_report, load_inputs, write_report

    adapters = adapters_from_args(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.judge_url and not args.judge_model or args.judge_model and not args.judge_url:
        judge_stage(args, {}, out)  # the one-line error, before any sampling
    files = sample_stage(args, adapters, out)
    inputs = [diversity_stage(args, files, out)]
    judged = judge_stage(args, files, out)
    inputs += [judged] if judged else []
    print("[4/4] report")
    report = build_report(load_inputs(inputs))
    if judged is None:
        report["no_judge"] = NO_JUDGE
    written = write_report(report, out)
    print_table(["model", *(header for header, _ in COLUMNS)],
                 [[n, *(r[key] for _, key in COLUMNS)] for n, r in report["adapters"].items()])
    for kind, path in written.items():
        print(f"{kind:>8}: {path}")
    return 0


__all__ = ["run", "sample_stage", "diversity_stage", "judge_stage", "NO_JUDGE"]
