"""``qempo-lite demo --online``: QEMPO keeps several correct answers where GVPO collapses.

Six questions with several verifiably correct answers ("Name a prime below 30.") are put to a
tiny model of :mod:`qempo_lite.demo.world` (every answer is one token, so every answer
distribution is known exactly). The reference is fitted to favour one or two correct answers
and to give some wrong ones. ``qempo`` (Eq. 9, quality gate ``correct``) and ``gvpo`` (Eq. 8
with a = c = β, the paper's online RLHF) are trained from it with
:class:`~qempo_lite.online.QEMPOOnlineTrainer` on groups of sampled answers scored by a checker
(reward 1 for a correct answer, 0 otherwise), with every setting shared except the loss.

Their optima (Table 1 with this reward): ``gvpo``'s is π ∝ π_ref exp(r/β), the reference's
skew among the correct answers; ``qempo``'s is π ∝ exp(r/β), every correct answer equally
likely; with the gate, wrong answers get no entropy term, only the reward's push down, so
their probability goes to 0 and the gated optimum is uniform over the correct answers.

Reported per policy: ``accuracy`` and ``correct_entropy`` (entropy of the answer distribution
restricted to the correct answers, renormalised) from the exact distribution;
``distinct_correct`` and ``pass_at_k`` (k = 1…16, the unbiased estimator) from samples; and
``predicted_correct_entropy`` from the closed form.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from . import world

NUMBERS = [str(n) for n in range(1, 31)]


def _primes(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


# (prompt, is the answer correct?, the correct answers the reference favours, wrong answers it gives)
TASKS = [
    ("Name a prime below 30.", lambda n: n < 30 and _primes(n), ["7", "3"], ["9", "15", "21", "27"]),
    ("Name a multiple of 7 below 30.", lambda n: n < 30 and n % 7 == 0, ["14", "21"], ["17", "27"]),
    ("Name an even number below 20.", lambda n: n < 20 and n % 2 == 0, ["4", "10"], ["3", "20"]),
    ("Name a square below 30.", lambda n: n < 30 and round(n ** 0.5) ** 2 == n, ["9", "16"], ["8", "12", "30"]),
    ("Name an odd number below 20.", lambda n: n < 20 and n % 2 == 1, ["7", "9"], ["2", "21"]),
    ("Name a multiple of 3 below 30.", lambda n: n < 30 and n % 3 == 0, ["9", "12"], ["10", "20"]),
]
BETA = 0.3  # one β for both methods; r/β ≈ 3.3 already makes wrong answers rare in both optima
METHODS = {"qempo": {"gate": "correct"}, "gvpo": {"gate": "none"}}  # gvpo is plain GVPO: the gate is QEMPO's
KS = list(range(1, 17))
SHOWN_PROMPTS = (0, 1, 3)


@dataclass
class OnlineSettings:
    """Every setting of the two trainings: they share all of it (only the loss differs between them)."""

    seed: int = 0
    quick: bool = False
    rollout: str = "hf"
    steps: int = 300
    num_generations: int = 16  # completions per prompt: one group
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "linear"
    lora_r: int = 16
    samples_per_prompt: int = 64

    @classmethod
    def make(cls, seed: int, quick: bool, rollout: str) -> "OnlineSettings":
        if quick:
            return cls(seed=seed, quick=True, rollout=rollout, steps=120)
        return cls(seed=seed, rollout=rollout)


def prompts() -> list[str]:
    return [task[0] for task in TASKS]


def is_correct(task_id: int, answer: str) -> bool:
    """The checker: is ``answer`` a number that answers task ``task_id``?"""
    answer = answer.strip()
    return answer.isdigit() and TASKS[task_id][1](int(answer))


def number_reward(prompts, completions, task, **kwargs) -> list[float]:
    """TRL reward function: 1.0 for a correct answer to the row's task, 0.0 otherwise."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if is_correct(int(t), text) else 0.0 for text, t in zip(texts, task)]


def _reference_target(task_id: int) -> dict[str, float]:
    """One or two favoured correct answers, a little on the other correct ones, 20% on wrong ones."""
    _, _, favoured, wrong = TASKS[task_id]
    others = [n for n in NUMBERS if is_correct(task_id, n) and n not in favoured]
    target = {favoured[0]: 0.45, favoured[1]: 0.25}
    target.update({n: 0.08 / len(others) for n in others})
    target.update({n: 0.20 / len(wrong) for n in wrong})
    return target


