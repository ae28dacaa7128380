"""What the Generate button and the ``generate`` API run: check the request, sample, score, judge."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import QempoError
from ..evaluate.metrics import ColumnScorer
from .paths import adapter_metadata, first_line, resolve_adapter, resolve_base_model, scrub, shown
from .samplers import SamplerCache
from .settings import BASE, BASE_LABEL, MAX_COLUMNS, AppSettings

logger = logging.getLogger("qempo_lite")

MAX_LOADED_ADAPTERS = 8  # adapters a Sampler keeps loaded between requests

Progress = Callable[[float, str], None]


def _model_context(sampler) -> int | None:
    """The most tokens the served model takes (vLLM's max_model_len, transformers' config positions)."""
    value = getattr(sampler, "context_length", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def _free_accelerator_memory() -> None:
    # The half-built batch that ran out is garbage now; hand its memory back for the next request.
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Comparison:
    """What the Generate button and the ``generate`` API endpoint run."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.samplers = SamplerCache(settings.backend, **settings.sampler_options)
        self.scorer = ColumnScorer(settings.spacy_model, settings.encoder)
        self.judge = None
        if settings.judge is not None:
            from ..evaluate.judge import Judge

            # Built here so that a malformed URL fails at start-up; nothing is sent until a request.
            self.judge = Judge(settings.judge.base_url, settings.judge.model, api_key_env=settings.judge.api_key_env,
                               max_attempts=2, timeout=60.0)

    def run(self, base_model: str, adapters: list[str], prompt: str, samples: int = 8, temperature: float = 1.0,
            top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
            progress: Progress | None = None) -> dict[str, Any]:
        """Sample ``samples`` completions of ``prompt`` per column and score each column.

        Returns JSON-serialisable data: ``{"ok", "errors", "base_model", "prompt", "settings",
        "columns": [{"name", "adapter", "metadata", "samples": [{"text", "num_tokens"}],
        "metrics", "notes", "error"}], "missing", "seconds"}``. Bad input is reported in
        ``errors`` (and in the column it concerns), never raised.
        """
        progress = progress or (lambda fraction, desc: None)
        start = time.perf_counter()
        result: dict[str, Any] = {"ok": False, "errors": [], "base_model": base_model, "prompt": prompt,
                                  "settings": {}, "columns": [], "missing": {}, "seconds": 0.0}
        labels: dict[str, str] = {}  # resolved path -> what the user typed, for messages
        try:
            settings = self._check_request(adapters, prompt, samples, temperature, top_p, max_new_tokens, seed)
            result["settings"] = settings
            result["columns"] = columns = self._columns(adapters, labels)
            progress(0.02, "loading the base model")
            with self.samplers.lock:
                base = resolve_base_model(base_model, self.settings.allowed_roots, self.settings.allow_hub)
                labels[base] = shown(str(base_model).strip())
                sampler = self.samplers.get(base, labels[base])
                settings["backend"] = sampler.backend  # what "auto" chose
                settings["prompt_tokens"] = self._check_prompt_tokens(sampler, prompt, settings["max_new_tokens"])
                self._sample(sampler, [c for c in columns if c["error"] is None], prompt, settings, progress, labels)
            self._score(columns, progress)
            self._judge_columns(columns, prompt, progress, result["missing"])
        except QempoError as err:
            result["errors"].append(str(err))
        except Exception as err:  # noqa: BLE001 - the page shows one line; the log keeps the traceback
            if _is_out_of_memory(err):
                _free_accelerator_memory()
                result["errors"].append("out of memory while sampling: lower the samples per adapter or the max new "
                                        "tokens, or select fewer adapters")
            else:
                logger.exception("app request failed")
                result["errors"].append(f"unexpected error ({type(err).__name__}: {scrub(first_line(err), labels)}); "
                                        "see the server log")
        result["errors"] += [f"{c['name']}: {c['error']}" for c in result["columns"] if c["error"]]
        result["missing"].update(self.scorer.missing)
        result["ok"] = not result["errors"]
        result["seconds"] = round(time.perf_counter() - start, 3)
        progress(1.0, "done")
        return result

    def _check_request(self, adapters, prompt, samples, temperature, top_p, max_new_tokens, seed) -> dict:
        limits = self.settings

        def number(value, name, kind):
            try:
                out = kind(value)
            except (TypeError, ValueError, OverflowError):
                raise QempoError(f"{name} must be a number, got {value!r}") from None
            if kind is int and out != value:
                raise QempoError(f"{name} must be a whole number, got {value!r}")
            if not math.isfinite(out):
                raise QempoError(f"{name} must be finite, got {value!r}")
            return out

        samples = number(samples, "samples per adapter", int)
        if not 1 <= samples <= limits.max_samples:
            raise QempoError(f"samples per adapter must be between 1 and {limits.max_samples}, got {samples}")
        max_new_tokens = number(max_new_tokens, "max new tokens", int)
        if not 1 <= max_new_tokens <= limits.max_new_tokens:
            raise QempoError(f"max new tokens must be between 1 and {limits.max_new_tokens}, got {max_new_tokens}")
        temperature = number(temperature, "temperature", float)
        if not 0 < temperature <= 2:
            raise QempoError(f"temperature must be in (0, 2], got {temperature}")
        top_p = number(top_p, "top-p", float)
        if not 0 < top_p <= 1:
            raise QempoError(f"top-p must be in (0, 1], got {top_p}")
        seed = number(seed, "seed", int)
        if not 0 <= seed < 2**32:
            raise QempoError(f"seed must be between 0 and 2**32 - 1, got {seed}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise QempoError("the prompt is empty; type one or pick an MT-Bench question")
        if len(prompt) > limits.max_prompt_chars:
            raise QempoError(f"the prompt has {len(prompt)} characters, more than the {limits.max_prompt_chars} "
                             "allowed; shorten it")
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
            raise QempoError(f"select between 1 and {MAX_COLUMNS} adapters (or '{BASE}' for the base model)")
        if len(adapters) > MAX_COLUMNS:
            raise QempoError(f"{len(adapters)} adapters selected; select at most {MAX_COLUMNS}")
        return {"samples": samples, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "seed": seed, "backend": self.samplers.backend}

    def _check_prompt_tokens(self, sampler, prompt: str, max_new_tokens: int) -> int:
        """The prompt's tokens (chat template applied), counted before anything is generated and
        refused above ``--max-prompt-tokens`` or when prompt + max new tokens exceed the model's context."""
        count = len(sampler.encode([{"role": "user", "content": prompt}]))
        limit, context = self.settings.max_prompt_tokens, _model_context(sampler)
        if limit is not None and count > limit:
            raise QempoError(f"the prompt is {count:,} tokens, more than the {limit:,} allowed (--max-prompt-tokens); "
                             "shorten it")
        if context is not None and count >= context:
            raise QempoError(f"the prompt is {count:,} tokens, more than this model's context of {context:,} tokens; "
                             "shorten it")
        if context is not None and count + max_new_tokens > context:
            raise QempoError(f"the prompt ({count:,} tokens) and max new tokens ({max_new_tokens:,}) exceed this "
                             f"model's context of {context:,} tokens; lower max new tokens to {context - count:,} "
                             "or shorten the prompt")
        return count

    def _columns(self, adapters: list[str], labels: dict[str, str]) -> list[dict]:
        columns, names = [], set()
        for value in adapters:
            value = str(value).strip()
            column = {"name": "", "adapter": None, "metadata": {}, "samples": [], "metrics": {}, "notes": [],
                      "error": None}
            if value in (BASE, BASE_LABEL):
                column["name"] = "base"
            else:
                column["name"] = shown(Path(value.rstrip("/")).name or value, 60)
                try:
                    path = resolve_adapter(value, self.settings.allowed_roots, self.settings.allow_hub)
                    column["adapter"] = str(path)
                    column["metadata"] = adapter_metadata(path)
                    labels[str(path)] = shown(value)
                except QempoError as err:
                    column["error"] = str(err)
            name, i = column["name"], 2
            while column["name"] in names:  # two runs with the same directory name
                column["name"], i = f"{name} ({i})", i + 1
            names.add(column["name"])
            columns.append(column)
        return columns

    def _sample(self, sampler, columns: list[dict], prompt: str, settings: dict, progress: Progress,
                labels: dict[str, str]) -> None:
        """Fill each column's samples; an adapter the Sampler refuses marks its column only.

        Adapters are keyed by their directory in the Sampler, so a directory loaded by an
        earlier request is reused, and two runs with the same directory name never clash.
        """
        keys = {c["name"]: c["adapter"] or BASE for c in columns}
        stale = [k for k in sampler.adapters if k not in keys.values()]
        if len(sampler.adapters) + len(columns) > MAX_LOADED_ADAPTERS:
            for key in stale:  # keep a long-running app's memory bounded
                sampler.remove_adapter(key)
        for i, column in enumerate(columns):
            if column["adapter"] is not None:
                progress(0.05 + 0.05 * i / len(columns), f"loading adapter {column['name']}")
                try:
                    # Checks it fits this base model (recorded base, weight shapes) before loading.
                    sampler.add_adapter(column["adapter"], column["adapter"])
                except QempoError as err:
                    column["error"] = scrub(str(err), labels)
        ready = [c for c in columns if c["error"] is None]
        # A directory selected twice is sampled once and shown twice.
        wanted = {keys[c["name"]]: c["adapter"] for c in ready}
        kwargs = {"n": settings["samples"], "temperature": settings["temperature"], "top_p": settings["top_p"],
                  "max_new_tokens": settings["max_new_tokens"], "seed": settings["seed"], "progress": False}
        chat = [[{"role": "user", "content": prompt}]]
        if sampler.mixes_adapters:
            # One call for every column: the engine batches the adapters together (multi-LoRA).
            progress(0.1, f"sampling {len(wanted)} adapter(s)")
            samples = sampler.sample(wanted, chat, **kwargs) if wanted else []
        else:
            samples = []  # the engine samples one adapter at a time anyway: report each
            for i, (key, path) in enumerate(wanted.items()):
                progress(0.1 + 0.5 * i / len(wanted), f"sampling {Path(key).name if path else 'the base model'}")
                samples += sampler.sample({key: path}, chat, **kwargs)
        for column in ready:
            rows = sorted((s for s in samples if s.adapter == keys[column["name"]]), key=lambda s: s.sample_index)
            column["samples"] = [{"text": s.text, "num_tokens": int(s.num_tokens)} for s in rows]

    def _score(self, columns: list[dict], progress: Progress) -> None:
        for i, column in enumerate(columns):
            if column["error"] is None and column["samples"]:
                progress(0.6 + 0.3 * i / len(columns), f"scoring diversity: {column['name']}")
                texts = [s["text"] for s in column["samples"]]
                column["metrics"], column["notes"] = self.scorer.score(texts, [s["num_tokens"] for s in column["samples"]])

    def _judge_columns(self, columns: list[dict], prompt: str, progress: Progress, missing: dict) -> None:
        """Mean MT-Bench single-answer rating (1-10) per column; a judge failure leaves the samples."""
        if self.judge is None:
            return
        for i, column in enumerate(columns):
            if column["error"] is not None or not column["samples"]:
                continue
            if "judge" in missing:  # the endpoint already failed in this request: do not wait on it again
                column["metrics"]["judge"] = None
                column["notes"].append(missing["judge"])
                continue
            progress(0.9 + 0.1 * i / len(columns), f"judging {column['name']}")
            try:
                ratings = self.judge.rate_answers(prompt, [s["text"] for s in column["samples"]])
            except QempoError as err:  # unreachable endpoint, refused key, unknown model
                missing["judge"] = f"judge scores not computed: {err}"
                column["metrics"]["judge"] = None
                column["notes"].append(missing["judge"])
                continue
            rated = [r for r in ratings if r is not None]
            column["metrics"]["judge"] = sum(rated) / len(rated) if rated else None
            if len(rated) < len(ratings):
                column["notes"].append(f"the judge gave no rating for {len(ratings) - len(rated)} of "
                                       f"{len(ratings)} samples")
