"""Loss aggregation (grpo / bnpo / dr_grpo / dapo / delta_l) against the worked numbers of
docs/methods/grpo_aggregation.md#how-it-is-tested, values and per-token gradients (autograd on those inputs)."""

import pytest
import torch

from rl_parts import aggregate, bnpo, clip, dapo, delta_l, dr_grpo, group, grpo

from posttrain.families.rl.aggregations.delta_l import delta_l_weights
from posttrain.families.rl.parts import AGGREGATIONS
from posttrain.families.rl.policy_losses.grpo import kl_k3

ATOL = 2e-6
T_MAX = 4
R = torch.tensor([1.5, 0.5, 1.0, 0.5, 0.0, 1.5])
A = group(R, 3)  # [0.999800, -0.999800, 0, -0.218189, -0.872757, 1.090947]
RHO_ROWS = [[1.0, 1.35], [0.7, 1.1, 1.0, 0.9], [1.15], [1.35, 1.0, 0.95], [1.0, 0.7], [0.7, 1.0, 1.35, 1.05]]
LENGTHS = [2, 4, 1, 3, 2, 4]


def padded(rows, fill=0.0):
    out = torch.full((len(rows), T_MAX), fill)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


MASK = padded([[1.0] * n for n in LENGTHS])
RHO = padded(RHO_ROWS, fill=1.0)


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), atol=atol, rtol=0)


def surrogate(advantages=A, rho=RHO):
    """Per-token clipped surrogate (eps 0.2 / 0.28) from logps = log(rho), old = 0. Returns (loss, logps leaf)."""
    logps = torch.log(rho).clone().requires_grad_(True)
    out = clip("ppo", logps, torch.zeros_like(logps), advantages, MASK, epsilon=0.2, epsilon_high=0.28)
    return out.per_token_loss, logps


def loss_and_grad(fn, mask=MASK, advantages=A, rho=RHO, **kw):
    per_token, logps = surrogate(advantages, rho)
    loss = fn(per_token, mask, **kw)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.item(), grad * mask


def test_worked_example_per_token_loss():
    per_token, _ = surrogate()
    expected = padded(
        [
            [-0.999800, -1.279744],
            [0.799840, 1.099780, 0.999800, 0.899820],
            [0],
            [0.294556, 0.218189, 0.207280],
            [0.872757, 0.698206],
            [-0.763663, -1.090947, -1.396412, -1.145494],
        ]
    )
    close(per_token * MASK, expected)
    close((per_token * MASK).sum(-1), [-2.279544, 3.799240, 0, 0.720025, 1.570963, -4.396515])


def test_worked_example_loss_values():
    per_token, _ = surrogate()
    assert grpo(per_token, MASK).item() == pytest.approx(-0.043933, abs=ATOL)
    assert bnpo(per_token, MASK).item() == pytest.approx(-0.036614, abs=ATOL)
    assert dapo(per_token, MASK).item() == pytest.approx(-0.036614, abs=ATOL)
    assert dapo(per_token, MASK, num_items_in_batch=torch.tensor(16.0)).item() == pytest.approx(-0.036614, abs=ATOL)
    assert dr_grpo(per_token, MASK, T_MAX).item() == pytest.approx(-0.024410, abs=ATOL)


DAPO_GRAD = padded(
    [
        [-0.062488, 0],
        [0, 0.068736, 0.062488, 0.056239],
        [0],
        [0.018410, 0.013637, 0.012955],
        [0.054547, 0],
        [-0.047729, -0.068184, 0, -0.071593],
    ]
)


def test_dapo_gradient():
    _, g = loss_and_grad(dapo)
    close(g, DAPO_GRAD)


def test_dr_grpo_and_grpo_gradients():
    _, g = loss_and_grad(dr_grpo, max_completion_length=T_MAX)
    close(g, DAPO_GRAD * 16 / 24)  # -A*rho/24 instead of /16
    _, g = loss_and_grad(grpo)
    close(g[0, :2], [-0.083317, 0])
    n = MASK.sum(-1, keepdim=True)
    close(g, DAPO_GRAD * 16 / (6 * n))  # -A*rho/(6*N_i)


def test_truncated_row_masked():
    mask = MASK.clone()
    mask[1] = 0.0  # completion 1 truncated, mask_truncated_completions; advantages unchanged
    per_token, _ = surrogate()
    assert dapo(per_token, mask).item() == pytest.approx(-0.365423, abs=ATOL)
    assert grpo(per_token, mask).item() == pytest.approx(-0.202235, abs=ATOL)
    assert dr_grpo(per_token, mask, T_MAX).item() == pytest.approx(-0.182711, abs=ATOL)


