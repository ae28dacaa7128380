"""Training runs that tests/test_multiprocess.py makes with one process (in pytest) and two (under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/multiprocess_runs.py MODEL_DIR OUT_DIR CASE [CASE ...]

Each case trains the tiny Llama of ``tests/conftest.py`` at a fixed *global* batch (4 rows), so
``per_device_train_batch_size`` is 4 divided by the number of processes, with plain SGD, and the
main process writes what it trained to ``OUT_DIR/CASE/``: ``losses.json`` (the logged loss of
each step) and ``adapter.safetensors`` (the final LoRA tensors).

* ``offline``: ``qempo-lite train offline`` on tests/data/offline_tiny_prefs.jsonl (``dpo``,
  so the reference forward runs too), with ``--push_to_hub``: the push and the metadata write
  are recorded per process in ``calls.jsonl`` (the push itself is replaced by that record).
* ``online_whole``: online ``qempo_kl``, k = 2: with two processes each holds whole groups.
* ``online_split``: online ``qempo_kl``, k = 4: with two processes each holds half a group.
  Rollouts come from the main process for every process (the path of ``rollout: vllm_server``)
  with transformers sampling, seeded per step, so one and two processes draw the same samples.
* ``online_server``: ``online_split`` with ``rollout: vllm_server``, the server at
  ``$QEMPO_TEST_SERVER_URL`` (tests/test_vllm_server.py starts it).
* ``refusals``: what two processes refuse (``rollout: vllm``), one message per process.
* ``gather``: the LoRA tensors of a model sharded by FSDP2 (``fully_shard``) and by FSDP1
  gathered by :func:`qempo_lite.distributed.gathered_adapter_state`; every process compares them
  with the unsharded model's and writes ``gather-rank{R}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "tests" / "data" / "offline_tiny_prefs.jsonl"
RECIPE = ROOT / "tests" / "data" / "offline_tiny.yaml"
GLOBAL_BATCH = 4
PROMPTS = [f"Name a colour, number {i}." for i in range(8)]


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _record(out: Path, what: str) -> None:
    rank, _ = world()
    with (out / "calls.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"call": what, "rank": rank}) + "\n")


def _losses(log_history) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


def _write_adapter(out: Path, model) -> None:
    from safetensors.torch import save_file

    from qempo_lite.distributed import gathered_adapter_state

    state = gathered_adapter_state(model)
    if world()[0] == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter.safetensors"))


def case_offline(model_dir: str, out: Path) -> None:
    import qempo_lite.hub as hub
    import qempo_lite.train_cli as train_cli

    real_write = train_cli.write_run_metadata

    def write_run_metadata(*args, **kwargs):
        _record(out, "metadata")
        return real_write(*args, **kwargs)

    def push_adapter(adapter_dir, repo_id, **kwargs):
        _record(out, "push")
        return f"recorded push of {adapter_dir} to {repo_id}"

    saved = train_cli.write_run_metadata, hub.push_adapter
    train_cli.write_run_metadata, hub.push_adapter = write_run_metadata, push_adapter
    try:
        _train_offline(model_dir, out)
    finally:
        train_cli.write_run_metadata, hub.push_adapter = saved


def _train_offline(model_dir: str, out: Path) -> None:
    from qempo_lite.train_cli import offline_cli

    _, size = world()
    run = out / "run"
    code = offline_cli(["--config", str(RECIPE), "--model_name_or_path", model_dir, "--dataset", str(PAIRS),
                        "--output_dir", str(run), "--loss_method", "dpo",
                        "--per_device_train_batch_size", str(GLOBAL_BATCH // size), "--max_steps", "3",
                        "--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "0", "--save_steps", "100",
                        "--push_to_hub", "true", "--hub_model_id", "someone/tiny-qempo"])
    assert code == 0
    if world()[0] == 0:
        state = json.loads((run / "trainer_state.json").read_text())
        (out / "losses.json").write_text(json.dumps(_losses(state["log_history"])))
        from safetensors.torch import load_file, save_file

        save_file(load_file(str(run / "adapter_model.safetensors")), str(out / "adapter.safetensors"))


def contains_e(completions, **kwargs):
    """A verifiable reward: 1 if the completion contains the letter e."""
    return [1.0 if "e" in c[0]["content"] else 0.0 for c in completions]


def case_online(model_dir: str, out: Path, k: int, server_url: str | None = None) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qempo_lite.online import QEMPOOnlineConfig, QEMPOOnlineTrainer
    from qempo_lite.rollout import HFEngine

    class MainProcessHFRollout(HFEngine):
        """transformers sampling on the main process for every process, as the vLLM server engine samples."""

        serves_all_processes = True

    _, size = world()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    server = {} if server_url is None else dict(rollout="vllm_server", vllm_server_url=server_url, vllm_server_retries=2)
    args = QEMPOOnlineConfig(
        **server, output_dir=str(out / "run"), loss_method="qempo_kl", beta1=0.05, beta2=0.05, num_generations=k,
        per_device_train_batch_size=GLOBAL_BATCH // size, gradient_accumulation_steps=1, max_completion_length=8,
        max_steps=3, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, bf16=False, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    torch.manual_seed(0)  # the same LoRA A matrices in every process and every run
    policy = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    engine = MainProcessHFRollout(policy, tokenizer) if server_url is None else None
    trainer = QEMPOOnlineTrainer(policy, reward_funcs=contains_e, args=args, train_dataset=prompts,
                                 processing_class=tokenizer, rollout_engine=engine)
    try:
        trainer.train()
    finally:
        trainer.close_rollout()
    if world()[0] == 0:
        (out / "metrics.json").write_text(json.dumps([e for e in trainer.state.log_history if "loss" in e]))
    if world()[0] == 0:
        (out / "losses.json").write_text(json.dumps(_losses(trainer.state.log_history)))
    _write_adapter(out, trainer.model_wrapped)


def case_refusals(model_dir: str, out: Path) -> None:
    """What several processes refuse: the in-process vLLM engine (one per process would collide)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qempo_lite.errors import QempoError
    from qempo_lite.online import QEMPOOnlineConfig, QEMPOOnlineTrainer

    args = QEMPOOnlineConfig(output_dir=str(out / "run"), rollout="vllm", num_generations=2,
                             per_device_train_batch_size=2, max_steps=1, bf16=False, use_cpu=True, report_to=[])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        QEMPOOnlineTrainer(model, reward_funcs=contains_e, args=args,
                           train_dataset=Dataset.from_dict({"prompt": ["Name a colour."] * 4}),
                           processing_class=AutoTokenizer.from_pretrained(model_dir),
                           peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        message = None
    except QempoError as err:
        message = str(err)
    (out / f"refusal-rank{world()[0]}.json").write_text(json.dumps({"rollout: vllm": message}))


def case_gather(model_dir: str, out: Path) -> None:
    """FSDP2 and FSDP1 shard a LoRA model; the gathered adapter equals the unsharded one."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from qempo_lite.distributed import gathered_adapter_state, is_sharded, save_adapter

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, _ = world()

    def lora_model():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(1)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(model, config)

    reference = gathered_adapter_state(lora_model())
    report = {"keys": len(reference)}

    sharded2 = lora_model()
    for layer in sharded2.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(sharded2)
    local = {n: p.to_local().numel() for n, p in sharded2.named_parameters() if "lora_" in n}
    state2 = gathered_adapter_state(sharded2)
    report["fsdp2"] = {
        "sharded": is_sharded(sharded2),
        "local_numel": sum(local.values()), "full_numel": sum(v.numel() for v in reference.values()),
        "same_keys": sorted(state2) == sorted(reference),
        "max_abs_diff": max((state2[k] - reference[k]).abs().max().item() for k in reference),
    }
    saved = save_adapter(sharded2, out / "fsdp2-adapter", state_dict=state2) if rank == 0 else None
    if saved is not None:
        from safetensors.torch import load_file

        on_disk = load_file(str(saved / "adapter_model.safetensors"))
        report["fsdp2"]["saved_tensors"] = len(on_disk)

    policy = ModuleWrapPolicy({LlamaDecoderLayer})
    sharded1 = FullyShardedDataParallel(lora_model(), device_id=torch.device("cpu"), use_orig_params=True,
                                        auto_wrap_policy=policy)
    local1 = sum(p.numel() for p in sharded1.parameters())
    state1 = gathered_adapter_state(sharded1)
    report["fsdp1"] = {
        "sharded": is_sharded(sharded1), "local_numel_all": local1,
        "full_numel_all": sum(p.numel() for p in lora_model().parameters()),
        "same_keys": sorted(state1) == sorted(reference),
        "max_abs_diff": max((state1[k] - reference[k]).abs().max().item() for k in reference),
    }
    (out / f"gather-rank{rank}.json").write_text(json.dumps(report))


def main(argv: list[str]) -> None:
    model_dir, out_dir, *cases = argv
    out_root = Path(out_dir)
    for case in cases:
        out = out_root / case
        out.mkdir(parents=True, exist_ok=True)
        if case == "offline":
            case_offline(model_dir, out)
        elif case == "online_whole":
            case_online(model_dir, out, k=2)
        elif case == "online_split":
            case_online(model_dir, out, k=4)
        elif case == "online_server":  # the vLLM server at $QEMPO_TEST_SERVER_URL
            case_online(model_dir, out, k=4, server_url=os.environ["QEMPO_TEST_SERVER_URL"])
        elif case == "gather":
            case_gather(model_dir, out)
        elif case == "refusals":
            case_refusals(model_dir, out)
        else:
            raise SystemExit(f"unknown case {case}")
    from qempo_lite.distributed import end_process_group

    end_process_group()  # as the CLI does after training: no teardown abort at exit


if __name__ == "__main__":
    main(sys.argv[1:])
