"""Adding a method end to end (docs/contributing.md): a toy preference loss and a toy GRPO advantage, each one file
under tests/toy_methods/ that registers itself through the public registries, and a toy SFT-family method registered
here, train a short recipe through `posttrain.train.run` with the toy's math; `posttrain methods NAME` lists them and
prints a method's page summary and keys."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli import main as cli_main
from posttrain.errors import UserError
from posttrain.families.preference.forward import PREFERENCE_LOSSES
from posttrain.families.rl.parts import ADVANTAGES
from posttrain.families.sft.forward import SFT_LOSSES
from posttrain.losses.sft import nll_loss
from posttrain.methods import METHODS, MethodInfo, SFTParams, register
from posttrain.recipe import parse_recipe
from posttrain.train import run

ROOT = Path(__file__).resolve().parents[1]


class HalfNLLParams(SFTParams):
    """Toy: the SFT loss times ``scale``."""

    scale: float = 0.5


def half_nll_objective(p, f):
    """Toy loss for the test: ``scale`` times the token-mean NLL of SFT (Ouyang et al. 2022, arXiv 2203.02155)."""
    return p.scale * nll_loss(f.logps, f.mask, f.num_items), {}


@pytest.fixture
def toy_method():
    SFT_LOSSES.add("toy_half_nll", half_nll_objective, doc="docs/contributing.md", token_sum_loss=True)
    register(MethodInfo(name="toy_half_nll", family="sft", summary="Toy: half the SFT loss.", paper="(test only)",
                        recipe="(none)", params=HalfNLLParams, doc="docs/contributing.md"))
    yield "toy_half_nll"
    SFT_LOSSES.remove("toy_half_nll")
    METHODS.pop("toy_half_nll")


def _first_row(tmp_path: Path, method: dict, source: str = "builtin:arithmetic-sft", **training) -> dict:
    """The first logged training row of a one-step, learning-rate-0 run of ``method`` on the tiny model."""
    out = tmp_path / "-".join(f"{k}{v}" for k, v in method.items() if not isinstance(v, dict | list))
    recipe = parse_recipe({
        "model": "builtin:tiny-qwen2",
        "data": {"train": {"source": source, "max_samples": 16}},
        "method": method,
        "training": {"max_steps": 1, "learning_rate": 0.0, "logging_steps": 1, "per_device_train_batch_size": 8,
                     "save_strategy": "no", "disable_tqdm": True, **training},
        "report": False,
        "output_dir": str(out),
        "seed": 0,
    })
    run(recipe, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if "loss" in r)


def _first_loss(tmp_path: Path, method: dict) -> float:
    return _first_row(tmp_path, method)["loss"]


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


def _load_toy(name: str):
    """Import tests/toy_methods/NAME.py as a method file is imported: its module registers the toy."""
    spec = importlib.util.spec_from_file_location(f"toy_methods_{name}", ROOT / "tests" / "toy_methods" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _listed(capsys, *args) -> str:
    assert cli_main(["methods", *args]) == 0
    return capsys.readouterr().out


@pytest.fixture
def toy_hinge():
    _load_toy("toy_hinge")
    yield "toy_hinge"
    PREFERENCE_LOSSES.remove("toy_hinge")
    METHODS.pop("toy_hinge")


@pytest.fixture
def toy_baseline():
    _load_toy("toy_baseline")
    yield "toy_baseline"
    ADVANTAGES.remove("toy_baseline")


def test_a_toy_preference_loss_from_its_own_file_trains_with_its_math(tmp_path, capsys, toy_hinge):
    rows = {beta: _first_row(tmp_path, {"name": toy_hinge, "beta": beta}, "builtin:arithmetic-pref",
                             per_device_train_batch_size=4) for beta in (0.5, 2.0)}
    margin = rows[0.5]["toy/margin"]
    assert margin != 0 and rows[2.0]["toy/margin"] == pytest.approx(margin, rel=1e-6)  # same pairs at lr 0
    for beta, row in rows.items():  # |beta * margin| < 1 on every pair here, so the hinge is linear: 1 - beta * mean
        assert row["loss"] == pytest.approx(1.0 - beta * margin, rel=1e-5, abs=1e-6)
    assert "toy_hinge        [preference] Toy: hinge" in _listed(capsys)
    detail = _listed(capsys, toy_hinge)
    assert "toy_hinge [preference]" in detail and "beta: 1.0" in detail


def test_a_toy_grpo_advantage_from_its_own_file_reaches_the_loss(tmp_path, capsys, toy_baseline):
    grpo = {"name": "grpo", "advantage": toy_baseline, "aggregation": "grpo"}
    rows = {b: _first_row(tmp_path, {**grpo, "toy_baseline": b}, "builtin:arithmetic-rl", num_generations=4,
                          max_completion_length=4) for b in (0.25, 0.75)}
    for b, row in rows.items():  # ratio 1 at lr 0, sequence-mean aggregation: loss = -mean_i(r_i - b)
        assert row["loss"] == pytest.approx(b - row["reward"], abs=1e-6)
    assert rows[0.75]["loss"] - rows[0.25]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert "method.advantage: toy_baseline" in _listed(capsys, toy_baseline)
    assert "toy_baseline" in _listed(capsys).split("method.advantage")[1].splitlines()[0]
    with pytest.raises(UserError, match="method.scale_rewards: advantage toy_baseline uses a fixed baseline"):
        parse_recipe({"model": "builtin:tiny-qwen2", "data": {"train": {"source": "builtin:arithmetic-rl"}},
                      "method": {**grpo, "scale_rewards": "none"}})
