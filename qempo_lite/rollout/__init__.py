"""Rollout engines: sample k completions per prompt from the policy being trained.

Every engine implements :class:`RolloutEngine` (``engine.py``):
``generate(prompts, *, n, ..., seed) -> list[list[Completion]]`` (one inner list of ``n``
completions per prompt), ``sync(peft_model, state_dict=None)`` (``state_dict``: the adapter's
LoRA tensors gathered from a ZeRO-3 / FSDP-sharded model), ``probe()``, ``close()``, the flags
``samples_live_weights`` and ``serves_all_processes``, and ``for_training(policy, tokenizer,
args, num_processes=...)``, which builds it for an online run. ``rollout: NAME`` builds the
engine registered under NAME (:func:`register_engine`, :func:`make_engine`; the registry lines
are at the end of this module). Three engines ship:

* :class:`HFRollout` (``hf.py``) samples with ``model.generate`` from the live (PEFT) model;
  ``sync`` has nothing to do. It works everywhere and is the reference the vLLM engines are
  tested against.
* :class:`VLLMLoRARollout` (``inprocess.py``) serves the *base* model with vLLM and the adapter
  natively as a LoRA (``enable_lora=True`` + ``LoRARequest``). ``sync`` writes only the adapter
  (``save_pretrained``, safetensors) to a temporary directory and serves it under a fresh
  LoRA id: nothing is merged, so the base may be 4-bit (QLoRA) on the training side, and a
  sync moves megabytes, not the whole model. TRL's own vLLM path merges the adapter and pushes
  every weight, which breaks on 4-bit bases. It runs in the training process: one process only.
* :class:`VLLMServerRollout` (``server.py``) does the same through a vLLM OpenAI-compatible
  server started separately (``qempo-lite serve``): ``sync`` writes the adapter to a directory
  the server reads and loads it over HTTP (``/v1/load_lora_adapter``), ``generate`` sends
  ``/v1/completions`` requests with per-request seeds. The trainer calls it from the main
  process for every process (``serves_all_processes``), so any number of training processes
  share one server.

A prompt is a string, a chat (a list of ``{"role", "content"}`` messages: the tokenizer's chat
template is applied with the generation prompt), or a list of token ids (used as is). Rollouts
need ``temperature > 0`` (:func:`qempo_lite.generation.check_sampling`).

``Completion.logprobs`` are the model's own log-probabilities of the sampled tokens,
``log softmax(logits)`` at temperature 1 with no top-p truncation (vLLM's default
``raw_logprobs``), so that they can be compared with a forward pass of the policy.

Evaluation and the app sample several adapters of one base side by side through the second,
smaller protocol of ``serving.py``, :class:`ServingEngine` (load and unload adapters by name,
``generate`` many of them in one call with per-request seeds), built by name with
:func:`make_serving_engine` (:func:`register_serving_engine`, lines at the end of this module):
:class:`HFServing` (``hf.py``) and :class:`VLLMServing` (``inprocess.py``) ship, beside their
rollout engines.

What the engines share with the evaluation sampler (prompt ids, eos ids, seeds, the in-process
vLLM engine and the facts about vLLM it relies on) lives in :mod:`qempo_lite.generation`.
"""

from ..generation import (
    Prompt,
    eos_token_ids,
    process_group_exists,
    prompt_token_ids,
    shutdown_vllm,
    temporary_env,
)
from .common import Completion, SyncInfo, served_lora_name
from .engine import ENGINES, RolloutEngine, engine_names, make_engine, register_engine
from .hf import HFRollout, HFServing
from .inprocess import VLLMLoRARollout, VLLMServing
from .server import RolloutServerError, VLLMServerRollout
from .serving import (SERVING_ENGINES, ServingEngine, choose_serving_engine, make_serving_engine,
                      register_serving_engine, serving_engine_names)

register_engine("hf", HFRollout)
register_engine("vllm", VLLMLoRARollout)
register_engine("vllm_server", VLLMServerRollout)

register_serving_engine("hf", HFServing)
register_serving_engine("vllm", VLLMServing)

__all__ = [
    "ENGINES",
    "Completion",
    "HFRollout",
    "HFServing",
    "Prompt",
    "RolloutEngine",
    "RolloutServerError",
    "SERVING_ENGINES",
    "ServingEngine",
    "SyncInfo",
    "VLLMLoRARollout",
    "VLLMServerRollout",
    "VLLMServing",
    "choose_serving_engine",
    "engine_names",
    "eos_token_ids",
    "make_engine",
    "make_serving_engine",
    "process_group_exists",
    "prompt_token_ids",
    "register_engine",
    "register_serving_engine",
    "served_lora_name",
    "serving_engine_names",
    "shutdown_vllm",
    "temporary_env",
]
