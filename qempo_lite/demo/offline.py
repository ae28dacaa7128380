"""``qempo-lite demo``: the paper's Figure 1, offline, on a laptop CPU, and Table 1 reached exactly.

Six questions with many valid answers ("Name a colour.") are put to a tiny model (see
:mod:`qempo_lite.demo.world`: every answer is one token of a word-level vocabulary, so the
answer distribution is known exactly). The reference is fitted to a narrow distribution: a few
valid answers dominate, some answers are invalid. A Bradley–Terry judge prefers a valid answer
to an invalid one with probability ``P_VALID_WINS`` and two valid (or two invalid) answers
equally, so ``r(valid) − r(invalid) = logit(P_VALID_WINS)`` and each method's population
optimum is its Table 1 closed form ``π ∝ π_ref^(c/a) exp(r/a)`` (:mod:`qempo_lite.theory`).

The preference pairs cover the candidate set evenly: every (valid, valid) and (valid, any
other word) pair of every prompt, as a block of ``BLOCK`` rows whose orders follow the judge's
probabilities exactly (3:1 or 2:2). Every block is the judge's expected label, so the data
carry no label noise, and with the rows fed in whole blocks (sequential sampler over a stream
shuffled block by block) every batch's gradient vanishes at the optimum. The optimum does not
depend on which pairs are labelled, as long as they connect every output; following the
skewed reference's own samples instead would leave the rare valid answers almost unpaired.

LoRA adapters are trained for ``dpo``, ``spl``, ``qempo_kl`` and ``qempo`` through
:class:`~qempo_lite.offline.QEMPOTrainer` with every setting shared except the loss, and each
policy's exact answer entropy and quality are compared with its closed form.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from . import world

P_VALID_WINS = 0.75
REWARD_GAP = math.log(P_VALID_WINS / (1 - P_VALID_WINS))  # r(valid) − r(invalid) under Bradley–Terry
BLOCK = 4  # rows per labelled pair: 3 + 1 when one answer is valid and the other not, 2 + 2 otherwise

# (prompts, valid answers from the one the reference prefers most to the one it prefers least,
# invalid answers the reference sometimes gives). Every other word of the vocabulary is invalid too.
TASKS = [
    (["Name a colour."], ["Red", "Blue", "Green", "Yellow", "Purple", "Orange", "Pink", "Brown"], ["Apple", "Banana"]),
    (["Name a fruit."], ["Apple", "Banana", "Orange", "Cherry", "Grape", "Lemon", "Mango", "Plum"], ["Red", "Dog"]),
    (["Name a citrus fruit."], ["Orange", "Lemon", "Lime", "Grapefruit", "Mandarin"], ["Apple", "Banana"]),
    (["Name an animal."], ["Dog", "Cat", "Horse", "Eagle", "Owl", "Fish", "Bee", "Bat"], ["Apple", "Blue"]),
    (["Name an animal that can fly."], ["Eagle", "Owl", "Bee", "Bat", "Sparrow", "Parrot"], ["Dog", "Fish"]),
    (["Name a pet."], ["Dog", "Cat", "Fish", "Parrot", "Horse", "Rabbit"], ["Eagle", "Lemon"]),
]

# One policy coefficient a = 0.15 for every method, so that r/a ≈ 7.3 keeps invalid answers rare
# in every optimum; the reference coefficient c sets how much of the reference's skew survives:
# dpo keeps all of it (c/a = 1), qempo_kl 5/7 (the paper's ratio β2/β1 = 2.5), spl half (α = 2β),
# qempo none (c = 0). Listed from the most reference-bound to the least.
POLICY_COEF = 0.15
METHODS = {
    "dpo": {"beta": POLICY_COEF},
    "spl": {"alpha": POLICY_COEF, "beta": POLICY_COEF / 2},
    "qempo_kl": {"beta1": POLICY_COEF / 3.5, "beta2": POLICY_COEF * 2.5 / 3.5},
    "qempo": {"beta": POLICY_COEF},
}
SHOWN_PROMPTS = (0, 2, 4)  # the prompts drawn in distributions.png


@dataclass
class DemoSettings:
    """Every setting of the four trainings: they share all of it (only the loss differs between them)."""

    seed: int = 0
    quick: bool = False
    steps: int = 300
    batch_size: int = 64  # rows per optimizer step: 16 whole blocks
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "linear"  # decays to 0, so the last steps settle on the optimum
    lora_r: int = 16
    samples_per_prompt: int = 64
    tolerance: float = 0.10  # nats between each method's exact entropy and its prediction

    @classmethod
    def make(cls, seed: int, quick: bool) -> "DemoSettings":
        if quick:
            return cls(seed=seed, quick=True, steps=120, samples_per_prompt=32, tolerance=0.15)
        return cls(seed=seed)


def prompts() -> list[str]:
    return [task[0][0] for task in TASKS]


def is_valid(task_id: int, answer: str) -> bool:
    """The programmatic judge: is ``answer`` one of the task's valid answers?"""
    return answer.strip().rstrip(".").lower() in {v.lower() for v in TASKS[task_id][1]}


