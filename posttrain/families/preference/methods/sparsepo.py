"""SparsePO: token-masked rewards and KL (Christopoulou et al. 2024, arXiv 2410.05102).

The method's hyperparameters (the keys next to ``method.name: sparsepo``), its registration and its pure objective
(docs/methods/sparsepo.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.families.preference.forward import PREFERENCE_LOSSES, TOKEN_KL, PreferenceForward
from posttrain.registry import MethodInfo, MethodParams, register


class SparsePOParams(MethodParams):
    """SparsePO: token-masked rewards and KL; masks from reference activations (MaPO) or learned."""

    mask: Literal["reference", "learned"] = Field(
        "learned", description="learned: a small trainable mask network; reference: MaPO activation mask."
    )
    beta: float = Field(0.1, gt=0.0, description="KL strength beta of the masked rewards.")
    mask_on_reward: bool = Field(True, description="Weight the token log-ratios by the reward mask (else 1).")
    mask_on_kl: bool = Field(True, description="Weight the token KLs by the KL mask (else 1).")
    rw_kl_independent: bool = Field(False, description="Separate reward and KL mask networks (learned mask only).")
    l1_norm_param_u: float = Field(0.0, ge=0.0, description="L1 weight on the reward mask.")
    l1_norm_param_d: float = Field(0.0, ge=0.0, description="L1 weight on the KL mask.")
    mask_dropout: float = Field(0.01, ge=0.0, lt=1.0, description="Dropout inside the learned mask network.")
    mask_weight_decay: float = Field(0.01, ge=0.0, description="Weight decay of the mask network's parameters.")

    @property
    def needs_hidden_states(self) -> bool:  # token KL and masks from hidden states
        return True

    @property
    def learned_mask(self) -> bool:
        return self.mask == "learned"

    @model_validator(mode="after")
    def _check(self):
        if self.mask == "reference" and self.rw_kl_independent:
            raise ValueError("rw_kl_independent: true needs mask: learned (the MaPO mask is a single common mask)")
        return self


register(
    MethodInfo(
        name="sparsepo",
        doc="docs/methods/sparsepo.md",
        family="preference",
        summary="SparsePO: token-level masked rewards and KL, masks learned or from reference activations.",
        paper="Christopoulou et al., SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks "
        "(arXiv 2410.05102)",
        recipe="recipes/sparsepo.yaml",
        params=SparsePOParams,
        reference="required",
    )
)


@PREFERENCE_LOSSES.register("sparsepo", doc="docs/methods/sparsepo.md#objective",
                            needs=lambda p: frozenset({TOKEN_KL}))
def sparsepo_objective(p, f: PreferenceForward):
    """SparsePO (Christopoulou et al. 2024, arXiv 2410.05102): token-masked rewards and KL against the reference
    (:func:`posttrain.losses.preference.sparsepo_loss`); the masks and the token KL are forward-pass needs."""
    import torch
    
    from posttrain.distributed import TokenMean
    from posttrain.losses.preference import sequence_logps, sparsepo_loss, sparsepo_metrics

    mask = f.mask
    sel = mask.bool()
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    logratios = torch.where(sel, f.logps.float() - f.ref_token_logps, zeros)
    masks = f.token_masks
    common = "common" in masks
    reward_mask = masks["common"] if common else masks["reward"]
    kl_mask = None if common else masks["kl"]
    if not p.mask_on_reward:
        reward_mask = None
    if not p.mask_on_kl:
        kl_mask = None
    elif common and reward_mask is None:  # common mask used on the KL only
        kl_mask = masks["common"]
    use_common = common and reward_mask is not None and p.mask_on_kl

    def split(t):
        return (None, None) if t is None else t.chunk(2, dim=0)

    lr_c, lr_r = logratios.chunk(2, dim=0)
    kl_c, kl_r = f.token_kl.chunk(2, dim=0)
    m_c, m_r = mask.chunk(2, dim=0)
    ru_c, ru_r = split(reward_mask)
    kd_c, kd_r = (None, None) if use_common else split(kl_mask)
    out = sparsepo_loss(
        lr_c, lr_r, kl_c, kl_r, m_c, m_r, ru_c, ru_r, kd_c, kd_r,
        beta=p.beta, l1_reward=p.l1_norm_param_u, l1_kl=p.l1_norm_param_d, common_mask=use_common,
    )
    loss = out.losses.mean()
    chosen_logps, rejected_logps = sequence_logps(f.logps, mask).chunk(2, dim=0)
    if use_common:
        kd_c, kd_r = ru_c, ru_r
    metrics = sparsepo_metrics(out, chosen_logps, rejected_logps, kl_c, kl_r, m_c, m_r, ru_c, ru_r, kd_c, kd_r)
    # mask density: share of completion tokens whose (reward, else KL) mask is non-zero, and its mean value
    shown = reward_mask if reward_mask is not None else kl_mask
    if shown is not None:
        metrics["sparsepo/mask_density"] = TokenMean.of((shown != 0).float(), sel)
        metrics["sparsepo/mask_mean"] = TokenMean.of(shown, sel)
    return loss, metrics
