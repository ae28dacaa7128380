"""What several ``qempo-lite eval`` sub-commands share: argparse types and option groups, output
checks, the adapters, base model, sampler and scorer built from the arguments, and result writing."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from qempo_lite.errors import QempoError

logger = logging.getLogger("qempo_lite")


def argparse_number(convert, accept, expected: str):
    """An argparse type: ``convert(value)`` where ``accept`` holds it, else a usage error saying ``expected``."""
    def parse(value: str):
        try:
            number = convert(value)
        except ValueError:
            number = None
        if number is None or not accept(number):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return number
    return parse


positive_int = argparse_number(int, lambda n: n >= 1, "a positive integer")
temperature = argparse_number(float, lambda t: 0.0 <= t < float("inf"), "a number >= 0 (0: greedy decoding)")
top_p = argparse_number(float, lambda p: 0.0 < p <= 1.0, "a number in (0, 1] (1: off)")


def check_output(path: str | Path, flag: str, *, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: a file where a folder is asked for
    (``folder``), a folder where a file is, or a parent that is a file."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise QempoError(f"{flag} {path} is a file; pass a folder (new or existing)")
    if not folder and path.is_dir():
        raise QempoError(f"{flag} {path} is a directory; pass a file name, e.g. {path / 'out.json'}")
    for parent in (path if folder else path.parent, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise QempoError(f"{flag} {path}: {parent} is a file, not a folder; pass another path")
            break
    return path


def adapters_from_args(args) -> dict[str, str | None]:
    """--adapter NAME=PATH (or PATH, named after its directory) plus --include-base; each adapter's files checked."""
    from qempo_lite.adapters import ANYWHERE, check_adapter_files

    adapters: dict[str, str | None] = {}
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise QempoError(f"--adapter {spec!r} must be NAME=PATH or PATH")
        if name in adapters:
            raise QempoError(f"--adapter name {name!r} is given twice; name each adapter once")
        # Checked before any model loads, so that a mistyped path is what the one error line names.
        check_adapter_files(Path(path).expanduser(), ANYWHERE, f"adapter {name!r} at {path}")
        adapters[name] = path
    if args.include_base:
        if args.base_name in adapters:
            raise QempoError(f"--base-name {args.base_name!r} is also an adapter name; pick another --base-name")
        adapters[args.base_name] = None
    if not adapters:
        raise QempoError("nothing to sample: pass --adapter NAME=PATH (repeatable) and/or --include-base")
    return adapters


def base_model_from_args(args, adapters: dict[str, str | None]) -> str:
    """--base-model, else the base model the first adapter records."""
    if args.base_model:
        return args.base_model
    from qempo_lite.adapters import ANYWHERE, CONFIG_FILE, recorded_base_model

    for name, path in adapters.items():
        if path and (Path(path) / CONFIG_FILE).is_file():
            base = recorded_base_model(Path(path), ANYWHERE)
            if base:
                logger.info("base model %s, as recorded by adapter %r", base, name)
                return base
    raise QempoError("no --base-model given and no adapter records one; pass --base-model")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that sample: base model and adapters, the engine, decoding."""
    group = parser.add_argument_group("model and adapters")
    group.add_argument("--base-model", "--base",
                       help="base model directory or Hub id (default: the one the first adapter records)")
    group.add_argument("--adapter", action="append", metavar="NAME=PATH",
                       help="a LoRA adapter directory, repeatable; NAME defaults to the directory name, which is "
                            "what the model card of 'qempo-lite push' looks up in report.json")
    group.add_argument("--include-base", action="store_true", help="also sample the base model with no adapter")
    group.add_argument("--base-name", default="base", help="the name of the base model's rows (default: base)")
    group.add_argument("--allow-base-mismatch", action="store_true",
                       help="accept adapters recorded for a differently named base model (weights must still fit)")
    from qempo_lite.rollout import serving_engine_names

    engine = parser.add_argument_group("sampling engine")
    engine.add_argument("--backend", choices=("auto", *serving_engine_names()), default="auto",
                        help="vllm: one engine serving every adapter (multi-LoRA); hf: transformers + PEFT; "
                             "vllm_server: a running server of the base model (--vllm-server-url); "
                             "auto: vllm when installed (default); or a registered serving engine")
    engine.add_argument("--vllm-server-url", metavar="URL",
                        help="vllm_server: the server's URL, e.g. http://127.0.0.1:8000 (started with qempo-lite serve "
                             "BASE; it reads the adapter folders at the same paths)")
    engine.add_argument("--dtype", default="auto", help="model dtype: auto (default), bfloat16, float16, float32")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="vLLM: share of GPU memory to reserve (on vLLM's CPU backend, of CPU memory) (0.9)")
    engine.add_argument("--max-model-len", type=positive_int,
                        help="vLLM: longest prompt + answer in tokens (default: the model's context, at most 4096)")
    engine.add_argument("--max-lora-rank", type=positive_int, default=64, help="vLLM: largest adapter rank served (64)")
    engine.add_argument("--batch-size", type=positive_int, default=64, help="hf: sequences per generate call (64)")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--temperature", type=temperature, default=1.0, help="sampling temperature (1.0)")
    decoding.add_argument("--top-p", type=top_p, default=1.0, help="nucleus sampling threshold (1.0: off)")
    decoding.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same samples")


def sampler_from_args(args, adapters, *, lora: bool = True):
    """The Sampler of the command; loading's progress bars and warnings are shown only if it loads."""
    from qempo_lite.console import quiet_setup
    from qempo_lite.rollout.server import server_url_options

    from .sampling import Sampler

    server = server_url_options(args.backend, args.vllm_server_url)
    with quiet_setup():
        return Sampler(base_model_from_args(args, adapters), backend=args.backend, adapters=adapters,
                       dtype=args.dtype, allow_base_mismatch=args.allow_base_mismatch, batch_size=args.batch_size,
                       gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                       max_lora_rank=args.max_lora_rank, lora=lora, **server)


