"""Advantage estimators against the hand-computed numbers of docs/methods/grpo_advantages.md#how-it-is-tested,
docs/methods/rloo.md#how-it-is-tested and docs/methods/reinforce_pp.md#how-it-is-tested (REINFORCE++ also against
verl's published token-level formula, written out here)."""

import math

import pytest
import torch

from rl_parts import estimate, group, nsr, psr, reinforce_pp, rloo, stratified, w_reinforce

from posttrain.families.rl.advantages.stratified import stratified_stats
from posttrain.families.rl.common import Groups, combine_rewards, correctness, normalize_then_sum, stratum_ids
from posttrain.families.rl.parts import ADVANTAGES
from posttrain.methods import GRPOParams
from posttrain.rl.strata import count_tool_calls

ATOL = 2e-6

# worked example of docs/methods/grpo_advantages.md#how-it-is-tested: 2 prompts x 3 completions, two reward functions with weights [1.0, 0.5].
ACC = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
FMT = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
RPF = torch.tensor([ACC, FMT]).T
WEIGHTS = [1.0, 0.5]
R = torch.tensor([1.5, 0.5, 1.0, 0.5, 0.0, 1.5])


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.tensor(expected).double(), atol=atol, rtol=0)


def stats(r, size, strata, scale="stratum"):
    return stratified_stats(r, Groups(size, strata=torch.as_tensor(strata)),
                            GRPOParams(advantage="stratified", san_scale=scale))


# ---------------------------------------------------------------------------------------------------- GRPO


def test_combine_rewards_worked_example():
    close(combine_rewards(RPF, WEIGHTS), R.tolist())


def test_combine_rewards_all_nan_row_is_nan():
    rpf = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")]])
    r = combine_rewards(rpf, [1.0, 2.0])
    assert r[0].item() == 1.0 and math.isnan(r[1].item())


def test_group_scale_group():
    close(group(R, 3), [0.999800, -0.999800, 0, -0.218189, -0.872757, 1.090947])


def test_group_scale_batch():
    close(group(R, 3, scale_rewards="batch"), [0.825586, -0.825586, 0, -0.275195, -1.100782, 1.375977])


def test_group_scale_none():
    expected = [0.5, -0.5, 0, -0.166667, -0.666667, 0.833333]
    close(group(R, 3, scale_rewards="none"), expected)


def test_normalize_then_sum_worked_example():
    close(normalize_then_sum(RPF, 3, WEIGHTS), [0.865939, -0.865939, 0, -0.288646, -1.154585, 1.443231])


def test_group_equal_rewards_give_exact_zero():
    a = group(torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 1.0]), 3)
    assert torch.equal(a[:3], torch.zeros(3))


def test_group_nan_rows_excluded_and_zero():
    # Row 1 unscorable: the group statistics use rows 0 and 2 only (mean 1.25, std 0.353553).
    r = torch.tensor([1.5, float("nan"), 1.0])
    a = group(r, 3)
    assert a[1].item() == 0.0
    s = math.sqrt(0.125)
    close(a, [0.25 / (s + 1e-4), 0.0, -0.25 / (s + 1e-4)])
    # Only one scorable row in the group: no NaN, advantage 0.
    assert torch.equal(group(torch.tensor([2.0, float("nan")]), 2), torch.zeros(2))


def test_group_reward_scaling_invariance():
    # Scaling weights by c leaves A(group) unchanged up to the 1e-4 epsilon and scales A(none) by c.
    c = 3.0
    r2 = combine_rewards(RPF, [c * w for w in WEIGHTS])
    close(group(r2, 3), group(R, 3).tolist(), atol=2e-4)
    close(group(r2, 3, scale_rewards="none"), (c * group(R, 3, scale_rewards="none")).tolist())


def test_group_is_detached_and_validates():
    r = R.clone().requires_grad_(True)
    assert not group(r, 3).requires_grad
    with pytest.raises(ValueError):
        group(R, 4)
    with pytest.raises(ValueError):
        group(R, 3, scale_rewards="sequence")


# ---------------------------------------------------------------------------------------------------- Stratified

S_R = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
S_KEYS = torch.tensor([0, 0, 1, 1, 1, 1, 1, 3])


