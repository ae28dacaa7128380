"""The Gradio app: sample adapters of one base model side by side and compare their diversity.

One column per adapter (or the base model with no adapter): its samples for one prompt, and
under them the column's lexical / syntactic / semantic diversity (x100, as in the paper's
Table 2), distinct-1/2, mean length and, when a judge endpoint is configured, the mean judge
score. A grouped bar chart compares the columns.

The base model is loaded once (a :class:`~qempo_lite.evaluate.sampling.Sampler`, cached per
base model) and serves every selected adapter: one vLLM engine with multi-LoRA when vLLM is
installed, ``transformers`` generate otherwise.

Safe by default: the server binds 127.0.0.1, never opens a share link, accepts no uploads
(Gradio's ``max_file_size`` is 1 KB) and queues requests one at a time. Local paths typed into
the UI must lie under an allowed root (the working directory unless ``--allowed-root`` says
otherwise; what the command line names is allowed too), and so must every file inside the
directory they name once symlinks are resolved; adapters must be safetensors PEFT
directories whose weights are LoRA weights, base models must have safetensors weights. The
sample count, token budget, prompt length and prompt tokens (``--max-prompt-tokens``,
default: the model's context, counted with the chat template before anything is generated)
are checked here, not only by the sliders. Errors reach the user as one line in the page,
naming no server path beyond what the user typed, never as a stack trace.

``--backend auto`` samples with vLLM on a GPU (when installed) and with transformers on a
CPU, where vLLM's CPU backend would reserve most of the machine's memory up front; the page
says which backend serves.

The logic lives in the package (rather than in ``app/app.py``) so that ``qempo-lite app``
works from a wheel as well as from a source checkout; ``app/app.py`` is a thin script.
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import QempoError, missing_extra
from .evaluate.metrics import METRICS, ColumnScorer
from .adapters import ANYWHERE, PICKLE_SUFFIXES, check_adapter_files, read_metadata, safetensors_header
from .hub import HUB_ID

logger = logging.getLogger("qempo_lite")

BASE = "base"  # the adapter choice meaning "the base model, no adapter"
BASE_LABEL = "base, no adapter"
MAX_COLUMNS = 4
MAX_LOADED_ADAPTERS = 8  # adapters a Sampler keeps loaded between requests
DEFAULT_DEMO_DIR = "qempo-demo"
MAX_PATH_CHARS = 1024  # longer typed paths are refused before they reach the file system
MAX_FILES_CHECKED = 10_000  # entries of a model directory checked against the allowed roots
MAX_UPLOAD_BYTES = 1024  # the page has no upload control: Gradio's upload endpoint takes next to nothing
_PATH_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The demo's adapters, in the order the paper's story reads: the RLHF baseline, then QEMPO.
_DEMO_ORDER = ("dpo", "qempo", "qempo_kl", "spl")

Progress = Callable[[float, str], None]


# ---------------------------------------------------------------- settings


@dataclass
class JudgeSettings:
    """An OpenAI-compatible judge endpoint; the key is read from ``api_key_env``, never shown."""

    base_url: str
    model: str
    api_key_env: str | None = None  # None: $QEMPO_JUDGE_API_KEY, else $OPENAI_API_KEY


@dataclass
class AppSettings:
    """Everything the app needs, resolved from the command line by :func:`discover_settings`."""

    base_models: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    selection: list[str] = field(default_factory=lambda: [BASE])
    prompt: str = ""
    questions: list[dict] = field(default_factory=list)
    questions_note: str = ""
    notice: str = ""
    allowed_roots: list[Path] = field(default_factory=lambda: [Path.cwd().resolve()])
    allow_hub: bool = True
    backend: str = "auto"
    sampler_options: dict = field(default_factory=dict)
    spacy_model: str | None = None
    encoder: str | None = None
    judge: JudgeSettings | None = None
    max_samples: int = 32
    max_new_tokens: int = 1024
    max_prompt_chars: int = 8000
    max_prompt_tokens: int | None = None  # None: the model's context
    queue_size: int = 16


def load_questions(source: str | Path | None = None) -> list[dict]:
    """MT-Bench questions as ``{"id", "category", "prompt"}`` (their first turns).

    ``source`` is a question.jsonl; ``None`` looks for MT-Bench's copy (see
    :func:`qempo_lite.evaluate.mtbench.resolve_mtbench_file`) and gives ``[]`` when there is none.
    """
    from .evaluate import mtbench

    if source is None:
        try:
            rows = mtbench.load_questions(mtbench.MTBENCH)
        except QempoError:
            return []
    else:
        rows = mtbench.load_questions(source)
    return [{"id": str(q.question_id), "category": q.category, "prompt": q.turns[0]} for q in rows]


def _demo_adapters(demo_dir: Path) -> list[Path]:
    adapters_dir = demo_dir / "adapters"
    found = [p for p in sorted(adapters_dir.iterdir()) if (p / "adapter_config.json").is_file()] \
        if adapters_dir.is_dir() else []
    rank = {name: i for i, name in enumerate(_DEMO_ORDER)}
    return sorted(found, key=lambda p: rank.get(p.name, len(rank)))


def find_adapters(roots: list[Path], limit: int = 64) -> list[str]:
    """Adapter directories (holding adapter_config.json) at most two levels under ``roots``."""
    found: list[str] = []
    for root in roots:
        for pattern in ("*/adapter_config.json", "*/*/adapter_config.json"):
            for config in sorted(root.glob(pattern)):
                if config.parent.name.startswith("checkpoint-"):  # a run's intermediate saves
                    continue
                found.append(str(config.parent))
                if len(found) >= limit:
                    return found
    return found


def _unique_paths(values: list[str]) -> list[str]:
    """``values`` without repeats, where two spellings of one directory are one (the first kept)."""
    seen, kept = set(), []
    for value in values:
        key = Path(value).expanduser().resolve() if Path(value).expanduser().exists() else value
        if key not in seen:
            seen.add(key)
            kept.append(value)
    return kept


def discover_settings(*, demo_dir: str | Path = DEFAULT_DEMO_DIR, base_model: str | None = None,
                      adapters: list[str] | None = None, allowed_roots: list[str] | None = None,
                      questions: str | Path | None = None, **options: Any) -> AppSettings:
    """Settings for the app: the command line's model and adapters, else the demo's.

    With neither, the app opens on the demo's base model and adapters when ``demo_dir`` holds
    them, and otherwise says how to make them (``qempo-lite demo``). Directories named here
    are allowed in addition to ``allowed_roots`` (default: the working directory).
    """
    demo_dir = Path(demo_dir)
    roots = [Path(r).expanduser().resolve() for r in (allowed_roots or [os.getcwd()])]
    for root in roots:
        if not root.is_dir():
            raise QempoError(f"--allowed-root {root} is not a directory; pass an existing directory")
    user_roots = list(roots)
    adapters = list(adapters or [])
    base_models = [base_model] if base_model else []
    demo_found = (demo_dir / "base" / "config.json").is_file()
    if demo_found:
        base_models.append(str(demo_dir / "base"))
        adapters += [str(p) for p in _demo_adapters(demo_dir)]
        roots.append(demo_dir.resolve())
    for named in ([base_model] if base_model else []) + list(adapters):
        if Path(named).expanduser().is_dir():
            roots.append(Path(named).expanduser().resolve())
    if base_model:
        notice = ""
    elif demo_found:
        notice = (f"Showing the offline demo in `{demo_dir}`: its tiny base model and the adapters trained on "
                  "*Name a colour*-style prompts. Type another base model or adapter directory to compare your own.")
    else:
        notice = (f"**No model yet.** The demo's models were not found in `{demo_dir}`. Run `qempo-lite demo` "
                  "(a few minutes on a CPU) and then `qempo-lite app`, or start the app with "
                  "`qempo-lite app --base-model MODEL --adapter DIR ...`.")
    adapters = _unique_paths(adapters + find_adapters(user_roots))
    question_rows = load_questions(questions)
    # The demo's models only know its own prompts; a real model gets the first MT-Bench question.
    prompt = question_rows[0]["prompt"] if question_rows else ""
    if demo_found and not base_model:
        from .demo import TASKS

        prompt = TASKS[0][0][0]
    questions_note = "" if question_rows else "No MT-Bench questions file found; pass --questions PATH to pick one."
    selection = [BASE] + adapters[: MAX_COLUMNS - 1]
    return AppSettings(base_models=list(dict.fromkeys(base_models)), adapters=adapters, selection=selection,
                       prompt=prompt, questions=question_rows, questions_note=questions_note, notice=notice,
                       allowed_roots=list(dict.fromkeys(roots)), **options)


# ---------------------------------------------------------------- paths


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
        raise QempoError(f"adapter {repo_id} could not be fetched from the Hub ({_first_line(err)}); "
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


def _first_line(err: BaseException) -> str:
    """The error's message on one line (validation errors put the cause on their second line)."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines()[:4])
    return text[:300] if text else type(err).__name__


