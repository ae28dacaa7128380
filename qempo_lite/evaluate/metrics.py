"""The list of diversity metrics, and the two scorers that compute it.

:data:`METRICS` is the one list that results, reports, the eval CLI, ``eval table2`` and the
app read: adding a metric is one :class:`Metric` entry (plus its function and tests). Table 2's
metrics (``table2=True``) are the ``guo2024`` protocol's and their average is Table 2's
"Average"; the others are shown by the app only.

* :class:`DiversityScorer` computes Table 2's metrics by the protocol (seeded samples) and
  fails with a QempoError when one cannot be computed: evaluation results are complete or absent.
* :class:`ColumnScorer` computes every metric of one app column on all its samples and leaves
  out, with the reason, what cannot be computed (a model that does not load, too few sentences).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qempo_lite.errors import QempoError

from .diversity import (DEFAULT_SEED, LEXICAL_SAMPLE, PROTOCOL, SEMANTIC_SAMPLE, SYNTACTIC_SAMPLE, WL_ITERATIONS,
                        check_sample_size, check_sentences, check_texts, distinct_n, lexical_diversity,
                        semantic_of_sentences, split_sentences, syntactic_of_sentences)
from .diversity_models import ENCODER_DTYPES, load_nlp, resolve_encoder, spacy_model_name

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from spacy.language import Language


@dataclass(frozen=True)
class Metric:
    """One diversity metric of a set of texts."""

    name: str  # its key in every result
    label: str  # how tables and the app show it; reports capitalise it
    # (scorer, texts, their sentences, sample size or None for all) -> the score
    compute: Callable[[DiversityScorer, list[str], list[str], int | None], float | None]
    model: str | None = None  # the model it needs: "parser" or "encoder" (DiversityScorer.load)
    sample_size: int | None = None  # guo2024's seeded sample (None: every item)
    sentences: bool = False  # computed over sentences: needs two of them (and two samples in the app)
    table2: bool = True  # a column of Table 2: reports, the eval CLI, the average; False: the app only
    fraction: bool = False  # a fraction in [0, 1] rather than x100
    # Raised whenever what the metric computes changes: results cached under another version are scored again
    # (eval table2) or refused (eval report), never mixed with new ones.
    version: int = 1


METRICS: tuple[Metric, ...] = (
    Metric("lexical", "lexical", lambda s, texts, _, size: lexical_diversity(texts, sample_size=size, seed=s.seed),
           sample_size=LEXICAL_SAMPLE),
    Metric("semantic", "semantic", lambda s, _, sentences, size: semantic_of_sentences(
        sentences, s.encoder, size, s.seed, s.batch_size, s.progress),
        model="encoder", sample_size=SEMANTIC_SAMPLE, sentences=True),
    Metric("syntactic", "syntactic", lambda s, _, sentences, size: syntactic_of_sentences(
        sentences, s.nlp, size, s.seed, WL_ITERATIONS, s.progress),
        model="parser", sample_size=SYNTACTIC_SAMPLE, sentences=True),
    Metric("distinct_1", "distinct-1", lambda s, texts, _, size: distinct_n(texts, 1), table2=False, fraction=True),
    Metric("distinct_2", "distinct-2", lambda s, texts, _, size: distinct_n(texts, 2), table2=False, fraction=True),
)
TABLE2 = tuple(m for m in METRICS if m.table2)  # in the order of the paper's Table 2
AVERAGE = "average"
SCORES = {**{m.name: m.label for m in TABLE2}, AVERAGE: "average"}  # every Table 2 score: key -> label
PROTOCOL_SAMPLES = {m.name: m.sample_size for m in TABLE2}
MODEL_OPTIONS = {"parser": "--spacy-model", "encoder": "--encoder"}  # the option that picks each model


class DiversityScorer:
    """Table 2's diversity scores by the ``guo2024`` protocol, with one parser and one encoder.

    Models load on first use (cached per process); ``parser`` and ``encoder_name`` then name the
    ones loaded. ``score`` splits the texts into sentences once for every sentence metric.
    ``sample_sizes`` overrides the protocol's samples per metric (None: all).
    """

    def __init__(
        self,
        spacy_model: str | None = None,
        encoder: str | None = None,
        *,
        sample_sizes: Mapping[str, int | None] | None = None,
        seed: int = DEFAULT_SEED,
        device: str | None = None,
        encoder_dtype: str = "auto",
        batch_size: int = 64,
        progress: bool = False,
    ):
        if encoder_dtype not in ENCODER_DTYPES:
            raise QempoError(f"encoder dtype {encoder_dtype!r} is not one of {', '.join(ENCODER_DTYPES)}")
        self.sample_sizes = dict(PROTOCOL_SAMPLES)
        unknown = set(sample_sizes or {}) - set(PROTOCOL_SAMPLES)
        if unknown:
            raise QempoError(f"sample_sizes: unknown metric(s) {sorted(unknown)}; use {', '.join(PROTOCOL_SAMPLES)}")
        self.sample_sizes.update(sample_sizes or {})
        for size in self.sample_sizes.values():
            check_sample_size(size)
        self._spacy_model = spacy_model
        self._encoder_request = encoder
        self._encoder_model: SentenceTransformer | None = None
        self._encoder_name: str | None = None
        self.seed = seed
        self.device = device
        self.encoder_dtype = encoder_dtype
        self.batch_size = batch_size
        self.progress = progress

    @property
    def parser(self) -> str:
        """The spaCy pipeline used (resolved without loading it)."""
        return spacy_model_name(self._spacy_model)

    @property
    def nlp(self) -> Language:
        return load_nlp(self._spacy_model)

    @property
    def encoder(self) -> SentenceTransformer:
        if self._encoder_model is None:
            self._encoder_model, self._encoder_name = resolve_encoder(self._encoder_request, self.device,
                                                                      self.encoder_dtype)
        return self._encoder_model

    @property
    def encoder_name(self) -> str:
        """The encoder used (loads it: which one is used can depend on what loads)."""
        self.encoder
        return self._encoder_name

    def load(self, model: str) -> str:
        """Load a metric's ``model`` ("parser" or "encoder"); returns the name of the one loaded."""
        if model == "parser":
            self.nlp
            return self.parser
        return self.encoder_name

    def models(self) -> dict[str, str]:
        """{protocol, parser, encoder}: what a result must name to be compared with another."""
        return {"protocol": PROTOCOL, "parser": self.parser, "encoder": self.encoder_name}

    def definition(self) -> dict[str, Any]:
        """What else the scores depend on: each metric's version, the WL iterations, the parser's version and
        the versions of the libraries that parse and encode (a result holds it; see :func:`same_definition`)."""
        import sentence_transformers
        import spacy

        return {"metrics": {m.name: m.version for m in TABLE2}, "wl_iterations": WL_ITERATIONS,
                "parser_version": self.nlp.meta.get("version"), "spacy": spacy.__version__,
                "sentence_transformers": sentence_transformers.__version__}

    def score(self, texts: Sequence[str]) -> dict[str, Any]:
        """Every Table 2 metric and their average (x100), plus how and on what they were computed."""
        texts = check_texts(texts, "/".join(m.name for m in TABLE2))
        sentences = split_sentences(texts)
        check_sentences(sentences, "/".join(m.name for m in TABLE2 if m.sentences))
        scores = {m.name: m.compute(self, texts, sentences, self.sample_sizes[m.name]) for m in TABLE2}
        scores[AVERAGE] = sum(scores.values()) / len(scores)
        return {
            **scores,
            "n_texts": len(texts),
            "n_sentences": len(sentences),
            **self.models(),
            "encoder_dtype": str(self.encoder.dtype).removeprefix("torch."),
            "sample_sizes": dict(self.sample_sizes),
            "seed": self.seed,
            "wl_iterations": WL_ITERATIONS,
            "definition": self.definition(),
        }


