"""Preference and math loaders: the three preference shapes, bad rows, file formats, real data."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from qempo_lite.data import MATH_INSTRUCTION, load_math, load_preferences
from qempo_lite.errors import QempoError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


ULTRAFEEDBACK_ROWS = [
    {
        "prompt": "Name a colour.",
        "prompt_id": "a1",
        "chosen": [user("Name a colour."), assistant("Teal.")],
        "rejected": [user("Name a colour."), assistant("Red.")],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    },
    {
        "prompt": "And another?",
        "prompt_id": "a2",
        "chosen": [user("Name a colour."), assistant("Teal."), user("And another?"), assistant("Ochre.")],
        "rejected": [user("Name a colour."), assistant("Teal."), user("And another?"), assistant("Blue.")],
        "score_chosen": 7.0,
        "score_rejected": 2.0,
    },
]

HH_ROWS = [
    {
        "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt.",
        "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Buy some.",
    },
    {  # multi-turn, the assistant speaking twice in a row inside the shared conversation
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nAssistant: How can I help?\n\nHuman: Tell me a fact.\n\nAssistant: Honey never spoils.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nAssistant: How can I help?\n\nHuman: Tell me a fact.\n\nAssistant: No.",
    },
    {  # the chosen answer carries a turn marker of its own: the prompt is still the shared part
        "chosen": "\n\nHuman: Help me rob a bank.\n\nAssistant: I won't help with that.\n\nAssistant: Is something wrong?",
        "rejected": "\n\nHuman: Help me rob a bank.\n\nAssistant: Sure, first you need a mask.",
    },
    {  # some copies drop the leading blank line
        "chosen": "Human: Hi\n\nAssistant: Hello.",
        "rejected": "Human: Hi\n\nAssistant: Go away.",
    },
]

PLAIN_ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5", "id": 0},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon", "id": 1},
]


def test_ultrafeedback_shape_becomes_conversational_pairs(tmp_path):
    ds, report = load_preferences(write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK_ROWS), return_report=True)
    assert report.shape == "messages" and report.rows_read == 2 and report.skipped == 0
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[0] == {"prompt": [user("Name a colour.")], "chosen": [assistant("Teal.")], "rejected": [assistant("Red.")]}
    assert ds[1]["prompt"] == [user("Name a colour."), assistant("Teal."), user("And another?")]
    assert ds[1]["chosen"] == [assistant("Ochre.")]


def test_ultrafeedback_rows_with_answer_only_use_the_prompt_column(tmp_path):
    rows = [{"prompt": "Say hi.", "chosen": [assistant("Hi!")], "rejected": [assistant("No.")]}]
    ds = load_preferences(write_jsonl(tmp_path / "uf.jsonl", rows))
    assert ds[0]["prompt"] == [user("Say hi.")]


def test_hh_transcripts_split_into_shared_prompt_and_last_answers(tmp_path):
    ds, report = load_preferences(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS), return_report=True)
    assert report.shape == "hh"
    assert ds[0] == {
        "prompt": [user("How do I bake bread?")],
        "chosen": [assistant("Mix flour, water, yeast and salt.")],
        "rejected": [assistant("Buy some.")],
    }
    # consecutive assistant turns merge, so roles alternate for strict chat templates
    assert ds[1]["prompt"] == [user("Hi"), assistant("Hello!\n\nHow can I help?"), user("Tell me a fact.")]
    assert ds[1]["chosen"] == [assistant("Honey never spoils.")]
    assert ds[2]["prompt"] == [user("Help me rob a bank.")]
    assert ds[2]["chosen"] == [assistant("I won't help with that.\n\nAssistant: Is something wrong?")]
    assert ds[2]["rejected"] == [assistant("Sure, first you need a mask.")]
    assert ds[3] == {"prompt": [user("Hi")], "chosen": [assistant("Hello.")], "rejected": [assistant("Go away.")]}


def test_plain_strings_stay_strings(tmp_path):
    ds, report = load_preferences(write_jsonl(tmp_path / "plain.jsonl", PLAIN_ROWS), return_report=True)
    assert report.shape == "plain"
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[1] == {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}


GOOD_PLAIN = {"prompt": "p", "chosen": "a", "rejected": "b"}
GOOD_HH = HH_ROWS[0]
GOOD_UF = ULTRAFEEDBACK_ROWS[0]


@pytest.mark.parametrize(
    "good, bad, expected",
    [
        (GOOD_PLAIN, {"prompt": "p", "chosen": "a"}, "line 2: field 'rejected' is missing"),
        (GOOD_PLAIN, {"prompt": "p", "chosen": "a", "rejected": "  "}, "line 2: field 'rejected' is empty"),
        (GOOD_PLAIN, {"prompt": "p", "chosen": "a", "rejected": "a"}, "line 2: field 'rejected' is identical to 'chosen'"),
        (GOOD_PLAIN, {"prompt": "p", "chosen": 3, "rejected": "b"}, "line 2: field 'chosen' should be a string, got int"),
        (GOOD_PLAIN, {"prompt": "", "chosen": "a", "rejected": "b"}, "line 2: field 'prompt' is empty"),
        (GOOD_HH, {"chosen": "no speakers here", "rejected": "nor here"}, "line 2: field 'chosen' is not an HH-RLHF transcript"),
        (GOOD_HH, {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "line 2: field 'rejected' is identical to 'chosen'"),
        (GOOD_HH, {"chosen": "\n\nAssistant: b", "rejected": "\n\nAssistant: c"}, "line 2: field 'chosen' has no 'Human:' turn"),
        (GOOD_UF, {"prompt": "q", "chosen": [user("q"), assistant("")], "rejected": [user("q"), assistant("b")]}, "line 2: field 'chosen' is empty"),
        (GOOD_UF, {"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("other"), assistant("b")]}, "line 2: field 'rejected' has different turns before the answer"),
        (GOOD_UF, {"prompt": "q", "chosen": [user("q"), user("a")], "rejected": [user("q"), assistant("b")]}, "line 2: field 'chosen' should end with an assistant message"),
        (GOOD_UF, {"prompt": "q", "chosen": [{"role": "user"}], "rejected": [assistant("b")]}, "line 2: field 'chosen' message 0 should be"),
        (GOOD_UF, {"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": "b"}, "line 2: field 'rejected' should be a non-empty list of messages, got str"),
    ],
)
def test_bad_row_errors_name_the_row_and_field(tmp_path, good, bad, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, bad, good])
    with pytest.raises(QempoError) as err:
        load_preferences(path)
    message = str(err.value)
    assert expected in message
    assert "--on-bad-rows skip" in message and "\n" not in message and "pairs.jsonl" in message


def test_skip_drops_bad_rows_counts_and_logs_them(tmp_path, caplog):
    rows = [GOOD_PLAIN, {"prompt": "p", "chosen": "a"}, GOOD_PLAIN, {"prompt": "p", "chosen": "x", "rejected": "x"}, GOOD_PLAIN]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="qempo_lite"):
        ds, report = load_preferences(path, on_bad_rows="skip", return_report=True)
    assert len(ds) == 3
    assert (report.rows_read, report.skipped, report.rows_kept) == (5, 2, 3)
    assert report.bad_rows == ["line 2: field 'rejected' is missing", "line 4: field 'rejected' is identical to 'chosen'"]
    assert "skipped 2 bad rows of 5 (first: line 2: field 'rejected' is missing)" in caplog.text


def test_invalid_json_line_is_a_bad_row_and_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD_PLAIN) + "\n\n{not json\n" + json.dumps(GOOD_PLAIN) + "\n\n", encoding="utf-8")
    with pytest.raises(QempoError, match=r"line 3: is not valid JSON"):
        load_preferences(path)
    ds, report = load_preferences(path, on_bad_rows="skip", return_report=True)
    assert len(ds) == 2 and report.rows_read == 3


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": ""}] * 3)
    with pytest.raises(QempoError, match="all 3 rows are bad"):
        load_preferences(path, on_bad_rows="skip")


def test_limit_counts_good_rows(tmp_path):
    rows = [GOOD_PLAIN, {"prompt": "p"}, GOOD_PLAIN, GOOD_PLAIN, GOOD_PLAIN]
    ds, report = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), on_bad_rows="skip", limit=2, return_report=True)
    assert len(ds) == 2 and report.rows_read == 3


def test_user_errors_are_one_line_qempo_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(QempoError, match=f"data file not found: {missing}"):
        load_preferences(missing)
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(QempoError, match="unsupported data file"):
        load_preferences(tmp_path / "pairs.csv")
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_PLAIN])
    with pytest.raises(QempoError, match="on_bad_rows must be one of"):
        load_preferences(path, on_bad_rows="ignore")
    with pytest.raises(QempoError, match="unknown preference data shape"):
        load_preferences(path, shape="sharegpt")
    with pytest.raises(QempoError, match=r"no row has the expected columns .*first row has question \(str\)"):
        load_preferences(write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(QempoError, match=r"first row has chosen \(int\), rejected \(str\)"):
        load_preferences(write_jsonl(tmp_path / "n.jsonl", [{"chosen": 5, "rejected": "b"}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(QempoError, match="has no rows"):
        load_preferences(tmp_path / "empty.jsonl")


def test_unreachable_hub_dataset_is_a_qempo_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QempoError, match="cannot load dataset 'no-such-org/no-such-dataset'") as err:
        load_preferences("no-such-org/no-such-dataset")
    assert "\n" not in str(err.value)
    # GSM8K on the Hub needs its "main" config; the loader fills it in.
    with pytest.raises(QempoError, match="cannot load dataset 'openai/gsm8k' \\(config 'main', split 'test'\\)"):
        load_math("openai/gsm8k")


def test_parquet_and_json_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ULTRAFEEDBACK_ROWS), tmp_path / "uf.parquet")
    ds = load_preferences(tmp_path / "uf.parquet")
    assert ds[1]["chosen"] == [assistant("Ochre.")] and len(ds) == 2

    (tmp_path / "list.json").write_text(json.dumps(PLAIN_ROWS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": PLAIN_ROWS}))
    write_jsonl(tmp_path / "lines.json", PLAIN_ROWS)
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in HH_ROWS)
    for name, expected in [("list.json", "Paris"), ("wrapped.json", "Paris"), ("lines.json", "Paris")]:
        assert load_preferences(tmp_path / name)[1]["chosen"] == expected
    assert load_preferences(tmp_path / "hh.jsonl.gz")[0]["rejected"] == [assistant("Buy some.")]


def test_in_memory_dataset_source():
    import datasets

    ds = load_preferences(datasets.Dataset.from_list(PLAIN_ROWS))
    assert ds[0] == {"prompt": "2+2=", "chosen": "4", "rejected": "5"}


def test_real_hh_rlhf_harmless_test_split_loads_completely(real_data):
    ds, report = load_preferences(real_data / "hh_rlhf_harmless" / "test.jsonl.gz", return_report=True)
    assert (len(ds), report.shape, report.skipped) == (2312, "hh", 0)
    roles = [[m["role"] for m in row] for row in ds["prompt"]]
    assert all(r[0] == "user" and r[-1] == "user" for r in roles)
    assert all(a != b for r in roles for a, b in zip(r, r[1:]))
    chosen = [row[0]["content"] for row in ds["chosen"]]
    rejected = [row[0]["content"] for row in ds["rejected"]]
    assert all(c != r for c, r in zip(chosen, rejected))
    # Four labellers preferred an empty reply to a harmful one; those rows are kept.
    assert sum(not c for c in chosen) == 4 and all(rejected)


def test_trl_dpo_trainer_accepts_every_shape(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_length=256, dataset_num_proc=None)
    for name, rows in [("uf", ULTRAFEEDBACK_ROWS), ("hh", HH_ROWS), ("plain", PLAIN_ROWS)]:
        ds = load_preferences(write_jsonl(tmp_path / f"{name}.jsonl", rows))
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
        prepared = trainer.train_dataset[0]
        expected = ds[0]["chosen"] if name == "plain" else ds[0]["chosen"][0]["content"]
        assert expected in tokenizer.decode(prepared["chosen_ids"]), name
        assert expected not in tokenizer.decode(prepared["prompt_ids"]), name


# ------------------------------------------------------------------------------ math


def test_gsm8k_local_file_loads_all_rows_with_gold_answers(real_data):
    ds, report = load_math(real_data / "gsm8k" / "test.jsonl", return_report=True)
    assert (len(ds), report.shape, report.skipped) == (1319, "gsm8k", 0)
    assert ds.column_names == ["prompt", "answer", "solution"]
    first = ds[0]
    assert first["answer"] == "18"
    assert first["prompt"][0]["role"] == "user" and first["prompt"][0]["content"].startswith("Janet’s ducks lay 16 eggs")
    assert first["prompt"][0]["content"].endswith(MATH_INSTRUCTION)
    assert first["solution"].endswith("#### 18")
    assert ds[2]["answer"] == "70000"
    assert all(answer.lstrip("-").replace(".", "", 1).isdigit() for answer in ds["answer"])


def test_gsm8k_answers_lose_thousands_separators_and_system_prompt_goes_first(tmp_path):
    rows = [{"question": "How much?", "answer": "Lots: 1,000+800=<<1000+800=1800>>1,800\n#### 1,800"}]
    ds = load_math(write_jsonl(tmp_path / "g.jsonl", rows), system_prompt="You are careful.")
    assert ds[0]["answer"] == "1800"
    assert ds[0]["prompt"] == [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": f"How much?\n{MATH_INSTRUCTION}"},
    ]


def test_math_rows_take_the_last_boxed_answer_with_nested_braces(tmp_path):
    rows = [
        {"problem": "Simplify.", "solution": "First $\\boxed{2}$ is wrong; so $\\boxed{\\frac{1}{\\sqrt{2}}}$.", "level": "Level 3"},
        {"problem": "Solve.", "solution": "We get $x \\in \\boxed{\\left[1, \\frac{3}{2}\\right)}$"},
    ]
    ds = load_math(write_jsonl(tmp_path / "math.jsonl", rows), return_report=True)[0]
    assert ds["answer"] == ["\\frac{1}{\\sqrt{2}}", "\\left[1, \\frac{3}{2}\\right)"]
    assert ds[0]["solution"] == rows[0]["solution"]


def test_gold_boxes_and_graded_boxes_share_one_brace_matcher():
    from qempo_lite.data import last_boxed
    from qempo_lite.rewards import extract_answer

    for text, content in [("so $\\boxed{\\{1, \\frac{2}{3}\\}}$.", "\\{1, \\frac{2}{3}\\}"), ("\\boxed{1 \\}", "1")]:
        assert last_boxed(text) == extract_answer(text) == content
    # An unclosed last box: a gold solution falls back to its last complete box, a completion was cut off.
    assert last_boxed("\\boxed{4} then \\boxed{5") == "4"
    assert extract_answer("\\boxed{4} then \\boxed{5") is None


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"question": "q", "answer": "no final line"}, "line 2: field 'answer' has no final '#### <answer>' line"),
        ({"question": "", "answer": "#### 3"}, "line 2: field 'question' is empty"),
        ({"question": "q", "answer": "####   "}, "line 2: field 'answer' has no final"),
        ({"question": ["q"], "answer": "#### 3"}, "line 2: field 'question' should be a string, got list"),
    ],
)
def test_bad_gsm8k_rows(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, row])
    with pytest.raises(QempoError) as err:
        load_math(path)
    assert expected in str(err.value)
    ds, report = load_math(path, on_bad_rows="skip", return_report=True)
    assert len(ds) == 1 and report.skipped == 1


def test_math_rows_without_a_box_fall_back_to_an_answer_column(tmp_path):
    rows = [{"problem": "p", "solution": "It is three quarters.", "answer": "\\frac{3}{4}"}]
    assert load_math(write_jsonl(tmp_path / "m500.jsonl", rows))["answer"] == ["\\frac{3}{4}"]


def test_math_row_without_boxed_answer_is_bad(tmp_path):
    rows = [{"problem": "p", "solution": "\\boxed{1}"}, {"problem": "p", "solution": "so it is 4, \\boxed{4"}]
    with pytest.raises(QempoError, match=r"line 2: field 'solution' has no \\boxed"):
        load_math(write_jsonl(tmp_path / "m.jsonl", rows))
