"""Model cards and Hub pushes for trained adapters (``qempo-lite push``).

Only the adapter (safetensors), the tokenizer files when they differ from the base model's,
and the card are uploaded: never optimizer states, checkpoints, or pickled files. The token
comes from ``HF_TOKEN`` or the login cache through ``huggingface_hub`` and is never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from .errors import QempoError

logger = logging.getLogger("qempo_lite")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
METADATA_FILE = "qempo_lite.json"

PAPER = ("Quality-constrained Entropy Maximization Policy Optimization for LLM Diversity (QEMPO)")
METHOD_TEXT = {
    "qempo": "QEMPO (Eq. 7): maximise entropy subject to a quality constraint; no reference model. "
             "Optimal policy π ∝ exp(r/β).",
    "qempo_kl": "QEMPO-KL (Eq. 6): maximise entropy subject to quality and KL constraints. "
                "Optimal policy π ∝ π_ref^{β2/(β1+β2)} exp(r/(β1+β2)).",
    "dpo": "DPO (the paper's RLHF baseline). Optimal policy π ∝ π_ref exp(r/β).",
    "spl": "Soft Preference Learning (baseline). Optimal policy π ∝ π_ref^{β/α} exp(r/α).",
    "gvpo": "GVPO (the paper's online RLHF baseline). Optimal policy π ∝ π_ref exp(r/β).",
}


def check_adapter_dir(adapter_dir: Path) -> None:
    """Refuse anything that is not a safetensors PEFT adapter directory."""
    if not adapter_dir.is_dir():
        raise QempoError(f"{adapter_dir} is not a directory; pass the output_dir of a training run")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QempoError(f"{adapter_dir} has no adapter_config.json; pass a directory saved by a PEFT adapter")
    pickled = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise QempoError(f"{adapter_dir} holds pickled weights ({', '.join(pickled)}); only safetensors are pushed: "
                         "re-save the adapter with save_pretrained(..., safe_serialization=True) and remove them")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise QempoError(f"{adapter_dir} has no adapter_model.safetensors; re-save the adapter with safetensors")


def read_metadata(adapter_dir: Path) -> dict:
    """The run's ``qempo_lite.json`` (method, coefficients, base model, data), or ``{}``."""
    path = adapter_dir / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise QempoError(f"{path} is not valid JSON ({err}); fix or remove it") from None


def base_model_of(adapter_dir: Path) -> str:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return read_metadata(adapter_dir).get("base_model") or config.get("base_model_name_or_path") or "unknown"


def find_evaluation(adapter_dir: Path) -> tuple[dict | None, Path | None]:
    """The evaluation row for this adapter from a ``report.json`` beside it (or one or two levels
    up, as the demo and ``qempo-lite eval report`` lay them out)."""
    name = adapter_dir.resolve().name
    method = read_metadata(adapter_dir).get("method")
    for folder in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        path = folder / "report.json"
        if not path.is_file():
            continue
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError:
            logger.warning("ignoring %s: not valid JSON", path)
            continue
        for table in ("adapters", "methods"):
            rows = report.get(table)
            if isinstance(rows, dict):
                for key in (name, method):
                    if key in rows and isinstance(rows[key], dict):
                        return rows[key], path
    return None, None


