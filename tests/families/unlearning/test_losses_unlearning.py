"""Unlearning losses against docs/methods/npo.md#how-it-is-tested and docs/methods/rmu.md#how-it-is-tested (RMU also
against open-unlearning's formula, written out here)."""

import math

import pytest
import torch

import posttrain.methods  # noqa: F401  (registers the unlearning objectives)
from posttrain.families.unlearning.objective import UNLEARNING_OBJECTIVES, unlearning_objective
from posttrain.losses.unlearning import (
    ga_loss,
    npo_loss,
    npo_loss_at_reference,
    retain_kl_loss,
    retain_nll_loss,
    retain_token_kl_loss,
    rmu_activation_loss,
    rmu_control_vector,
    rmu_loss,
    simnpo_loss,
)


def close(a, b, atol=1e-5):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, atol=atol, rtol=0)


# worked-example inputs ------------------------------------------------------------------------------------------------


def forget_tokens():
    """Forget rows [-1, -2] and [-0.5] (padding masked out), as per-token [B, T]."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -7.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    return logps, mask


def retain_tokens():
    return torch.tensor([[-0.2, -0.4, -0.6]], requires_grad=True), torch.ones(1, 3)


def npo_tokens():
    """s_theta = [-10, -20], s_ref = [-8, -20] as per-token rows (sums), with a masked padding position."""
    policy = torch.tensor([[-4.0, -6.0, -99.0], [-5.0, -7.0, -8.0]], requires_grad=True)
    ref = torch.tensor([[-3.0, -5.0, -50.0], [-10.0, -5.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return policy, ref, mask


def kl_logits():
    p_ref = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]])
    p_theta = torch.tensor([[0.4, 0.4, 0.2], [0.6, 0.3, 0.1]])
    # log-probs are valid logits (log_softmax is shift-invariant); add an arbitrary per-row shift
    return (p_theta.log() + 3.0).requires_grad_(True), p_ref.log() - 1.5


# NPO ------------------------------------------------------------------------------------------------------------------


def test_npo_worked_example_values_weights_and_gradient():
    s_theta = torch.tensor([-10.0, -20.0], requires_grad=True)
    out = npo_loss(s_theta, torch.tensor([-8.0, -20.0]), beta=0.1)
    assert close(out.log_ratios, [-2.0, 0.0])
    assert close(out.losses, [11.962777, 13.862944])
    assert close(out.weights, [0.900332, 1.0])
    loss = out.losses.mean()
    assert close(loss, 12.912860)
    loss.backward()
    assert close(s_theta.grad, [0.450166, 0.5])  # W / B
    assert npo_loss_at_reference(0.1) == pytest.approx(13.862944, abs=1e-6)


def test_npo_per_token_inputs_are_summed_over_the_mask():
    policy, ref, mask = npo_tokens()
    out = npo_loss(policy, ref, beta=0.1, mask=mask)
    assert close(out.log_ratios, [-2.0, 0.0])
    assert close(out.losses, [11.962777, 13.862944])
    out.losses.mean().backward()
    # each answer token of row i gets W_i / B; the padding position gets nothing
    assert close(policy.grad, [[0.450166, 0.450166, 0.0], [0.5, 0.5, 0.5]])
    with pytest.raises(ValueError):
        npo_loss(policy, ref, beta=0.1)  # per-token without a mask


def test_npo_reference_side_is_stop_gradient():
    s_theta = torch.tensor([-10.0, -20.0], requires_grad=True)
    s_ref = torch.tensor([-8.0, -20.0], requires_grad=True)
    npo_loss(s_theta, s_ref, beta=0.1).losses.mean().backward()
    assert s_ref.grad is None


def test_npo_finite_difference_gradient():
    beta = 0.1
    s = torch.tensor([-10.0, -20.0])
    s_ref = torch.tensor([-8.0, -20.0])
    eps = 1e-2
    for i, expected in enumerate([0.450166, 0.5]):
        e = torch.zeros(2)
        e[i] = eps
        up = npo_loss(s + e, s_ref, beta).losses.mean()
        down = npo_loss(s - e, s_ref, beta).losses.mean()
        assert float((up - down) / (2 * eps)) == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0, 3.0])
def test_npo_at_reference_equals_sequence_ga_gradient(beta):
    policy, _, mask = npo_tokens()
    out = npo_loss(policy, policy.detach().clone(), beta=beta, mask=mask)
    assert close(out.losses, [2 / beta * math.log(2)] * 2, atol=1e-4)
    assert close(out.weights, [1.0, 1.0])
    out.losses.mean().backward()
    npo_grad = policy.grad.clone()
    policy.grad = None
    ga_loss(policy, mask, reduction="sequence").backward()
    assert close(npo_grad, policy.grad)
    assert close(npo_grad, [[0.5, 0.5, 0.0], [0.5, 0.5, 0.5]])


def test_npo_small_beta_limit_is_ga():
    s_theta = torch.tensor([-10.0, -20.0], dtype=torch.float64)
    s_ref = torch.tensor([-8.0, -20.0], dtype=torch.float64)
    out = npo_loss(s_theta, s_ref, beta=1e-4)
    # fp32 internals: (2/beta) log 2 = 13862.9 has an ulp of ~1e-3
    assert close(out.losses - npo_loss_at_reference(1e-4), [-1.9999, 0.0], atol=3e-3)
    assert close(out.weights, [0.9999, 1.0], atol=1e-6)

    # gradient w.r.t. the per-token log-probs converges to the sequence-level GA gradient (1/B per answer token)
    policy, ref, mask = npo_tokens()
    ga_loss(policy, mask, reduction="sequence").backward()
    ga_grad = policy.grad.clone()
    assert close(ga_grad, [[0.5, 0.5, 0.0], [0.5, 0.5, 0.5]])
    errors = []
    for beta in [1.0, 0.1, 0.01, 1e-3, 1e-4]:
        policy.grad = None
        npo_loss(policy, ref, beta=beta, mask=mask).losses.mean().backward()
        errors.append(float((policy.grad - ga_grad).abs().max()))
    # row 0 has D = -2: W = 2 sigmoid(-2 beta), so the error is (1 - W)/B ~ beta/2 for small beta
    assert errors == sorted(errors, reverse=True)
    assert errors[0] == pytest.approx(0.380797, abs=1e-6)  # (1 - 2 sigmoid(-2)) / 2
    assert errors[2] == pytest.approx(0.0049998, abs=1e-6)  # tanh(0.01) / 2
    assert errors[-1] < 1e-4


def test_npo_bounded_below_with_vanishing_gradient_while_ga_diverges():
    s_ref = torch.tensor([-8.0])
    prev = None
    for s in [-8.0, -50.0, -200.0, -1000.0]:
        s_theta = torch.tensor([s], requires_grad=True)
        out = npo_loss(s_theta, s_ref, beta=0.1)
        out.losses.sum().backward()
        value = float(out.losses.detach())
        assert value >= 0.0
        if prev is not None:
            assert value < prev
        prev = value
        ga = ga_loss(torch.tensor([[s]]), torch.ones(1, 1), reduction="sequence")
        assert float(ga) == s  # GA goes to -inf linearly, gradient constant 1
    assert prev < 1e-30  # D = -992: l = 20 softplus(-99.2) ~ 20 e^-99.2
    assert float(out.weights) < 1e-30 and float(s_theta.grad) < 1e-30
    # moderate D: D = -42 gives l = 20 softplus(-4.2) = 0.297685, W = 2 sigmoid(-4.2) = 0.029548
    out = npo_loss(torch.tensor([-50.0]), s_ref, beta=0.1)
    assert close(out.losses, [0.297685]) and close(out.weights, [0.029548])


def test_npo_increasing_in_policy_logp():
    s_theta = torch.linspace(-30, 0, 31, requires_grad=True)
    out = npo_loss(s_theta, torch.full((31,), -10.0), beta=0.1)
    assert torch.all(out.losses[1:] > out.losses[:-1])
    out.losses.sum().backward()
    assert torch.all(s_theta.grad > 0)  # descent lowers the forget likelihood


# GA / NLL -------------------------------------------------------------------------------------------------------------


def test_ga_token_and_sequence_reductions():
    logps, mask = forget_tokens()
    loss = ga_loss(logps, mask)
    assert close(loss, -1.166667)
    loss.backward()
    assert close(logps.grad, [[1 / 3, 1 / 3], [1 / 3, 0.0]])
    logps.grad = None
    seq = ga_loss(logps, mask, reduction="sequence")
    assert close(seq, -1.75)
    seq.backward()
    assert close(logps.grad, [[0.5, 0.5], [0.5, 0.0]])
    # num_items (accumulated label count) replaces the micro-batch count: -3.5 / 7 = -0.5
    assert close(ga_loss(logps, mask, num_items=7), -0.5)
    with pytest.raises(ValueError):
        ga_loss(logps, mask, reduction="mean")
    # non-finite padding never leaks
    padded = torch.tensor([[-1.0, -2.0], [-0.5, float("-inf")]])
    assert close(ga_loss(padded, mask), -1.166667) and close(ga_loss(padded, mask, reduction="sequence"), -1.75)


def test_retain_nll_pulls_retain_likelihood_up():
    logps, mask = retain_tokens()
    loss = retain_nll_loss(logps, mask)
    assert close(loss, 0.4)
    loss.backward()
    assert close(logps.grad, [[-1 / 3, -1 / 3, -1 / 3]])  # descent raises every retain log-prob


# SimNPO ---------------------------------------------------------------------------------------------------------------


def simnpo_rows():
    logps = torch.tensor(
        [[-0.1, -0.2, -0.3, -0.2, 0.0], [-0.5, -0.5, -0.4, -0.6, -0.5]], requires_grad=True
    )
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    return logps, mask


def test_simnpo_worked_example():
    logps, mask = simnpo_rows()
    out = simnpo_loss(logps, mask, beta=4.5, delta=0.0)
    assert close(out.avg_nll, [0.2, 0.5])
    assert close(out.losses, [0.151624, 0.044536])
    assert close(out.losses.mean(), 0.098080)
    assert close(0.125 * out.losses.mean(), 0.012260)
    # weight at delta 0 = 2 sigmoid(-beta * avgNLL): 2 sigmoid(-0.9) = 0.578101, 2 sigmoid(-2.25) = 0.190699
    assert close(out.weights, [0.578101, 0.190699])
    out.losses.sum().backward()
    # dl_i/dlogp_{i,t} = W_i / |y_i|  (descent lowers the forget likelihood)
    assert close(logps.grad, [[0.144525] * 4 + [0.0], [0.038140] * 5])


def test_simnpo_delta_is_a_margin():
    logps, mask = simnpo_rows()
    # delta = 0.2: z = 4.5 * ([0.2, 0.5] - 0.2) = [0, 1.35]; l = (2/4.5) * [log 2, softplus(-1.35)]
    out = simnpo_loss(logps, mask, beta=4.5, delta=0.2)
    assert close(out.losses, [0.308065, 0.102448])
    assert close(out.weights, [1.0, 0.411741])


# KL -------------------------------------------------------------------------------------------------------------------


def test_retain_kl_worked_example():
    policy, ref = kl_logits()
    assert close(retain_kl_loss(policy[:1], ref[:1]), 0.025267)
    assert close(retain_kl_loss(policy[1:], ref[1:]), 0.057536)
    kl = retain_kl_loss(policy, ref)
    assert close(kl, 0.041402)
    kl.backward()
    # d/dz_theta of KL(p_ref || softmax(z)) = (p_theta - p_ref) / N
    assert close(policy.grad, [[-0.05, 0.05, 0.0], [0.0, 0.05, -0.05]])


def test_retain_token_kl_worked_example_and_equal_to_the_logits_form():
    token_kl = torch.tensor([[0.02, 0.06, 0.1]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss = retain_token_kl_loss(token_kl, mask)
    assert close(loss, 0.04) and close(retain_token_kl_loss(token_kl, mask, num_items=4), 0.02)
    assert close(retain_token_kl_loss(token_kl), 0.06)  # no mask: every position
    loss.backward()
    assert close(token_kl.grad, [[0.5, 0.5, 0.0]])
    assert float(retain_token_kl_loss(token_kl, torch.zeros(1, 3)).detach()) == 0.0
    # the per-position KLs of the worked logits give retain_kl_loss's value, and the term accepts either form
    policy, ref = kl_logits()
    per_position = torch.nn.functional.kl_div(policy.log_softmax(-1), ref.log_softmax(-1), reduction="none",
                                              log_target=True).sum(-1)
    assert close(per_position, [0.025267, 0.057536])
    assert close(retain_token_kl_loss(per_position[None], torch.ones(1, 2)), 0.041402)
    f_logps, f_mask = forget_tokens()
    ga_kl = unlearning_objective("ga_kl", forget_logps=f_logps, forget_mask=f_mask,
                                 retain_token_kl=per_position[None].detach(), retain_kl_mask=torch.ones(1, 2))
    assert close(ga_kl.retain_loss, 0.041402) and ga_kl.metrics["retain_kl"] == pytest.approx(0.041402, abs=1e-6)


def test_retain_kl_masks_and_reference():
    policy, ref = kl_logits()
    # [B, T, V] = [1, 3, 3]: the two worked positions plus a third (prompt) position where the models agree
    extra = torch.tensor([[1.0, 2.0, 3.0]])
    p3 = torch.cat([policy.detach(), extra]).unsqueeze(0)
    r3 = torch.cat([ref, extra]).unsqueeze(0)
    # completion mask: only the worked positions count -> 0.041402; no mask: sum / (B*T) = 0.082803 / 3
    assert close(retain_kl_loss(p3, r3, torch.tensor([[1.0, 1.0, 0.0]])), 0.041402)
    assert close(retain_kl_loss(p3, r3), 0.027601)
    # zero, with zero gradient, at theta = theta_ref; reference detached
    same = ref.clone().requires_grad_(True)
    ref_req = ref.clone().requires_grad_(True)
    kl = retain_kl_loss(same, ref_req)
    kl.backward()
    assert abs(float(kl.detach())) < 1e-7 and float(same.grad.abs().max()) < 1e-7
    assert ref_req.grad is None
    with pytest.raises(ValueError):
        retain_kl_loss(policy, ref[:, :2])


# combiner -------------------------------------------------------------------------------------------------------------


def test_objective_npo_variants_worked_example():
    policy, ref, mask = npo_tokens()
    r_logps, r_mask = retain_tokens()
    kl_p, kl_r = kl_logits()

    npo = unlearning_objective("npo", forget_logps=policy, forget_mask=mask, forget_ref_logps=ref)
    assert close(npo.loss, 12.912860) and npo.retain_loss is None
    assert npo.metrics["npo/log_ratio_mean"] == pytest.approx(-1.0)
    assert npo.metrics["npo/weight_mean"] == pytest.approx(0.950166, abs=1e-6)
    assert npo.metrics["forget_nll"] == pytest.approx(6.0)  # mean token CE on forget: (10 + 20) / 5 tokens

    rt = unlearning_objective(
        "npo_rt", forget_logps=policy, forget_mask=mask, forget_ref_logps=ref, retain_logps=r_logps, retain_mask=r_mask
    )
    assert close(rt.loss, 13.312860)
    assert close(rt.forget_loss, 12.912860) and close(rt.retain_loss, 0.4)
    assert rt.metrics["retain_nll"] == pytest.approx(0.4)

    kl = unlearning_objective(
        "npo_kl",
        forget_logps=policy,
        forget_mask=mask,
        forget_ref_logps=ref,
        retain_logits=kl_p,
        retain_ref_logits=kl_r,
    )
    assert close(kl.loss, 12.954262)
    assert kl.metrics["retain_kl"] == pytest.approx(0.041402, abs=1e-6)
    assert set(kl.metrics) >= {"loss", "forget_loss", "retain_loss", "forget_nll", "npo/weight_mean"}


def test_objective_ga_grad_diff_simnpo():
    f_logps, f_mask = forget_tokens()
    r_logps, r_mask = retain_tokens()
    ga = unlearning_objective("ga", forget_logps=f_logps, forget_mask=f_mask)
    assert close(ga.loss, -1.166667) and ga.retain_loss is None
    gd = unlearning_objective(
        "grad_diff", forget_logps=f_logps, forget_mask=f_mask, retain_logps=r_logps, retain_mask=r_mask
    )
    assert close(gd.loss, -0.766667)  # -1.166667 + 0.4
    gd.loss.backward()
    assert close(r_logps.grad, [[-1 / 3] * 3]) and close(f_logps.grad, [[1 / 3, 1 / 3], [1 / 3, 0.0]])

    s_logps, s_mask = simnpo_rows()
    r_logps, r_mask = retain_tokens()
    sim = unlearning_objective(
        "simnpo", forget_logps=s_logps, forget_mask=s_mask, retain_logps=r_logps, retain_mask=r_mask
    )
    assert close(sim.forget_loss, 0.098080)
    assert close(sim.loss, 0.412260)  # 0.125 * 0.098080 + 1.0 * 0.4
    # explicit coefficients override the defaults
    sim2 = unlearning_objective(
        "simnpo", forget_logps=s_logps, forget_mask=s_mask, retain_logps=r_logps, retain_mask=r_mask,
        gamma=1.0, alpha=0.0,
    )  # fmt: skip
    assert close(sim2.loss, 0.098080) and sim2.retain_loss is None


def test_objective_defaults_and_errors():
    assert set(UNLEARNING_OBJECTIVES.names()) == {
        "ga", "grad_diff", "ga_kl", "npo", "npo_rt", "npo_kl", "simnpo", "rmu"}  # fmt: skip
    assert UNLEARNING_OBJECTIVES["npo"].alpha == 0.0 and UNLEARNING_OBJECTIVES["npo"].beta == 0.1
    simnpo = UNLEARNING_OBJECTIVES["simnpo"]
    assert (simnpo.forget, simnpo.retain, simnpo.gamma, simnpo.alpha, simnpo.beta, simnpo.delta) == (
        "simnpo", "nll", 0.125, 1.0, 4.5, 0.0)  # fmt: skip
    f_logps, f_mask = forget_tokens()
    with pytest.raises(ValueError, match="unknown unlearning method"):
        unlearning_objective("rmu", forget_logps=f_logps, forget_mask=f_mask)
    with pytest.raises(ValueError, match="forget_ref_logps"):
        unlearning_objective("npo", forget_logps=f_logps, forget_mask=f_mask)
    with pytest.raises(ValueError, match="retain_logps"):
        unlearning_objective("grad_diff", forget_logps=f_logps, forget_mask=f_mask)
    with pytest.raises(ValueError, match="retain_logits"):
        unlearning_objective("ga_kl", forget_logps=f_logps, forget_mask=f_mask)


# RMU ------------------------------------------------------------------------------------------------------------------

RMU_H = [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [5.0, 5.0]]]  # [B=2, T=2, d=2]
RMU_MASK = torch.tensor([[1, 1], [0, 1]])
RMU_U = torch.tensor([0.0, 2.0])


def test_rmu_activation_loss_worked_example_and_gradient():
    h = torch.tensor(RMU_H, requires_grad=True)
    loss = rmu_activation_loss(h, RMU_U, RMU_MASK)
    # row 0: ((1 + 0)/2 + (9 + 4)/2) / 2 = 3.5; row 1: (25 + 9)/2 / 1 = 17 (masked position left out); mean 10.25
    assert close(loss, 10.25)
    loss.backward()
    # d/dh = 2 (h - u) / (d * n_row * B) on masked positions
    assert close(h.grad, [[[0.25, 0.0], [0.75, 0.5]], [[0.0, 0.0], [2.5, 1.5]]])


def _open_unlearning_activation_loss(a1, a2, mask):
    """open-unlearning's ``RMU.compute_activation_loss`` (src/trainer/unlearn/rmu.py), written out."""
    squared_diff = torch.nn.functional.mse_loss(a1, a2, reduction="none")
    expanded = mask.unsqueeze(-1).expand_as(squared_diff)
    per_row = (squared_diff * expanded).mean(dim=2).sum(dim=1)
    return (per_row / mask.sum(dim=-1)).mean()