@pytest.mark.parametrize(
    "alpha,expected",
    [
        (1.0, [0.707007, -0.707007, 0, 0, 0.577250, 0.577250, -1.154501, 0]),
        (0.0, [0.499900, -1.499700, 0.499900, 0.499900, 0.865875, 0.865875, -0.865875, -0.865875]),
        (0.8, [0.665585, -0.865545, 0.099980, 0.099980, 0.634975, 0.634975, -1.096776, -0.173175]),
        (0.5, [0.603453, -1.103353, 0.249950, 0.249950, 0.721563, 0.721563, -1.010188, -0.432938]),
    ],
)
def test_stratified_worked_example(alpha, expected):
    close(stratified(S_R, 4, S_KEYS, alpha=alpha), expected)


def test_stratified_scale_none():
    close(stratified(S_R, 4, S_KEYS, alpha=1.0, scale="none"), [0.5, -0.5, 0, 0, 0.333333, 0.333333, -0.666667, 0])
    close(stratified(S_R, 4, S_KEYS, alpha=0.0, scale="none"), [0.25, -0.75, 0.25, 0.25, 0.5, 0.5, -0.5, -0.5])
    close(
        stratified(S_R, 4, S_KEYS, alpha=0.8, scale="none"),
        [0.45, -0.55, 0.05, 0.05, 0.366667, 0.366667, -0.633333, -0.1],
    )


