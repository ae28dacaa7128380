"""Where the app may read: typed paths and Hub ids checked against the allowed roots, and messages
that name no server path beyond what the user typed."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..adapters import ANYWHERE, PICKLE_SUFFIXES, check_adapter_files, read_metadata, safetensors_header
from ..errors import QempoError, one_line
from ..hub import HUB_ID

MAX_PATH_CHARS = 1024  # longer typed paths are refused before they reach the file system
MAX_FILES_CHECKED = 10_000  # entries of a model directory checked against the allowed roots
_PATH_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shown(value: str, limit: int = 80) -> str:
    """A typed value as messages show it: control characters escaped, long ones shortened."""
    text = _PATH_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    return text if len(text) <= limit else f"{text[: limit - 21]}…{text[-20:]} ({len(value):,} characters)"


def _check_typed(value: Any, what: str) -> str:
    """A typed path or id as a clean string; one-line refusals for what the file system would choke on."""
    if not isinstance(value, str):
        raise QempoError(f"{what} must be a directory path or a Hub id, got {type(value).__name__}")
    value = value.strip()
    if "\x00" in value:
        raise QempoError(f"{what} {shown(value)} contains a NUL byte; type a directory path or a Hub id")
    if _PATH_CONTROL.search(value):
        raise QempoError(f"{what} {shown(value)} contains control characters; type a directory path or a Hub id")
    if len(value) > MAX_PATH_CHARS or any(len(part.encode()) > 255 for part in value.split("/")):
        raise QempoError(f"{what} {shown(value)} is too long for a path; type a directory path or a Hub id")
    return value


def _is_hub_id(value: str, allow_hub: bool, what: str) -> bool:
    hub = bool(HUB_ID.match(value)) and ".." not in value and not os.path.lexists(os.path.expanduser(value))
    if hub and not allow_hub:
        raise QempoError(f"{what} {value} looks like a Hub id, and this app serves local directories only "
                         "(--no-hub); pass a directory under an allowed root")
    return hub


def _root_of(path: Path, roots: list[Path]) -> Path | None:
    return next((root for root in roots if path == root or path.is_relative_to(root)), None)


def _under_roots(value: str, roots: list[Path], what: str) -> tuple[Path, Path]:
    """(the resolved directory, the allowed root holding it). Messages name only what was typed."""
    # resolve() follows symlinks, so a link under a root pointing elsewhere is refused too. Whether
    # something outside the roots exists is never told: "outside" comes before "not found".
    try:
        path = Path(value).expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13), an unreadable parent
        raise QempoError(f"{what} {shown(value)} cannot be resolved (a symlink loop?); type a directory path") from None
    root = _root_of(path, roots)
    if root is None:
        raise QempoError(f"{what} {shown(value)} is outside the allowed roots; move it under one of them or restart "
                         "the app with --allowed-root DIR")
    try:
        path.stat()
    except FileNotFoundError:
        raise QempoError(f"{what} {shown(value)} does not exist; type an existing directory") from None
    except (OSError, RuntimeError):
        raise QempoError(f"{what} {shown(value)} cannot be read (a symlink loop?); type a directory path") from None
    if not path.is_dir():
        raise QempoError(f"{what} {shown(value)} is not a directory; pick a directory saved with save_pretrained")
    return path, root


def check_files_inside(directory: Path, roots: list[Path], what: str) -> None:
    """Every file and folder in ``directory`` (recursively, links not followed) must resolve
    under an allowed root: a weights file linked to one elsewhere is refused, as are broken
    links and loops. ``what`` names the directory in messages (what the user typed)."""
    checked = 0
    for folder, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            checked += 1
            if checked > MAX_FILES_CHECKED:
                raise QempoError(f"{what} holds more than {MAX_FILES_CHECKED:,} files; pick a model or adapter "
                                 "directory")
            entry = Path(folder, name)
            relative = entry.relative_to(directory)
            try:
                real = entry.resolve(strict=True)
            except (OSError, RuntimeError):
                raise QempoError(f"{what}: {shown(str(relative))} is a broken or looping symlink; remove it or "
                                 "replace it with the file itself") from None
            if _root_of(real, roots) is None:
                raise QempoError(f"{what}: {shown(str(relative))} is a symlink to a file outside the allowed roots; "
                                 "copy the file in instead of linking it")


def _check_base_weights(path: Path, what: str) -> None:
    """A local base model must bring safetensors weights whose headers parse (no pickles are loaded)."""
    weights = sorted(p for p in path.iterdir() if p.name.endswith(".safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickled weights ({', '.join(pickled[:3])})" if pickled else "no .safetensors weights"
        raise QempoError(f"{what} has {found}; the app loads safetensors only: re-save the model with "
                         "save_pretrained(..., safe_serialization=True)")
    for file in weights:
        try:
            safetensors_header(file, f"{what}: {file.name}")
        except QempoError as err:
            raise QempoError(str(err).replace("re-save the adapter", "re-save the model")) from None


def resolve_base_model(value: str, roots: list[Path], allow_hub: bool = True) -> str:
    """A local model directory under an allowed root (every file in it too, safetensors
    weights), or a Hub model id (unless ``allow_hub`` is off)."""
    value = _check_typed(value or "", "base model")
    if not value:
        raise QempoError("no base model selected; pick one or type a model directory or Hub id")
    if _is_hub_id(value, allow_hub, "base model"):
        return value
    path, _ = _under_roots(value, roots, "base model")
    what = f"base model {shown(value)}"
    check_files_inside(path, roots, what)
    if not (path / "config.json").is_file():
        raise QempoError(f"{what} is not a model directory (no config.json); pick a directory saved with "
                         "save_pretrained or a Hub model id")
    _check_base_weights(path, what)
    return str(path)


def resolve_adapter(value: str, roots: list[Path], allow_hub: bool = True) -> Path:
    """A safetensors PEFT adapter directory under an allowed root (every file in it too), whose
    weights are LoRA weights matching its adapter_config.json, or one fetched from the Hub."""
    value = _check_typed(value, "adapter")
    if _is_hub_id(value, allow_hub, "adapter"):
        return _fetch_hub_adapter(value)
    path, root = _under_roots(value, roots, "adapter")
    what = f"adapter {shown(value)}"
    check_files_inside(path, roots, what)
    check_adapter_files(path, root, what)
    return path


def _fetch_hub_adapter(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        # Only the adapter's safetensors and its JSON files: never pickles, never code.
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as err:  # noqa: BLE001 - any Hub failure is the user's to fix (id, token, network)
        raise QempoError(f"adapter {repo_id} could not be fetched from the Hub ({first_line(err)}); "
                         "check the id, your access and the network, or pass a local directory") from None
    # A snapshot's files are links into its repository's cache folder (models--owner--name): that is its root.
    repository = path.resolve().parents[1]
    check_files_inside(path, [repository], f"adapter {repo_id}")
    check_adapter_files(path, repository, f"adapter {repo_id}")
    return path


def adapter_metadata(path: Path) -> dict:
    """``method`` and ``coefficients`` from the adapter's ``qempo_lite.json`` ({} when absent or unreadable)."""
    try:
        # resolve_adapter has checked where every file of the directory leads.
        data = read_metadata(path, ANYWHERE)
    except QempoError:  # not UTF-8 JSON, not an object: the column is shown without the method
        return {}
    return {key: data[key] for key in ("method", "mode", "coefficients", "base_model") if key in data}


def first_line(err: BaseException) -> str:
    """The error's message on one line (validation errors put the cause on their second line)."""
    return one_line(err, lines=4)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"(),;:]+)")


def scrub(text: str, typed: dict[str, str] | None = None) -> str:
    """``text`` with the server paths the user typed as they typed them, and any other absolute
    path (a library's message may carry one) as ``<path>``."""
    for real, label in sorted((typed or {}).items(), key=lambda kv: -len(kv[0])):
        if real:
            text = text.replace(real, label)
    return _ABSOLUTE_PATH.sub("<path>", text)
