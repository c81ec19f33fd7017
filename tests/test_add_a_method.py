"""Adding a method end to end (docs/contributing.md): a toy SFT-family method registered from this test file runs a
short recipe through `posttrain.train.run`, and `posttrain methods NAME` prints a method's page summary and keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.losses.sft import nll_loss
from posttrain.methods import METHODS, MethodInfo, SFTParams, register
from posttrain.recipe import parse_recipe
from posttrain.trainers.sft import SFT_LOSSES
from posttrain.train import run

ROOT = Path(__file__).resolve().parents[1]


class HalfNLLParams(SFTParams):
    """Toy: the SFT loss times ``scale``."""

    scale: float = 0.5


def half_nll_objective(trainer, s):
    """Toy loss for the test: ``scale`` times the token-mean NLL of SFT (Ouyang et al. 2022, arXiv 2203.02155)."""
    return trainer.params.scale * nll_loss(s.outputs.log_probs, s.outputs.label_mask, s.num_items_in_batch), {}


@pytest.fixture
def toy_method():
    SFT_LOSSES.add("toy_half_nll", half_nll_objective, doc="docs/contributing.md", extra_columns=(),
                   token_sum_loss=True)
    register(MethodInfo(name="toy_half_nll", family="sft", summary="Toy: half the SFT loss.", paper="(test only)",
                        recipe="(none)", params=HalfNLLParams, doc="docs/contributing.md"))
    yield "toy_half_nll"
    SFT_LOSSES.remove("toy_half_nll")
    METHODS.pop("toy_half_nll")


def _first_loss(tmp_path: Path, method: dict) -> float:
    recipe = parse_recipe({
        "model": "builtin:tiny-qwen2",
        "data": {"train": {"source": "builtin:arithmetic-sft", "max_samples": 16}},
        "method": method,
        "training": {"max_steps": 1, "learning_rate": 0.0, "logging_steps": 1, "per_device_train_batch_size": 8,
                     "save_strategy": "no", "disable_tqdm": True},
        "report": False,
        "output_dir": str(tmp_path / method["name"]),
        "seed": 0,
    })
    run(recipe, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / method["name"] / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "loss" in r)


def test_a_toy_method_registered_here_trains_from_a_recipe(tmp_path, toy_method):
    toy = _first_loss(tmp_path, {"name": toy_method, "scale": 0.5})
    sft = _first_loss(tmp_path, {"name": "sft"})
    assert sft > 0.1
    assert toy == pytest.approx(0.5 * sft, rel=1e-5)  # same batch at lr 0: exactly the scaled SFT loss


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_methods_name_prints_the_page_summary_and_keys():
    proc = _cli("methods", "npo_kl")
    assert proc.returncode == 0, proc.stderr
    first_paragraph = (ROOT / "docs/methods/npo.md").read_text().split("\n\n")[1]
    assert " ".join(first_paragraph.split())[:60] in " ".join(proc.stdout.split())
    assert "retain_kl_mask: completion" in proc.stdout and "beta: 0.1" in proc.stdout
    assert "page:   docs/methods/npo.md" in proc.stdout
    part = _cli("methods", "delta_l")
    assert part.returncode == 0 and "method.aggregation: delta_l" in part.stdout
    assert "page:   docs/methods/grpo_aggregation.md#delta-l-normalisation" in part.stdout
    bad = _cli("methods", "dpx")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: methods: unknown method or part 'dpx' (did you mean 'dpo'?); see `posttrain methods`")