def test_on_policy_dapo():
    loss, g = loss_and_grad(dapo, rho=torch.ones(6, T_MAX))
    assert loss == pytest.approx(0.002244, abs=ATOL)
    close(g, (-A / 16).unsqueeze(1).expand(6, T_MAX) * MASK)


def test_bnpo_equals_dapo_and_grpo_equals_bnpo_single_row():
    per_token, _ = surrogate()
    assert bnpo(per_token, MASK).item() == pytest.approx(dapo(per_token, MASK).item(), abs=1e-7)
    for i in range(6):
        assert grpo(per_token[i : i + 1], MASK[i : i + 1]).item() == pytest.approx(
            bnpo(per_token[i : i + 1], MASK[i : i + 1]).item(), abs=1e-7
        )


def test_dapo_global_normaliser_across_micro_batches_and_processes():
    # Two micro-batches (rows 0-2, 3-5) accumulated with N_glob=16 give the full-batch gradient; with 2 processes
    # each rank's loss is scaled by num_processes so that DDP averaging restores sum/N_glob.
    per_token, logps = surrogate()
    total = dapo(per_token[:3], MASK[:3], num_items_in_batch=16) + dapo(per_token[3:], MASK[3:], num_items_in_batch=16)
    (g,) = torch.autograd.grad(total, logps)
    close(g * MASK, DAPO_GRAD)
    per_token, logps = surrogate()
    ranks = [dapo(per_token[s], MASK[s], num_items_in_batch=16, num_processes=2) for s in (slice(0, 3), slice(3, 6))]
    (g,) = torch.autograd.grad(sum(ranks) / 2, logps)  # DDP mean over ranks
    close(g * MASK, DAPO_GRAD)


def test_empty_batch_gives_zero_not_nan():
    z = torch.zeros(2, 3)
    for name, kw in [("grpo", {}), ("bnpo", {}), ("dapo", {}), ("dr_grpo", {"max_completion_length": 3}),
                     ("delta_l", {"max_completion_length": 3, "row_weights": delta_l_weights(z)})]:
        assert aggregate(name, torch.ones(2, 3), z, **kw).item() == 0.0


def test_kl_term_with_ref_equal_policy_adds_nothing():
    per_token, logps = surrogate()
    kl = kl_k3(logps, logps.detach())
    loss = dapo(per_token + 0.04 * kl, MASK)
    (g,) = torch.autograd.grad(loss, logps)
    assert loss.item() == pytest.approx(-0.036614, abs=ATOL)
    close(g * MASK, DAPO_GRAD)


# ---------------------------------------------------------------------------------------------------- ΔL


def test_delta_l_weights_worked_example():
    w = delta_l_weights(MASK, alpha=0.75)
    close(w, [1.069750, 0.636077, 1.799098, 0.789249, 1.069750, 0.636077])
    assert w.sum().item() == pytest.approx(6.0, abs=1e-5)
    close(w / 24, [0.044573, 0.026503, 0.074962, 0.032885, 0.044573, 0.026503])
    close(w * A, [1.069536, -0.635950, 0, -0.172206, -0.933632, 0.693926])
    close(delta_l_weights(torch.tensor(LENGTHS), alpha=1.0), [1.058824, 0.529412, 2.117647, 0.705882, 1.058824, 0.529412])
    close(
        delta_l_weights(MASK, alpha=0.75, scope="group", num_generations=3),
        [0.915640, 0.544443, 1.539917, 0.948968, 1.286233, 0.764799],
    )


def test_delta_l_alpha075_loss_and_grad():
    loss, g = loss_and_grad(delta_l, max_completion_length=T_MAX, alpha=0.75)
    assert loss == pytest.approx(-0.023735, abs=ATOL)
    close(
        g,
        padded(
            [
                [-0.044564, 0],
                [0, 0.029148, 0.026498, 0.023848],
                [0],
                [0.009687, 0.007175, 0.006816],
                [0.038901, 0],
                [-0.020240, -0.028914, 0, -0.030359],
            ]
        ),
    )


