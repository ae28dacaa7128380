"""Two processes train what one process trains, at the same global batch (torchrun, gloo, CPU).

``accelerate launch --num_processes 2 --cpu`` needs ``mpirun`` (without it, it quietly starts one
process); ``torchrun`` starts two gloo processes that accelerate picks up, as ``accelerate
launch`` does on GPUs. One torchrun launch runs every case of ``tests/multiprocess_runs.py``; the
one-process runs happen in this process. Plain SGD, so equal gradients give equal adapters.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "tests" / "multiprocess_runs.py"
TRAINING_CASES = ("offline", "online_whole", "online_split")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-processes")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(RUNS), str(tiny_model_dir), str(out), *TRAINING_CASES, "refusals", "gather"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> Path:
    sys.path.insert(0, str(RUNS.parent))
    try:
        import multiprocess_runs
    finally:
        sys.path.remove(str(RUNS.parent))
    out = tmp_path_factory.mktemp("one-process")
    multiprocess_runs.main([str(tiny_model_dir), str(out), *TRAINING_CASES])
    return out


def _compare(one: Path, two: Path) -> tuple[float, float]:
    from safetensors.torch import load_file

    losses_one, losses_two = (json.loads((d / "losses.json").read_text()) for d in (one, two))
    assert len(losses_one) == len(losses_two) == 3
    adapter_one, adapter_two = (load_file(str(d / "adapter.safetensors")) for d in (one, two))
    assert sorted(adapter_one) == sorted(adapter_two) and adapter_one
    # The adapter really moved (LoRA B starts at zero), so equality is not that of two untouched adapters.
    assert max(v.abs().max().item() for k, v in adapter_one.items() if "lora_B" in k) > 1e-3
    loss_gap = max(abs(a - b) for a, b in zip(losses_one, losses_two))
    adapter_gap = max((adapter_one[k] - adapter_two[k]).abs().max().item() for k in adapter_one)
    return loss_gap, adapter_gap


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", TRAINING_CASES)
def test_two_processes_train_what_one_process_trains(one_process, two_processes, case):
    loss_gap, adapter_gap = _compare(one_process / case, two_processes / case)
    assert loss_gap <= 1e-6, f"{case}: losses differ by {loss_gap:.2e}"
    assert adapter_gap <= 1e-5, f"{case}: adapters differ by {adapter_gap:.2e}"


@pytest.mark.multiprocess
def test_only_the_main_process_writes_metadata_and_pushes(one_process, two_processes):
    for out in (one_process, two_processes):
        calls = [json.loads(line) for line in (out / "offline" / "calls.jsonl").read_text().splitlines()]
        assert calls == [{"call": "metadata", "rank": 0}, {"call": "push", "rank": 0}]
        metadata = json.loads((out / "offline" / "run" / "qempo_lite.json").read_text())
        assert metadata["steps"] == 3 and metadata["method"] == "dpo"


@pytest.mark.multiprocess
def test_fsdp_sharded_adapters_are_gathered_whole(two_processes):
    from safetensors.torch import load_file

    for rank in (0, 1):
        report = json.loads((two_processes / "gather" / f"gather-rank{rank}.json").read_text())
        for kind in ("fsdp2", "fsdp1"):
            assert report[kind]["sharded"] and report[kind]["same_keys"], (rank, kind, report)
            assert report[kind]["max_abs_diff"] == 0.0, (rank, kind, report)
        # Each process held half of every LoRA tensor (FSDP2), or half of all parameters (FSDP1).
        assert report["fsdp2"]["local_numel"] * 2 == report["fsdp2"]["full_numel"]
        assert report["fsdp1"]["local_numel_all"] * 2 == report["fsdp1"]["full_numel_all"]
    saved = load_file(str(two_processes / "gather" / "fsdp2-adapter" / "adapter_model.safetensors"))
    assert len(saved) == report["keys"] and all(torch.isfinite(v).all() for v in saved.values())
    assert (two_processes / "gather" / "fsdp2-adapter" / "adapter_config.json").is_file()


@pytest.mark.multiprocess
def test_two_processes_refuse_the_in_process_vllm_engine_and_name_the_server(two_processes):
    for rank in (0, 1):  # every process stops with the same one-line message, none is left waiting
        message = json.loads((two_processes / "refusals" / f"refusal-rank{rank}.json").read_text())["rollout: vllm"]
        assert message and "\n" not in message
        assert "supports one training process, found 2" in message and "rollout: vllm_server" in message


# ------------------------------------------------------------------ set-ups of accelerate launch, without GPUs


@pytest.mark.parametrize("env, sharding", [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
])
def test_qlora_is_refused_where_the_base_would_be_sharded(monkeypatch, tiny_model_dir, env, sharding):
    from qempo_lite.errors import QempoError
    from qempo_lite.models import load_policy

    for key, value in env.items():  # what accelerate launch exports with the fsdp and zero3 configs
        monkeypatch.setenv(key, value)
    with pytest.raises(QempoError, match=f"{sharding} cannot shard; launch with the ddp or deepspeed_zero2 "
                                         "accelerate config") as err:
        load_policy(str(tiny_model_dir), quantization="4bit")
    assert "\n" not in str(err.value)


def _checkpoint(path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    save_file({"base_model.model.lora_A.weight": torch.zeros(2, 2)}, str(path / "adapter_model.safetensors"))
    return path


def test_resume_reads_deepspeed_and_fsdp_checkpoints(tmp_path):
    """The layouts Trainer writes under DeepSpeed (`latest` + global_stepN/) and FSDP (sharded optimizer_0/)."""
    from qempo_lite.runs import checkpoint_problem

    deepspeed = _checkpoint(tmp_path / "deepspeed")
    (deepspeed / "latest").write_text("global_step2")
    (deepspeed / "global_step2").mkdir()
    assert checkpoint_problem(deepspeed) == "the DeepSpeed optimizer states are missing"
    torch.save({"state": 1}, deepspeed / "global_step2" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoint_problem(deepspeed) is None

    fsdp = _checkpoint(tmp_path / "fsdp")
    (fsdp / "optimizer_0").mkdir()
    torch.save({}, fsdp / "scheduler.pt")
    assert checkpoint_problem(fsdp) == "optimizer_0 (sharded optimizer states) is incomplete"
    (fsdp / "optimizer_0" / ".metadata").write_bytes(b"written last by torch.distributed.checkpoint")
    assert checkpoint_problem(fsdp) is None
    (fsdp / "scheduler.pt").unlink()
    assert checkpoint_problem(fsdp) == "scheduler.pt is missing or unreadable"


def _readme_launches() -> list[list[str]]:
    import shlex

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Scaling out"):text.index("## Methods")]
    return [shlex.split(line) for line in section.splitlines() if "accelerate launch --config_file" in line]


def test_readme_launch_commands_keep_the_recipes_global_batch():
    """Every `accelerate launch` of the README names existing files, valid keys, and the recipe's global batch."""
    from accelerate.commands.config.config_args import load_config_from_file

    from qempo_lite import train_cli
    from qempo_lite.recipe import parse_recipe
    from qempo_lite.recipe_files import recipe_path

    launches = _readme_launches()
    assert len(launches) >= 4
    for args in launches:
        # --config_file "$(qempo-lite recipes path NAME)": what that command prints
        config_file = recipe_path(re.fullmatch(r"\$\(qempo-lite recipes path (\w+)\)",
                                               args[args.index("--config_file") + 1]).group(1))
        assert load_config_from_file(str(config_file)).distributed_type.value in ("MULTI_GPU", "DEEPSPEED", "FSDP")
        processes = int(args[args.index("--num_processes") + 1])
        mode = args[args.index("train") + 1]
        rest = args[args.index("train") + 2:]
        recipe = ["--config", rest[rest.index("--config") + 1]]
        types = train_cli._OFFLINE_TYPES if mode == "offline" else train_cli._ONLINE_TYPES
        cpu = ["--bf16", "false", "--use_cpu", "true"]  # the recipes are written for GPUs; these only parse them
        scaled = parse_recipe([*recipe, *rest[2:], *cpu], types, help_hint="", mode=mode)[0]
        alone = parse_recipe([*recipe, *cpu], types, help_hint="", mode=mode)[0]
        assert (scaled.per_device_train_batch_size * processes * scaled.gradient_accumulation_steps
                == alone.per_device_train_batch_size * alone.gradient_accumulation_steps), args
        if mode == "online":
            assert scaled.per_device_train_batch_size * processes * scaled.gradient_accumulation_steps \
                % scaled.num_generations == 0


def test_accelerate_configs_are_what_the_readme_says():
    from accelerate.commands.config.config_args import load_config_from_file

    from qempo_lite.recipe_files import recipe_path

    configs = {name: load_config_from_file(str(recipe_path(f"accelerate/{name}")))
               for name in ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp")}
    assert configs["ddp"].distributed_type.value == "MULTI_GPU"
    assert configs["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert configs["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3
    assert configs["fsdp"].fsdp_config["fsdp_version"] == 2
    assert configs["fsdp"].fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert all(c.mixed_precision == "bf16" and not c.use_cpu for c in configs.values())


def test_a_finished_command_leaves_its_process_group_and_a_failed_one_keeps_it():
    """torchrun / accelerate: a command that succeeded destroys the process group before the interpreter exits
    (left to interpreter shutdown, gloo can abort a finished run with exit code -6); a failed one leaves it, since
    other processes may still wait in a collective."""
    import torch.distributed as dist

    from qempo_lite.cli import main

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert main(["recipes", "show", "no-such-recipe"]) == 2
        assert dist.is_initialized()
        assert main(["recipes", "list"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
