"""Model cards and Hub pushes for trained adapters (``qempo-lite push``).

Only the adapter (safetensors), the tokenizer files when they differ from the base model's,
and the card are uploaded: never optimizer states, checkpoints, or pickled files. The token
comes from ``HF_TOKEN`` or the login cache through ``huggingface_hub`` and is never printed.

What is uploaded is checked first (the adapter checks live in :mod:`qempo_lite.adapters`), and a
push that fails a check is refused with one line:

* nothing is read through a symlink that leaves the adapter directory (every file is
  resolved; a link to a file elsewhere, a broken link or a loop is refused);
* the weights must be a safetensors file whose header parses and whose tensors are LoRA
  weights consistent with ``adapter_config.json`` (target modules, rank), every value finite
  (a run that diverged to NaN is not uploaded);
* ``adapter_config.json``, ``qempo_lite.json`` and ``report.json`` must be UTF-8 JSON objects;
* the card's ``base_model`` is a Hub id: an adapter trained on a local directory needs
  ``--base-model-id OWNER/NAME`` (the Hub model it is a copy of), which is also written into
  the uploaded ``adapter_config.json`` so that PEFT and vLLM find the base;
* the tokenizer is uploaded only when it differs from the base model's; when the two cannot
  be compared, ``--tokenizer upload`` or ``--tokenizer skip`` must say what to do.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .adapters import (CONFIG_FILE, WEIGHTS_FILE, adapter_config, check_adapter_files, check_finite_weights,
                       contained_file, max_rank, read_json_object, read_metadata, recorded_base_model)
from .console import ArgumentParser, input_read
from .errors import QempoError, one_line

logger = logging.getLogger("qempo_lite")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
TOKENIZER_CHOICES = ("auto", "upload", "skip")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

PAPER = "Quality-constrained Entropy Maximization Policy Optimization for LLM Diversity"
ARXIV_ID = "2602.15894"
# The Hub licence ids of the paper's base models (an adapter is under its base model's licence); the card of
# an adapter on another base says so and names that base.
BASE_LICENSES = {"Qwen/Qwen2.5-1.5B-Instruct": "apache-2.0", "Qwen/Qwen2.5-7B-Instruct": "apache-2.0",
                 "meta-llama/Llama-3.2-1B-Instruct": "llama3.2", "meta-llama/Llama-3.1-8B-Instruct": "llama3.1",
                 "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}  # the real-model demos' base

# ---------------------------------------------------------------- the base model


def _method_text(method) -> str:
    from .methods import get_method

    try:
        return get_method(method).card_text
    except ValueError:
        return "See the training details below."


def _is_local_path(value: str, adapter_dir: Path) -> bool:
    """Whether a recorded base model names a directory rather than a Hub id: an absolute or
    ``./`` path, anything that is not shaped like OWNER/NAME, or a relative path that exists
    here or next to the adapter (the demo records ``qempo-demo/base``)."""
    if not HUB_ID.match(value) or ".." in value or value.startswith(("/", ".", "~")):
        return True
    return any((folder / value).is_dir() for folder in (Path.cwd(), *Path(adapter_dir).resolve().parents))


def hub_base_model(adapter_dir: Path, base_model_id: str | None = None) -> str:
    """The Hub id of the adapter's base model, for the card and the uploaded adapter_config.json."""
    if base_model_id is not None:
        if not HUB_ID.match(base_model_id) or ".." in base_model_id:
            raise QempoError(f"--base-model-id {base_model_id!r} is not a Hub model id; pass OWNER/NAME")
        return base_model_id
    recorded = recorded_base_model(adapter_dir)
    if recorded is None:
        raise QempoError(f"{adapter_dir} records no base model; pass --base-model-id OWNER/NAME (the Hub model it "
                         "was trained on)")
    if _is_local_path(recorded, adapter_dir):
        raise QempoError(f"the adapter's base model {recorded} is a local directory, not a Hub id; pass "
                         "--base-model-id OWNER/NAME (the Hub model that directory is a copy of)")
    return recorded


def find_evaluation(adapter_dir: Path) -> tuple[dict | None, Path | None]:
    """The evaluation row for this adapter from a ``report.json`` beside it (or one or two levels
    up, as the demo and ``qempo-lite eval report`` lay them out)."""
    row, path, _ = _find_report(adapter_dir)
    return row, path


