"""Stable-SPAM (posttrain/optim/stable_spam.py; docs/methods/stable_spam.md): hand-computed worked example, the
reference-code quirks, AdamW equivalence, scale invariance, state_dict round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.optim.stable_spam import StableSPAM, cosine_factor

P0 = [0.5, -0.3, 0.1, 0.2]
GRADS = [
    [0.10, -0.20, 0.05, 0.00],
    [0.12, -0.18, 0.04, 0.01],
    [3.00, -0.20, 0.05, 0.02],  # a spike
    [0.10, -0.22, 0.06, 0.00],
]
HP = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma1=0.7, gamma2=0.9, theta=0.999)


def _run(grads, dtype=torch.float64, **kw):
    p = torch.nn.Parameter(torch.tensor(P0, dtype=dtype))
    opt = StableSPAM([p], **{**HP, **kw})
    out, seen = [], []
    for g in grads:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        out.append(p.detach().clone())
        seen.append(p.grad.detach().clone())
    return out, opt, p, seen


def _close(actual, expected, rel=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, rtol=0, atol=rel * max(1.0, float(expected.abs().max()))), (actual, expected)


def test_worked_example_default_mode():
    out, opt, p, _ = _run(GRADS, update_proj_gap=3)
    _close(out[0], [0.49, -0.29, 0.09, 0.2])
    _close(out[1], [0.480003, -0.280024, 0.080091, 0.192559])
    _close(out[2], [0.470003, -0.270024, 0.070091, 0.182559])
    _close(out[3], [0.461183, -0.261294, 0.061451, 0.175858])
    # the MoRet step (t = 3) moves every coordinate by exactly lr * sign(g) (eps aside)
    step3 = out[1] - out[2]
    _close(step3, [0.01, -0.01, 0.01, 0.01], rel=1e-6)


def test_worked_example_thresholds_and_scales():
    """T-hat and c of the table, computed step by step with the same statistics the optimizer keeps."""
    _, opt, p, _ = _run(GRADS[:1], update_proj_gap=3)
    state = opt.state[p]
    assert float(state["max_ema"]) / (1 - 0.999) == pytest.approx(0.2, rel=1e-12)
    _, opt, p, _ = _run(GRADS[:3], update_proj_gap=3)
    state = opt.state[p]
    assert float(state["max_ema"]) / (1 - 0.999**3) == pytest.approx(1.127601, rel=1e-6)
    mu_hat = float(state["norm_ema"]) / (1 - 0.7**3)
    nu_hat = float(state["sqnorm_ema"]) / (1 - 0.9**3)
    assert mu_hat / (nu_hat**0.5 + 1e-8) == pytest.approx(0.897430, rel=1e-6)


def test_spike_entry_clipped_to_threshold_others_untouched():
    """At t = 3 entry 0 (3.0) becomes exactly T-hat = 1.127601 before AdaGN; the rest keep their values, so the
    conditioned gradient is [1.127601, -0.2, 0.05, 0.02] * c / n (the table's g-hat row)."""
    _, _, _, seen = _run(GRADS[:3], update_proj_gap=3, reference_quirks=True)  # quirks: p.grad holds g-hat
    _close(seen[2], [0.882663, -0.156556, 0.039139, 0.015656])
    _close(seen[0], [0.436436, -0.872872, 0.218218, 0.0])
    ghat = seen[2]
    raw = torch.tensor([1.127601, -0.2, 0.05, 0.02], dtype=torch.float64)
    ratio = ghat / raw
    assert float(ratio.max() - ratio.min()) < 1e-5  # one common AdaGN factor: only entry 0 was clipped


def test_default_mode_leaves_p_grad_alone():
    _, _, _, seen = _run(GRADS[:3], update_proj_gap=3)
    _close(seen[2], GRADS[2])


def test_worked_example_reference_quirks():
    out, _, _, _ = _run(GRADS, update_proj_gap=3, reference_quirks=True)
    _close(out[1], [0.480003, -0.280024, 0.080091, 0.192559])
    _close(out[2], [0.464658, -0.266754, 0.066845, 0.180780])
    _close(out[3], [0.457217, -0.259312, 0.059404, 0.180780])


def test_worked_example_without_moret_both_modes_agree():
    for quirks in (False, True):
        out, _, _, _ = _run(GRADS, update_proj_gap=0, reference_quirks=quirks)
        _close(out[2], [0.470200, -0.271547, 0.071629, 0.185034])
        _close(out[3], [0.460896, -0.262625, 0.062640, 0.178871])


def test_cosine_factor():
    got = [cosine_factor(t, 10, 0.5) for t in (1, 5, 10, 11, 30)]
    assert got == pytest.approx([0.989873, 0.785579, 0.510127, 0.5, 0.5], abs=1e-6)
    assert 0.9 * cosine_factor(1, 10, 0.5) == pytest.approx(0.890886, abs=1e-6)
    assert cosine_factor(30, 10, 0.5, rising=True) > 0.5  # the reference's factor rises again
    assert cosine_factor(7, None, 0.5) == 1.0
    # closed form for total_T = 25 (what the reference's CosineDecay gives for t <= total_T + 1)
    assert [cosine_factor(t, 25, 0.5) for t in range(1, 6)] == pytest.approx(
        [0.998177, 0.992735, 0.983754, 0.971364, 0.955746], abs=1e-6)


@pytest.mark.parametrize("norm", [1.0, 7.5])
def test_constant_gradient_equals_adamw(norm):
    """A constant gradient is never clipped and AdaGN rescales it to unit norm (c / n = 1 / (n + eps)), so the
    trajectory is AdamW's with eps scaled by n (the same eps for a unit-norm gradient)."""
    torch.manual_seed(0)
    g = torch.randn(6, 5, dtype=torch.float64)
    g = g * (norm / g.norm())
    a = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    ours = StableSPAM([a], lr=1e-2, weight_decay=0.1, update_proj_gap=0)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, eps=1e-8 * (norm + 1e-8))
    for _ in range(50):
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert float((a - b).detach().abs().max()) < 1e-6 * float(b.detach().abs().max())


