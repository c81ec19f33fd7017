"""PPO / GPPO / GSPO / CISPO clipping, GPPO's SFT term, k3 KL: values and autograd gradients against the worked numbers
in docs/methods/grpo_clipping.md#how-it-is-tested, docs/methods/grpo_advantages.md#how-it-is-tested,
docs/methods/gspo.md#how-it-is-tested and docs/methods/cispo.md#how-it-is-tested, plus a comparison with TRL 1.16's own
``GRPOTrainer._compute_loss`` run on the same tensors."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rl_parts import (
    aggregate,
    cispo_clip,
    clip,
    dapo,
    gppo_clip,
    group,
    grpo,
    gspo_clip,
    nsr,
    ppo_clip,
    psr,
    w_reinforce,
)

from posttrain.families.rl.aggregations.delta_l import delta_l_weights
from posttrain.families.rl.parts import CLIPPINGS
from posttrain.families.rl.policy_losses.grpo import gppo_sft_loss, kl_k3, kl_k3_bias_corrected

ATOL = 2e-6


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), atol=atol, rtol=0)


def padded(rows, width, fill=0.0):
    out = torch.full((len(rows), width), fill)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def leaf(rho):
    return torch.log(rho).clone().requires_grad_(True)


def clip_metrics(out, mask):
    """Masked token fractions with TRL's names (what the trainer logs, over one micro-batch)."""
    m = mask.to(torch.float32)
    n = m.sum().clamp(min=1.0)

    def frac(x):
        return float((x.to(torch.float32) * m).sum() / n)

    return {"clip_ratio/low_mean": frac(out.low_clipped), "clip_ratio/high_mean": frac(out.high_clipped),
            "clip_ratio/region_mean": frac(out.low_clipped | out.high_clipped),
            "clip_ratio/gradient_preserved_mean": frac(out.gradient_preserved)}


def grad_of(loss, logps, retain=False):
    (g,) = torch.autograd.grad(loss, logps, retain_graph=retain)
    return g


# ---------------------------------------------------------------------------------------------------- batch of docs/methods/grpo_clipping.md

G_RHO_ROWS = [[1.0, 1.35], [0.7, 1.1, 1.0, 0.9], [1.15], [1.35, 1.0, 0.95], [1.0, 0.7], [0.7, 1.0, 1.35, 1.05]]
G_LEN = [2, 4, 1, 3, 2, 4]
G_MASK = padded([[1.0] * n for n in G_LEN], 4)
G_RHO = padded(G_RHO_ROWS, 4, fill=1.0)
G_R = torch.tensor([1.5, 0.5, 1.0, 0.5, 0.0, 1.5])
G_A = group(G_R, 3)


def test_ppo_clip_masks_and_metrics_grpo_example():
    logps = leaf(G_RHO)
    out = ppo_clip(logps, torch.zeros_like(logps), G_A, epsilon=0.2, epsilon_high=0.28)
    low = {tuple(i) for i in (out.low_clipped & (G_MASK > 0)).nonzero().tolist()}
    high = {tuple(i) for i in (out.high_clipped & (G_MASK > 0)).nonzero().tolist()}
    assert low == {(1, 0), (4, 1)}
    assert high == {(0, 1), (5, 2)}
    assert not out.low_clipped[3, 0] and not out.high_clipped[3, 0]  # A<0, rho 1.35: not clipped
    assert not out.gradient_preserved.any() and not out.dual_clipped.any()
    m = clip_metrics(out, G_MASK)
    assert m["clip_ratio/low_mean"] == pytest.approx(0.125)
    assert m["clip_ratio/high_mean"] == pytest.approx(0.125)
    assert m["clip_ratio/region_mean"] == pytest.approx(0.25)
    # Clipped tokens have exactly zero gradient; A<0 with rho>1+eps_high keeps -A*rho.
    g = grad_of((out.per_token_loss * G_MASK).sum(), logps)
    for t in [(1, 0), (4, 1), (0, 1), (5, 2)]:
        assert g[t].item() == 0.0
    assert g[3, 0].item() == pytest.approx(-G_A[3].item() * 1.35, abs=1e-6)


def test_ppo_epsilon_high_defaults_to_epsilon():
    logps = leaf(torch.tensor([[1.25, 0.75]]))
    out = ppo_clip(logps, torch.zeros_like(logps), torch.tensor([1.0]), epsilon=0.2)
    assert out.high_clipped[0, 0] and not out.low_clipped.any()
    close(out.per_token_loss, [[-1.2, -0.75]])