def write_json(path: str | Path, data: dict) -> Path:
    """A result file, its folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """A result table on the terminal (floats to 2 decimals, missing values as a dash)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*header)
    for row in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else ("–" if v is None else str(v)) for v in row])
    Console().print(table)


def scorer_from_args(args):
    """The diversity scorer with its spaCy parser and sentence encoder loaded; their progress bars and
    warnings are shown only if both load."""
    from qempo_lite.console import quiet_setup

    from .metrics import PROTOCOL_SAMPLES, DiversityScorer

    sizes = {k: None for k in PROTOCOL_SAMPLES} if args.sample_size == "all" else None
    scorer = DiversityScorer(args.spacy_model, args.encoder, sample_sizes=sizes, seed=args.diversity_seed,
                             device=args.device, encoder_dtype=args.encoder_dtype)
    with quiet_setup():
        scorer.load("parser")
        scorer.load("encoder")
    return scorer


def diversity_result(scorer, scores: dict, samples: str) -> dict:
    """The JSON of 'eval diversity': the protocol and the models named at the top, for reports and model cards."""
    return {"kind": "diversity", **scorer.models(), "encoder_dtype": str(scorer.encoder.dtype).removeprefix("torch."),
            "samples": samples, "sample_sizes": scorer.sample_sizes, "seed": scorer.seed,
            "definition": scorer.definition(), "adapters": scores}


def say_models(result: dict) -> None:
    """Name the protocol and the models a diversity result was scored with."""
    print(f"diversity by protocol {result['protocol']} (Guo et al. 2024) with spaCy '{result['parser']}' and "
          f"encoder '{result['encoder']}' ({result['encoder_dtype']})")


def add_diversity_options(parser: argparse.ArgumentParser, seed_flag: str = "--seed") -> None:
    """The parser, encoder, precision, sample sizes, device and seed of the diversity scores."""
    group = parser.add_argument_group("diversity (Guo et al. 2024's protocol, guo2024)")
    group.add_argument("--spacy-model", help="installed spaCy pipeline with a parser (default: en_core_web_sm, else "
                                             "an installed English one; $QEMPO_SPACY_MODEL)")
    group.add_argument("--encoder", help="sentence-transformers model id or directory (default: all-mpnet-base-v2, "
                                         "else an installed stand-in when it cannot be had; $QEMPO_ENCODER)")
    group.add_argument("--encoder-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                       help="encoder precision; auto: bfloat16 where the device computes it natively (auto)")
    group.add_argument("--sample-size", choices=("protocol", "all"), default="protocol",
                       help="protocol: 40,000 n-grams per order, 3,000 sentences (syntactic), 2,000 (semantic), "
                            "seeded, as Guo et al.; all: every n-gram and sentence (protocol)")
    group.add_argument("--device", help="device of the sentence encoder (default: automatic)")
    group.add_argument(seed_flag, dest="diversity_seed", type=int, default=42,
                       help="seed of the protocol's samples (42, as Guo et al.'s scripts)")


def extra_body(args) -> dict | None:
    """--extra-body parsed as a JSON object (None when not given)."""
    if not args.extra_body:
        return None
    try:
        extra_body = json.loads(args.extra_body)
    except json.JSONDecodeError as err:
        raise QempoError(f"--extra-body is not JSON ({err.msg}); pass an object such as "
                         "'{\"structured_outputs\": {\"regex\": \"...\"}}'") from None
    if not isinstance(extra_body, dict):
        raise QempoError("--extra-body must be a JSON object")
    return extra_body


def add_judge_options(parser, *, required: bool, prefix: str = "") -> None:
    """The judge's endpoint and request options, shared by 'eval judge' and 'eval table2' (whose own
    --max-new-tokens makes it prefix the judge's per-prompt and max-tokens options with ``judge-``)."""
    parser.add_argument("--judge-url", required=required, help="OpenAI-compatible base URL, e.g. "
                                                                "https://api.openai.com/v1")
    parser.add_argument("--judge-model", required=required, help="judge model name, e.g. gpt-4o-2024-08-06 (the "
                                                                  "paper's)")
    parser.add_argument("--api-key-env", help="environment variable holding the key (default: QEMPO_JUDGE_API_KEY, "
                                              "then OPENAI_API_KEY); the key is never printed")
    parser.add_argument("--judge-prompts", default="mtbench", help="MT-Bench judge_prompts.jsonl ('mtbench' default)")
    parser.add_argument(f"--{prefix}per-prompt", type=positive_int,
                        help="judge only the first K samples of each prompt and turn (default: all)")
    parser.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight at once (8)")
    parser.add_argument(f"--{prefix}max-tokens", type=positive_int, default=1024,
                        help="longest judgment in tokens (1024)")
    parser.add_argument("--judge-temperature", type=float, default=0.0, help="judge sampling temperature (0)")
    parser.add_argument("--extra-body", help="JSON object sent with every request, e.g. a server's structured-output "
                                             "options")


__all__ = ["adapters_from_args", "add_diversity_options", "add_judge_options", "add_model_options",
           "argparse_number", "base_model_from_args", "check_output", "diversity_result", "extra_body",
           "positive_int", "print_table", "sampler_from_args", "say_models", "scorer_from_args", "temperature",
           "top_p", "write_json"]