def train_adapter(method: str, base: Path, out: Path, settings: OnlineSettings, rollout_engine=None) -> Path:
    """One LoRA adapter trained online with ``method``; only the loss (and its gate) differ between methods."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..online import QEMPOOnlineConfig, QEMPOOnlineTrainer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    rows = [{"prompt": [{"role": "user", "content": p}], "task": i} for i, p in enumerate(prompts())]
    per_step = len(rows) * settings.num_generations
    args = QEMPOOnlineConfig(
        output_dir=str(out), loss_method=method, beta=BETA, gate=METHODS[method]["gate"], advantage="center",
        rollout=settings.rollout, vllm_gpu_memory_utilization=0.25, vllm_max_model_length=64, vllm_dtype="float32",
        num_generations=settings.num_generations, per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        max_completion_length=1, temperature=1.0, top_p=1.0,
        learning_rate=settings.learning_rate, lr_scheduler_type=settings.lr_scheduler_type, warmup_steps=0,
        max_steps=settings.steps, logging_steps=25, save_strategy="no", report_to=[], seed=settings.seed,
        use_cpu=True, disable_tqdm=True,
        # As in the offline demo: TRL's default gradient checkpointing would only recompute the tiny model's forward.
        gradient_checkpointing=False,
    )
    peft_config = world.demo_lora(settings.lora_r)
    trainer = QEMPOOnlineTrainer(model=model, reward_funcs=number_reward, args=args,
                                 train_dataset=datasets.Dataset.from_list(rows * settings.steps),
                                 processing_class=tokenizer, peft_config=peft_config, rollout_engine=rollout_engine)
    world.silence_printer(trainer)
    try:
        trainer.train()
    finally:
        trainer.close_rollout()
    return world.save_demo_adapter(trainer, out, base, "qempo-lite online demo questions", len(rows), mode="online")


def _correct_mask(names: list[str]):
    import torch

    return torch.tensor([[is_correct(t, n) for n in names] for t in range(len(TASKS))])


def _restricted_entropy(probs, mask) -> float:
    """Mean over prompts of the entropy of the distribution restricted to the correct answers, renormalised."""
    from ..theory import entropy

    values = []
    for p, m in zip(probs, mask):
        kept = p[m]
        values.append(float(entropy(kept / kept.sum())))
    return sum(values) / len(values)


def predict(ref_probs, names: list[str], method: str | None):
    """Each prompt's closed-form optimum (the reference itself for ``None``)."""
    import torch

    from ..theory import optimal_policy

    if method is None:
        return ref_probs.clone()
    mask = _correct_mask(names)
    rewards = mask.double()
    if method == "qempo":
        # With the gate, wrong answers get no entropy term, only the reward's push down, which never stops
        # while they keep any probability: the optimum is π ∝ exp(r/β) with the wrong answers at 0.
        optimum = torch.stack([optimal_policy("qempo", r, beta=BETA) for r in rewards]) * mask
        return optimum / optimum.sum(-1, keepdim=True)
    return torch.stack([optimal_policy("rlhf", r, p, beta=BETA) for r, p in zip(rewards, ref_probs)])


def measure(probs, predicted, samples: list[list[str]], names: list[str]) -> dict:
    """The report's five numbers for one policy (means over prompts)."""
    from ..evaluate.passk import pass_at_k_curve

    mask = _correct_mask(names)
    correct_counts = [sum(is_correct(t, a) for a in answers) for t, answers in enumerate(samples)]
    distinct = [len({a for a in answers if is_correct(t, a)}) for t, answers in enumerate(samples)]
    curve = pass_at_k_curve(len(samples[0]), correct_counts, KS)
    return {
        "accuracy": float((probs * mask).sum(-1).mean()),
        "correct_entropy": _restricted_entropy(probs, mask),
        "distinct_correct": sum(distinct) / len(distinct),
        "pass_at_k": {str(k): float(curve[k]) for k in KS},
        "predicted_correct_entropy": _restricted_entropy(predicted, mask),
    }


