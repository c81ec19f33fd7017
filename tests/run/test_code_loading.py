"""What a recipe may execute (issue 30): the code-loading keys run the user's code only once every other check has
passed, are looked up next to the recipe first (the path they run from is logged), and every stage of a multi-stage
recipe is checked before the first one trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from posttrain.cli import main

GRPO = {
    "model": "builtin:tiny-qwen2-arith",
    "data": {"train": {"source": "builtin:arithmetic-rl", "options": {"num_samples": 8}}},
    "method": {"name": "grpo", "rewards": [{"function": "mine.py:reward"}]},
    "training": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 4,
                 "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True},
}
# a reward file that leaves a trace when it is imported (its code runs)
MINE = """from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("ran")


def reward(prompts, completions, **kwargs):
    return [0.0 for _ in completions]
"""


@pytest.fixture
def no_model_load(monkeypatch):
    import posttrain.models

    class Loaded(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(posttrain.models, "load_model", refuse)
    return Loaded


def _write(folder: Path, recipe: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.py").write_text(MINE)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(folder / "out"), **recipe}))
    return path


@pytest.mark.parametrize("change,needle", [
    ({"training": {**GRPO["training"], "lr_scheduler_type": "cosine\u200b"}}, "training.lr_scheduler_type"),
    ({"training": {**GRPO["training"], "gradient_accumulation_steps": 64}}, "training.gradient_accumulation_steps"),
    ({"data": {"train": "missing.jsonl"}}, "data.train.source"),
    ({"data": {**GRPO["data"], "chat_template": "missing.jinja"}}, "data.chat_template"),
    ({"model": "/dev/null"}, "model.path"),
    ({"output_dir": "PREVIOUS"}, "holds another run's outputs"),
])
def test_user_code_never_runs_for_a_run_refused_on_other_grounds(change, needle, tmp_path, capsys, no_model_load):
    folder = tmp_path / "r"
    if change.get("output_dir") == "PREVIOUS":
        previous = tmp_path / "previous"
        previous.mkdir()
        (previous / "summary.json").write_text("{}")
        change = {"output_dir": str(previous)}
    path = _write(folder, {**GRPO, **change})
    assert main(["train", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not (folder / "IMPORTED").exists()


def test_user_code_runs_last_before_the_model_and_its_path_is_logged(tmp_path, monkeypatch, capsys, no_model_load):
    folder = tmp_path / "r"
    path = _write(folder, GRPO)
    with pytest.raises(no_model_load):
        main(["train", str(path)])
    err = capsys.readouterr().err
    assert (folder / "IMPORTED").exists()
    assert f"method.rewards[0].function: running code from {folder / 'mine.py'} (next to the recipe)" in err
    # a file that is not next to the recipe: found in the working directory, and said so
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "theirs.py").write_text(MINE)
    monkeypatch.chdir(elsewhere)
    path = _write(tmp_path / "r2", {**GRPO, "method": {"name": "grpo", "rewards": [{"function": "theirs.py:reward"}]}})
    with pytest.raises(no_model_load):
        main(["train", str(path)])
    assert ("running code from " + str(elsewhere / "theirs.py") + " (from the working directory: not next to the "
            "recipe)") in capsys.readouterr().err


def test_an_environment_that_is_not_a_factory_is_refused(tmp_path, capsys, no_model_load):
    (tmp_path / "env.py").write_text("def calculator(expression: str) -> str:\n    return expression\n")
    recipe = {**GRPO, "data": {"train": {"source": "builtin:arithmetic-tool-rl", "options": {"num_samples": 8}}},
              "method": {"name": "grpo", "environment": "env.py:calculator"}, "output_dir": str(tmp_path / "out")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")][0]
    assert "method.environment: TRL makes one environment per rollout by calling it with no arguments" in line


def test_every_stage_is_checked_before_the_first_trains(tmp_path, capsys):
    """A data file missing in stage 2, a bad key that only TRL's config sees, or a stage's reward code that fails:
    each is one error line naming the stage, and stage 1 has not trained."""
    base = {**GRPO, "method": {"name": "grpo"}, "output_dir": str(tmp_path / "out"),
            "data": {"train": {"source": "builtin:arithmetic-rl", "max_samples": 8}}}
    cases = [
        ({"name": "second", "data": {"train": {"source": str(tmp_path / "nope.jsonl")}}}, "data.train.source"),
        ({"name": "second", "training": {"lr_scheduler_type": "cosine\u200b"}}, "training.lr_scheduler_type"),
        ({"name": "second", "training": {"gradient_accumulation_steps": 64}}, "gradient_accumulation_steps"),
        ({"name": "second", "method": {"rewards": [{"function": "broken.py:reward"}]}}, "method.rewards[0]"),
    ]
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken on import')\n")
    for stage, needle in cases:
        recipe = {**base, "stages": [{"name": "first"}, stage]}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["train", str(tmp_path / "recipe.yaml")]) == 2
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and "stage 'second'" in errors[0] and needle in errors[0], errors
        assert not (tmp_path / "out" / "first" / "model.safetensors").exists()
