"""The ``guo2024`` diversity protocol computed the straightforward way, to check the fast one.

Written after Guo et al.'s released scripts (github.com/YanzhuGuo/llm-diversity, folder
``diversity_metrics/``) and sharing no code with :mod:`qempo_lite.evaluate.diversity`:

- lexical: the tokenizer regex, list-built n-grams and ``random.Random(seed).sample`` calls of
  the lexical script;
- syntactic: one ``nlp(sentence)`` call per sentence with the whole spaCy pipeline, a networkx
  graph built as the script's ``create_graph`` builds it from a Stanza sentence, and grakel's
  ``WeisfeilerLehman(n_iter=2, normalize=True, base_graph_kernel=VertexHistogram)``;
- semantic: one ``encode`` call with the script's batch size (8) and a full cosine matrix.

spaCy stands in for Stanza (UPOS tags and heads) as in the fast path. The sentence splitter is
a parameter: :func:`parser_sentences` (the parser's own sentence boundaries, a different
splitter from the fast path's) or :func:`sentencizer_sentences` (spaCy's rule-based
sentencizer, one call per text, as cheap as the scripts' Punkt).

Used by ``tests/test_diversity.py`` and ``benchmarks/eval_speed.py``; grakel is a test-only
dependency (the ``dev`` extra).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

PUNCTUATION = set(string.punctuation)


def _draw(items: list, n: int | None, seed: int) -> list:
    return items if n is None else random.Random(seed).sample(items, min(n, len(items)))


def reference_lexical(texts: Sequence[str], n_tokens: int | None = 40_000, seed: int = 42) -> float:
    """Mean TTR of sampled uni-, bi- and trigrams, x100, as the lexical script computes it."""
    tokens, bi_grams, tri_grams = [], [], []
    for line in texts:
        token = re.findall(r"\w+|[^\w\s]+", line)  # nltk's WordPunctTokenizer
        token = [t.lower() for t in token if t not in PUNCTUATION]
        tokens += token
        bi_grams += [tuple(token[i : i + 2]) for i in range(len(token) - 1)]
        tri_grams += [tuple(token[i : i + 3]) for i in range(len(token) - 2)]
    rng = random.Random(seed)
    ratios = []
    for grams in (tokens, bi_grams, tri_grams):
        if n_tokens is not None:
            grams = rng.sample(grams, min(n_tokens, len(grams)))
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return 100 * sum(ratios) / len(ratios)


def parser_sentences(texts: Sequence[str], nlp) -> list[str]:
    """Sentences as the spaCy parser bounds them, one ``nlp(text)`` call per text."""
    return [s.text.strip() for text in texts for s in nlp(text).sents if s.text.strip()]


def sentencizer_sentences(texts: Sequence[str]) -> list[str]:
    """Sentences from spaCy's rule-based sentencizer, one call per text."""
    import spacy

    splitter = spacy.blank("en")
    splitter.add_pipe("sentencizer")
    return [s.text.strip() for text in texts for s in splitter(text).sents if s.text.strip()]


def create_graph(doc):
    """The first sentence of a parsed ``doc`` as the syntactic script's graph: node 0 labelled
    'none', one node per word (1-based within the sentence) labelled by UPOS, an edge to its head.

    spaCy marks a root by a head equal to itself (Stanza by head 0) and makes tokens of
    whitespace (Stanza does not): those are no words, and a word attached to one hangs from 0.
    """
    import networkx as nx

    sent = next(iter(doc.sents))
    graph = nx.Graph()
    for word in sent:
        if word.is_space:
            continue
        word_id = word.i - sent.start + 1
        head = word.head
        head_id = 0 if head.i == word.i or head.is_space else head.i - sent.start + 1
        if word_id not in graph.nodes():
            graph.add_node(word_id)
        graph.nodes[word_id]["label"] = word.pos_
        if head_id not in graph.nodes():
            graph.add_node(head_id)
        graph.add_edge(word_id, head_id)
    if 0 not in graph.nodes():
        graph.add_node(0)
    graph.nodes[0]["label"] = "none"
    return graph


def _drawn_sentences(texts, nlp, n, seed, split) -> list[str]:
    """The sentences a reference score is computed on: ``split(texts)`` (default :func:`parser_sentences`), ``n`` drawn."""
    return _draw(split(texts) if split is not None else parser_sentences(texts, nlp), n, seed)


def reference_syntactic(
    texts: Sequence[str],
    nlp,
    n: int | None = 3_000,
    seed: int = 42,
    split: Callable[[Sequence[str]], list[str]] | None = None,
) -> float:
    """Mean 1 − K over off-diagonal pairs of grakel's normalised WL kernel, x100.

    ``split`` turns the texts into sentences (default: :func:`parser_sentences`).
    """
    from grakel.kernels import VertexHistogram, WeisfeilerLehman
    from grakel.utils import graph_from_networkx

    sentences = _drawn_sentences(texts, nlp, n, seed, split)
    graphs = [create_graph(nlp(s)) for s in sentences]
    kernel = WeisfeilerLehman(n_iter=2, normalize=True, base_graph_kernel=VertexHistogram)
    matrix = kernel.fit_transform(list(graph_from_networkx(graphs, node_labels_tag="label")))
    off_diagonal = matrix[~np.eye(len(graphs), dtype=bool)]
    return 100 * float(np.mean(1 - off_diagonal))


def reference_semantic(
    texts: Sequence[str],
    encoder,
    n: int | None = 2_000,
    seed: int = 42,
    split: Callable[[Sequence[str]], list[str]] | None = None,
    nlp=None,
) -> float:
    """Mean (1 − cos)/2 over off-diagonal pairs of sentence embeddings, x100.

    ``split`` turns the texts into sentences (default: :func:`parser_sentences` with ``nlp``).
    """
    import torch

    sentences = _drawn_sentences(texts, nlp, n, seed, split)
    x = encoder.encode(sentences, batch_size=8, show_progress_bar=False, convert_to_tensor=True,
                       normalize_embeddings=True).to(torch.float)
    # The script's cosine_similarity(x[None], x[:, None]) without its n x n x d intermediate.
    norms = x.norm(dim=-1)
    cosine = (x @ x.T) / torch.outer(norms, norms)
    mask = ~torch.eye(len(sentences), dtype=torch.bool)
    return 100 * float(((1 - cosine[mask]) / 2).mean())
