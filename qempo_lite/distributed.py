"""Several processes (``accelerate launch`` / ``torchrun``): the adapter, whole, from a sharded model.

Under DDP and DeepSpeed ZeRO-1/2 every process holds every LoRA parameter. Under DeepSpeed
ZeRO-3 and FSDP each process holds a shard, so saving or syncing the adapter first gathers
its LoRA tensors: :func:`gathered_adapter_state` is a collective (every process calls it, in
the same order) that gathers the LoRA parameters only, never the base weights. The main
process then writes them (:func:`save_adapter`); the trainers' ``save_model`` does both
through :func:`save_sharded_adapter`.

How each sharding is read:

* DeepSpeed ZeRO-3: parameters carry ``ds_id``; ``deepspeed.zero.GatheredParameters``
  materialises them for the duration of a block.
* FSDP2 (``fully_shard``): parameters are ``DTensor``; ``full_tensor()`` all-gathers one.
* FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True`` as PEFT needs):
  ``summon_full_params`` materialises the wrapped module's parameters; names lose FSDP's
  ``_fsdp_wrapped_module.`` infix so that they are the PEFT model's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    for infix in _WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


def _unwrap(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _fsdp1_roots(model) -> list:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # torch without distributed support
        return []
    return [m for m in model.modules() if isinstance(m, FSDP)][:1]


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def sharded_launch() -> str | None:
    """The parameter sharding ``accelerate launch`` set up for this process ("FSDP", "DeepSpeed ZeRO-3") or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        return "DeepSpeed ZeRO-3"
    return None


def active_adapter_name(peft_model) -> str:
    """The name of the PEFT model's active adapter (the first one when several are active)."""
    active = peft_model.active_adapter
    return active[0] if isinstance(active, (list, tuple)) else active


def is_sharded(model) -> bool:
    """Whether ``model`` (wrapped or not) holds its parameters in shards: ZeRO-3 or FSDP."""
    if _fsdp1_roots(model):
        return True
    return any(hasattr(p, "ds_id") or _is_dtensor(p) for p in _unwrap(model).parameters())


def gathered_adapter_state(model, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``model``'s adapter, whole and on the CPU, keyed as the PEFT model names them.

    ``model`` is the model as training holds it (the DDP / DeepSpeed / FSDP wrapper or the bare
    PEFT model). Under ZeRO-3 and FSDP this is a collective: call it on every process. Only the
    LoRA parameters are gathered (``lora_`` in their name, of ``adapter_name``, default: the
    active adapter); the base weights stay sharded.
    """
    peft_model = _unwrap(model)
    adapter_name = adapter_name or active_adapter_name(peft_model)
    wanted = lambda name: "lora_" in name and f".{adapter_name}." in name  # noqa: E731
    fsdp1 = _fsdp1_roots(model)
    if fsdp1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # Every parameter is materialised for the block (FSDP1 flattens them together): FSDP2, the recipes'
        # choice, gathers the LoRA tensors alone. On a GPU the full parameters are offloaded to the CPU.
        on_gpu = next(fsdp1[0].parameters()).device.type != "cpu"
        context = FSDP.summon_full_params(fsdp1[0], writeback=False, offload_to_cpu=on_gpu)
    else:
        context = contextlib.nullcontext()
    with context:
        params = [(_clean(name), p) for name, p in peft_model.named_parameters() if wanted(_clean(name))]
        zero3 = [p for _, p in params if hasattr(p, "ds_id")]
        if zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
        else:
            gather = contextlib.nullcontext()
        with gather:
            state = {}
            for name, p in params:
                tensor = p.detach()
                if _is_dtensor(tensor):
                    mesh_device = tensor.device_mesh.device_type
                    if tensor.device.type != mesh_device:  # fsdp_offload_params: the all-gather runs on the GPU
                        tensor = tensor.to(mesh_device)
                    tensor = tensor.full_tensor()
                state[name] = tensor.to("cpu", copy=True)
    return state


def save_adapter(peft_model, directory: str | os.PathLike, *, adapter_name: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter (safetensors + ``adapter_config.json``) to ``directory``, atomically; returns it.

    ``state_dict`` is the gathered adapter (:func:`gathered_adapter_state`) when the model is
    sharded. The files are staged in a hidden sibling and renamed into place, so a reader (a
    vLLM server polling the directory, a resume) never sees half an adapter. ``adapter_config.json``
    sits at the root of ``directory`` whatever the adapter's name, as vLLM expects.
    """
    peft_model = _unwrap(peft_model)
    adapter_name = adapter_name or active_adapter_name(peft_model)
    directory = Path(directory)
    staging = directory.parent / f".{directory.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        peft_model.save_pretrained(str(staging), safe_serialization=True, selected_adapters=[adapter_name],
                                   save_embedding_layers=False, state_dict=state_dict)
        saved = staging if adapter_name == "default" else staging / adapter_name
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(saved, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def save_sharded_adapter(trainer, output_dir: str | None) -> bool:
    """``Trainer.save_model`` for a PEFT model under ZeRO-3 / FSDP: gather the LoRA tensors, main process writes.

    Returns False (nothing done) when the model is not sharded or not a PEFT model; the
    trainer's own ``save_model`` then applies. The checkpoint's optimizer and sharded states are
    saved by ``Trainer._save_checkpoint`` as usual; this only makes the adapter file whole, so
    the final directory (and each checkpoint) holds a loadable ``adapter_model.safetensors``
    without ``zero3_save_16bit_model`` or a full-state-dict gather of the base weights.
    """
    from accelerate.utils import is_peft_model

    if not is_peft_model(_unwrap(trainer.model)) or not is_sharded(trainer.model_wrapped):
        return False
    state = gathered_adapter_state(trainer.model_wrapped)
    if trainer.args.should_save:
        trainer._save(output_dir or trainer.args.output_dir, state_dict=state)
    trainer.accelerator.wait_for_everyone()
    return True


def end_process_group() -> None:
    """Destroy ``torch.distributed``'s process group after a finished run, before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads can still hold work objects whose
    tensors reach back into Python, and a process whose training finished aborts at exit
    ("terminate called without an active exception", exit code -6; pytorch/pytorch#190489).
    Called on success only: after an error, other processes may still wait in a collective,
    and the teardown would hang them instead of letting the launcher stop them.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every process is done with the group before any leaves it
        dist.destroy_process_group()


__all__ = ["active_adapter_name", "end_process_group", "gathered_adapter_state", "is_sharded", "save_adapter",
           "save_sharded_adapter", "sharded_launch"]
