"""RL runs whose learning signal silently vanishes: detection and the likely cause (docs/rlvr.md "No learning signal").

GRPO learns only from differences between the rewards of one prompt's completions. When every group's rewards are
equal (TRL's ``frac_reward_zero_std`` = 1) the group advantages are all 0, the policy gradient is 0 (``grad_norm`` 0
without a KL or entropy term), and the run still "succeeds" with train loss 0. :func:`batch_signal` summarises one
generation batch, :func:`diagnose` names the likely cause from what the rollouts show, and :class:`SignalMonitor`
(driven by the RL trainer) warns after ``patience`` logging windows without signal and writes a final line for the run
summary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("posttrain")


@dataclass
class BatchSignal:
    """What one generation batch offered the policy gradient."""

    has_signal: bool  # some kept row has a non-zero advantage
    frac_zero_std: float  # fraction of prompt groups whose rewards are all equal
    reward_mean: float
    reward_min: float
    reward_max: float
    clipped_frac: float  # fraction of completions cut at max_completion_length (no end-of-sequence)
    reward_means: dict[str, float] = field(default_factory=dict)  # per reward function


def batch_signal(rewards: torch.Tensor, advantages: torch.Tensor, keep: torch.Tensor, num_generations: int,
                 clipped: torch.Tensor | None = None, rewards_per_func: torch.Tensor | None = None,
                 names: Sequence[str] = ()) -> BatchSignal:
    """Summarise a generation batch: combined ``rewards`` [B] (NaN: unscored), the ``advantages`` [B] used, the
    row-keep mask [B], ``clipped`` [B] (truncated completions) and per-function rewards [B, F] with their ``names``."""
    r = rewards.detach().float()
    scored = ~torch.isnan(r)
    groups = r.view(-1, num_generations)
    zero_std = []
    for g in groups:
        vals = g[~torch.isnan(g)]
        zero_std.append(vals.numel() < 2 or bool((vals == vals[0]).all()))
    kept_adv = advantages.detach()[keep.bool()]
    means = {}
    if rewards_per_func is not None:
        for i, name in enumerate(names):
            col = rewards_per_func[:, i].float()
            col = col[~torch.isnan(col)]
            if col.numel():
                means[name] = col.mean().item()
    vals = r[scored]
    return BatchSignal(
        has_signal=bool((kept_adv != 0).any()),
        frac_zero_std=sum(zero_std) / max(len(zero_std), 1),
        reward_mean=vals.mean().item() if vals.numel() else math.nan,
        reward_min=vals.min().item() if vals.numel() else math.nan,
        reward_max=vals.max().item() if vals.numel() else math.nan,
        clipped_frac=float(clipped.float().mean().item()) if clipped is not None and clipped.numel() else 0.0,
        reward_means=means,
    )


def diagnose(batches: Sequence[BatchSignal], max_completion_length: int | None = None,
             correct_reward: float = 1.0) -> str:
    """The likely cause of batches without learning signal, from what their rollouts show (first match wins):

    1. most completions were cut at ``max_completion_length``: completion length too short;
    2. a ``format`` reward never fired: format mismatch;
    3. every reward was the lowest value, 0 for the built-ins: the reward never matches;
    4. every reward was ``correct_reward``: every completion already right, the task is too easy;
    5. otherwise: each prompt's completions all scored the same (too little variety: num_generations/temperature).
    """
    if not batches:
        return "no generation batch was scored"
    clipped = sum(b.clipped_frac for b in batches) / len(batches)
    lo = min(b.reward_min for b in batches)
    hi = max(b.reward_max for b in batches)
    mean = sum(b.reward_mean for b in batches) / len(batches)
    length = f"={max_completion_length}" if max_completion_length else ""
    if clipped >= 0.5:
        return (f"completion length too short: {clipped:.0%} of completions were cut at training.max_completion_length"
                f"{length} before they ended; raise it")
    formats = [name for b in batches for name, v in b.reward_means.items() if name.startswith("format")]
    if formats and all(b.reward_means.get(n, 1.0) == 0.0 for b in batches for n in formats):
        return ("format mismatch: the format reward never fired (no completion holds the tag it looks for); check the "
                "prompt asks for that format, or log completions with training.log_completions: true")
    if lo == hi == 0.0:
        return ("reward never matches: every completion scored 0; the completions do not give the answer in a form "
                "the reward reads (docs/rlvr.md 'Which answer is scored') or the task is too hard for the model; "
                "look at them with training.log_completions: true")
    if lo == hi == correct_reward:
        return (f"every completion already scores {correct_reward:g}: the task is too easy for this model (use harder "
                "prompts)")
    return (f"each prompt's completions all scored the same (mean reward {mean:.3f}); raise training.num_generations or "
            "training.temperature for more varied completions")


class SignalMonitor:
    """Counts logging windows without learning signal and warns once after ``patience`` consecutive ones.

    A window is the generation batches scored since the previous log; it has no signal when none of its batches has
    a non-zero advantage, or when the logged ``grad_norm`` is 0. ``patience`` 0 turns the warning off (the final
    summary line is still written).
    """

    def __init__(self, patience: int = 2, max_completion_length: int | None = None, correct_reward: float = 1.0):
        self.patience = patience
        self.max_completion_length = max_completion_length
        self.correct_reward = correct_reward
        self.batches: list[BatchSignal] = []  # every training batch of the run
        self._window: list[BatchSignal] = []
        self._dead_run: list[BatchSignal] = []
        self.windows = self.dead_windows = self.zero_grad_windows = 0
        self._consecutive = 0
        self.warnings: list[str] = []

    def add(self, batch: BatchSignal) -> None:
        self.batches.append(batch)
        self._window.append(batch)

    def on_log(self, logs: dict[str, Any]) -> str | None:
        """Close the current window (a training log); returns the warning when one is issued."""
        if not self._window and "grad_norm" not in logs:
            return None
        window, self._window = self._window, []
        grad = logs.get("grad_norm")
        zero_grad = grad is not None and float(grad) == 0.0
        dead = zero_grad or (bool(window) and not any(b.has_signal for b in window))
        self.windows += 1
        self.zero_grad_windows += int(zero_grad)
        if not dead:
            self._consecutive, self._dead_run = 0, []
            return None
        self.dead_windows += 1
        self._consecutive += 1
        self._dead_run.extend(window)
        if self.patience and self._consecutive == self.patience:
            if window and any(b.has_signal for b in window):
                what, cause = "grad norm 0", ("the advantages are non-zero but no gradient reached the trainable "
                                             "parameters (check which parameters are trainable, e.g. peft.target_modules)")
            else:
                what = "all rewards equal within every group, so every advantage is 0" + (
                    ", grad norm 0" if zero_grad else "")
                cause = diagnose(self._dead_run or self.batches, self.max_completion_length, self.correct_reward)
            message = f"no learning signal for {self._consecutive} logging steps in a row ({what}); likely cause: {cause}"
            self.warnings.append(message)
            logger.warning("warning: %s", message)
            return message
        return None

    def summary(self) -> str | None:
        """One line for the end of the run: a warning when most generation batches had no signal, else None."""
        n = len(self.batches)
        if not n:
            return None
        dead = [b for b in self.batches if not b.has_signal]
        if len(dead) * 2 < n and not (self.windows and self.zero_grad_windows == self.windows):
            return None
        rewards = f"mean reward {sum(b.reward_mean for b in self.batches) / n:.3f}"
        return (f"no learning signal in {len(dead)} of {n} generation batches ({rewards}, "
                f"{sum(b.frac_zero_std for b in self.batches) / n:.0%} of prompt groups with equal rewards); likely "
                f"cause: {diagnose(dead or self.batches, self.max_completion_length, self.correct_reward)}")