def checks(methods: dict) -> list[dict]:
    """The online demo's claim: qempo keeps several correct answers where gvpo collapses, at no loss of accuracy."""
    q, g = methods["qempo"], methods["gvpo"]
    spread = q["correct_entropy"] - g["correct_entropy"]
    return [
        {"check": "qempo correct_entropy ≥ gvpo's + 0.3", "passed": spread >= 0.3,
         "detail": f"{q['correct_entropy']:.3f} vs {g['correct_entropy']:.3f} ({spread:+.3f} nats)"},
        {"check": "qempo accuracy ≥ gvpo's − 0.05", "passed": q["accuracy"] >= g["accuracy"] - 0.05,
         "detail": f"{q['accuracy']:.3f} vs {g['accuracy']:.3f}"},
    ]


def write_plots(exact: dict, predicted: dict, methods: dict, names: list[str], output: Path) -> None:
    """``distributions.png`` (answer distributions, closed form outlined) and ``pass_at_k.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for task_id in SHOWN_PROMPTS:
        shown = [n for n in NUMBERS if is_correct(task_id, n)] + TASKS[task_id][3]
        rows.append({"task_id": task_id, "shown": shown, "index": [names.index(a) for a in shown],
                     "colours": ["tab:green" if is_correct(task_id, a) else "tab:red" for a in shown] + ["tab:gray"],
                     "label": TASKS[task_id][0], "other": "other"})
    masks = _correct_mask(names)

    def title(policy, p, q, task_id):
        def h(probs):
            return _restricted_entropy(probs.unsqueeze(0), masks[task_id].unsqueeze(0))

        suffix = "" if policy == "reference" else f" (optimum {h(q):.2f})"
        return f"{policy}: H(correct) = {h(p):.2f}{suffix}"

    world.plot_distributions(exact, predicted, rows, title, "Exact answer distributions after online training "
                             "(bars; green correct, red wrong) and each method's closed-form optimum (black outline)",
                             output / "distributions.png", 4.2)

    mask = _correct_mask(names).double()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, row in methods.items():
        left.plot(KS, [row["pass_at_k"][str(k)] for k in KS], marker="o", markersize=3, label=name)
        # E[distinct correct answers in k samples] = Σ over correct y of 1 − (1 − π(y))^k (exact)
        coverage = [float((mask * (1 - (1 - exact[name]) ** k)).sum(-1).mean()) for k in KS]
        right.plot(KS, coverage, marker="o", markersize=3, label=name)
    left.set(xlabel="k (samples)", ylabel="pass@k", title="pass@k (from samples)")
    right.set(xlabel="k (samples)", ylabel="expected distinct correct answers",
              title="distinct correct answers in k samples (exact)")
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.suptitle("Mean over the questions", fontsize=10)
    fig.tight_layout()
    fig.savefig(output / "pass_at_k.png", dpi=100)
    plt.close(fig)


def run_online_demo(output: Path, *, seed: int = 0, quick: bool = False, rollout: str = "hf", log=print) -> dict:
    """Run the online demo; write ``report.md``, ``report.json``, ``distributions.png``, ``pass_at_k.png``,
    the reference (``base/``) and the adapters (``adapters/<method>/``) under ``output``; return the report."""
    import torch

    settings = OnlineSettings.make(seed, quick, rollout)
    output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # a model this small is dominated by per-op overhead
    with world.quiet_progress():
        return _run(output, settings, log)


def _run(output: Path, settings: OnlineSettings, log) -> dict:
    seed, quick, rollout = settings.seed, settings.quick, settings.rollout
    base = world.build_reference(output, prompts=prompts(), words=world.words_of(prompts(), NUMBERS),
                                 target=_reference_target, seed=seed, log=log)
    engine = _shared_engine(base, settings) if rollout == "vllm" else None
    try:
        reference = world.load_policy(base)
        tokenizer = _tokenizer(base)
        names = world.token_names(tokenizer)
        exact = {"reference": world.answer_distribution(reference, tokenizer, prompts())}
        predicted = {"reference": exact["reference"]}
        samples = {"reference": world.sample_answers(reference, tokenizer, prompts(), settings.samples_per_prompt,
                                                     seed)}
        for method in METHODS:
            log(f"training the {method} adapter online ({settings.steps} steps, {settings.rollout} rollouts)")
            adapter = train_adapter(method, base, output / "adapters" / method, settings, engine)
            policy = world.load_policy(base, adapter)
            exact[method] = world.answer_distribution(policy, tokenizer, prompts())
            predicted[method] = predict(exact["reference"], names, method)
            samples[method] = world.sample_answers(policy, tokenizer, prompts(), settings.samples_per_prompt, seed)
    finally:
        if engine is not None:
            engine.close()
    methods = {name: measure(exact[name], predicted[name], samples[name], names) for name in exact}
    results = checks(methods)
    verdict = _verdict(results)
    write_plots(exact, predicted, methods, names, output)
    report = {"seed": seed, "quick": quick, "settings": asdict(settings), "beta": BETA, "objectives": METHODS,
              "base_model": str(base), "methods": methods, "checks": results, "verdict": verdict}
    (output / "report.json").write_text(json.dumps(report, indent=2))
    (output / "report.md").write_text(report_markdown(report))
    return report


def _shared_engine(base: Path, settings: OnlineSettings):
    """One vLLM engine serving the reference, shared by both trainings (each syncs its adapter to it)."""
    import os

    from transformers import AutoModelForCausalLM

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's start-up report would bury the demo's

    from ..rollout import VLLMLoRAEngine

    # float32, as the trainer computes the log-probs in: the sampled policy is the trained one.
    return VLLMLoRAEngine(AutoModelForCausalLM.from_pretrained(base), max_lora_rank=settings.lora_r, max_model_len=64,
                          gpu_memory_utilization=0.25, dtype="float32", seed=settings.seed,
                          tokenizer=_tokenizer(base))


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def _verdict(results: list[dict]) -> str:
    if all(r["passed"] for r in results):
        head = ("QEMPO keeps the correct answers spread where GVPO keeps the reference's favourites, at no loss of "
                "accuracy.")
    else:
        head = "The online demo's claim did NOT fully hold on this run (marked below)."
    return head + "\n\n" + "\n".join(f"- {'ok' if r['passed'] else 'FAILED'}: {r['check']}: {r['detail']}"
                                     for r in results)


def report_markdown(report: dict) -> str:
    s = report["settings"]
    gates = ", ".join(f"{m} ungated" if c["gate"] == "none" else f"{m} gate `{c['gate']}`" for m, c in METHODS.items())
    intro = (
        f"{world.settings_heading(s)}, {s['rollout']} rollouts. {len(TASKS)} questions, groups of "
        f"{s['num_generations']} one-token answers, reward 1 for a correct answer. Shared settings: β = {BETA}, "
        f"{s['steps']} steps, lr {s['learning_rate']} ({s['lr_scheduler_type']} decay), LoRA r {s['lora_r']}; "
        f"{gates}.")
    header = ("policy", "accuracy", "correct entropy", "optimum's correct entropy", "distinct correct", "pass@1",
              "pass@4", "pass@16")
    rows = [(name, f"{row['accuracy']:.3f}", f"{row['correct_entropy']:.3f}",
             f"{row['predicted_correct_entropy']:.3f}", f"{row['distinct_correct']:.2f}",
             *(f"{row['pass_at_k'][k]:.3f}" for k in ("1", "4", "16"))) for name, row in report["methods"].items()]
    footnote = (
        "accuracy and correct entropy: exact (the probability of a correct answer; the entropy of the answer "
        "distribution restricted to the correct answers, renormalised), means over the questions. distinct "
        f"correct and pass@k: from {s['samples_per_prompt']} samples per question (pass@k with the unbiased "
        "estimator).")
    return world.markdown_report("qempo-lite demo (online): diversity among correct answers", intro, header, rows,
                                 footnote, report["verdict"])


def print_report(report: dict, output: Path) -> None:
    """The measured table, the checks and where the files are, on the terminal."""
    header = ("policy", "accuracy", "correct entropy", "optimum", "distinct correct", "pass@1", "pass@16")
    rows = [(name, f"{row['accuracy']:.3f}", f"{row['correct_entropy']:.3f}",
             f"{row['predicted_correct_entropy']:.3f}", f"{row['distinct_correct']:.2f}",
             f"{row['pass_at_k']['1']:.3f}", f"{row['pass_at_k']['16']:.3f}") for name, row in report["methods"].items()]
    world.print_summary("qempo-lite demo (online): correct answers kept", header, rows, report["verdict"], [
        f"\nReport: {output / 'report.md'}  Pictures: {output / 'distributions.png'}, {output / 'pass_at_k.png'}"])
