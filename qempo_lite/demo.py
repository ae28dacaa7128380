"""``qempo-lite demo``: the paper's Figure 1 on a laptop CPU, offline, in minutes.

A task with many valid answers ("Name a colour.") and a checkable validity. A tiny model is
supervised-trained into an "aligned but narrow" reference: it knows the valid answers, but a
few dominate and it still sometimes answers invalidly. Preference pairs are drawn from the
reference's own samples and labelled the Bradley–Terry way by a programmatic judge
(valid beats invalid with probability ``P_VALID_WINS``; two valid answers, or two invalid
ones, win half the time each), so the Table 1 closed forms apply with
``r(valid) − r(invalid) = logit(P_VALID_WINS)``. LoRA adapters are then trained with
``dpo``, ``spl``, ``qempo`` and ``qempo_kl`` through :class:`~qempo_lite.offline.QEMPOTrainer`
and compared on quality (valid fraction) and diversity (answer entropy, distinct valid
answers, lexical diversity), next to the closed-form prediction of
:mod:`qempo_lite.theory` for the same reward and reference.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import QempoError

P_VALID_WINS = 0.95
REWARD_GAP = math.log(P_VALID_WINS / (1 - P_VALID_WINS))  # r_valid - r_invalid under Bradley-Terry

# (prompts, valid answers, plausible invalid answers). Valid answers are listed from the one
# the reference will prefer most to the one it prefers least.
TASKS = [
    (["Name a colour.", "Tell me one colour."],
     ["Red", "Blue", "Green", "Yellow", "Purple", "Orange", "Pink", "Brown"], ["Apple", "Seven", "Tuesday"]),
    (["Name a fruit that is red.", "Give me a red fruit."],
     ["Apple", "Strawberry", "Cherry", "Raspberry", "Watermelon", "Pomegranate"], ["Banana", "Carrot", "Blue"]),
    (["Name an animal that can fly.", "Give me a flying animal."],
     ["Eagle", "Sparrow", "Bat", "Owl", "Pigeon", "Parrot", "Butterfly"], ["Dog", "Fish", "Elephant"]),
    (["Name a day of the week.", "Tell me one weekday name."],
     ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"], ["January", "Noon", "Red"]),
    (["Name an even number below twenty.", "Give me an even number smaller than 20."],
     ["Two", "Four", "Six", "Eight", "Ten", "Twelve", "Fourteen", "Sixteen", "Eighteen"], ["Seven", "Three", "Thirty"]),
    (["Name a musical instrument.", "Tell me one instrument you can play."],
     ["Piano", "Guitar", "Violin", "Drums", "Flute", "Trumpet", "Cello"], ["Hammer", "Radio", "Song"]),
]

METHODS = {
    # The policy coefficient a plays the same role everywhere (0.1); the reference coefficient
    # c sets how much of the reference's skew survives: dpo keeps all of it (c/a = 1), qempo_kl
    # 5/7 (the paper's λ2/(λ2+1) with λ2 = 2.5), spl half (SPL's α = 2β), qempo none (c = 0).
    "dpo": {"beta": 0.1},
    "spl": {"alpha": 0.1, "beta": 0.05},
    "qempo": {"beta": 0.1},
    # the paper's ratio β2/β1 = 2.5 (β1 = 4e-3, β2 = 1e-2), scaled so that β1 + β2 = 0.1
    "qempo_kl": {"beta1": 0.1 / 3.5, "beta2": 0.25 / 3.5},
}


@dataclass
class DemoSettings:
    seed: int = 0
    quick: bool = False
    sft_steps: int = 400
    pairs_per_prompt: int = 128
    train_epochs: int = 2
    samples_per_prompt: int = 64
    lora_r: int = 16
    # Adam takes lr-sized steps even along directions the pairwise loss barely constrains (the
    # logits of non-answers); larger batches keep those steps from being pure noise.
    batch_size: int = 64
    # Larger steps (1e-3 and up) sometimes let a policy drift onto non-answers within two epochs.
    learning_rate: float = 5e-4

    @classmethod
    def make(cls, seed: int, quick: bool) -> "DemoSettings":
        if quick:
            return cls(seed=seed, quick=True, sft_steps=200, pairs_per_prompt=48, samples_per_prompt=32, batch_size=32)
        return cls(seed=seed)


def _prompts() -> list[tuple[str, int]]:
    return [(prompt, task_id) for task_id, (prompts, _, _) in enumerate(TASKS) for prompt in prompts]


def _reference_distribution(task_id: int) -> dict[str, float]:
    """The skewed answer distribution the reference is supervised on: Zipf-like over the valid
    answers (a few dominate), with 10% on invalid answers."""
    _, valid, invalid = TASKS[task_id]
    weights = [1.0 / (rank + 1) ** 1.6 for rank in range(len(valid))]
    total = sum(weights)
    dist = {answer: 0.9 * w / total for answer, w in zip(valid, weights)}
    for answer in invalid:
        dist[answer] = dist.get(answer, 0.0) + 0.1 / len(invalid)
    return dist


def is_valid(task_id: int, answer: str) -> bool:
    """The programmatic judge: is ``answer`` one of the task's valid answers?"""
    return answer.strip().rstrip(".").lower() in {v.lower() for v in TASKS[task_id][1]}


