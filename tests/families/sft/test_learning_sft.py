"""Short learning checks for the SFT family (the quickstart, shortened; longer demos live in benchmarks/)."""

import pytest

from posttrain.recipe import parse_recipe
from posttrain.train import run


def _heldout_nll(model_dir, n=64):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.logprobs import completion_logps

    rows = arithmetic_rows("sft", split="test", max_operand=30, num_samples=n)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    sums, counts = completion_logps(model, tok, [r["prompt"] for r in rows], [r["completion"] for r in rows], 32)
    return -sum(sums) / sum(counts)


def _recipe(method, model, out, steps, lr, **method_params):
    return parse_recipe({
        "model": model,
        "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 4000, "max_operand": 30}}},
        "method": {"name": method, **method_params},
        "training": {"max_steps": steps, "per_device_train_batch_size": 64, "learning_rate": lr,
                     "lr_scheduler_type": "cosine", "logging_steps": steps, "save_strategy": "no",
                     "disable_tqdm": True},
        "output_dir": str(out),
        "seed": 0,
    })


def test_sft_learns_arithmetic_from_scratch(tmp_path, tiny_model_dir):
    before = _heldout_nll(tiny_model_dir)
    run(_recipe("sft", "builtin:tiny-qwen2", tmp_path, steps=120, lr=3e-3), quiet=True)
    after = _heldout_nll(tmp_path)
    print(f"sft held-out completion NLL: {before:.3f} -> {after:.3f}")
    assert after < 0.4 * before


@pytest.mark.slow  # the SFT family's default-suite learning check is test_sft_learns_arithmetic_from_scratch
@pytest.mark.parametrize("method,params", [("dft", {}), ("asft_anchored", {"asft_kl_coef": 0.05})])
def test_dft_and_asft_learn_from_scratch(tmp_path, tiny_model_dir, method, params):
    """Adam is scale-invariant, so DFT's small initial token weights still train a random model."""
    before = _heldout_nll(tiny_model_dir)
    run(_recipe(method, "builtin:tiny-qwen2", tmp_path, steps=80, lr=3e-3, **params), quiet=True)
    after = _heldout_nll(tmp_path)
    print(f"{method} held-out completion NLL: {before:.3f} -> {after:.3f}")
    assert after < before - 1.0  # at least one nat per token better than the random start