def test_stratified_stats_worked_example():
    """The stratified metrics of docs/methods/grpo_advantages.md#metrics on its worked example, by hand.

    Strata: P1-k0 {1,0}, P1-k1 {1,1} (zero std), P2-k1 {1,1,0}, P2-k3 {0} (singleton): 2 per group, 1/4 singletons,
    1/3 of the multi-row strata with zero std. Group means 0.75 and 0.5; |mu_k - mu_g| is 0.25 on all of P1, 1/6 on
    P2-k1 and 0.5 on P2-k3: (4 * 0.25 + 3/6 + 0.5) / 8 = 0.25. |A_SAN - A_GN| from the alpha=1 and alpha=0 rows (docs/methods/grpo_advantages.md#how-it-is-tested):
    P1 0.207107 + 0.792693 + 0.4999 * 2, P2 0.288625 * 2 + 0.288626 + 0.865875; total 3.731351 / 8 = 0.466419.
    With san_scale="none": every P1 row differs by 0.25, P2 by 1/6 (x3) and 0.5, so 0.25.
    """
    st = stats(S_R, 4, S_KEYS)
    assert st["num_strata_per_group"] == 2.0
    assert st["frac_singleton_strata"] == pytest.approx(0.25)
    assert st["frac_zero_std_strata"] == pytest.approx(1 / 3)
    assert st["cross_stratum_bias"] == pytest.approx(0.25, abs=1e-6)
    assert st["adv_abs_diff"] == pytest.approx(0.466419, abs=1e-5)
    assert stats(S_R, 4, S_KEYS, scale="none")["adv_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    # one stratum per group: no bias, SAN == GN
    one = stats(S_R, 4, torch.zeros(8, dtype=torch.long))
    assert one["num_strata_per_group"] == 1.0 and one["cross_stratum_bias"] == 0.0 and one["adv_abs_diff"] == 0.0
    # a NaN reward leaves its row out: P1-k0 becomes a singleton {0}; P1's group mean is 2/3
    r = S_R.clone()
    r[0] = float("nan")
    st = stats(r, 4, S_KEYS)
    assert st["frac_singleton_strata"] == pytest.approx(0.5) and st["frac_zero_std_strata"] == pytest.approx(0.5)
    assert st["cross_stratum_bias"] == pytest.approx((2 / 3 + 2 * (1 / 3) + 3 / 6 + 0.5) / 7, abs=1e-6)


def test_stratified_theorem1_variance_reduction():
    # Thm. 1 on prompt 1, population variances, no std scaling: 0.1875 - 0.125 = 0.0625.
    san = stratified(S_R[:4], 4, S_KEYS[:4], alpha=1.0, scale="none")
    gn = stratified(S_R[:4], 4, S_KEYS[:4], alpha=0.0, scale="none")
    assert san.var(unbiased=False).item() == pytest.approx(0.125, abs=1e-7)
    assert gn.var(unbiased=False).item() == pytest.approx(0.1875, abs=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("scale", ["stratum", "none"])
def test_stratified_single_stratum_equals_grpo_exactly(alpha, scale):
    r = torch.tensor([1.5, 0.5, 1.0, 0.5, 0.0, 1.5, float("nan"), 2.0, 3.0])
    const = torch.full((9,), 7)
    base = group(r, 3, scale_rewards="group" if scale == "stratum" else "none")
    assert torch.equal(stratified(r, 3, const, alpha=alpha, scale=scale), base)


def test_stratified_alpha0_is_grpo_whatever_keys():
    assert torch.equal(stratified(S_R, 4, S_KEYS, alpha=0.0), group(S_R, 4))


def test_stratified_all_singletons_alpha1_is_zero():
    out = stratified(S_R, 4, torch.arange(8), alpha=1.0)
    assert torch.equal(out, torch.zeros(8))


def test_stratified_san_sums_to_zero_and_unit_variance_with_eps0():
    r = torch.tensor([0.3, 1.2, 0.7, 2.0, 5.0, -1.0, 0.5, 0.25])
    keys = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    san = stratified(r, 8, keys, alpha=1.0, eps=0.0)
    for k in (0, 1, 2):
        s = san[keys == k]
        assert s.sum().item() == pytest.approx(0.0, abs=1e-6)
        assert s.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)
    # Affine invariance with eps = 0, shift invariance only with scale="none".
    close(stratified(2.5 * r + 4.0, 8, keys, alpha=1.0, eps=0.0), san.tolist(), atol=1e-5)
    none = stratified(r, 8, keys, alpha=1.0, scale="none")
    close(stratified(r + 4.0, 8, keys, alpha=1.0, scale="none"), none.tolist(), atol=1e-5)


def test_stratified_no_cross_prompt_mixing_and_permutation_equivariance():
    relabelled = S_KEYS.clone()
    relabelled[4:] = torch.tensor([9, 9, 0, 0])
    a = stratified(S_R, 4, S_KEYS, alpha=0.8)
    b = stratified(S_R, 4, relabelled, alpha=0.8)
    assert torch.equal(a[:4], b[:4])
    perm = torch.tensor([2, 0, 3, 1, 7, 5, 4, 6])  # permute rows inside each prompt group
    close(stratified(S_R[perm], 4, S_KEYS[perm], alpha=0.8), a[perm].tolist(), atol=1e-7)


def test_stratified_batch_scope():
    # san_scope="batch": stratum = key alone. Key 1 rows (2,3,4,5,6) = [1,1,1,1,0]: mean 0.8, std sqrt(0.2).
    out = stratified(S_R, 4, S_KEYS, alpha=1.0, scope="batch")
    s = math.sqrt(0.2) + 1e-4
    close(out, [0.707007, -0.707007, 0.2 / s, 0.2 / s, 0.2 / s, 0.2 / s, -0.8 / s, 0.0])


def test_stratum_key_helpers():
    assert count_tool_calls("a <tool_call>x</tool_call> b <tool_call>y</tool_call>") == 2
    assert count_tool_calls("no calls") == 0
    msgs = [
        {"role": "assistant", "content": "", "tool_calls": [{"name": "search"}, {"name": "search"}]},
        {"role": "tool", "content": "result"},
        {"role": "assistant", "content": "<tool_call>{}</tool_call>"},
    ]
    assert count_tool_calls(msgs) == 3
    ids = stratum_ids([2, None, 2, "x", None])
    assert ids.tolist() == [0, 1, 0, 2, 1]
    keys = stratum_ids([count_tool_calls(c) for c in ["", "", "<tool_call>", "<tool_call>"]])
    close(stratified(torch.tensor([1.0, 0.0, 1.0, 1.0]), 4, keys, alpha=1.0), [0.707007, -0.707007, 0, 0])


# ---------------------------------------------------------------------------------------------------- PSR / NSR / W

CORRECT = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])


