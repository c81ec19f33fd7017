"""TOFU unlearning metrics as pure functions over plain tensors / lists (no models).

Definitions follow open-unlearning (``src/evals/metrics/{memorization,privacy,utility}.py``) as summarised in
docs/methods/npo.md#tofu-evaluation-metrics. Benchmark: Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs",
arXiv 2401.06121. The unlearning method itself: Zhang et al., arXiv 2404.05868.

Inputs are per-question average answer losses (``avg_loss = summed answer CE / number of answer tokens``), which
:func:`avg_answer_loss` computes from per-token ``logps``/``mask`` ``[B, T]``. Perturbed / wrong answers come as
``[N, K]`` arrays (K alternatives per question). Outputs are numpy arrays (per question) or Python floats
(aggregates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from scipy.stats import hmean, ks_2samp

__all__ = [
    "MODEL_UTILITY_KEYS",
    "avg_answer_loss",
    "answer_probability",
    "mean_answer_probability",
    "truth_ratios",
    "aggregate_truth_ratio",
    "normalised_probability",
    "rouge_recall",
    "rouge_l_recall",
    "mean_rouge_l_recall",
    "forget_quality",
    "model_utility",
]

# The nine values whose harmonic mean is TOFU's model_utility (open-unlearning names; docs/methods/npo.md#tofu-evaluation-metrics).
MODEL_UTILITY_KEYS: tuple[str, ...] = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
)

ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _reduce_to_1d(x: np.ndarray) -> np.ndarray:
    """open-unlearning ``aggregate_to_1D``: mean over every axis but the first."""
    return x.mean(axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


# ----------------------------------------------------------------------------------------------------------------------
# Probability
# ----------------------------------------------------------------------------------------------------------------------


def avg_answer_loss(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-question ``avg_loss = -sum_t mask_t * logp_t / sum_t mask_t`` (fp32 ``[B]``; count clamped to >= 1).

    docs/methods/npo.md#tofu-evaluation-metrics: the summed answer CE divided by the number of answer tokens.
    """
    m = mask.to(torch.bool)
    s = torch.where(m, logps.float(), torch.zeros((), dtype=torch.float32, device=logps.device)).sum(-1)
    return -s / m.to(torch.float32).sum(-1).clamp(min=1.0)


def answer_probability(avg_losses: ArrayLike) -> np.ndarray:
    """Per-question ``Prob(x, y) = exp(-avg_loss)`` (the length-normalised, i.e. geometric-mean per-token,
    probability of the answer). TOFU "Probability" (arXiv 2401.06121 Sec. 2.5.1)."""
    return np.exp(-_np(avg_losses))


def mean_answer_probability(avg_losses: ArrayLike) -> float:
    """Aggregate ``Q_A_Prob`` (e.g. ``forget_Q_A_Prob``, ``retain_Q_A_Prob``): mean over questions of
    ``exp(-avg_loss)``. Pass ``avg_answer_loss(logps, mask)`` for tensors."""
    return float(np.mean(answer_probability(avg_losses)))


def normalised_probability(correct_avg_loss: ArrayLike, wrong_avg_losses: ArrayLike) -> np.ndarray:
    """Per-question ``p_correct / (p_correct + sum_k p_wrong,k + 1e-10)`` with ``p = exp(-avg_loss)``
    (open-unlearning ``probability_w_options``; TOFU's Prob for real authors / world facts). ``correct_avg_loss`` is
    ``[N]``, ``wrong_avg_losses`` ``[N, K]``. The aggregate ``Q_A_Prob_normalised`` is the mean of this array.

    Worked example (docs/methods/npo.md#how-it-is-tested): correct ``[0.3, 0.9]``, wrong ``[[1.0,1.2,0.8],[0.7,1.5,1.1]]`` give
    ``[0.398456, 0.278633]``.
    """
    correct = np.exp(-_np(correct_avg_loss))
    wrong = np.exp(-_np(wrong_avg_losses))
    if wrong.ndim == 1:
        wrong = wrong[:, None]
    wrong_sum = wrong.sum(axis=tuple(range(1, wrong.ndim)))
    return correct / (correct + wrong_sum + 1e-10)


# ----------------------------------------------------------------------------------------------------------------------
# Truth ratio and forget quality
# ----------------------------------------------------------------------------------------------------------------------


def truth_ratios(paraphrased_avg_loss: ArrayLike, perturbed_avg_losses: ArrayLike) -> np.ndarray:
    """Per-question truth ratio ``TR = exp(-mean_k avg_loss_pert,k) / (exp(-avg_loss_para) + 1e-10)``.

    The geometric-mean probability of the perturbed (wrong) answers over the probability of the paraphrased answer,
    so ``TR = exp(avg_loss_para - mean_k avg_loss_pert,k)`` up to the guard (docs/methods/npo.md#tofu-evaluation-metrics; open-unlearning
    ``truth_ratio``; arXiv 2401.06121 Sec. 2.5.1). Lower means the model prefers the truth; 1 means indifferent.
    ``paraphrased_avg_loss`` is ``[N]``, ``perturbed_avg_losses`` ``[N, K]``.
    """
    para = _reduce_to_1d(_np(paraphrased_avg_loss))
    pert = _reduce_to_1d(_np(perturbed_avg_losses))
    return np.exp(-pert) / (np.exp(-para) + 1e-10)