def test_delta_l_equals_scaling_advantages():
    # Row weight on the surrogate == weight on the advantage (w > 0 never changes which tokens are clipped).
    w = delta_l_weights(MASK, alpha=0.75)
    loss_w, g_w = loss_and_grad(delta_l, max_completion_length=T_MAX, weights=w)
    loss_a, g_a = loss_and_grad(dr_grpo, advantages=w * A, max_completion_length=T_MAX)
    assert loss_w == pytest.approx(loss_a, abs=1e-7)
    close(g_w, g_a, atol=1e-7)


def test_delta_l_alpha1_loss_grad_and_grpo_proportionality():
    loss, g = loss_and_grad(delta_l, max_completion_length=T_MAX, alpha=1.0)
    assert loss == pytest.approx(-0.023259, abs=ATOL)
    close(
        g,
        padded(
            [
                [-0.044109, 0],
                [0, 0.024260, 0.022054, 0.019849],
                [0],
                [0.008663, 0.006417, 0.006096],
                [0.038504, 0],
                [-0.016845, -0.024065, 0, -0.025268],
            ]
        ),
    )
    factor = 6 / (T_MAX * sum(1 / n for n in LENGTHS))
    assert factor == pytest.approx(0.529412, abs=1e-6)
    loss_grpo, g_grpo = loss_and_grad(grpo)
    assert loss == pytest.approx(loss_grpo * factor, abs=1e-7)
    close(g, g_grpo * factor, atol=1e-7)


def test_delta_l_alpha0_is_dr_grpo_exactly():
    per_token, _ = surrogate()
    a = delta_l(per_token, MASK, T_MAX, alpha=0.0)
    assert a.item() == pytest.approx(-0.024410, abs=ATOL)
    assert torch.equal(a, dr_grpo(per_token, MASK, T_MAX))
    _, g1 = loss_and_grad(delta_l, max_completion_length=T_MAX, alpha=0.0)
    _, g2 = loss_and_grad(dr_grpo, max_completion_length=T_MAX)
    assert torch.equal(g1, g2)


def test_delta_l_weight_properties():
    lengths = torch.tensor([3.0, 7.0, 12.0, 5.0])
    for alpha in (0.0, 0.5, 0.75, 1.0):
        w = delta_l_weights(lengths, alpha=alpha)
        assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
        assert (w[0] / w[2]).item() == pytest.approx((12.0 / 3.0) ** alpha, rel=1e-5)
        close(delta_l_weights(lengths * 9.0, alpha=alpha), w, atol=1e-6)
        assert torch.equal(delta_l_weights(torch.full((4,), 6.0), alpha=alpha), torch.ones(4))
    # Zero-length rows get weight 0 and are left out of the mean; no NaN/inf.
    w = delta_l_weights(torch.tensor([0.0, 2.0, 4.0]), alpha=1.0)
    assert w[0].item() == 0.0 and torch.isfinite(w).all()
    close(w[1:], [4 / 3, 2 / 3])


def test_every_aggregation_has_the_one_signature():
    """``fn(per_token_loss, mask, normalizer)`` for every registered aggregation; what it divides by is read from the
    :class:`Normalizer`, never passed as keywords."""
    import inspect

    for entry in AGGREGATIONS:
        assert list(inspect.signature(entry.fn).parameters) == ["per_token_loss", "mask", "normalizer"], entry.name
    per_token, _ = surrogate()
    assert aggregate("grpo", per_token, MASK).item() == pytest.approx(-0.043933, abs=ATOL)
    assert aggregate("bnpo", per_token, MASK).item() == pytest.approx(-0.036614, abs=ATOL)
    assert aggregate("dapo", per_token, MASK, num_items_in_batch=16).item() == pytest.approx(-0.036614, abs=ATOL)
    assert aggregate("dr_grpo", per_token, MASK, max_completion_length=4).item() == pytest.approx(-0.024410, abs=ATOL)
    w = delta_l_weights(MASK, alpha=0.75)
    assert aggregate("delta_l", per_token, MASK, max_completion_length=4, row_weights=w).item() == pytest.approx(
        -0.023735, abs=ATOL)
    with pytest.raises(ValueError, match="row_weights"):
        aggregate("delta_l", per_token, MASK, max_completion_length=4)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate("dr_grpo", per_token, MASK)
    with pytest.raises(ValueError):
        AGGREGATIONS["seq_sum"]
    assert set(AGGREGATIONS.names()) == {"grpo", "bnpo", "dr_grpo", "dapo", "delta_l"}
