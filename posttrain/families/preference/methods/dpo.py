"""DPO / cDPO / robust DPO / IPO (Rafailov et al. 2023, arXiv 2305.18290; IPO arXiv 2310.12036).

The method's hyperparameters (the keys next to ``method.name: dpo``), its registration and its pure objective
(docs/methods/dpo.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.families.preference.forward import PREFERENCE_LOSSES, REF_LOGPS, PreferenceForward
from posttrain.registry import MethodInfo, MethodParams, register


class DPOParams(MethodParams):
    """DPO (sigmoid; cDPO with label_smoothing > 0), robust DPO and IPO on summed sequence log-probs."""

    loss: Literal["sigmoid", "ipo", "robust"] = Field("sigmoid", description="sigmoid (DPO/cDPO), ipo or robust.")
    beta: float = Field(0.1, gt=0.0, description="KL strength (tau for IPO).")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="cDPO / robust noise rate eps; applies to sigmoid too (cDPO)."
    )
    ipo_length_normalize: bool = Field(
        True, description="IPO on per-token mean log-ratios (TRL form); false: the reference code's summed form."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs once before training; no reference kept in memory."
    )


register(
    MethodInfo(
        name="dpo",
        doc="docs/methods/dpo.md",
        family="preference",
        summary="Direct Preference Optimisation (sigmoid, cDPO via label_smoothing, robust, IPO).",
        paper="Rafailov et al., Direct Preference Optimization: Your Language Model is Secretly a Reward Model "
        "(arXiv 2305.18290); IPO: Azar et al. (arXiv 2310.12036)",
        recipe="recipes/dpo.yaml",
        params=DPOParams,
        reference="required",
    )
)


def _dpo_terms(p, f: PreferenceForward):
    """Per-pair DPO losses against the reference's summed log-probs, and the DPO metrics."""
    from posttrain.losses.preference import dpo_loss, preference_metrics, sequence_lengths

    gather = f.comm.gather
    out = dpo_loss(
        f.chosen_logps,
        f.rejected_logps,
        f.ref_chosen_logps,
        f.ref_rejected_logps,
        beta=p.beta,
        loss_type=p.loss,
        label_smoothing=p.label_smoothing,
        # IPO's N: completion tokens counted on the unshifted mask, as TRL and docs/methods/dpo.md do (with an empty
        # prompt the first completion token has no scored position but still counts)
        chosen_lengths=sequence_lengths(f.completion_mask.chunk(2, dim=0)[0]),
        rejected_lengths=sequence_lengths(f.completion_mask.chunk(2, dim=0)[1]),
        ipo_length_normalize=p.ipo_length_normalize,
    )
    metrics = preference_metrics(
        gather(out.chosen_rewards), gather(out.rejected_rewards), gather(f.chosen_logps), gather(f.rejected_logps)
    )
    return out, metrics


@PREFERENCE_LOSSES.register("dpo", doc="docs/methods/dpo.md#objective", needs=lambda p: frozenset({REF_LOGPS}))
def dpo_objective(p, f: PreferenceForward):
    """DPO / cDPO / robust DPO / IPO (Rafailov et al. 2023, arXiv 2305.18290; IPO arXiv 2310.12036): the mean of
    :func:`posttrain.losses.preference.dpo_loss` over the pairs."""
    out, metrics = _dpo_terms(p, f)
    return out.losses.mean(), metrics