def test_on_policy_no_clipping_and_grad_is_minus_a():
    logps = torch.randn(6, 4).requires_grad_(True)
    out = ppo_clip(logps, logps.detach(), G_A, epsilon=0.2, epsilon_high=0.28)
    assert not (out.low_clipped | out.high_clipped).any()
    g = grad_of(dapo(out.per_token_loss, G_MASK), logps)
    close(g, (-G_A / 16).unsqueeze(1) * G_MASK)


def test_kl_k3_values_and_grad():
    ref = torch.zeros(3)
    logps = torch.tensor([0.1, -0.2, 0.0], requires_grad=True)
    k3 = kl_k3(logps, ref)
    close(k3, [0.004837, 0.021403, 0.0])
    close(grad_of(k3.sum(), logps), [0.095163, -0.221403, 0.0])
    # ref == policy: k3 = 0 and zero gradient.
    lp = torch.randn(5, requires_grad=True)
    k = kl_k3(lp, lp.detach())
    assert torch.equal(k.detach(), torch.zeros(5))
    assert torch.equal(grad_of(k.sum(), lp), torch.zeros(5))


def test_kl_bias_correction_value_and_gradient():
    """k3 vs k3*rho (method.use_bias_correction_kl). logp -1.0, ref -1.5: d = -0.5, k3 = e^-0.5 + 0.5 - 1 = 0.106531,
    plain gradient 1 - e^-0.5 = 0.393469. Off-policy (old -1.2, rho = e^0.2 = 1.221403): k3*rho = 0.130117 with gradient
    rho*(k3 + 1 - e^d) = 0.610701. On-policy (old = logp): value unchanged (0.106531), gradient k3 + 1 - e^d = 0.5."""
    ref = torch.tensor([-1.5])
    logps = torch.tensor([-1.0], requires_grad=True)
    plain = kl_k3(logps, ref)
    close(plain, [0.106531])
    close(grad_of(plain.sum(), logps), [0.393469])
    off = kl_k3_bias_corrected(logps, ref, torch.tensor([-1.2]))
    close(off, [0.130117])
    close(grad_of(off.sum(), logps), [0.610701])
    on = kl_k3_bias_corrected(logps, ref, logps.detach())
    close(on, plain.detach())
    close(grad_of(on.sum(), logps), [0.5])


# ---------------------------------------------------------------------------------------------------- PSR / NSR / W

CORRECT = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])


def nr_loss(estimator, rho=G_RHO, **kw):
    a, keep = estimator(CORRECT, **kw)
    logps = leaf(rho)
    out = ppo_clip(logps, torch.zeros_like(logps), a, epsilon=0.2)  # symmetric eps 0.2
    mask = G_MASK * keep.unsqueeze(1)
    loss = dapo(out.per_token_loss, mask)
    return loss, grad_of(loss, logps) * G_MASK


def test_psr_worked_example():
    loss, g = nr_loss(psr, rho=torch.ones(6, 4))
    assert loss.item() == pytest.approx(-1.0, abs=1e-7)
    close(g, padded([[-1 / 7] * 2, [], [-1 / 7], [], [], [-1 / 7] * 4], 4))
    loss, g = nr_loss(psr)
    assert loss.item() == pytest.approx(-1.042857, abs=ATOL)
    close(g, padded([[-0.142857, 0], [], [-0.164286], [], [], [-0.1, -0.142857, 0, -0.15]], 4))


def test_nsr_worked_example():
    loss, g = nr_loss(nsr, rho=torch.ones(6, 4))
    assert loss.item() == pytest.approx(1.0, abs=1e-7)
    close(g, padded([[], [1 / 9] * 4, [], [1 / 9] * 3, [1 / 9] * 2, []], 4))
    loss, g = nr_loss(nsr)
    assert loss.item() == pytest.approx(0.988889, abs=ATOL)
    close(g, padded([[], [0, 0.122222, 0.111111, 0.1], [], [0.15, 0.111111, 0.105556], [0.111111, 0], []], 4))


def test_w_reinforce_worked_example():
    loss, g = nr_loss(w_reinforce, rho=torch.ones(6, 4), lam=0.1)
    assert loss.item() == pytest.approx(0.518750, abs=1e-7)
    close(g, padded([[-0.00625] * 2, [0.0625] * 4, [-0.00625], [0.0625] * 3, [0.0625] * 2, [-0.00625] * 4], 4))
    loss, g = nr_loss(w_reinforce, lam=0.1)
    assert loss.item() == pytest.approx(0.510625, abs=ATOL)
    close(
        g,
        padded(
            [
                [-0.00625, 0],
                [0, 0.06875, 0.0625, 0.05625],
                [-0.0071875],
                [0.084375, 0.0625, 0.059375],
                [0.0625, 0],
                [-0.004375, -0.00625, 0, -0.0065625],
            ],
            4,
        ),
    )