def _vocabulary() -> list[str]:
    return world.words_of(prompts(), [a for _, valid, invalid in TASKS for a in valid + invalid])


def _reference_target(task_id: int) -> dict[str, float]:
    """The narrow reference: Zipf-like over the valid answers (a few dominate), 10% on the invalid ones."""
    _, valid, invalid = TASKS[task_id]
    weights = [1.0 / (rank + 1) ** 1.6 for rank in range(len(valid))]
    target = {answer: 0.9 * w / sum(weights) for answer, w in zip(valid, weights)}
    for answer in invalid:
        target[answer] = target.get(answer, 0.0) + 0.1 / len(invalid)
    return target


def preference_blocks(names: list[str]) -> list[list[dict]]:
    """Every (valid, valid) and (valid, invalid) answer pair of every prompt, each a block of ``BLOCK`` rows
    whose chosen/rejected orders follow the judge's probabilities exactly."""
    wins_strict = round(BLOCK * P_VALID_WINS)
    blocks = []
    for task_id, prompt in enumerate(prompts()):
        valid = [is_valid(task_id, n) for n in names]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                if not (valid[i] or valid[j]):
                    continue
                if valid[i] == valid[j]:
                    first_wins = BLOCK // 2
                else:
                    first_wins = wins_strict if valid[i] else BLOCK - wins_strict
                block = []
                for k in range(BLOCK):
                    chosen, rejected = (i, j) if k < first_wins else (j, i)
                    block.append({"prompt": [{"role": "user", "content": prompt}],
                                  "chosen": [{"role": "assistant", "content": names[chosen]}],
                                  "rejected": [{"role": "assistant", "content": names[rejected]}]})
                blocks.append(block)
    return blocks


def train_adapter(method: str, base: Path, rows: list[dict], out: Path, settings: DemoSettings, *,
                  prepared=None) -> Path:
    """One LoRA adapter trained with ``method`` through the QEMPOTrainer users run; only the loss differs. With
    ``prepared`` (another trainer's ``train_dataset``, or the folder where :func:`_train_all` saved it), the rows
    come tokenized and scored by the reference from there."""
    return _train(_trainer(method, base, rows, out, settings, prepared), out, base, len(rows))


def _trainer(method: str, base: Path, rows: list[dict], out: Path, settings: DemoSettings, prepared=None):
    """The QEMPOTrainer of ``method`` on ``rows`` (or on ``prepared``, a dataset or its folder: see train_adapter)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..offline import QEMPOConfig, QEMPOTrainer

    if prepared is None:
        data = datasets.Dataset.from_list(rows)
    else:
        data = prepared if isinstance(prepared, datasets.Dataset) else datasets.load_from_disk(prepared)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    args = QEMPOConfig(
        output_dir=str(out), loss_method=method, **METHODS[method],
        # Prepared rows carry the reference's log-probs already.
        precompute_ref_log_probs=prepared is None, precompute_ref_batch_size=1024,
        learning_rate=settings.learning_rate, lr_scheduler_type=settings.lr_scheduler_type, warmup_steps=0,
        max_steps=settings.steps, per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=1,
        # The rows arrive in whole blocks (see the module docstring), so the sampler must keep their order;
        # each pass over the data (about 115 steps) repeats it.
        train_sampling_strategy="sequential", max_length=32, logging_steps=50, save_strategy="no", report_to=[],
        seed=settings.seed, use_cpu=True, disable_tqdm=True,
        # TRL turns gradient checkpointing on by default; on a model this small it only recomputes every layer's
        # forward in the backward pass (the same ops on the same inputs, so the same numbers, a third slower).
        gradient_checkpointing=False,
    )
    peft_config = world.demo_lora(settings.lora_r)
    trainer = QEMPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                           peft_config=peft_config)
    world.silence_printer(trainer)
    return trainer


def _train(trainer, out: Path, base: Path, rows: int) -> Path:
    trainer.train()
    return world.save_demo_adapter(trainer, out, base, "qempo-lite demo preferences", rows)


def _entropy_of_counts(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values() if c)


def _rewards(names: list[str], task_id: int):
    import torch

    return torch.tensor([REWARD_GAP if is_valid(task_id, n) else 0.0 for n in names], dtype=torch.float64)


def measure(probs, samples: list[list[str]], names: list[str]) -> dict:
    """Exact entropy and quality of the answer distributions, and the samples' statistics; means over prompts."""
    from ..theory import entropy

    rows = {"exact_entropy": [], "exact_quality": [], "entropy": [], "quality": [], "distinct": []}
    for task_id, answers in enumerate(samples):
        p = probs[task_id]
        rows["exact_entropy"].append(float(entropy(p)))
        rows["exact_quality"].append(sum(float(p[i]) for i, n in enumerate(names) if is_valid(task_id, n)))
        counts = Counter(answers)
        rows["entropy"].append(_entropy_of_counts(counts))
        rows["quality"].append(sum(is_valid(task_id, a) for a in answers) / len(answers))
        rows["distinct"].append(len({a for a in answers if is_valid(task_id, a)}))
    return {key: sum(values) / len(values) for key, values in rows.items()}


