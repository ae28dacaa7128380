"""Lexical, syntactic and semantic diversity of a set of texts, x100, as Guo et al. (2024) compute them.

These are the three columns of the paper's Table 2. Each score is a property of a *set* of
texts (e.g. every sample a model gives on MT-Bench). The protocol, named ``guo2024`` in every
result, is the one of the authors' released scripts (github.com/YanzhuGuo/llm-diversity,
folder ``diversity_metrics/``):

- lexical: word-punct tokens (NLTK's ``\\w+|[^\\w\\s]+``), lower-cased, the tokens that are a
  single punctuation character (``string.punctuation``) dropped; uni-, bi- and trigrams built
  inside each text and pooled over the texts; a seeded sample of 40,000 n-grams of each order
  (all of them when there are fewer); the mean of the three type-token ratios.
- syntactic: the texts split into sentences; a seeded sample of 3,000 sentences; each sentence
  parsed on its own into an undirected graph with one node per word, labelled by its universal
  POS tag (UPOS), an edge from each word to its head, and a root node labelled ``none`` joined
  to the root word; the Weisfeiler–Lehman subtree kernel with 2 iterations over vertex-label
  histograms, normalised (grakel's ``WeisfeilerLehman(n_iter=2, normalize=True,
  base_graph_kernel=VertexHistogram)``); the mean of 1 − K over the pairs of distinct sentences.
- semantic: the texts split into sentences; a seeded sample of 2,000; normalised sentence
  embeddings (``all-mpnet-base-v2``); the mean of (1 − cos)/2 over the pairs of distinct
  sentences.

Samples are drawn as the scripts draw them, ``random.Random(seed).sample(items, k)`` with seed
42; the lexical sample draws unigrams, bigrams and trigrams in turn from one generator.

Two of the scripts' tools need downloads at run time, so spaCy stands in for them:

- the parser: the scripts use Stanza; spaCy's UPOS tags and dependency heads replace its
  (``en_core_web_sm`` by default). As with the scripts' ``doc.sentences[0]``, when the parser
  cuts a sentence in two, the graph is that of its first part. Whitespace tokens (line breaks),
  which Stanza never makes, are not nodes; a word attached to one joins the root node.
- the sentence splitter: the scripts use NLTK's Punkt (``sent_tokenize``); spaCy's rule-based
  ``sentencizer`` on spaCy's English tokenizer replaces it. Like Punkt, it splits after
  sentence-final punctuation, keeps the abbreviations it knows whole ("e.g.", "Dr.") and does
  not split at line breaks.

``qempo_lite.evaluate.reference`` computes the same protocol the straightforward way (one
parse per sentence, networkx graphs, grakel's kernel); the tests hold the two together.

The parser and the encoder are loaded by :mod:`qempo_lite.evaluate.diversity_models`; the list
of metrics that results, reports, the eval CLI and the app read is
:data:`qempo_lite.evaluate.metrics.METRICS`. Embeddings are normalised in float64, whatever
precision the encoder computes in.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qempo_lite.errors import QempoError, missing_extra

from .diversity_models import DEFAULT_SPACY_MODEL, load_encoder, load_nlp

if TYPE_CHECKING:  # heavy imports, deferred to first use
    import scipy.sparse
    from sentence_transformers import SentenceTransformer
    from spacy.language import Language
    from spacy.tokens import Doc

PROTOCOL = "guo2024"
LEXICAL_SAMPLE = 40_000  # n-grams of each order
SYNTACTIC_SAMPLE = 3_000  # sentences
SEMANTIC_SAMPLE = 2_000  # sentences
DEFAULT_SEED = 42
WL_ITERATIONS = 2
ROOT_LABEL = "none"

# Components that add nothing to UPOS tags and dependency arcs; skipping them saves a third of
# the parsing time with en_core_web_sm.
_UNNEEDED_PIPES = ("ner", "lemmatizer", "trainable_lemmatizer", "entity_ruler", "entity_linker", "textcat",
                   "textcat_multilabel", "spancat", "span_finder")
_WORD_PUNCT = re.compile(r"\w+|[^\w\s]+")  # NLTK's WordPunctTokenizer
_PUNCTUATION = frozenset(string.punctuation)

_splitter: list[Language] = []


# ---------------------------------------------------------------- input and samples


def check_texts(texts: Any, metric: str, minimum: int = 1) -> list[str]:
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


def check_sample_size(sample_size: Any) -> None:
    if sample_size is not None and (
        isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1
    ):
        raise QempoError(f"sample_size must be a positive integer or None, got {sample_size!r}")


def protocol_sample(items: Sequence, sample_size: int | None, seed: int = DEFAULT_SEED) -> list:
    """``random.Random(seed).sample(items, min(sample_size, len(items)))``, as the released scripts draw.

    ``sample_size=None`` keeps every item, in order.
    """
    check_sample_size(sample_size)
    items = list(items)
    if sample_size is None:
        return items
    return random.Random(seed).sample(items, min(sample_size, len(items)))


def split_sentences(texts: Sequence[str]) -> list[str]:
    """The sentences of all ``texts``, in order: spaCy's English tokenizer and rule-based sentencizer.

    Sentences are stripped of surrounding whitespace; empty ones are dropped.
    """
    texts = check_texts(texts, "sentence splitting", minimum=0)
    if not _splitter:
        try:
            import spacy
        except ImportError:
            raise missing_extra("spacy", "eval") from None
        splitter = spacy.blank("en")
        splitter.add_pipe("sentencizer")
        _splitter.append(splitter)
    sentences = []
    for doc in _splitter[0].pipe(texts, batch_size=256):
        sentences += [s for s in (span.text.strip() for span in doc.sents) if s]
    return sentences


def check_sentences(sentences: list[str], metric: str) -> None:
    if len(sentences) < 2:
        raise QempoError(
            f"{metric} diversity needs at least 2 sentences, the texts hold {len(sentences)}: score more samples"
        )


# ---------------------------------------------------------------- lexical


def word_tokens(text: str) -> list[str]:
    """Word-punct tokens of ``text``, lower-cased, without single punctuation characters.

    As the released script: ``[t.lower() for t in WordPunctTokenizer().tokenize(text) if t not in
    string.punctuation]`` — so "don't" gives don, t and a run such as "--" stays a token.
    """
    return [t.lower() for t in _WORD_PUNCT.findall(text) if t not in _PUNCTUATION]


def lexical_diversity(
    texts: Sequence[str], *, sample_size: int | None = LEXICAL_SAMPLE, seed: int = DEFAULT_SEED
) -> float:
    """Mean type-token ratio of word n-grams, n = 1, 2, 3, over seeded samples of the pooled n-grams, x100.

        TTR_n = |distinct n-grams in S_n| / |S_n|,    lexical = 100 · (TTR_1 + TTR_2 + TTR_3) / 3

    where S_n is a sample of ``sample_size`` of all n-grams (formed inside each text, pooled),
    drawn with ``random.Random(seed)`` for n = 1, 2, 3 in turn (all of them when fewer, or when
    ``sample_size`` is None). An order with no n-gram at all (every text shorter than n words)
    is left out of the mean; a set without a single word raises QempoError.
    """
    texts = check_texts(texts, "lexical")
    check_sample_size(sample_size)
    grams: list[list] = [[], [], []]
    for text in texts:
        tokens = word_tokens(text)
        for n in (1, 2, 3):
            grams[n - 1] += zip(*(tokens[i:] for i in range(n)))
    if not grams[0]:
        raise QempoError("lexical diversity: the texts hold no words: check that generation produced text")
    rng = random.Random(seed)
    ratios = []
    for pooled in grams:
        if sample_size is not None:
            pooled = rng.sample(pooled, min(sample_size, len(pooled)))
        if pooled:
            ratios.append(len(set(pooled)) / len(pooled))
    return 100.0 * sum(ratios) / len(ratios)


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """distinct-n (Li et al., 2016): distinct word n-grams / all word n-grams, pooled over texts.

        distinct-n = |{n-grams}| / Σ_texts (#n-grams in text)

    Tokens are :func:`word_tokens`; ``None`` when no text has n words.
    """
    seen, total = set(), 0
    for text in check_texts(texts, f"distinct-{n}", minimum=0):
        tokens = word_tokens(text)
        grams = list(zip(*(tokens[i:] for i in range(n))))
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else None


# ---------------------------------------------------------------- syntactic


def _parse(sentences: list[str], nlp: Language, progress: bool) -> list[Doc]:
    skip = [p for p in nlp.pipe_names if p in _UNNEEDED_PIPES]
    with nlp.select_pipes(disable=skip):
        docs = nlp.pipe(sentences, batch_size=256)
        if progress:
            from rich.progress import track

            docs = track(docs, total=len(sentences), description="parsing")
        docs = list(docs)
    for doc in docs:
        if len(doc) and not (doc.has_annotation("DEP") and doc.has_annotation("POS")):
            name = nlp.meta.get("name", "given")
            raise QempoError(
                f"spaCy pipeline '{nlp.meta.get('lang', '')}_{name}' gives no dependency parse or UPOS tags: "
                f"use one with a parser and tagger such as {DEFAULT_SPACY_MODEL}"
            )
    return docs


def dependency_arrays(docs: Sequence[Doc]) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """The sentence graphs of ``docs`` as one graph: (graph id per node, label per node, arc ends).

    Graph g holds a root node labelled ``none`` and one node per word of the first sentence of
    ``docs[g]`` (whitespace tokens excepted), labelled by its UPOS tag; each word is joined to
    its head, the sentence's root word (and a word whose head is whitespace) to the root node.
    Arcs are undirected: each appears in both directions.
    """
    graph_of, labels, src, dst = [], [], [], []
    for g, doc in enumerate(docs):
        root = len(labels)
        graph_of.append(g)
        labels.append(ROOT_LABEL)
        sentence = next(iter(doc.sents), None) if len(doc) else None
        if sentence is None:
            continue
        node = {}
        for tok in sentence:
            if not tok.is_space:
                node[tok.i] = len(labels)
                graph_of.append(g)
                labels.append(tok.pos_)
        for i, tok in ((i, doc[i]) for i in node):
            src.append(node[i])
            dst.append(node.get(tok.head.i, root) if tok.head.i != i else root)
    src_arr, dst_arr = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    return (
        np.asarray(graph_of, dtype=np.int64),
        labels,
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

        ℓ_0(v) = label(v),    ℓ_{t+1}(v) = relabel(ℓ_t(v), {{ℓ_t(u) : u ∈ N(v)}})

    and φ(G) counts every (t, ℓ_t(v)) over v ∈ G, t = 0..h, so φ(G)·φ(G') = Σ_t k_VH(G_t, G'_t),
    the WL kernel over vertex histograms (grakel's ``WeisfeilerLehman(n_iter=h)`` adds rounds
    0..h too). The multiset of neighbour labels is hashed as the wrapping uint64 sum of one
    random 64-bit key per label (order-free; two distinct multisets collide with probability
    about 2^-64 per pair), then (own label, hash) pairs are renumbered, for all graphs at once.
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


def mean_pairwise_dissimilarity(unit_rows: np.ndarray | scipy.sparse.spmatrix) -> float:
    """Mean of 1 − x_i·x_j over ordered pairs i ≠ j of L2-normalised rows x, in O(nnz).

        Σ_{i≠j} x_i·x_j = ‖Σ_i x_i‖² − Σ_i ‖x_i‖²
    """
    n = unit_rows.shape[0]
    total = np.asarray(unit_rows.sum(axis=0), dtype=np.float64).ravel()
    squared = unit_rows.multiply(unit_rows).sum() if hasattr(unit_rows, "multiply") else np.square(unit_rows).sum()
    off_diagonal = float(total @ total - squared)
    # Rounding can leave -1e-14 for identical rows; the exact value is never negative.
    return max(0.0, 1.0 - off_diagonal / (n * (n - 1)))


def syntactic_of_sentences(sentences: list[str], nlp: Language, sample_size: int | None, seed: int,
                            iterations: int, progress: bool) -> float:
    check_sentences(sentences, "syntactic")
    sample = protocol_sample(sentences, sample_size, seed)
    # Equal sentences parse alike: parse each once.
    unique, inverse = np.unique(np.asarray(sample, dtype=object), return_inverse=True)
    docs = _parse(list(unique), nlp, progress)
    graph_of, labels, src, dst = dependency_arrays(docs)
    features = wl_features(graph_of, labels, src, dst, len(docs), iterations)
    norms = np.sqrt(np.asarray(features.multiply(features).sum(axis=1)).ravel())  # > 0: every graph has a root
    import scipy.sparse

    unit = (scipy.sparse.diags(1.0 / norms) @ features).tocsr()[inverse.ravel()]
    return 100.0 * mean_pairwise_dissimilarity(unit)


def syntactic_diversity(
    texts: Sequence[str],
    nlp: Language | str | None = None,
    *,
    sample_size: int | None = SYNTACTIC_SAMPLE,
    seed: int = DEFAULT_SEED,
    iterations: int = WL_ITERATIONS,
    progress: bool = False,
) -> float:
    """Mean dissimilarity of sentence dependency graphs under the normalised WL subtree kernel, x100.

        K(i, j) = φ_i·φ_j / sqrt(φ_i·φ_i · φ_j·φ_j),
        syntactic = 100 · (1/(n(n−1))) Σ_{i≠j} (1 − K(i, j))

    over a seeded sample of ``sample_size`` of the texts' sentences (all when None), with φ the
    WL features of ``wl_features`` (``iterations`` rounds on the UPOS-labelled graphs of
    ``dependency_arrays``, parsed by ``nlp``, a spaCy pipeline or its name).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise QempoError(f"syntactic diversity: iterations must be an integer >= 0, got {iterations!r}")
    check_sample_size(sample_size)
    sentences = split_sentences(check_texts(texts, "syntactic", minimum=0))
    check_sentences(sentences, "syntactic")
    nlp = load_nlp(nlp) if nlp is None or isinstance(nlp, str) else nlp
    return syntactic_of_sentences(sentences, nlp, sample_size, seed, iterations, progress)


# ---------------------------------------------------------------- semantic


def semantic_of_sentences(sentences: list[str], encoder: SentenceTransformer, sample_size: int | None, seed: int,
                           batch_size: int, progress: bool) -> float:
    check_sentences(sentences, "semantic")
    sample = protocol_sample(sentences, sample_size, seed)
    unique, inverse = np.unique(np.asarray(sample, dtype=object), return_inverse=True)
    embeddings = encoder.encode(
        list(unique), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=progress
    ).astype(np.float64)
    # Normalised here, in float64, whatever precision the encoder computed in.
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return 100.0 * mean_pairwise_dissimilarity(embeddings[inverse.ravel()]) / 2.0


def semantic_diversity(
    texts: Sequence[str],
    encoder: SentenceTransformer | str | None = None,
    *,
    sample_size: int | None = SEMANTIC_SAMPLE,
    seed: int = DEFAULT_SEED,
    batch_size: int = 64,
    progress: bool = False,
) -> float:
    """Mean (1 − cos)/2 over pairs of distinct sampled sentences, x100.

        semantic = 100 · (1/(n(n−1))) Σ_{i≠j} (1 − e_i·e_j) / 2,    ‖e_i‖ = 1

    over a seeded sample of ``sample_size`` of the texts' sentences (all when None), embedded by
    ``encoder`` (a SentenceTransformer, or its name for :func:`load_encoder`) in batches of
    ``batch_size``; equal sentences are embedded once.
    """
    check_sample_size(sample_size)
    sentences = split_sentences(check_texts(texts, "semantic", minimum=0))
    check_sentences(sentences, "semantic")
    encoder = load_encoder(encoder) if encoder is None or isinstance(encoder, str) else encoder
    return semantic_of_sentences(sentences, encoder, sample_size, seed, batch_size, progress)