def test_w_reinforce_lambda1_is_reinforce_pm1_not_psr_plus_nsr():
    loss_w, g_w = nr_loss(w_reinforce, lam=1.0)
    # REINFORCE with +/-1 rewards, no baseline: advantage = reward in {+1,-1}, token mean over all 16 tokens.
    logps = leaf(G_RHO)
    out = ppo_clip(logps, torch.zeros_like(logps), 2 * CORRECT - 1, epsilon=0.2)
    ref = dapo(out.per_token_loss, G_MASK)
    assert loss_w.item() == pytest.approx(ref.item(), abs=1e-7)
    close(g_w, grad_of(ref, logps) * G_MASK, atol=1e-7)
    assert loss_w.item() == pytest.approx(0.1, abs=ATOL)
    # On-policy it is exactly REINFORCE: sum_i r_i * sum_t logp (no ratio), token mean.
    lp = torch.randn(6, 4).requires_grad_(True)
    a, _ = w_reinforce(CORRECT, lam=1.0)
    g1 = grad_of(dapo(ppo_clip(lp, lp.detach(), a).per_token_loss, G_MASK), lp)
    g2 = grad_of(-((2 * CORRECT - 1).unsqueeze(1) * lp * G_MASK).sum() / 16, lp)
    close(g1, g2, atol=1e-7)
    psr_plus_nsr = nr_loss(psr)[0] + nr_loss(nsr)[0]
    assert psr_plus_nsr.item() == pytest.approx(-0.053968, abs=ATOL)


def test_w_gradient_symmetry():
    # Unclipped tokens with the same rho: correct gradient = -lambda * incorrect gradient.
    _, g = nr_loss(w_reinforce, lam=0.1)
    assert g[0, 0].item() == pytest.approx(-0.1 * g[1, 2].item(), abs=1e-8)  # both rho = 1.0


# Dropped rows leave every denominator (docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce), whatever the aggregation. On-policy
# (rho = 1) the per-token loss is -A_i, so by hand, with L = [2,4,1,3,2,4], T = 4, K the kept rows, B = |K|,
# N = sum_K L_i, and ΔL weights w_i = L_i^-0.75 / mean_K L_j^-0.75:
#   dapo = bnpo = sum_K -A_i L_i / N;  grpo = sum_K -A_i / B;  dr_grpo = sum_K -A_i L_i / (B T);
#   delta_l = sum_K -A_i L_i w_i / (B T);  per-token gradient: -A_i/N, -A_i/(B L_i), -A_i/(B T), -A_i w_i/(B T).
# PSR keeps rows 0, 2, 5 (B 3, N 7); NSR rows 1, 3, 4 (B 3, N 9); W-REINFORCE (lambda 0.1) with row 4's reward NaN
# keeps rows 0, 1, 2, 3, 5 (B 5, N 14).
NR_REWARDS = {"psr": CORRECT, "nsr": CORRECT, "w_reinforce": torch.tensor([1.0, 0.0, 1.0, 0.0, float("nan"), 1.0])}
NR_EXPECTED = {
    ("psr", "dapo"): (-1.0, [-1 / 7, 0, -1 / 7, 0, 0, -1 / 7]),
    ("psr", "bnpo"): (-1.0, [-1 / 7, 0, -1 / 7, 0, 0, -1 / 7]),
    ("psr", "grpo"): (-1.0, [-1 / 6, 0, -1 / 3, 0, 0, -1 / 12]),
    ("psr", "dr_grpo"): (-0.583333, [-1 / 12, 0, -1 / 12, 0, 0, -1 / 12]),
    ("psr", "delta_l"): (-0.462414, [-0.076303, 0, -0.128326, 0, 0, -0.045370]),
    ("nsr", "dapo"): (1.0, [0, 1 / 9, 0, 1 / 9, 1 / 9, 0]),
    ("nsr", "bnpo"): (1.0, [0, 1 / 9, 0, 1 / 9, 1 / 9, 0]),
    ("nsr", "grpo"): (1.0, [0, 1 / 12, 0, 1 / 9, 1 / 6, 0]),
    ("nsr", "dr_grpo"): (0.75, [0, 1 / 12, 0, 1 / 12, 1 / 12, 0]),
    ("nsr", "delta_l"): (0.706547, [0, 0.063733, 0, 0.079081, 0.107186, 0]),
    ("w_reinforce", "dapo"): (0.45, [-0.1 / 14, 1 / 14, -0.1 / 14, 1 / 14, 0, -0.1 / 14]),
    ("w_reinforce", "bnpo"): (0.45, [-0.1 / 14, 1 / 14, -0.1 / 14, 1 / 14, 0, -0.1 / 14]),
    ("w_reinforce", "grpo"): (0.34, [-0.01, 0.05, -0.02, 0.066667, 0, -0.005]),
    ("w_reinforce", "dr_grpo"): (0.315, [-0.005, 0.05, -0.005, 0.05, 0, -0.005]),
    ("w_reinforce", "delta_l"): (0.216204, [-0.005424, 0.032254, -0.009123, 0.040021, 0, -0.003225]),
}


