"""PACS under vLLM's importance-sampling correction (docs/methods/pacs.md#vllm-importance-sampling), wired: the GRPO
trainer's ``_compute_loss`` with an ``importance_sampling_ratio`` in its inputs weights each row's BCE term by it; the
token modes refused before the model loads. (The weighted loss itself, hand-computed: tests/families/rl/test_pacs.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import UserError
from posttrain.families.rl.policy_losses.pacs import pacs_loss

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
