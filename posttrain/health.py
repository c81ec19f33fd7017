"""What every family's run reports while it trains: readable log lines, and the warning when the policy collapses or
the gradient dies (docs/observability.md "Collapse and dead gradients").

A run can "succeed" (exit 0, finite weights) with a destroyed model: a learning rate far too large drives the
next-token distribution to uniform (mean token entropy = ln |V|), after which the gradient is exactly 0 and nothing
more happens. :func:`collapse_message` and :func:`dead_gradient_message` recognise both from the logged metrics
(``entropy``, which the SFT, preference and RL trainers log, and ``grad_norm``, which every family logs);
:class:`HealthMonitor` warns once per kind during the run and hands the warnings to the run summary, like the RL
family's no-learning-signal warning (posttrain/families/rl/diagnostics.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

logger = logging.getLogger("posttrain")

UNIFORM_FRACTION = 0.95  # mean token entropy at or above this fraction of ln|V|: the policy is (nearly) uniform
LEARNED_FRACTION = 0.8  # ... after it was below this fraction earlier in the run (a random-init model starts uniform)
DEAD_GRADIENT_PATIENCE = 3  # training logs in a row with a gradient norm of exactly 0


def collapse_message(entropies: Sequence[float], vocab_size: int) -> str | None:
    """The warning when the logged mean token ``entropies`` (nats, in order) reached :data:`UNIFORM_FRACTION` of
    ``ln(vocab_size)`` after being below :data:`LEARNED_FRACTION` of it; else None. A model that starts uniform
    (random initialisation) and stays there is not a collapse."""
    if vocab_size < 2 or not entropies:
        return None
    uniform = math.log(vocab_size)
    lowest = math.inf
    for step, value in enumerate(entropies):
        if lowest < LEARNED_FRACTION * uniform and value >= UNIFORM_FRACTION * uniform:
            return (f"the policy collapsed to (nearly) uniform predictions: mean token entropy {value:.2f} nats, "
                    f"ln |V| = {uniform:.2f} for a vocabulary of {vocab_size} (it was {lowest:.2f} earlier); the "
                    "model is destroyed: lower training.learning_rate and keep training.max_grad_norm > 0")
        lowest = min(lowest, value)
    return None


def dead_gradient_message(grad_norms: Sequence[float], patience: int = DEAD_GRADIENT_PATIENCE) -> str | None:
    """The warning when the last ``patience`` logged gradient norms are exactly 0 (nothing can change any more);
    else None."""
    tail = list(grad_norms)[-patience:]
    if patience < 1 or len(tail) < patience or any(g != 0.0 for g in tail):
        return None
    return (f"the gradient norm was exactly 0 for {patience} logging steps in a row: no weight changes any more (a "
            "collapsed policy, every trainable parameter frozen, or a loss that no longer depends on the weights); "
            "check training.learning_rate and which parameters are trainable")


def format_log(logs: dict, step: int, max_steps: int | None = None) -> str:
    """One log event as a line: ``step 10/100: loss 0.4123, grad_norm 1.02, learning_rate 0.0005, ...`` (numbers to
    4 significant digits, in the order logged; ``total_flos`` left out)."""
    parts = []
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key} {value}")
    total = f"/{max_steps}" if max_steps and max_steps > 0 else ""
    return f"step {step}{total}: " + ", ".join(parts)


def log_line_callbacks():
    """transformers' progress-bar and printer callbacks with :func:`format_log` lines instead of Python dicts with
    quoted numbers: ``(ProgressCallback subclass, PrinterCallback subclass)``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class LogLineProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(format_log(logs, state.global_step, state.max_steps))

    class LogLinePrinter(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                print(format_log(logs, state.global_step, state.max_steps), flush=True)

    return LogLineProgress, LogLinePrinter


def use_log_lines(trainer) -> None:
    """Swap the trainer's progress / printer callback for the :func:`format_log` ones."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    progress, printer = log_line_callbacks()
    for old, new in ((ProgressCallback, progress), (PrinterCallback, printer)):
        if trainer.pop_callback(old) is not None:
            trainer.add_callback(new)


class HealthMonitor:
    """A ``TrainerCallback`` that collects the logged ``entropy`` and ``grad_norm`` and warns (once each) when the
    policy collapses to uniform or the gradient is dead; ``warnings`` go to the run summary.
    ``watch_gradient=False`` for trainers that diagnose a zero gradient themselves (the RL family)."""

    def __new__(cls, vocab_size: int, watch_gradient: bool = True):
        from transformers import TrainerCallback

        class _Monitor(TrainerCallback):
            def __init__(self):
                self.vocab_size, self.watch_gradient = vocab_size, watch_gradient
                self.entropies: list[float] = []
                self.grad_norms: list[float] = []
                self.warnings: list[str] = []

            def _warn(self, message: str | None) -> None:
                if message and message not in self.warnings:
                    self.warnings.append(message)
                    logger.warning("warning: %s", message)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not state.is_world_process_zero or not logs or any(k.startswith("eval_") for k in logs):
                    return
                if isinstance(logs.get("entropy"), int | float):
                    self.entropies.append(float(logs["entropy"]))
                    if not any(w.startswith("the policy collapsed") for w in self.warnings):
                        self._warn(collapse_message(self.entropies, self.vocab_size))
                if self.watch_gradient and isinstance(logs.get("grad_norm"), int | float):
                    self.grad_norms.append(float(logs["grad_norm"]))
                    if not any(w.startswith("the gradient norm was exactly 0") for w in self.warnings):
                        self._warn(dead_gradient_message(self.grad_norms))

        return _Monitor()
