"""Rewards named in a recipe: built-ins, module:function and path.py:function with TRL's signature."""

import json

import pytest

from cli_runner import run_cli
from qempo_lite.errors import QempoError
from qempo_lite.rewards.plugins import load_reward_funcs

COLUMNS = ["prompt", "answers"]
GOOD = '''
def starts_with_a(completions, **kwargs):
    return [1.0 if c[0]["content"].lower().startswith("a") else 0.0 for c in completions]

def no_kwargs(completions):
    return [0.0 for _ in completions]

def needs_gold(completions, gold, **kwargs):
    return [0.0 for _ in completions]

def infinite(completions, **kwargs):
    return [float("inf") for _ in completions]

def too_few(completions, **kwargs):
    return [1.0]
'''


@pytest.fixture
def module_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(GOOD)
    return path


def _one_line_error(names, columns=COLUMNS, match=""):
    with pytest.raises(QempoError, match=match) as err:
        load_reward_funcs(names, columns)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_built_ins_and_files_load_and_score(module_file):
    answer_set, mine = load_reward_funcs(["answer_set", f"{module_file}:starts_with_a"], COLUMNS)
    completions = [[{"role": "assistant", "content": "Apple."}], [{"role": "assistant", "content": "pear"}]]
    assert answer_set(completions=completions, answers=[["apple"], ["apple"]], prompts=["p", "p"]) == [1.0, 0.0]
    assert mine(prompts=["p", "p"], completions=completions, answers=[[], []], trainer_state=None) == [1.0, 0.0]
    assert mine.__name__ == "starts_with_a"  # TRL logs each reward under its function's name
    (fn,) = load_reward_funcs(["qempo_lite.rewards.answer_sets:set_reward"], COLUMNS)
    assert fn(completions=completions, answers=[["pear"], ["pear"]]) == [0.0, 1.0]


def test_bad_rewards_are_one_line_errors(module_file, tmp_path):
    _one_line_error(["nonsense"], match="neither a built-in")
    _one_line_error(["qempo_lite.no_such_module:f"], match="cannot be imported")
    _one_line_error([f"{tmp_path / 'missing.py'}:f"], match="is not a file")
    _one_line_error([f"{module_file}:absent"], match="has no function 'absent'")
    _one_line_error([f"{module_file}:no_kwargs"], match=r"must take \*\*kwargs")
    _one_line_error([f"{module_file}:needs_gold"], match="needs gold")
    _one_line_error(["math"], match="reads the column 'answer'")
    _one_line_error([], match="reward_funcs is empty")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert "RuntimeError: boom" in _one_line_error([f"{broken}:f"])


def test_values_that_are_not_finite_numbers_stop_with_one_line(module_file):
    completions = [[{"role": "assistant", "content": "x"}]] * 2
    infinite, too_few = load_reward_funcs([f"{module_file}:infinite", f"{module_file}:too_few"], COLUMNS)
    with pytest.raises(QempoError, match="returned inf for completion 0"):
        infinite(completions=completions)
    with pytest.raises(QempoError, match="not one value per completion"):
        too_few(completions=completions)


@pytest.mark.slow
def test_cli_trains_with_a_reward_from_a_file_and_refuses_a_bad_one_before_loading(tmp_path, tiny_model_dir,
                                                                                   module_file):
    import yaml

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Name a fruit, number {i}.", "answers": ["apple", "pear"]}) + "\n"
                            for i in range(4)))
    recipe = dict(model_name_or_path=str(tiny_model_dir), lora_r=8, lora_alpha=16, datasets=[str(data)],
                  reward_funcs=["answer_set", f"{module_file}:starts_with_a"], reward_weights=[1.0, 0.5],
                  loss_method="qempo", output_dir=str(tmp_path / "run"), num_generations=4,
                  per_device_train_batch_size=4, max_completion_length=4, max_steps=1, learning_rate=1e-3,
                  save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True, bf16=False)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = run_cli(["train", "online", "--config", str(path)], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "qempo_lite.json").read_text())
    assert record["online"]["reward"] == recipe["reward_funcs"]
    bad = run_cli(["train", "online", "--config", str(path), "--reward_funcs", f"[{module_file}:no_kwargs]",
                   "--output_dir", str(tmp_path / "run2")], tmp_path)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("error: reward") and "**kwargs" in lines[-1]
    assert not any("Loading weights" in line for line in lines)  # refused before the model loads
