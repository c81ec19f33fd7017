"""The ``method.loss`` entries as pure functions of the training forward (posttrain/families/rl/forward.py,
policy_losses/): the GRPO surrogate on hand-computed values (docs/methods/grpo.md), what each entry declares it needs,
and PACS through the same record."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.families.rl.common import Normalizer, RowTargets
from posttrain.families.rl.forward import CORRECT, ENTROPY, REF_LOGPS, ROWS, RLForward
from posttrain.families.rl.parts import POLICY_LOSSES
from posttrain.methods import GRPOParams

LOG_HALF, LOG_QUARTER = math.log(0.5), math.log(0.25)
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # 3 tokens: row 0 both, row 1 the first


def _fwd(logps, old=None, *, ga=1, **fields):
    return RLForward(logps=logps, old_logps=logps.detach() if old is None else old, mask=MASK,
                     advantages=torch.tensor([1.0, -1.0]), normalizer=fields.pop("normalizer", Normalizer()),
                     accumulation_steps=ga, gather=lambda t: t, **fields)


def _logps():
    return torch.full((2, 2), LOG_HALF, dtype=torch.float64, requires_grad=True)


def test_surrogate_with_kl_entropy_and_sft_terms_by_hand():
    """On-policy dapo over 3 tokens, A = [1, -1], beta 0.5 with ref = log 0.25 where logp = log 0.5 (k3 = 0.5 + log 2
    - 1 per token), entropy bonus 0.1 on entropies [1, 2, 3], GPPO's SFT term 0.5 on the correct row 0."""
    p = GRPOParams(aggregation="dapo", clipping="gppo", beta=0.5, entropy_coef=0.1, sft_coef=0.5)
    assert POLICY_LOSSES["grpo"].needs(p) == {REF_LOGPS, ENTROPY, CORRECT}
    logps = _logps()
    entropy = torch.tensor([[1.0, 2.0], [3.0, 9.0]], dtype=torch.float64, requires_grad=True)
    loss, metrics = POLICY_LOSSES[p.loss].fn(
        _fwd(logps, ref_logps=torch.full((2, 2), LOG_QUARTER, dtype=torch.float64), entropy=entropy,
             correct=torch.tensor([1.0, 0.0]), num_correct_tokens=2.0), p)
    k3 = 0.5 + math.log(2) - 1
    surrogate = (-1 - 1 + 1 + 3 * 0.5 * k3) / 3
    sft = 0.5 * -(2 * LOG_HALF) / 2
    assert loss.item() == pytest.approx(surrogate + sft - 0.1 * (1 + 2 + 3) / 3, rel=1e-12)
    assert metrics["policy_loss"].item() == pytest.approx(surrogate, rel=1e-12)
    assert metrics["gppo/sft_loss"].item() == pytest.approx(sft, rel=1e-12)
    kl = metrics["kl"]
    assert (kl.total / kl.count).item() == pytest.approx(k3, rel=1e-6)  # token means are kept in fp32
    assert metrics["ppo_kl"].total.item() == 0 and metrics["clip_ratio/high_max"].item() == 0
    loss.backward()
    # d/dlogp: -A / 3 (ratio 1) + beta (1 - exp(ref - logp)) / 3 = 0.25 / 3, minus 0.5 / 2 on row 0 (SFT)
    expected = torch.tensor([[(-1 + 0.25) / 3 - 0.25, (-1 + 0.25) / 3 - 0.25], [(1 + 0.25) / 3, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(logps.grad, expected)
    torch.testing.assert_close(entropy.grad, -0.1 * MASK.double() / 3)


def test_surrogate_clips_and_reports_the_clipped_tokens():
    """Off-policy ppo: ratio 1.5 on every token; A = 1 is clipped at 1 + eps = 1.2 (no gradient there), A = -1 takes
    the unclipped -ratio * A; dapo over 3 tokens."""
    p = GRPOParams(aggregation="dapo", epsilon=0.2, epsilon_high=0.2)
    assert POLICY_LOSSES["grpo"].needs(p) == frozenset()
    logps = _logps()
    old = torch.full((2, 2), LOG_HALF - math.log(1.5), dtype=torch.float64)
    loss, metrics = POLICY_LOSSES["grpo"].fn(_fwd(logps, old), p)
    assert loss.item() == pytest.approx((-1.2 - 1.2 + 1.5) / 3, rel=1e-12)
    high = metrics["clip_ratio/high_mean"]
    assert (high.total / high.count).item() == pytest.approx(2 / 3)
    assert metrics["clip_ratio/high_max"].item() == 1.0 and metrics["clip_ratio/low_min"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0], [1.5 / 3, 0.0]], dtype=torch.float64))


def test_a_micro_batch_mean_is_its_share_of_the_accumulated_batch():
    """bnpo (a mean over the micro-batch alone) is divided by the accumulation steps; dapo's global normaliser is not,
    and ``policy_loss`` is logged at the full-batch scale either way."""
    p = GRPOParams(aggregation="bnpo")
    loss, metrics = POLICY_LOSSES["grpo"].fn(_fwd(_logps(), ga=4), p)
    assert loss.item() == pytest.approx((-1 - 1 + 1) / 3 / 4, rel=1e-12)
    assert metrics["policy_loss"].item() == pytest.approx(-1 / 3, rel=1e-12)
    p = GRPOParams(aggregation="dapo")
    loss, _ = POLICY_LOSSES["grpo"].fn(_fwd(_logps(), ga=4, normalizer=Normalizer(num_items_in_batch=12.0)), p)
    assert loss.item() == pytest.approx(-1 / 12, rel=1e-12)


def test_pacs_reads_its_rows_from_the_record():
    """PACS declares the rows need; through the record it is pacs_loss (on-policy, unit weights: log 2)."""
    from posttrain.families.rl.policy_losses.pacs import pacs_loss

    p = GRPOParams(loss="pacs", pacs_weight="none")
    assert POLICY_LOSSES["pacs"].needs(p) == {ROWS}
    logps = _logps()
    rows = RowTargets(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    loss, metrics = POLICY_LOSSES["pacs"].fn(_fwd(logps, rows=rows), p)
    expected = pacs_loss(logps, logps.detach(), MASK, rows.labels, rows.groups, weight="none")
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-12) == pytest.approx(math.log(2), rel=1e-12)
    assert metrics["policy_loss"].item() == pytest.approx(math.log(2), rel=1e-12)
