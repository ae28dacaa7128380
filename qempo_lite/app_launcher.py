"""``qempo-lite app``: open the Gradio app comparing adapters side by side.

With no arguments it opens on the offline demo's base model and adapters (``./qempo-demo``,
written by ``qempo-lite demo``), or says how to make them. It binds 127.0.0.1 unless
``--host`` says otherwise and never creates a share link.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .app import DEFAULT_DEMO_DIR, JudgeSettings, choose_backend, discover_settings, launch_app
from .console import ArgumentParser, input_read
from .errors import QempoError


def build_parser() -> ArgumentParser:
    from .rollout import serving_engine_names

    parser = ArgumentParser(prog="qempo-lite app", description=__doc__.split("\n\n")[0])
    models = parser.add_argument_group("models")
    models.add_argument("--base-model", help="base model directory or Hub id (default: the demo's)")
    models.add_argument("--adapter", action="append", default=[], metavar="DIR_OR_HUB_ID",
                        help="an adapter to offer (repeatable; the demo's adapters are added when found)")
    models.add_argument("--demo-dir", default=DEFAULT_DEMO_DIR, help=f"demo output directory (default: ./{DEFAULT_DEMO_DIR})")
    models.add_argument("--backend", choices=("auto", *serving_engine_names()), default="auto",
                        help="sampling backend: vllm (one engine, multi-LoRA), hf (transformers), vllm_server (a "
                             "running server of the base model, --vllm-server-url), or auto: vllm on a GPU when "
                             "installed, transformers on a CPU (the page says which serves)")
    models.add_argument("--vllm-server-url", metavar="URL",
                        help="vllm_server: the server's URL, e.g. http://127.0.0.1:8000 (qempo-lite serve BASE)")
    models.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vLLM's memory fraction (on the CPU backend: of CPU memory)")
    models.add_argument("--max-model-len", type=int, default=None,
                        help="vLLM's context length (default: the sampler's, 4096; lower it for short-context models)")
    safety = parser.add_argument_group("safety")
    safety.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    safety.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    safety.add_argument("--allowed-root", action="append", default=None, metavar="DIR",
                        help="local models and adapters typed in the page must lie under one of these (repeatable; "
                             "default: the working directory)")
    safety.add_argument("--no-hub", action="store_true",
                        help="refuse Hub ids typed in the page: serve local directories only")
    safety.add_argument("--max-samples", type=int, default=32, help="most samples per adapter (default: 32)")
    safety.add_argument("--max-new-tokens", type=int, default=1024, help="most new tokens per sample (default: 1024)")
    safety.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="most prompt tokens (chat template included), counted before sampling (default: the "
                             "model's context)")
    safety.add_argument("--queue-size", type=int, default=16, help="most requests waiting in the queue (default: 16)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--questions", help="MT-Bench question.jsonl to pick prompts from")
    metrics.add_argument("--spacy-model", help="spaCy pipeline for syntactic diversity (default: en_core_web_sm)")
    metrics.add_argument("--encoder", help="sentence encoder for semantic diversity, name or directory "
                                           "(default: sentence-transformers/all-mpnet-base-v2)")
    metrics.add_argument("--judge-url", help="OpenAI-compatible endpoint of an LLM judge (enables judge scores)")
    metrics.add_argument("--judge-model", help="the judge's model name at --judge-url")
    metrics.add_argument("--judge-api-key-env", default=None, metavar="VAR",
                         help="environment variable holding the judge's API key (default: QEMPO_JUDGE_API_KEY, "
                              "else OPENAI_API_KEY); the key itself is never shown")
    return parser


def settings_from_args(args: argparse.Namespace):
    if args.max_samples < 1 or args.max_new_tokens < 1 or args.queue_size < 1 or (
            args.max_prompt_tokens is not None and args.max_prompt_tokens < 1):
        raise QempoError("--max-samples, --max-new-tokens, --max-prompt-tokens and --queue-size must be positive; "
                         "pass larger values")
    if bool(args.judge_url) != bool(args.judge_model):
        raise QempoError("--judge-url and --judge-model go together; pass both or neither")
    for option, named in [("--base-model", args.base_model)] + [("--adapter", a) for a in args.adapter]:
        if named and not Path(named).expanduser().exists() and _looks_like_a_path(named):
            raise QempoError(f"{option} {named} does not exist; pass an existing directory or a Hub id (OWNER/NAME)")
        if named and Path(named).expanduser().exists() and not Path(named).expanduser().is_dir():
            raise QempoError(f"{option} {named} is a file; pass a directory or a Hub id (OWNER/NAME)")
    from .rollout.server import server_url_options

    sampler_options = server_url_options(args.backend, args.vllm_server_url)
    if args.gpu_memory_utilization is not None:
        sampler_options["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.max_model_len is not None:
        sampler_options["max_model_len"] = args.max_model_len
    judge = JudgeSettings(args.judge_url, args.judge_model, args.judge_api_key_env) if args.judge_url else None
    return discover_settings(
        demo_dir=args.demo_dir, base_model=args.base_model, adapters=args.adapter, allowed_roots=args.allowed_root,
        questions=args.questions, backend=args.backend, sampler_options=sampler_options,
        spacy_model=args.spacy_model, encoder=args.encoder, judge=judge, max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens, queue_size=args.queue_size,
        allow_hub=not args.no_hub,
    )


def _looks_like_a_path(name: str) -> bool:
    """A Hub id is OWNER/NAME; anything else (absolute, relative with ./ or ~, deeper) names a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    input_read()
    settings = settings_from_args(args)
    # Gradio's own banner suggests share=True, which this app never uses: print the address instead.
    page, url = launch_app(settings, host=args.host, port=args.port, prevent_thread_lock=True, quiet=True)
    print(f"qempo-lite app running at {url} (Ctrl+C to stop)", flush=True)
    print(f"sampling backend: {choose_backend(settings.backend)[1]}", flush=True)
    page.block_thread()
    return 0
