"""Pre-DPO (docs/methods/pre_dpo.md): DPO with a guide as the reference, worked numbers on the DPO loss, and the
multi-stage recipe machinery (posttrain/stages.py) that runs guide and main stage in one command."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import UserError
from posttrain.losses.preference import dpo_loss

SFT_C, SFT_R = torch.tensor([-20.0, -35.0, -12.0]), torch.tensor([-22.0, -30.0, -15.0])
GUIDE_C, GUIDE_R = torch.tensor([-18.0, -36.0, -11.0]), torch.tensor([-26.0, -29.0, -14.0])


def _dpo(chosen, rejected, ref_c, ref_r, beta=0.1):
    c = chosen.clone().requires_grad_(True)
    out = dpo_loss(c, rejected, ref_c, ref_r, beta=beta)
    loss = out.losses.mean()
    loss.backward()
    return out, loss, c.grad


def test_worked_example_step_zero_vanilla_dpo_and_pre_dpo():
    out, loss, grad = _dpo(SFT_C, SFT_R, SFT_C, SFT_R)  # vanilla: reference = the SFT policy itself
    assert loss.item() == pytest.approx(0.693147, abs=1e-6)
    assert torch.allclose(grad, torch.full((3,), -0.016667), atol=1e-6)
    out, loss, grad = _dpo(SFT_C, SFT_R, GUIDE_C, GUIDE_R)  # Pre-DPO: reference = the guide
    assert torch.allclose(out.losses, torch.tensor([1.037488, 0.598139, 0.693147]), atol=1e-6)
    assert loss.item() == pytest.approx(0.776258, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([-0.021522, -0.015006, -0.016667]), atol=1e-6)
    D = (SFT_C - SFT_R) - (GUIDE_C - GUIDE_R)
    assert D.tolist() == [-6.0, 2.0, 0.0]
    weights = torch.sigmoid(-0.1 * D)  # the implicit pair weight: up for pair 1 (the guide widened its margin)
    assert torch.allclose(weights, torch.tensor([0.645656, 0.450166, 0.5]), atol=1e-6)
    # step 0: l_i = softplus(beta * (m_guide - m_sft))
    gain = (GUIDE_C - GUIDE_R) - (SFT_C - SFT_R)
    assert torch.allclose(out.losses, torch.nn.functional.softplus(0.1 * gain), atol=1e-6)


def test_worked_example_later_step_weights():
    pc, pr = torch.tensor([-17.0, -34.0, -11.0]), torch.tensor([-27.0, -31.0, -15.0])
    d_dpo = (pc - pr) - (SFT_C - SFT_R)
    d_pre = (pc - pr) - (GUIDE_C - GUIDE_R)
    assert d_dpo.tolist() == [8.0, 2.0, 1.0] and d_pre.tolist() == [2.0, 4.0, 1.0]
    assert torch.allclose(torch.sigmoid(-0.1 * d_dpo), torch.tensor([0.310026, 0.450166, 0.475021]), atol=1e-6)
    assert torch.allclose(torch.sigmoid(-0.1 * d_pre), torch.tensor([0.450166, 0.401312, 0.475021]), atol=1e-6)
    assert (0.1 * d_dpo).mean().item() == pytest.approx(0.366667, abs=1e-6)  # rewards/margins
    assert (0.1 * d_pre).mean().item() == pytest.approx(0.233333, abs=1e-6)


def test_guide_equal_to_sft_is_plain_dpo():
    a, la, ga = _dpo(SFT_C + 1.5, SFT_R - 0.5, SFT_C, SFT_R)
    b, lb, gb = _dpo(SFT_C + 1.5, SFT_R - 0.5, SFT_C.clone(), SFT_R.clone())
    assert torch.equal(la, lb) and torch.equal(ga, gb)


# --------------------------------------------------------------------------------------------------------------------
# stages


def _data(**extra):
    return {"model": "builtin:tiny-qwen2-arith", "data": {"train": "builtin:arithmetic-pref"},
            "method": {"name": "dpo", "beta": 0.05}, "training": {"max_steps": 5}, "output_dir": "/tmp/pd",
            "stages": [{"name": "guide"}, {"name": "main", "ref_model": "stage:guide", "method": {"beta": 0.1}}],
            **extra}


def test_split_stages_merges_resolves_and_applies_overrides():
    from posttrain.stages import split_stages

    (g_name, guide), (m_name, main) = split_stages(_data(), ["training.max_steps=2", "output_dir=/tmp/other"])
    assert (g_name, m_name) == ("guide", "main")
    assert guide["output_dir"] == "/tmp/other/guide" and main["output_dir"] == "/tmp/other/main"
    assert main["ref_model"] == "/tmp/other/guide" and "ref_model" not in guide
    assert guide["method"] == {"name": "dpo", "beta": 0.05} and main["method"] == {"name": "dpo", "beta": 0.1}
    assert guide["training"]["max_steps"] == 2 and main["training"]["max_steps"] == 2


@pytest.mark.parametrize("stages, message", [
    ([{"name": "main", "ref_model": "stage:guide"}], r"^stages\[0\]\.ref_model: 'stage:guide' is not an earlier stage"),
    ([{"name": "a"}, {"name": "a"}], r"^stages\[1\]\.name: stage 'a' appears twice"),
    ([{"name": "../x"}], r"^stages\[0\]\.name: '\.\./x' must be"),
    ([{"method": {}}], r"^stages\[0\]\.name: every stage is a mapping with a name"),
    ([], r"^stages: expected a non-empty list"),
])
def test_stage_errors_name_the_key(stages, message):
    from posttrain.stages import split_stages

    with pytest.raises(UserError, match=message):
        split_stages(_data(stages=stages))


def test_every_stage_is_validated_before_training(tmp_path):
    from posttrain.stages import load_stages

    path = tmp_path / "r.yaml"
    import yaml

    data = _data(output_dir=str(tmp_path / "out"))
    data["stages"][1]["method"] = {"betta": 0.1}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"^stage 'main': method\.betta: unknown key"):
        load_stages(path)
    data["stages"][1]["method"] = {"beta": 0.1}
    path.write_text(yaml.safe_dump(data))
    stages = load_stages(path)
    assert [name for name, _ in stages] == ["guide", "main"]
    assert stages[1][1].ref_model.path == str(tmp_path / "out" / "guide")


@pytest.mark.slow  # recipes/pre_dpo.yaml runs end to end in the default suite (tests/test_cli_recipes.py)
def test_two_stage_run_uses_the_guide_and_resume_skips_finished_stages(tmp_path):
    """One command runs both stages; stage 2 starts from the start model (not the guide) with the guide as its
    reference; --resume of the finished recipe trains nothing again."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    sets = [f"output_dir={tmp_path}", "training.max_steps=2", "training.save_steps=2", "training.logging_steps=1",
            "data.train.max_samples=16", "data.eval=null", "data.test=null", "training.disable_tqdm=true"]
    args = [x for s in sets for x in ("--set", s)]
    cmd = [sys.executable, "-m", "posttrain.cli", "train", "recipes/pre_dpo.yaml", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage guide: 2 steps" in proc.stdout and "stage main: 2 steps" in proc.stdout
    import yaml

    main = yaml.safe_load((tmp_path / "main" / "recipe.yaml").read_text())
    assert main["ref_model"]["path"] == str(tmp_path / "guide") and main["model"]["path"] == "builtin:tiny-qwen2-arith"
    guide_w = AutoModelForCausalLM.from_pretrained(tmp_path / "guide").state_dict()
    main_w = AutoModelForCausalLM.from_pretrained(tmp_path / "main").state_dict()
    assert any(not torch.equal(guide_w[k], main_w[k]) for k in guide_w)
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage guide: already finished" in again.stdout and "stage main: already finished" in again.stdout


# --------------------------------------------------------------------------------------------------------------------
# a SimPO guide (the paper's second setting; recipes/pre_dpo_simpo.yaml)


def test_worked_example_simpo_guide_loss():
    """The SimPO guide loss of stage 1 (beta_s 2.5, gamma_s 1.0, i.e. gamma_beta_ratio 0.4) on the SFT log-probs with
    N_c = [10, 14, 6], N_r = [12, 10, 8] (docs/methods/pre_dpo.md#a-simpo-guide)."""
    from posttrain.losses.preference import simpo_loss

    lbar_c = SFT_C / torch.tensor([10.0, 14.0, 6.0])
    lbar_r = SFT_R / torch.tensor([12.0, 10.0, 8.0])
    assert torch.allclose(lbar_c, torch.tensor([-2.0, -2.5, -2.0])) and torch.allclose(
        lbar_r, torch.tensor([-1.833333, -3.0, -1.875]), atol=1e-6)
    out = simpo_loss(lbar_c, lbar_r, beta=2.5, gamma_beta_ratio=0.4)
    assert torch.allclose(out.losses, torch.tensor([1.633809, 0.575939, 1.550845]), atol=1e-6)
    assert out.losses.mean().item() == pytest.approx(1.253531, abs=1e-6)


def test_simpo_guide_recipe_stages():
    """recipes/pre_dpo_simpo.yaml: stage guide is SimPO (no reference model), stage main is DPO (beta 0.1) from the
    same start model with the guide's folder as its reference."""
    from pathlib import Path

    from posttrain.stages import load_stages

    root = Path(__file__).resolve().parents[2]
    (guide_name, guide), (main_name, main) = load_stages(root / "recipes" / "pre_dpo_simpo.yaml",
                                                         ["output_dir=/tmp/pds"])
    assert (guide_name, guide.method.name, guide.ref_model) == ("guide", "simpo", None)
    assert (guide.params.beta, guide.params.gamma_beta_ratio) == (2.5, 0.4)
    assert (main_name, main.method.name, main.params.loss, main.params.beta) == ("main", "dpo", "sigmoid", 0.1)
    assert main.ref_model.path == "/tmp/pds/guide" and main.model.path == guide.model.path == "builtin:tiny-qwen2-arith"


@pytest.mark.slow
def test_simpo_guide_run_is_the_reference_of_stage_two(tmp_path):
    """One command trains the SimPO guide, then DPO from the start model against it: stage 2's first loss is not
    log 2 (the guide differs from the start model) and its recipe names the guide's folder as ref_model."""
    import json
    import subprocess
    import sys

    import yaml

    sets = [f"output_dir={tmp_path}", "training.max_steps=4", "training.save_steps=4", "training.logging_steps=1",
            "data.train.max_samples=64", "data.eval=null", "data.test=null", "training.disable_tqdm=true"]
    cmd = [sys.executable, "-m", "posttrain.cli", "train", "recipes/pre_dpo_simpo.yaml",
           *[x for s in sets for x in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    guide = yaml.safe_load((tmp_path / "guide" / "recipe.yaml").read_text())
    main = yaml.safe_load((tmp_path / "main" / "recipe.yaml").read_text())
    assert guide["method"]["name"] == "simpo" and guide.get("ref_model") is None
    assert main["method"]["name"] == "dpo" and main["ref_model"]["path"] == str(tmp_path / "guide")
    first = json.loads((tmp_path / "main" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and abs(first["loss"] - 0.693147) > 1e-4, first
