"""Sample completions from one base model and several LoRA adapters at once, for evaluation.

A :class:`Sampler` loads the base model once and serves any number of adapters of it, plus the
base model itself (an adapter entry of ``None``), through the serving engine registered under
``backend`` (:class:`qempo_lite.rollout.Engine`, built by
:func:`~qempo_lite.rollout.make_serving_engine`):

* ``backend="vllm"`` (:class:`~qempo_lite.rollout.VLLMLoRAEngine`): one in-process vLLM engine with
  ``enable_lora=True``; each adapter is a ``LoRARequest`` and one ``generate`` call carries the
  requests of every adapter, so vLLM batches them together (multi-LoRA). Closing the Sampler
  shuts the engine down and gives the environment back.
* ``backend="hf"`` (:class:`~qempo_lite.rollout.HFEngine`): one ``transformers`` model wrapped by
  PEFT, each adapter loaded under its own name, switched with ``set_adapter``; the base model
  samples inside ``disable_adapter()``. No second copy of the base weights is ever made.
* ``backend="auto"``: vLLM when it is installed, transformers otherwise.
* any other name given to :func:`~qempo_lite.rollout.register_engine`.

Both shipped engines sample exactly ``temperature`` + ``top_p``: no top-k, no repetition penalty from
the model's ``generation_config``, so they draw from the same distribution; ``temperature=0``
decodes greedily (the ``n`` draws of a prompt are then one answer). Every request is seeded from
(``seed``, adapter name, prompt index), so an adapter's draws do not depend on what else is
sampled alongside. Prompts are strings (one user message) or chats (lists of
``{"role", "content"}`` messages ending with a user message, so multi-turn contexts work); the
tokenizer's chat template is always applied.

Adapters are checked before anything is loaded (:func:`qempo_lite.adapters.check_adapter`): a
safetensors LoRA adapter directory (pickled weights are never loaded), recorded for this base
model (``qempo_lite.json``'s ``base_model`` or PEFT's ``base_model_name_or_path``), and with
weight shapes that fit the base model's modules (hidden size, vocabulary, layer count).

Samples and their JSONL files (:func:`save_samples` / :func:`load_samples`) are defined in
:mod:`qempo_lite.evaluate.samples` and importable from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qempo_lite.adapters import ANYWHERE, adapter_config, check_adapter, max_rank
from qempo_lite.errors import QempoError
from qempo_lite.evaluate.samples import Sample, load_samples, save_samples, to_messages
from qempo_lite.generation import check_sampling, checkpoint_eos_token_ids, free_memory, prompt_token_ids, temporary_env
from qempo_lite.rollout.engine import ENGINES, choose_serving_engine, make_serving_engine
from qempo_lite.rollout.serving import completion_length, meta_parameter_shapes

logger = logging.getLogger("qempo_lite")

AdapterSpec = Mapping[str, "str | os.PathLike | None"] | Sequence[str] | str


class Sampler:
    """The base model loaded once, serving several LoRA adapters (and itself) for sampling.

    ``adapters`` given here are checked and loaded up front (and size vLLM's ``max_loras``);
    more can be passed to :meth:`sample` later, so one Sampler can serve a long-lived app.
    ``gpu_memory_utilization``, ``max_model_len`` (default: the model's context, at most
    4096) and ``max_lora_rank`` configure the vLLM engine (on vLLM's CPU backend the first is
    the share of *CPU* memory it reserves);
    ``batch_size`` is the number of sequences per ``generate`` call of the transformers backend.
    ``lora=False`` serves the base model only (vLLM then builds no LoRA layers: faster, and on its
    CPU backend much faster for large batches); adapters are refused.
    Each engine reads the settings it names (:attr:`~qempo_lite.rollout.Engine.settings`);
    ``engine_kwargs`` go to the engine as they are (vLLM's ``LLM`` options).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, base_model: str | os.PathLike, *, backend: str = "auto",
                 adapters: Mapping[str, str | os.PathLike | None] | None = None, max_lora_rank: int = 64,
                 max_loras: int | None = None, gpu_memory_utilization: float = 0.9, dtype: str = "auto",
                 max_model_len: int | None = None, batch_size: int = 64, device: str | None = None,
                 allow_base_mismatch: bool = False, seed: int = 0, lora: bool = True, **engine_kwargs: Any):
        self.engine = None
        backend, _, passed_over = choose_serving_engine(backend)
        if passed_over:
            reason, remedy = passed_over
            logger.info("%s: sampling with %s (%s)", reason, ENGINES[backend].title, remedy)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise QempoError(f"batch_size must be a positive integer, got {batch_size!r}")
        local = Path(base_model).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise QempoError(f"base model {base_model} is a local path without config.json; pass a model directory "
                             "or a Hub id")
        self.base_model = str(local) if local.exists() else str(base_model)
        self.backend = backend
        self.batch_size = batch_size
        self.max_lora_rank = max_lora_rank
        self.allow_base_mismatch = allow_base_mismatch
        self.lora = lora
        self._adapters: dict[str, Path] = {}  # name -> directory

        from transformers import AutoTokenizer

        try:
            with temporary_env(**({"HF_HUB_OFFLINE": "1"} if local.exists() else {})):
                self.tokenizer = AutoTokenizer.from_pretrained(self.base_model, trust_remote_code=False)
        except OSError as err:
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise QempoError(f"cannot load base model {self.base_model} ({reason}); pass a local model directory "
                             "or a Hub id reachable from here") from None
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise QempoError(f"the tokenizer of {self.base_model} has no chat template; use an instruct model "
                             "(or save a tokenizer with chat_template set) as the base model")
        self.eos_token_ids = checkpoint_eos_token_ids(self.tokenizer, self.base_model)
        if not self.eos_token_ids:
            raise QempoError(f"{self.base_model} declares no end-of-sequence token; set eos_token in its tokenizer")

        initial = {k: v for k, v in (adapters or {}).items() if v is not None}
        settings = dict(dtype=dtype, device=device, batch_size=batch_size, max_lora_rank=max_lora_rank,
                        max_loras=max_loras or max(1, len(initial)), gpu_memory_utilization=gpu_memory_utilization,
                        max_model_len=max_model_len, seed=seed, lora=lora)
        self.engine = make_serving_engine(backend, self.base_model, self.tokenizer, self.eos_token_ids, settings,
                                          **engine_kwargs)
        self.max_model_len = self.engine.max_model_len
        for name, path in initial.items():
            self.add_adapter(name, path)

    # -------------------------------------------------------------------------- what the engine serves
    @property
    def mixes_adapters(self) -> bool:
        """Whether one :meth:`sample` call batches its adapters together (else they are sampled one by one)."""
        return type(self.engine).mixes_adapters

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt + answer) the served model takes, when known."""
        return getattr(self.engine, "context_length", None)

    @property
    def llm(self):
        """vLLM's ``LLM``, when a vLLM engine serves (None otherwise)."""
        return getattr(self.engine, "llm", None)

    @property
    def model(self):
        """The transformers (PEFT) model, when transformers serves (None otherwise)."""
        return getattr(self.engine, "model", None)

    # -------------------------------------------------------------------------- adapters
    @property
    def adapters(self) -> dict[str, Path]:
        """The adapters loaded so far: name -> directory."""
        return dict(self._adapters)

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Check and load an adapter under ``name`` (a name already loaded from another path is replaced)."""
        self._check_open()
        if not self.lora:
            raise QempoError(f"this Sampler serves the base model only (lora=False); adapter {name!r} needs a "
                             "Sampler made with lora=True")
        if not isinstance(name, str) or not name.strip():
            raise QempoError(f"adapter names must be non-empty strings, got {name!r}")
        adapter_dir = check_adapter(name, path, self.base_model, base_shapes=self.engine.base_shapes,
                                    vocab_size=self.engine.vocab_size, allow_base_mismatch=self.allow_base_mismatch)
        rank = self._adapter_rank(name, adapter_dir)
        if name in self._adapters:
            if self._adapters[name].resolve() == adapter_dir.resolve():
                return
            self.remove_adapter(name)
        self.engine.load_adapter(name, adapter_dir)
        logger.info("adapter %r (rank %d) loaded from %s", name, rank, adapter_dir)
        self._adapters[name] = adapter_dir

    def _adapter_rank(self, name: str, adapter_dir: Path) -> int:
        rank = max_rank(adapter_config(adapter_dir, ANYWHERE, f"adapter {name!r} at {adapter_dir}"))
        limit = self.engine.max_lora_rank
        if limit is not None and rank > limit:
            raise QempoError(f"adapter {name!r} has rank {rank}, above max_lora_rank={limit}; "
                             f"raise max_lora_rank (--max-lora-rank) to at least {rank}")
        return rank

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; its memory is freed."""
        if self._adapters.pop(name, None) is not None:
            self.engine.unload_adapter(name)

    def _resolve(self, adapters: AdapterSpec) -> dict[str, str | None]:
        """name -> the loaded adapter's name (None: the base model), loading new adapters on the way."""
        if isinstance(adapters, str):
            adapters = [adapters]
        if isinstance(adapters, Mapping):
            for name, path in adapters.items():
                if path is not None:
                    self.add_adapter(name, path)
            names = list(adapters)
            base = {name for name, path in adapters.items() if path is None}
        else:
            names, base = list(adapters), set()
            unknown = [n for n in names if n not in self._adapters]
            if unknown:
                raise QempoError(f"adapter(s) {', '.join(map(repr, unknown))} not loaded; pass a mapping "
                                 "name -> adapter directory (None for the base model)")
        if not names:
            raise QempoError("no adapter to sample from; pass at least one (None as the path means the base model)")
        return {name: None if name in base else name for name in names}

    # -------------------------------------------------------------------------- sampling
    def encode(self, prompt: Any, index: int = 0) -> list[int]:
        """Token ids of a prompt with the chat template and the generation prompt applied."""
        return prompt_token_ids(self.tokenizer, [to_messages(prompt, index)])[0]

    def _check_open(self) -> None:
        if self.engine is None:
            raise QempoError("this Sampler was closed; create a new one")

    def sample(self, adapters: AdapterSpec, prompts: Sequence[Any], *, n: int = 1, temperature: float = 1.0,
               top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0,
               prompt_ids: Sequence[str | int] | None = None, progress: bool = True) -> list[Sample]:
        """``n`` completions of every prompt from every adapter: ``len(adapters) * len(prompts) * n`` Samples.

        ``adapters``: name -> adapter directory, ``None`` for the base model (names of adapters
        loaded earlier may be passed alone). ``prompts``: strings or chats. ``prompt_ids`` name
        the prompts in the Samples (default: their index). Results are ordered by adapter,
        then prompt, then ``sample_index``; a given (seed, adapter, prompt) always gives the
        same draws on one backend, whatever else is sampled alongside.
        """
        self._check_open()
        check_sampling(n, temperature, top_p, max_new_tokens, greedy=True)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise QempoError("prompts must be a non-empty list (strings or chats); wrap a single prompt in a list")
        prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
        if len(prompt_ids) != len(prompts):
            raise QempoError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts; pass one id per prompt")
        served = self._resolve(adapters)
        chats = [to_messages(p, i) for i, p in enumerate(prompts)]
        ids = [self.encode(chat, i) for i, chat in enumerate(chats)]
        limit = self.engine.max_model_len
        too_long = [i for i, x in enumerate(ids) if limit is not None and len(x) >= limit]
        if too_long:
            raise QempoError(f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens, not below max_model_len="
                             f"{limit}; raise max_model_len (--max-model-len) or shorten it")
        drawn = self.engine.generate(served, ids, n=n, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens, seed=seed, progress=progress)
        samples = []
        for name in served:
            for p, (chat, prompt_id) in enumerate(zip(chats, prompt_ids)):
                for j, completion in enumerate(drawn[name][p]):
                    samples.append(Sample(prompt_id=prompt_id, adapter=name, sample_index=j, text=completion.text,
                                          num_tokens=completion_length(completion, self.eos_token_ids),
                                          finish_reason=completion.finish_reason, prompt=chat))
        return samples

    # -------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Free the model (a vLLM engine is shut down, so another can start in this process, and the
        environment variables vLLM set are given back)."""
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None
        self._adapters.clear()
        free_memory()

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sample(base_model: str | os.PathLike, adapters: Mapping[str, str | os.PathLike | None], prompts: Sequence[Any], *,
           n: int, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0,
           backend: str = "auto", **sampler_options: Any) -> list[Sample]:
    """Load ``base_model`` once, sample every adapter (None: the base) on every prompt, free it.

    A one-shot :class:`Sampler`; ``sampler_options`` go to its constructor.
    """
    with Sampler(base_model, backend=backend, adapters=adapters, **sampler_options) as sampler:
        return sampler.sample(adapters, prompts, n=n, temperature=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens, seed=seed)


__all__ = ["Sample", "Sampler", "check_adapter", "load_samples", "meta_parameter_shapes", "sample", "save_samples",
           "to_messages"]
