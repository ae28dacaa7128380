"""Plain reference versions of the diversity building blocks, for checking the fast ones.

Written the obvious way — one ``nlp(text)`` call per text and networkx's generic
Weisfeiler–Lehman subtree hashes — so that ``tests/test_diversity.py`` and
``benchmarks/eval_speed.py`` compare :mod:`qempo_lite.evaluate.diversity` against an
independent implementation rather than against itself.
"""

from __future__ import annotations

from collections import Counter


def networkx_wl_counts(texts, nlp, iterations: int = 5) -> list[Counter]:
    """Per text: counts of (iteration, WL subtree hash) over its dependency graph.

    Nodes are the non-space tokens labelled by lemma; edges join each token to its head
    (undirected); labels are hashed for iterations 0..``iterations``.
    """
    import networkx as nx

    counts = []
    for text in texts:
        doc = nlp(text)
        graph = nx.Graph()
        for tok in doc:
            if not tok.is_space:
                # networkx hashes labels as ASCII
                graph.add_node(tok.i, lemma=tok.lemma_.encode("unicode_escape").decode("ascii"))
        for tok in doc:
            if tok.i != tok.head.i and not tok.is_space and not tok.head.is_space:
                graph.add_edge(tok.i, tok.head.i)
        hashes = nx.weisfeiler_lehman_subgraph_hashes(
            graph, node_attr="lemma", iterations=iterations, include_initial_labels=True
        )
        counts.append(Counter((t, h) for node_hashes in hashes.values() for t, h in enumerate(node_hashes)))
    return counts
