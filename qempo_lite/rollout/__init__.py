"""Engines: sample k completions per prompt from a base model and the adapters it serves.

Every engine implements the one protocol of ``engine.py``, :class:`Engine`:
``generate(adapters, prompt_ids, *, n, ..., seed) -> {label: one list of n completions per prompt}``
(``adapters`` maps each label to a saved adapter loaded with ``load_adapter(name, path)``, to
:data:`TRAINED`, the adapter being trained, or to None, the base model), ``sync(peft_model,
state_dict=None)`` (serve the adapter being trained; ``state_dict``: its LoRA tensors gathered
from a ZeRO-3 / FSDP-sharded model), ``probe()``, ``close()``, and two constructors:
``for_training(policy, tokenizer, args, num_processes=...)`` for an online run and
``for_serving(base_model, tokenizer, eos_token_ids, **settings)`` for evaluation and the app.
``sample(prompts, n=...)`` is the rollout call on top: the trained adapter's completions of
strings, chats or token ids. One registry (:func:`register_engine`; the lines are at the end of
this module) serves ``rollout: NAME`` (:func:`make_engine`) and ``--backend NAME``
(:func:`make_serving_engine`, :func:`choose_serving_engine`: what ``auto`` means). Three engines ship:

* :class:`HFEngine` (``hf.py``) samples with ``model.generate``: for training, the live (PEFT)
  model, so ``sync`` has nothing to do; for serving, saved adapters switched with ``set_adapter``.
  It works everywhere and is the reference the vLLM engines are tested against.
* :class:`VLLMLoRAEngine` (``inprocess.py``) serves the *base* model with vLLM and every adapter
  natively as a LoRA (``enable_lora=True`` + ``LoRARequest``). ``sync`` writes only the adapter
  (``save_pretrained``, safetensors) to a temporary directory and serves it under a fresh LoRA
  id: nothing is merged, so the base may be 4-bit (QLoRA) on the training side, and a sync moves
  megabytes, not the whole model. TRL's own vLLM path merges the adapter and pushes every weight,
  which breaks on 4-bit bases. It runs in the training process: one process only.
* :class:`VLLMServerEngine` (``server.py``) does the same through a vLLM OpenAI-compatible server
  started separately (``qempo-lite serve``): ``sync`` writes the adapter to a directory the server
  reads and loads it over HTTP (``/v1/load_lora_adapter``), ``generate`` sends ``/v1/completions``
  requests with per-request seeds. The trainer calls it from the main process for every process
  (``serves_all_processes``), so any number of training processes share one server. It trains only.

A prompt is a string, a chat (a list of ``{"role", "content"}`` messages: the tokenizer's chat
template is applied with the generation prompt), or a list of token ids (used as is). Rollouts
need ``temperature > 0`` (:func:`qempo_lite.generation.check_sampling`).

``Completion.logprobs`` are the model's own log-probabilities of the sampled tokens,
``log softmax(logits)`` at temperature 1 with no top-p truncation (vLLM's default
``raw_logprobs``), so that they can be compared with a forward pass of the policy.

What the engines share with the rest of the package (prompt ids, eos ids, seeds, the in-process
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
from .engine import (ENGINES, TRAINED, Engine, choose_serving_engine, engine_names, make_engine, make_serving_engine,
                     register_engine, request_seed, serving_engine_names)
from .hf import HFEngine
from .inprocess import VLLMLoRAEngine
from .server import RolloutServerError, VLLMServerEngine

register_engine("hf", HFEngine)
register_engine("vllm", VLLMLoRAEngine)
register_engine("vllm_server", VLLMServerEngine)

__all__ = [
    "ENGINES",
    "TRAINED",
    "Completion",
    "Engine",
    "HFEngine",
    "Prompt",
    "RolloutServerError",
    "SyncInfo",
    "VLLMLoRAEngine",
    "VLLMServerEngine",
    "choose_serving_engine",
    "engine_names",
    "eos_token_ids",
    "make_engine",
    "make_serving_engine",
    "process_group_exists",
    "prompt_token_ids",
    "register_engine",
    "request_seed",
    "served_lora_name",
    "serving_engine_names",
    "shutdown_vllm",
    "temporary_env",
]
