"""The RL family's parts called as the trainer calls them, through their registries with the one signature of each
kind, the options given as recipe keys (a ``GRPOParams``), for the worked examples of the tests in this folder."""

from __future__ import annotations

import torch

from posttrain.families.rl.aggregations.delta_l import delta_l_weights
from posttrain.families.rl.common import Groups, Normalizer
from posttrain.families.rl.parts import ADVANTAGES, AGGREGATIONS, CLIPPINGS
from posttrain.methods import GRPOParams


def estimate(name, rewards, size, *, strata=None, lengths=None, **keys):
    """``ADVANTAGES[name].fn(rewards, Groups, params)``."""
    groups = Groups(size, strata=None if strata is None else torch.as_tensor(strata), lengths=lengths)
    return ADVANTAGES[name].fn(torch.as_tensor(rewards), groups, GRPOParams(advantage=name, **keys))


def aggregate(name, per_token, mask, **normalizer):
    """``AGGREGATIONS[name].fn(per_token, mask, Normalizer(**normalizer))``."""
    return AGGREGATIONS[name].fn(per_token, mask, Normalizer(**normalizer))


def clip(name, logps, old, advantages, mask=None, **keys):
    """``CLIPPINGS[name].fn(logps, old, advantages, mask, params)`` (mask: every token, unless given)."""
    mask = torch.ones_like(logps) if mask is None else mask
    return CLIPPINGS[name].fn(logps, old, advantages, mask, GRPOParams(clipping=name, **keys))


# Shorthands with the worked examples' arguments.


def group(r, size, scale_rewards="group"):
    return estimate("group", r, size, scale_rewards=scale_rewards).advantages


def stratified(r, size, strata, alpha=0.8, scale="stratum", scope="group", eps=1e-4):
    return estimate("stratified", r, size, strata=strata, san_alpha=float(alpha), san_scale=scale, san_scope=scope,
                    san_eps=float(eps)).advantages


def psr(r, correct_value=1.0):
    return tuple(estimate("psr", r, 1, correct_reward=correct_value))


def nsr(r):
    return tuple(estimate("nsr", r, 1))


def w_reinforce(r, lam=0.1):
    return tuple(estimate("w_reinforce", r, 1, w_reinforce_lambda=float(lam)))


def rloo(r, size, normalize=False):
    return estimate("rloo", r, size, rloo_normalize_advantages=normalize).advantages


def reinforce_pp(r, size, lengths=None, baseline=True):
    return estimate("reinforce_pp", r, size, lengths=lengths, reinforce_pp_baseline=baseline).advantages


def grpo(per_token, mask, **normalizer):
    return aggregate("grpo", per_token, mask, **normalizer)


def bnpo(per_token, mask, **normalizer):
    return aggregate("bnpo", per_token, mask, **normalizer)


def dapo(per_token, mask, **normalizer):
    return aggregate("dapo", per_token, mask, **normalizer)


def dr_grpo(per_token, mask, max_completion_length, **normalizer):
    return aggregate("dr_grpo", per_token, mask, max_completion_length=max_completion_length, **normalizer)


def delta_l(per_token, mask, max_completion_length, alpha=0.75, weights=None, **normalizer):
    """ΔL with the weights of this micro-batch's rows (``alpha``) unless given."""
    weights = delta_l_weights(mask, alpha=alpha) if weights is None else weights
    return aggregate("delta_l", per_token, mask, max_completion_length=max_completion_length, row_weights=weights,
                     **normalizer)


def _floats(**keys):
    return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in keys.items()
            if v is not None}


def ppo_clip(logps, old, advantages, epsilon=0.2, epsilon_high=None, dual_clip_c=None):
    return clip("ppo", logps, old, advantages, **_floats(epsilon=epsilon, epsilon_high=epsilon_high,
                                                          dual_clip_c=dual_clip_c))


def gppo_clip(logps, old, advantages, epsilon=0.2, epsilon_high=0.28, beta1=1.0, beta2=1.0, only_high=False,
              dual_clip_c=None):
    return clip("gppo", logps, old, advantages, gppo_only_high=only_high,
                **_floats(epsilon=epsilon, epsilon_high=epsilon_high, gppo_beta1=beta1, gppo_beta2=beta2,
                          dual_clip_c=dual_clip_c))


def gspo_clip(logps, old, advantages, mask, epsilon=3e-4, epsilon_high=4e-4, dual_clip_c=None):
    return clip("gspo", logps, old, advantages, mask, **_floats(epsilon=epsilon, epsilon_high=epsilon_high,
                                                                dual_clip_c=dual_clip_c))


def cispo_clip(logps, old, advantages, weight_max=5.0, weight_min=None):
    return clip("cispo", logps, old, advantages, **_floats(cispo_weight_max=weight_max, cispo_weight_min=weight_min))
