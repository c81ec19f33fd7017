"""recipes/real/ (starting values for 0.5B-8B chat models) validate offline; toy recipes say they are toy-scale;
PLoRA's final save writes tied weights once; GOAT's SVD initialisation logs progress (issue 12 failure 8)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from posttrain.recipe import load_recipe
from posttrain.train import preflight

ROOT = Path(__file__).resolve().parents[1]
REAL = sorted((ROOT / "recipes" / "real").glob("*.yaml"))


def test_there_are_real_recipes_for_each_family():
    assert {p.stem for p in REAL} >= {"sft_lora", "dpo_lora", "grpo_lora", "npo_rt"}


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_recipe_passes_preflight_without_a_download(path):
    recipe = load_recipe(path)
    assert "/" in recipe.model.path and not recipe.model.path.startswith("builtin:")  # a hub chat model
    assert recipe.peft is None or not recipe.peft.modules_to_save  # no full-size copies of tied embeddings
    assert recipe.training.get("learning_rate", 1.0) <= 2e-4
    # the same recipe on a built-in model: every key (training: against TRL's config) checks out, no data loaded
    info, config, _ = preflight(load_recipe(path, ["model=builtin:tiny-qwen2"]), load_data=False)
    assert config.learning_rate == recipe.training["learning_rate"]


def test_toy_recipes_say_they_are_toy_scale():
    toy = sorted((ROOT / "recipes").glob("*.yaml"))
    assert toy and all("Toy scale" in p.read_text() for p in toy), [p.name for p in toy if "Toy" not in p.read_text()]


def test_tied_embeddings_in_modules_to_save_warn(tmp_path, caplog):
    from posttrain.models import load_model
    from posttrain.recipe import parse_recipe
    from posttrain.train import check_peft_against_model

    caplog.set_level(logging.WARNING, logger="posttrain")
    recipe = parse_recipe({"model": "builtin:tiny-qwen2", "data": {"train": "builtin:arithmetic-sft"},
                           "method": {"name": "sft"}, "peft": {"r": 4, "modules_to_save": ["embed_tokens"]}})
    check_peft_against_model(recipe, load_model("builtin:tiny-qwen2"))
    assert any("tied to the output head" in r.getMessage() for r in caplog.records)


def test_plora_final_save_writes_tied_weights_once(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from posttrain.train import run

    recipe = load_recipe(ROOT / "recipes" / "sft_plora.yaml", [
        "training.max_steps=2", "peft.plora.stage_steps=1", "training.per_device_train_batch_size=4",
        "data.eval=null", "data.test=null", "report=false", "training.save_strategy=no",
        f"output_dir={tmp_path / 'run'}", "data.train.options.num_samples=16"])
    run(recipe, quiet=True)
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("embed_tokens.weight") for k in keys)
    assert not any(k.endswith("lm_head.weight") for k in keys)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_goat_svd_initialisation_logs_progress(caplog):
    from posttrain.adapters.goat import apply_goat
    from posttrain.models import load_model

    caplog.set_level(logging.INFO, logger="posttrain")
    apply_goat(load_model("builtin:tiny-qwen2"), "all-linear", rank=4, num_experts=2, top_k=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GOAT: SVD initialisation")]
    assert lines[0].endswith("layers") and len(lines) >= 3
    total = lines[0].split()[-2]
    assert lines[-1].startswith(f"GOAT: SVD initialisation {total}/{total} layers")
