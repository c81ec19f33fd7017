"""SFT-family losses against the worked numbers in docs/methods/asft_anchored.md#how-it-is-tested, docs/methods/dft.md#how-it-is-tested, docs/methods/poft.md#how-it-is-tested."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses.sft import asft_anchored_loss, dft_loss, dft_token_loss, nll_loss, poft_loss, token_kl

# worked example of docs/methods/asft_anchored.md#how-it-is-tested: one sequence, vocab 3, labels y = [0, 1, 2]
POLICY_LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 2.0], [0.0, 0.0, 0.0]])
ANCHOR_LOGITS = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, -1.0]])
LABELS = torch.tensor([0, 1, 2])


def _logps(logits):
    return F.log_softmax(logits, -1).gather(-1, LABELS[:, None])[:, 0]


def test_token_logps_and_sft():
    logp = _logps(POLICY_LOGITS)
    torch.testing.assert_close(logp, torch.tensor([-0.407606, -1.868981, -1.098612]), atol=1e-6, rtol=0)
    torch.testing.assert_close(logp.exp(), torch.tensor([0.665241, 0.154281, 0.333333]), atol=1e-6, rtol=0)
    mask = torch.ones(1, 3)
    assert nll_loss(logp[None], mask).item() == pytest.approx(1.125066, abs=1e-6)


def test_dft_values_and_gradient():
    logp = _logps(POLICY_LOGITS).clone().requires_grad_(True)
    torch.testing.assert_close(dft_token_loss(logp), torch.tensor([0.271156, 0.288348, 0.366204]), atol=1e-6, rtol=0)
    loss = dft_loss(logp[None], torch.ones(1, 3))
    assert loss.item() == pytest.approx(0.308569, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -logp.detach().exp() / 3, atol=1e-7, rtol=0)


def test_dft_gradient_wrt_logits_is_ce_gradient_scaled_by_p():
    logits = POLICY_LOGITS.clone().requires_grad_(True)
    logp = F.log_softmax(logits, -1).gather(-1, LABELS[:, None])[:, 0]
    dft_loss(logp[None], torch.ones(1, 3)).backward()
    p = logp.detach().exp()
    expected = -p[:, None] * (F.one_hot(LABELS, 3) - F.softmax(POLICY_LOGITS, -1)) / 3
    torch.testing.assert_close(logits.grad, expected, atol=1e-7, rtol=0)


def test_dft_bounds():
    p = torch.linspace(1e-4, 1 - 1e-4, 1001)
    values = dft_token_loss(p.log())
    assert (values <= -p.log() + 1e-7).all()  # DFT <= CE token by token
    assert values.max().item() == pytest.approx(1 / math.e, abs=1e-6)  # max 1/e at p = 1/e
    assert dft_token_loss(torch.tensor([math.log(1 / math.e)])).item() == pytest.approx(0.367879, abs=1e-6)


def test_token_kl_both_directions():
    kl_b = token_kl(POLICY_LOGITS, ANCHOR_LOGITS, "base_to_policy")
    kl_p = token_kl(POLICY_LOGITS, ANCHOR_LOGITS, "policy_to_base")
    torch.testing.assert_close(kl_b, torch.tensor([0.123292, 0.029478, 0.266217]), atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_p, torch.tensor([0.119630, 0.028183, 0.308994]), atol=1e-6, rtol=0)
    assert kl_b.mean().item() == pytest.approx(0.139662, abs=1e-6)
    assert kl_p.mean().item() == pytest.approx(0.152269, abs=1e-6)


@pytest.mark.parametrize(
    "direction,lam,expected",
    [("base_to_policy", 0.05, 0.315552), ("base_to_policy", 0.1, 0.322536),
     ("policy_to_base", 0.05, 0.316183), ("policy_to_base", 0.1, 0.323796)],
)
def test_asft_worked_example(direction, lam, expected):
    logp = _logps(POLICY_LOGITS)[None]
    kl = token_kl(POLICY_LOGITS, ANCHOR_LOGITS, direction)[None]
    assert asft_anchored_loss(logp, kl, torch.ones(1, 3), lam).item() == pytest.approx(expected, abs=1e-6)


def test_asft_lambda_zero_is_dft_and_kl_gradient():
    logits = POLICY_LOGITS.clone().requires_grad_(True)
    logp = F.log_softmax(logits, -1).gather(-1, LABELS[:, None])[:, 0][None]
    kl = token_kl(logits, ANCHOR_LOGITS)[None]
    mask = torch.ones(1, 3)
    assert asft_anchored_loss(logp, kl, mask, 0.0).item() == pytest.approx(dft_loss(logp, mask).item(), abs=1e-7)
    # gradient of the KL term alone w.r.t. logits = softmax(z) - pi_base (base_to_policy), per token
    (kl * mask).sum().backward()
    torch.testing.assert_close(logits.grad, F.softmax(POLICY_LOGITS, -1) - F.softmax(ANCHOR_LOGITS, -1), atol=1e-6, rtol=0)


def test_asft_identical_anchor_has_zero_kl_and_masks_ignored():
    kl = token_kl(POLICY_LOGITS, POLICY_LOGITS)
    torch.testing.assert_close(kl, torch.zeros(3), atol=1e-7, rtol=0)
    # masked positions contribute nothing to either term or the denominator
    logp = torch.tensor([[-0.5, -9.0, -1.0]])
    kl = torch.tensor([[0.1, 5.0, 0.2]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    full = asft_anchored_loss(logp[:, [0, 2]], kl[:, [0, 2]], torch.ones(1, 2), 0.1)
    assert asft_anchored_loss(logp, kl, mask, 0.1).item() == pytest.approx(full.item(), abs=1e-7)


def test_num_items_in_batch_denominator():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    assert nll_loss(logp, mask, num_items=6).item() == pytest.approx(0.5)
    assert dft_loss(logp, mask, num_items=6).item() == pytest.approx(
        (math.exp(-1) * 1 + math.exp(-2) * 2) / 6, abs=1e-7
    )


# worked example of docs/methods/poft.md#how-it-is-tested (B = 2, M = 3, beta = 1, gamma = 0)
def _poft_batch():
    logps = torch.tensor([[-0.5, -1.5, -1.0], [-2.0, -3.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([[-0.8, -1.2, -0.7], [-2.0, -2.4, -1.9]])
    return logps, mask, scores


def test_poft_worked_example():
    logps, mask, scores = _poft_batch()
    out = poft_loss(logps, mask, scores)
    torch.testing.assert_close(out.reward_target, torch.tensor([-1.0, -2.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.reward_aligned, torch.tensor([-0.9, -2.1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.losses, torch.tensor([0.744397, 0.913015]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.tau, torch.tensor([0.524979, 0.598688]), atol=1e-6, rtol=0)
    assert out.loss.item() == pytest.approx(0.828706, abs=1e-6)
    out.loss.backward()
    expected = torch.tensor([[-0.087497] * 3, [-0.149672, -0.149672, 0.0]])
    torch.testing.assert_close(logps.grad, expected, atol=1e-6, rtol=0)


def test_poft_properties():
    logps, mask, scores = _poft_batch()
    # r_theta == rbar gives log 2 and tau = 0.5
    out = poft_loss(logps, mask, torch.tensor([-1.0, -2.5]))
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2)), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.tau, torch.full((2,), 0.5), atol=1e-6, rtol=0)
    # invariant to the order of aligned LLMs; M = 1 works; shift invariance
    a = poft_loss(logps, mask, scores).loss
    b = poft_loss(logps, mask, scores.flip(-1)).loss
    assert a.item() == pytest.approx(b.item(), abs=1e-7)
    single = poft_loss(logps, mask, scores.mean(-1, keepdim=True)).loss
    assert single.item() == pytest.approx(a.item(), abs=1e-6)
    shifted = poft_loss(logps + 0.7 * mask, mask, scores + 0.7).loss
    assert shifted.item() == pytest.approx(a.item(), abs=1e-6)
    # tau -> 1 (CE gradient) as rbar - r_theta -> inf, -> 0 as it -> -inf
    assert poft_loss(logps, mask, torch.tensor([50.0, 50.0])).tau.min().item() == pytest.approx(1.0, abs=1e-6)
    assert poft_loss(logps, mask, torch.tensor([-50.0, -50.0])).tau.max().item() == pytest.approx(0.0, abs=1e-6)
    # no gradient reaches the aligned scores
    s = scores.clone().requires_grad_(True)
    poft_loss(logps, mask, s).loss.backward()
    assert s.grad is None
