"""PACS (posttrain/rl/pacs.py; docs/methods/pacs.md): the worked example, the REINFORCE-with-RLOO identity, the
spec's invariances, the GRPO-trainer wiring (method.loss: pacs) and its config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.errors import UserError
from posttrain.families.rl.policy_losses.pacs import pacs_loss, pacs_score, pacs_weights, row_sampling_weights

R4 = torch.tensor([1.0, 0.0, 0.0, 0.0])
G4 = torch.zeros(4, dtype=torch.long)


def _run(delta, beta=1.0, weight="question", rewards=R4, score="rloo", row_weights=None):
    """One token per row: logp - old = delta, so dL/d(logp) = dL/dDelta."""
    d = torch.tensor(delta, dtype=torch.float64, requires_grad=True)
    rho = None if row_weights is None else torch.tensor(row_weights, dtype=torch.float64)
    out = pacs_loss(d.unsqueeze(1), torch.zeros(len(delta), 1, dtype=torch.float64), torch.ones(len(delta), 1),
                    rewards.double(), G4[: len(delta)], beta=beta, weight=weight, score=score, row_weights=rho)
    out.loss.backward()
    return out, d.grad


def _close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.detach().double(), expected, rtol=0, atol=tol), (actual, expected)


def test_worked_example_on_policy():
    out, grad = _run([0.0, 0.0, 0.0, 0.0])
    _close(out.weights, [2.0, 2 / 3, 2 / 3, 2 / 3])
    assert out.loss.item() == pytest.approx(math.log(2) * 1.0, abs=1e-7)  # log 2 * mean(w), mean(w) = 1
    _close(grad, [-1 / 3, 1 / 9, 1 / 9, 1 / 9])
    out, grad = _run([0.0, 0.0, 0.0, 0.0], weight="none")
    _close(grad, [-0.25, 0.083333, 0.083333, 0.083333])  # -A_RLOO / 4, A_RLOO = [1, -1/3, -1/3, -1/3]


@pytest.mark.parametrize("beta, psi, loss, grad", [
    (1.0, [0.316667, -0.083333, 0.116667, -0.35], 0.596800, [-0.289727, 0.097749, 0.108850, 0.083128]),
    (2.0, [0.633333, -0.166667, 0.233333, -0.7], 0.518414, [-0.496568, 0.169519, 0.213804, 0.113245]),
])
def test_worked_example_off_policy(beta, psi, loss, grad):
    out, g = _run([0.2, -0.1, 0.05, -0.3], beta=beta)
    _close(out.rhat, [beta * x for x in (0.2, -0.1, 0.05, -0.3)])
    _close(out.psi, psi)
    assert out.loss.item() == pytest.approx(loss, abs=1e-6)
    _close(g, grad)


def test_worked_example_all_correct():
    out, g = _run([0.2, -0.1, 0.05, -0.3], rewards=torch.ones(4))
    _close(out.weights, [1, 1, 1, 1])
    assert out.loss.item() == pytest.approx(0.700719, abs=1e-6)
    _close(g, [0.026153, -0.006958, 0.009694, -0.028890])
    _, g0 = _run([0.0] * 4, rewards=torch.ones(4))
    assert torch.equal(g0, torch.zeros(4, dtype=torch.float64))  # exactly zero on-policy


def test_per_token_gradient_is_the_row_value():
    logps = torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]] + [[1, 1, 0, 0]] * 3)
    pacs_loss(logps, logps.detach().clone(), mask, R4.double(), G4).loss.backward()
    _close(logps.grad[0], [-1 / 3, -1 / 3, -1 / 3, 0.0])
    _close(logps.grad[1], [1 / 9, 1 / 9, 0.0, 0.0])


def _random_batch(seed=0, n=4, num_groups=3, T=5):
    g = torch.Generator().manual_seed(seed)
    B = n * num_groups
    groups = torch.arange(num_groups).repeat_interleave(n)[torch.randperm(B, generator=g)]  # not contiguous
    rewards = (torch.rand(B, generator=g) > 0.5).double()
    mask = (torch.rand(B, T, generator=g) > 0.2).long()
    mask[:, 0] = 1
    logps = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    return logps, mask, rewards, groups


def test_on_policy_unweighted_equals_reinforce_with_rloo_baseline():
    logps, mask, rewards, groups = _random_batch()
    B, n = rewards.numel(), 4
    pacs_loss(logps, logps.detach(), mask, rewards, groups, weight="none").loss.backward()
    ours = logps.grad.clone()
    logps.grad = None
    # A_RLOO_i = R_i - mean_{j != i in g} R_j
    adv = torch.stack([rewards[i] - (rewards[groups == groups[i]].sum() - rewards[i]) / (n - 1) for i in range(B)])
    (-(adv * (logps * mask).sum(-1)).sum() / B).backward()
    assert torch.allclose(ours, logps.grad, rtol=0, atol=1e-7 * max(1.0, float(logps.grad.abs().max())))
    assert float(ours.abs().max()) > 0


def test_on_policy_balanced_sums_and_linearity_in_beta():
    logps, mask, rewards, groups = _random_batch(seed=1, n=6, num_groups=2)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=torch.float64)[: rewards.numel()]
    B, n = rewards.numel(), 6
    grads = []
    for beta in (1.0, 2.0):
        rhat = torch.zeros(B, dtype=torch.float64, requires_grad=True)
        # psi depends on logps only through rhat; differentiate with respect to rhat directly
        valid = torch.ones(B, dtype=torch.bool)
        psi = pacs_score(rhat * beta, groups, valid)
        w = pacs_weights(rewards, groups, valid)
        loss = (w * torch.nn.functional.binary_cross_entropy_with_logits(psi, rewards, reduction="none")).sum() / B
        loss.backward()
        grads.append(rhat.grad.clone())
        for g in groups.unique():
            rows = groups == g
            if len(rewards[rows].unique()) == 2:
                pos = rhat.grad[rows & (rewards == 1)].sum() / beta
                assert pos.item() == pytest.approx(-(n**2) / (4 * B * (n - 1)), abs=1e-9)
                assert rhat.grad[rows & (rewards == 0)].sum().item() / beta == pytest.approx(-pos.item(), abs=1e-9)
    assert torch.allclose(grads[1], 2 * grads[0], atol=1e-12)


@pytest.mark.parametrize("score", ["rloo", "grpo"])
def test_constant_shift_within_a_group_changes_nothing(score):
    logps, mask, rewards, groups = _random_batch(seed=2)
    old = logps.detach() + 0.1 * torch.randn(logps.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = pacs_loss(logps, old, mask, rewards, groups, score=score)
    a.loss.backward()
    g1 = logps.grad.clone()
    logps.grad = None
    shifted = logps + 0.7 * (groups == 1).double().unsqueeze(1) / mask.sum(-1, keepdim=True) * mask
    b = pacs_loss(shifted, old, mask, rewards, groups, score=score)
    b.loss.backward()
    assert torch.allclose(a.psi, b.psi, atol=1e-9) and abs(a.loss.item() - b.loss.item()) < 1e-9
    assert torch.allclose(g1, logps.grad, atol=1e-9)


def test_groups_never_mix_and_off_policy_bound():
    logps, mask, rewards, groups = _random_batch(seed=3)
    old = logps.detach() - 0.5
    a = pacs_loss(logps, old, mask, rewards, groups)
    changed = logps.detach().clone()
    changed[groups == 2] -= 0.3
    b = pacs_loss(changed, old, mask, rewards, groups)
    keep = groups != 2
    assert torch.equal(a.psi[keep], b.psi[keep])
    psi = a.psi.detach().requires_grad_(True)
    loss = (a.weights * torch.nn.functional.binary_cross_entropy_with_logits(psi, rewards, reduction="none")).sum() / 12
    (dpsi,) = torch.autograd.grad(loss, psi)
    assert bool((dpsi.abs() <= a.weights / 12 + 1e-12).all())


def test_loss_is_bce_with_logits_and_weights_are_balanced():
    logps, mask, rewards, groups = _random_batch(seed=4, n=5)
    out = pacs_loss(logps, logps.detach() - 0.2 * mask, mask, rewards, groups)
    expected = torch.nn.BCEWithLogitsLoss(weight=out.weights)(out.psi, rewards)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for g in groups.unique():  # sklearn's compute_class_weight("balanced"): n / (K * count)
        rows = groups == g
        labels, counts = rewards[rows].unique(return_counts=True)
        for label, count in zip(labels, counts):
            want = 5 / (len(labels) * count.item()) if len(labels) > 1 else 1.0
            assert torch.allclose(out.weights[rows & (rewards == label)], torch.tensor(want, dtype=torch.float64))


def test_nan_rewards_are_dropped_and_small_groups_add_nothing():
    logps = torch.zeros(6, 1, dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.0, float("nan"), 1.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    out = pacs_loss(logps, logps.detach() - torch.tensor([[0.1], [0.2], [0.3], [0.4], [0.5], [0.6]]), torch.ones(6, 1),
                    rewards, groups)
    assert out.valid.tolist() == [True, False, True, True, False, True]
    assert out.psi[0].item() == pytest.approx(0.1 - 0.3)  # the NaN row is not in the baseline
    lone = pacs_loss(logps[:2], logps[:2].detach(), torch.ones(2, 1), torch.tensor([1.0, float("nan")],
                     dtype=torch.float64), torch.tensor([0, 0]))
    assert lone.loss.item() == 0.0


# vLLM's importance-sampling correction (docs/methods/pacs.md#vllm-importance-sampling): each row's BCE term times its
# sequence-level ratio pi_old / pi_vLLM (TRL's sequence_mask / sequence_truncate), on the off-policy worked example
DELTA = [0.2, -0.1, 0.05, -0.3]  # logp - old_logp, one token per row
# beta 1, rloo, question weights w = [2, 2/3, 2/3, 2/3]:
# psi = [0.316667, -0.083333, 0.116667, -0.35], BCE = softplus(psi) - R psi = [0.547297, 0.652348, 0.753181, 0.533382]
BCE = [0.5472965438424602, 0.6523483183915745, 0.7531809387487785, 0.533382155418777]
W = [2.0, 2 / 3, 2 / 3, 2 / 3]


def test_unit_weights_change_nothing():
    base, g0 = _run(DELTA)
    ones, g1 = _run(DELTA, row_weights=[1.0, 1.0, 1.0, 1.0])
    assert base.loss.item() == pytest.approx(0.596800, abs=1e-6) == ones.loss.item()
    assert torch.equal(g0, g1)


def test_a_masked_row_adds_nothing_but_stays_in_the_baseline():
    # sequence_mask: row 1's ratio left [clip_min, clip_max], TRL set it to 0
    out, g = _run(DELTA, row_weights=[1.0, 0.0, 1.0, 1.0])
    assert out.loss.item() == pytest.approx((W[0] * BCE[0] + W[2] * BCE[2] + W[3] * BCE[3]) / 4, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.488075, abs=1e-6)
    _close(out.psi, [0.316667, -0.083333, 0.116667, -0.35])  # psi unchanged: row 1's rhat is still in the baseline
    # dL/dpsi_i = rho_i w_i (sigmoid(psi_i) - R_i) / 4 (0 for row 1);
    # dL/drhat_i = dL/dpsi_i - sum_{k != i} dL/dpsi_k / 3
    _close(g, [-0.263106, 0.017886, 0.135471, 0.109749])
    assert g[1].item() != 0.0  # row 1 moves only through the other rows' baselines


def test_truncated_weights_scale_each_row():
    # sequence_truncate (clip_max 3): row 0's ratio e^1.5 = 4.48 clamped to 3.0; row 1's 0.5 kept
    out, g = _run(DELTA, row_weights=[3.0, 0.5, 1.0, 1.0])
    assert out.loss.item() == pytest.approx((3 * W[0] * BCE[0] + 0.5 * W[1] * BCE[1] + W[2] * BCE[2] + W[3] * BCE[3])
                                            / 4, abs=1e-12)
    assert out.loss.item() == pytest.approx(1.089734, abs=1e-6)
    _close(g, [-0.697905, 0.198314, 0.262657, 0.236934])


def test_row_sampling_weights_shapes():
    assert row_sampling_weights(None, 4) is None
    ratio = torch.tensor([[0.5], [1.0], [0.0], [3.0]], requires_grad=True)
    w = row_sampling_weights(ratio, 4)
    assert w.tolist() == [0.5, 1.0, 0.0, 3.0] and w.shape == (4,) and not w.requires_grad
    with pytest.raises(ValueError, match=r"sequence-level .* got shape \(4, 3\) .* use sequence_mask or "
                                         r"sequence_truncate"):
        row_sampling_weights(torch.ones(4, 3), 4)  # a token mode's [B, T] ratio


# --------------------------------------------------------------------------------------------------------------------
# the GRPO trainer with method.loss: pacs


def alternating_correct(prompts, completions, forced, **kwargs):
    return list(forced)


@pytest.fixture(scope="module")
def pacs_trainer(tmp_path_factory, arith_model_dir):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.methods import GRPOParams
    from posttrain.families.rl.trainer import PosttrainGRPOTrainer

    tmp = tmp_path_factory.mktemp("pacs")
    torch.manual_seed(0)
    rows = [dict(r, forced=float(i % 3 == 0)) for i, r in enumerate(
        r for r in arithmetic_rows("rl", num_samples=4, seed=3) for _ in range(4))]
    cfg = GRPOConfig(output_dir=str(tmp), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=16,
                     num_generations=4, max_completion_length=6, max_steps=1, logging_steps=1, beta=0.0,
                     temperature=1.5, disable_tqdm=True)
    trainer = PosttrainGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(arith_model_dir), reward_funcs=[alternating_correct], args=cfg,
        train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(arith_model_dir),
        params=GRPOParams(loss="pacs", pacs_weight="none"))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([dict(r) for r in rows])
    return trainer, inputs


def test_trainer_loss_and_gradient_equal_the_pure_function_and_reinforce_rloo(pacs_trainer):
    trainer, inputs = pacs_trainer
    model = trainer.model
    assert inputs["rl_row_label"].tolist() == [1.0 if i % 3 == 0 else 0.0 for i in range(16)]
    model.zero_grad()
    loss = trainer._compute_loss(model, dict(inputs))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    model.zero_grad()
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, att, inputs["completion_ids"].size(1))
    mask = inputs["completion_mask"]
    expected = pacs_loss(logps, logps.detach(), mask, inputs["rl_row_label"], inputs["rl_row_group"], weight="none")
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)  # on-policy, unit weights
    # REINFORCE with the leave-one-out baseline on summed log-probs: the same gradient
    r, g = inputs["rl_row_label"], inputs["rl_row_group"]
    adv = torch.stack([r[i] - (r[g == g[i]].sum() - r[i]) / 3 for i in range(16)])
    (-(adv * (logps * mask).sum(-1)).sum() / 16).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    scale = max(float(v.abs().max()) for v in ref.values())
    assert max(float((ours[k] - ref[k]).abs().max()) for k in ref) <= 1e-5 * scale
    assert trainer._metrics["train"]["pacs/loss"][-1] == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("method, training, message", [
    ({"epsilon": 0.3}, {}, r"^method\.epsilon: not used by method\.loss: pacs"),
    ({"beta": 0.1}, {}, r"^method\.beta: not used by method\.loss: pacs"),
    ({"aggregation": "grpo"}, {}, r"^method\.aggregation: not used by method\.loss: pacs"),
    ({"scale_rewards": "none"}, {}, r"^method\.scale_rewards: not used by method\.loss: pacs"),
    ({"loss": "grpo", "pacs_beta": 2.0}, {}, r"^method\.pacs_beta: only used with method\.loss: pacs"),
    ({}, {"gradient_accumulation_steps": 2}, r"^training\.gradient_accumulation_steps: method\.loss: pacs needs 1"),
    ({}, {"per_device_train_batch_size": 12}, r"^training\.per_device_train_batch_size: .*multiple of "
                                                r"num_generations \(8\)"),
])
def test_config_errors_name_the_key(method, training, message, tmp_path):
    from posttrain.recipe import parse_recipe
    from posttrain.train import preflight

    with pytest.raises(UserError, match=message):
        recipe = parse_recipe({"model": "builtin:tiny-qwen2-arith", "data": {"train": "builtin:arithmetic-rl"},
                               "method": {"name": "grpo", "loss": "pacs", **method},
                               "training": {"per_device_train_batch_size": 16, **training},
                               "output_dir": str(tmp_path)})
        preflight(recipe, load_data=False)


def test_rewards_outside_unit_interval_are_refused():
    from posttrain.families.rl.policy_losses.pacs import check_labels

    check_labels(torch.tensor([0.0, 1.0, float("nan"), 0.5]))
    with pytest.raises(UserError, match=r"^method\.rewards: method\.loss: pacs .* \[0, 1\]; got values in \[0, 2\]"):
        check_labels(torch.tensor([0.0, 2.0]))


@pytest.mark.slow
def test_pacs_raises_training_reward(tmp_path):
    """Learning check (as tests/families/rl/test_rl_trainer.py::test_every_variant_raises_training_reward): recipes/grpo_pacs.yaml
    for 60 steps on a fixed pool of 64 problems raises the exact expected exact-match reward by > 0.02."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.sources import load_source
    from posttrain.eval.expected_reward import expected_exact_match
    from posttrain.models import resolve_model_path
    from posttrain.recipe import load_recipe
    from posttrain.train import run

    root = Path(__file__).resolve().parents[3]
    recipe = load_recipe(root / "recipes" / "grpo_pacs.yaml", [
        f"output_dir={tmp_path}", "training.max_steps=60", "training.lr_scheduler_type=constant",
        "data.train.max_samples=64", "data.test=null", "training.logging_steps=10", "training.save_strategy='no'",
        "training.disable_tqdm=true",
    ])
    pool = load_source(recipe.data.train, "data.train", "rl")

    def expected_reward(path):
        return expected_exact_match(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                    pool, temperature=1.0)

    before = expected_reward(resolve_model_path(recipe.model.path))
    run(recipe, quiet=True)
    after = expected_reward(tmp_path)
    assert after > before + 0.02, (before, after)
