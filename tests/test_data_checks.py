"""Data that would train in silence: evaluation pairs that are training pairs, chat rows the plain shape refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qempo_lite.data import load_preferences
from qempo_lite.data.splits import pair_key
from qempo_lite.errors import QempoError
from qempo_lite.train_cli import OfflineRunArgs, load_eval_pairs
from test_cli_errors import _offline, _run


def _duplicated_pairs(path: Path, distinct: int = 20, copies: int = 5) -> Path:
    rows = [{"prompt": f"Name colour number {i}.", "chosen": f"Colour {i} is red.", "rejected": "No."}
            for i in range(distinct)]
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(copies) for row in rows))
    return path


# ---------------------------------------------------------------------------------------------- item 5


def test_held_out_pairs_are_never_trained_on_even_when_rows_repeat(tmp_path):
    data = _duplicated_pairs(tmp_path / "pairs.jsonl")
    everything = load_preferences(str(data))
    run_args = OfflineRunArgs(dataset=str(data), eval_fraction=0.2)
    train, evaluation, described = load_eval_pairs(run_args, everything, seed=3)
    held = {pair_key(row) for row in evaluation}
    assert len(held) == len(evaluation) == 4  # a fifth of the 20 distinct pairs, each once
    assert not held & {pair_key(row) for row in train}
    assert len(train) == 16 * 5  # every copy of the other pairs
    assert described == {"held_out_fraction": 0.2, "seed": 3, "rows": 4, "duplicates": 80}


@pytest.mark.slow
def test_the_training_command_reports_duplicates_and_trains_on_no_evaluation_pair(tmp_path, tiny_model_dir):
    data = _duplicated_pairs(tmp_path / "pairs.jsonl")
    argv = _offline(tmp_path, tiny_model_dir, "dups", dataset=str(data), eval_fraction=0.2, max_steps=1)
    result = _run(argv, tmp_path)
    assert result.returncode == 0, result.stderr[-1500:]
    assert "80 training rows repeat an earlier pair; held out by content" in result.stdout
    recorded = json.loads((tmp_path / "dups" / "out" / "qempo_lite.json").read_text())["data"]
    assert recorded["rows"] == 80 and recorded["eval"]["rows"] == 4 and recorded["eval"]["duplicates"] == 80


def test_one_distinct_pair_cannot_be_split(tmp_path):
    data = _duplicated_pairs(tmp_path / "pairs.jsonl", distinct=1)
    run_args = OfflineRunArgs(dataset=str(data), eval_fraction=0.2)
    with pytest.raises(QempoError, match="at least 2 distinct training pairs, found 1"):
        load_eval_pairs(run_args, load_preferences(str(data)), seed=0)


# ---------------------------------------------------------------------------------------------- item 8


def _chat_rows(path: Path, bad: dict) -> Path:
    good = {"chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
            "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "No."}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    return path


def test_chat_rows_get_the_checks_of_plain_rows(tmp_path, tiny_model_dir):
    from test_run_guards import _refused_before_loading

    def answers(user: dict) -> dict:
        return {name: [user, {"role": "assistant", "content": text}] for name, text in (("chosen", "Red."),
                                                                                        ("rejected", "No."))}

    blank = _chat_rows(tmp_path / "blank.jsonl", answers({"role": "user", "content": "  \n "}))
    banana = _chat_rows(tmp_path / "banana.jsonl", answers({"role": "banana", "content": "Name a colour."}))
    no_user = _chat_rows(tmp_path / "system.jsonl", answers({"role": "system", "content": "Be brief."}))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "  \n ", "chosen": "Red.", "rejected": "No."}) + "\n")
    o = lambda name, data: _offline(tmp_path, tiny_model_dir, name, dataset=str(data))  # noqa: E731
    _refused_before_loading(tmp_path, [
        ("blank user prompt", o("blank", blank), "line 2: field 'chosen' message 0 (user) is empty"),
        ("unknown role", o("banana", banana), "role 'banana', not one of system, user, assistant"),
        ("no user message", o("system", no_user), "has no user message before the answer"),
        ("blank plain prompt", o("plain", plain), "'prompt' is empty"),
    ])