def _candidates(task_id: int) -> list[str]:
    _, valid, invalid = TASKS[task_id]
    return list(dict.fromkeys(valid + invalid))


def _corpus() -> list[str]:
    texts = [p for p, _ in _prompts()]
    for _, valid, invalid in TASKS:
        texts.append(" ".join(valid + invalid))
    return texts * 4


def build_reference(out_dir: Path, settings: DemoSettings, log) -> Path:
    """Train a tiny Llama from scratch into the skewed, sometimes-invalid reference policy."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from .tiny import tiny_llama_config, train_tokenizer

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    tokenizer = train_tokenizer(_corpus(), vocab_size=400)
    # Every answer is one token, so a policy's answer distribution is one softmax: the pairwise
    # losses then move exactly the answers they compare instead of spilling mass onto sub-word
    # fragments that spell no answer at all.
    tokenizer.add_tokens(sorted({a for task_id in range(len(TASKS)) for a in _candidates(task_id)}))
    config = tiny_llama_config(len(tokenizer), hidden_size=64, num_layers=2, num_heads=2, tokenizer=tokenizer)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    prompts = _prompts()
    batch = 32
    log(f"supervised training of the reference policy ({settings.sft_steps} steps)")
    model.train()
    for step in range(settings.sft_steps):
        rows = []
        for _ in range(batch):
            prompt, task_id = rng.choice(prompts)
            dist = _reference_distribution(task_id)
            answer = rng.choices(list(dist), weights=list(dist.values()))[0]
            rows.append(_encode_pair(tokenizer, prompt, answer))
        input_ids, labels, attention = _pad(rows, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    log(f"reference SFT loss {loss.item():.3f}")
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    path = out_dir / "base"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _chat_prefix(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def _encode_pair(tokenizer, prompt: str, answer: str):
    """Prompt and answer tokenised exactly as TRL's DPO tokenises a conversational pair, so the
    reference is supervised on the very completion tokens the preference losses score."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    prefix = tokenizer(_chat_prefix(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    return full, [-100] * len(prefix) + full[len(prefix):]


def _pad(rows, pad_id):
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention[i, : len(ids)] = 1
    return input_ids, labels, attention


