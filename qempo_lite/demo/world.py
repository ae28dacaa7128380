"""The demos' closed world: a tiny model whose every answer is one token of a tiny vocabulary.

Both demos ask questions with many right answers ("Name a colour.", "Name a prime below 30.")
of a Llama small enough to train on a laptop CPU. Three choices make the Table 1 closed forms
exactly reachable, so that what the demos show is the objectives and not the toy's limits:

* **The vocabulary is the task's words** (a word-level tokenizer; no sub-word pieces), and an
  answer is exactly one token: the chat template leaves the assistant turn open, so a
  completion is the answer token alone and sampling draws one token. The policy's answer
  distribution is then one softmax over the whole vocabulary, computed exactly: every output
  the model can produce is a candidate, and no probability can escape to outputs that no
  preference pair or reward ever sees.
* **The reference gives every word some probability** (a small floor), so π_ref > 0
  everywhere, as the closed forms' π_ref^(c/a) needs.
* **The output layer is fixed** to a scaled matrix with orthonormal rows (the final norm's
  weight too), and the reference is fitted by the layers underneath. A tiny model trained to
  convergence otherwise sits at the edge of the logits its output layer can express, where a
  LoRA adapter on the transformer's linear layers (all it can change: TRL computes the
  log-probs from the output layer's own weight) cannot sharpen the distribution any further.
  With this head every distribution the demos predict is within the adapter's reach.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Callable, Sequence

SPECIAL_TOKENS = ("<|end|>", "<|user|>", "<|assistant|>")
END = "<|end|>"
# Assistant turns stay open: a completion is the answer token, with nothing after it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
HIDDEN_SIZE = 64
HEAD_SCALE = 4.0  # norm of each output-layer row: room for logits ~4x sharper than the reference's
FLOOR = 0.02  # the reference's probability mass spread over every word it was not taught to answer
SFT_STEPS = 200
SFT_LR = 3e-3
END_WEIGHT = 0.2  # weight of "stop after the answer" in the reference's loss (free-running generation)


def words_of(prompts: Sequence[str], answers: Sequence[str]) -> list[str]:
    """Every word of the prompts and answers, in first-seen order (the vocabulary after the specials)."""
    words: list[str] = []
    for text in list(prompts) + list(answers):
        for word in text.replace(".", " .").split():
            if word not in words:
                words.append(word)
    return words


def build_tokenizer(words: Sequence[str]):
    """A word-level tokenizer over ``words`` plus the special tokens, with the open-turn chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(words))}
    # Every word of the demo is in the vocabulary; the unknown token is never produced.
    core = Tokenizer(models.WordLevel(vocab, unk_token=END))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=END, pad_token=END)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a chat turn followed by the assistant header (as TRL renders it)."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def token_names(tokenizer) -> list[str]:
    """The vocabulary in id order: entry ``i`` is the answer that token ``i`` stands for."""
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def _padded(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def build_reference(out_dir: Path, *, prompts: Sequence[str], words: Sequence[str],
                    target: Callable[[int], dict[str, float]], seed: int, log=print) -> Path:
    """Fit a tiny Llama to the reference answer distribution ``target(i)`` of each prompt; save it to ``out_dir/base``.

    The loss is the exact cross-entropy to the target over the whole vocabulary, whose every word
    not named in the target shares ``FLOOR``; plus, with weight ``END_WEIGHT``, ``<|end|>`` after each
    answer the target names, so that the model also stops when it generates freely (e.g. in the app).
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from ..tiny import tiny_llama_config

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    vocab = len(tokenizer)
    model = LlamaForCausalLM(tiny_llama_config(vocab, hidden_size=HIDDEN_SIZE, num_layers=2, num_heads=2,
                                               tokenizer=tokenizer))
    with torch.no_grad():
        rows, _ = torch.linalg.qr(torch.randn(HIDDEN_SIZE, vocab))
        model.lm_head.weight.copy_(HEAD_SCALE * rows.T)
    model.lm_head.weight.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)

    end_id = tokenizer.convert_tokens_to_ids(END)
    targets, sequences, first = [], [], []
    for index, prompt in enumerate(prompts):
        wanted = target(index)
        unknown = [a for a in wanted if a not in tokenizer.get_vocab()]
        if unknown:
            raise ValueError(f"reference answers {unknown} are not single tokens of the demo vocabulary")
        rest = vocab - len(wanted)
        probs = torch.full((vocab,), FLOOR / rest, dtype=torch.float32)
        for answer, p in wanted.items():
            probs[tokenizer.convert_tokens_to_ids(answer)] = (1.0 - FLOOR) * p / sum(wanted.values())
        targets.append(probs)
        ids = prompt_ids(tokenizer, prompt)
        first.append(len(sequences))  # this row's position -2 is the prompt's answer position
        sequences += [ids + [tokenizer.convert_tokens_to_ids(answer)] for answer in wanted]
    input_ids, attention = _padded(sequences, end_id)
    target_probs = torch.stack(targets)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=SFT_LR, weight_decay=0.0)
    log(f"fitting the reference policy ({SFT_STEPS} full-batch steps)")
    model.train()
    for _ in range(SFT_STEPS):
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        answer_loss = -(target_probs * torch.log_softmax(logits[first, -2], -1)).sum(-1).mean()
        end_loss = -torch.log_softmax(logits[:, -1], -1)[:, end_id].mean()
        loss = answer_loss + END_WEIGHT * end_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.generation_config = GenerationConfig(eos_token_id=end_id, pad_token_id=end_id, do_sample=True)
    path = Path(out_dir) / "base"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def answer_distribution(model, tokenizer, prompts: Sequence[str]):
    """The exact answer distribution of each prompt: a (prompts x vocabulary) float64 tensor of π(token | prompt)."""
    import torch

    input_ids, attention = _padded([prompt_ids(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, -1]
    model.train(was_training)
    return torch.softmax(logits.double(), -1)


def sample_answers(model, tokenizer, prompts: Sequence[str], n: int, seed: int) -> list[list[str]]:
    """``n`` answers per prompt, sampled with ``generate`` (temperature 1, one token), as token names."""
    import torch

    names = token_names(tokenizer)
    answers = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, max_new_tokens=1, num_return_sequences=n,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers.append([names[t] for t in out[:, ids.shape[1]].tolist()])
    model.train(was_training)
    return answers


def load_policy(base: Path, adapter: Path | None = None):
    """The reference model, or the reference with a trained adapter, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def shuffled_blocks(blocks: list[list[dict]], seed: int) -> list[dict]:
    """The rows of every block, blocks in a seeded random order, each block's rows kept together."""
    order = list(blocks)
    random.Random(seed).shuffle(order)
    return [row for block in order for row in block]


def draw_distribution(ax, labels: list[str], measured: Sequence[float], predicted: Sequence[float] | None,
                      colours: list[str], title: str) -> None:
    """Bars of the measured distribution with the predicted one outlined over them."""
    positions = range(len(labels))
    ax.bar(positions, measured, color=colours, width=0.8)
    if predicted is not None:
        ax.bar(positions, predicted, width=0.8, fill=False, edgecolor="black", linewidth=1.2)
    ax.set_xticks(list(positions), labels, rotation=70, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)


def plot_distributions(exact: dict, predicted: dict, rows: list[dict], title, suptitle: str, path: Path,
                       column_width: float) -> None:
    """A grid of answer distributions: one row per prompt, one column per policy; each panel the policy's exact
    distribution over the row's ``shown`` answers (bars, the rest of the mass as one last bar) with the
    closed-form optimum outlined (not for the reference). ``rows`` hold ``task_id``, ``shown``, ``index``
    (the answers' token positions), ``colours``, ``label`` and ``other``; ``title(policy, p, q, task_id)``
    names a panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(exact)
    fig, axes = plt.subplots(len(rows), len(policies), figsize=(column_width * len(policies), 2.7 * len(rows)),
                             squeeze=False, sharey=True)
    for r, row in enumerate(rows):
        for col, policy in enumerate(policies):
            p, q = exact[policy][row["task_id"]], predicted[policy][row["task_id"]]
            outline = None if policy == "reference" else masses(q, row["index"])
            draw_distribution(axes[r][col], row["shown"] + [row["other"]], masses(p, row["index"]), outline,
                              row["colours"], title(policy, p, q, row["task_id"]))
            if col == 0:
                axes[r][col].set_ylabel(row["label"], fontsize=9)
    fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def quiet_progress():
    """Without the progress bars of model loading and of TRL's dataset and reference passes; the demo
    reports its own progress."""
    import datasets
    from transformers.utils import logging as hf_logging

    previous, bars, hf_bars = os.environ.get("TQDM_DISABLE"), datasets.is_progress_bar_enabled(), \
        hf_logging.is_progress_bar_enabled()
    os.environ["TQDM_DISABLE"] = "1"
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
        if bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def silence_printer(trainer) -> None:
    """Keep the trainer's logs in ``trainer.state.log_history`` without printing them."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def demo_lora(rank: int):
    """The demos' adapter: rank ``rank`` on every linear layer, alpha 2·rank, no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def save_demo_adapter(trainer, out: Path, base: Path, data_name: str, rows: int, mode: str = "offline",
                      lora_facts: dict | None = None, extra: dict | None = None) -> Path:
    """The trained adapter and its ``qempo_lite.json`` (what the app and the card read) in ``out``; ``lora_facts``
    replace the record's default ``target_modules: all-linear``."""
    from ..runs import run_metadata, write_run_metadata

    lora = trainer.model.peft_config["default"]
    facts = dict(base_model=str(base), mode=mode, data={"dataset": data_name, "rows": rows},
                 lora={"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                       **(lora_facts or {"target_modules": "all-linear"})}, extra=extra)
    trainer.run_description = lambda steps: run_metadata(trainer.args, steps=steps, **facts)  # the card's
    trainer.save_model(str(out))
    write_run_metadata(out, trainer.args, steps=trainer.state.global_step, **facts)
    return out


def masses(probs, index: list[int]) -> list[float]:
    """The probabilities of the outputs at ``index``, then the rest of the mass as one last bar."""
    shown = [float(probs[i]) for i in index]
    return shown + [1.0 - sum(shown)]


def settings_heading(settings: dict) -> str:
    """"Seed 0 (quick)": how both demos' reports open their settings paragraph."""
    return f"Seed {settings['seed']}{' (quick)' if settings['quick'] else ''}"


def markdown_report(title: str, intro: str, header: Sequence[str], rows: Sequence[Sequence[str]], footnote: str,
                    verdict: str) -> str:
    """A demo's ``report.md``: title, shared settings, the measured table, what its columns mean, the checks."""
    lines = [f"# {title}", "", intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + ["", footnote, "", verdict, ""])


def print_summary(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], verdict: str,
                  after: Sequence[str]) -> None:
    """A demo's table and checks on the terminal, then the ``after`` lines (where the files are)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(verdict, markup=False, soft_wrap=True)
    for line in after:
        console.print(line, markup=False, soft_wrap=True)