@pytest.mark.parametrize("estimator,aggregation", list(NR_EXPECTED))
def test_dropped_rows_leave_every_aggregation(estimator, aggregation):
    fn = {"psr": psr, "nsr": nsr, "w_reinforce": w_reinforce}[estimator]
    a, keep = fn(NR_REWARDS[estimator])
    logps = leaf(torch.ones(6, 4))
    per_token = ppo_clip(logps, logps.detach(), a, epsilon=0.2).per_token_loss
    mask = G_MASK * keep.unsqueeze(1)  # what the trainer passes: dropped rows fully masked
    options = {"num_items_in_batch": mask.sum()} if aggregation == "dapo" else {}
    if aggregation in ("grpo", "dr_grpo", "delta_l"):
        options["num_rows"] = keep.sum()
    if aggregation in ("dr_grpo", "delta_l"):
        options["max_completion_length"] = 4
    if aggregation == "delta_l":
        options["row_weights"] = delta_l_weights(mask, alpha=0.75)
    loss = aggregate(aggregation, per_token, mask, **options)
    value, grads = NR_EXPECTED[estimator, aggregation]
    assert loss.item() == pytest.approx(value, abs=ATOL)
    close(grad_of(loss, logps), torch.tensor(grads).unsqueeze(1) * G_MASK)
    if aggregation in ("grpo", "dr_grpo", "delta_l"):  # split over 2 processes x 2 micro-batches: same total
        total = sum(
            aggregate(aggregation, per_token[rows], mask[rows], num_processes=2,
                      **{**options, **({"row_weights": options["row_weights"][rows]} if "row_weights" in options else {})})
            for rows in (slice(0, 2), slice(2, 3), slice(3, 5), slice(5, 6))
        ) / 2  # DDP averages the two processes' gradients
        assert total.item() == pytest.approx(value, abs=ATOL)


