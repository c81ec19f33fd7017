"""Data sources (json, jsonl, parquet, a dataset directory through ``load_dataset``), the Llama tiny model, the
``model.dtype`` option and ``posttrain train --resume`` from the command line."""

import json
from pathlib import Path

import pytest
import torch

from posttrain.recipe import DataSource, parse_recipe

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (3, 4), (10, 20), (7, 8)]]


def _write_all_formats(tmp_path):
    import datasets

    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    folder = tmp_path / "hub_style"  # what a cloned hub dataset repository looks like: data files in a folder
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return ["rows.json", "rows.jsonl", "rows.parquet", "hub_style"]


def test_every_local_format_loads_the_same_rows(tmp_path):
    from posttrain.data.sources import load_source

    for name in _write_all_formats(tmp_path):
        ds = load_source(DataSource(source=str(tmp_path / name)), "data.train", "sft")
        assert [{"prompt": r["prompt"], "completion": r["completion"]} for r in ds] == ROWS, name
    renamed = load_source(DataSource(source=str(tmp_path / "rows.parquet"), columns={"completion": "answer"},
                                     max_samples=2), "data.train", "test")
    assert renamed.column_names == ["prompt", "answer"] and len(renamed) == 2


def test_tiny_llama_trains_saves_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.train import run

    run(parse_recipe({
        "model": "builtin:tiny-llama",
        "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 64}}},
        "method": {"name": "sft"},
        "training": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "logging_steps": 1,
                     "save_strategy": "no", "disable_tqdm": True},
        "output_dir": str(tmp_path),
    }), quiet=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.model_type == "llama"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_model_dtype_option(dtype, expected):
    from posttrain.methods import get_method
    from posttrain.train import load_models

    recipe = parse_recipe({
        "model": {"path": "builtin:tiny-qwen2", "dtype": dtype},
        "data": {"train": "builtin:arithmetic-sft"},
        "method": {"name": "sft"},
    })
    _, model, _ = load_models(recipe, get_method("sft"))
    assert {p.dtype for p in model.parameters()} == {expected}


def test_cli_resume_flag_continues_from_the_newest_checkpoint(tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "run"
    args = ["train", "recipes/sft.yaml", "--set", "model=builtin:tiny-qwen2", "--set", "peft=null",
            "--set", "data.eval=null", "--set", "data.test=null", "--set", "training.save_steps=2",
            "--set", "training.logging_steps=1", "--set", "training.disable_tqdm=true", "--set", f"output_dir={out}"]
    assert main([*args, "--set", "training.max_steps=2"]) == 0
    assert (out / "checkpoint-2").is_dir()
    assert main([*args, "--set", "training.max_steps=4", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 after resuming (not 1-4 again)
    assert (out / "checkpoint-4").is_dir()


def test_builtin_rebuild_trains_on_one_thread(tmp_path, monkeypatch):
    """``python -m posttrain.run.build_builtins`` trains the derived built-ins on one thread (one reduction order
    whatever the core count), restores the thread count, and starts from the shipped base model."""
    import posttrain.train
    from safetensors.torch import save_file

    from posttrain.builtin import BUILTIN_MODELS, builtin_model_dir
    from posttrain.run.build_builtins import _trained_state

    seen = []

    def fake_run(recipe, quiet=False):
        seen.append((recipe.model.path, recipe.training["max_steps"], torch.get_num_threads()))
        out = Path(recipe.output_dir)
        out.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))

    monkeypatch.setattr(posttrain.train, "run", fake_run)
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        base = builtin_model_dir("tiny-qwen2")
        state = _trained_state(BUILTIN_MODELS["tiny-qwen2-arith"], base)
        assert seen == [(str(base), 800, 1)] and torch.get_num_threads() == 2
        assert list(state) == ["w"]
    finally:
        torch.set_num_threads(original)