def sample_answers(model, tokenizer, prompts: list[str], n: int, seed: int) -> list[list[str]]:
    """``n`` sampled answers per prompt (temperature 1), stripped of the chat markup."""
    import torch

    torch.manual_seed(seed)
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            enc = tokenizer([_chat_prefix(tokenizer, prompt)] * n, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            answers.append([t.strip() for t in texts])
    return answers


def answer_logprobs(model, tokenizer, prompt: str, answers: list[str]):
    """Exact ``log π(answer | prompt)`` of each candidate answer (summed over its tokens, with EOS)."""
    import torch

    rows = [_encode_pair(tokenizer, prompt, a) for a in answers]
    input_ids, labels, attention = _pad(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def build_preferences(reference_samples: list[list[str]], settings: DemoSettings) -> list[dict]:
    """Bradley–Terry-labelled pairs from the reference's samples, judged programmatically."""
    rng = random.Random(settings.seed + 1)
    rows = []
    for (prompt, task_id), samples in zip(_prompts(), reference_samples):
        answers = [a for a in samples if a]
        for _ in range(settings.pairs_per_prompt):
            a, b = rng.sample(answers, 2) if len(set(answers)) > 1 else (answers[0], answers[0])
            if a == b:
                continue
            valid_a, valid_b = is_valid(task_id, a), is_valid(task_id, b)
            p_a_wins = 0.5 if valid_a == valid_b else (P_VALID_WINS if valid_a else 1 - P_VALID_WINS)
            chosen, rejected = (a, b) if rng.random() < p_a_wins else (b, a)
            rows.append({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            })
    return rows


def train_adapter(method: str, base: Path, pairs: list[dict], out: Path, settings: DemoSettings) -> Path:
    """One LoRA adapter trained with ``method`` through the same QEMPOTrainer users run."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .offline import QEMPOConfig, QEMPOTrainer, write_run_metadata

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    coefs = METHODS[method]
    args = QEMPOConfig(
        output_dir=str(out),
        loss_method=method,
        **coefs,
        precompute_ref_log_probs=method != "qempo",
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        num_train_epochs=settings.train_epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        max_length=32,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        use_cpu=True,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = QEMPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
                           processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    trainer.save_model(str(out))
    write_run_metadata(out, args, base_model=str(base), data={"dataset": "qempo-lite demo preferences", "rows": len(pairs)})
    return out


def _entropy_of_counts(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values() if c)


def evaluate_policy(model, tokenizer, samples: list[list[str]]) -> dict:
    """Quality and diversity of sampled answers, averaged over prompts, plus the answer histogram."""
    from .evaluate.diversity import lexical_diversity

    quality, entropy, distinct, lexical, histograms = [], [], [], [], []
    for (prompt, task_id), answers in zip(_prompts(), samples):
        counts = Counter(a.rstrip(".").capitalize() for a in answers)
        quality.append(sum(is_valid(task_id, a) for a in answers) / len(answers))
        entropy.append(_entropy_of_counts(counts))
        distinct.append(len({a for a in counts if is_valid(task_id, a)}))
        lexical.append(lexical_diversity([a or "." for a in answers]))
        histograms.append(dict(counts))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"quality": mean(quality), "entropy": mean(entropy), "distinct": mean(distinct),
            "lexical": mean(lexical), "histograms": histograms}


def exact(model, tokenizer) -> dict:
    """The policy's exact answer distribution, without sampling noise: the probability of each
    candidate answer, plus one "other" outcome holding the rest of the mass (counted invalid)."""
    import torch

    from .theory import entropy

    entropies, qualities = [], []
    for prompt, task_id in _prompts():
        answers = _candidates(task_id)
        probs = answer_logprobs(model, tokenizer, prompt, answers).double().exp()
        other = (1.0 - probs.sum()).clamp_min(0.0)
        entropies.append(float(entropy(torch.cat([probs, other.view(1)]) / (probs.sum() + other))))
        qualities.append(float(sum(p for p, a in zip(probs.tolist(), answers) if is_valid(task_id, a))))
    return {"exact_entropy": sum(entropies) / len(entropies), "exact_quality": sum(qualities) / len(qualities)}


def predicted(model, tokenizer, method: str | None) -> dict:
    """Closed-form prediction over each prompt's candidate answers: the reference's exact
    probabilities, the Bradley–Terry reward, and the method's Table 1 optimum."""
    import torch

    from .theory import entropy, optimal_policy

    entropies, qualities = [], []
    for prompt, task_id in _prompts():
        answers = _candidates(task_id)
        ref = torch.softmax(answer_logprobs(model, tokenizer, prompt, answers).double(), 0)
        reward = torch.tensor([REWARD_GAP if is_valid(task_id, a) else 0.0 for a in answers], dtype=torch.float64)
        policy = ref if method is None else optimal_policy(method, reward, ref, **METHODS[method])
        entropies.append(float(entropy(policy)))
        qualities.append(float(sum(p for p, a in zip(policy.tolist(), answers) if is_valid(task_id, a))))
    return {"predicted_entropy": sum(entropies) / len(entropies), "predicted_quality": sum(qualities) / len(qualities)}


def write_plot(results: dict, path: Path) -> None:
    """Answer distributions per method for the first prompt of each of the first tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    shown = [0, 2, 4]  # one prompt of three different tasks
    fig, axes = plt.subplots(len(shown), len(names), figsize=(3.2 * len(names), 2.6 * len(shown)), squeeze=False)
    prompts = _prompts()
    for row, prompt_index in enumerate(shown):
        prompt, task_id = prompts[prompt_index]
        order = _candidates(task_id)
        for col, name in enumerate(names):
            hist = results[name]["histograms"][prompt_index]
            total = sum(hist.values()) or 1
            labels = order + ["other"]
            values = [hist.get(a, 0) / total for a in order]
            values.append(1 - sum(values))
            colours = ["tab:green" if is_valid(task_id, a) else "tab:red" for a in order] + ["tab:gray"]
            ax = axes[row][col]
            ax.bar(range(len(labels)), values, color=colours)
            ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=7)
            ax.set_ylim(0, 1)
            if row == 0:
                ax.set_title(name)
            if col == 0:
                ax.set_ylabel(prompt, fontsize=8)
    fig.suptitle("Sampled answer distributions (green: valid, red: invalid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report_markdown(results: dict, settings: DemoSettings, verdict: str) -> str:
    lines = [
        "# qempo-lite demo: quality vs diversity",
        "",
        f"Seed {settings.seed}{' (quick)' if settings.quick else ''}; {settings.samples_per_prompt} samples per "
        f"prompt over {len(_prompts())} prompts; Bradley–Terry judge, valid beats invalid with p = {P_VALID_WINS}.",
        "",
        "| policy | quality (valid fraction) | answer entropy (nats) | exact quality | exact entropy |"
        " distinct valid answers | lexical diversity | predicted entropy | predicted quality |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(f"| {name} | {row['quality']:.3f} | {row['entropy']:.3f} | {row['exact_quality']:.3f} | "
                     f"{row['exact_entropy']:.3f} | {row['distinct']:.2f} | {row['lexical']:.1f} | "
                     f"{row['predicted_entropy']:.3f} | {row['predicted_quality']:.3f} |")
    lines += [
        "",
        "Quality, entropy, distinct and lexical columns are measured on the samples. Exact columns are the policy's "
        "own probabilities of each candidate answer, with the remaining mass as one invalid 'other' outcome.",
        "Predicted columns: the Table 1 closed form for the method, given the reference's exact probabilities of "
        "each prompt's candidate answers and the judge's Bradley–Terry reward (the population optimum; a short LoRA "
        "run moves only part of the way towards it).",
        "",
        verdict,
        "",
    ]
    return "\n".join(lines)


def run_demo(output: Path, *, seed: int = 0, quick: bool = False, log=print) -> dict:
    """Run the whole demo and write ``report.md``, ``report.json``, ``distributions.png`` and
    the adapters (``adapters/<method>/``) next to the base model (``base/``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = DemoSettings.make(seed, quick)
    output.mkdir(parents=True, exist_ok=True)
    # A model this small is dominated by per-op overhead: one thread is as fast, and far faster
    # when the machine is busy.
    torch.set_num_threads(1)
    base = build_reference(output, settings, log)
    tokenizer = AutoTokenizer.from_pretrained(base)
    reference = AutoModelForCausalLM.from_pretrained(base)
    prompts = [p for p, _ in _prompts()]
    log("sampling the reference and building Bradley–Terry preference pairs")
    ref_samples = sample_answers(reference, tokenizer, prompts, settings.samples_per_prompt, seed)
    pairs = build_preferences(ref_samples, settings)
    results = {"reference": {**evaluate_policy(reference, tokenizer, ref_samples), **exact(reference, tokenizer),
                             **predicted(reference, tokenizer, None)}}
    for method in METHODS:
        log(f"training the {method} adapter on {len(pairs)} pairs")
        adapter_dir = train_adapter(method, base, pairs, output / "adapters" / method, settings)
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)
        samples = sample_answers(policy, tokenizer, prompts, settings.samples_per_prompt, seed)
        results[method] = {**evaluate_policy(policy, tokenizer, samples), **exact(policy, tokenizer),
                           **predicted(reference, tokenizer, method)}
    verdict = _verdict(results)
    write_plot(results, output / "distributions.png")
    summary = {name: {k: v for k, v in row.items() if k != "histograms"} for name, row in results.items()}
    report = {"seed": seed, "quick": quick, "p_valid_wins": P_VALID_WINS, "coefficients": METHODS,
              "base_model": str(base), "methods": summary, "verdict": verdict,
              "histograms": {name: row["histograms"] for name, row in results.items()}}
    (output / "report.json").write_text(json.dumps(report, indent=2))
    (output / "report.md").write_text(_report_markdown(results, settings, verdict))
    return report


def _verdict(results: dict) -> str:
    """Does the paper's direction hold? Judged on the exact answer distributions (no sampling
    noise): qempo and qempo_kl more entropy than dpo, at quality no lower than dpo's by > 0.05."""
    dpo = results["dpo"]
    checks, holds = [], True
    for method in ("qempo", "qempo_kl"):
        row = results[method]
        more_diverse = row["exact_entropy"] > dpo["exact_entropy"]
        quality_kept = row["exact_quality"] >= dpo["exact_quality"] - 0.05
        holds = holds and more_diverse and quality_kept
        checks.append(f"{method}: entropy {row['exact_entropy']:.3f} vs dpo {dpo['exact_entropy']:.3f} "
                      f"({'higher' if more_diverse else 'NOT higher'}), quality {row['exact_quality']:.3f} vs dpo "
                      f"{dpo['exact_quality']:.3f} ({'within 0.05 or better' if quality_kept else 'LOWER by more than 0.05'})")
    # A pairwise loss constrains only differences between the answers it compares, so a run can
    # push every answer down at once and hand the mass to non-answers; say so rather than count
    # such a run as a win or a loss of the method it is compared with.
    floor = results["reference"]["exact_quality"] - 0.2
    collapsed = [name for name, row in results.items() if name != "reference" and row["exact_quality"] < floor]
    for name in collapsed:
        checks.append(f"note: {name} collapsed onto non-answers (quality {results[name]['exact_quality']:.3f} vs the "
                      f"reference's {results['reference']['exact_quality']:.3f}); a comparison with it says little "
                      "(its exact entropy lumps the non-answers into one outcome)")
    if set(collapsed) & {"dpo", "qempo", "qempo_kl"}:
        head = "Inconclusive on this run: a policy the comparison needs collapsed (see below)."
    elif holds:
        head = "The paper's direction holds on this run: QEMPO and QEMPO-KL are more diverse than DPO at no real " \
               "loss of quality."
    else:
        head = "The paper's direction does NOT fully hold on this run (see below)."
    return head + " (exact answer distributions)\n\n" + "\n".join(f"- {c}" for c in checks)


def _print_table(report: dict, output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qempo-lite demo: quality vs diversity")
    for column in ("policy", "quality", "entropy", "exact quality", "exact entropy", "distinct valid", "lexical",
                   "predicted entropy"):
        table.add_column(column, justify="right" if column != "policy" else "left")
    for name, row in report["methods"].items():
        table.add_row(name, f"{row['quality']:.3f}", f"{row['entropy']:.3f}", f"{row['exact_quality']:.3f}",
                      f"{row['exact_entropy']:.3f}", f"{row['distinct']:.2f}", f"{row['lexical']:.1f}",
                      f"{row['predicted_entropy']:.3f}")
    console = Console()
    console.print(table)
    console.print(report["verdict"])
    console.print(f"\nReport: {output / 'report.md'}  Plot: {output / 'distributions.png'}")
    console.print(f"Compare the adapters side by side: qempo-lite app --demo-dir {output}"
                  "  (needs the app extra: pip install -e '.[app]')", markup=False)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qempo-lite demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="qempo-demo", help="output directory (default: ./qempo-demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smaller run (under 3 minutes on 2 cores)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise QempoError(f"--output {output} exists and is not a directory; pass another --output")
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("running the demo") as status:
        report = run_demo(output, seed=args.seed, quick=args.quick, log=lambda msg: status.update(msg) or console.log(msg))
    _print_table(report, output)
    return 0
