"""Unbiased pass@k (Chen et al. 2021, arXiv 2107.03374) against hand-computed values and the exact binomial form."""

from fractions import Fraction
from math import comb

import numpy as np
import pytest

from posttrain.eval.passk import estimate_pass_at_k, pass_at_k


def exact(n, c, k):
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


def test_hand_computed_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)  # c/n
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252, abs=1e-12)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5, abs=1e-12)  # C(199,100)/C(200,100) = 100/200


def test_edge_cases():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every subset of size 3 has a correct sample
    for bad in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


@pytest.mark.parametrize("n,c,k", [(20, 3, 1), (20, 3, 10), (100, 7, 25), (1000, 13, 300), (2000, 1, 1999)])
def test_matches_exact_binomial_and_is_stable(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(exact(n, c, k), abs=1e-12)


def test_monotone_in_k_and_c():
    vals = [pass_at_k(50, 5, k) for k in range(1, 51)]
    assert all(a <= b + 1e-15 for a, b in zip(vals, vals[1:]))
    vals = [pass_at_k(50, c, 8) for c in range(0, 51)]
    assert all(a <= b + 1e-15 for a, b in zip(vals, vals[1:]))


def test_unbiased_against_enumeration():
    # The estimator is the exact fraction of size-k subsets of the n samples that contain a correct sample.
    from itertools import combinations

    samples = [1, 0, 0, 1, 0, 0, 0]
    for k in range(1, 8):
        subsets = list(combinations(samples, k))
        frac = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(7, 2, k) == pytest.approx(frac, abs=1e-12)


def test_vectorised():
    out = estimate_pass_at_k(5, [0, 2, 5], 2)
    np.testing.assert_allclose(out, [0.0, 0.7, 1.0], atol=1e-12)
    out = estimate_pass_at_k([5, 10], np.array([2, 3]), 5)
    np.testing.assert_allclose(out, [1.0, 1 - 21 / 252], atol=1e-12)
    with pytest.raises(ValueError):
        estimate_pass_at_k([5, 10], [1], 1)