def test_psr_nsr_w_advantages():
    a, keep = psr(CORRECT)
    assert a.tolist() == [1, 0, 1, 0, 0, 1] and keep.tolist() == [True, False, True, False, False, True]
    a, keep = nsr(CORRECT)
    assert a.tolist() == [0, -1, 0, -1, -1, 0] and keep.tolist() == [False, True, False, True, True, False]
    a, keep = w_reinforce(CORRECT, lam=0.1)
    close(a, [0.1, -1, 0.1, -1, -1, 0.1])
    assert keep.all()


def test_all_correct_group_keeps_nonzero_advantages():
    # No group baseline: an all-correct group still has +1 (PSR) / +lambda (W) advantages.
    assert psr(torch.ones(4))[0].tolist() == [1, 1, 1, 1]
    close(w_reinforce(torch.ones(4), lam=0.1)[0], [0.1] * 4)


def test_w_reinforce_lambda1_is_pm1_rewards():
    a, keep = w_reinforce(CORRECT, lam=1.0)
    assert torch.equal(a, 2 * CORRECT - 1) and keep.all()


def test_correctness_options():
    r = torch.tensor([1.0, 0.0, 0.5, float("nan")])
    # Default: incorrect = anything scorable that is not the correct value.
    assert nsr(r)[1].tolist() == [False, True, True, False]
    # Reference-code semantics: only score 0 is incorrect; 0.5 belongs to neither set.
    correct, incorrect = correctness(r, 1.0, incorrect_value=0.0)
    assert correct.tolist() == [True, False, False, False] and incorrect.tolist() == [False, True, False, False]
    # Bool correctness tensors and a custom correct value (method.correct_reward).
    assert psr(torch.tensor([True, False]))[0].tolist() == [1, 0]
    assert psr(torch.tensor([2.0, 1.0]), correct_value=2.0)[1].tolist() == [True, False]


def test_every_estimator_has_the_one_signature():
    """``fn(rewards, groups, opts) -> AdvantageOutput`` for every registered estimator; what one needs besides the
    rewards comes in ``Groups`` (strata, lengths, SPO's p_hat), never as keywords."""
    import inspect

    for entry in ADVANTAGES:
        assert list(inspect.signature(entry.fn).parameters) == ["rewards", "groups", "opts"], entry.name
    out = estimate("group", R, 3, scale_rewards="none")
    assert torch.equal(out.advantages, group(R, 3, scale_rewards="none")) and out.keep.all()
    out = estimate("w_reinforce", CORRECT, 3)
    close(out.advantages, [0.1, -1, 0.1, -1, -1, 0.1])
    assert estimate("psr", CORRECT, 3).keep.sum() == 3
    assert estimate("nsr", CORRECT, 3).keep.sum() == 3
    with pytest.raises(ValueError, match="strata"):
        estimate("stratified", S_R, 4)
    with pytest.raises(ValueError, match="p_hat"):
        estimate("spo", S_R, 1)
    with pytest.raises(ValueError, match="opo"):
        ADVANTAGES["opo"]
    p_hat = torch.tensor([0.5, 0.25, 0.75, 0.5], dtype=torch.float64)
    out = ADVANTAGES["spo"].fn(torch.tensor([1.0, 0.0, 1.0, 0.0]), Groups(1, p_hat=p_hat), GRPOParams(advantage="spo"))
    x = torch.tensor([0.5, -0.25, 0.25, -0.5], dtype=torch.float64)  # r - p_hat, mean 0
    close(out.advantages, (x / (x.std() + 1e-8)).tolist())


# ---------------------------------------------------------------------------------------------------------------------
# RLOO and REINFORCE++ on the worked example R (two groups of three)

R_LEN = torch.tensor([2.0, 4, 1, 3, 2, 4])  # completion tokens per row


def test_rloo_leave_one_out_worked_example():
    a = rloo(R, 3)
    close(a, [0.75, -0.75, 0.0, -0.25, -1.0, 1.25])  # r_i - mean of the two others
    close(a, (1.5 * group(R, 3, scale_rewards="none")).tolist())  # = G/(G-1) (r_i - group mean)
    # TRL's normalize_advantages: (A - mean) / (unbiased std + 1e-4) over the batch; std(A) = sqrt(0.75)
    close(rloo(R, 3, normalize=True), [0.865925, -0.865925, 0.0, -0.288642, -1.154567, 1.443209])
    assert torch.equal(rloo(torch.tensor([2.0, 2.0, 5.0, 5.0]), 2), torch.zeros(4))  # equal rewards: no signal


