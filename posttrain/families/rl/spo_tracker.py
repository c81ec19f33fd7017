"""SPO: Single-stream Policy Optimization, the math (the trainer wiring is in :mod:`posttrain.families.rl.spo_trainer`).

Xu & Ding, "Single-stream Policy Optimization" (arXiv 2509.13232); the method page is docs/methods/spo.md. One
completion per prompt; the baseline of prompt x is a persistent Beta-Bernoulli estimate of its success rate
``p_hat = alpha / (alpha + beta)``, updated after every visit with a forgetting factor ``rho`` that shrinks when the
policy has moved; advantages ``r - p_hat`` are z-scored over the whole batch, and prompts are drawn with weight
``sqrt(p_hat (1 - p_hat)) + eps``.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

import torch


def prompt_key(text: str) -> str:
    """A stable id of a prompt (sha1 of its text), the same in the offline pass and in training."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def offline_init(scores: list[float] | None, rho_min: float = 0.875, max_scores: int = 8,
                 rng: random.Random | None = None) -> tuple[float, float]:
    """``(alpha0, beta0)`` from a prompt's offline scores (binarised ``score > 0``): at most ``max_scores`` (n0) of them
    are kept (a random subsample drawn with ``rng``, default ``random.Random(0)``); with ``n`` kept scores and ``S``
    successes, ``alpha0 = N (S + 0.5) / (n + 1)``, ``beta0 = N (n - S + 0.5) / (n + 1)``, ``N = 1 / (1 - rho_min)``
    (so ``p_hat0 = (S + 0.5) / (n + 1)``). No scores, or ``max_scores`` 0: Jeffreys ``(0.5, 0.5)``. ``n`` is the
    prompt's own count when it has fewer than ``max_scores`` (docs/methods/spo.md#tracker)."""
    if not scores or max_scores <= 0:
        return 0.5, 0.5
    scores = list(scores)
    if len(scores) > max_scores:
        scores = (rng or random.Random(0)).sample(scores, max_scores)
    n = len(scores)
    s = sum(1.0 for x in scores if x > 0)
    total = 1.0 / (1.0 - rho_min)
    return total * (s + 0.5) / (n + 1), total * (n - s + 0.5) / (n + 1)


