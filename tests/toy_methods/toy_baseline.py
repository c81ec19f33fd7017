"""A toy GRPO advantage in one file, as docs/contributing.md adds one: its options model, its pure function and its
registration. REINFORCE with a fixed baseline, ``A_i = r_i - b`` (Williams 1992; the baseline GRPO replaces with the
group mean, arXiv 2402.03300). tests/test_add_a_method.py loads this file and trains it."""

from __future__ import annotations

from pydantic import Field

from posttrain.families.rl.parts import ADVANTAGES, PartOptions


class ToyBaselineOptions(PartOptions):
    toy_baseline: float = Field(0.5, description="toy_baseline: the reward subtracted from every row's reward.")


@ADVANTAGES.register("toy_baseline", doc="docs/contributing.md", options_model=ToyBaselineOptions,
                     refuses={"scale_rewards": "uses a fixed baseline, no std scaling"})
def toy_baseline_advantage(rewards, groups, opts):
    """REINFORCE with a fixed baseline (Williams 1992; GRPO's group mean instead, arXiv 2402.03300): ``A_i = r_i -
    toy_baseline``, every row kept; the groups are unused."""
    from posttrain.families.rl.common import keep_all

    return keep_all(rewards - opts.toy_baseline)