def test_gradient_scale_invariance():
    out1, _, _, _ = _run(GRADS, update_proj_gap=3)
    out2, _, _, _ = _run([[1000 * x for x in g] for g in GRADS], update_proj_gap=3)
    assert float((out1[-1] - out2[-1]).abs().max()) < 1e-10


def test_state_dict_round_trip_is_bit_identical():
    torch.manual_seed(1)
    grads = [torch.randn(3, 4) for _ in range(12)]
    kw = dict(lr=1e-2, weight_decay=0.01, update_proj_gap=4, total_T=10)

    def fresh():
        torch.manual_seed(2)
        p = torch.nn.Parameter(torch.randn(3, 4))
        q = torch.nn.Parameter(torch.randn(4))
        return [p, q], StableSPAM([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], **kw)

    params, opt = fresh()
    for g in grads:
        params[0].grad, params[1].grad = g, g[0]
        opt.step()
    full = [p.detach().clone() for p in params]

    params, opt = fresh()
    for g in grads[:6]:
        params[0].grad, params[1].grad = g, g[0]
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    params2, opt2 = fresh()
    with torch.no_grad():
        for p, w in zip(params2, weights):
            p.copy_(w)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["global_step"] == 6
    for g in grads[6:]:
        params2[0].grad, params2[1].grad = g, g[0]
        opt2.step()
    for a, b in zip(full, params2):
        assert torch.equal(a, b)


def test_none_grad_skipped_and_bf16_keeps_fp32_statistics():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(2))
    opt = StableSPAM([p, q], lr=1e-3)
    p.grad = torch.full((4,), 0.5, dtype=torch.bfloat16)
    opt.step()
    assert len(opt.state[q]) == 0 and torch.equal(q.detach(), torch.ones(2))
    for key in ("max_ema", "norm_ema", "sqnorm_ema"):
        assert opt.state[p][key].dtype == torch.float32
    opt2 = StableSPAM([p, q], lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    for key in ("max_ema", "norm_ema", "sqnorm_ema"):
        assert opt2.state[p][key].dtype == torch.float32
        assert torch.equal(opt2.state[p][key], opt.state[p][key])


def test_zero_gradient_still_runs_adam_with_momentum():
    out, opt, p, _ = _run([GRADS[0], [0.0, 0.0, 0.0, 0.0]], update_proj_gap=0)
    assert not torch.equal(out[0], out[1])  # momentum keeps moving p (the reference's behaviour)
    assert float(opt.state[p]["norm_ema"]) > 0  # the EMAs still decay


def test_metrics():
    _, opt, _, _ = _run(GRADS[:3], update_proj_gap=3)
    m = opt.last_metrics
    assert m["clip_frac"] == 0.25 and m["moret_reset"] == 1.0 and m["beta1_eff"] == 0.9
    assert m["gn_scale_mean"] == pytest.approx(0.897430 / 1.146466, rel=1e-5)


def test_matches_pytorch_optimizer():
    """The default mode equals pytorch-optimizer's StableSPAM (total_T None, resets on) on random gradients."""
    po = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(3)
    grads = [torch.randn(5, 3, dtype=torch.float64) * (50 if i == 17 else 1) for i in range(40)]
    a = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    ours = StableSPAM([a], lr=1e-2, weight_decay=0.01, update_proj_gap=7)
    theirs = po.StableSPAM([b], lr=1e-2, weight_decay=0.01, update_proj_gap=7, gamma3=0.999)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert float((a - b).detach().abs().max()) <= 1e-10