def test_rmu_matches_open_unlearnings_formula():
    torch.manual_seed(0)
    h, ref = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    control = rmu_control_vector(8, 6.5, seed=3)
    assert close(rmu_activation_loss(h, control, mask),
                 _open_unlearning_activation_loss(h, control.view(1, 1, 8).expand_as(h), mask.float()))
    assert close(rmu_activation_loss(h, ref, mask), _open_unlearning_activation_loss(h, ref, mask.float()))
    out = rmu_loss(h, mask, control, h + 0.1, ref, mask, gamma=0.5, alpha=3.0)
    expected = 0.5 * _open_unlearning_activation_loss(h, control.expand_as(h), mask.float()) + 3.0 * (
        _open_unlearning_activation_loss(h + 0.1, ref, mask.float()))
    assert close(out.loss, expected)
    assert close(out.metrics["forget_loss"], out.forget_loss) and close(out.metrics["retain_loss"], out.retain_loss)


def test_rmu_control_vector_is_a_seeded_uniform_direction_of_norm_c():
    u = rmu_control_vector(128, 20.0, seed=7)
    assert u.shape == (128,) and close(u.norm(), 20.0) and (u >= 0).all()  # torch.rand: a non-negative direction
    assert torch.equal(u, rmu_control_vector(128, 20.0, seed=7))  # every process / resumed run: the same vector
    assert not torch.equal(u, rmu_control_vector(128, 20.0, seed=8))
    assert torch.allclose(rmu_control_vector(128, 2.0, seed=7), u / 10, rtol=1e-6, atol=0)  # c scales it only


def test_rmu_loss_terms_and_retain_switch():
    h = torch.tensor(RMU_H, requires_grad=True)
    same = torch.tensor(RMU_H)
    out = rmu_loss(h, RMU_MASK, RMU_U, h, same, RMU_MASK, gamma=2.0, alpha=5.0)
    assert close(out.forget_loss, 10.25) and close(out.retain_loss, 0.0)  # retain states equal the frozen ones
    assert close(out.loss, 20.5)
    assert close(float(out.metrics["rmu/forget_activation_norm"]), (math.sqrt(5) + 5 + math.sqrt(50)) / 3)
    no_retain = rmu_loss(h, RMU_MASK, RMU_U, h, same, RMU_MASK, alpha=0.0)
    assert no_retain.retain_loss is None and "retain_loss" not in no_retain.metrics
    assert rmu_loss(h, RMU_MASK, RMU_U).retain_loss is None
    with pytest.raises(ValueError):
        rmu_loss(h, RMU_MASK, RMU_U, retain_activations=h)
    with pytest.raises(ValueError):
        rmu_control_vector(4, 0.0)