def predict(ref_probs, names: list[str], method: str | None):
    """Each prompt's Table 1 optimum of ``method`` (the reference itself for ``None``), as a tensor."""
    import torch

    from ..theory import optimal_policy

    if method is None:
        return ref_probs.clone()
    return torch.stack([optimal_policy(method, _rewards(names, t), ref_probs[t], **METHODS[method])
                        for t in range(len(TASKS))])


def _summary(probs, predicted, names: list[str]) -> dict:
    from ..theory import entropy

    ent = [float(entropy(predicted[t])) for t in range(len(TASKS))]
    qual = [sum(float(predicted[t][i]) for i, n in enumerate(names) if is_valid(t, n)) for t in range(len(TASKS))]
    return {"predicted_entropy": sum(ent) / len(ent), "predicted_quality": sum(qual) / len(qual)}


def checks(methods: dict, tolerance: float) -> list[dict]:
    """The demo's claims, each with the figures it rests on (exact answer distributions, means over prompts)."""
    out = []
    for name in METHODS:
        row = methods[name]
        gap = row["exact_entropy"] - row["predicted_entropy"]
        out.append({"check": f"{name} reaches its Table 1 entropy", "passed": abs(gap) <= tolerance,
                    "detail": f"{row['exact_entropy']:.3f} vs predicted {row['predicted_entropy']:.3f} "
                              f"(off by {gap:+.3f}, tolerance {tolerance:.2f})"})
    spread = methods["qempo"]["exact_entropy"] - methods["dpo"]["exact_entropy"]
    out.append({"check": "qempo spreads over the valid answers: H(qempo) − H(dpo) ≥ 0.4", "passed": spread >= 0.4,
                "detail": f"{spread:+.3f} nats"})
    ref_quality = methods["reference"]["exact_quality"]
    for name in METHODS:
        quality = methods[name]["exact_quality"]
        out.append({"check": f"{name} quality ≥ the reference's", "passed": quality >= ref_quality,
                    "detail": f"{quality:.3f} vs {ref_quality:.3f}"})
    qempo, dpo = methods["qempo"]["exact_quality"], methods["dpo"]["exact_quality"]
    out.append({"check": "qempo quality ≥ dpo's − 0.05", "passed": qempo >= dpo - 0.05,
                "detail": f"{qempo:.3f} vs {dpo:.3f}"})
    return out


def write_plot(exact: dict, predicted: dict, names: list[str], path: Path) -> None:
    """Exact answer distributions (bars) with each method's Table 1 optimum outlined, for three prompts."""
    from ..theory import entropy

    rows = []
    for task_id in SHOWN_PROMPTS:
        valid = [n for n in names if is_valid(task_id, n)]
        invalid = [a for a in TASKS[task_id][2] if a not in valid]
        shown = sorted(valid, key=lambda a: -float(exact["reference"][task_id][names.index(a)])) + invalid
        rows.append({"task_id": task_id, "shown": shown, "index": [names.index(a) for a in shown],
                     "colours": ["tab:green"] * len(valid) + ["tab:red"] * len(invalid) + ["tab:gray"],
                     "label": prompts()[task_id], "other": "other words"})

    def title(policy, p, q, task_id):
        suffix = "" if policy == "reference" else f" (Table 1: {float(entropy(q)):.2f})"
        return f"{policy}: H = {float(entropy(p)):.2f}{suffix}"

    world.plot_distributions(exact, predicted, rows, title, "Exact answer distributions after training (bars; green "
                             "valid, red invalid) and each method's Table 1 optimum (black outline)", path, 3.0)


