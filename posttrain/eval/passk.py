"""Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv 2107.03374).

From n samples of which c are correct, ``pass@k = E[1 - C(n-c, k) / C(n, k)]``. The ratio of binomials is computed in
the numerically stable product form of the paper's Figure 3:
``C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms large binomial coefficients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["estimate_pass_at_k", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021, arXiv 2107.03374, Fig. 3).

    ``n``: samples drawn, ``c``: correct samples (0 <= c <= n), ``k``: 1 <= k <= n. Returns 1.0 when
    ``n - c < k`` (every size-k subset contains a correct sample) and 0.0 when ``c == 0``.
    """
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def estimate_pass_at_k(
    num_samples: int | Sequence[int] | np.ndarray, num_correct: Iterable[int] | np.ndarray, k: int
) -> np.ndarray:
    """pass@k for each problem (vectorised over problems, as in the paper's reference code); average for the score.

    ``num_samples`` is one int for every problem or one per problem; ``num_correct`` has one entry per problem.
    """
    correct = np.asarray(list(num_correct) if not isinstance(num_correct, np.ndarray) else num_correct)
    samples = np.full(correct.shape, int(num_samples)) if np.isscalar(num_samples) else np.asarray(num_samples)
    if samples.shape != correct.shape:
        raise ValueError(f"num_samples has shape {samples.shape} but num_correct has {correct.shape}")
    return np.array([pass_at_k(n, c, k) for n, c in zip(samples.tolist(), correct.tolist())], dtype=np.float64)