DEFINITION_KEYS = ("protocol", "parser", "encoder", "encoder_dtype", "sample_sizes", "seed", "definition")


def definition_of(result: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a diversity result (a file of 'eval diversity', or one of its rows) that says how it was
    scored: two results compare only when theirs are equal."""
    return {key: result.get(key) for key in DEFINITION_KEYS}


def definition_difference(old: Mapping[str, Any], new: Mapping[str, Any], keys=DEFINITION_KEYS,
                          where: str = "") -> str | None:
    """The first setting in which two diversity definitions differ, as ``key: old -> new`` with the key's dotted
    path inside the definition (None: they are the same)."""
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = definition_difference(a, b, sorted(set(a) | set(b)), f"{where}{key}.")
            if inner:
                return inner
        elif a != b:
            return f"{where}{key}: {a!r} -> {b!r}"
    return None


class ColumnScorer:
    """Every metric of one app column's samples (all of them: no protocol sample), with what
    could not be computed and why.

    The parser and the encoder load once, on first use; if one cannot be loaded, the metrics
    that need it are left out (``None``) with the reason, and it is not retried.
    """

    def __init__(self, spacy_model: str | None = None, encoder: str | None = None):
        self.scorer = DiversityScorer(spacy_model, encoder)
        self.used: dict[str, str] = {}  # model ("parser", "encoder") -> the name loaded
        self.missing: dict[str, str] = {}  # metric -> why it was not computed
        self._unavailable: dict[str, str] = {}  # model -> why it cannot be loaded

    def _missing_model(self, metric: Metric) -> str | None:
        """Why ``metric``'s model cannot be had (None: it is loaded)."""
        model = metric.model
        if model not in self.used and model not in self._unavailable:
            try:
                self.used[model] = self.scorer.load(model)
            except QempoError as err:
                self._unavailable[model] = f"{err} (app option {MODEL_OPTIONS[model]})"
        if model in self._unavailable:
            self.missing[metric.name] = f"{metric.label} diversity not computed: {self._unavailable[model]}"
            return self.missing[metric.name]
        return None

    def score(self, texts: list[str], num_tokens: list[int]) -> tuple[dict[str, float | None], list[str]]:
        """({every metric in METRICS, mean_tokens}, notes)."""
        metrics: dict[str, float | None] = {}
        notes: list[str] = []
        sentences = None
        for metric in METRICS:
            metrics[metric.name] = None
            if metric.sentences and len(texts) < 2:
                notes.append(f"{metric.label} diversity needs at least 2 samples")
                continue
            missing = metric.model and self._missing_model(metric)
            if missing:
                notes.append(missing)
                continue
            try:
                if metric.sentences and sentences is None:
                    sentences = split_sentences(texts)
                metrics[metric.name] = metric.compute(self.scorer, texts, sentences or [], None)
            except QempoError as err:  # e.g. no words, or fewer than 2 sentences
                notes.append(f"{metric.label} diversity not computed: {err}")
        if self.used:
            notes.append(f"diversity protocol {PROTOCOL} (Guo et al. 2024): "
                         + ", ".join(f"{model} {self.used[model]}" for model in MODEL_OPTIONS if model in self.used))
        metrics["mean_tokens"] = sum(num_tokens) / len(num_tokens) if num_tokens else None
        return {k: (v if v is None or math.isfinite(v) else None) for k, v in metrics.items()}, notes


__all__ = ["Metric", "METRICS", "TABLE2", "SCORES", "AVERAGE", "PROTOCOL_SAMPLES", "DEFINITION_KEYS", "DiversityScorer",
           "ColumnScorer", "definition_difference", "definition_of"]