def test_empty_included_set_gives_zero_loss():
    a, keep = psr(torch.zeros(4))
    logps = torch.randn(4, 3).requires_grad_(True)
    out = ppo_clip(logps, logps.detach(), a)
    loss = dapo(out.per_token_loss, torch.ones(4, 3) * keep.unsqueeze(1))
    assert loss.item() == 0.0
    assert torch.equal(grad_of(loss, logps), torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------------------- GPPO

P_REWARDS = torch.tensor([1.0, -1.0, -1.0, 1.0])
P_A = group(P_REWARDS, 4)
P_DELTA_ROWS = [[1.0, 1.5], [0.5, 1.5], [12.0], [0.5, 1.1, 1.0]]
P_MASK = padded([[1.0] * len(r) for r in P_DELTA_ROWS], 3)
P_DELTA = padded(P_DELTA_ROWS, 3, fill=1.0)
P_VALUES = padded([[-0.865950, -1.108417], [0.692760, 1.298926], [10.391405], [-0.432975, -0.952545, -0.865950]], 3)
PPO_GRAD = padded([[-0.108244, 0], [0, 0.162366], [1.298926], [-0.054122, -0.119068, -0.108244]], 3)
GPPO_GRAD = padded([[-0.108244, -0.138552], [0.086595, 0.162366], [1.298926], [-0.054122, -0.119068, -0.108244]], 3)


def run(fn, delta=P_DELTA, mask=P_MASK, **kw):
    logps = leaf(delta)
    out = fn(logps, torch.zeros_like(logps), P_A, **kw)
    loss = dapo(out.per_token_loss, mask)
    return out, loss, grad_of(loss, logps) * mask


def test_gppo_advantages():
    close(P_A, [0.865950, -0.865950, -0.865950, 0.865950])


def test_gppo_forward_equals_ppo_clip_higher():
    ppo, lp, gp = run(ppo_clip, epsilon=0.2, epsilon_high=0.28)
    gppo, lg, gg = run(gppo_clip, epsilon=0.2, epsilon_high=0.28)
    close(ppo.per_token_loss * P_MASK, P_VALUES)
    assert torch.equal(gppo.per_token_loss, ppo.per_token_loss)
    assert lp.item() == pytest.approx(1.019657, abs=ATOL) and lg.item() == pytest.approx(1.019657, abs=ATOL)
    close(gp, PPO_GRAD)
    close(gg, GPPO_GRAD)
    assert gg[0, 1].item() == pytest.approx(-(1 + 0.28) * 0.865950 / 8, abs=1e-6)
    assert gg[1, 0].item() == pytest.approx((1 - 0.2) * 0.865950 / 8, abs=1e-6)
    assert gppo.gradient_preserved.nonzero().tolist() == [[0, 1], [1, 0]]
    assert clip_metrics(gppo, P_MASK)["clip_ratio/gradient_preserved_mean"] == pytest.approx(0.25)


def test_gppo_dual_clip():
    for fn in (ppo_clip, gppo_clip):
        out, loss, g = run(fn, epsilon=0.2, epsilon_high=0.28, dual_clip_c=10.0)
        assert out.per_token_loss[2, 0].item() == pytest.approx(8.659504, abs=1e-5)
        assert loss.item() == pytest.approx(0.803169, abs=ATOL)
        assert g[2, 0].item() == 0.0
        assert out.dual_clipped.nonzero().tolist() == [[2, 0]]
    _, _, g = run(gppo_clip, epsilon=0.2, epsilon_high=0.28, dual_clip_c=10.0)
    expected = GPPO_GRAD.clone()
    expected[2, 0] = 0.0
    close(g, expected)


def test_gppo_general_beta():
    out, loss, g = run(gppo_clip, epsilon=0.2, epsilon_high=0.28, beta1=0.25, beta2=1.0)
    assert out.per_token_loss[1, 0].item() == pytest.approx(0.173190, abs=ATOL)
    assert g[1, 0].item() == pytest.approx(0.021649, abs=ATOL)
    assert loss.item() == pytest.approx(0.954710, abs=ATOL)


def test_gppo_only_high():
    out, _, g = run(gppo_clip, epsilon=0.2, epsilon_high=0.28, only_high=True)
    close(out.per_token_loss * P_MASK, P_VALUES)
    assert g[1, 0].item() == 0.0
    assert g[0, 1].item() == pytest.approx(-(1 + 0.28) * 0.865950 / 8, abs=1e-6)
    assert out.gradient_preserved.nonzero().tolist() == [[0, 1]]


def test_gppo_clipped_gradient_independent_of_delta_and_equal_inside_band():
    for d_high, d_low in [(1.3, 0.79), (3.0, 0.3), (1e6, 1e-6)]:
        delta = P_DELTA.clone()
        delta[0, 1], delta[1, 0] = d_high, d_low
        _, _, g = run(gppo_clip, delta=delta)
        assert g[0, 1].item() == pytest.approx(-1.28 * 0.865950 / 8, abs=1e-6)
        assert g[1, 0].item() == pytest.approx(0.8 * 0.865950 / 8, abs=1e-6)
    inside = padded([[0.9, 1.1], [1.2, 0.85], [1.0], [0.95, 1.05, 1.25]], 3, fill=1.0)
    po, lp, gp = run(ppo_clip, delta=inside, epsilon=0.2, epsilon_high=0.28)
    go, lg, gg = run(gppo_clip, delta=inside, epsilon=0.2, epsilon_high=0.28)
    assert torch.equal(po.per_token_loss, go.per_token_loss) and torch.equal(gp, gg)


def test_gppo_huge_delta_no_nan():
    logps = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)  # exp overflows to inf / underflows to 0
    for a in (1.0, -1.0):
        out = gppo_clip(logps, torch.zeros_like(logps), torch.tensor([a]), dual_clip_c=10.0)
        g = grad_of(out.per_token_loss.sum(), logps)
        assert torch.isfinite(out.per_token_loss).all() and torch.isfinite(g).all()
    out = gppo_clip(logps, torch.zeros_like(logps), torch.tensor([1.0]))
    close(grad_of(out.per_token_loss.sum(), logps), [[-1.28, -1.0 * 0.0, -1.0]])


