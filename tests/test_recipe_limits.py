"""Hostile recipes, through the real command: refused in one short line, in seconds, before any model loads."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _train(recipe: Path, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_cli(["train", "offline", "--config", str(recipe), "--model_name_or_path", "no-model-is-loaded",
                    "--output_dir", str(recipe.parent / "out"), *flags], ROOT, timeout=timeout)


def _one_short_line(done: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 400, done.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _billion_laughs(key: str) -> str:
    """Nine aliases, each a list of ten of the previous one: 10**9 values from under 500 bytes."""
    lines = [f"{key}:", "  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"  - &{name} [" + ", ".join([f"*{previous}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_recipe_is_refused_in_seconds(tmp_path):
    for key in ("learning_rate", "report_to"):  # a value of the wrong type, and one of the right shape (a list)
        recipe = tmp_path / f"{key}.yaml"
        recipe.write_text(_billion_laughs(key))
        assert recipe.stat().st_size < 1000
        _one_short_line(_train(recipe), "expands to more than 10,000 values", "YAML aliases")


def test_self_referring_and_deeply_nested_recipes_are_one_line(tmp_path):
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("report_to: &a [none, *a]\n")
    _one_short_line(_train(cycle), "alias that refers to itself")
    deep = tmp_path / "deep.yaml"
    deep.write_text("learning_rate: " + "[" * 20_000 + "]" * 20_000 + "\n")
    _one_short_line(_train(deep), "nests lists or mappings too deeply")


def test_a_long_value_of_the_wrong_type_is_not_printed_whole(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text("learning_rate: [" + ", ".join(["lol"] * 5000) + "]\n")  # within the bound, still long
    line = _one_short_line(_train(recipe), "config key 'learning_rate' expects float")
    assert line.count("lol") <= 4


def test_a_hub_token_in_a_recipe_or_a_flag_is_refused_without_being_printed(tmp_path):
    token = "hf_" + "Q7x" * 12
    recipe = tmp_path / "token.yaml"
    recipe.write_text((ROOT / "tests" / "data" / "offline_tiny.yaml").read_text() + f"hub_token: {token}\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text((ROOT / "tests" / "data" / "offline_tiny.yaml").read_text())
    for done in (_train(recipe), _train(plain, "--hub_token", token)):
        assert token not in done.stdout + done.stderr
        _one_short_line(done, "hub_token=... is not accepted", "saved with every checkpoint", "HF_TOKEN")
        assert not (tmp_path / "out").exists()
