"""Tolerances for comparing two float32 computations of the same quantity.

Two correct fp32 pipelines that differ only in the order of their operations (fused vs. plain LM head, merged vs.
unmerged adapter, another SIMD path or thread count) agree to a few units of float32 precision *relative to the
magnitude of what they add up*, and the rounding errors of a reduction over K terms grow like sqrt(K). A bare
absolute tolerance is wrong at both ends: too tight for large values (a loss of 65 has an ulp of 7.6e-6), too loose for
tiny ones. :func:`assert_fp32_close` takes the scale (default: the largest |expected|) and the length of the longest
reduction in the computation, and allows ``ulps * eps32 * scale * sqrt(reductions)``.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: one ulp at 1.0


def fp32_tol(scale: float, reductions: int = 1, ulps: float = 4.0) -> float:
    """Absolute tolerance for values of magnitude ``scale`` computed through sums of up to ``reductions`` terms."""
    return ulps * EPS32 * max(abs(float(scale)), EPS32) * math.sqrt(max(int(reductions), 1))


def assert_fp32_close(actual, expected, *, scale: float | None = None, reductions: int = 1, ulps: float = 4.0,
                      msg: str = "") -> None:
    """``max |actual - expected| <= fp32_tol(scale, reductions, ulps)``; ``scale`` defaults to ``max |expected|``."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, (msg, a.shape, e.shape)
    scale = float(e.abs().max()) if scale is None else scale
    tol = fp32_tol(scale, reductions, ulps)
    diff = float((a - e).abs().max()) if a.numel() else 0.0
    assert diff <= tol, f"{msg} max |diff| {diff:.3g} > {tol:.3g} (scale {scale:.3g}, {reductions} reductions, {ulps} ulp)"