def rescale_rewards(rewards: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``(r - low) / (high - low)`` clipped to [0, 1] (``spo_reward_range``), so that any reward reads as a success
    probability; non-finite rewards stay as they are."""
    if not high > low:
        raise ValueError(f"reward range needs high > low, got [{low}, {high}]")
    r = rewards.double()
    return torch.where(torch.isfinite(r), ((r - low) / (high - low)).clamp(0.0, 1.0), r)


def check_reward_range(rewards: torch.Tensor) -> None:
    """``ValueError`` when a finite reward lies outside [0, 1]: ``beta <- rho beta + (1 - r)`` would turn negative
    (r = 2 gave beta = -0.55) and ``p_hat`` would no longer be a probability."""
    r = rewards.double()
    bad = torch.isfinite(r) & ((r < 0) | (r > 1))
    if bool(bad.any()):
        values = sorted({float(x) for x in r[bad].tolist()})[:3]
        raise ValueError(f"SPO's success-rate tracker needs rewards in [0, 1], got {values}")


def forgetting_factor(D: torch.Tensor, *, d_half: float = 0.06, rho_min: float = 0.875,
                      rho_max: float = 0.96) -> torch.Tensor:
    """``rho = clip(2^(-D / d_half), rho_min, rho_max)`` (a first visit has ``D = 0``, hence ``rho_max``)."""
    return torch.clamp(torch.pow(2.0, -D.double() / d_half), rho_min, rho_max)


def policy_shift(logp_prev: torch.Tensor, logp_now: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``D`` [B]: mean over the masked tokens of ``|logp_prev - logp_now|`` on each prompt's stored response (0 when
    the mask is empty)."""
    m = mask.double()
    return ((logp_prev.double() - logp_now.double()).abs() * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def spo_advantages(rewards: torch.Tensor, p_hat: torch.Tensor, eps: float = 1e-8,
                   baseline: bool = True) -> torch.Tensor:
    """``A = r - p_hat`` (``r`` alone without the baseline), z-scored over the batch with the unbiased std plus
    ``eps``. Rows with a non-finite reward get 0 and are left out of the statistics; one finite row gives 0."""
    r = rewards.double()
    ok = torch.isfinite(r)
    adv = torch.where(ok, r - (p_hat.double() if baseline else 0.0), torch.zeros_like(r))
    n = int(ok.sum())
    if n == 0:
        return torch.zeros_like(r)
    mean = adv[ok].mean()
    if n == 1:
        return torch.where(ok, adv - mean, torch.zeros_like(r))
    std = adv[ok].std(unbiased=True)
    return torch.where(ok, (adv - mean) / (std + eps), torch.zeros_like(r))


def sampling_weights(p_hat: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """``w = sqrt(p_hat (1 - p_hat)) + eps`` (largest, 0.5 + eps, at p_hat = 0.5; never below eps)."""
    p = p_hat.double()
    return torch.sqrt((p * (1 - p)).clamp(min=0.0)) + eps


class SPOTracker:
    """Per-prompt ``alpha``, ``beta``, visit count and last response (token ids, scored-token mask and per-token
    log-probs under the policy right after that visit's update: the ``D`` of the next visit), keyed by
    :func:`prompt_key`; ``state_dict`` round-trips (checkpoints). Unknown prompts start at Jeffreys ``(0.5, 0.5)``."""

    def __init__(self, rho_min: float = 0.875, rho_max: float = 0.96, d_half: float = 0.06):
        self.rho_min, self.rho_max, self.d_half = rho_min, rho_max, d_half
        self.alpha: dict[str, float] = {}
        self.beta: dict[str, float] = {}
        self.visits: dict[str, int] = {}
        self.responses: dict[str, tuple[list[int], list[int], list[float]]] = {}

    def init_offline(self, scores: dict[str, list[float]], max_scores: int = 8, seed: int = 0) -> None:
        """Each prompt's ``(alpha0, beta0)`` from at most ``max_scores`` of its offline scores (:func:`offline_init`;
        the subsample is drawn from one ``random.Random(seed)`` over the prompts in key order)."""
        rng = random.Random(seed)
        for key in sorted(scores):
            self.alpha[key], self.beta[key] = offline_init(scores[key], self.rho_min, max_scores, rng)

    def p_hat(self, keys: list[str]) -> torch.Tensor:
        return torch.tensor([self.alpha.get(k, 0.5) / (self.alpha.get(k, 0.5) + self.beta.get(k, 0.5)) for k in keys],
                            dtype=torch.float64)

    def update(self, keys: list[str], rewards: torch.Tensor, rho: torch.Tensor) -> None:
        """``alpha <- rho alpha + r``, ``beta <- rho beta + (1 - r)`` in row order; non-finite rewards skip. A finite
        reward outside [0, 1] is a ``ValueError`` (:func:`check_reward_range`) and nothing is updated."""
        check_reward_range(rewards)
        for key, r, f in zip(keys, rewards.double().tolist(), rho.double().tolist(), strict=True):
            if not math.isfinite(r):
                continue
            self.alpha[key] = f * self.alpha.get(key, 0.5) + r
            self.beta[key] = f * self.beta.get(key, 0.5) + (1.0 - r)
            self.visits[key] = self.visits.get(key, 0) + 1

    def store(self, keys: list[str], responses: list[tuple[list[int], list[int], list[float]]]) -> None:
        """Keep each prompt's latest response ``(ids, mask, logps)`` (in row order: a later row of the same prompt
        wins)."""
        for key, response in zip(keys, responses, strict=True):
            self.responses[key] = response

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": dict(self.alpha), "beta": dict(self.beta), "visits": dict(self.visits),
                "responses": dict(self.responses), "rho_min": self.rho_min, "rho_max": self.rho_max,
                "d_half": self.d_half}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha, self.beta, self.visits = dict(state["alpha"]), dict(state["beta"]), dict(state["visits"])
        self.responses = dict(state.get("responses", {}))
        self.rho_min, self.rho_max, self.d_half = state["rho_min"], state["rho_max"], state["d_half"]
