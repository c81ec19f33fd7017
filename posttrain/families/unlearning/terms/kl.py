"""The retain-KL term of NPO+KL (docs/methods/npo.md#objectives)."""

from posttrain.families.unlearning.objective import RETAIN_TERMS


@RETAIN_TERMS.register("kl", doc="docs/methods/npo.md#objectives", uses_reference=True, full_vocab=True,
                       inputs=("logits", "ref_logits"))
def retain_kl_term(num_items, *, logits, ref_logits, kl_mask, **unused):
    """KL(pi_ref || pi_theta) on the retain set (NPO+KL, arXiv 2404.05868):
    :func:`posttrain.losses.unlearning.retain_kl_loss` (``kl_mask`` None: every position)."""
    from posttrain.losses.unlearning import retain_kl_loss

    loss = retain_kl_loss(logits, ref_logits, kl_mask, num_items)
    return loss, {"retain_kl": float(loss.detach())}
