"""Lexical, syntactic and semantic diversity of a set of texts (Guo et al., 2024), x100.

These are the three columns of the paper's Table 2. Each score is a property of a *set*
of texts (e.g. the 16 samples a model gives per MT-Bench question, pooled over questions):

- lexical:   mean type-token ratio of word uni-, bi- and trigrams;
- syntactic: 1 − normalised Weisfeiler–Lehman kernel between dependency trees, averaged;
- semantic:  (1 − cos)/2 between sentence embeddings, averaged over pairs.

Conventions, where Guo et al.'s description leaves room, and how they compare with the
authors' released scripts (github.com/YanzhuGuo/llm-diversity, ``diversity_metrics/``):

- Items are whole texts. A multi-sentence text is one dependency forest and one embedding.
  (The released scripts split texts into sentences for the syntactic and semantic scores.)
- Averages over pairs exclude each text's similarity to itself, as the released scripts do
  (mean of ``1 − K`` over off-diagonal entries); so a set of identical texts scores 0.
- Syntactic nodes are labelled by lemma and the kernel runs 5 WL iterations, as the paper
  describes the metric. (The released script labels nodes by UPOS tag and runs 2.)
- Lexical n-grams never span two texts; punctuation-only tokens are dropped.
- Ratios such as TTR fall as a set grows, so a seeded subsample of ``sample_size`` texts
  (default 2000, the semantic sample of the released scripts) is scored when more exist.
  Compare scores only between sets of equal size: ``DiversityScorer.score`` reports it.

Models are loaded by name once per process and reused: spaCy ``en_core_web_sm`` and
``sentence-transformers/all-mpnet-base-v2`` unless an argument or the environment
variables ``QEMPO_SPACY_MODEL`` / ``QEMPO_ENCODER`` name others (an encoder may also be a
local directory).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qempo_lite.errors import QempoError, missing_extra

if TYPE_CHECKING:  # heavy imports, deferred to first use
    import scipy.sparse
    from sentence_transformers import SentenceTransformer
    from spacy.language import Language
    from spacy.tokens import Doc

DEFAULT_SPACY_MODEL = "en_core_web_sm"
DEFAULT_ENCODER = "sentence-transformers/all-mpnet-base-v2"
SPACY_MODEL_ENV = "QEMPO_SPACY_MODEL"
ENCODER_ENV = "QEMPO_ENCODER"
DEFAULT_SAMPLE_SIZE = 2000
WL_ITERATIONS = 5

# Components that add nothing to lemmas and dependency arcs; skipping them roughly halves
# parsing time with en_core_web_sm.
_UNNEEDED_PIPES = ("ner", "entity_ruler", "entity_linker", "textcat", "textcat_multilabel", "spancat")
# \w+ runs are exactly what remains of NLTK's wordpunct tokens (\w+|[^\w\s]+) once the
# punctuation-only ones are dropped.
_WORD = re.compile(r"\w+")

_nlp_cache: dict[str, Language] = {}
_encoder_cache: dict[tuple[str, str | None], SentenceTransformer] = {}


# ---------------------------------------------------------------- input and subsampling


def _check_texts(texts: Any, metric: str, minimum: int = 1) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise QempoError(
            f"{metric} diversity: texts must be a list of strings, got {type(texts).__name__}: "
            "pass one string per sample"
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise QempoError(
                f"{metric} diversity: texts[{i}] is {type(text).__name__}, not str: pass generated text only"
            )
    if len(texts) < minimum:
        raise QempoError(
            f"{metric} diversity needs at least {minimum} texts, got {len(texts)}: score more samples"
        )
    return list(texts)


def subsample(texts: Sequence[str], sample_size: int | None, seed: int = 0) -> list[str]:
    """A fixed, seeded subset of ``sample_size`` texts (all of them when there are fewer).

    ``sample_size=None`` keeps every text. The subset keeps the input order.
    """
    if sample_size is not None and (
        isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1
    ):
        raise QempoError(f"sample_size must be a positive integer or None, got {sample_size!r}")
    texts = list(texts)
    if sample_size is None or len(texts) <= sample_size:
        return texts
    keep = sorted(random.Random(seed).sample(range(len(texts)), sample_size))
    return [texts[i] for i in keep]


# ---------------------------------------------------------------- lexical


def word_tokens(text: str) -> list[str]:
    """Lower-cased word-punct tokens of ``text`` with punctuation-only tokens dropped."""
    return _WORD.findall(text.lower())


def lexical_diversity(
    texts: Sequence[str], *, sample_size: int | None = DEFAULT_SAMPLE_SIZE, seed: int = 0
) -> float:
    """Mean type-token ratio of word n-grams, n = 1, 2, 3, over the pooled texts, x100.

        TTR_n = |distinct n-grams| / |n-grams|,    lexical = 100 · (TTR_1 + TTR_2 + TTR_3) / 3

    n-grams are formed inside each text and then pooled, so k copies of one text score
    exactly 1/k of that text alone. An order with no n-gram at all (every text shorter
    than n words) is left out of the mean; a set without a single word raises QempoError.
    """
    texts = subsample(_check_texts(texts, "lexical"), sample_size, seed)
    seen: list[set] = [set(), set(), set()]
    totals = [0, 0, 0]
    for text in texts:
        tokens = word_tokens(text)
        for n in (1, 2, 3):
            grams = list(zip(*(tokens[i:] for i in range(n))))
            seen[n - 1].update(grams)
            totals[n - 1] += len(grams)
    if totals[0] == 0:
        raise QempoError(
            "lexical diversity: the texts hold no words: check that generation produced text"
        )
    ratios = [len(s) / t for s, t in zip(seen, totals) if t]
    return 100.0 * sum(ratios) / len(ratios)


# ---------------------------------------------------------------- models


def load_nlp(name: str | None = None) -> Language:
    """The spaCy pipeline ``name`` (else $QEMPO_SPACY_MODEL, else en_core_web_sm), loaded once."""
    name = name or os.environ.get(SPACY_MODEL_ENV) or DEFAULT_SPACY_MODEL
    if name not in _nlp_cache:
        try:
            import spacy
        except ImportError:
            raise missing_extra("spacy", "eval") from None
        try:
            _nlp_cache[name] = spacy.load(name)
        except OSError:
            raise QempoError(
                f"spaCy pipeline '{name}' is not installed: run `python -m spacy download {name}` "
                f"or name an installed one with ${SPACY_MODEL_ENV}"
            ) from None
    return _nlp_cache[name]


def load_encoder(name: str | None = None, device: str | None = None) -> SentenceTransformer:
    """The sentence encoder ``name`` (else $QEMPO_ENCODER, else all-mpnet-base-v2), loaded once.

    ``name`` is a Hub id or a local directory. Weights load from safetensors only and no
    remote code runs.
    """
    name = name or os.environ.get(ENCODER_ENV) or DEFAULT_ENCODER
    key = (name, device)
    if key not in _encoder_cache:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise missing_extra("sentence-transformers", "eval") from None
        try:
            _encoder_cache[key] = SentenceTransformer(
                name, device=device, trust_remote_code=False, model_kwargs={"use_safetensors": True}
            )
        except OSError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise QempoError(
                f"sentence encoder '{name}' could not be loaded ({reason}): pass a local model "
                f"directory or a Hub id reachable from here, via the argument or ${ENCODER_ENV}"
            ) from None
    return _encoder_cache[key]


def _model_name(model: Any, fallback: str) -> str:
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and meta.get("name"):
        return f"{meta.get('lang', '')}_{meta['name']}".lstrip("_")
    return fallback


# ---------------------------------------------------------------- syntactic


def _parse(texts: list[str], nlp: Language, progress: bool) -> list[Doc]:
    skip = [p for p in nlp.pipe_names if p in _UNNEEDED_PIPES]
    with nlp.select_pipes(disable=skip):
        docs = nlp.pipe(texts, batch_size=64)
        if progress:
            from rich.progress import track

            docs = track(docs, total=len(texts), description="parsing")
        docs = list(docs)
    for doc in docs:
        if len(doc) and not (doc.has_annotation("DEP") and doc.has_annotation("LEMMA")):
            raise QempoError(
                f"spaCy pipeline '{_model_name(nlp, 'given')}' gives no dependency parse or lemmas: "
                f"use one with a parser and lemmatizer such as {DEFAULT_SPACY_MODEL}"
            )
    return docs


def dependency_arrays(docs: Sequence[Doc]) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """All dependency forests as one graph: (graph id per node, lemma per node, arc ends).

    Nodes are the non-whitespace tokens; each arc token–head (roots' self-arcs excluded) is
    an undirected edge, as in Guo et al. Whitespace tokens (line breaks) carry no syntax.
    """
    graph_of, lemmas, src, dst = [], [], [], []
    for g, doc in enumerate(docs):
        node = {}
        for tok in doc:
            if not tok.is_space:
                node[tok.i] = len(lemmas)
                graph_of.append(g)
                lemmas.append(tok.lemma_)
        for tok in doc:
            head = tok.head.i
            if tok.i != head and tok.i in node and head in node:
                src.append(node[tok.i])
                dst.append(node[head])
    src_arr, dst_arr = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    return (
        np.asarray(graph_of, dtype=np.int64),
        lemmas,
        np.concatenate([src_arr, dst_arr]),
        np.concatenate([dst_arr, src_arr]),
    )


def wl_features(
    graph_of: np.ndarray,
    labels: Sequence[str],
    src: np.ndarray,
    dst: np.ndarray,
    n_graphs: int,
    iterations: int = WL_ITERATIONS,
) -> scipy.sparse.csr_matrix:
    """Weisfeiler–Lehman subtree features: one row per graph, counts of labels of rounds 0..h.

        ℓ_0(v) = lemma(v),    ℓ_{t+1}(v) = relabel(ℓ_t(v), {{ℓ_t(u) : u ∈ N(v)}})

    and φ(G) counts every (t, ℓ_t(v)) over v ∈ G, t = 0..h, so φ(G)·φ(G') is the WL subtree
    kernel Σ_t k_t. The multiset of neighbour labels is hashed as the wrapping uint64 sum of
    one random 64-bit key per label (order-free; two distinct multisets collide with
    probability about 2^-64 per pair), then (own label, hash) pairs are renumbered, for all graphs at once.
    """
    import scipy.sparse

    ids: dict[str, int] = {}
    current = np.fromiter((ids.setdefault(label, len(ids)) for label in labels), np.int64, len(labels))
    keys = np.random.default_rng(0)
    rows, cols, offset = [], [], 0
    for t in range(iterations + 1):
        rows.append(graph_of)
        cols.append(current + offset)
        n_labels = int(current.max()) + 1 if current.size else 0
        offset += n_labels
        if t == iterations:
            break
        key = keys.integers(0, np.iinfo(np.uint64).max, size=n_labels, dtype=np.uint64, endpoint=True)
        neighbours = np.zeros(current.size, dtype=np.uint64)
        np.add.at(neighbours, dst, key[current[src]])
        pairs = np.stack([current.astype(np.uint64), neighbours], axis=1)
        _, current = np.unique(pairs, axis=0, return_inverse=True)
        current = current.astype(np.int64).ravel()
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    return scipy.sparse.csr_matrix(
        (np.ones(rows_a.size), (rows_a, cols_a)), shape=(n_graphs, offset)
    )  # duplicate (row, col) entries are summed: label counts


def mean_pairwise_dissimilarity(unit_rows: np.ndarray | scipy.sparse.spmatrix, n_zero: int = 0) -> float:
    """Mean of 1 − x_i·x_j over ordered pairs i ≠ j of L2-normalised rows x, in O(nnz).

        Σ_{i≠j} x_i·x_j = ‖Σ_i x_i‖² − Σ_i ‖x_i‖²

    ``n_zero`` all-zero rows (empty texts) count as identical to one another and unlike
    everything else.
    """
    n = unit_rows.shape[0]
    total = np.asarray(unit_rows.sum(axis=0), dtype=np.float64).ravel()
    squared = unit_rows.multiply(unit_rows).sum() if hasattr(unit_rows, "multiply") else np.square(unit_rows).sum()
    off_diagonal = float(total @ total - squared) + n_zero * (n_zero - 1)
    # Rounding can leave -1e-14 for identical rows; the exact value is never negative.
    return max(0.0, 1.0 - off_diagonal / (n * (n - 1)))


def syntactic_diversity(
    texts: Sequence[str],
    nlp: Language | str | None = None,
    *,
    sample_size: int | None = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    iterations: int = WL_ITERATIONS,
    progress: bool = False,
) -> float:
    """Mean dissimilarity of dependency trees under the normalised WL subtree kernel, x100.

        K(i, j) = φ_i·φ_j / sqrt(φ_i·φ_i · φ_j·φ_j),
        syntactic = 100 · (1/n) Σ_i [1 − (1/(n−1)) Σ_{j≠i} K(i, j)]

    with φ the WL features of ``wl_features`` (``iterations`` rounds on lemma-labelled
    dependency forests parsed by ``nlp``, a spaCy pipeline or its name).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise QempoError(f"syntactic diversity: iterations must be an integer >= 0, got {iterations!r}")
    texts = subsample(_check_texts(texts, "syntactic", minimum=2), sample_size, seed)
    nlp = load_nlp(nlp) if nlp is None or isinstance(nlp, str) else nlp
    docs = _parse(texts, nlp, progress)
    graph_of, lemmas, src, dst = dependency_arrays(docs)
    features = wl_features(graph_of, lemmas, src, dst, len(docs), iterations)
    norms = np.sqrt(np.asarray(features.multiply(features).sum(axis=1)).ravel())
    n_zero = int((norms == 0).sum())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    import scipy.sparse

    unit = scipy.sparse.diags(scale) @ features
    return 100.0 * mean_pairwise_dissimilarity(unit, n_zero)


# ---------------------------------------------------------------- semantic


def semantic_diversity(
    texts: Sequence[str],
    encoder: SentenceTransformer | str | None = None,
    *,
    sample_size: int | None = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> float:
    """Mean (1 − cos)/2 over distinct pairs of sentence embeddings, x100.

        semantic = 100 · (1/(n(n−1))) Σ_{i≠j} (1 − e_i·e_j) / 2,    ‖e_i‖ = 1

    ``encoder`` is a SentenceTransformer or its name; texts are encoded in batches.
    """
    texts = subsample(_check_texts(texts, "semantic", minimum=2), sample_size, seed)
    encoder = load_encoder(encoder) if encoder is None or isinstance(encoder, str) else encoder
    embeddings = encoder.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=progress,
    ).astype(np.float64)
    return 100.0 * mean_pairwise_dissimilarity(embeddings) / 2.0


# ---------------------------------------------------------------- all three


class DiversityScorer:
    """The three diversity scores with one spaCy pipeline and one encoder, named in the result.

    Models load on first use (by name, cached per process). ``score`` draws one seeded
    subsample and scores it with all three metrics, so they describe the same texts.
    """

    def __init__(
        self,
        spacy_model: str | None = None,
        encoder: str | None = None,
        *,
        sample_size: int | None = DEFAULT_SAMPLE_SIZE,
        seed: int = 0,
        device: str | None = None,
        progress: bool = False,
    ):
        self.spacy_model = spacy_model or os.environ.get(SPACY_MODEL_ENV) or DEFAULT_SPACY_MODEL
        self.encoder_name = encoder or os.environ.get(ENCODER_ENV) or DEFAULT_ENCODER
        self.sample_size = sample_size
        self.seed = seed
        self.device = device
        self.progress = progress

    @property
    def nlp(self) -> Language:
        return load_nlp(self.spacy_model)

    @property
    def encoder(self) -> SentenceTransformer:
        return load_encoder(self.encoder_name, self.device)

    def score(self, texts: Sequence[str]) -> dict[str, Any]:
        """{lexical, syntactic, semantic, average} (x100) plus how and on what they were computed."""
        available = _check_texts(texts, "syntactic and semantic", minimum=2)
        sample = subsample(available, self.sample_size, self.seed)
        scores = {
            "lexical": lexical_diversity(sample, sample_size=None),
            "syntactic": syntactic_diversity(sample, self.nlp, sample_size=None, progress=self.progress),
            "semantic": semantic_diversity(sample, self.encoder, sample_size=None, progress=self.progress),
        }
        scores["average"] = sum(scores.values()) / 3
        return {
            **scores,
            "n_texts": len(sample),
            "n_available": len(available),
            "sample_size": self.sample_size,
            "seed": self.seed,
            "spacy_model": self.spacy_model,
            "encoder": self.encoder_name,
            "wl_iterations": WL_ITERATIONS,
        }
