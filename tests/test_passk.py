"""pass@k: the unbiased estimator against enumeration, exact arithmetic, and bad input."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from qempo_lite.errors import QempoError
from qempo_lite.evaluate.passk import default_ks, pass_at_k, pass_at_k_curve


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_stable_at_n_100_against_exact_fractions():
    n = 100
    for c in (0, 1, 3, 10, 37, 50, 90, 99, 100):
        previous = -1.0
        for k in (1, 2, 4, 8, 16, 32, 64, 100):
            exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            value = pass_at_k(n, c, k)
            assert value == pytest.approx(float(exact), abs=1e-12), (c, k)
            assert 0.0 <= value <= 1.0
            assert value >= previous  # more draws never lower pass@k
            previous = value


def test_large_n_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 1e600 overflows a float; with one correct sample pass@k is exactly k/n.
    with pytest.raises(OverflowError):
        float(math.comb(2000, 1000))
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(2000, 0, 1000) == 0.0
    assert pass_at_k(2000, 1001, 1000) == 1.0  # fewer wrong samples than draws


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((10, 2, 11), "k=11 exceeds n=10"),
        ((10, 11, 1), "c=11"),
        ((-1, 0, 1), "n must be >= 1"),
        ((10, -2, 1), "c must be >= 0"),
        ((10, 2, 0), "k must be >= 1"),
        ((10, 2, 1.5), "k must be an integer"),
        ((10, True, 1), "c must be an integer"),
    ],
)
def test_bad_counts_raise_one_line_errors(args, fragment):
    with pytest.raises(QempoError, match=fragment) as err:
        pass_at_k(*args)
    assert "\n" not in str(err.value)


def test_numpy_integers_are_accepted():
    assert pass_at_k(np.int64(10), np.int32(3), np.int64(2)) == pytest.approx(1 - (7 * 6) / (10 * 9))


def test_default_ks_double_up_to_n():
    assert default_ks(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(1) == [1]


def test_curve_is_the_mean_over_problems():
    cs = [0, 1, 5, 10]
    curve = pass_at_k_curve(10, cs)
    assert list(curve) == [1, 2, 4, 8, 10]
    # k=1: pass@1 = c/n, so the mean is (0 + 1 + 5 + 10) / 10 / 4 = 0.4
    assert curve[1] == pytest.approx(0.4)
    # k=10: a problem passes iff it has any correct sample: 3 of 4 problems
    assert curve[10] == pytest.approx(0.75)
    assert curve[4] == pytest.approx(np.mean([pass_at_k(10, c, 4) for c in cs]))


def test_curve_with_per_problem_n_and_explicit_ks():
    curve = pass_at_k_curve(np.array([4, 8]), np.array([1, 2]), ks=[1, 3])
    assert curve[1] == pytest.approx((1 / 4 + 2 / 8) / 2)
    assert curve[3] == pytest.approx((pass_at_k(4, 1, 3) + pass_at_k(8, 2, 3)) / 2)
    assert list(pass_at_k_curve([4, 8], [1, 2])) == [1, 2, 4]  # default ks stop at the smallest n


@pytest.mark.parametrize(
    "ns, cs, ks, fragment",
    [
        ([4, 8], [1], None, "2 sample counts for 1 problems"),
        (4, [], None, "no problems"),
        ([4, 8], [1, 2], [8], "k=8 exceeds the 4 samples"),
        (4, [1], [], "empty ks"),
        ([4, 0], [1, 0], None, "n of problem 1 must be >= 1"),
    ],
)
def test_curve_rejects_inconsistent_input(ns, cs, ks, fragment):
    with pytest.raises(QempoError, match=fragment):
        pass_at_k_curve(ns, cs, ks)