def report_markdown(report: dict) -> str:
    s = report["settings"]
    intro = (
        f"{world.settings_heading(s)}. {len(TASKS)} prompts; judge: valid beats invalid with p = {P_VALID_WINS} "
        f"(r(valid) − r(invalid) = {REWARD_GAP:.3f}), ties otherwise. Shared settings: {s['steps']} steps of "
        f"{s['batch_size']} rows, lr {s['learning_rate']} ({s['lr_scheduler_type']} decay), LoRA r {s['lora_r']}; "
        "coefficients " + "; ".join(
            f"{m} " + ", ".join(f"{k} = {v:.4g}" for k, v in c.items()) for m, c in METHODS.items()) + ".")
    header = ("policy", "exact entropy", "Table 1 entropy", "exact quality", "Table 1 quality", "sampled entropy",
              "sampled quality", "distinct valid (sampled)")
    rows = [(name, f"{row['exact_entropy']:.3f}", f"{row['predicted_entropy']:.3f}", f"{row['exact_quality']:.3f}",
             f"{row['predicted_quality']:.3f}", f"{row['entropy']:.3f}", f"{row['quality']:.3f}",
             f"{row['distinct']:.2f}") for name, row in report["methods"].items()]
    footnote = (
        "Exact columns: the policy's own probability of every possible answer (each answer is one token of the "
        "model's word vocabulary), entropy in nats and quality = probability of a valid answer, means over prompts. "
        "Table 1 columns: the method's closed-form optimum for this reference and judge. Sampled columns: "
        f"{s['samples_per_prompt']} samples per prompt.")
    return world.markdown_report("qempo-lite demo (offline): every method at its Table 1 optimum", intro, header,
                                 rows, footnote, report["verdict"])


def run_demo(output: Path, *, seed: int = 0, quick: bool = False, log=print) -> dict:
    """Run the offline demo; write ``report.md``, ``report.json``, ``distributions.png``, the reference
    (``base/``) and the adapters (``adapters/<method>/``) under ``output``; return the report."""
    import torch

    settings = DemoSettings.make(seed, quick)
    output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # a model this small is dominated by per-op overhead
    with world.quiet_progress(), _helpers() as (pool, helpers):
        return _run(output, settings, log, pool, helpers)


def _run(output: Path, settings: DemoSettings, log, pool, helpers: int) -> dict:
    seed, quick = settings.seed, settings.quick
    base = world.build_reference(output, prompts=prompts(), words=_vocabulary(), target=_reference_target, seed=seed,
                                 log=log)
    reference = world.load_policy(base)
    tokenizer = _tokenizer(base)
    names = world.token_names(tokenizer)
    rows = world.shuffled_blocks(preference_blocks(names), seed + 1)
    exact = {"reference": world.answer_distribution(reference, tokenizer, prompts())}
    predicted = {"reference": exact["reference"]}
    samples = {"reference": world.sample_answers(reference, tokenizer, prompts(), settings.samples_per_prompt, seed)}
    adapters = _train_all(base, rows, output, settings, log, pool, helpers)
    for method in METHODS:
        policy = world.load_policy(base, adapters[method])
        exact[method] = world.answer_distribution(policy, tokenizer, prompts())
        predicted[method] = predict(exact["reference"], names, method)
        samples[method] = world.sample_answers(policy, tokenizer, prompts(), settings.samples_per_prompt, seed)
    methods = {name: {**measure(exact[name], samples[name], names), **_summary(exact[name], predicted[name], names)}
               for name in exact}
    results = checks(methods, settings.tolerance)
    verdict = _verdict(results)
    write_plot(exact, predicted, names, output / "distributions.png")
    report = {"seed": seed, "quick": quick, "settings": asdict(settings), "p_valid_wins": P_VALID_WINS,
              "reward_gap": REWARD_GAP, "coefficients": METHODS, "base_model": str(base), "methods": methods,
              "checks": results, "verdict": verdict,
              "histograms": {name: [dict(Counter(a)) for a in s] for name, s in samples.items()}}
    (output / "report.json").write_text(json.dumps(report, indent=2))
    (output / "report.md").write_text(report_markdown(report))
    return report