def test_gppo_sft_term():
    correct = P_REWARDS == 1.0
    logps_val = torch.full((4, 3), -0.5)
    logps = logps_val.clone().requires_grad_(True)
    old = logps_val - torch.log(P_DELTA)  # same delta table as above
    out = gppo_clip(logps, old, P_A)
    sft = gppo_sft_loss(logps, P_MASK, correct, coef=0.1)
    assert sft.item() == pytest.approx(0.05, abs=1e-7)
    g_sft = grad_of(sft, logps, retain=True) * P_MASK
    close(g_sft, padded([[-0.02] * 2, [], [], [-0.02] * 3], 3))
    total = dapo(out.per_token_loss, P_MASK) + sft
    assert total.item() == pytest.approx(1.069657, abs=ATOL)
    close(grad_of(total, logps) * P_MASK, GPPO_GRAD + padded([[-0.02] * 2, [], [], [-0.02] * 3], 3))
    assert gppo_sft_loss(logps, P_MASK, correct, coef=0.0).item() == 0.0
    none = gppo_sft_loss(logps, P_MASK, torch.zeros(4, dtype=torch.bool), coef=0.1)
    assert none.item() == 0.0 and torch.equal(grad_of(none, logps), torch.zeros(4, 3))
    # Global normaliser: 10 correct tokens across the accumulated batch halves the per-token gradient.
    close(grad_of(gppo_sft_loss(logps, P_MASK, correct, 0.1, num_correct_tokens=10), logps)[0, 0], -0.01)


def test_every_clipping_rule_has_the_one_signature():
    """``fn(logps, old_logps, advantages, mask, opts)`` for every registered rule; its keys are read from the params."""
    import inspect

    for entry in CLIPPINGS:
        assert list(inspect.signature(entry.fn).parameters) == ["logps", "old_logps", "advantages", "mask", "opts"]
    logps = leaf(P_DELTA)
    old = torch.zeros_like(logps)
    a = clip("gppo", logps, old, P_A, epsilon=0.2, epsilon_high=0.28, gppo_beta1=0.25, gppo_only_high=False)
    b = gppo_clip(logps, old, P_A, beta1=0.25)
    assert torch.equal(a.per_token_loss, b.per_token_loss)
    assert torch.equal(clip("ppo", logps, old, P_A, epsilon=0.2).per_token_loss,
                       ppo_clip(logps, old, P_A).per_token_loss)
    with pytest.raises(ValueError):
        CLIPPINGS["sapo"]
    assert CLIPPINGS.names() == ("ppo", "gppo", "gspo", "cispo")


# ---------------------------------------------------------------------------------------------------- GSPO / CISPO

# docs/methods/gspo.md#how-it-is-tested: four rows, per-token log-ratios to the old policy (padding garbage after them)
S_LOGRATIO = padded([[0.1, -0.3], [0.4, 0.2, 0.3], [-0.5], [0.5, 0.7]], 3, fill=7.0)
S_MASK = padded([[1.0] * 2, [1.0] * 3, [1.0], [1.0] * 2], 3)
S_A = torch.tensor([1.0, 0.5, -1.0, -1.0])


def test_gspo_clips_whole_sequences_on_the_length_normalised_ratio():
    old = torch.randn(4, 3)
    logps = (old + S_LOGRATIO).requires_grad_(True)
    out = gspo_clip(logps, old, S_A, S_MASK, epsilon=0.2, epsilon_high=0.28)
    # s_i = exp(mean log-ratio) = [0.904837, 1.349859, 0.606531, 1.822119], the same on every token of a row
    close(out.ratio[:, 0], [0.904837, 1.349859, 0.606531, 1.822119], atol=1e-6)
    assert torch.equal(out.ratio, out.ratio[:, :1].expand(4, 3))
    assert out.high_clipped[1].all() and out.low_clipped[2].all()  # A>0, s>1.28; A<0, s<0.8
    assert not (out.high_clipped[[0, 2, 3]].any() or out.low_clipped[[0, 1, 3]].any())  # row 3: A<0, s>1.28 kept
    close(out.per_token_loss[:, 0], [-0.904837, -0.64, 0.8, 1.822119], atol=1e-6)
    loss = grpo(out.per_token_loss, S_MASK)  # the paper's per-sequence mean
    assert loss.item() == pytest.approx(0.269320, abs=1e-6)
    # d/dlogp_{i,t} = -A_i s_i / |y_i| / B on unclipped rows, 0 on clipped rows and padding
    close(grad_of(loss, logps), padded([[-0.113105] * 2, [0.0] * 3, [0.0], [0.227765] * 2], 3), atol=1e-6)


