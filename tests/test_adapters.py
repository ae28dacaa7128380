"""qempo_lite.adapters: one module reads an adapter directory, and every reader fails the same way."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_adapter

from qempo_lite import adapters
from qempo_lite.adapters import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, check_adapter, check_adapter_files, \
    read_metadata
from qempo_lite.errors import QempoError


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "run", seed=1, r=4)


def copy(adapter: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(adapter, tmp_path / name))


def test_the_metadata_file_is_named_once():
    from qempo_lite.runs import METADATA_FILE as offline_name

    assert offline_name is adapters.METADATA_FILE == "qempo_lite.json"


def test_a_bad_qempo_lite_json_is_one_error_for_every_reader(adapter, tmp_path, tiny_model_dir):
    from qempo_lite.app import adapter_metadata
    from qempo_lite.hub import push_adapter

    bad = copy(adapter, tmp_path, "bad")
    (bad / METADATA_FILE).write_bytes(b"\xff{not json")
    expected = r"bad/qempo_lite.json is not UTF-8 \(byte 0xff at offset 0\); fix or remove it"
    with pytest.raises(QempoError, match=expected) as err:
        read_metadata(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(QempoError, match=expected):  # the evaluation sampler
        check_adapter("bad", bad, str(tiny_model_dir))
    with pytest.raises(QempoError, match=expected):  # the push
        push_adapter(bad, "someone/bad", dry_run=tmp_path / "out", base_model_id="someone/base", tokenizer="skip")
    assert adapter_metadata(bad) == {}  # the app catches it: the column is shown without its method


def test_the_sampler_follows_links_that_resolve_and_the_push_stays_inside(adapter, tmp_path, tiny_model_dir):
    # A Hub cache snapshot: every file a link into a folder beside it.
    blobs, linked = tmp_path / "blobs", tmp_path / "linked"
    blobs.mkdir()
    linked.mkdir()
    for file in adapter.iterdir():
        shutil.copy(file, blobs / file.name)
        (linked / file.name).symlink_to(blobs / file.name)
    assert check_adapter("linked", linked, str(tiny_model_dir)) == linked
    with pytest.raises(QempoError, match="symlink to a file outside the adapter directory"):
        check_adapter_files(linked)
    (linked / WEIGHTS_FILE).unlink()
    (linked / WEIGHTS_FILE).symlink_to(tmp_path / "gone")
    with pytest.raises(QempoError, match=f"{WEIGHTS_FILE} in adapter 'linked' .* is a broken or looping symlink"):
        check_adapter("linked", linked, str(tiny_model_dir))


def test_pickled_weights_name_the_fix(adapter, tmp_path):
    only = copy(adapter, tmp_path, "only")
    (only / WEIGHTS_FILE).rename(only / "adapter_model.bin")
    with pytest.raises(QempoError, match=r"has no adapter_model.safetensors .*safe_serialization=True"):
        check_adapter_files(only)
    both = copy(adapter, tmp_path, "both")
    (both / "adapter_model.bin").write_bytes(b"\x80\x04 pickled")
    with pytest.raises(QempoError, match=r"holds pickled weights \(adapter_model.bin\)"):
        check_adapter("both", both, "any/base")


def test_the_sampler_checks_the_lora_weights_as_the_push_does(adapter, tmp_path, tiny_model_dir):
    other_rank = copy(adapter, tmp_path, "rank")
    config = json.loads((other_rank / CONFIG_FILE).read_text())
    (other_rank / CONFIG_FILE).write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(QempoError, match="has rank 4, but adapter_config.json says r=8"):
        check_adapter("rank", other_rank, str(tiny_model_dir))
    with pytest.raises(QempoError, match="has rank 4, but adapter_config.json says r=8"):
        check_adapter_files(other_rank)


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[:-64], "adapter_model.safetensors is truncated or padded"),
    (lambda b: b + b"\0" * 64, "adapter_model.safetensors is truncated or padded"),
    (lambda b: b[:6], "adapter_model.safetensors is not a safetensors file"),
])
def test_a_checkpoint_is_checked_by_the_adapters_safetensors_check(adapter, tmp_path, damage, reason):
    from qempo_lite.runs import checkpoint_problem

    checkpoint = copy(adapter, tmp_path, "checkpoint-1")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    assert checkpoint_problem(checkpoint, needs_optimizer=False) is None
    weights = checkpoint / WEIGHTS_FILE
    weights.write_bytes(damage(weights.read_bytes()))
    problem = checkpoint_problem(checkpoint, needs_optimizer=False)
    assert problem is not None and problem.startswith(reason) and "save_pretrained" not in problem
