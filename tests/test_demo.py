"""`qempo-lite demo`: the quick runs end to end (offline and online), and the pieces they rest on."""

import json
import math

import pytest
import torch

from qempo_lite.cli import main
from qempo_lite.demo import METHODS, TASKS
from qempo_lite.demo import offline as offline_demo
from qempo_lite.demo import online as online_demo
from qempo_lite.demo import world

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_offline_quick_reaches_table_1(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    assert "qempo-lite app" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = report["methods"]
    assert list(rows) == ["reference", *METHODS]
    for name, row in rows.items():
        for key in ("exact_entropy", "predicted_entropy", "exact_quality", "predicted_quality", "entropy", "quality",
                    "distinct"):
            assert math.isfinite(row[key]), (name, key)
    for name in METHODS:  # --quick: within 0.15 nats of the closed form
        assert abs(rows[name]["exact_entropy"] - rows[name]["predicted_entropy"]) <= 0.15, name
        assert rows[name]["exact_quality"] >= rows["reference"]["exact_quality"], name
    assert rows["qempo"]["exact_entropy"] - rows["dpo"]["exact_entropy"] >= 0.4
    assert rows["dpo"]["exact_entropy"] < rows["qempo_kl"]["exact_entropy"] < rows["qempo"]["exact_entropy"]
    assert rows["qempo"]["exact_quality"] >= rows["dpo"]["exact_quality"] - 0.05
    assert all(check["passed"] for check in report["checks"]), report["verdict"]
    assert report["settings"]["quick"] and report["settings"]["steps"] > 0
    assert (out / "report.md").read_text().count("| qempo") == 2  # qempo_kl and qempo rows
    assert (out / "distributions.png").read_bytes()[:8] == PNG
    for method in METHODS:
        adapter = out / "adapters" / method
        assert (adapter / "adapter_model.safetensors").is_file()
        assert json.loads((adapter / "qempo_lite.json").read_text())["method"] == method
        # TRL's default gradient checkpointing would only recompute the tiny model's forward in every backward pass.
        assert json.loads((adapter / "training_args.json").read_text())["gradient_checkpointing"] is False


@pytest.mark.slow
def test_online_quick_keeps_correct_answers_spread(tmp_path, capsys):
    out = tmp_path / "online"
    assert main(["demo", "--online", "--quick", "--seed", "1", "--output", str(out)]) == 0
    assert "pass_at_k.png" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"reference", "qempo", "gvpo"}
    for name, row in report["methods"].items():
        assert set(row) == {"accuracy", "correct_entropy", "distinct_correct", "pass_at_k", "predicted_correct_entropy"}
        assert list(row["pass_at_k"]) == [str(k) for k in range(1, 17)]
        curve = list(row["pass_at_k"].values())
        assert all(0.0 <= v <= 1.0 for v in curve) and curve == sorted(curve), name
        for key in ("accuracy", "correct_entropy", "distinct_correct", "predicted_correct_entropy"):
            assert math.isfinite(row[key]), (name, key)
    qempo, gvpo = report["methods"]["qempo"], report["methods"]["gvpo"]
    assert qempo["correct_entropy"] >= gvpo["correct_entropy"] + 0.3
    assert qempo["accuracy"] >= gvpo["accuracy"] - 0.05
    assert qempo["distinct_correct"] > gvpo["distinct_correct"]
    assert qempo["predicted_correct_entropy"] > gvpo["predicted_correct_entropy"]
    assert report["settings"]["rollout"] == "hf" and report["seed"] == 1
    for picture in ("distributions.png", "pass_at_k.png"):
        assert (out / picture).read_bytes()[:8] == PNG
    for method in ("qempo", "gvpo"):
        meta = json.loads((out / "adapters" / method / "qempo_lite.json").read_text())
        assert meta["method"] == method
        args = json.loads((out / "adapters" / method / "training_args.json").read_text())
        assert args["gradient_checkpointing"] is False


