"""The retain-NLL term of GradDiff, NPO+RT and SimNPO (docs/methods/grad_diff.md#objective)."""

from posttrain.families.unlearning.objective import RETAIN_LOGPS, RETAIN_TERMS


@RETAIN_TERMS.register("nll", doc="docs/methods/grad_diff.md#objective", needs=frozenset({RETAIN_LOGPS}))
def retain_nll_term(num_items, *, logps, mask, **unused):
    """Token-mean NLL of the retain set (GradDiff, Liu et al., arXiv 2203.12817):
    :func:`posttrain.losses.unlearning.retain_nll_loss`."""
    from posttrain.losses.unlearning import retain_nll_loss

    loss = retain_nll_loss(logps, mask, num_items)
    return loss, {"retain_nll": float(loss.detach())}