def aggregate_truth_ratio(
    tr: ArrayLike,
    aggregator: Literal["closer_to_1_better", "true_better", "forget", "retain"] = "closer_to_1_better",
) -> float:
    """Aggregate per-question truth ratios (open-unlearning ``truth_ratio`` aggregators, docs/methods/npo.md#tofu-evaluation-metrics).

    * ``closer_to_1_better`` (alias ``forget``; ``forget_truth_ratio``): ``mean(min(TR, 1/(TR + 1e-10)))``; at most
      1, and 1 iff every TR is 1 (the model cannot tell the truth from the perturbations).
    * ``true_better`` (alias ``retain``; retain / real-authors / world-facts ``Truth_Ratio``): ``mean(max(0, 1 - TR))``.

    Worked example (docs/methods/npo.md#how-it-is-tested): TR ``[0.627089, 1.033895, 0.223130]`` give 0.605812 (forget) and 0.383260 (retain).
    """
    arr = _np(tr)
    if aggregator in ("closer_to_1_better", "forget"):
        return float(np.mean(np.minimum(arr, 1.0 / (arr + 1e-10))))
    if aggregator in ("true_better", "retain"):
        return float(np.mean(np.maximum(0.0, 1.0 - arr)))
    raise ValueError(f"unknown truth-ratio aggregator {aggregator!r}")


def forget_quality(unlearned_tr: ArrayLike, retain_model_tr: ArrayLike | None) -> float | None:
    """TOFU forget quality: the p-value of ``scipy.stats.ks_2samp`` (default method) between the unlearned model's
    per-question forget-split truth ratios and those of a retain model trained without the forget set.

    ``None`` when no retain-model values are given (open-unlearning without ``retain_logs_path``). Raw TR values are
    compared; the KS test is invariant to the ``1/x`` transform of older TOFU code (docs/methods/npo.md#tofu-evaluation-metrics;
    arXiv 2401.06121 Sec. 2.5.2). Higher is better (1.0 for identical distributions).
    """
    if retain_model_tr is None:
        return None
    return float(ks_2samp(_np(unlearned_tr), _np(retain_model_tr)).pvalue)


# ----------------------------------------------------------------------------------------------------------------------
# ROUGE
# ----------------------------------------------------------------------------------------------------------------------

_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        import logging

        from rouge_score import rouge_scorer

        logging.getLogger("absl").setLevel(logging.WARNING)
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    return _SCORER


def rouge_recall(gold: str, generated: str) -> dict[str, float]:
    """``{"rouge1_recall", "rougeL_recall"}`` of a generation against the gold answer, scored by
    ``RougeScorer(["rouge1", "rougeL"], use_stemmer=True)`` with the gold as target (open-unlearning
    ``eval_rouge_recall``; docs/methods/npo.md#tofu-evaluation-metrics)."""
    scores = _scorer().score(gold, generated)
    return {"rouge1_recall": float(scores["rouge1"].recall), "rougeL_recall": float(scores["rougeL"].recall)}


def rouge_l_recall(gold: str, generated: str) -> float:
    """ROUGE-L recall = LCS / number of gold tokens (after rouge_score's tokenisation and Porter stemming).

    Worked example (docs/methods/npo.md#how-it-is-tested): gold "the cat sat on the mat" vs "the cat is on a mat" gives 4/6 = 0.666667.
    """
    return rouge_recall(gold, generated)["rougeL_recall"]


def mean_rouge_l_recall(golds: Sequence[str], generations: Sequence[str]) -> float:
    """Aggregate ``Q_A_ROUGE`` (e.g. ``forget_Q_A_ROUGE``): the mean ROUGE-L recall over questions."""
    if len(golds) != len(generations):
        raise ValueError(f"{len(golds)} gold answers but {len(generations)} generations")
    if not golds:
        raise ValueError("no answers to score")
    return float(np.mean([rouge_l_recall(g, p) for g, p in zip(golds, generations)]))


# ----------------------------------------------------------------------------------------------------------------------
# Model utility
# ----------------------------------------------------------------------------------------------------------------------


def model_utility(values: Mapping[str, float] | Sequence[float]) -> float:
    """TOFU model utility: the harmonic mean (``scipy.stats.hmean``, open-unlearning ``hm_aggregate``) of the retain
    ``Q_A_Prob``, ``Q_A_ROUGE``, ``Truth_Ratio`` and the real-authors / world-facts ``Q_A_Prob_normalised``,
    ``Q_A_ROUGE``, ``Truth_Ratio`` (the nine :data:`MODEL_UTILITY_KEYS`; arXiv 2401.06121 Sec. 2.5.2).

    A mapping must hold exactly the keys to combine (all nine for the TOFU definition; a subset is accepted so that a
    suite without some sets can still report it, by its own choice). Any value 0 gives 0.
    Worked example (docs/methods/npo.md#how-it-is-tested): hmean of ``[0.30,0.52,0.61,0.25,0.70,0.55,0.40,0.82,0.58]`` = 0.459508.
    """
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    arr = _np(vals)
    if arr.size == 0:
        raise ValueError("model_utility needs at least one value")
    if np.any(arr < 0):
        raise ValueError("model_utility is a harmonic mean of non-negative values")
    if np.any(arr == 0):
        return 0.0
    return float(hmean(arr))
