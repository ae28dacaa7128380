"""The app's settings: what the command line names, else the demo's models, and the MT-Bench questions."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import CONFIG_FILE
from ..errors import QempoError

BASE = "base"  # the adapter choice meaning "the base model, no adapter"
BASE_LABEL = "base, no adapter"
MAX_COLUMNS = 4
DEFAULT_DEMO_DIR = "qempo-demo"
# The demo's adapters, in the order the paper's story reads: the RLHF baseline, then QEMPO.
_DEMO_ORDER = ("dpo", "qempo", "qempo_kl", "spl")


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

    ``source`` is a question.jsonl; ``None`` reads the MT-Bench copy shipped in the package (see
    :func:`qempo_lite.evaluate.mtbench.resolve_mtbench_file`), and ``[]`` if it cannot be read.
    """
    from ..evaluate import mtbench

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
    found = [p for p in sorted(adapters_dir.iterdir()) if (p / CONFIG_FILE).is_file()] \
        if adapters_dir.is_dir() else []
    rank = {name: i for i, name in enumerate(_DEMO_ORDER)}
    return sorted(found, key=lambda p: rank.get(p.name, len(rank)))


def find_adapters(roots: list[Path], limit: int = 64) -> list[str]:
    """Adapter directories (holding adapter_config.json) at most two levels under ``roots``."""
    found: list[str] = []
    for root in roots:
        for pattern in (f"*/{CONFIG_FILE}", f"*/*/{CONFIG_FILE}"):
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
        from ..demo import TASKS

        prompt = TASKS[0][0][0]
    questions_note = "" if question_rows else "No MT-Bench questions file found; pass --questions PATH to pick one."
    selection = [BASE] + adapters[: MAX_COLUMNS - 1]
    return AppSettings(base_models=list(dict.fromkeys(base_models)), adapters=adapters, selection=selection,
                       prompt=prompt, questions=question_rows, questions_note=questions_note, notice=notice,
                       allowed_roots=list(dict.fromkeys(roots)), **options)
