"""``qempo-lite demo --real``: the offline demo on the real model, end to end at a tiny scale, its command, and
the Hub push of an adapter it trained, loaded back as its card says."""

import json

import pytest

from qempo_lite.demo import cli
from qempo_lite.errors import QempoError

METRICS = {"accuracy", "correct_entropy", "distinct_correct", "pass_at_k", "lexical", "semantic"}
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub model the real model directory is a copy of
REPO_ID = "you/smollm2-135m-qempo"


@pytest.fixture(scope="module")
def real_offline_run(smollm2_dir, tmp_path_factory):
    """The offline demo on the real model at a tiny scale (qempo and dpo_fkl, two steps each): (folder, settings,
    report)."""
    from qempo_lite.demo.real_offline import RealOfflineSettings, run_real_offline

    settings = RealOfflineSettings(steps=2, batch_size=4, pair_samples=8, pairs_per_question=2, eval_samples=4,
                                   train_questions=4, held_out_questions=2, methods=["qempo", "dpo_fkl"],
                                   dtype="bfloat16")
    out = tmp_path_factory.mktemp("real-offline") / "demo"
    return out, settings, run_real_offline(out, smollm2_dir, settings, log=lambda m: None)


def test_real_without_online_is_the_offline_demo(tmp_path):
    with pytest.raises(QempoError, match="unknown bogus; choose from dpo, spl, qempo, qempo_kl, dpo_js, dpo_fkl"):
        cli(["--real", "--methods", "dpo_js,bogus", "--model", str(tmp_path)])
    # An offline method is accepted; the run then stops at the model directory, which holds no model.
    with pytest.raises(QempoError, match="holds no config.json"):
        cli(["--real", "--methods", "dpo_js,qempo", "--model", str(tmp_path), "--output", str(tmp_path / "out")])


@pytest.mark.slow
def test_the_real_offline_demo_runs_end_to_end_and_resumes(smollm2_dir, real_offline_run):
    from safetensors.torch import load_file

    from qempo_lite.demo import real_tasks
    from qempo_lite.demo.real_offline import run_real_offline

    out, settings, report = real_offline_run

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


def _card_table(text: str) -> dict[str, float]:
    """The card's results table (the first table under "## Evaluation"), as {column: value}."""
    rows = [line for line in text.split("## Evaluation")[1].split("## Usage")[0].splitlines() if line.startswith("|")]
    header, _, values = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows[:3])
    return dict(zip(header, map(float, values)))


@pytest.mark.slow
def test_the_pushed_card_of_a_real_adapter_shows_its_results_and_loads_as_it_says(smollm2_dir, real_offline_run,
                                                                                   tmp_path, monkeypatch, capsys):
    """``qempo-lite push --dry-run`` of the qempo adapter the demo trained; then the card's Python snippet is run
    as printed, from a folder laid out like the Hub (OWNER/NAME folders: the staged upload and the base model)."""
    import torch
    from huggingface_hub import ModelCard
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from qempo_lite.cli import main
    from qempo_lite.demo import real_tasks
    from qempo_lite.demo.real_common import load_model
    from qempo_lite.real_model import WEIGHTS_NOTE

    out, settings, report = real_offline_run
    trained = out / "adapters" / "qempo"
    hub = tmp_path / "hub"
    staged = hub / REPO_ID
    code = main(["push", str(trained), "--repo-id", REPO_ID, "--base-model-id", BASE_ID, "--dry-run", str(staged)])
    assert code == 0, capsys.readouterr().err
    # The base model's tokenizer is the adapter's: not uploaded again.
    assert sorted(p.name for p in staged.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    card = ModelCard.load(staged / "README.md")
    assert (card.data.base_model, card.data.license, card.data.library_name) == (BASE_ID, "apache-2.0", "peft")
    text = card.text
    assert "trained with **qempo**" in text and f"- **base weights**: {WEIGHTS_NOTE}" in text and "Q4_1" in text
    assert "- **licence**: `apache-2.0`, the base model's" in text and "- **mode**: offline" in text
    assert f"- **steps**: {settings.steps} optimizer steps" in text
    assert str(out) not in text and str(smollm2_dir) not in text  # no path of this machine
    # The measured results: every number of the report's qempo row, in the card's table.
    measured = {k: v for k, v in report["methods"]["qempo"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    shown = _card_table(text)
    assert set(shown) == set(measured) >= {"accuracy", "correct_entropy", "lexical"}
    assert all(abs(shown[k] - measured[k]) <= 5e-4 for k in measured), (shown, measured)
    config = json.loads((staged / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_ID  # where PEFT finds the base: the Hub id, not this machine's
    rank = config["r"]
    serve = text.split("```bash\n")[1].split("```")[0].split()
    assert serve[:3] == ["vllm", "serve", BASE_ID] and f"smollm2-135m-qempo={REPO_ID}" in serve
    assert int(serve[serve.index("--max-lora-rank") + 1]) >= rank

    # The card's Python snippet as printed, with the Hub stood in for by local folders.
    (hub / BASE_ID).parent.mkdir(parents=True)
    (hub / BASE_ID).symlink_to(smollm2_dir, target_is_directory=True)
    monkeypatch.chdir(hub)
    scope = {}
    exec(text.split("```python\n")[1].split("```")[0], scope)  # noqa: S102 - the snippet a user would paste
    model, tokenizer = scope["model"], scope["tokenizer"]
    assert isinstance(model, PeftModel)
    loaded, saved = get_peft_model_state_dict(model), load_file(trained / "adapter_model.safetensors")
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k].to(saved[k].dtype), saved[k]) for k in saved)
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # trained, not LoRA's zero start

    # It generates, and greedily the same answer as the demo's own loading of the trained folder.
    prompt = tokenizer.apply_chat_template(real_tasks.messages(settings.questions()[1][0]), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    answer = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert tokenizer.decode(answer, skip_special_tokens=True).strip()
    demo_model, _ = load_model(smollm2_dir, settings.dtype, trained)
    expected = demo_model.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert torch.equal(answer, expected)
