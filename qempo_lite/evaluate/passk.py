"""pass@k with the unbiased estimator of Chen et al. (2021), as the paper reports it for math.

From n samples of one problem of which c are correct, the probability that at least one
of k samples drawn without replacement is correct is estimated without bias by

    pass@k = 1 − C(n − c, k) / C(n, k)

The ratio is evaluated as the equivalent product
C(n − c, k) / C(n, k) = ∏_{i = n − c + 1}^{n} (1 − k / i), whose partial products stay in
[0, 1]: no big integers and no overflow (C(2000, 1000) is already beyond float range).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

from qempo_lite.errors import QempoError


def _check_int(name: str, value, minimum: int) -> int:
    # operator.index takes Python and NumPy integers and refuses floats; bool is refused
    # apart because True as a sample count is always a caller's mistake.
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise QempoError(f"pass@k: {name} must be an integer, got {value!r}: pass whole numbers") from None
    if value < minimum:
        raise QempoError(f"pass@k: {name} must be >= {minimum}, got {value}: pass a count in range")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct answers among ``n`` samples.

        pass@k = 1 − C(n − c, k) / C(n, k) = 1 − ∏_{i = n − c + 1}^{n} (1 − k / i)

    and exactly 1 when n − c < k (every k-subset holds a correct answer).
    Raises QempoError unless 0 <= c <= n and 1 <= k <= n.
    """
    n = _check_int("n", n, 1)
    c = _check_int("c", c, 0)
    k = _check_int("k", k, 1)
    if c > n:
        raise QempoError(f"pass@k: c={c} correct answers exceed n={n} samples: count each sample once")
    if k > n:
        raise QempoError(f"pass@k: k={k} exceeds n={n} samples: draw at least k samples per problem or lower k")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def default_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... below n, then n itself: the x-axis of the paper's Figure 3."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def pass_at_k_curve(
    ns: int | Iterable[int], cs: Iterable[int], ks: Iterable[int] | None = None
) -> dict[int, float]:
    """Mean pass@k over problems, for each k: {k: (1/P) Σ_p pass@k(n_p, c_p)}.

    ``ns`` is the number of samples per problem (one int for all, or one per problem),
    ``cs`` the number of correct ones per problem. ``ks`` defaults to 1, 2, 4, ... up to
    the smallest n, and that n itself.
    """
    cs = list(cs)
    if not cs:
        raise QempoError("pass@k curve: no problems given: pass one correct count per problem")
    ns = list(ns) if isinstance(ns, Iterable) else [ns] * len(cs)
    if len(ns) != len(cs):
        raise QempoError(
            f"pass@k curve: {len(ns)} sample counts for {len(cs)} problems: pass one n per problem or a single int"
        )
    for p, n in enumerate(ns):
        _check_int(f"n of problem {p}", n, 1)
    ks = default_ks(min(ns)) if ks is None else list(ks)
    if not ks:
        raise QempoError("pass@k curve: empty ks: pass at least one k, or None for the default")
    curve = {}
    for k in ks:
        k = _check_int("k", k, 1)
        if k > min(ns):
            raise QempoError(
                f"pass@k curve: k={k} exceeds the {min(ns)} samples of some problem: lower k or sample more"
            )
        curve[k] = sum(pass_at_k(n, c, k) for n, c in zip(ns, cs)) / len(cs)
    return curve