def _format_value(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def model_card(adapter_dir: Path, repo_id: str) -> str:
    """The model card (README.md) of an adapter: metadata, method, data, results, usage."""
    from huggingface_hub import ModelCardData

    meta = read_metadata(adapter_dir)
    base = base_model_of(adapter_dir)
    method = meta.get("method", "unknown")
    data = ModelCardData(
        base_model=base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["qempo-lite", "qempo", "lora", "peft", *([method] if method != "unknown" else [])],
    )
    coefs = meta.get("coefficients", {})
    evaluation, report_path = find_evaluation(adapter_dir)
    lines = ["---", data.to_yaml(), "---", "", f"# {repo_id.split('/')[-1]}", "",
             f"A LoRA adapter for [`{base}`](https://huggingface.co/{base}) trained with **{method}** by "
             "[qempo-lite](https://github.com/qempo-lite/qempo-lite).", "",
             "## Method", "", METHOD_TEXT.get(method, "See the training metadata below."), ""]
    if coefs:
        lines += ["| coefficient | value |", "|---|---|"] + [f"| `{k}` | {v} |" for k, v in coefs.items()] + [""]
    lines += [f"Paper: *{PAPER}*.", "", "## Training", ""]
    facts = {
        "mode": meta.get("mode"),
        "data": json.dumps(meta["data"]) if isinstance(meta.get("data"), dict) else meta.get("data"),
        "steps": meta.get("steps"),
        "quantization": meta.get("quantization"),
        "LoRA": json.dumps(meta["lora"]) if isinstance(meta.get("lora"), dict) else meta.get("lora"),
        "qempo-lite version": meta.get("qempo_lite_version"),
    }
    facts = {k: v for k, v in facts.items() if v not in (None, "")}
    if facts:
        lines += [f"- **{k}**: {v}" for k, v in facts.items()] + [""]
    else:
        lines += ["No `qempo_lite.json` was found next to the adapter, so the training details are unknown.", ""]
    lines += ["## Evaluation", ""]
    if evaluation:
        shown = {k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += [f"From `{report_path.name}` (diversity ×100 as in the paper's Table 2 where applicable):", "",
                  "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown),
                  "| " + " | ".join(_format_value(v) for v in shown.values()) + " |", ""]
    else:
        lines += ["No evaluation results were found (run `qempo-lite eval report` and push again).", ""]
    lines += [
        "## Usage", "", "With PEFT:", "", "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer", "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
        "Served by vLLM next to the base model (no merging):", "", "```bash",
        f"vllm serve {base} --enable-lora --lora-modules {repo_id.split('/')[-1]}={repo_id} --max-lora-rank 64",
        "```", ""]
    return "\n".join(lines)


def _tokenizer_signature(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return (sorted(tok.get_vocab().items()), sorted(map(str, tok.all_special_tokens)), tok.chat_template,
            tok.model_max_length, tok.padding_side)


def tokenizer_changed(adapter_dir: Path, base: str) -> bool:
    """Whether the adapter's tokenizer differs from the base model's: vocabulary, special
    tokens, chat template, length and padding side are compared (file bytes differ between
    library versions for the same tokenizer). A base that cannot be loaded counts as changed,
    so that nothing needed is left out."""
    if not any((adapter_dir / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        return _tokenizer_signature(adapter_dir) != _tokenizer_signature(Path(base) if Path(base).is_dir() else base)
    except Exception:  # offline, private, missing or unreadable base: keep the tokenizer files
        return True


def stage_upload(adapter_dir: Path, repo_id: str, destination: Path) -> list[Path]:
    """Write exactly the files a push uploads into ``destination`` and return them."""
    check_adapter_dir(adapter_dir)
    destination.mkdir(parents=True, exist_ok=True)
    names = list(ADAPTER_FILES)
    if tokenizer_changed(adapter_dir, base_model_of(adapter_dir)):
        names += [name for name in TOKENIZER_FILES if (adapter_dir / name).is_file()]
    for name in names:
        shutil.copy2(adapter_dir / name, destination / name)
    if find_evaluation(adapter_dir)[0] is None:
        logger.warning("no evaluation results found next to %s: the card will say so", adapter_dir)
    (destination / "README.md").write_text(model_card(adapter_dir, repo_id))
    return sorted(destination.iterdir())


def push_adapter(adapter_dir: str | Path, repo_id: str, *, private: bool = False, dry_run: str | Path | None = None) -> str:
    """Push an adapter and its card to ``repo_id``; with ``dry_run`` write them to that folder instead.

    Returns the repository URL, or the dry-run folder.
    """
    adapter_dir = Path(adapter_dir)
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise QempoError(f"--repo-id {repo_id!r} must look like USER/NAME")
    if dry_run is not None:
        folder = Path(dry_run)
        if folder.exists() and any(folder.iterdir()):
            raise QempoError(f"dry-run folder {folder} is not empty; pass an empty or new folder")
        stage_upload(adapter_dir, repo_id, folder)
        return str(folder)
    from huggingface_hub import HfApi

    api = HfApi()
    if api.token is None and not _has_cached_token():
        raise QempoError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    with tempfile.TemporaryDirectory() as staging:
        stage_upload(adapter_dir, repo_id, Path(staging))
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
    parser = argparse.ArgumentParser(prog="qempo-lite push", description="Push an adapter and its model card to the Hub.")
    parser.add_argument("adapter_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--repo-id", required=True, help="USER/NAME on the Hugging Face Hub")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", nargs="?", const="", metavar="DIR",
                        help="write what would be uploaded to DIR (default: <adapter_dir>-hub) and print its tree")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.dry_run is not None:
        folder = Path(args.dry_run or f"{args.adapter_dir.rstrip('/')}-hub")
        push_adapter(args.adapter_dir, args.repo_id, private=args.private, dry_run=folder)
        print(_tree(folder))
        return 0
    url = push_adapter(args.adapter_dir, args.repo_id, private=args.private)
    print(f"pushed to {url}")
    return 0