def test_rloo_leaves_unscorable_rows_out_like_trl():
    nan = float("nan")
    # group 1: the baseline averages the scorable siblings only; group 2: a single scorable row has no baseline
    a = rloo(torch.tensor([1.0, nan, 0.0, 1.0, nan, nan, 1.0, nan]), 4)
    close(a, [0.5, 0.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    b = rloo(torch.tensor([1.0, nan, 0.0, 1.0, nan, nan, 1.0, nan]), 4, normalize=True)
    close(b[[0, 2, 3]], (a[[0, 2, 3]] / (math.sqrt(0.75) + 1e-4)).tolist())  # stats over the 3 rows with a baseline
    assert b[[1, 4, 5, 6, 7]].abs().sum() == 0


def test_reinforce_pp_baseline_whitens_over_tokens():
    # x = r - group mean = [0.5, -0.5, 0, -1/6, -2/3, 5/6]; token-weighted mu = 0.5/16, var = sum L (x-mu)^2 / 15
    a = reinforce_pp(R, 3, lengths=R_LEN)
    close(a, [0.793514, -0.899316, -0.052901, -0.335039, -1.181454, 1.357790])
    assert (R_LEN * a).sum().abs() < 1e-5  # zero token-weighted mean
    # one weight per row (lengths=None): GRPO's centring, scaled by one batch std
    close(reinforce_pp(R, 3), [0.866025, -0.866025, 0.0, -0.288675, -1.154701, 1.443376])


def test_reinforce_pp_without_baseline_and_the_docs_example():
    close(reinforce_pp(R, 3, lengths=R_LEN, baseline=False),
          [1.152988, -0.603946, 0.274521, -0.603946, -1.482413, 1.152988])
    close(reinforce_pp(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, lengths=torch.tensor([1.0, 2, 3, 2])),
          [1.207615, -0.724569, -0.724569, 1.207615])
    # NaN rows: out of every statistic, advantage 0; the rest as without them
    nan = float("nan")
    a = reinforce_pp(torch.tensor([1.0, 0.0, nan, 1.0, 0.0, 1.0]), 3, lengths=R_LEN, baseline=False)
    assert a[2] == 0
    close(a[[0, 1, 3, 4, 5]], reinforce_pp(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), 5,
                                           lengths=R_LEN[[0, 1, 3, 4, 5]], baseline=False).tolist())


@pytest.mark.parametrize("baseline", [True, False])
def test_reinforce_pp_equals_verl_token_level_formula(baseline):
    """verl (``compute_reinforce_plus_plus[_baseline]_outcome_advantage``): the outcome reward sits on the last
    response token, returns are the reversed cumulative sum (gamma = 1; the baseline variant subtracts the prompt's
    mean score first), then ``masked_whiten`` over the response mask: (v - mean) * rsqrt(unbiased var + 1e-8), with the
    mean and variance over every response token of the batch."""
    torch.manual_seed(0)
    B, G, T = 12, 4, 7
    rewards = torch.randint(0, 3, (B,)).float() * 0.5
    lengths = torch.randint(1, T + 1, (B,))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    scores = rewards.clone()
    if baseline:
        scores = scores - scores.view(-1, G).mean(1).repeat_interleave(G)
    token_rewards = torch.zeros(B, T)
    token_rewards[torch.arange(B), lengths - 1] = scores
    returns = token_rewards.flip(1).cumsum(1).flip(1) * mask  # gamma = 1
    mean = (returns * mask).sum() / mask.sum()
    var = ((returns - mean) ** 2 * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
    verl = (returns - mean) * torch.rsqrt(var + 1e-8) * mask
    ours = reinforce_pp(rewards, G, lengths=lengths, baseline=baseline)
    torch.testing.assert_close(ours[:, None] * mask, verl, atol=1e-6, rtol=1e-6)
