"""The gradient-ascent forget term (docs/methods/ga.md#objective)."""

from posttrain.families.unlearning.objective import FORGET_LOGPS, FORGET_TERMS


@FORGET_TERMS.register("ga", doc="docs/methods/ga.md#objective", needs=frozenset({FORGET_LOGPS}))
def ga_term(logps, mask, ref_logps, num_items, *, beta, delta):
    """Gradient ascent (the unlearning baseline; NPO paper, arXiv 2404.05868):
    :func:`posttrain.losses.unlearning.ga_loss`."""
    from posttrain.losses.unlearning import ga_loss

    return ga_loss(logps, mask, num_items), {}
