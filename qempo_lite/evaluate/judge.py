"""An LLM judge through any OpenAI-compatible endpoint, with MT-Bench's single-answer grading.

Each sample is rated 1–10 with MT-Bench's prompts (``judge_prompts.jsonl``): ``single-v1`` for
a first-turn answer and ``single-v1-multi-turn`` for a second-turn one (the judge sees the
whole conversation and rates the second answer); questions of the math, reasoning and coding
categories that carry a reference answer use the ``single-math-v1*`` prompts with it, as
MT-Bench does. The judge must end with ``[[rating]]``; the last such mark is read.

Robustness: requests run on a bounded thread pool (``concurrency``); a connection error, a
timeout, a rate limit, a server error, a malformed reply (an HTTP 200 whose body is not a
chat completion: truncated JSON, an HTML page, no choices, no text) or an answer without a
rating is retried (at most ``max_attempts`` requests per sample, after the wait a 429 or 503 asks for in
``Retry-After``, else with exponential back-off),
then counted as a failure — never raised. A rejected key or an unknown model is the user's
to fix and raises QempoError at once. Successful ratings are appended to a JSONL cache keyed
by the hash of (judge URL, model, temperature, extra body, system prompt, filled prompt —
which holds the question and the answer), so a rerun only queries what is missing, and
another judge or another way of asking it is never answered from the cache.

The API key comes from the ``api_key`` argument or the environment (``api_key_env``, else
``QEMPO_JUDGE_API_KEY``, else ``OPENAI_API_KEY``); it is never printed, logged or cached. A
server may echo it back in an error message: once a Judge holds a key (8 characters or
more), every log record made in the process, by any logger, has it replaced by ``***``
(:func:`redact_secret`), and so do the error texts of Judgements. So are credentials in the URL
(``http://user:key@host/v1``): ``Judge.base_url`` (judge.json, messages) shows ``***@host``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from qempo_lite.data.files import read_written_lines
from qempo_lite.errors import QempoError, missing_extra, one_line

from .mtbench import MTBENCH, Question, resolve_mtbench_file
from .retry_after import retry_after_seconds
from .sampling import Sample

logger = logging.getLogger("qempo_lite")

KEY_ENVS = ("QEMPO_JUDGE_API_KEY", "OPENAI_API_KEY")
MIN_SECRET_LENGTH = 8  # shorter strings are not redacted: they would garble ordinary log text
SINGLE, SINGLE_MULTI = "single-v1", "single-v1-multi-turn"
MATH, MATH_MULTI = "single-math-v1", "single-math-v1-multi-turn"
NEED_REFERENCE = ("math", "reasoning", "coding")  # MT-Bench grades these against the reference answer
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
RATING_REGEX = r"Rating: \[\[(10|[1-9])\]\]"
"""A regex a server with structured outputs can be held to, e.g. vLLM's
``extra_body={"structured_outputs": {"regex": RATING_REGEX}}``."""


# ------------------------------------------------------------------------------ secrets

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
_FACTORY_INSTALLED = False


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _redacting_factory(previous):
    def make_record(*args, **kwargs):
        record = previous(*args, **kwargs)
        if not _SECRETS:
            return record
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call is logging's to report, not ours
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            import traceback

            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            if redact(text) != text:  # formatted now, so that no handler formats the raw one later
                record.exc_text = redact(text)
        return record

    return make_record


def redact_secret(secret: str | None) -> None:
    """Keep ``secret`` out of every log record made from now on in this process (any logger:
    ours, ``openai``, ``httpx``...), even when a server echoes it in an error."""
    global _FACTORY_INSTALLED
    if not secret or len(secret) < MIN_SECRET_LENGTH:
        return
    with _SECRETS_LOCK:
        _SECRETS.add(secret)
        if not _FACTORY_INSTALLED:
            logging.setLogRecordFactory(_redacting_factory(logging.getLogRecordFactory()))
            _FACTORY_INSTALLED = True


def public_url(url: str) -> str:
    """``url`` with the user and password it may hold (``http://user:key@host/v1``) shown as ``***``; both are
    also kept out of every log record (:func:`redact_secret`)."""
    parts = urlsplit(url)
    credentials, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    redact_secret(credentials)
    redact_secret(credentials.partition(":")[2])
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def parse_rating(text: str | None) -> float | None:
    """The last ``[[x]]`` of a judgment with 1 <= x <= 10, else None."""
    if not isinstance(text, str):
        return None
    found = RATING.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


# ------------------------------------------------------------------------------ prompts


@dataclass
class JudgeTemplate:
    """One MT-Bench judge prompt: the system prompt and the user prompt with ``{fields}``."""

    name: str
    system_prompt: str
    prompt_template: str

    def fill(self, **values: str) -> str:
        return self.prompt_template.format(**values)


def load_judge_prompts(source: str | os.PathLike = MTBENCH) -> dict[str, JudgeTemplate]:
    """MT-Bench's ``judge_prompts.jsonl`` (or a file of that shape): name -> template."""
    from qempo_lite.data import BadRow, read_json_lines

    path = resolve_mtbench_file(source, "judge_prompts")
    templates = {}
    with path.open("rb") as handle:
        for number, row in read_json_lines(handle, str(path)):
            if isinstance(row, BadRow):
                raise QempoError(f"{path} line {number}: {row.problem}; fix or remove the line")
            for name in ("name", "system_prompt", "prompt_template"):
                if not isinstance(row, dict) or not isinstance(row.get(name), str):
                    raise QempoError(f"{path} line {number}: field '{name}' must be a string; fix the line")
            templates[row["name"]] = JudgeTemplate(row["name"], row["system_prompt"], row["prompt_template"])
    for needed in (SINGLE, SINGLE_MULTI):
        if needed not in templates:
            raise QempoError(f"{path} has no '{needed}' prompt; pass MT-Bench's judge_prompts.jsonl")
    return templates


# ------------------------------------------------------------------------------ what is judged


@dataclass
class JudgeItem:
    """One request to the judge: which sample, and the filled prompts."""

    adapter: str
    prompt_id: str | int
    turn: int
    sample_index: int
    template: str
    system: str = field(repr=False)
    user: str = field(repr=False)

    def cache_key(self, judge: Mapping[str, Any]) -> str:
        """The hash of this request as ``judge`` (:attr:`Judge.settings`) sends it."""
        return hashlib.sha256(json.dumps([judge, self.system, self.user], sort_keys=True).encode()).hexdigest()


@dataclass
class Judgement:
    """The judge's verdict on one item: a rating, or the reason there is none."""

    item: JudgeItem
    rating: float | None
    judgment: str | None = field(default=None, repr=False)
    error: str | None = None
    cached: bool = False
    attempts: int = 0


def _turns(sample: Sample) -> tuple[list[str], list[str]]:
    if not sample.prompt:
        raise QempoError(f"sample {sample.adapter}/{sample.prompt_id}/{sample.sample_index} has no prompt; sample "
                         "again with 'qempo-lite eval sample' (its output keeps each prompt)")
    users = [m["content"] for m in sample.prompt if m["role"] == "user"]
    answers = [m["content"] for m in sample.prompt if m["role"] == "assistant"]
    return users, answers


def build_items(samples: Sequence[Sample], templates: Mapping[str, JudgeTemplate],
                questions: Sequence[Question] | None = None, *, per_prompt: int | None = None) -> list[JudgeItem]:
    """One JudgeItem per sample (or the first ``per_prompt`` samples of each prompt and turn).

    A sample whose chat has two user turns is judged as a second-turn answer with the
    multi-turn prompt; ``questions`` add the category and reference answers.
    """
    by_id = {str(q.question_id): q for q in questions or ()}
    items = []
    for s in samples:
        if per_prompt is not None and s.sample_index >= per_prompt:
            continue
        users, answers = _turns(s)
        question = by_id.get(str(s.prompt_id))
        reference = question.reference if question and question.category in NEED_REFERENCE else None
        multi = len(users) >= 2 and len(answers) >= 1
        if multi:
            values = {"question_1": users[-2], "answer_1": answers[-1], "question_2": users[-1], "answer_2": s.text}
            name = MATH_MULTI if reference and len(reference) >= 2 and MATH_MULTI in templates else SINGLE_MULTI
            if name == MATH_MULTI:
                values.update(ref_answer_1=reference[0], ref_answer_2=reference[1])
        else:
            values = {"question": users[-1], "answer": s.text}
            name = MATH if reference and MATH in templates else SINGLE
            if name == MATH:
                values["ref_answer_1"] = reference[0]
        template = templates[name]
        try:
            user = template.fill(**values)
        except (KeyError, IndexError, ValueError) as err:
            raise QempoError(f"judge prompt '{name}' has a field the samples cannot fill ({err}); "
                             "use MT-Bench's judge_prompts.jsonl") from None
        items.append(JudgeItem(s.adapter, s.prompt_id, 2 if multi else 1, s.sample_index, name,
                               template.system_prompt, user))
    return items


# ------------------------------------------------------------------------------ the client


class _Malformed(Exception):
    """An HTTP 200 whose body is not a usable chat completion: worth another request."""


def _judgment_text(reply: Any) -> str:
    """The text of a chat completion's first choice; _Malformed when the reply is anything else
    (a server may answer 200 with an HTML page, a bare list, or a completion without text)."""
    if not hasattr(reply, "choices"):
        raise _Malformed(f"expected a chat completion, got {type(reply).__name__}")
    choices = reply.choices
    if not isinstance(choices, list) or not choices:
        raise _Malformed("the completion has no choices")
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if not isinstance(content, str):
        raise _Malformed(f"the first choice has no text (content is {type(content).__name__})")
    return content


class Judge:
    """Rates answers with an LLM behind an OpenAI-compatible ``base_url`` (e.g. ``https://api.openai.com/v1``,
    or a local ``vllm serve`` at ``http://127.0.0.1:8000/v1``).

    ``extra_body`` is sent with every request (e.g. a server's structured-output options).
    ``cache_path`` is a JSONL file of past ratings; ``None`` disables caching. ``stats`` counts,
    since the Judge was created, the requests sent, the items left without a rating, the
    replies that were not a chat completion (each retried like any failure), those answered
    from the cache, and the most requests that were in flight at once.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 templates: Mapping[str, JudgeTemplate] | str | os.PathLike = MTBENCH, concurrency: int = 8,
                 max_attempts: int = 3, timeout: float = 120.0, temperature: float = 0.0, max_tokens: int = 1024,
                 extra_body: Mapping[str, Any] | None = None, cache_path: str | os.PathLike | None = None,
                 retry_wait: float = 1.0):
        try:
            import openai
        except ImportError:
            raise missing_extra("openai", "eval", "the judge's client") from None
        if not isinstance(base_url, str) or not re.match(r"^https?://", base_url):
            raise QempoError(f"judge URL {base_url!r} must start with http:// or https://, "
                             "e.g. http://127.0.0.1:8000/v1")
        if not isinstance(model, str) or not model.strip():
            raise QempoError("the judge model name is empty; pass --judge-model, e.g. gpt-4o-2024-08-06")
        for name, value, low in (("concurrency", concurrency, 1), ("max_attempts", max_attempts, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise QempoError(f"{name} must be an integer >= {low}, got {value!r}")
        envs = ([api_key_env] if api_key_env else []) + [e for e in KEY_ENVS if e != api_key_env]
        key = api_key or next((os.environ[e] for e in envs if os.environ.get(e)), None)
        redact_secret(key)
        self.key_source = "the api_key argument" if api_key else next((f"${e}" for e in envs if os.environ.get(e)),
                                                                      "no key")
        for name in ("httpx", "httpx2"):  # the HTTP client's INFO line per request shows the URL
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self.base_url, self.model = public_url(base_url.rstrip("/")), model  # shown; the client gets the credentials
        self.templates = dict(templates) if isinstance(templates, Mapping) else load_judge_prompts(templates)
        self.concurrency, self.max_attempts, self.retry_wait = concurrency, max_attempts, retry_wait
        self.temperature, self.max_tokens = temperature, max_tokens
        self.extra_body = dict(extra_body) if extra_body else None
        self._openai = openai
        # Retries are ours (bounded, counted); a local server needs some key, any will do.
        self._client = openai.OpenAI(base_url=base_url.rstrip("/"), api_key=key or "EMPTY", timeout=timeout,
                                     max_retries=0)
        self.cache_path = Path(cache_path) if cache_path else None
        self._cache = self._read_cache()
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "failures": 0, "malformed": 0, "cached": 0, "max_in_flight": 0}
        self._in_flight = 0
        self._checked = False

    @property
    def settings(self) -> dict[str, Any]:
        """What a rating depends on besides the prompts (not the token limit: a rating given stays given)."""
        return dict(url=self.base_url, model=self.model, temperature=self.temperature, extra_body=self.extra_body)

    def __repr__(self) -> str:  # the key stays out of every repr
        return f"Judge(base_url={self.base_url!r}, model={self.model!r}, key from {self.key_source})"

    # -------------------------------------------------------------------------- cache
    def _read_cache(self) -> dict[str, dict]:
        cache: dict[str, dict] = {}
        if self.cache_path is None or not self.cache_path.is_file():
            return cache
        # A last line cut short by an interrupted run is dropped (and cut from the file): that rating is asked again.
        for number, row in read_written_lines(self.cache_path, "judge cache", repair=True):
            try:
                if parse_rating(f"[[{row['rating']}]]") is not None:
                    cache[row["key"]] = row
            except (KeyError, TypeError):
                raise QempoError(f"judge cache {self.cache_path} line {number}: not a rating ('key' and 'rating'); "
                                 "fix or remove the line (or delete the file)") from None
        return cache

    def _remember(self, key: str, rating: float, judgment: str) -> None:
        row = {"key": key, "judge_model": self.model, "rating": rating, "judgment": judgment}
        with self._lock:
            self._cache[key] = row
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")

    # -------------------------------------------------------------------------- requests
    def check_endpoint(self) -> None:
        """Fail early, in one line, when the endpoint is unreachable, refuses the key or lacks the model.

        :meth:`judge` calls it once, before its first request.
        """
        openai = self._openai
        try:
            served = [m.id for m in self._client.models.list()]
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise self._key_error(err) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise QempoError(f"cannot reach the judge at {self.base_url} ({type(err).__name__}); start the server or "
                             "fix --judge-url") from None
        except openai.APIError:
            return  # some compatible servers have no /models: the first request will tell
        if served and self.model not in served:
            raise QempoError(f"judge model {self.model!r} is not served at {self.base_url} (it serves: "
                             f"{', '.join(served[:8])}); fix --judge-model")

    def _key_error(self, err) -> QempoError:
        status = getattr(err, "status_code", "")
        return QempoError(f"the judge at {self.base_url} refused the API key from {self.key_source} (HTTP {status}); "
                          f"set {' or '.join('$' + e for e in KEY_ENVS)} to a valid key")

    def _ask(self, item: JudgeItem) -> Judgement:
        """One item, with bounded retries; only a configuration error escapes."""
        openai = self._openai
        error, judgment = None, None
        for attempt in range(1, self.max_attempts + 1):
            asked = None  # the wait the server asks for before the next attempt (Retry-After)
            with self._lock:
                self.stats["requests"] += 1
                self._in_flight += 1
                self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self._in_flight)
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, temperature=self.temperature, max_tokens=self.max_tokens,
                    messages=[{"role": "system", "content": item.system}, {"role": "user", "content": item.user}],
                    extra_body=self.extra_body)
                judgment = _judgment_text(reply)
                rating = parse_rating(judgment)
                if rating is not None:
                    return Judgement(item, rating, judgment, attempts=attempt)
                error = "no [[rating]] between 1 and 10 in the judgment"
            except _Malformed as err:
                judgment, error = None, f"malformed reply: {err}"
                with self._lock:
                    self.stats["malformed"] += 1
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise self._key_error(err) from None
            except openai.NotFoundError:
                raise QempoError(f"judge model {self.model!r} not found at {self.base_url}; fix --judge-model "
                                 "or --judge-url") from None
            except openai.BadRequestError as err:  # e.g. a conversation longer than the judge's context
                return Judgement(item, None, None, error=redact(f"request refused: {one_line(err)}"),
                                 attempts=attempt)
            except (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                    openai.InternalServerError, openai.APIStatusError) as err:
                error = f"{type(err).__name__}: {one_line(err)}"
                asked = retry_after_seconds(getattr(getattr(err, "response", None), "headers", None))
            except ValueError as err:  # a 200 whose body the client cannot parse (truncated JSON, bad UTF-8)
                judgment, error = None, f"malformed reply: {type(err).__name__}: {one_line(err)}"
                with self._lock:
                    self.stats["malformed"] += 1
            finally:
                with self._lock:
                    self._in_flight -= 1
            if attempt < self.max_attempts:
                time.sleep(self.retry_wait * 2 ** (attempt - 1) if asked is None else asked)
        return Judgement(item, None, judgment, error=redact(error or ""), attempts=self.max_attempts)

    def judge(self, items: Sequence[JudgeItem], *, progress: bool = True) -> list[Judgement]:
        """A Judgement per item, in order: cached ones first looked up, the rest asked concurrently."""
        from rich.progress import Progress

        results: list[Judgement | None] = [None] * len(items)
        todo = []
        for i, item in enumerate(items):
            hit = self._cache.get(item.cache_key(self.settings))
            if hit is not None:
                results[i] = Judgement(item, float(hit["rating"]), hit.get("judgment"), cached=True)
                self.stats["cached"] += 1
            else:
                todo.append(i)
        if todo:
            if not self._checked:
                self.check_endpoint()
                self._checked = True
            with Progress(disable=not progress, transient=True) as bar, \
                    ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                task = bar.add_task(f"judging with {self.model}", total=len(todo))
                futures = {pool.submit(self._ask, items[i]): i for i in todo}
                try:
                    for future in as_completed(futures):
                        verdict = future.result()
                        results[futures[future]] = verdict
                        if verdict.rating is None:
                            self.stats["failures"] += 1
                            logger.debug("judge failed on %s: %s", verdict.item, verdict.error)
                        else:
                            self._remember(verdict.item.cache_key(self.settings), verdict.rating, verdict.judgment or "")
                        bar.advance(task)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        failed = sum(v is not None and v.rating is None for v in results)
        if failed:
            logger.warning("judge: %d of %d items got no rating; they are counted, and asked again on a rerun", failed,
                           len(items))
        return results  # type: ignore[return-value]

    def rate_answers(self, question: str, answers: Sequence[str], *, progress: bool = False) -> list[float | None]:
        """Ratings of single-turn ``answers`` to ``question`` (None where the judge gave none)."""
        template = self.templates[SINGLE]
        items = [JudgeItem("", "", 1, i, SINGLE, template.system_prompt, template.fill(question=question, answer=a))
                 for i, a in enumerate(answers)]
        return [v.rating for v in self.judge(items, progress=progress)]


def summarize(judgements: Sequence[Judgement]) -> dict[str, dict[str, Any]]:
    """Per adapter: mean rating over all rated samples (``judge``), per turn, and the counts."""
    ratings: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    failed: dict[str, int] = defaultdict(int)
    for j in judgements:
        if j.rating is None:
            failed[j.item.adapter] += 1
        else:
            ratings[j.item.adapter][j.item.turn].append(j.rating)
    out = {}
    for adapter in dict.fromkeys(j.item.adapter for j in judgements):
        by_turn = ratings[adapter]
        every = [r for turn in by_turn.values() for r in turn]
        row = {"judge": sum(every) / len(every) if every else None, "n_rated": len(every),
               "n_failed": failed[adapter]}
        for turn in sorted(by_turn):
            row[f"judge_turn{turn}"] = sum(by_turn[turn]) / len(by_turn[turn])
        out[adapter] = row
    return out


__all__ = ["Judge", "JudgeItem", "JudgeTemplate", "Judgement", "build_items", "load_judge_prompts", "parse_rating",
           "public_url", "redact", "redact_secret", "summarize", "RATING_REGEX"]
