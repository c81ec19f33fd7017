"""The retain-KL term of NPO+KL (docs/methods/npo.md#objectives)."""

from posttrain.families.unlearning.objective import RETAIN_KL, RETAIN_TERMS


@RETAIN_TERMS.register("kl", doc="docs/methods/npo.md#objectives", needs=frozenset({RETAIN_KL}))
def retain_kl_term(num_items, *, logits, ref_logits, kl_mask, token_kl, **unused):
    """KL(pi_ref || pi_theta) on the retain set (NPO+KL, arXiv 2404.05868): from the per-position KL ``token_kl``
    (:func:`posttrain.losses.unlearning.retain_token_kl_loss`, the log-prob engine's tiled KL, no ``[B, T, V]``
    tensor), or from full logits (:func:`posttrain.losses.unlearning.retain_kl_loss`); ``kl_mask`` None: every
    position."""
    from posttrain.losses.unlearning import retain_kl_loss, retain_token_kl_loss

    if token_kl is not None:
        loss = retain_token_kl_loss(token_kl, kl_mask, num_items)
    else:
        loss = retain_kl_loss(logits, ref_logits, kl_mask, num_items)
    return loss, {"retain_kl": float(loss.detach())}