def test_gspo_on_policy_equals_ppo_and_a_one_token_row_is_ppo():
    logps = leaf(torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    a = torch.tensor([0.7, -1.3])
    gspo = grpo(gspo_clip(logps, logps.detach(), a, S_MASK[:2]).per_token_loss, S_MASK[:2])
    g_gspo = grad_of(gspo, logps)
    lp = leaf(torch.ones(2, 3))
    ppo = grpo(ppo_clip(lp, lp.detach(), a).per_token_loss, S_MASK[:2])
    assert gspo.item() == pytest.approx(ppo.item(), abs=1e-7)
    close(g_gspo, grad_of(ppo, lp))  # on-policy (s = 1) GSPO's gradient is GRPO's with grpo aggregation
    one = leaf(torch.tensor([[1.4, 0.9, 0.9]]))  # a single scored token: the sequence ratio is the token ratio
    m = torch.tensor([[1.0, 0.0, 0.0]])
    assert torch.equal(gspo_clip(one, torch.zeros(1, 3), torch.tensor([1.0]), m, 0.2, 0.28).per_token_loss[0, 0],
                       ppo_clip(one, torch.zeros(1, 3), torch.tensor([1.0]), 0.2, 0.28).per_token_loss[0, 0])


def test_cispo_weights_are_clipped_detached_and_every_token_keeps_a_gradient():
    # docs/methods/cispo.md#how-it-is-tested: ratios e^0.2, e^-0.3 (A = +1) and e^0.5 (A = -0.5), weight_max 1.2
    logps = torch.tensor([[-1.0, -0.5], [-2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -0.2], [-2.5, 0.0]])
    a = torch.tensor([1.0, -0.5])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = cispo_clip(logps, old, a, weight_max=1.2)
    close(out.ratio * m, [[1.221403, 0.740818], [1.648721, 0.0]], atol=1e-6)
    close(out.per_token_loss * m, [[1.2, 0.370409], [-1.2, 0.0]], atol=1e-6)  # -w * A * logp
    assert torch.equal(out.high_clipped & m.bool(), torch.tensor([[True, False], [True, False]]))
    assert not out.low_clipped.any() and torch.equal(out.gradient_preserved, out.high_clipped)
    close(grad_of((out.per_token_loss * m).sum(), logps), [[-1.2, -0.740818], [0.6, 0.0]], atol=1e-6)  # -w * A
    low = cispo_clip(logps, old, a, weight_max=1.2, weight_min=0.9)  # 1 - eps_low^IS = 0.9
    assert torch.equal(low.low_clipped & m.bool(), torch.tensor([[False, True], [False, False]]))
    close(grad_of((low.per_token_loss * m).sum(), logps), [[-1.2, -0.9], [0.6, 0.0]], atol=1e-6)
    # on-policy (w = 1): REINFORCE, -A * logp per token, and the same gradient as PPO's
    lp = leaf(torch.tensor([[0.5, 0.25]]))
    on = cispo_clip(lp, lp.detach(), torch.tensor([2.0]))
    close(on.per_token_loss, -2.0 * lp.detach())
    lp2 = leaf(torch.tensor([[0.5, 0.25]]))
    close(grad_of(on.per_token_loss.sum(), lp), grad_of(ppo_clip(lp2, lp2.detach(), torch.tensor([2.0])).per_token_loss.sum(), lp2))


# ---------------------------------------------------------------------------------------------------- TRL 1.16


def _trl_compute_loss(loss_type, logps, inputs, beta=0.0, max_completion_length=4, ga_steps=1,
                      importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28):
    """Run TRL's own ``GRPOTrainer._compute_loss`` (unbound) on a minimal stand-in ``self``.

    Only the model forward is stubbed (it returns ``logps``); the ratio, clipping, KL, aggregation and clip metrics
    are TRL's code. Needs TRL 1.16's attribute names; if TRL renames them this test fails loudly.
    """
    from trl import GRPOTrainer

    metrics = defaultdict(lambda: defaultdict(list))
    acc = SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                          gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=ga_steps),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=ga_steps,
        accelerator=acc,
        max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=metrics,
    )
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, metrics["train"]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_trl_116_compute_loss(loss_type, beta):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    B, T = 6, 4
    mask = G_MASK.clone()
    mask[1, 3] = 0.0  # ragged
    old = torch.randn(B, T) * 0.3 - 1.0
    ref = old + torch.randn(B, T) * 0.1
    logps_val = old + torch.log(G_RHO)  # the rho table of docs/methods/grpo_clipping.md#how-it-is-tested, with non-zero old logps
    advantages = group(G_R, 3)  # TRL's advantage code lives inside _generate_and_score_completions; see report
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref

    lp_trl = logps_val.clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_compute_loss(loss_type, lp_trl, inputs, beta=beta)
    g_trl = grad_of(trl_loss, lp_trl)

    lp = logps_val.clone().requires_grad_(True)
    out = ppo_clip(lp, old, advantages, epsilon=0.2, epsilon_high=0.28)
    per_token = out.per_token_loss + (beta * kl_k3(lp, ref) if beta else 0.0)
    opts = {"max_completion_length": 4} if loss_type == "dr_grpo" else {}
    if loss_type == "dapo":
        opts = {"num_items_in_batch": mask.sum()}
    ours = aggregate(loss_type, per_token, mask, **opts)
    g = grad_of(ours, lp)

    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-7)
    torch.testing.assert_close(g, g_trl, atol=1e-8, rtol=1e-6)
    m = clip_metrics(out, mask)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert m[name] == pytest.approx(trl_metrics[name][0], abs=1e-7)
    if beta:
        kl_mean = ((kl_k3(lp, ref) * mask).sum() / mask.sum()).item()
        assert kl_mean == pytest.approx(trl_metrics["kl"][0], abs=1e-7)


