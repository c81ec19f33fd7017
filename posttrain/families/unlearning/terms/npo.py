"""The NPO forget term (docs/methods/npo.md#objectives)."""

from posttrain.families.unlearning.objective import FORGET_LOGPS, FORGET_REF_LOGPS, FORGET_TERMS


@FORGET_TERMS.register("npo", doc="docs/methods/npo.md#objectives", needs=frozenset({FORGET_LOGPS, FORGET_REF_LOGPS}))
def npo_term(logps, mask, ref_logps, num_items, *, beta, delta):
    """NPO (Zhang et al. 2024, arXiv 2404.05868): the mean of :func:`posttrain.losses.unlearning.npo_loss` over the
    forget sequences."""
    from posttrain.losses.unlearning import npo_loss

    out = npo_loss(logps, ref_logps, beta=beta, mask=mask)
    return out.losses.mean(), {"npo/log_ratio_mean": float(out.log_ratios.mean()),
                               "npo/weight_mean": float(out.weights.mean())}
