"""Tests for posttrain.losses.preference against the worked examples and expected behaviours of
docs/methods/dpo.md, docs/methods/wpo.md, docs/methods/sparsepo.md, docs/methods/asft_aligned.md, docs/methods/simpo.md,
docs/methods/orpo.md."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from posttrain.losses.preference import (
    SparsePOMaskNet,
    asft_aligned_loss,
    asft_metrics,
    dpo_loss,
    log_odds,
    mapo_activation_map,
    mapo_mask,
    mask_sparsity,
    mean_logps,
    orpo_loss,
    preference_metrics,
    sequence_lengths,
    sequence_logps,
    simpo_loss,
    sparsepo_loss,
    sparsepo_metrics,
    sparsepo_token_kl,
    token_mean_nll,
    wpo_log_alignment,
    wpo_loss,
    wpo_metrics,
    wpo_pair_weights,
    wpo_sequence_weights,
)

ATOL = 1e-5
LOG2 = math.log(2.0)


def T(x, **kw):
    if isinstance(x, torch.Tensor):
        return x.detach().clone().float().requires_grad_(kw.get("requires_grad", False))
    return torch.tensor(x, dtype=torch.float32, **kw)


def close(actual, expected, atol=ATOL, rtol=0.0):
    assert_close(torch.as_tensor(actual, dtype=torch.float32), T(expected), atol=atol, rtol=rtol)


# ======================================================================================================================
# DPO (docs/methods/dpo.md#how-it-is-tested)
# ======================================================================================================================

BETA = 0.1
S_C, S_R = [-5.0, -8.0], [-7.0, -6.0]
REF_C, REF_R = [-6.0, -7.5], [-6.5, -6.5]


def _dpo(loss_type="sigmoid", s_c=S_C, **kw):
    sc = T(s_c, requires_grad=True)
    sr = T(S_R, requires_grad=True)
    out = dpo_loss(sc, sr, T(REF_C), T(REF_R), beta=kw.pop("beta", BETA), loss_type=loss_type, **kw)
    return out, sc, sr


def test_sequence_logps_sum_check():
    logps = T([[-1.0, -0.7, -0.5, -1.2, -0.3, -9.9]])
    mask = T([[0, 0, 1, 1, 1, 0]])
    close(sequence_logps(logps, mask), [-2.0])
    close(sequence_lengths(mask), [3.0])
    close(mean_logps(logps, mask), [-2.0 / 3.0])
    # prompt / padding positions never count, even if non-finite
    logps2 = logps.clone()
    logps2[0, 0], logps2[0, 5] = -float("inf"), 123.0
    close(sequence_logps(logps2, mask), [-2.0])
    # empty completion: N clamped to 1
    close(sequence_lengths(T([[0.0, 0.0]])), [1.0])


def test_dpo_sigmoid_worked_example_values_and_grads():
    out, sc, sr = _dpo()
    close(out.losses, [0.620957, 0.744397])
    L = out.losses.mean()
    close(L, 0.682677)
    L.backward()
    close(sc.grad, [-0.023129, -0.026249])
    close(sr.grad, [0.023129, 0.026249])
    assert out.losses.dtype == torch.float32
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    close(out.chosen_rewards, [0.1, -0.05])
    close(out.rejected_rewards, [-0.05, 0.05])


def test_dpo_cdpo_and_robust_worked_example():
    out, _, _ = _dpo("sigmoid", label_smoothing=0.1)
    close(out.losses, [0.635957, 0.734397])
    close(out.losses.mean(), 0.685177)
    out, _, _ = _dpo("robust", label_smoothing=0.1)
    close(out.losses, [0.602207, 0.756897])
    close(out.losses.mean(), 0.679552)


def test_dpo_ipo_worked_example_both_forms():
    n_c, n_r = T([4, 5]), T([5, 2])
    out, _, _ = _dpo("ipo", chosen_lengths=n_c, rejected_lengths=n_r)
    close(out.losses, [21.6225, 28.6225], atol=1e-4)
    close(out.losses.mean(), 25.1225, atol=1e-4)
    # rewards are the un-normalised beta * log-ratio, as in TRL
    close(out.chosen_rewards, [0.1, -0.05])
    out, _, _ = _dpo("ipo", ipo_length_normalize=False)
    close(out.losses, [12.25, 36.0], atol=1e-4)
    close(out.losses.mean(), 24.125, atol=1e-4)
    with pytest.raises(ValueError):
        _dpo("ipo")  # normalised form without lengths


def test_dpo_metrics_worked_example():
    out, sc, sr = _dpo()
    m = preference_metrics(out.chosen_rewards, out.rejected_rewards, sc, sr)
    expected = {
        "rewards/chosen": 0.025,
        "rewards/rejected": 0.0,
        "rewards/margins": 0.025,
        "rewards/accuracies": 0.5,
        "logps/chosen": -6.5,
        "logps/rejected": -6.5,
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-6), k


def test_dpo_accuracy_is_strict():
    m = preference_metrics(T([0.1, 0.2]), T([0.1, 0.1]), T([0, 0]), T([0, 0]))
    assert m["rewards/accuracies"] == pytest.approx(0.5)


def test_dpo_policy_equals_ref_gives_log2_and_half_beta_grad():
    s = T([-3.0, -12.5, -0.7], requires_grad=True)
    r = T([-4.0, -2.0, -9.0], requires_grad=True)
    for beta in (0.1, 0.5):
        out = dpo_loss(s, r, s.detach().clone(), r.detach().clone(), beta=beta)
        close(out.losses, [LOG2] * 3)
        (g,) = torch.autograd.grad(out.losses.sum(), s)
        close(g, [-beta / 2] * 3)


def test_dpo_beta_to_zero_and_swap_symmetry():
    out = dpo_loss(T([-5.0, -80.0]), T([-70.0, -6.0]), T([-6.0, -7.5]), T([-6.5, -6.5]), beta=1e-7)
    close(out.losses, [LOG2, LOG2])
    for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1)):
        fwd = dpo_loss(T(S_C), T(S_R), T(REF_C), T(REF_R), BETA, loss_type, eps).losses
        swp = dpo_loss(T(S_R), T(S_C), T(REF_R), T(REF_C), BETA, loss_type, eps).losses
        # l(-D): evaluate the closed form at -D directly
        d = (T(S_C) - T(REF_C)) - (T(S_R) - T(REF_R))
        if loss_type == "sigmoid":
            expected = -(1 - eps) * F.logsigmoid(-BETA * d) - eps * F.logsigmoid(BETA * d)
        else:
            expected = (-(1 - eps) * F.logsigmoid(-BETA * d) + eps * F.logsigmoid(BETA * d)) / (1 - 2 * eps)
        close(swp, expected)
        assert not torch.allclose(fwd, swp)


def test_dpo_depends_only_on_margin():
    base = dpo_loss(T(S_C), T(S_R), T(REF_C), T(REF_R), BETA).losses
    k = 3.7
    shifted = dpo_loss(T(S_C) + k, T(S_R), T(REF_C) + k, T(REF_R), BETA).losses
    close(shifted, base)
    shifted = dpo_loss(T(S_C) + k, T(S_R) + k, T(REF_C), T(REF_R), BETA).losses  # D unchanged
    close(shifted, base)


def test_dpo_eps_zero_equalities():
    plain = dpo_loss(T(S_C), T(S_R), T(REF_C), T(REF_R), BETA).losses
    close(dpo_loss(T(S_C), T(S_R), T(REF_C), T(REF_R), BETA, "sigmoid", 0.0).losses, plain)
    close(dpo_loss(T(S_C), T(S_R), T(REF_C), T(REF_R), BETA, "robust", 0.0).losses, plain)
    close(plain, [0.620957, 0.744397])


def test_cdpo_minimum_at_log9():
    beta, eps = 0.1, 0.1
    d_star = math.log(9.0) / beta  # beta*D* = log 9 = 2.197225
    assert beta * d_star == pytest.approx(2.197225, abs=1e-6)
    sc = T([d_star, d_star + 10.0, d_star - 10.0], requires_grad=True)
    out = dpo_loss(sc, T([0.0] * 3), T([0.0] * 3), T([0.0] * 3), beta, "sigmoid", eps)
    close(out.losses[0], 0.325083)
    (g,) = torch.autograd.grad(out.losses.sum(), sc)
    close(g[0], 0.0, atol=1e-6)
    assert g[1] > 0  # past the minimum cDPO pushes D back down
    assert g[2] < 0
    assert (out.losses[1:] > out.losses[0]).all()


def test_dpo_reference_is_constant_and_validation():
    ref_c = T(REF_C, requires_grad=True)
    out = dpo_loss(T(S_C, requires_grad=True), T(S_R), ref_c, T(REF_R), BETA)
    out.losses.sum().backward()
    assert ref_c.grad is None
    with pytest.raises(ValueError):
        _dpo("robust", label_smoothing=0.5)
    with pytest.raises(ValueError):
        _dpo("hinge")


def test_dpo_fp32_under_bf16_inputs():
    out = dpo_loss(T(S_C).bfloat16(), T(S_R).bfloat16(), T(REF_C).bfloat16(), T(REF_R).bfloat16(), BETA)
    assert out.losses.dtype == torch.float32
    close(out.losses, [0.620957, 0.744397])


def _token_logps(logits, input_ids):
    """logp[b, t] = log softmax(logits[b, t-1])[input_ids[b, t]] (t >= 1), as gathered logit - logsumexp."""
    z = logits[:, :-1].float()
    tgt = input_ids[:, 1:]
    return z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)


def test_dpo_prompt_and_padding_logits_do_not_matter():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (2, 6), generator=g)
    # token index: 0,1 prompt; 2,3,4 completion; 5 padding  -> mask on shifted targets (tokens 1..5)
    mask = T([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]])
    logits = torch.randn(2, 6, 7, generator=g)

    def loss(lg):
        s = sequence_logps(_token_logps(lg, ids), mask)
        return dpo_loss(s[:1], s[1:], T([-3.0]), T([-4.0]), BETA).losses.mean()

    base = loss(logits)
    for pos in (0, 4, 5):  # predicts prompt token 1, padding token 5, and the last position predicts nothing
        lg = logits.clone()
        lg[:, pos] += torch.randn(7, generator=g) * 5
        close(loss(lg), base)
    lg = logits.clone()
    lg[:, 1] += torch.randn(7, generator=g) * 5  # last prompt position predicts the first completion token
    assert not torch.allclose(loss(lg), base)


# ======================================================================================================================
# WPO (docs/methods/wpo.md#how-it-is-tested)
# ======================================================================================================================

WPO_SEQS = {
    "c1": ([[2, 0, 0], [1.5, 0.5, -1]], [0, 0]),
    "r1": ([[0, 2.5, 0], [1, 1, 1]], [1, 2]),
    "c2": ([[0, 0, 0], [-1, 2, 0], [0.5, 0.5, 0]], [1, 0, 2]),
    "r2": ([[3, 0, -1], [0, 1, 0]], [2, 0]),
}


def _pad_batch(names):
    """Right-pad the listed sequences to a [B, 3, 3] logits tensor, [B, 3] labels and [B, 3] completion mask."""
    logits = torch.zeros(len(names), 3, 3)
    labels = torch.zeros(len(names), 3, dtype=torch.long)
    mask = torch.zeros(len(names), 3)
    for i, n in enumerate(names):
        z, y = WPO_SEQS[n]
        logits[i, : len(y)] = T(z)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(y)] = 1
    logits[:, :, 0] += torch.where(mask.bool(), 0.0, 7.0)  # garbage at padding must not matter
    return logits, labels, mask


def _gather_logps(logits, labels):
    z = logits.float()
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)


def test_wpo_token_values():
    logits, labels, mask = _pad_batch(["c1", "r1", "c2", "r2"])
    lp = _gather_logps(logits, labels)
    ls = wpo_log_alignment(logits, "sampled")
    expected_lp = {"c1": [-0.239545, -0.371539], "r1": [-0.152008, -1.098612],
                   "c2": [-1.098612, -3.169846, -1.458020], "r2": [-4.065884, -1.551445]}
    expected_ls = {"c1": [-0.443113, -0.610233], "r1": [-0.290631, -1.098612],
                   "c2": [-1.098612, -0.319111, -1.054045], "r2": [-0.128958, -0.863345]}
    for i, n in enumerate(["c1", "r1", "c2", "r2"]):
        k = len(expected_lp[n])
        close(lp[i, :k], expected_lp[n])
        close(ls[i, :k], expected_ls[n])
    close(sequence_logps(lp, mask), [-0.611084, -1.250621, -5.726478, -5.617329])
    assert ls.dtype == torch.float32 and not ls.requires_grad
    close(wpo_log_alignment(logits, "none"), torch.zeros(4, 3))


def _wpo_setup(requires_grad=False):
    lc, yc, mc = _pad_batch(["c1", "c2"])
    lr, yr, mr = _pad_batch(["r1", "r2"])
    lc.requires_grad_(requires_grad)
    lr.requires_grad_(requires_grad)
    return lc, yc, mc, lr, yr, mr


def _wpo_loss(alignment="sampled", clamp=1.0, requires_grad=True):
    lc, yc, mc, lr, yr, mr = _wpo_setup(requires_grad)
    lp_c, lp_r = _gather_logps(lc, yc), _gather_logps(lr, yr)
    w_c = wpo_sequence_weights(lp_c, mc, wpo_log_alignment(lc, alignment))
    w_r = wpo_sequence_weights(lp_r, mr, wpo_log_alignment(lr, alignment))
    sc = sequence_logps(lp_c, mc)
    sr = sequence_logps(lp_r, mr)
    sc.retain_grad()
    out = dpo_loss(sc, sr, T([-1.0, -5.0]), T([-2.5, -4.0]), beta=0.1)
    W = wpo_pair_weights(w_c, w_r, clamp)
    return wpo_loss(out.losses, W), out, W, w_c, w_r, sc, (lc, lr)


def test_wpo_worked_example_sampled_clamped():
    L, out, W, w_c, w_r, sc, _ = _wpo_loss("sampled", 1.0)
    close(w_c, [1.247487, 0.337934])
    close(w_r, [1.071770, 0.099012])
    close(wpo_pair_weights(w_c, w_r, None), [1.337019, 0.033460])
    close(W, [1.0, 0.033460])
    close(out.losses, [0.737096, 0.649596])
    close(out.losses.mean(), 0.693346)
    close(L, 0.379415)
    L.backward()
    close(sc.grad, [-0.026075, -0.000799])
    assert not W.requires_grad and not w_c.requires_grad


def test_wpo_worked_example_no_clamp():
    L, *_, sc, _ = _wpo_loss("sampled", None)
    close(L, 0.503623)
    L.backward()
    close(sc.grad, [-0.034863, -0.000799])


def test_wpo_worked_example_greedy_and_none():
    L, _, W, w_c, w_r, _, _ = _wpo_loss("greedy", 1.0)
    close(w_c, [1.0, 0.311403])
    close(w_r, [1.0, 0.082085])
    close(W, [1.0, 0.025562])
    close(L, 0.376850)
    # unaligned: geometric-mean token probability
    _, _, _, w_c, w_r, _, _ = _wpo_loss("none", None)
    lc, yc, mc, lr, yr, mr = _wpo_setup()
    close(w_c, torch.exp(mean_logps(_gather_logps(lc, yc), mc)))
    close(wpo_sequence_weights(_gather_logps(lc, yc), mc, None), w_c)


def test_wpo_metrics():
    _, _, _, w_c, w_r, _, _ = _wpo_loss("sampled", 1.0)
    m = wpo_metrics(w_c, w_r, 1.0)
    assert m["wpo/pair_weight_mean"] == pytest.approx((1.0 + 0.033460) / 2, abs=1e-5)
    assert m["wpo/pair_weight_min"] == pytest.approx(0.033460, abs=1e-5)
    assert m["wpo/pair_weight_max"] == pytest.approx(1.0, abs=1e-6)
    assert m["wpo/chosen_weight_mean"] == pytest.approx((1.247487 + 0.337934) / 2, abs=1e-5)
    assert m["wpo/rejected_weight_mean"] == pytest.approx((1.071770 + 0.099012) / 2, abs=1e-5)
    assert m["wpo/clamped_fraction"] == pytest.approx(0.5)
    m = wpo_metrics(w_c, w_r, None)
    assert m["wpo/pair_weight_max"] == pytest.approx(1.337019, abs=1e-5)
    assert m["wpo/clamped_fraction"] == 0.0


def test_wpo_unit_weights_reduce_to_dpo():
    out, sc, _ = _dpo()
    L = wpo_loss(out.losses, torch.ones(2))
    close(L, 0.682677)
    L.backward()
    close(sc.grad, [-0.023129, -0.026249])


def test_wpo_gradient_is_weight_times_dpo_gradient():
    L, out, W, _, _, _, (lc, lr) = _wpo_loss("sampled", None)
    g_wpo = torch.autograd.grad(L, (lc, lr), retain_graph=True)
    expected = [torch.zeros_like(lc), torch.zeros_like(lr)]
    for i in range(2):  # (1/B) * sum_i W_i * grad(l_i), with W detached
        gi = torch.autograd.grad(out.losses[i], (lc, lr), retain_graph=True)
        for j in range(2):
            expected[j] += W[i] * gi[j] / 2
    for a, b in zip(g_wpo, expected):
        assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert g_wpo[0].abs().sum() > 0


def test_wpo_uniform_row_ratio_one_and_greedy_properties():
    z = torch.ones(1, 1, 5) * 0.3
    lp = _gather_logps(z, torch.tensor([[2]]))
    close(lp - wpo_log_alignment(z, "sampled"), [[0.0]], atol=1e-6)
    close(wpo_log_alignment(z, "sampled"), [[-math.log(5)]])
    close(wpo_sequence_weights(lp, T([[1.0]]), wpo_log_alignment(z, "sampled")), [1.0])
    # greedy weight == 1 iff every token is the argmax, and always <= 1
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, 9, generator=g)
    mask = torch.ones(6, 4)
    argmax = logits.argmax(-1)
    other = (argmax + 1) % 9
    labels = argmax.clone()
    labels[3:, 1] = other[3:, 1]  # rows 3..5 have one non-argmax token
    w = wpo_sequence_weights(_gather_logps(logits, labels), mask, wpo_log_alignment(logits, "greedy"))
    close(w[:3], [1.0, 1.0, 1.0], atol=1e-6)
    assert (w[3:] < 1.0 - 1e-6).all()
    rand_labels = torch.randint(0, 9, (6, 4), generator=g)
    w = wpo_sequence_weights(_gather_logps(logits, rand_labels), mask, wpo_log_alignment(logits, "greedy"))
    assert (w <= 1.0 + 1e-6).all()
    # sampled alignment: exponent bounded by 0.5 log V, so no overflow even for extreme logits
    big = torch.zeros(1, 2, 9)
    big[..., 0] = 1e4
    w = wpo_sequence_weights(_gather_logps(big, torch.zeros(1, 2, dtype=torch.long)), torch.ones(1, 2),
                             wpo_log_alignment(big, "sampled"))
    assert torch.isfinite(w).all() and w.item() <= 3.0 + 1e-5


def test_wpo_clamp_bounds_loss():
    L, out, W, *_ = _wpo_loss("sampled", 1.0)
    assert (W <= 1.0).all()
    assert L <= out.losses.mean()
    with pytest.raises(ValueError):
        wpo_log_alignment(torch.zeros(1, 1, 3), "bogus")


# ======================================================================================================================
# SparsePO (docs/methods/sparsepo.md#how-it-is-tested)
# ======================================================================================================================

SP_BETA = 0.8


def _sp_inputs(requires_grad=False):
    lm_w, lm_l = T([[1, 1, 1]]), T([[1, 1, 0]])
    d = dict(
        chosen_logratios=T([[0.2, -0.1, 0.5]]),
        rejected_logratios=T([[-0.3, 0.4, 99.0]]),  # pad garbage
        chosen_token_kl=T([[0.02, 0.05, 0.01]]),
        rejected_token_kl=T([[0.03, 0.04, 99.0]]),
        chosen_loss_mask=lm_w,
        rejected_loss_mask=lm_l,
    )
    masks = dict(
        chosen_reward_mask=T([[1.0, 0.0, 0.5]], requires_grad=requires_grad),
        rejected_reward_mask=T([[0.8, 0.1, 7.0]], requires_grad=requires_grad),  # x at pad
        chosen_kl_mask=T([[0.2, 1.0, 0.0]], requires_grad=requires_grad),
        rejected_kl_mask=T([[0.5, 0.5, 7.0]], requires_grad=requires_grad),
    )
    return d, masks


def test_sparsepo_indp_worked_example():
    d, m = _sp_inputs(requires_grad=True)
    out = sparsepo_loss(**d, **m, beta=SP_BETA, l1_reward=0.001, l1_kl=0.001)
    close(out.chosen_u, [0.45])
    close(out.rejected_u, [-0.2])
    close(out.chosen_kl, [0.054])
    close(out.rejected_kl, [0.035])
    close(out.margins, [0.669])
    close(out.l1, [0.0046])
    close(out.losses, [0.465533])
    close(-F.logsigmoid(SP_BETA * out.margins), [0.460933])
    close(out.chosen_rewards, [0.3168])
    close(out.rejected_rewards, [-0.188])
    out.losses.sum().backward()
    # the expected gradients (docs/methods/sparsepo.md#how-it-is-tested) are those of the -logsigmoid(beta z) term; the L1 term adds l1 * sign(m) (see module note)
    sign = lambda t: torch.sign(t.detach()) * 0.001  # noqa: E731
    close(m["chosen_reward_mask"].grad, T([[-0.059089, 0.029544, -0.147722]]) + sign(m["chosen_reward_mask"]))
    close(m["chosen_kl_mask"].grad, T([[-0.005909, -0.014772, -0.002954]]) + sign(m["chosen_kl_mask"]))
    close(m["rejected_kl_mask"].grad, T([[0.008863 + 0.001, 0.011818 + 0.001, 0.0]]))
    assert m["rejected_reward_mask"].grad[0, 2] == 0  # padding never contributes


def test_sparsepo_indp_gradients_without_l1_match_spec_exactly():
    d, m = _sp_inputs(requires_grad=True)
    out = sparsepo_loss(**d, **m, beta=SP_BETA)
    z = torch.tensor(0.669)
    close(-SP_BETA * torch.sigmoid(-SP_BETA * z), -0.295444)
    out.losses.sum().backward()
    close(m["chosen_reward_mask"].grad, [[-0.059089, 0.029544, -0.147722]])
    close(m["chosen_kl_mask"].grad, [[-0.005909, -0.014772, -0.002954]])
    close(m["rejected_kl_mask"].grad, [[0.008863, 0.011818, 0.0]])
    close(m["rejected_reward_mask"].grad, [[-0.295444 * 0.3, 0.295444 * 0.4, 0.0]])  # dz/dm_u(y_l) = -lr


def test_sparsepo_common_mask_worked_example():
    d, m = _sp_inputs()
    out = sparsepo_loss(**d, chosen_reward_mask=m["chosen_reward_mask"], rejected_reward_mask=m["rejected_reward_mask"],
                        beta=SP_BETA, l1_reward=0.001, l1_kl=0.001, common_mask=True)
    close(out.chosen_kl, [0.025])
    close(out.rejected_kl, [0.028])
    close(out.margins, [0.647])
    close(-F.logsigmoid(SP_BETA * out.margins), [0.467469])
    close(out.l1, [0.0024])
    close(out.losses, [0.469869])
    with pytest.raises(ValueError):
        sparsepo_loss(**d, **m, common_mask=True)


def test_sparsepo_tdpo1_and_dpo_reductions():
    d, _ = _sp_inputs()
    out = sparsepo_loss(**d, beta=SP_BETA, l1_reward=0.5, l1_kl=0.5)  # all masks off (=1), no L1 terms
    close(out.margins, [0.51])
    close(out.losses, [0.509812])
    zeros_w, zeros_l = torch.zeros(1, 3), torch.zeros(1, 3)
    out = sparsepo_loss(**d, chosen_kl_mask=zeros_w, rejected_kl_mask=zeros_l, beta=SP_BETA)
    close(out.margins, [0.5])
    close(out.losses, [0.513015])
    # == DPO sigmoid on summed log-probs: U = s - s_ref
    u_w, u_l = 0.2 - 0.1 + 0.5, -0.3 + 0.4
    close(out.losses, dpo_loss(T([u_w]), T([u_l]), T([0.0]), T([0.0]), beta=SP_BETA).losses)


def test_sparsepo_zero_masks_and_identical_policy():
    g = torch.Generator().manual_seed(2)
    lr_w = torch.randn(2, 4, generator=g, requires_grad=True)
    kl_w = torch.rand(2, 4, generator=g, requires_grad=True)
    lr_l = torch.randn(2, 4, generator=g, requires_grad=True)
    kl_l = torch.rand(2, 4, generator=g, requires_grad=True)
    lm = T([[1, 1, 1, 0], [0, 1, 1, 1]])
    z = torch.zeros(2, 4)
    out = sparsepo_loss(lr_w, lr_l, kl_w, kl_l, lm, lm, z, z, z, z, beta=0.5)
    close(out.margins, [0.0, 0.0])
    close(out.losses, [LOG2, LOG2])
    grads = torch.autograd.grad(out.losses.sum(), (lr_w, lr_l, kl_w, kl_l))
    for gr in grads:
        close(gr, torch.zeros(2, 4))
    # pi_theta == pi_ref: lr = KL = 0, loss = log 2 + L1
    mw, ml = torch.rand(2, 4, generator=g), torch.rand(2, 4, generator=g)
    out = sparsepo_loss(z, z, z, z, lm, lm, mw, ml, beta=0.5, l1_reward=0.01)
    l1 = 0.01 * ((mw * lm).sum(-1) + (ml * lm).sum(-1))
    close(out.losses, LOG2 + l1)


def test_sparsepo_token_kl_direction():
    p_ref = T([0.5, 0.3, 0.2])
    p_theta = T([0.4, 0.4, 0.2])
    kl = sparsepo_token_kl(p_theta.log() + 1.3, p_ref.log() - 0.4)  # logits up to a constant
    close(kl, 0.025267)
    close(sparsepo_token_kl(p_ref.log(), p_theta.log()), 0.025815)  # reverse direction
    lg = torch.randn(2, 3, 5)
    close(sparsepo_token_kl(lg, lg), torch.zeros(2, 3), atol=1e-6)
    pol = p_theta.log().clone().requires_grad_()
    ref = p_ref.log().clone().requires_grad_()
    sparsepo_token_kl(pol, ref).backward()
    assert pol.grad is not None and ref.grad is None


def test_sparsepo_padding_never_contributes():
    d, m = _sp_inputs()
    out1 = sparsepo_loss(**d, **m, beta=SP_BETA, l1_reward=0.001, l1_kl=0.001)
    d["rejected_logratios"][0, 2] = -5.0
    d["rejected_token_kl"][0, 2] = float("inf")
    m["rejected_reward_mask"][0, 2] = 100.0
    m["rejected_kl_mask"][0, 2] = 0.0
    out2 = sparsepo_loss(**d, **m, beta=SP_BETA, l1_reward=0.001, l1_kl=0.001)
    close(out2.losses, out1.losses)
    # sparsity: chosen reward mask [1, 0, 0.5] -> 1/3 zeros; rejected reward [0.8, 0.1, pad=0] -> 0%
    close(mask_sparsity(m["chosen_reward_mask"], d["chosen_loss_mask"]), 100.0 / 3)
    close(mask_sparsity(m["rejected_kl_mask"], d["rejected_loss_mask"]), 0.0)


def test_sparsepo_metrics():
    d, m = _sp_inputs()
    out = sparsepo_loss(**d, **m, beta=SP_BETA, l1_reward=0.001, l1_kl=0.001)
    met = sparsepo_metrics(out, T([-1.0]), T([-2.0]), d["chosen_token_kl"], d["rejected_token_kl"],
                           d["chosen_loss_mask"], d["rejected_loss_mask"], **m)
    expected = {
        "rewards/chosen": 0.3168, "rewards/rejected": -0.188, "rewards/margins": 0.5048, "rewards/accuracies": 1.0,
        "logps/chosen": -1.0, "logps/rejected": -2.0,
        "WgtSeqKL/chosen": 0.054, "WgtSeqKL/rejected": 0.035, "WgtSeqKL/margin": 0.019,
        "SeqKL/chosen": 0.08, "SeqKL/rejected": 0.07, "SeqKL/margin": 0.01,
        "Weights/rw_chosen_sparsity": 100 / 3, "Weights/rw_rejected_sparsity": 0.0,
        "Weights/kl_chosen_sparsity": 100 / 3, "Weights/kl_rejected_sparsity": 0.0,
        "Weights/u_chosen_l1_norm": 1.5, "Weights/u_rejected_l1_norm": 0.9,
        "Weights/d_chosen_l1_norm": 1.2, "Weights/d_rejected_l1_norm": 1.0,
    }
    assert set(met) == set(expected)
    for k, v in expected.items():
        assert float(met[k]) == pytest.approx(v, abs=1e-5), k


def test_mapo_worked_example():
    lm = T([[1, 1, 1, 1, 0]])
    resid = T([[0.3, -0.1, 0.9, 0.5, 42.0]])
    logits = T([[-2.0, -1.0, -1.5, -3.0, -99.0]])
    close(mapo_activation_map(resid, lm), [[0.4, 0.0, 1.0, 0.6, 0.0]])
    close(mapo_activation_map(logits, lm), [[0.5, 1.0, 0.75, 0.0, 0.0]])
    mask = mapo_mask({"resid": [resid], "logits": [logits]}, lm)
    close(mask, [[0.45, 0.5, 0.875, 0.3, 0.0]])
    # [B, T, H] inputs are averaged over the last dim first
    resid3 = resid.unsqueeze(-1) + T([-1.0, 0.0, 1.0])
    close(mapo_activation_map(resid3, lm), [[0.4, 0.0, 1.0, 0.6, 0.0]])
    # within-stream average, then across streams
    m2 = mapo_mask({"resid": [resid, -resid], "logits": [logits]}, lm)
    close(m2, 0.5 * (0.5 * (mapo_activation_map(resid, lm) + mapo_activation_map(-resid, lm))
                     + mapo_activation_map(logits, lm)))


def test_mapo_properties():
    g = torch.Generator().manual_seed(3)
    lm = T([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])
    acts = [torch.randn(2, 7, 6, generator=g) for _ in range(3)]
    for a in acts:
        mp = mapo_activation_map(a, lm)
        for b in range(2):
            vals = mp[b][lm[b].bool()]
            close(vals.min(), 0.0)
            close(vals.max(), 1.0)
        assert (mp[~lm.bool()] == 0).all()
    m = mapo_mask({"mlp": acts[:2], "resid": acts[2:]}, lm)
    assert (m >= 0).all() and (m <= 1).all() and not m.requires_grad
    # invariant to affine rescaling (positive scale) of any activation tensor
    m_aff = mapo_mask({"mlp": [acts[0] * 3.5 - 2.0, acts[1]], "resid": [acts[2] * 0.1 + 7.0]}, lm)
    close(m_aff, m, atol=1e-5)
    # degenerate: max == min (incl. a 1-token completion) -> 1 on completion tokens, no NaN
    const = torch.full((2, 7), 0.7)
    one_tok = T([[0, 0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    out = mapo_activation_map(const, one_tok)
    close(out, one_tok)


def test_sparsepo_mask_net_shapes_sparsity_and_grads():
    torch.manual_seed(0)
    net = SparsePOMaskNet(hidden_size=8, num_layers=3, layer_norm_eps=1e-6, dropout=0.0)
    assert net.norm.eps == 1e-6 and net.mixer.bias is None and len(net.layers) == 3
    hs = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(3)]
    mask = net(hs)
    assert mask.shape == (2, 5)
    assert (mask >= 0).all()
    # force exact zeros through the final ReLU: negative mixer -> all zeros -> 100% sparsity
    with torch.no_grad():
        net.mixer.weight.fill_(-1.0)
    lm = T([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    close(mask_sparsity(net(hs), lm), 100.0)
    with torch.no_grad():
        net.mixer.weight.fill_(1.0)
        for layer in net.layers:
            layer.bias.fill_(10.0)
    m = net(hs)
    close(mask_sparsity(m, lm), 0.0)
    # gradients reach the mask network through U, D and L1; never the (reference) hidden states
    lr = torch.randn(2, 5)
    kl = torch.rand(2, 5)
    out = sparsepo_loss(lr, lr.flip(0), kl, kl.flip(0), lm, lm.flip(0), m, m.flip(0),
                        beta=0.1, l1_reward=1e-3, l1_kl=1e-3, common_mask=True)
    out.losses.mean().backward()
    assert net.mixer.weight.grad is not None and net.mixer.weight.grad.abs().sum() > 0
    assert net.layers[0].weight.grad.abs().sum() > 0
    assert all(h.grad is None for h in hs)
    with pytest.raises(ValueError):
        net(hs[:2])


# ======================================================================================================================
# ASFT-aligned (docs/methods/asft_aligned.md#how-it-is-tested)
# ======================================================================================================================

ASFT_CW = [[-0.2, -0.5, -0.8], [-0.1, -0.3, 0.0]]
ASFT_CW_MASK = [[1, 1, 1], [1, 1, 0]]
ASFT_RL = [[-1.0, -1.4, 0.0], [-0.05, -0.15, -0.1]]
ASFT_RL_MASK = [[1, 1, 0], [1, 1, 1]]


def _asft_lbars(requires_grad=False):
    lw = mean_logps(T(ASFT_CW), T(ASFT_CW_MASK))
    ll = mean_logps(T(ASFT_RL), T(ASFT_RL_MASK))
    if requires_grad:
        lw = lw.detach().requires_grad_()
        ll = ll.detach().requires_grad_()
    return lw, ll


def test_asft_worked_example():
    lw, ll = _asft_lbars(requires_grad=True)
    close(lw, [-0.5, -0.2])
    close(ll, [-1.2, -0.1])
    close(lw.exp(), [0.606531, 0.818731])
    close(ll.exp(), [0.301194, 0.904837])
    out = asft_aligned_loss(lw, ll)
    close(out.chosen_log_odds, [0.432752, 1.507772])
    close(out.rejected_log_odds, [-0.841618, 2.252168])
    close(out.align, [0.858382, 2.552168])
    close(out.align[0], 0.5 - math.log(1 - 0.301194))
    close(out.losses, [1.358382, 2.752168])
    close(out.losses.mean(), 2.055275)
    out.losses.sum().backward()  # per pair, before the 1/B
    close(lw.grad, [-2.0, -2.0])
    close(ll.grad, [0.431013, 9.508332], atol=1e-4, rtol=1e-5)


def test_asft_lambda_and_beta_variants():
    lw, ll = _asft_lbars()
    out = asft_aligned_loss(lw, ll, lam=0.1)
    close(out.losses, [0.585838, 0.455217])
    close(out.losses.mean(), 0.520528)
    out = asft_aligned_loss(lw, ll, beta=0.5, lam=1.0)
    close(out.losses, [1.595516, 1.992595])
    close(out.losses.mean(), 1.794056)


def test_asft_token_level_gradient_is_one_over_n():
    cw = T(ASFT_CW, requires_grad=True)
    rl = T(ASFT_RL, requires_grad=True)
    out = asft_aligned_loss(mean_logps(cw, T(ASFT_CW_MASK)), mean_logps(rl, T(ASFT_RL_MASK)))
    out.losses.sum().backward()
    close(cw.grad, [[-2 / 3] * 3, [-1.0, -1.0, 0.0]])
    close(rl.grad, [[0.431013 / 2, 0.431013 / 2, 0.0], [9.508332 / 3] * 3], atol=1e-4, rtol=1e-5)


def test_asft_tempered_gradient_formula():
    lw, ll = _asft_lbars(requires_grad=True)
    beta, lam, c = 0.5, 0.7, 1.3
    out = asft_aligned_loss(lw, ll, beta=beta, lam=lam, sft_coef=c)
    out.losses.sum().backward()
    pw, pl = lw.detach().exp(), ll.detach().exp()
    ow, ol = log_odds(lw.detach()), log_odds(ll.detach())
    close(lw.grad, -c - lam * beta * torch.sigmoid(-beta * ow) / (1 - pw))
    close(ll.grad, lam * beta * torch.sigmoid(beta * ol) / (1 - pl), atol=1e-4, rtol=1e-5)


def test_asft_orpo_upper_bound():
    lw, ll = _asft_lbars()
    asft = asft_aligned_loss(lw, ll)
    orpo = -lw - F.logsigmoid(log_odds(lw) - log_odds(ll))  # ORPO, lam = beta = 1
    close(orpo, [0.746553, 1.333068])
    assert (orpo <= asft.losses).all()
    assert (-F.logsigmoid(log_odds(lw) - log_odds(ll)) <= asft.align).all()


def test_asft_closed_form_and_properties():
    g = torch.Generator().manual_seed(4)
    lw = -torch.rand(50, generator=g) * 5 - 1e-3
    ll = -torch.rand(50, generator=g) * 5 - 1e-3
    out = asft_aligned_loss(lw, ll)
    close(out.align, -lw - torch.log(1 - ll.exp()), atol=1e-5, rtol=1e-5)
    assert (out.losses >= 0).all()
    # lam = 0: length-normalised SFT on chosen only, no gradient to the rejected side
    lwg, llg = lw.clone().requires_grad_(), ll.clone().requires_grad_()
    out0 = asft_aligned_loss(lwg, llg, lam=0.0)
    close(out0.losses, -lw)
    out0.losses.sum().backward()
    close(llg.grad, torch.zeros(50))
    # pointwise: changing y_l never changes the chosen part, and vice versa
    a = asft_aligned_loss(lw, ll)
    b = asft_aligned_loss(lw, ll - 0.5)
    close(a.chosen_logsig, b.chosen_logsig)
    assert not torch.allclose(a.rejected_logsig, b.rejected_logsig)
    # not shift-invariant (unlike DPO/ORPO)
    assert not torch.allclose(asft_aligned_loss(lw - 0.3, ll - 0.3).losses, a.losses)
    # strictly decreasing in lbar_w, strictly increasing in lbar_l
    grid = torch.linspace(-6, -0.01, 40)
    inc = asft_aligned_loss(grid, torch.full_like(grid, -1.0)).losses
    assert (inc[1:] < inc[:-1]).all()
    inc = asft_aligned_loss(torch.full_like(grid, -1.0), grid, beta=0.5).losses
    assert (inc[1:] > inc[:-1]).all()


def test_asft_clamp_keeps_it_finite():
    lw = T([-0.5], requires_grad=True)
    ll = T([0.0], requires_grad=True)
    out = asft_aligned_loss(lw, ll)
    close(out.rejected_logsig, [16.118096], atol=1e-4)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(ll.grad).all()
    assert torch.isfinite(asft_aligned_loss(T([0.0]), T([-0.5])).losses).all()


def test_asft_metrics():
    lw, ll = _asft_lbars()
    out = asft_aligned_loss(lw, ll)
    m = asft_metrics(out, lw, ll)
    expected = {
        "asft/nll_loss": (0.5 + 0.2) / 2, "asft/asft_loss": (0.858382 + 2.552168) / 2,
        "asft/chosen_logsig": (0.5 + 0.2) / 2,  # -logsig(odds(l)) = -l at beta = 1
        "asft/rejected_logsig": (0.358382 + 2.352168) / 2,
        "rewards/chosen": -0.35, "rewards/rejected": -0.65, "rewards/margins": 0.3, "rewards/accuracies": 0.5,
        "logps/chosen": -0.35, "logps/rejected": -0.65,
        "log_odds/chosen": (0.432752 + 1.507772) / 2, "log_odds/rejected": (-0.841618 + 2.252168) / 2,
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-5), k


# ----------------------------------------------------------------------------------------------------------------------
# SimPO and ORPO (docs/methods/simpo.md#how-it-is-tested, docs/methods/orpo.md#how-it-is-tested)
# ----------------------------------------------------------------------------------------------------------------------


def test_token_mean_nll_counts_masked_tokens_only():
    logps = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -9.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(token_mean_nll(logps, mask), 3.5 / 3)  # -(-1 - 2 - 0.5) / 3 tokens; -inf padding never leaks
    close(token_mean_nll(logps, torch.zeros_like(mask)), 0.0)


def test_simpo_worked_example_and_gradient():
    lw = torch.tensor([-0.5, -1.0], requires_grad=True)
    ll = torch.tensor([-1.0, -0.8], requires_grad=True)
    out = simpo_loss(lw, ll, beta=2.0, gamma_beta_ratio=0.25)  # z = 2 (lw - ll - 0.25) = [0.5, -0.9]
    close(out.losses, [0.474077, 1.241154])  # log(1 + e^-z)
    close(out.chosen_rewards, [-1.0, -2.0])
    close(out.rejected_rewards, [-2.0, -1.6])
    out.losses.sum().backward()
    close(lw.grad, [-0.755081, -1.421899])  # -beta * sigmoid(-z)
    close(ll.grad, -lw.grad)


def test_simpo_margin_is_gamma_and_only_the_difference_counts():
    lw, ll = torch.tensor([-0.5, -1.0]), torch.tensor([-1.0, -0.8])
    close(simpo_loss(lw, ll, beta=1.0, gamma_beta_ratio=0.0).losses, [0.474077, 0.798139])  # plain -logsig(lw - ll)
    # TRL's CPO form: -logsig(beta * (lw - ll - simpo_gamma / beta)) with simpo_gamma = beta * ratio
    beta, gamma = 2.5, 1.0
    expected = -F.logsigmoid(beta * ((lw - ll) - gamma / beta))
    close(simpo_loss(lw, ll, beta=beta, gamma_beta_ratio=gamma / beta).losses, expected)
    close(simpo_loss(lw - 3.0, ll - 3.0).losses, simpo_loss(lw, ll).losses)
    # at the margin exactly (lw - ll = gamma / beta) the loss is log 2
    close(simpo_loss(torch.tensor([-0.5]), torch.tensor([-0.75])).losses, [LOG2])


def test_orpo_worked_example_and_gradient():
    lw = torch.tensor([-0.5, -1.0], requires_grad=True)
    ll = torch.tensor([-1.0, -0.8], requires_grad=True)
    nll = torch.tensor(0.7, requires_grad=True)
    out = orpo_loss(lw, ll, nll, beta=0.1)
    odds = lambda x: x - math.log(1 - math.exp(x))  # noqa: E731
    close(out.log_odds_ratio, [odds(-0.5) - odds(-1.0), odds(-1.0) - odds(-0.8)])
    close(out.log_odds_ratio, [0.974077, -0.337943])
    close(out.odds_ratio_losses, [0.320300, 0.876327])
    close(out.loss, 0.759831)  # 0.7 + 0.1 * mean([0.320300, 0.876327])
    close(out.nll, 0.7)
    close(out.chosen_rewards, [-0.05, -0.1])
    out.loss.backward()
    close(nll.grad, 1.0)
    # d/d lbar_w = beta/B * -sigmoid(-logOR) / (1 - e^lbar_w); rejected: the opposite sign, its own 1/(1 - e^lbar_l)
    close(lw.grad, [-0.034827, -0.046169])
    close(ll.grad, [0.021679, 0.052998])


def test_orpo_is_stable_near_certain_responses():
    lw = torch.tensor([0.0, -1e-9], requires_grad=True)  # pbar = 1: odds would be +inf without the clamp
    ll = torch.tensor([-2.0, -0.0], requires_grad=True)
    out = orpo_loss(lw, ll, torch.tensor(0.0), beta=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()
    close(out.odds_ratio_losses[1], LOG2)  # both responses at the clamp: log OR = 0


def test_token_mean_nll_with_a_process_share_denominator():
    """``num_items`` (a process's share of the global token count) replaces the local count: two processes with 3 and
    1 tokens, each dividing by (3 + 1) / 2, average to the token mean of all 4 tokens."""
    a, ma = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[1, 1, 1]])
    b, mb = torch.tensor([[-4.0, 0.0, 0.0]]), torch.tensor([[1, 0, 0]])
    share = (3 + 1) / 2
    averaged = (token_mean_nll(a, ma, share) + token_mean_nll(b, mb, share)) / 2
    close(averaged, 7.5 / 4)  # not (3.5 / 3 + 4) / 2, the mean of the two processes' own means
    close(token_mean_nll(a, ma, None), 3.5 / 3)