def test_every_answer_is_one_token_and_the_assistant_turn_stays_open():
    words = offline_demo._vocabulary()
    tokenizer = world.build_tokenizer(words)
    prompt = TASKS[0][0][0]
    prefix = world.prompt_ids(tokenizer, prompt)
    for answer in TASKS[0][1] + TASKS[0][2]:
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=True,
                                             return_dict=True)["input_ids"]
        assert full[:len(prefix)] == prefix and full[len(prefix):] == [tokenizer.convert_tokens_to_ids(answer)]
    assert world.token_names(tokenizer)[len(world.SPECIAL_TOKENS):] == words


def test_preference_blocks_carry_the_judges_probabilities_exactly():
    tokenizer = world.build_tokenizer(offline_demo._vocabulary())
    names = world.token_names(tokenizer)
    blocks = offline_demo.preference_blocks(names)
    seen = {}
    for block in blocks:
        assert len(block) == offline_demo.BLOCK
        task_id = offline_demo.prompts().index(block[0]["prompt"][0]["content"])
        pair = frozenset((block[0]["chosen"][0]["content"], block[0]["rejected"][0]["content"]))
        assert (task_id, pair) not in seen
        seen[task_id, pair] = True
        wins = {}
        for row in block:
            wins[row["chosen"][0]["content"]] = wins.get(row["chosen"][0]["content"], 0) + 1
        valid = {a: offline_demo.is_valid(task_id, a) for a in pair}
        assert any(valid.values())  # no pair of two invalid answers
        for answer, is_valid in valid.items():
            expected = 2 if all(valid.values()) else (3 if is_valid else 1)
            assert wins.get(answer, 0) == expected
    for task_id in range(len(TASKS)):  # every valid answer meets every other answer once
        n_valid = sum(offline_demo.is_valid(task_id, n) for n in names)
        expected = n_valid * (len(names) - n_valid) + n_valid * (n_valid - 1) // 2
        assert sum(1 for t, _ in seen if t == task_id) == expected


def test_offline_predictions_are_the_closed_forms():
    names = world.token_names(world.build_tokenizer(offline_demo._vocabulary()))
    ref = torch.softmax(torch.randn(len(TASKS), len(names), dtype=torch.float64), -1)
    dpo = offline_demo.predict(ref, names, "dpo")
    qempo = offline_demo.predict(ref, names, "qempo")
    valid = torch.tensor([offline_demo.is_valid(0, n) for n in names])
    # dpo keeps the reference's ratios among valid answers; qempo makes them equal
    ratio = dpo[0][valid] / ref[0][valid]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    assert torch.allclose(qempo[0][valid], qempo[0][valid][0].expand(int(valid.sum())))
    assert float(qempo[0][valid].sum()) > 0.9


def test_online_checker_and_predicted_optima():
    assert online_demo.number_reward(None, [[{"role": "assistant", "content": "7"}], [{"role": "assistant",
                                                                                    "content": "9"}], "Red", "29"],
                                     task=[0, 0, 0, 0]) == [1.0, 0.0, 0.0, 1.0]
    names = world.token_names(world.build_tokenizer(world.words_of(online_demo.prompts(), online_demo.NUMBERS)))
    ref = torch.softmax(torch.randn(len(online_demo.TASKS), len(names), dtype=torch.float64), -1)
    mask = online_demo._correct_mask(names)
    qempo = online_demo.predict(ref, names, "qempo")
    assert torch.allclose(qempo[0][mask[0]], torch.full((10,), 0.1, dtype=torch.float64))  # ten primes below 30
    assert float(qempo[0][~mask[0]].sum()) == 0.0
    gvpo = online_demo.predict(ref, names, "gvpo")
    ratio = gvpo[0][mask[0]] / ref[0][mask[0]]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))


def test_rollout_flag_belongs_to_the_online_demo(capsys):
    assert main(["demo", "--rollout", "vllm"]) == 2
    assert "--rollout applies to the online demo" in capsys.readouterr().err
    assert main(["demo", "--online", "--rollout", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice" in err[0]


def test_demo_output_must_be_a_directory(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", "--quick", "--output", str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err
