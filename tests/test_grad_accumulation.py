"""Gradient accumulation must not change the step: 4 rows in one micro-batch and 2 x 2 accumulated give the same
logged loss and grad norm at lr 0 (HF divides a loss by the accumulation steps unless the trainer says it is already
normalised over the whole batch; PoFT's per-sequence mean once doubled both at 2 steps)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _first_step(recipe_name: str, out: Path, batch: int, accumulation: int) -> tuple[float, float]:
    from posttrain.recipe import load_recipe
    from posttrain.train import run

    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", [
        f"output_dir={out}", "training.max_steps=1", "training.learning_rate=0.0", "training.logging_steps=1",
        f"training.per_device_train_batch_size={batch}", f"training.gradient_accumulation_steps={accumulation}",
        "training.save_strategy='no'", "data.test=null", "report=false",
    ])
    run(recipe, quiet=True)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return row["loss"], row["grad_norm"]


@pytest.mark.parametrize("recipe_name", ["poft", "unlearn_npo_rt"])
def test_accumulated_step_equals_one_micro_batch(recipe_name, tmp_path):
    whole = _first_step(recipe_name, tmp_path / "whole", 4, 1)
    accumulated = _first_step(recipe_name, tmp_path / "accumulated", 2, 2)
    assert accumulated == pytest.approx(whole, rel=1e-5), (whole, accumulated)