def test_matches_trl_116_on_policy_without_old_logps():
    # TRL uses old = logps.detach() when no old logps are stored (num_iterations == 1).
    pytest.importorskip("trl")
    torch.manual_seed(1)
    logps_val = torch.randn(6, 4) - 1.0
    inputs = {
        "prompt_ids": torch.zeros(6, 1, dtype=torch.long),
        "prompt_mask": torch.ones(6, 1, dtype=torch.long),
        "completion_ids": torch.zeros(6, 4, dtype=torch.long),
        "completion_mask": G_MASK.long(),
        "advantages": G_A,
        "num_items_in_batch": G_MASK.sum(),
    }
    lp_trl = logps_val.clone().requires_grad_(True)
    trl_loss, _ = _trl_compute_loss("dapo", lp_trl, inputs)
    lp = logps_val.clone().requires_grad_(True)
    ours = dapo(ppo_clip(lp, lp.detach(), G_A, epsilon=0.2, epsilon_high=0.28).per_token_loss, G_MASK)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-7)
    torch.testing.assert_close(grad_of(ours, lp), grad_of(trl_loss, lp_trl), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("clipping", ["gspo", "cispo"])
def test_gspo_and_cispo_match_trl_116_compute_loss(clipping):
    """GSPO = TRL ``importance_sampling_level="sequence"`` with ``loss_type="grpo"`` (ranges 3e-4 / 4e-4 and wider ones);
    CISPO = TRL ``loss_type="cispo"`` (``epsilon_high`` is the weight's upper bound) with the dapo token mean: loss and
    gradient on the same off-policy tensors, ragged mask."""
    pytest.importorskip("trl")
    torch.manual_seed(3)
    B, T = 6, 4
    mask = G_MASK.clone()
    mask[1, 3] = 0.0
    old = torch.randn(B, T) * 0.3 - 1.0
    logps_val = old + torch.randn(B, T) * (0.05 if clipping == "gspo" else 0.4)
    advantages = group(G_R, 3)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    settings = [(3e-4, 4e-4), (0.01, 0.02)] if clipping == "gspo" else [(None, 1.2), (None, 5.0)]
    clipped_tokens = []
    for low, high in settings:
        lp_trl = logps_val.clone().requires_grad_(True)
        if clipping == "gspo":
            trl_loss, trl_metrics = _trl_compute_loss("grpo", lp_trl, inputs, importance_sampling_level="sequence",
                                                      epsilon_low=low, epsilon_high=high)
        else:
            trl_loss, trl_metrics = _trl_compute_loss("cispo", lp_trl, inputs, epsilon_high=high)
        lp = logps_val.clone().requires_grad_(True)
        if clipping == "gspo":
            out = gspo_clip(lp, old, advantages, mask, epsilon=low, epsilon_high=high)
            ours = grpo(out.per_token_loss, mask)
            clipped = (out.low_clipped | out.high_clipped)[:, 0].float().mean().item()  # one flag per sequence
            assert clipped == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=1e-7)
        else:
            out = cispo_clip(lp, old, advantages, weight_max=high)
            ours = dapo(out.per_token_loss, mask)
        clipped_tokens.append((out.low_clipped | out.high_clipped)[mask.bool()].float().mean().item())
        assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-7)
        torch.testing.assert_close(grad_of(ours, lp), grad_of(trl_loss, lp_trl), atol=1e-8, rtol=1e-6)
    assert 0 < clipped_tokens[0] < 1  # clipping is active, and not on every token