# ---------------------------------------------------------------- sampling


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, why): what ``--backend`` means on this machine, and the line that tells the user.

    ``auto`` is vLLM on a GPU when it is installed, and transformers on a CPU: vLLM's CPU
    backend reserves a fixed share of the machine's memory when it starts (0.9 unless told
    otherwise) and refuses to start when that much is not free, which a machine running
    anything else rarely has. ``--backend vllm`` asks for it anyway.
    """
    import importlib.util

    if requested == "vllm":
        return "vllm", "vLLM (--backend vllm)"
    if requested == "hf":
        return "hf", "transformers (--backend hf)"
    if requested != "auto":
        raise QempoError(f"--backend {requested!r} is not one of auto, vllm, hf")
    if not _gpu_available():
        return "hf", ("transformers on the CPU (--backend auto: no GPU here, and vLLM's CPU backend would reserve most "
                      "of this machine's memory; --backend vllm --gpu-memory-utilization F to use it anyway)")
    if importlib.util.find_spec("vllm") is None:
        return "hf", "transformers on the GPU (--backend auto: vLLM is not installed; pip install 'qempo-lite[vllm]')"
    return "vllm", "vLLM on the GPU (--backend auto)"


class SamplerCache:
    """One :class:`Sampler` (base model loaded once) reused across requests.

    A request for another base model closes the previous one first: two base models rarely
    fit in memory together. ``backend`` is resolved once (:func:`choose_backend`);
    ``backend_note`` says which one serves, for the page.
    """

    def __init__(self, backend: str = "auto", **options: Any):
        self.backend, self.backend_note = choose_backend(backend)
        # vLLM's max_loras is how many adapters one batch may mix: all the columns at once.
        self.options = {"max_loras": MAX_COLUMNS, **options}
        if self.backend == "vllm":
            # Pickled (.bin) weights are never loaded, also when vLLM fetches a Hub model itself.
            self.options.setdefault("load_format", "safetensors")
        else:  # engine settings that only vLLM takes
            for key in ("max_loras", "gpu_memory_utilization", "max_model_len"):
                self.options.pop(key, None)
        self._key: str | None = None
        self._sampler = None
        self.lock = threading.Lock()

    def get(self, base_model: str, label: str | None = None):
        """The Sampler of ``base_model``; messages name it ``label`` (what the user typed)."""
        label = label or base_model
        if self._key != base_model:
            self.close()
            try:
                from .evaluate.sampling import Sampler
            except ImportError as err:
                raise missing_extra("qempo_lite.evaluate.sampling", "eval", _first_line(err)) from None
            try:
                self._sampler = Sampler(base_model, backend=self.backend, **self.options)
            except (OSError, ValueError) as err:
                reason = _scrub(str(err) if isinstance(err, QempoError) else _first_line(err), {base_model: label})
                raise QempoError(f"base model {label} could not be loaded ({reason}); pick a model directory or a "
                                 "Hub id you have access to") from None
            self._key = base_model
        return self._sampler

    def close(self) -> None:
        if self._sampler is not None and hasattr(self._sampler, "close"):
            self._sampler.close()
        self._sampler, self._key = None, None


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"(),;:]+)")


def _scrub(text: str, typed: dict[str, str] | None = None) -> str:
    """``text`` with the server paths the user typed as they typed them, and any other absolute
    path (a library's message may carry one) as ``<path>``."""
    for real, label in sorted((typed or {}).items(), key=lambda kv: -len(kv[0])):
        if real:
            text = text.replace(real, label)
    return _ABSOLUTE_PATH.sub("<path>", text)


def _model_context(sampler) -> int | None:
    """The most tokens the served model takes: vLLM's max_model_len, else the config's positions."""
    if getattr(sampler, "max_model_len", None):
        return int(sampler.max_model_len)
    config = getattr(getattr(sampler, "model", None), "config", None)
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def _free_accelerator_memory() -> None:
    # The half-built batch that ran out is garbage now; hand its memory back for the next request.
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the comparison


class Comparison:
    """What the Generate button and the ``generate`` API endpoint run."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.samplers = SamplerCache(settings.backend, **settings.sampler_options)
        self.scorer = ColumnScorer(settings.spacy_model, settings.encoder)
        self.judge = None
        if settings.judge is not None:
            from .evaluate.judge import Judge

            # Built here so that a malformed URL fails at start-up; nothing is sent until a request.
            self.judge = Judge(settings.judge.base_url, settings.judge.model, api_key_env=settings.judge.api_key_env,
                               max_attempts=2, timeout=60.0)

    def run(self, base_model: str, adapters: list[str], prompt: str, samples: int = 8, temperature: float = 1.0,
            top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
            progress: Progress | None = None) -> dict[str, Any]:
        """Sample ``samples`` completions of ``prompt`` per column and score each column.

        Returns JSON-serialisable data: ``{"ok", "errors", "base_model", "prompt", "settings",
        "columns": [{"name", "adapter", "metadata", "samples": [{"text", "num_tokens"}],
        "metrics", "notes", "error"}], "missing", "seconds"}``. Bad input is reported in
        ``errors`` (and in the column it concerns), never raised.
        """
        progress = progress or (lambda fraction, desc: None)
        start = time.perf_counter()
        result: dict[str, Any] = {"ok": False, "errors": [], "base_model": base_model, "prompt": prompt,
                                  "settings": {}, "columns": [], "missing": {}, "seconds": 0.0}
        labels: dict[str, str] = {}  # resolved path -> what the user typed, for messages
        try:
            settings = self._check_request(adapters, prompt, samples, temperature, top_p, max_new_tokens, seed)
            result["settings"] = settings
            result["columns"] = columns = self._columns(adapters, labels)
            progress(0.02, "loading the base model")
            with self.samplers.lock:
                base = resolve_base_model(base_model, self.settings.allowed_roots, self.settings.allow_hub)
                labels[base] = shown(str(base_model).strip())
                sampler = self.samplers.get(base, labels[base])
                settings["backend"] = sampler.backend  # what "auto" chose
                settings["prompt_tokens"] = self._check_prompt_tokens(sampler, prompt, settings["max_new_tokens"])
                self._sample(sampler, [c for c in columns if c["error"] is None], prompt, settings, progress, labels)
            self._score(columns, progress)
            self._judge_columns(columns, prompt, progress, result["missing"])
        except QempoError as err:
            result["errors"].append(str(err))
        except Exception as err:  # noqa: BLE001 - the page shows one line; the log keeps the traceback
            if _is_out_of_memory(err):
                _free_accelerator_memory()
                result["errors"].append("out of memory while sampling: lower the samples per adapter or the max new "
                                        "tokens, or select fewer adapters")
            else:
                logger.exception("app request failed")
                result["errors"].append(f"unexpected error ({type(err).__name__}: {_scrub(_first_line(err), labels)}); "
                                        "see the server log")
        result["errors"] += [f"{c['name']}: {c['error']}" for c in result["columns"] if c["error"]]
        result["missing"].update(self.scorer.missing)
        result["ok"] = not result["errors"]
        result["seconds"] = round(time.perf_counter() - start, 3)
        progress(1.0, "done")
        return result

    def _check_request(self, adapters, prompt, samples, temperature, top_p, max_new_tokens, seed) -> dict:
        limits = self.settings

        def number(value, name, kind):
            try:
                out = kind(value)
            except (TypeError, ValueError, OverflowError):
                raise QempoError(f"{name} must be a number, got {value!r}") from None
            if kind is int and out != value:
                raise QempoError(f"{name} must be a whole number, got {value!r}")
            if not math.isfinite(out):
                raise QempoError(f"{name} must be finite, got {value!r}")
            return out

        samples = number(samples, "samples per adapter", int)
        if not 1 <= samples <= limits.max_samples:
            raise QempoError(f"samples per adapter must be between 1 and {limits.max_samples}, got {samples}")
        max_new_tokens = number(max_new_tokens, "max new tokens", int)
        if not 1 <= max_new_tokens <= limits.max_new_tokens:
            raise QempoError(f"max new tokens must be between 1 and {limits.max_new_tokens}, got {max_new_tokens}")
        temperature = number(temperature, "temperature", float)
        if not 0 < temperature <= 2:
            raise QempoError(f"temperature must be in (0, 2], got {temperature}")
        top_p = number(top_p, "top-p", float)
        if not 0 < top_p <= 1:
            raise QempoError(f"top-p must be in (0, 1], got {top_p}")
        seed = number(seed, "seed", int)
        if not 0 <= seed < 2**32:
            raise QempoError(f"seed must be between 0 and 2**32 - 1, got {seed}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise QempoError("the prompt is empty; type one or pick an MT-Bench question")
        if len(prompt) > limits.max_prompt_chars:
            raise QempoError(f"the prompt has {len(prompt)} characters, more than the {limits.max_prompt_chars} "
                             "allowed; shorten it")
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
            raise QempoError(f"select between 1 and {MAX_COLUMNS} adapters (or '{BASE}' for the base model)")
        if len(adapters) > MAX_COLUMNS:
            raise QempoError(f"{len(adapters)} adapters selected; select at most {MAX_COLUMNS}")
        return {"samples": samples, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "seed": seed, "backend": self.samplers.backend}

    def _check_prompt_tokens(self, sampler, prompt: str, max_new_tokens: int) -> int:
        """The prompt's tokens (chat template applied), counted before anything is generated and
        refused above ``--max-prompt-tokens`` or when prompt + max new tokens exceed the model's context."""
        count = len(sampler.encode([{"role": "user", "content": prompt}]))
        limit, context = self.settings.max_prompt_tokens, _model_context(sampler)
        if limit is not None and count > limit:
            raise QempoError(f"the prompt is {count:,} tokens, more than the {limit:,} allowed (--max-prompt-tokens); "
                             "shorten it")
        if context is not None and count >= context:
            raise QempoError(f"the prompt is {count:,} tokens, more than this model's context of {context:,} tokens; "
                             "shorten it")
        if context is not None and count + max_new_tokens > context:
            raise QempoError(f"the prompt ({count:,} tokens) and max new tokens ({max_new_tokens:,}) exceed this "
                             f"model's context of {context:,} tokens; lower max new tokens to {context - count:,} "
                             "or shorten the prompt")
        return count

    def _columns(self, adapters: list[str], labels: dict[str, str]) -> list[dict]:
        columns, names = [], set()
        for value in adapters:
            value = str(value).strip()
            column = {"name": "", "adapter": None, "metadata": {}, "samples": [], "metrics": {}, "notes": [],
                      "error": None}
            if value in (BASE, BASE_LABEL):
                column["name"] = "base"
            else:
                column["name"] = shown(Path(value.rstrip("/")).name or value, 60)
                try:
                    path = resolve_adapter(value, self.settings.allowed_roots, self.settings.allow_hub)
                    column["adapter"] = str(path)
                    column["metadata"] = adapter_metadata(path)
                    labels[str(path)] = shown(value)
                except QempoError as err:
                    column["error"] = str(err)
            name, i = column["name"], 2
            while column["name"] in names:  # two runs with the same directory name
                column["name"], i = f"{name} ({i})", i + 1
            names.add(column["name"])
            columns.append(column)
        return columns

    def _sample(self, sampler, columns: list[dict], prompt: str, settings: dict, progress: Progress,
                labels: dict[str, str]) -> None:
        """Fill each column's samples; an adapter the Sampler refuses marks its column only.

        Adapters are keyed by their directory in the Sampler, so a directory loaded by an
        earlier request is reused, and two runs with the same directory name never clash.
        """
        keys = {c["name"]: c["adapter"] or BASE for c in columns}
        stale = [k for k in sampler.adapters if k not in keys.values()]
        if len(sampler.adapters) + len(columns) > MAX_LOADED_ADAPTERS:
            for key in stale:  # keep a long-running app's memory bounded
                sampler.remove_adapter(key)
        for i, column in enumerate(columns):
            if column["adapter"] is not None:
                progress(0.05 + 0.05 * i / len(columns), f"loading adapter {column['name']}")
                try:
                    # Checks it fits this base model (recorded base, weight shapes) before loading.
                    sampler.add_adapter(column["adapter"], column["adapter"])
                except QempoError as err:
                    column["error"] = _scrub(str(err), labels)
        ready = [c for c in columns if c["error"] is None]
        # A directory selected twice is sampled once and shown twice.
        wanted = {keys[c["name"]]: c["adapter"] for c in ready}
        kwargs = {"n": settings["samples"], "temperature": settings["temperature"], "top_p": settings["top_p"],
                  "max_new_tokens": settings["max_new_tokens"], "seed": settings["seed"], "progress": False}
        chat = [[{"role": "user", "content": prompt}]]
        if sampler.backend == "vllm":
            # One call for every column: the engine batches the adapters together (multi-LoRA).
            progress(0.1, f"sampling {len(wanted)} adapter(s)")
            samples = sampler.sample(wanted, chat, **kwargs) if wanted else []
        else:
            samples = []  # transformers samples one adapter at a time anyway: report each
            for i, (key, path) in enumerate(wanted.items()):
                progress(0.1 + 0.5 * i / len(wanted), f"sampling {Path(key).name if path else 'the base model'}")
                samples += sampler.sample({key: path}, chat, **kwargs)
        for column in ready:
            rows = sorted((s for s in samples if s.adapter == keys[column["name"]]), key=lambda s: s.sample_index)
            column["samples"] = [{"text": s.text, "num_tokens": int(s.num_tokens)} for s in rows]

    def _score(self, columns: list[dict], progress: Progress) -> None:
        for i, column in enumerate(columns):
            if column["error"] is None and column["samples"]:
                progress(0.6 + 0.3 * i / len(columns), f"scoring diversity: {column['name']}")
                texts = [s["text"] for s in column["samples"]]
                column["metrics"], column["notes"] = self.scorer.score(texts, [s["num_tokens"] for s in column["samples"]])

    def _judge_columns(self, columns: list[dict], prompt: str, progress: Progress, missing: dict) -> None:
        """Mean MT-Bench single-answer rating (1-10) per column; a judge failure leaves the samples."""
        if self.judge is None:
            return
        for i, column in enumerate(columns):
            if column["error"] is not None or not column["samples"]:
                continue
            if "judge" in missing:  # the endpoint already failed in this request: do not wait on it again
                column["metrics"]["judge"] = None
                column["notes"].append(missing["judge"])
                continue
            progress(0.9 + 0.1 * i / len(columns), f"judging {column['name']}")
            try:
                ratings = self.judge.rate_answers(prompt, [s["text"] for s in column["samples"]])
            except QempoError as err:  # unreachable endpoint, refused key, unknown model
                missing["judge"] = f"judge scores not computed: {err}"
                column["metrics"]["judge"] = None
                column["notes"].append(missing["judge"])
                continue
            rated = [r for r in ratings if r is not None]
            column["metrics"]["judge"] = sum(rated) / len(rated) if rated else None
            if len(rated) < len(ratings):
                column["notes"].append(f"the judge gave no rating for {len(ratings) - len(rated)} of "
                                       f"{len(ratings)} samples")


# ---------------------------------------------------------------- rendering


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def column_html(column: dict) -> str:
    """One column: header (name, method, coefficients), samples, metrics; all text escaped."""

    def esc(text: str) -> str:
        # Control characters (a small model emits some) would be invisible or break the layout.
        return html.escape(_CONTROL.sub("\ufffd", text))

    meta = column.get("metadata") or {}
    head = [f"<div class='qempo-name'>{esc(column['name'])}</div>"]
    if column.get("adapter") is None and column["name"] == "base":
        head.append("<div class='qempo-meta'>base model, no adapter</div>")
    if meta.get("method"):
        coefficients = ", ".join(f"{esc(str(k))}={esc(str(v))}" for k, v in (meta.get("coefficients") or {}).items())
        head.append(f"<div class='qempo-meta'>method <b>{esc(str(meta['method']))}</b>"
                    f"{' · ' + coefficients if coefficients else ''}</div>")
    elif column.get("adapter"):
        head.append("<div class='qempo-meta'>no qempo_lite.json: method unknown</div>")
    if column.get("adapter"):
        head.append(f"<div class='qempo-path'>{esc(column['adapter'])}</div>")
    parts = [f"<div class='qempo-column' data-name='{esc(column['name'])}'>",
             f"<div class='qempo-head'>{''.join(head)}</div>"]
    if column.get("error"):
        parts.append(f"<div class='qempo-error'>{esc(column['error'])}</div>")
    else:
        items = "".join(
            f"<li class='qempo-sample'>{esc(s['text']) if s['text'].strip() else '<i>(empty)</i>'}</li>"
            for s in column["samples"])
        parts.append(f"<ol class='qempo-samples'>{items}</ol>")
        m = column.get("metrics") or {}
        rows = [(metric.label, _fmt(m.get(metric.name), 3 if metric.fraction else 1)) for metric in METRICS]
        rows.append(("mean length (tokens)", _fmt(m.get("mean_tokens"))))
        if "judge" in m:
            rows.append(("mean judge score", _fmt(m.get("judge"), 2)))
        cells = "".join(f"<tr><td>{esc(k)}</td><td class='qempo-value'>{v}</td></tr>" for k, v in rows)
        parts.append(f"<table class='qempo-metrics'>{cells}</table>")
        parts += [f"<div class='qempo-note'>{esc(note)}</div>" for note in column.get("notes", [])]
    parts.append("</div>")
    return "".join(parts)


def comparison_chart(result: dict):
    """Grouped bars: one group per metric (x100), one bar per column."""
    from matplotlib.figure import Figure

    columns = [c for c in result.get("columns", []) if c.get("metrics")]
    if not columns:
        return None
    fig = Figure(figsize=(8, 3.2), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        values = [column["metrics"].get(metric.name) for metric in METRICS]
        # A metric that could not be computed gets no bar (NaN), not a misleading zero.
        values = [math.nan if v is None else (100 * v if metric.fraction else v) for v, metric in zip(values, METRICS)]
        ax.bar([j + (i - (len(columns) - 1) / 2) * width for j in range(len(values))], values, width,
               label=column["name"])
    ax.set_xticks(range(len(METRICS)), [metric.label for metric in METRICS])
    ax.set_ylabel("score (x100)")
    ax.set_ylim(0, 100)
    ax.set_title("Diversity per column (higher is more diverse)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def errors_markdown(result: dict) -> str:
    return "\n".join(f"**Error:** {html.escape(e)}  " for e in result.get("errors", []))


# ---------------------------------------------------------------- the page

CSS = """
.qempo-column {font-size: 0.9em}
.qempo-name {font-weight: 700; font-size: 1.15em}
.qempo-meta, .qempo-path {color: #666; font-size: 0.85em; overflow-wrap: anywhere}
.qempo-samples {padding-left: 1.6em; max-height: 34em; overflow-y: auto}
.qempo-sample {white-space: pre-wrap; overflow-wrap: anywhere; border-bottom: 1px solid #e5e5e5; padding: 2px 0}
.qempo-metrics td {padding: 1px 8px 1px 0} .qempo-value {text-align: right; font-variant-numeric: tabular-nums}
.qempo-error {color: #b00020; font-weight: 600; white-space: pre-wrap}
.qempo-note {color: #8a6d00; font-size: 0.8em}
#qempo-errors {color: #b00020}
"""


def build_app(settings: AppSettings, comparison: Comparison | None = None):
    """The Gradio Blocks: controls, one column per adapter, the chart, and the ``generate`` API."""
    try:
        import gradio as gr
    except ImportError:
        raise missing_extra("gradio", "app") from None
    comparison = comparison or Comparison(settings)

    def generate(base_model: str, adapters: list[str], prompt: str, samples: int = 8, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0) -> dict:
        """Sample every selected adapter ('base' for the base model alone) on one prompt; return the
        samples and diversity metrics per column, and 'errors' (one line each) for what was refused."""
        return comparison.run(base_model, adapters, prompt, samples, temperature, top_p, max_new_tokens, seed)

    def generate_page(base_model, adapters, prompt, samples, temperature, top_p, max_new_tokens, seed,
                      progress=gr.Progress()):
        result = comparison.run(base_model, adapters or [], prompt, samples, temperature, top_p, max_new_tokens,
                                seed, progress=lambda fraction, desc: progress(fraction, desc=desc))
        for error in result["errors"]:
            gr.Warning(error)
        shown = result["columns"][:MAX_COLUMNS]
        cells = [gr.HTML(value=column_html(c), visible=True) for c in shown]
        cells += [gr.HTML(value="", visible=False)] * (MAX_COLUMNS - len(shown))
        return [gr.Markdown(value=errors_markdown(result), visible=bool(result["errors"])), *cells,
                comparison_chart(result), result]

    choices = [(BASE_LABEL, BASE)] + [(f"{Path(a).name} · {a}", a) for a in settings.adapters]
    questions = [(f"{q['id']} · {q['category']} · {q['prompt'][:70]}", q["id"]) for q in settings.questions]
    by_id = {q["id"]: q["prompt"] for q in settings.questions}

    with gr.Blocks(title="qempo-lite: adapters side by side", analytics_enabled=False) as page:
        gr.Markdown("# qempo-lite: adapters side by side\nSample each adapter on the same prompt and compare how "
                    "diverse its answers are (lexical, syntactic and semantic diversity x100 by Guo et al. "
                    "2024's protocol, `guo2024`, as in the paper; each column names the parser and encoder used).")
        if settings.notice:
            gr.Markdown(settings.notice, elem_id="qempo-notice")
        gr.Markdown(f"Sampling backend: {comparison.samplers.backend_note}.", elem_id="qempo-backend")
        with gr.Row():
            base_model = gr.Dropdown(settings.base_models, value=settings.base_models[0] if settings.base_models
                                     else None, label="Base model (directory or Hub id)", allow_custom_value=True,
                                     elem_id="qempo-base", scale=2)
            adapters = gr.Dropdown(choices, value=settings.selection, multiselect=True, max_choices=MAX_COLUMNS,
                                   allow_custom_value=True, label=f"Adapters (up to {MAX_COLUMNS}; directory or "
                                   "Hub id)", elem_id="qempo-adapters", scale=3)
        with gr.Row():
            prompt = gr.Textbox(settings.prompt, label="Prompt", lines=3, max_length=settings.max_prompt_chars,
                                elem_id="qempo-prompt", scale=3)
            question = gr.Dropdown(questions, value=None, label="or pick an MT-Bench question (first turn)",
                                   visible=bool(questions), elem_id="qempo-question", scale=2)
        if settings.questions_note:
            gr.Markdown(settings.questions_note)
        with gr.Row():
            samples = gr.Slider(1, settings.max_samples, value=min(8, settings.max_samples), step=1,
                                label="Samples per adapter", elem_id="qempo-samples")
            temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature", elem_id="qempo-temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="qempo-top-p")
            max_new_tokens = gr.Slider(1, settings.max_new_tokens, value=min(128, settings.max_new_tokens), step=1,
                                       label="Max new tokens", elem_id="qempo-max-new-tokens")
            seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="qempo-seed")
        button = gr.Button("Generate", variant="primary", elem_id="qempo-generate")
        errors = gr.Markdown(visible=False, elem_id="qempo-errors")
        with gr.Row(equal_height=False):
            cells = [gr.HTML(visible=False, elem_id=f"qempo-column-{i}", elem_classes=["qempo-cell"])
                     for i in range(MAX_COLUMNS)]
        chart = gr.Plot(label="Comparison", elem_id="qempo-chart")
        with gr.Accordion("Raw results (JSON)", open=False):
            raw = gr.JSON(elem_id="qempo-raw")

        question.change(lambda qid: by_id.get(qid, gr.skip()), question, prompt, api_visibility="private")
        inputs = [base_model, adapters, prompt, samples, temperature, top_p, max_new_tokens, seed]
        button.click(generate_page, inputs, [errors, *cells, chart, raw], api_visibility="private",
                     concurrency_id="generate", show_progress_on=[*cells, chart])
        gr.api(generate, api_name="generate", concurrency_id="generate")
    page.queue(default_concurrency_limit=1, max_size=settings.queue_size)
    return page


def launch_app(settings: AppSettings, *, host: str = "127.0.0.1", port: int | None = None,
               prevent_thread_lock: bool = False, quiet: bool = False):
    """Build and serve the app; returns ``(blocks, local_url)``. Never opens a share link; uploads
    are capped at ``MAX_UPLOAD_BYTES`` (the page has no upload control)."""
    page = build_app(settings)
    _, url, _ = page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=prevent_thread_lock,
                            quiet=quiet, show_error=False, enable_monitoring=False, mcp_server=False, ssr_mode=False,
                            run_history=False, footer_links=["api"], css=CSS, max_file_size=MAX_UPLOAD_BYTES)
    return page, url
