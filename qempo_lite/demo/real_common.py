"""What the real-model demos (:mod:`~qempo_lite.demo.real_online`, :mod:`~qempo_lite.demo.real_offline`) share.

Loading the model (and an adapter), the LoRA on the last layers, sampling a policy on the
held-out questions and scoring it (each policy's scores written as soon as they are done, so a
stopped run continues where it was), the pictures, the table and the report's files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import ClassVar
from dataclasses import asdict, dataclass
from pathlib import Path

from . import real_tasks

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every linear layer


@dataclass
class RealSettings:
    """The settings both real-model demos have; ``make``: the defaults, or with ``quick`` the class's ``QUICK``."""

    QUICK: ClassVar[dict] = {}

    seed: int = 0
    quick: bool = False
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_layers: int = 10  # LoRA on the last layers only: backward stops there (CPU time)
    max_new_tokens: int = real_tasks.MAX_NEW_TOKENS
    eval_samples: int = 32
    dtype: str = "float32"

    @classmethod
    def make(cls, seed: int, quick: bool, dtype: str, methods: list[str] | None = None):
        settings = cls(seed=seed, quick=quick, dtype=dtype, **(cls.QUICK if quick else {}))
        if methods:
            settings.methods = list(methods)
        return settings


def load_model(model_dir: Path, dtype: str, adapter: Path | None = None):
    """``(model, tokenizer)`` in eval mode, with ``adapter`` applied when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def lora_config(settings, num_layers: int):
    """LoRA rank ``settings.lora_r`` on every linear layer of the last ``settings.lora_layers`` layers (backward
    stops there: CPU time)."""
    from peft import LoraConfig

    first = max(num_layers - settings.lora_layers, 0)
    return LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, lora_dropout=0.0,
                      target_modules=LORA_MODULES, layers_to_transform=list(range(first, num_layers)),
                      task_type="CAUSAL_LM")


def save_trained(trainer, out: Path, model_dir: Path, data_name: str, rows: int, mode: str) -> Path:
    """A real demo's adapter, its record and card (the LoRA as configured, the Q4_1 weights note), and its
    training log, in ``out``."""
    from ..real_model import WEIGHTS_NOTE
    from . import world

    lora = trainer.model.peft_config["default"]
    world.save_demo_adapter(trainer, out, model_dir, data_name, rows, mode=mode,
                            lora_facts={"target_modules": sorted(lora.target_modules),
                                        "layers_to_transform": lora.layers_to_transform},
                            extra={"weights": WEIGHTS_NOTE})
    (out / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return out


def sample_policy(model, tokenizer, questions: list[str], n: int, max_new_tokens: int, seed: int) -> dict:
    """``{question: [n completions]}`` at temperature 1 (prompts computed once per question)."""
    from ..rollout import HFEngine

    engine = HFEngine(model, tokenizer, max_batch_prompts=4, shared_prompts=True)
    groups = engine.sample([real_tasks.messages(q) for q in questions], n=n, temperature=1.0,
                           max_new_tokens=max_new_tokens, seed=seed)
    return {q: [c.text for c in group] for q, group in zip(questions, groups)}


def load_encoder(log):
    """The sentence encoder of semantic diversity, or None (semantic diversity then reported as missing)."""
    try:
        from ..evaluate.diversity_models import load_encoder as load

        return load()
    except Exception as err:  # semantic diversity is reported as missing, not the run lost
        log(f"semantic diversity skipped: {err}")
        return None


def scored_policy(output: Path, name: str, model, tokenizer, questions, settings, encoder, log) -> dict:
    """Policy ``name`` sampled ``settings.eval_samples`` times per question and scored; cached in ``scores/``."""
    path = output / "scores" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    log(f"sampling {name}: {len(questions)} held-out questions x {settings.eval_samples}")
    samples = sample_policy(model, tokenizer, questions, settings.eval_samples, settings.max_new_tokens,
                            seed=10_000 + settings.seed)
    scored = real_tasks.score_policy(samples, encoder)
    scored["samples"] = samples
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scored, indent=1))
    return scored


def start_run(output: Path, model_dir: Path, settings, held_out: list[str], log, prepare: Callable):
    """Seed torch, record ``settings.json``, then with the base model loaded: ``prepared = prepare(base, tokenizer)``
    (what else the run needs of it) and the base model's held-out scores. ``(encoder, {"reference": scores},
    prepared)``."""
    import torch

    torch.manual_seed(settings.seed)
    output.mkdir(parents=True, exist_ok=True)
    (output / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    encoder = load_encoder(log)
    base, tokenizer = load_model(model_dir, settings.dtype)
    prepared = prepare(base, tokenizer)
    reference = scored_policy(output, "reference", base, tokenizer, held_out, settings, encoder, log)
    return encoder, {"reference": reference}, prepared


def train_seeded(train: Callable[[str, Path], object], name: str, adapter: Path, seed: int) -> None:
    """``train(name, adapter)`` from the random state ``seed`` gives (LoRA initialisation, dropout, sampling),
    timed in ``adapter/train_seconds.json``: a method trains the same whichever methods ran before it in the
    process, so splitting a run with ``--methods`` or resuming it changes nothing."""
    from transformers import set_seed

    set_seed(seed)
    start = time.perf_counter()
    train(name, adapter)
    (adapter / "train_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))


def train_and_score(output: Path, model_dir: Path, held_out: list[str], settings, encoder, log, what: str,
                    train: Callable[[str, Path], object]) -> dict:
    """``{method: scores}`` for each of ``settings.methods``: its adapter in ``adapters/<method>/``, trained by
    ``train(method, directory)`` (timed in ``train_seconds.json``) unless already saved, then scored on
    ``held_out``."""
    scores = {}
    for name in settings.methods:
        adapter = output / "adapters" / name
        if not (adapter / "adapter_model.safetensors").is_file():
            log(f"training {name} {what}")
            train_seeded(train, name, adapter, settings.seed)
        policy, tokenizer = load_model(model_dir, settings.dtype, adapter)
        scores[name] = scored_policy(output, name, policy, tokenizer, held_out, settings, encoder, log)
    return scores


def report_of(settings, beta: float, methods: dict, model_dir: Path, train: list[str], held_out: list[str],
              scores: dict, **extra) -> dict:
    """A run's ``report.json``: settings, each method's own settings, the questions, ``extra``, then ``methods``
    (each policy's scores without the per-question details)."""
    from ..real_model import WEIGHTS_NOTE

    return {"seed": settings.seed, "quick": settings.quick, "settings": asdict(settings), "beta": beta,
            "methods_settings": {k: {"loss_method": v[0], **v[1]} for k, v in methods.items()},
            "model": str(model_dir), "weights": WEIGHTS_NOTE, "held_out": held_out, "train": train, **extra,
            "methods": {k: {m: v for m, v in s.items() if m != "questions"} for k, s in scores.items()}}


def write_plots(report: dict, output: Path) -> None:
    """``entropy_vs_accuracy.png`` (the paper's Figure 2 on a real model) and ``pass_at_k.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, row in report["methods"].items():
        ax.scatter(row["accuracy"], row["correct_entropy"], s=40)
        ax.annotate(name, (row["accuracy"], row["correct_entropy"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.set(xlabel="accuracy (held-out)", ylabel="correct-answer entropy (nats)",
           title="Diversity of correct answers against accuracy")
    fig.tight_layout()
    fig.savefig(output / "entropy_vs_accuracy.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, row in report["methods"].items():
        ks = sorted(int(k) for k in row["pass_at_k"])
        ax.plot(ks, [row["pass_at_k"][str(k)] for k in ks], marker="o", markersize=3, label=name)
    ax.set(xlabel="k (samples)", ylabel="pass@k", title="pass@k on held-out questions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "pass_at_k.png", dpi=100)
    plt.close(fig)


def write_report(report: dict, output: Path, markdown: str) -> None:
    """``report.json``, the pictures and ``report.md`` (``markdown``) in ``output``."""
    (output / "report.json").write_text(json.dumps(report, indent=2))
    write_plots(report, output)
    (output / "report.md").write_text(markdown)


def table_rows(report: dict) -> list[tuple[str, ...]]:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    return [(name, f"{row['accuracy']:.3f}", f"{row['correct_entropy']:.3f}", f"{row['distinct_correct']:.2f}",
             f"{row['pass_at_k']['1']:.3f}", fmt(row["pass_at_k"].get("16"), ".3f"), f"{row['lexical']:.1f}",
             fmt(row["semantic"], ".1f")) for name, row in report["methods"].items()]


HEADER = ("policy", "accuracy", "correct entropy", "distinct correct", "pass@1", "pass@16", "lexical", "semantic")
FOOTNOTE = ("Held-out, {n} samples per question at temperature 1; means over questions. correct entropy: entropy of "
            "the distribution of correct answers (normalised), renormalised; lexical and semantic: guo2024 diversity "
            "(x100) of each question's samples.")


def markdown_table(report: dict) -> list[str]:
    """The report's table and its footnote, as Markdown lines."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    return lines + ["", FOOTNOTE.format(n=report["settings"]["eval_samples"]), ""]


def print_report(title: str, report: dict, output: Path) -> None:
    """The measured table and where the files are, on the terminal."""
    from . import world

    world.print_summary(title, HEADER, table_rows(report), f"Model: {report['weights']}.", [
        f"\nReport: {output / 'report.md'}  Pictures: {output / 'entropy_vs_accuracy.png'}, "
        f"{output / 'pass_at_k.png'}"])


__all__ = ["HEADER", "LORA_MODULES", "RealSettings", "save_trained", "load_encoder", "load_model", "lora_config", "markdown_table",
           "print_report", "report_of", "sample_policy", "scored_policy", "start_run", "table_rows", "train_and_score",
           "write_plots", "write_report"]
