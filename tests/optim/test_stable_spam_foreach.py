"""Stable-SPAM's foreach step (posttrain/optim/stable_spam.py, ``foreach=True``) against its per-tensor loop
(``foreach=False``, the reference): the same bits for parameters, p.grad, every state tensor and the logged metrics,
in both modes, fp32 / bf16 / fp64 parameters, with MoRet resets, AdaClip clipping, weight decay, the cosine factor,
tensors that miss a gradient on some steps, and a state_dict round trip between the two."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.optim import stable_spam
from posttrain.optim.stable_spam import StableSPAM, _chunks

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,), (16, 9)]


def _params(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)) for shape in SHAPES]


def _grads(step: int, dtype, skip_some: bool):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for i, shape in enumerate(SHAPES):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        if step % 3 == 2:
            g.view(-1)[0] = 40.0 * (i + 1)  # a spike: AdaClip rescales it
        out.append(None if skip_some and i == 3 and step % 4 == 1 else g.to(dtype))
    return out


def _run(foreach: bool, dtype, steps: int = 9, skip_some: bool = False, **kw):
    params = _params(dtype)
    groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]
    opt = StableSPAM(groups, **{**dict(lr=1e-2, weight_decay=0.1, update_proj_gap=3, total_T=6), **kw},
                     foreach=foreach)
    trace = []
    for step in range(steps):
        for p, g in zip(params, _grads(step, dtype, skip_some)):
            p.grad = None if g is None else g.clone()
        opt.step()
        trace.append(([p.detach().clone() for p in params],
                      [None if p.grad is None else p.grad.clone() for p in params], opt.last_metrics))
    return params, opt, trace


def _assert_same_states(a: StableSPAM, b: StableSPAM, pa, pb):
    for x, y in zip(pa, pb):
        sa, sb = a.state[x], b.state[y]
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


@pytest.mark.parametrize("quirks", [False, True], ids=["default", "reference_quirks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("skip_some", [False, True], ids=["all_grads", "missing_grads"])
@pytest.mark.parametrize("chunk", [None, 40], ids=["one_chunk", "chunks_of_40"])
def test_foreach_step_is_bit_identical_to_the_loop(quirks, dtype, skip_some, chunk, monkeypatch):
    """``chunk=40``: the tensors (35, 5, 24, 1 and 144 elements) are stepped in runs of at most 40 elements (the
    144-element one alone), the scratch buffers reused from run to run."""
    if chunk is not None:
        monkeypatch.setattr(stable_spam, "_CHUNK_NUMEL", chunk)
    pa, oa, ta = _run(False, dtype, reference_quirks=quirks, skip_some=skip_some)
    pb, ob, tb = _run(True, dtype, reference_quirks=quirks, skip_some=skip_some)
    clipped = resets = 0
    for (wa, ga, ma), (wb, gb, mb) in zip(ta, tb):
        for x, y in zip(wa, wb):
            assert torch.equal(x, y)
        for x, y in zip(ga, gb):
            assert (x is None and y is None) or torch.equal(x, y)
        assert ma == mb  # clip_frac, gn_scale_mean, moret_reset, beta1_eff: the same floats
        clipped += ma["clip_frac"] > 0
        resets += ma["moret_reset"] == 1.0
    assert clipped >= 3 and resets >= 2  # the case exercises AdaClip and MoRet
    _assert_same_states(oa, ob, pa, pb)


def test_foreach_hand_checked_small_case():
    """One tensor [3, -4] (gmax 4) after a first step at [1, 1]: t = 2, theta = 0.5 gives max_ema = 0.5*0.5*1 + 0.5*4
    = 2.25 and T = 2.25 / 0.75 = 3, so -4 becomes -4 * 3/4 = -3 and 3 stays (3 > 3 is false); AdaGN then scales
    [3, -3] (norm sqrt 18) by c / n with c = mu_hat / (sqrt(nu_hat) + eps)."""
    for foreach in (False, True):
        p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        opt = StableSPAM([p], lr=0.0, theta=0.5, gamma1=0.5, gamma2=0.5, update_proj_gap=0, foreach=foreach,
                         reference_quirks=True)  # quirks: p.grad holds the conditioned gradient
        p.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
        opt.step()
        p.grad = torch.tensor([3.0, -4.0], dtype=torch.float64)
        opt.step()
        n1, n2 = 2**0.5, 18**0.5
        mu_hat = (0.25 * n1 + 0.5 * n2) / 0.75
        nu_hat = (0.25 * n1**2 + 0.5 * n2**2) / 0.75
        c = mu_hat / (nu_hat**0.5 + 1e-8)
        assert float(opt.state[p]["max_ema"]) == pytest.approx(2.25, rel=1e-12)
        assert p.grad.tolist() == pytest.approx([3 * c / n2, -3 * c / n2], rel=1e-12)
        assert opt.last_metrics["clip_frac"] == 0.5


@pytest.mark.parametrize("quirks", [False, True], ids=["default", "reference_quirks"])
def test_state_dict_moves_between_foreach_and_loop(quirks):
    """Six steps with one implementation, the state_dict loaded into the other, three more: the same bits as nine
    steps of the loop."""
    full, _, _ = _run(False, torch.float32, steps=9, reference_quirks=quirks)
    params = _params(torch.float32)
    groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]
    kw = dict(lr=1e-2, weight_decay=0.1, update_proj_gap=3, total_T=6, reference_quirks=quirks)
    first = StableSPAM(groups, foreach=True, **kw)
    for step in range(6):
        for p, g in zip(params, _grads(step, torch.float32, False)):
            p.grad = g.clone()
        first.step()
    saved = copy.deepcopy(first.state_dict())
    second = StableSPAM([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}], foreach=False, **kw)
    second.load_state_dict(saved)
    if quirks:
        second._total_steps = first._total_steps  # the reference's counter is not in its state_dict
    for step in range(6, 9):
        for p, g in zip(params, _grads(step, torch.float32, False)):
            p.grad = g.clone()
        second.step()
    for a, b in zip(full, params):
        assert torch.equal(a, b)


def test_chunks_are_consecutive_runs_within_the_cap():
    tensors = [torch.empty(n) for n in (35, 5, 24, 1, 144, 3)]
    assert _chunks(tensors, 40) == [[0, 1], [2, 3], [4], [5]]
    assert _chunks(tensors, 1000) == [[0, 1, 2, 3, 4, 5]]