def _helper_process() -> None:
    """A process that trains beside the main one: one thread, and bitsandbytes' notice about an optional 4-bit CPU
    kernel silenced (the demo has no 4-bit layer), as in the main process; it imports the trainer at once, while
    the main process fits the reference."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit" not in record.getMessage())
    import datasets  # noqa: F401

    from .. import offline  # noqa: F401  (trl, peft, transformers)


def _started() -> None:
    """Nothing: submitted once per helper process, so that the pool starts them all at once."""


@contextmanager
def _helpers():
    """``(pool, helpers)``: a pool of ``helpers`` processes that train beside this one, one per core but this
    process's, spawned at once so that their imports overlap the fitting of the reference (``(None, 0)`` on one
    core)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = min(len(METHODS), cores) - 1
    if count < 1:
        yield None, 0
        return
    pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"), initializer=_helper_process)
    for _ in range(count):
        pool.submit(_started)
    try:
        yield pool, count
    except BaseException:
        pool.shutdown(cancel_futures=True)  # a failed run does not wait for the trainings not yet started
        raise
    pool.shutdown()


def _train_all(base: Path, rows: list[dict], output: Path, settings: DemoSettings, log, pool,
               helpers: int) -> dict[str, Path]:
    """Every method's adapter, trained in parallel, one thread each: the ``helpers`` processes of ``pool`` train the
    first methods while this process trains the last ``len(METHODS) // processes`` (all of them without helpers).

    The rows are tokenized and scored by the reference once, by the first trainer of this process (one whose
    method reads the reference), and every other training reads them from it. The trainings are otherwise
    independent and each is deterministic on one thread, so the adapters are those of training one after the
    other (the report is the same to the digit), in about half the time on two cores.
    """
    import tempfile

    from ..methods import resolve

    processes = 1 + helpers
    log(f"training the {', '.join(METHODS)} adapters ({settings.steps} steps each, {processes} at a time)")
    here = list(METHODS)[len(METHODS) - len(METHODS) // processes:]
    first = next((m for m in here if resolve(m, METHODS[m], "offline").needs_reference), here[0])
    trainer = _trainer(first, base, rows, output / "adapters" / first, settings)
    prepared = trainer.train_dataset
    with tempfile.TemporaryDirectory(prefix="qempo-demo-rows-") as folder:
        if helpers:
            prepared.save_to_disk(folder)
        futures = {m: pool.submit(train_adapter, m, base, rows, output / "adapters" / m, settings, prepared=folder)
                   for m in METHODS if m not in here}
        trained = {first: _train(trainer, output / "adapters" / first, base, len(rows))}
        trained.update({m: train_adapter(m, base, rows, output / "adapters" / m, settings, prepared=prepared)
                        for m in here if m != first})
        trained.update({m: future.result() for m, future in futures.items()})
    return {m: trained[m] for m in METHODS}


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def _verdict(results: list[dict]) -> str:
    failed = [r for r in results if not r["passed"]]
    if not failed:
        head = ("Every method reached its Table 1 optimum, and the paper's direction holds: QEMPO spreads probability "
                "over the valid answers where DPO keeps the reference's skew, at no loss of quality.")
    else:
        head = f"{len(failed)} of {len(results)} checks did NOT hold on this run (marked below)."
    lines = [f"- {'ok' if r['passed'] else 'FAILED'}: {r['check']}: {r['detail']}" for r in results]
    return head + "\n\n" + "\n".join(lines)


def print_report(report: dict, output: Path) -> None:
    """The measured table, the checks and where the files are, on the terminal."""
    header = ("policy", "entropy", "Table 1 entropy", "quality", "Table 1 quality", "distinct valid (sampled)")
    rows = [(name, f"{row['exact_entropy']:.3f}", f"{row['predicted_entropy']:.3f}", f"{row['exact_quality']:.3f}",
             f"{row['predicted_quality']:.3f}", f"{row['distinct']:.2f}") for name, row in report["methods"].items()]
    world.print_summary("qempo-lite demo (offline): exact answer distributions vs Table 1", header, rows,
                        report["verdict"], [
                            f"\nReport: {output / 'report.md'}  Picture: {output / 'distributions.png'}",
                            f"Compare the adapters side by side: qempo-lite app --demo-dir {output}"
                            "  (needs the app extra: pip install 'qempo-lite[app]')"])
