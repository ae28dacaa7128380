"""``qempo-lite demo --real``: the offline demo on the real model, end to end at a tiny scale, and its command."""

import json

import pytest

from qempo_lite.demo import cli
from qempo_lite.errors import QempoError

METRICS = {"accuracy", "correct_entropy", "distinct_correct", "pass_at_k", "lexical", "semantic"}


def test_real_without_online_is_the_offline_demo(tmp_path):
    with pytest.raises(QempoError, match="unknown bogus; choose from dpo, spl, qempo, qempo_kl, dpo_js, dpo_fkl"):
        cli(["--real", "--methods", "dpo_js,bogus", "--model", str(tmp_path)])
    # An offline method is accepted; the run then stops at the model directory, which holds no model.
    with pytest.raises(QempoError, match="holds no config.json"):
        cli(["--real", "--methods", "dpo_js,qempo", "--model", str(tmp_path), "--output", str(tmp_path / "out")])


@pytest.mark.slow
def test_the_real_offline_demo_runs_end_to_end_and_resumes(smollm2_dir, tmp_path):
    from safetensors.torch import load_file

    from qempo_lite.demo import real_tasks
    from qempo_lite.demo.real_offline import RealOfflineSettings, run_real_offline

    settings = RealOfflineSettings(steps=2, batch_size=4, pair_samples=8, pairs_per_question=2, eval_samples=4,
                                   train_questions=4, held_out_questions=2, methods=["qempo", "dpo_fkl"],
                                   dtype="bfloat16")
    out = tmp_path / "demo"
    report = run_real_offline(out, smollm2_dir, settings, log=lambda m: None)

    assert set(report["methods"]) == {"reference", "qempo", "dpo_fkl"}
    for row in report["methods"].values():
        assert METRICS <= set(row) and 0.0 <= row["accuracy"] <= 1.0 and row["correct_entropy"] >= 0.0
    assert json.loads((out / "report.json").read_text())["methods"] == report["methods"]
    assert (out / "entropy_vs_accuracy.png").stat().st_size > 0 and "| dpo_fkl |" in (out / "report.md").read_text()

    # The base model's log-probs of the pairs, computed once and given to every method.
    reference = json.loads((out / "pairs_reference.json").read_text())
    assert len(reference) == report["pairs"]["rows"] and all(row["ref_chosen_logps"] < 0 for row in reference)

    # Pairs: a correct answer preferred to an incorrect one, from training questions only.
    pairs = json.loads((out / "pairs.json").read_text())["pairs"]
    train, held_out = settings.questions()
    assert pairs and report["pairs"]["rows"] == len(pairs) and len(pairs) <= 2 * len(train)
    sets = real_tasks.answer_sets()
    for pair in pairs:
        assert pair["question"] in train and pair["question"] not in held_out
        assert real_tasks.correct_answer(pair["chosen"][0]["content"], sets[pair["question"]]) is not None
        assert real_tasks.correct_answer(pair["rejected"][0]["content"], sets[pair["question"]]) is None

    adapters = {name: out / "adapters" / name / "adapter_model.safetensors" for name in ("qempo", "dpo_fkl")}
    for path in adapters.values():  # trained: LoRA's B starts at zero and has moved
        assert any(t.abs().sum() > 0 for k, t in load_file(path).items() if "lora_B" in k)
    record = json.loads((out / "adapters" / "dpo_fkl" / "qempo_lite.json").read_text())
    assert record["method"] == "dpo" and record["f_divergence_type"] == "forward_kl"

    # Run again: nothing is sampled or trained again, and the report is the same.
    before = {name: path.stat().st_mtime_ns for name, path in adapters.items()}
    cached = {name: (out / name).stat().st_mtime_ns for name in ("pairs.json", "pairs_reference.json")}
    again = run_real_offline(out, smollm2_dir, settings, log=lambda m: None)
    assert {name: path.stat().st_mtime_ns for name, path in adapters.items()} == before
    assert {name: (out / name).stat().st_mtime_ns for name in cached} == cached
    assert again["methods"] == report["methods"]
