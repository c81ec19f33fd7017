"""SPO math (posttrain/rl/spo.py; docs/methods/spo.md): the worked example, properties and the two review fixes
(rewards outside [0, 1] refused, at most n0 offline scores)."""

from __future__ import annotations

import pytest
import torch

from posttrain.rl.spo import (
    SPOTracker,
    forgetting_factor,
    check_reward_range,
    offline_init,
    policy_shift,
    rescale_rewards,
    sampling_weights,
    spo_advantages,
)


def _close(a, b, tol=1e-6):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          rtol=0, atol=tol), (a, b)


def _tracker():
    t = SPOTracker()
    t.init_offline({"A": [1, 1, 0, 1, 0, 0, 1, 1], "B": [0] * 8, "C": [1] * 8})  # D: no offline scores
    return t


def test_worked_offline_init_and_sampling():
    t = _tracker()
    keys = ["A", "B", "C", "D"]
    _close([t.alpha.get(k, 0.5) for k in keys], [4.888889, 0.444444, 7.555556, 0.5])
    _close([t.beta.get(k, 0.5) for k in keys], [3.111111, 7.555556, 0.444444, 0.5])
    p = t.p_hat(keys)
    _close(p, [0.611111, 0.055556, 0.944444, 0.5])
    w = sampling_weights(p)
    _close(w, [0.537498, 0.279061, 0.279061, 0.55])
    _close(w / w.sum(), [0.326623, 0.169578, 0.169578, 0.334220])


def test_worked_advantages():
    p = _tracker().p_hat(["A", "B", "C", "D"])
    adv = spo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), p)
    _close(adv, [0.630126, -1.050210, -0.630126, 1.050210])
    _close(-adv / 10, [-0.063013, 0.105021, 0.063013, -0.105021])  # dapo on-policy per-token gradient, 10 tokens
    _close(spo_advantages(torch.ones(4), p), [-0.226995, 1.286305, -1.134975, 0.075665])  # all correct: not zero


def test_worked_policy_shift_and_tracker_update():
    D = policy_shift(torch.tensor([[-0.50, -1.20, -0.30, -9.0]]), torch.tensor([[-0.52, -1.19, -0.31, 0.0]]),
                     torch.tensor([[1, 1, 1, 0]]))
    _close(D, [0.013333])
    _close(torch.pow(2.0, -D / 0.06), [0.857244])
    _close(forgetting_factor(D), [0.875])
    rho = forgetting_factor(torch.tensor([0.005, 0.03, 0.0, 0.001]))
    _close(rho, [0.943874, 0.875, 0.96, 0.96])
    t = _tracker()
    keys = ["A", "B", "C", "D"]
    t.update(keys, torch.tensor([1.0, 0.0, 1.0, 1.0]), rho)
    _close([t.alpha[k] for k in keys], [5.614497, 0.388889, 8.253333, 1.48])
    _close([t.beta[k] for k in keys], [2.936498, 7.611111, 0.426667, 0.48])
    _close(t.p_hat(keys), [0.656590, 0.048611, 0.950845, 0.755102])


def test_properties():
    # equal p_hat: the z-score of r
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    _close(spo_advantages(r, torch.full((5,), 0.3)), (r - r.mean()) / (r.std() + 1e-8))
    # offline init: alpha + beta = 8, p_hat0 = (S + 0.5) / (n + 1); own count n when fewer scores
    a, b = offline_init([1, 0, 1])
    assert a + b == pytest.approx(8.0) and a / (a + b) == pytest.approx(2.5 / 4)
    assert offline_init([]) == (0.5, 0.5)
    # rho within bounds, first visit rho_max
    rho = forgetting_factor(torch.linspace(0, 1, 50))
    assert float(rho.min()) >= 0.875 and float(rho.max()) <= 0.96 and float(forgetting_factor(torch.zeros(1))) == 0.96
    # constant rho, repeated reward: alpha + beta -> 1 / (1 - rho), p_hat -> r
    t = SPOTracker()
    for _ in range(400):
        t.update(["x"], torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64))
    assert t.alpha["x"] + t.beta["x"] == pytest.approx(10.0, rel=1e-9) and float(t.p_hat(["x"])) == pytest.approx(0.7)
    # weights: largest at 0.5, never below eps
    w = sampling_weights(torch.linspace(0, 1, 101))
    assert float(w.min()) == pytest.approx(0.05) and int(w.argmax()) == 50
    # non-finite rewards: no statistics, zero advantage, no tracker update; one row: 0
    adv = spo_advantages(torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0.5, 0.5, 0.2]))
    assert adv[1] == 0 and adv[0] > 0 > adv[2]
    assert spo_advantages(torch.tensor([1.0]), torch.tensor([0.2])).tolist() == [0.0]
    t2 = SPOTracker()
    t2.update(["y"], torch.tensor([float("nan")]), torch.tensor([0.9]))
    assert "y" not in t2.alpha


def test_tracker_state_round_trip():
    t = _tracker()
    t.update(["A", "D"], torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.96]))
    u = SPOTracker()
    u.load_state_dict(t.state_dict())
    assert u.state_dict() == t.state_dict()
    assert torch.equal(u.p_hat(["A", "B", "D", "Z"]), t.p_hat(["A", "B", "D", "Z"]))


def test_offline_init_keeps_at_most_n0_scores():
    """12 correct offline scores with n0 = 8: alpha0 = 8 * 8.5 / 9 = 7.555556 (all 12 would give 8 * 12.5 / 13 =
    7.692308); a random subsample of 8 mixed scores keeps alpha0 + beta0 = 8 and p_hat0 = (S + 0.5) / 9."""
    a, b = offline_init([1.0] * 12)
    _close([a, b], [7.555556, 0.444444])
    assert offline_init([1.0] * 12, max_scores=12)[0] == pytest.approx(7.692308, abs=1e-6)
    import random

    scores = [1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0]  # 6 of 12 correct
    a, b = offline_init(scores, rng=random.Random(5))
    kept = random.Random(5).sample(scores, 8)
    assert a + b == pytest.approx(8.0) and a / (a + b) == pytest.approx((sum(kept) + 0.5) / 9)
    assert offline_init([1, 1, 1], max_scores=0) == (0.5, 0.5)  # spo_offline_n: 0 -> Jeffreys
    t = SPOTracker()
    t.init_offline({"A": [1.0] * 12, "B": [0.0] * 3})
    _close([t.alpha["A"], t.alpha["B"]], [7.555556, 8 * 0.5 / 4])


def test_rewards_outside_the_unit_interval_are_refused():
    """r = 2 would give beta = rho * beta + (1 - r) = 0.96 * 0.5 - 1 = -0.52 < 0 (p_hat no longer a probability)."""
    t = SPOTracker()
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\], got \[2.0\]"):
        t.update(["x", "y"], torch.tensor([1.0, 2.0]), torch.tensor([0.96, 0.96]))
    assert t.alpha == {} and t.beta == {}  # nothing updated
    with pytest.raises(ValueError, match="-0.5"):
        check_reward_range(torch.tensor([-0.5, 0.3]))
    check_reward_range(torch.tensor([0.0, 0.25, 1.0, float("nan")]))  # soft successes and unscorable rows are fine
    _close(rescale_rewards(torch.tensor([-1.0, 0.0, 1.0, 3.0, float("nan")]), -1.0, 1.0)[:4], [0.0, 0.5, 1.0, 1.0])
    assert torch.isnan(rescale_rewards(torch.tensor([float("nan")]), 0.0, 2.0)).all()
