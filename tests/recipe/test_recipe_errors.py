"""Bad input: one `error:` line on stderr naming the key, file or row; exit code 2; no traceback."""

import json
import subprocess
import sys

import pytest
import yaml

from posttrain.cli import main

BASE = {
    "model": "builtin:tiny-qwen2",
    "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 8}}},
    "method": {"name": "sft"},
    "training": {"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no", "logging_steps": 1},
}


def _run(tmp_path, capsys, recipe=None, extra=()):
    path = tmp_path / "recipe.yaml"
    recipe = dict(BASE if recipe is None else recipe)
    recipe.setdefault("output_dir", str(tmp_path / "out"))
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_one_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not any("Traceback" in line for line in err)
    return lines[0]


def test_unknown_top_level_key_suggests(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, {**BASE, "trainig": {}})
    _assert_one_error(code, err, "trainig", "did you mean 'training'")


def test_unknown_nested_key_suggests(tmp_path, capsys):
    recipe = {**BASE, "data": {"train": {"source": "builtin:arithmetic-sft", "max_sample": 3}}}
    code, err = _run(tmp_path, capsys, recipe)
    _assert_one_error(code, err, "data.train.max_sample", "did you mean 'max_samples'")


def test_unknown_method_hyperparameter(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, {**BASE, "method": {"name": "asft_anchored", "kl_coef": 0.1}})
    _assert_one_error(code, err, "method.kl_coef", "unknown key")


def test_unknown_training_argument(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, extra=["--set", "training.max_step=3"])
    _assert_one_error(code, err, "training.max_step", "did you mean 'max_steps'")


def test_unknown_training_argument_is_refused_before_trl_loads(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, "training": {"learnin_rate": 1e-3}}))
    code = ("import sys\n"
            "from posttrain.errors import UserError\n"
            "from posttrain.recipe import load_recipe\n"
            f"try:\n    load_recipe({str(path)!r})\nexcept UserError as exc:\n    print(exc)\n"
            "print(sorted(m for m in ('trl', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["training.learnin_rate: unknown training argument (did you mean 'learning_rate'?)", "[]"]


def test_training_fields_file_is_current():
    from posttrain.recipe.training_args import FIELDS_FILE, field_table

    assert json.loads(FIELDS_FILE.read_text()) == field_table(), (
        "regenerate: python -m posttrain.recipe.training_args > posttrain/recipe/training_fields.json")


def test_wrong_type(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, extra=["--set", "method.name=dft", "--set", "seed=abc"])
    _assert_one_error(code, err, "seed", "integer")
    code, err = _run(tmp_path, capsys, {**BASE, "method": {"name": "asft_anchored", "asft_kl_coef": "big"}})
    _assert_one_error(code, err, "method.asft_kl_coef")


def test_scientific_notation_is_a_number_and_a_word_is_refused(tmp_path, capsys):
    from posttrain.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "o")}))
    loaded = load_recipe(recipe, ["training.learning_rate=3e-3", "method.name=dft", "training.save_strategy=no"])
    assert loaded.training["learning_rate"] == pytest.approx(0.003)  # PyYAML alone reads "3e-3" as a string
    assert loaded.training["save_strategy"] == "no"  # ... and "no" as False (YAML 1.1)
    code, err = _run(tmp_path, capsys, extra=["--set", "training.learning_rate=fast"])
    _assert_one_error(code, err, "training.learning_rate", "expected a number", "'fast'")


def test_unknown_method_name(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, extra=["--set", "method.name=dtf"])
    _assert_one_error(code, err, "method.name", "'dtf'", "did you mean 'dft'")


def test_missing_recipe_file(tmp_path, capsys):
    code = main(["train", str(tmp_path / "nope.yaml")])
    _assert_one_error(code, capsys.readouterr().err.splitlines(), "nope.yaml", "not found")


def test_missing_data_file(tmp_path, capsys):
    recipe = {**BASE, "data": {"train": str(tmp_path / "missing.jsonl")}}
    code, err = _run(tmp_path, capsys, recipe)
    _assert_one_error(code, err, "data.train.source", "missing.jsonl", "not found")


def test_missing_column(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "answr": str(i + 1)}) for i in range(4)))
    code, err = _run(tmp_path, capsys, {**BASE, "data": {"train": str(data)}})
    _assert_one_error(code, err, "data.train", "missing column 'completion'", "qa.jsonl")


def test_column_mapping_fixes_missing_column(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) for i in range(8)))
    recipe = {**BASE, "data": {"train": {"source": str(data), "columns": {"question": "prompt", "answer": "completion"}}}}
    code, err = _run(tmp_path, capsys, recipe)
    assert code == 0, err


def test_empty_dataset(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    code, err = _run(tmp_path, capsys, {**BASE, "data": {"train": str(data)}})
    _assert_one_error(code, err, "data.train", "empty.jsonl", "no rows")


def test_invalid_json_names_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": oops}\n')
    code, err = _run(tmp_path, capsys, {**BASE, "data": {"train": str(data)}})
    _assert_one_error(code, err, "bad.jsonl:2", "invalid JSON")


def test_empty_completions_are_skipped_with_a_count(tmp_path, capsys, caplog):
    data = tmp_path / "some_empty.jsonl"
    rows = [{"prompt": f"{i}+1=", "completion": "" if i % 4 == 0 else str(i + 1)} for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, err = _run(tmp_path, capsys, {**BASE, "data": {"train": str(data)}})
    assert code == 0
    assert any("skipped 2 of 8 rows" in line and "row 0" in line for line in err), err


def test_all_rows_unusable_is_an_error(tmp_path, capsys):
    data = tmp_path / "all_empty.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "1+1=", "completion": " "}) for _ in range(3)))
    code, err = _run(tmp_path, capsys, {**BASE, "data": {"train": str(data)}})
    _assert_one_error(code, err, "data.train", "no usable rows")


def test_method_needing_a_reference_without_one(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, {**BASE, "method": {"name": "asft_anchored"}, "ref_model": "none"})
    _assert_one_error(code, err, "ref_model", "asft_anchored", "needs a reference model")


def test_reference_given_to_a_method_without_one(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, {**BASE, "ref_model": "builtin:tiny-qwen2"})
    _assert_one_error(code, err, "ref_model", "uses no reference")


def test_missing_local_model_dir(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, {**BASE, "model": str(tmp_path / "no_model_here")})
    _assert_one_error(code, err, "model.path", "not found")


def test_bad_set_syntax(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, extra=["--set", "training.max_steps"])
    _assert_one_error(code, err, "--set", "dotted.key=value")


def test_poft_without_scores(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, {**BASE, "method": {"name": "poft"}})
    _assert_one_error(code, err, "data.train", "poft_ref_scores")


def test_poft_non_finite_score_names_row(tmp_path, capsys):
    data = tmp_path / "scored.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2", "poft_ref_scores": [-1.0, -2.0]} for _ in range(3)]
    rows[1]["poft_ref_scores"] = []
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, err = _run(tmp_path, capsys, {**BASE, "method": {"name": "poft"}, "data": {"train": str(data)}})
    _assert_one_error(code, err, "data.train", "row 1")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "metod": {"name": "sft"}}))
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: metod: unknown key (did you mean 'method'?)")
