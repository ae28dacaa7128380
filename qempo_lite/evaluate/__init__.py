"""Evaluation: diversity (lexical / syntactic / semantic, the list in ``metrics``) and pass@k.

Names resolve lazily, so importing this package loads neither spaCy, sentence-transformers
nor torch; they load when a metric first needs them.
"""

from importlib import import_module

_EXPORTS = {
    "METRICS": "metrics",
    "DiversityScorer": "metrics",
    "ColumnScorer": "metrics",
    "lexical_diversity": "diversity",
    "syntactic_diversity": "diversity",
    "semantic_diversity": "diversity",
    "distinct_n": "diversity",
    "load_nlp": "diversity_models",
    "load_encoder": "diversity_models",
    "pass_at_k": "passk",
    "pass_at_k_curve": "passk",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