def _find_report(adapter_dir: Path) -> tuple[dict | None, Path | None, dict]:
    adapter_dir = Path(adapter_dir).resolve()
    name = adapter_dir.name
    method = read_metadata(adapter_dir).get("method")
    for folder in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        path = contained_file(folder, "report.json")
        if path is None:
            continue
        report = read_json_object(path, str(folder / "report.json"), "fix or move it (the card reads its results)")
        for table in ("adapters", "methods"):
            rows = report.get(table)
            if isinstance(rows, dict):
                for key in (name, method):
                    if isinstance(key, str) and isinstance(rows.get(key), dict):
                        return rows[key], folder / "report.json", report
    return None, None, {}


# ---------------------------------------------------------------- the card


def _format_value(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _is_hub_dataset(value: Any) -> bool:
    value = str(value)
    return bool(HUB_ID.match(value)) and not Path(value).exists() and not value.endswith(
        (".jsonl", ".json", ".gz", ".parquet"))


def _hub_datasets(data: Any) -> list[str]:
    """The Hub datasets a run's ``data`` record names (local files are not Hub metadata)."""
    if not isinstance(data, dict):
        return []
    sources = data.get("datasets") if isinstance(data.get("datasets"), list) else [data.get("dataset")]
    return [str(s) for s in sources if s and _is_hub_dataset(s)]


def _source(value: Any) -> str:
    """A data source for the card: a Hub dataset id as it is, a local file by its name only."""
    value = str(value)
    if _is_hub_dataset(value):
        return f"`{value}` (Hub dataset)"
    return f"a local file `{Path(value).name}`" if "/" in value or Path(value).suffix else f"`{value}`"


def _data_text(data: Any) -> str | None:
    if isinstance(data, str):
        return _source(data)
    if not isinstance(data, dict):
        return None
    sources = data.get("datasets") if isinstance(data.get("datasets"), list) else [data.get("dataset")]
    parts = [" + ".join(_source(s) for s in sources if s)] if any(sources) else []
    if data.get("split"):
        parts.append(f"split `{data['split']}`")
    if isinstance(data.get("rows"), int):
        parts.append(f"{data['rows']:,} rows used")
    if isinstance(data.get("skipped"), int) and data["skipped"]:
        parts.append(f"{data['skipped']:,} bad rows skipped")
    return ", ".join(p for p in parts if p) or None


def _lora_text(lora: Any) -> str | None:
    if not isinstance(lora, dict):
        return None
    names = {"r": "rank", "alpha": "alpha", "dropout": "dropout", "target_modules": "target modules"}
    parts = [f"{names.get(k, k)} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in lora.items()
             if v not in (None, "")]
    return ", ".join(parts) or None


def _protocol_text(report: dict) -> str | None:
    """The diversity protocol, parser and encoder of the report, where it records them."""
    found = {}
    for place in (report, report.get("diversity"), report.get("models")):
        if isinstance(place, dict):
            for key in ("protocol", "parser", "encoder"):
                if isinstance(place.get(key), str) and key not in found:
                    found[key] = place[key]
    if not found:
        return None
    parts = [f"protocol `{found['protocol']}`"] if "protocol" in found else []
    parts += [f"{key} `{found[key]}`" for key in ("parser", "encoder") if key in found]
    return "Diversity measured with " + ", ".join(parts) + "."


def _max_lora_rank(config: dict) -> int:
    rank = max_rank(config)
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def model_card(adapter_dir: Path, repo_id: str, *, base_model_id: str | None = None,
               tokenizer_uploaded: bool = False) -> str:
    """The model card (README.md) a push uploads: the Hub ids of the base and the repository, and the results."""
    return card_text(adapter_dir, read_metadata(adapter_dir), hub_base_model(adapter_dir, base_model_id),
                     location=repo_id, tokenizer_here=tokenizer_uploaded, pushed=True)


def write_adapter_card(adapter_dir: str | Path, meta: dict, location: str) -> Path | None:
    """Write the card of an adapter folder as it is saved (the final one or a ``checkpoint-N``), replacing the
    template README that PEFT writes: the base model as given, the run's metadata ``meta``, and ``location``
    (the folder as the run names it) in the usage snippets. A folder without an adapter (a whole model
    trained without LoRA) gets none."""
    from huggingface_hub import ModelCard

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_FILE).is_file():
        return None
    base = meta.get("base_model") or recorded_base_model(adapter_dir) or "unknown"
    tokenizer_here = any((adapter_dir / name).is_file() for name in TOKENIZER_FILES)
    path = adapter_dir / "README.md"
    ModelCard(card_text(adapter_dir, meta, str(base), location=location, tokenizer_here=tokenizer_here)).save(path)
    return path


