"""A `--key value` flag means what `key: value` means in a YAML recipe, for every kind of value."""

from __future__ import annotations

import pytest
import yaml

from qempo_lite.recipe import merge_values, parse_recipe
from qempo_lite.recipe_files import recipe_path, shipped_recipes
from qempo_lite.train_cli import _OFFLINE_TYPES, _ONLINE_TYPES

# (key, the value as written after "key: " in YAML and after "--key " on the command line)
VALUE_KINDS = [
    ("report_to", "none"), ("report_to", "all"), ("report_to", "[tensorboard, wandb]"), ("report_to", "null"),
    ("limit", "null"), ("limit", "none"), ("limit", "~"), ("limit", "12"),
    ("eval_split", "null"), ("eval_split", "none"), ("eval_split", "test_prefs"),
    ("quantization", "none"), ("quantization", "4bit"),
    ("bf16", "true"), ("bf16", "false"), ("bf16", "yes"), ("bf16", "off"),
    ("beta", "5e-7"), ("beta", "4.0e-3"), ("beta", "1"), ("beta", "0.1"),
    ("warmup_steps", "0.1"), ("warmup_steps", "10"), ("lora_dropout", "0"), ("seed", "42"),
    ("target_modules", "all-linear"), ("target_modules", "[q_proj, v_proj]"),
    ("dataset", "tests/data/pairs.jsonl"), ("output_dir", "runs/q7b"), ("hub_model_id", "you/name"),
    ("lr_scheduler_type", "cosine"), ("eval_strategy", "'no'"), ("eval_strategy", "steps"),
]


@pytest.mark.parametrize("key, raw", VALUE_KINDS)
def test_flag_means_what_yaml_means(key, raw):
    yaml_value = yaml.safe_load(f"{key}: {raw}")[key]
    from_yaml = merge_values({key: yaml_value}, {}, _OFFLINE_TYPES)
    from_flag = merge_values({}, {key: raw}, _OFFLINE_TYPES)
    assert from_flag == from_yaml
    assert type(from_flag[key]) is type(from_yaml[key])


def test_report_to_none_on_the_command_line_builds_the_config():
    flags = ["--model_name_or_path", "m", "--dataset", "d.jsonl", "--bf16", "false"]
    from_flag = parse_recipe([*flags, "--report_to", "none"], _OFFLINE_TYPES)[0]
    assert from_flag.report_to == [] and from_flag.report_to == parse_recipe(
        [*flags, "--report_to", "[none]"], _OFFLINE_TYPES)[0].report_to


def test_plain_strings_the_shell_passes_still_work():
    """Values YAML would read as another type, where the key takes a string: the string the shell passed."""
    values = merge_values({}, {"run_name": "2024", "eval_strategy": "no", "hub_model_id": "you/on"}, _OFFLINE_TYPES)
    assert values["run_name"] == "2024" and values["hub_model_id"] == "you/on"
    assert values["eval_strategy"] == "no"


@pytest.mark.parametrize("name", [n for n in shipped_recipes() if not n.startswith("accelerate/")])
def test_every_shipped_recipe_key_as_a_flag_means_what_the_file_says(name):
    """Each key of each shipped recipe, its value's YAML text passed as a flag, gives the file's value."""
    text = recipe_path(name).read_text()
    types = _OFFLINE_TYPES if name.startswith("offline/") else _ONLINE_TYPES

    def as_flag(node) -> str:  # the value's text; a block list ("- a" lines) as the one-line "[a, b]"
        if isinstance(node, yaml.SequenceNode) and not node.flow_style:
            return "[" + ", ".join(as_flag(item) for item in node.value) + "]"
        return text[node.start_mark.index:node.end_mark.index]

    flags = {key.value: as_flag(value) for key, value in yaml.compose(text).value}
    assert merge_values({}, flags, types) == merge_values(yaml.safe_load(text), {}, types)
