"""`model:` / `ref_model:` load options (issue 12): validated, and refused before anything loads or is written when
they cannot work here; `training.model_init_kwargs` is refused (TRL would ignore it); a GOAT run can be evaluated."""

from __future__ import annotations

import json

import pytest
import yaml

from posttrain.cli import main

BASE = {"model": "builtin:tiny-qwen2", "data": {"train": "builtin:arithmetic-sft"}, "method": {"name": "sft"},
        "training": {"max_steps": 1}}


def _train(tmp_path, capsys, *overrides, recipe=None):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**(recipe or BASE), "output_dir": str(tmp_path / "out")}))
    args = ["train", str(path)]
    for o in overrides:
        args += ["--set", o]
    code = main(args)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[posttrain]")]
    return code, err


def _refused(tmp_path, capsys, key, *overrides, text=""):
    code, err = _train(tmp_path, capsys, *overrides)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {key}"), err
    assert text in err[0]
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_4bit_on_a_cpu_only_machine_stops_before_loading(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    _refused(tmp_path, capsys, "model.quantization:", "model.quantization={load_in_4bit: true}", "peft={r: 4}",
             text="needs a CUDA GPU")


def test_quantised_plora_ggpo_goat_and_full_finetuning_are_refused(tmp_path, capsys):
    q = "model.quantization={load_in_4bit: true, bnb_4bit_quant_type: nf4}"
    _refused(tmp_path, capsys, "model.quantization:", q, text="add a peft: block")
    for kind in ("plora", "ggpo", "goat"):
        _refused(tmp_path, capsys, "model.quantization:", q, f"peft={{type: {kind}, r: 8}}", text=f"peft.type {kind}")


def test_quantization_block_is_validated(tmp_path, capsys):
    _refused(tmp_path, capsys, "model.quantization:", "model.quantization={}", text="exactly one")
    _refused(tmp_path, capsys, "model.quantization.bnb_4bit_quant_type:",
             "model.quantization={load_in_4bit: true, bnb_4bit_quant_type: int3}")
    _refused(tmp_path, capsys, "model.quantization.load_in_4bits:", "model.quantization={load_in_4bits: true}",
             text="did you mean")


def test_attn_implementation_and_device_map_are_checked(tmp_path, capsys, monkeypatch):
    _refused(tmp_path, capsys, "model.attn_implementation:", "model.attn_implementation=flash")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _refused(tmp_path, capsys, "model.device_map:", "model.device_map=auto", text="multi-process")


def test_model_init_kwargs_is_refused_not_ignored(tmp_path, capsys):
    _refused(tmp_path, capsys, "training.model_init_kwargs:", "training.model_init_kwargs={torch_dtype: bfloat16}",
             text="model: keys")


def test_load_options_reach_from_pretrained(tmp_path, capsys):
    from posttrain.models import load_model

    model = load_model("builtin:tiny-qwen2", attn_implementation="eager", dtype="float32")
    assert model.config._attn_implementation == "eager"
    code, _ = _train(tmp_path, capsys, "model.attn_implementation=eager", "report=false")
    assert code == 0
    written = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["model"]
    assert written["attn_implementation"] == "eager" and written["trust_remote_code"] is False
    assert written["quantization"] is None


def test_eval_of_a_goat_run_is_not_a_traceback(tmp_path, capsys):
    """Issue 12 failure 7: `posttrain eval` on a GOAT run was a raw KeyError."""
    recipe = {**BASE, "model": "builtin:tiny-qwen2-arith", "peft": {"type": "goat", "r": 4, "goat": {"num_experts": 2, "top_k": 1}},
              "report": False}
    code, err = _train(tmp_path, capsys, recipe=recipe)
    assert code == 0, err
    out = tmp_path / "acc.json"
    assert main(["eval", str(tmp_path / "out"), "--max-samples", "4", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 4
