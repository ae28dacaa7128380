"""A trained adapter directory: its files, ``qempo_lite.json``, and the checks every reader applies.

An adapter directory is PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``)
plus ``qempo_lite.json``, the run's record (method, coefficients, base model, data). The Hub
push, the app and the evaluation sampler all check adapters here, and every check fails the
same way: a QempoError whose one line names the file and the fix. A caller that can do
without a file (the app showing a column without its method) catches that error explicitly.

Files are read through :func:`contained_file`: a symlink that leaves ``root`` (default: the
directory itself), a broken link or a loop is refused. Weights are safetensors only, checked
from their header without loading them.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import QempoError

logger = logging.getLogger("qempo_lite")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "qempo_lite.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
MAX_JSON_BYTES = 10_000_000  # metadata files are small; anything bigger is not ours
# The root for a directory the user named on their own machine: its links may lead anywhere
# (a Hub cache snapshot links into the cache), but must resolve.
ANYWHERE = Path("/")
_SAFETENSORS_FIX = "re-save the adapter with save_pretrained(..., safe_serialization=True)"

# ---------------------------------------------------------------- files


def contained_file(folder: Path, name: str, root: Path | None = None, label: str | None = None) -> Path | None:
    """The real file behind ``folder/name`` (None when there is none).

    Refused with QempoError: a symlink whose target leaves ``root`` (default: ``folder``), a
    broken or looping link, and anything that is not a regular file. Messages name the
    folder as ``label`` (default: the folder's path).
    """
    folder = Path(folder)
    root = Path(root or folder).resolve()
    label = label or str(folder)
    path = folder / name
    if not path.is_symlink() and not path.exists():
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise QempoError(f"{name} in {label} is a broken or looping symlink; replace it with the file itself") from None
    if not real.is_relative_to(root):
        where = "the adapter directory" if root == folder.resolve() else "the allowed directories"
        raise QempoError(f"{name} in {label} is a symlink to a file outside {where}; copy the file in instead of "
                         f"linking it (nothing outside {where} is read or uploaded)")
    if not real.is_file():
        raise QempoError(f"{name} in {label} is not a regular file; replace it with the file itself")
    return real


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """A small UTF-8 JSON object from ``path``, or a one-line QempoError naming ``what`` and ``fix``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise QempoError(f"{what} cannot be read ({err.strerror or type(err).__name__}); {fix}") from None
    if len(data) > MAX_JSON_BYTES:
        raise QempoError(f"{what} is larger than {MAX_JSON_BYTES:,} bytes; {fix}")
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise QempoError(f"{what} is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); {fix}") from None
    except json.JSONDecodeError as err:
        raise QempoError(f"{what} is not valid JSON ({err.msg} at line {err.lineno}); {fix}") from None
    if not isinstance(value, dict):
        raise QempoError(f"{what} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def check_adapter_dir(adapter_dir: Path, root: Path | None = None, label: str | None = None) -> None:
    """Refuse anything that is not a safetensors PEFT adapter directory whose files stay inside
    ``root`` (default: the directory itself; a Hub snapshot passes its repository's cache folder)."""
    adapter_dir = Path(adapter_dir)
    label = label or str(adapter_dir)
    if not adapter_dir.is_dir():
        raise QempoError(f"{label} is not a directory; pass the output_dir of a training run")
    if contained_file(adapter_dir, CONFIG_FILE, root, label) is None:
        raise QempoError(f"{label} has no {CONFIG_FILE}; pass a directory saved by a PEFT adapter")
    if contained_file(adapter_dir, WEIGHTS_FILE, root, label) is None:
        raise QempoError(f"{label} has no {WEIGHTS_FILE} (pickled weights are never loaded); {_SAFETENSORS_FIX}")
    pickled = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise QempoError(f"{label} holds pickled weights ({', '.join(pickled)}); only safetensors are used: "
                         f"{_SAFETENSORS_FIX} and remove them")


def adapter_config(adapter_dir: Path, root: Path | None = None, label: str | None = None) -> dict:
    """``adapter_config.json`` as a dict (QempoError when it is missing or not a JSON object)."""
    label = label or str(adapter_dir)
    path = contained_file(adapter_dir, CONFIG_FILE, root, label)
    if path is None:
        raise QempoError(f"{label} has no {CONFIG_FILE}; pass a directory saved by a PEFT adapter")
    return read_json_object(path, f"{label}/{CONFIG_FILE}", "re-save the adapter with save_pretrained")


def read_metadata(adapter_dir: Path, root: Path | None = None, label: str | None = None) -> dict:
    """The run's ``qempo_lite.json`` (method, coefficients, base model, data), or ``{}`` when absent."""
    label = label or str(adapter_dir)
    path = contained_file(adapter_dir, METADATA_FILE, root, label)
    if path is None:
        return {}
    return read_json_object(path, f"{label}/{METADATA_FILE}", "fix or remove it")


def recorded_base_model(adapter_dir: Path, root: Path | None = None, label: str | None = None) -> str | None:
    """The base model an adapter was trained on: ``qempo_lite.json``'s, else PEFT's record."""
    base = (read_metadata(adapter_dir, root, label).get("base_model")
            or adapter_config(adapter_dir, root, label).get("base_model_name_or_path"))
    return base if isinstance(base, str) and base.strip() else None


# ---------------------------------------------------------------- the weights


def safetensors_header(path: Path, what: str, fix: str | None = _SAFETENSORS_FIX) -> dict[str, dict]:
    """The tensors a safetensors file declares (name -> dtype, shape, data_offsets), checked
    against the file's size: neither truncated nor padded. QempoError when it is not a whole
    safetensors file: ``what`` and the problem, then ``fix`` (None: no fix)."""

    def bad(problem: str) -> QempoError:
        return QempoError(f"{what} {problem}" + (f"; {fix}" if fix else ""))

    size = path.stat().st_size
    if size < 8:
        raise bad(f"is not a safetensors file ({size} bytes)")
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise bad("is not a safetensors file (its header length does not fit the file)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise bad("is not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        well_formed = (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                       and 0 <= offsets[0] <= offsets[1] and isinstance(shape, list)
                       and all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(entry.get("dtype"), str))
        if not well_formed:
            raise bad(f"is not a safetensors file (tensor {name[:80]!r} is malformed)")
        end = max(end, offsets[1])
    if 8 + length + end != size:
        raise bad(f"is truncated or padded ({size:,} bytes, its header describes {8 + length + end:,})")
    return header


_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
                  ".lora_magnitude_vector": None, ".lora_magnitude_vector.weight": None}


def _targets(module: str, targets: Any) -> bool:
    """PEFT's matching of ``target_modules``: a regex over the full name, or a list of name suffixes."""
    if targets in (None, "all-linear"):
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _rank(module: str, config: dict) -> int | None:
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return rank
    return config.get("r")


def max_rank(config: dict) -> int:
    """The largest LoRA rank of an ``adapter_config.json``: ``r`` or any of its ``rank_pattern``."""
    return max([int(config.get("r") or 8), *map(int, (config.get("rank_pattern") or {}).values())])


def check_lora_weights(weights: Path, config: dict, what: str) -> dict[str, dict]:
    """Refuse weights that are not LoRA weights of this ``adapter_config.json``; returns their header.

    Checks: the safetensors header parses and matches the file size; at least one LoRA A/B
    pair; every LoRA module is one of ``target_modules`` and has the configured rank
    (``r`` or its ``rank_pattern``); any other tensor belongs to ``modules_to_save``.
    """
    fix = "pass the directory written by the training run, unmodified"
    if config.get("peft_type", "LORA") != "LORA":
        raise QempoError(f"{what} is a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    header = safetensors_header(weights, what)
    kinds: dict[str, set] = {}
    saved = list(config.get("modules_to_save") or [])
    for name, entry in header.items():
        key = name.removeprefix("base_model.model.")
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            if not any(f".{m}." in f".{key}" for m in saved) and "trainable_tokens" not in key:
                raise QempoError(f"{what} holds tensor {name[:120]!r}, which is neither a LoRA weight nor in "
                                 f"modules_to_save; {fix}")
            continue
        module, kind = key[: -len(suffix)], _LORA_SUFFIXES[suffix]
        if not _targets(module, config.get("target_modules")):
            raise QempoError(f"{what}: tensor {name[:120]!r} is on {module}, which is not in target_modules "
                             f"{config.get('target_modules')!r} of {CONFIG_FILE}; {fix}")
        shape, rank = entry["shape"], _rank(module, config)
        rank_dim = 0 if kind == "A" else 1  # A: r x in (r x vocab), B: out x r (dim x r)
        if kind and isinstance(rank, int) and len(shape) == 2 and shape[rank_dim] != rank:
            raise QempoError(f"{what}: tensor {name[:120]!r} has rank {shape[rank_dim]}, but {CONFIG_FILE} says "
                             f"r={rank}; {fix}")
        if kind:
            kinds.setdefault(module, set()).add(kind)
    if not any(k == {"A", "B"} for k in kinds.values()):
        raise QempoError(f"{what} holds no LoRA weights (no lora_A / lora_B pair); {fix}")
    return header


def check_finite_weights(weights: Path, what: str) -> None:
    """Refuse weights holding a NaN or an infinity (a diverged run): QempoError naming the first such tensor."""
    import torch
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as tensors:
        for name in tensors.keys():
            tensor = tensors.get_tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise QempoError(f"{what}: tensor {name[:120]!r} holds NaN or infinite values (the training run "
                                 "diverged); train again with a lower learning rate or coefficients")


def check_adapter_files(adapter_dir: Path, root: Path | None = None,
                        label: str | None = None) -> tuple[dict, Path, dict[str, dict]]:
    """The whole file check of an adapter directory: (its config, the real weights file, their header).

    A safetensors PEFT adapter whose files stay under ``root`` (:func:`check_adapter_dir`) and
    whose weights are LoRA weights of its config (:func:`check_lora_weights`).
    """
    label = label or str(adapter_dir)
    check_adapter_dir(adapter_dir, root, label)
    config = adapter_config(adapter_dir, root, label)
    weights = contained_file(adapter_dir, WEIGHTS_FILE, root, label)
    return config, weights, check_lora_weights(weights, config, f"{label}: {WEIGHTS_FILE}")


# ---------------------------------------------------------------- does it fit a base model


def same_base_model(recorded: str, base: str) -> bool:
    """Do two base-model references name the same model?

    Equal strings, the same local directory, or the same final path component (a local copy of
    a Hub model, ``/models/Llama-3.2-1B`` for ``meta-llama/Llama-3.2-1B``).
    """
    a, b = str(recorded).rstrip("/"), str(base).rstrip("/")
    if a == b:
        return True
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return Path(a).name.lower() == Path(b).name.lower()


def adapter_shape_problems(header: Mapping[str, dict], base_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Where an adapter's weights (their safetensors ``header``) do not fit the base model's
    parameters (empty: they all fit).

    A LoRA on a linear layer W (out × in) has A: r × in and B: out × r; on an embedding
    E (vocab × dim), A: r × vocab and B: dim × r; a fully saved module (``modules_to_save``)
    has the base parameter's shape.
    """
    problems = []
    for key, entry in header.items():
        shape = tuple(entry["shape"])
        name = key.removeprefix("base_model.model.")
        for suffix, base_dim, dim, what in ((".lora_A.weight", 1, 1, "input size"),
                                            (".lora_B.weight", 0, 0, "output size"),
                                            (".lora_embedding_A", 0, 1, "vocabulary"),
                                            (".lora_embedding_B", 1, 0, "embedding size")):
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                base = base_shapes.get(module + ".weight")
                if base is None:
                    problems.append(f"{module} is not in the base model")
                elif len(base) != 2 or len(shape) != 2:
                    pass  # convolutions and the like: nothing simple to compare
                elif base[base_dim] != shape[dim]:
                    problems.append(f"{module} {what} is {shape[dim]} in the adapter, {base[base_dim]} in the base")
                break
        else:
            if name in base_shapes and tuple(base_shapes[name]) != shape:
                problems.append(f"{name} is {list(shape)} in the adapter, {list(base_shapes[name])} in the base")
        if len(problems) >= 3:  # enough to make the point
            break
    return problems


def _tokenizer_problem(adapter_dir: Path, vocab_size: int | None) -> str | None:
    """A tokenizer saved with the adapter that has more tokens than the base's embedding."""
    if vocab_size is None or not (adapter_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        size = len(AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=False))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is the PEFT loader's problem, not a base mismatch
        return None
    return f"its tokenizer has {size} tokens, the base's vocabulary {vocab_size}" if size > vocab_size else None


def check_adapter(name: str, path: str | Path, base_model: str, *,
                  base_shapes: Mapping[str, tuple[int, ...]] | None = None, vocab_size: int | None = None,
                  allow_base_mismatch: bool = False) -> Path:
    """Refuse an adapter that cannot be served on ``base_model``; returns its directory.

    Raises QempoError when the directory fails :func:`check_adapter_files` (its links may lead
    anywhere on this machine, but must resolve), when its weights are not finite, when it
    records another base model (unless ``allow_base_mismatch``: then only a warning), and
    always when its weight shapes do not fit ``base_shapes`` (parameter name -> shape of the
    base model).
    """
    adapter_dir = Path(path).expanduser()
    label = f"adapter {name!r} at {adapter_dir}"
    _, weights, header = check_adapter_files(adapter_dir, ANYWHERE, label)
    check_finite_weights(weights, f"{label}: {WEIGHTS_FILE}")
    recorded = recorded_base_model(adapter_dir, ANYWHERE, label)
    problems = adapter_shape_problems(header, base_shapes) if base_shapes else []
    token_problem = _tokenizer_problem(adapter_dir, vocab_size)
    problems += [token_problem] if token_problem else []
    trained_for = recorded or "another base model"
    if problems:
        # The fix before the shapes, and three of those: the error line is cut at 300 characters.
        shown = problems[:3] + ([f"and {len(problems) - 3} more"] if len(problems) > 3 else [])
        raise QempoError(f"adapter {name!r} was trained for base {trained_for}, not {base_model}: pass the base model "
                         f"it was trained on (its weights do not fit: {'; '.join(shown)})")
    if recorded and not same_base_model(recorded, base_model):
        if not allow_base_mismatch:
            raise QempoError(f"adapter {name!r} was trained for base {recorded}, not {base_model}; pass that base "
                             "model, or allow_base_mismatch (--allow-base-mismatch) if it is a copy of the same model")
        logger.warning("adapter %r was trained for base %s; serving it on %s as asked", name, recorded, base_model)
    return adapter_dir