def card_text(adapter_dir: Path, meta: dict, base: str, *, location: str, tokenizer_here: bool,
              pushed: bool = False) -> str:
    """A card: metadata (base model, peft, licence, datasets, the paper), method, data, results, usage.

    ``location`` is where the snippets load the adapter from (a Hub id when ``pushed``, else its folder);
    ``tokenizer_here``: the adapter's own tokenizer is there (else the base model's is loaded).
    """
    from huggingface_hub import ModelCardData

    config = adapter_config(adapter_dir)
    method = meta.get("method") if isinstance(meta.get("method"), str) else "unknown"
    on_hub = not _is_local_path(base, adapter_dir)
    data = ModelCardData(
        base_model=base,
        library_name="peft",
        license=BASE_LICENSES.get(base, "other"),
        datasets=_hub_datasets(meta.get("data")) or None,
        pipeline_tag="text-generation",
        tags=["qempo-lite", "qempo", "lora", "peft", f"arxiv:{ARXIV_ID}", *([method] if method != "unknown" else [])],
    )
    coefs = meta.get("coefficients") if isinstance(meta.get("coefficients"), dict) else {}
    evaluation, report_path, report = _find_report(adapter_dir)
    name = location.rstrip("/").split("/")[-1]
    title = f"{Path(location).parent.name} ({name})" if re.fullmatch(r"checkpoint-\d+", name) else name
    base_text = f"[`{base}`](https://huggingface.co/{base})" if on_hub else f"the local model `{base}`"
    lines = ["---", data.to_yaml(), "---", "", f"# {title}", "",
             f"A LoRA adapter for {base_text} trained with **{method}** by qempo-lite, "
             f"an implementation of QEMPO ([arXiv:{ARXIV_ID}](https://arxiv.org/abs/{ARXIV_ID})).", "",
             "## Method", "", _method_text(method), ""]
    if coefs:
        lines += ["| coefficient | value |", "|---|---|"] + [f"| `{k}` | {v} |" for k, v in coefs.items()] + [""]
    lines += [f"Paper: *{PAPER}*, arXiv:{ARXIV_ID} (<https://arxiv.org/abs/{ARXIV_ID}>).", "", "## Training", ""]
    steps = meta.get("steps")
    licence = (f"`{BASE_LICENSES[base]}`, the base model's" if base in BASE_LICENSES
               else f"the base model's (`{base}`); check it before use")
    facts = {
        "mode": meta.get("mode") if isinstance(meta.get("mode"), str) else None,
        "data": _data_text(meta.get("data")),
        "steps": f"{steps:,} optimizer steps" if isinstance(steps, int) and not isinstance(steps, bool) else None,
        "quantization": meta.get("quantization") if isinstance(meta.get("quantization"), str) else None,
        "base weights": meta.get("weights") if isinstance(meta.get("weights"), str) else None,
        "LoRA": _lora_text(meta.get("lora")),
        "licence": licence,
        "qempo-lite version": meta.get("qempo_lite_version") if isinstance(meta.get("qempo_lite_version"), str)
        else None,
    }
    lines += [f"- **{k}**: {v}" for k, v in facts.items() if v] + [""]
    lines += ["## Evaluation", ""]
    shown = {k: v for k, v in (evaluation or {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if shown:
        lines += [f"From `{report_path.name}` (diversity ×100 as in the paper's Table 2 where applicable):", "",
                  "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown),
                  "| " + " | ".join(_format_value(v) for v in shown.values()) + " |", ""]
        protocol = _protocol_text(report)
        if protocol:
            lines += [protocol, ""]
    else:
        lines += ["No evaluation results were found (run `qempo-lite eval report`"
                  f"{' and push again' if pushed else ', then `qempo-lite push` publishes them in this card'}).", ""]
    tokenizer_from = location if tokenizer_here else base
    where = "repository" if pushed else "folder"
    lines += [
        "## Usage", "", "With PEFT (the base model is loaded as recorded in `adapter_config.json`):", "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer", "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{location}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_from}")', "```", "",
        (f"This {where} holds the adapter's own tokenizer" + (" (it differs from the base model's)." if pushed else ".")
         if tokenizer_here else "The adapter uses the base model's tokenizer, so it is loaded from the base model."),
        *(["", f"It was trained on other base weights than the published `{base}` that this loads: "
                f"{facts['base weights']}. Samples from the published weights may differ from those evaluated above."]
          if facts["base weights"] else []),
        "", "Served by vLLM next to the base model (no merging):", "", "```bash",
        f"vllm serve {base} --enable-lora --lora-modules {name}={location} --max-lora-rank {_max_lora_rank(config)}",
        "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the tokenizer


def _tokenizer_signature(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return (sorted(tok.get_vocab().items()), sorted(map(str, tok.all_special_tokens)), tok.chat_template,
            tok.model_max_length, tok.padding_side)


def tokenizer_changed(adapter_files: dict[str, Path], bases: list[str]) -> bool:
    """Whether the adapter's tokenizer differs from the base model's: vocabulary, special
    tokens, chat template, length and padding side are compared (file bytes differ between
    library versions for the same tokenizer).

    ``adapter_files`` are the adapter's tokenizer files (already checked to stay inside it),
    loaded from a private copy so that nothing else in the directory is read. ``bases`` are
    where the base model's tokenizer may be loaded from, tried in order (the local directory
    the adapter was trained on, then the Hub id). When the comparison cannot be made the push
    is refused with one line: ``--tokenizer upload`` or ``--tokenizer skip`` decides.
    """
    if not adapter_files:
        return False
    with tempfile.TemporaryDirectory() as copy:
        for name, real in adapter_files.items():
            shutil.copyfile(real, Path(copy) / name)
        try:
            mine = _tokenizer_signature(copy)
        except Exception as err:  # noqa: BLE001 - any failure refuses the push (never uploads more)
            raise QempoError(f"the adapter's tokenizer files cannot be loaded ({one_line(err)}); fix or remove "
                             "them, or pass --tokenizer skip") from None
    reasons = []
    for base in bases:
        try:
            return mine != _tokenizer_signature(base)
        except Exception as err:  # noqa: BLE001 - offline, private, missing or broken: try the next, then refuse
            reasons.append(f"{base}: {one_line(err)}")
    raise QempoError(f"cannot load the base model's tokenizer to compare it with the adapter's ({'; '.join(reasons)}); "
                     "pass --tokenizer upload to upload the adapter's tokenizer, or --tokenizer skip to leave it out")


# ---------------------------------------------------------------- staging and pushing


def stage_upload(adapter_dir: Path, repo_id: str, destination: Path, *, base_model_id: str | None = None,
                 tokenizer: str = "auto") -> list[Path]:
    """Write exactly the files a push uploads into ``destination`` and return them.

    Everything is checked before anything is written (see the module docstring).
    """
    if tokenizer not in TOKENIZER_CHOICES:
        raise QempoError(f"--tokenizer must be one of {', '.join(TOKENIZER_CHOICES)}, not {tokenizer!r}")
    given = Path(adapter_dir)
    config, weights, _ = check_adapter_files(given)
    check_finite_weights(weights, f"{given}: {WEIGHTS_FILE}")
    adapter_dir = given.resolve()
    base = hub_base_model(adapter_dir, base_model_id)
    tokenizer_files = {name: real for name in TOKENIZER_FILES
                       if (real := contained_file(adapter_dir, name)) is not None}
    if tokenizer == "auto":
        recorded = recorded_base_model(adapter_dir)
        local = [str((folder / recorded).resolve()) for folder in (Path.cwd(), *adapter_dir.parents)
                 if recorded and (folder / recorded).is_dir()][:1]
        upload_tokenizer = tokenizer_changed(tokenizer_files, local + [base])
    else:
        upload_tokenizer = tokenizer == "upload" and bool(tokenizer_files)
    card = model_card(adapter_dir, repo_id, base_model_id=base, tokenizer_uploaded=upload_tokenizer)
    if find_evaluation(adapter_dir)[0] is None:
        logger.warning("no evaluation results found next to %s: the card will say so", given)

    destination.mkdir(parents=True, exist_ok=True)
    # PEFT and vLLM load the base named here: the Hub id, never the local path it was trained from.
    (destination / CONFIG_FILE).write_text(json.dumps({**config, "base_model_name_or_path": base}, indent=2) + "\n",
                                           encoding="utf-8")
    shutil.copyfile(weights, destination / WEIGHTS_FILE)
    if upload_tokenizer:
        for name, real in tokenizer_files.items():
            shutil.copyfile(real, destination / name)
    (destination / "README.md").write_text(card, encoding="utf-8")
    return sorted(destination.iterdir())


def push_adapter(adapter_dir: str | Path, repo_id: str, *, private: bool = False, dry_run: str | Path | None = None,
                 base_model_id: str | None = None, tokenizer: str = "auto") -> str:
    """Push an adapter and its card to ``repo_id``; with ``dry_run`` write them to that folder instead.

    ``base_model_id`` is the Hub id of the base model, needed when the adapter was trained on a
    local directory. ``tokenizer``: ``auto`` (upload it when it differs from the base's),
    ``upload`` or ``skip``. Returns the repository URL, or the dry-run folder.
    """
    adapter_dir = Path(adapter_dir)
    if not HUB_ID.match(repo_id) or ".." in repo_id:
        raise QempoError(f"--repo-id {repo_id!r} must look like USER/NAME")
    if dry_run is not None:
        folder = Path(dry_run)
        if folder.exists() and not folder.is_dir():
            raise QempoError(f"dry-run folder {folder} is a file; pass an empty or new folder")
        if folder.exists() and any(folder.iterdir()):
            raise QempoError(f"dry-run folder {folder} is not empty; pass an empty or new folder")
        stage_upload(adapter_dir, repo_id, folder, base_model_id=base_model_id, tokenizer=tokenizer)
        return str(folder)
    from huggingface_hub import HfApi

    api = HfApi()
    if api.token is None and not _has_cached_token():
        raise QempoError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    with tempfile.TemporaryDirectory() as staging:
        stage_upload(adapter_dir, repo_id, Path(staging), base_model_id=base_model_id, tokenizer=tokenizer)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=staging, repo_id=repo_id, repo_type="model",
                          commit_message="Upload adapter trained with qempo-lite")
    return str(url)


def _has_cached_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _tree(folder: Path) -> str:
    lines = [f"{folder}/"]
    for path in sorted(folder.iterdir()):
        lines.append(f"  {path.name}  ({path.stat().st_size:,} bytes)")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    parser = ArgumentParser(prog="qempo-lite push", description="Push an adapter and its model card to the Hub.")
    parser.add_argument("adapter_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--repo-id", required=True, help="USER/NAME on the Hugging Face Hub")
    parser.add_argument("--base-model-id", default=None, metavar="OWNER/NAME",
                        help="Hub id of the base model, required when the adapter was trained on a local directory "
                             "(written into the card and the uploaded adapter_config.json)")
    parser.add_argument("--tokenizer", choices=TOKENIZER_CHOICES, default="auto",
                        help="auto: upload the adapter's tokenizer only when it differs from the base model's "
                             "(default); upload; skip")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", nargs="?", const="", metavar="DIR",
                        help="write what would be uploaded to DIR (default: <adapter_dir>-hub) and print its tree")
    args = parser.parse_args(argv)
    input_read()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    options = {"private": args.private, "base_model_id": args.base_model_id, "tokenizer": args.tokenizer}
    if args.dry_run is not None:
        folder = Path(args.dry_run or f"{args.adapter_dir.rstrip('/')}-hub")
        push_adapter(args.adapter_dir, args.repo_id, dry_run=folder, **options)
        print(_tree(folder))
        return 0
    url = push_adapter(args.adapter_dir, args.repo_id, **options)
    print(f"pushed to {url}")
    return 0
