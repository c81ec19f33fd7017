"""PACS under vLLM's importance-sampling correction (docs/methods/pacs.md#vllm-importance-sampling): each row's BCE term
times its sequence-level ratio pi_old / pi_vLLM (TRL's ``sequence_mask`` / ``sequence_truncate``), hand-computed on the
worked example of tests/families/rl/test_pacs.py; the GRPO trainer's ``_compute_loss`` with an
``importance_sampling_ratio`` in its inputs; the token modes refused before the model loads."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import UserError
from posttrain.families.rl.policy_losses.pacs import pacs_loss, row_sampling_weights

R4 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
G4 = torch.zeros(4, dtype=torch.long)
DELTA = [0.2, -0.1, 0.05, -0.3]  # logp - old_logp, one token per row
# the worked example (beta 1, rloo, question weights w = [2, 2/3, 2/3, 2/3]):
# psi = [0.316667, -0.083333, 0.116667, -0.35], BCE = softplus(psi) - R psi = [0.547297, 0.652348, 0.753181, 0.533382]
BCE = [0.5472965438424602, 0.6523483183915745, 0.7531809387487785, 0.533382155418777]
W = [2.0, 2 / 3, 2 / 3, 2 / 3]


def _run(rho):
    d = torch.tensor(DELTA, dtype=torch.float64, requires_grad=True)
    weights = None if rho is None else torch.tensor(rho, dtype=torch.float64)
    out = pacs_loss(d.unsqueeze(1), torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1), R4, G4,
                    row_weights=weights)
    out.loss.backward()
    return out, d.grad


def _close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.detach().double(), expected, rtol=0, atol=tol), (actual, expected)


def test_unit_weights_change_nothing():
    base, g0 = _run(None)
    ones, g1 = _run([1.0, 1.0, 1.0, 1.0])
    assert base.loss.item() == pytest.approx(0.596800, abs=1e-6) == ones.loss.item()
    assert torch.equal(g0, g1)


def test_a_masked_row_adds_nothing_but_stays_in_the_baseline():
    # sequence_mask: row 1's ratio left [clip_min, clip_max], TRL set it to 0
    out, g = _run([1.0, 0.0, 1.0, 1.0])
    assert out.loss.item() == pytest.approx((W[0] * BCE[0] + W[2] * BCE[2] + W[3] * BCE[3]) / 4, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.488075, abs=1e-6)
    _close(out.psi, [0.316667, -0.083333, 0.116667, -0.35])  # psi unchanged: row 1's rhat is still in the baseline
    # dL/dpsi_i = rho_i w_i (sigmoid(psi_i) - R_i) / 4 (0 for row 1);
    # dL/drhat_i = dL/dpsi_i - sum_{k != i} dL/dpsi_k / 3
    _close(g, [-0.263106, 0.017886, 0.135471, 0.109749])
    assert g[1].item() != 0.0  # row 1 moves only through the other rows' baselines


def test_truncated_weights_scale_each_row():
    # sequence_truncate (clip_max 3): row 0's ratio e^1.5 = 4.48 clamped to 3.0; row 1's 0.5 kept
    out, g = _run([3.0, 0.5, 1.0, 1.0])
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
# the GRPO trainer: the ratio TRL puts in the generation batch weights each row


def _forced(prompts, completions, forced, **kwargs):
    return list(forced)


@pytest.fixture(scope="module")
def pacs_batch(tmp_path_factory, arith_model_dir):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.families.rl.trainer import PosttrainGRPOTrainer
    from posttrain.methods import GRPOParams

    torch.manual_seed(0)
    rows = [dict(r, forced=float(i % 3 == 0)) for i, r in enumerate(
        r for r in arithmetic_rows("rl", num_samples=4, seed=3) for _ in range(4))]
    cfg = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("pacs_is")), report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=16, num_generations=4, max_completion_length=6, max_steps=1,
                     logging_steps=1, beta=0.0, temperature=1.5, disable_tqdm=True)
    trainer = PosttrainGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(arith_model_dir), reward_funcs=[_forced], args=cfg,
        train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(arith_model_dir),
        params=GRPOParams(loss="pacs"))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([dict(r) for r in rows])
    return trainer, inputs


def test_trainer_weights_each_row_by_the_sequence_ratio(pacs_batch):
    """What TRL hands the loss under vLLM (``use_vllm`` with the correction, sequence modes): ``old_per_token_logps``
    and a ``[B, 1]`` ``importance_sampling_ratio`` (here 0 for masked rows, 3 for truncated ones). The trainer's loss
    and gradient equal :func:`pacs_loss` with those row weights, and ``pacs/is_weight_mean`` is their mean."""
    trainer, generated = pacs_batch
    model = trainer.model
    ids = torch.cat([generated["prompt_ids"], generated["completion_ids"]], dim=1)
    att = torch.cat([generated["prompt_mask"], generated["completion_mask"]], dim=1)
    keep = generated["completion_ids"].size(1)
    mask = generated["completion_mask"]
    with torch.no_grad():
        at_generation, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, att, keep)
    offsets = 0.05 * torch.randn(at_generation.shape, generator=torch.Generator().manual_seed(1))
    rho = torch.tensor([1.0, 0.0, 3.0, 0.5] * 4).unsqueeze(1)  # [B, 1], as TRL's sequence modes
    inputs = dict(generated, old_per_token_logps=at_generation + offsets * mask, importance_sampling_ratio=rho)

    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    try:
        model.zero_grad()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
    finally:
        trainer.use_vllm = False
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, att, keep)
    labels, groups = inputs["rl_row_label"], inputs["rl_row_group"]
    expected = pacs_loss(logps, inputs["old_per_token_logps"], mask, labels, groups, row_weights=rho.squeeze(1))
    unweighted = pacs_loss(logps.detach(), inputs["old_per_token_logps"], mask, labels, groups)
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    # by hand from the unweighted terms: sum_i rho_i w_i BCE_i / B
    bce = torch.nn.functional.binary_cross_entropy_with_logits(unweighted.psi, labels, reduction="none")
    assert loss.item() == pytest.approx(float((rho.squeeze(1) * unweighted.weights * bce).sum() / 16), rel=1e-6)
    assert abs(loss.item() - unweighted.loss.item()) > 1e-3  # the weights matter here
    expected.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    scale = max(float(v.abs().max()) for v in ref.values())
    assert max(float((ours[k] - ref[k]).abs().max()) for k in ref) <= 1e-5 * scale
    logged = trainer._metrics["train"]
    assert logged["pacs/is_weight_mean"][-1] == pytest.approx(float(rho.mean()), rel=1e-6)  # every row valid here
    assert logged["pacs/loss"][-1] == pytest.approx(expected.loss.item(), rel=1e-6)


def test_trainer_without_the_correction_logs_no_weight(pacs_batch):
    trainer, generated = pacs_batch
    trainer._metrics["train"].pop("pacs/is_weight_mean", None)
    trainer._compute_loss(trainer.model, dict(generated))
    assert "pacs/is_weight_mean" not in trainer._metrics["train"]
    assert trainer._metrics["train"]["pacs/loss"][-1] == pytest.approx(math.log(2), rel=1e-6)  # on-policy, psi = 0


# --------------------------------------------------------------------------------------------------------------------
# the recipe check


@pytest.mark.parametrize("training, refused", [
    ({"vllm_importance_sampling_mode": "token_mask"}, True),
    ({"vllm_importance_sampling_mode": "token_truncate"}, True),
    ({}, False),  # TRL's default, sequence_mask
    ({"vllm_importance_sampling_mode": "sequence_truncate"}, False),
    ({"vllm_importance_sampling_mode": "token_mask", "vllm_importance_sampling_correction": False}, False),
    ({"vllm_importance_sampling_mode": "token_mask", "use_vllm": False}, False),
])
def test_token_modes_are_refused_before_the_model_loads(training, refused, tmp_path, monkeypatch):
    from posttrain.recipe import parse_recipe
    from posttrain.rl import vllm_sync
    from posttrain.train import preflight

    monkeypatch.setattr(vllm_sync, "vllm_installed", lambda: True)  # the recipe check only; nothing is loaded
    recipe = parse_recipe({"model": "builtin:tiny-qwen2-arith", "data": {"train": "builtin:arithmetic-rl"},
                           "method": {"name": "grpo", "loss": "pacs"},
                           "training": {"per_device_train_batch_size": 16, "use_vllm": True, **training},
                           "output_dir": str(tmp_path)})
    if refused:
        mode = training["vllm_importance_sampling_mode"]
        with pytest.raises(UserError, match=rf"^training\.vllm_importance_sampling_mode: method\.loss: pacs weights "
                                            rf"each row by its sequence-level ratio .* got {mode} "):
            preflight(recipe, load_data=False)
    else:
        preflight(recipe, load_data=False)


def test_token_mode_is_one_error_line_exit_2_nothing_loaded(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from posttrain.cli import main
    from posttrain.rl import vllm_sync

    monkeypatch.setattr(vllm_sync, "vllm_installed", lambda: True)  # the recipe check only; nothing is loaded
    loaded = []
    monkeypatch.setattr("posttrain.train.load_models", lambda *a, **k: loaded.append(True))
    recipe = Path(__file__).resolve().parents[3] / "recipes" / "grpo_pacs.yaml"
    rc = main(["train", str(recipe), "--set", "training.use_vllm=true", "--set",
               "training.vllm_importance_sampling_mode=token_mask", "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not loaded
    assert err[-1].startswith("error: training.vllm_importance_sampling_mode: method.loss: pacs weights each row by "
                              "its sequence-level ratio (sequence_mask or sequence_truncate); a per-token ratio has "
                              "no per-row meaning, got token_mask"), err
