"""The SimNPO forget term (docs/methods/simnpo.md#objective)."""

from posttrain.families.unlearning.objective import FORGET_LOGPS, FORGET_TERMS


@FORGET_TERMS.register("simnpo", doc="docs/methods/simnpo.md#objective", needs=frozenset({FORGET_LOGPS}))
def simnpo_term(logps, mask, ref_logps, num_items, *, beta, delta):
    """SimNPO (Fan et al. 2024, arXiv 2410.07163): the mean of :func:`posttrain.losses.unlearning.simnpo_loss`,
    reference-free."""
    from posttrain.losses.unlearning import simnpo_loss

    out = simnpo_loss(logps, mask, beta=beta, delta=delta)
    return out.losses.mean(), {"simnpo/avg_nll_mean": float(out.avg_nll.mean()),
                               "simnpo/weight_mean": float(out.weights.mean())}
