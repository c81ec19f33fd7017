"""The SFT family's registered objectives: pure ``fn(params, fwd)`` over an ``SFTForward`` (no trainer), against
hand-computed values, and the needs each entry declares (docs/methods/sft.md, dft.md, asft_anchored.md, poft.md)."""

import math

import pytest
import torch

from posttrain.families.sft.forward import ALIGNED_SCORES, ANCHOR_KL, SFT_LOSSES, SFT_NEEDS, SFTForward
from posttrain.methods import METHODS

# two rows; row 0 scores tokens with log-probs -1 and -2, row 1 one token with -0.5 (its second position is padding)
LOGPS = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
MASK = torch.tensor([[1, 1], [1, 0]])


def _objective(name, fwd, **params):
    return SFT_LOSSES[name].fn(METHODS[name].params(**params), fwd)


def test_every_sft_method_has_an_objective_declaring_known_needs():
    assert {n for n, i in METHODS.items() if i.family == "sft"} == set(SFT_LOSSES.names())
    for entry in SFT_LOSSES:
        assert entry.needs(METHODS[entry.name].params()) <= SFT_NEEDS
    assert SFT_LOSSES["sft"].needs(METHODS["sft"].params()) == frozenset()
    assert SFT_LOSSES["asft_anchored"].needs(METHODS["asft_anchored"].params()) == {ANCHOR_KL}
    assert SFT_LOSSES["poft"].needs(METHODS["poft"].params()) == {ALIGNED_SCORES}
    assert not SFT_LOSSES["poft"].token_sum_loss and SFT_LOSSES["sft"].token_sum_loss


def test_sft_objective_is_the_token_mean_nll():
    loss, metrics = _objective("sft", SFTForward(LOGPS, MASK, None))
    assert loss.item() == pytest.approx(3.5 / 3) and metrics == {}  # (1 + 2 + 0.5) / 3 label tokens
    loss, _ = _objective("sft", SFTForward(LOGPS, MASK, 7))  # num_items: the accumulated step's label count
    assert loss.item() == pytest.approx(3.5 / 7)


def test_dft_objective_weights_each_token_by_its_probability():
    loss, metrics = _objective("dft", SFTForward(LOGPS, MASK, None))
    expected = (math.exp(-1) * 1 + math.exp(-2) * 2 + math.exp(-0.5) * 0.5) / 3  # -sg(p) log p, token mean
    assert loss.item() == pytest.approx(expected, abs=1e-6)  # 0.313938
    assert float(metrics["nll"]) == pytest.approx(3.5 / 3)


def test_asft_anchored_objective_adds_the_anchor_kl():
    kl = torch.tensor([[0.1, 0.3], [0.2, 50.0]])  # the padding position's KL does not count
    loss, metrics = _objective("asft_anchored", SFTForward(LOGPS, MASK, None, anchor_kl=kl), asft_kl_coef=0.5)
    dft = (math.exp(-1) * 1 + math.exp(-2) * 2 + math.exp(-0.5) * 0.5) / 3
    assert loss.item() == pytest.approx(dft + 0.5 * (0.1 + 0.3 + 0.2) / 3, abs=1e-6)  # 0.413938
    assert float(metrics["kl"]) == pytest.approx(0.2) and float(metrics["dft_loss"]) == pytest.approx(dft, abs=1e-6)
    zero, _ = _objective("asft_anchored", SFTForward(LOGPS, MASK, None, anchor_kl=kl), asft_kl_coef=0.0)
    assert zero.item() == pytest.approx(dft, abs=1e-6)  # lambda 0 is DFT


def test_poft_objective_is_bradley_terry_against_the_aligned_scores():
    scores = torch.tensor([-2.0, 0.0])  # row means: -1.5 and -0.5
    loss, metrics = _objective("poft", SFTForward(LOGPS, MASK, None, aligned_scores=scores), poft_beta=2.0)
    # -logsigmoid(2 * (-1.5 + 2)) = softplus(-1) and -logsigmoid(2 * (-0.5 - 0)) = softplus(1), averaged over rows
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2  # 0.813262
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert float(metrics["poft/accuracy"]) == 0.5 and float(metrics["poft/margin"]) == pytest.approx(0.0)
