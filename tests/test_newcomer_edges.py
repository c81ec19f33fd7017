"""The rough edges a newcomer hits first (issue 29): recipe loading (duplicate keys, alias bombs, non-text keys),
launcher flags, `posttrain methods NAME` for every part, CPU threads, short-run and collapse warnings, log lines,
`--resume` summaries, run-folder paths and relative data paths."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.errors import UserError

SFT = {
    "model": "builtin:tiny-qwen2",
    "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 16}}},
    "method": {"name": "sft"},
    "training": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no", "logging_steps": 1,
                 "disable_tqdm": True},
}


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# recipe YAML


def test_duplicate_keys_are_refused_and_merge_keys_may_be_overridden():
    from posttrain.recipe import load_yaml

    with pytest.raises(yaml.YAMLError, match=r"duplicate key 'lr' \(first on line 2\)"):
        load_yaml("training:\n  lr: 1\n  steps: 2\n  lr: 3\n")
    with pytest.raises(yaml.YAMLError, match="duplicate key 'training'"):
        load_yaml("training: {a: 1}\nmodel: x\ntraining: {a: 2}\n")
    # a `<<` merge supplies defaults that the mapping's own keys override: not a duplicate
    assert load_yaml("base: &b {a: 1, b: 2}\nuse: {<<: *b, b: 3}\n")["use"] == {"a": 1, "b": 3}


def test_alias_bombs_and_self_references_are_refused_fast():
    from posttrain.recipe import MAX_NODES, load_yaml

    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
    start = time.time()
    with pytest.raises(yaml.YAMLError, match=f"more than {MAX_NODES} nodes through its aliases"):
        load_yaml(laughs)
    assert time.time() - start < 5
    with pytest.raises(yaml.YAMLError, match="refers to the node that contains it"):
        load_yaml("x: &x [1, *x]\n")
    # a few aliases are fine
    assert load_yaml("a: &a [1, 2]\nb: *a\nc: *a\n") == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}


@pytest.mark.parametrize("text,needle", [
    ("1: one\nmodel: x\n", "key 1 is not a name"),
    ("training: {true: 1}\n", "training: key True is not a name"),
    ("method: {beta: 1.0e-320}\n", "method.beta: 1e-320 is a subnormal number"),
])
def test_structure_checks_name_the_key(text, needle):
    from posttrain.recipe import check_structure, load_yaml

    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        check_structure(load_yaml(text))


def test_home_of_an_unknown_user_is_one_error_line(tmp_path, capsys):
    from posttrain.paths import expand_home

    with pytest.raises(UserError, match="output_dir: cannot expand '~nosuchuser_h29/run': there is no user"):
        expand_home("~nosuchuser_h29/run", "output_dir")
    assert main(["train", "~nosuchuser_h29/recipe.yaml"]) == 2
    assert "recipe: cannot expand" in _error(capsys)


def test_a_typo_in_the_recipe_is_reported_before_torch_is_imported(tmp_path):
    """Start-up: a recipe whose own keys are wrong (not method.* or training.*, which need the method registry and
    TRL) is refused before torch, transformers and TRL are imported (seconds instead of the imports' ~10 s)."""
    import subprocess
    import sys

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**SFT, "trainig": {"max_steps": 1}}))
    code = ("import sys\nfrom posttrain.cli import main\nrc = main(['train', sys.argv[1]])\n"
            "print(rc, sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert "error: trainig: unknown key (did you mean 'training'?)" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# launcher flags: checked before the recipe is even read


@pytest.mark.parametrize("argv,needle", [
    (["--num-processes", "0"], "--num-processes: must be >= 1, got 0"),
    (["--num-processes", "-3"], "--num-processes: must be >= 1, got -3"),
    (["--distributed", "zero3"], "--distributed zero3: give --num-processes N as well"),
    (["--distributed", "ddp", "--num-processes", "1"], "one process has nothing to distribute"),
    (["--distributed", "nccl", "--num-processes", "2"], "--distributed: unknown 'nccl'"),
])
def test_launcher_flags_are_checked_first(argv, needle, capsys):
    assert main(["train", "no/such/recipe.yaml", *argv]) == 2
    assert needle in _error(capsys)


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp2"])
def test_one_process_hint_names_a_config_file_that_exists(backend, capsys):
    """The hint for a one-process DeepSpeed/FSDP run points at a file the repository ships."""
    from posttrain.launch import check_launch_flags

    with pytest.raises(UserError, match="one process has nothing to distribute") as caught:
        check_launch_flags(1, backend)
    config = re.search(r"--config_file (\S+)", str(caught.value)).group(1)
    assert (Path(__file__).resolve().parents[1] / config).is_file(), config


def test_missing_backend_package_is_named_before_anything_starts(monkeypatch, capsys):
    import posttrain.launch as launch

    monkeypatch.setitem(launch.NEEDS, "zero2", "no_such_deepspeed_h29")
    assert main(["train", "no/such/recipe.yaml", "--num-processes", "2", "--distributed", "zero2"]) == 2
    assert "--distributed zero2: needs no_such_deepspeed_h29" in _error(capsys)


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "r.yaml", "--num-processes", "two"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: posttrain train: argument --num-processes")


# ----------------------------------------------------------------------------------------------------------------
# posttrain methods NAME


def test_every_part_and_option_has_a_methods_page(capsys):
    from posttrain.catalogue import parts
    from posttrain.methods import METHODS

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    names = [p.name for p in parts()]
    for name in ("wagle", "stable_spam", "pacs", "pre_dpo", "ipo", "lora", "goat", "stratified", "dapo", "gppo"):
        assert name in names and name in listing, name
    for name in [*METHODS, *names]:
        assert main(["methods", name]) == 0, name
        out = capsys.readouterr().out
        assert "page:" in out and "docs/methods/" in out, (name, out)


def test_methods_shows_defaults_as_recipe_values_and_every_key_has_text(capsys):
    from posttrain.methods import METHODS

    assert main(["methods", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "rewards: [{name: exact_match, weight: 1.0}]" in out and "RewardSpec(" not in out
    assert "epsilon_high: null" in out and "aggregation: dapo" in out
    undocumented = [f"{m.name}.{key}" for m in METHODS.values() for key, field in m.params.model_fields.items()
                    if not field.description]
    assert not undocumented


def test_unknown_methods_name_suggests(capsys):
    assert main(["methods", "wagl"]) == 2
    assert "did you mean 'wagle'" in _error(capsys)


# ----------------------------------------------------------------------------------------------------------------
# CPU threads, warnings, log lines


@pytest.mark.parametrize("cores,load,processes,expected", [
    (2, 0.1, 1, 1),  # idle: one core left to the rest of the machine
    (2, 5.0, 1, 1),  # a busy machine: at least one
    (1, 0.0, 1, 1),
    (16, 0.2, 1, 15),
    (16, 3.4, 1, 13),
    (16, 0.0, 4, 3),  # shared among the processes of a run
    (2, 0.0, 4, 1),
])
def test_thread_choice(cores, load, processes, expected):
    from posttrain.threads import pick_num_threads

    assert pick_num_threads(cores, load, processes) == expected


def test_thread_override_from_the_environment(monkeypatch, caplog):
    import torch

    from posttrain.threads import configure_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("POSTTRAIN_NUM_THREADS", "1")
    try:
        with caplog.at_level("INFO", logger="posttrain"):
            assert configure_cpu_threads() == 1
        assert torch.get_num_threads() == 1 and "CPU threads: 1 (from POSTTRAIN_NUM_THREADS)" in caplog.text
        monkeypatch.setenv("POSTTRAIN_NUM_THREADS", "0")
        with pytest.raises(UserError, match="POSTTRAIN_NUM_THREADS: expected a number of threads >= 1"):
            configure_cpu_threads()
    finally:
        torch.set_num_threads(before)


def test_collapse_and_dead_gradient_messages():
    from posttrain.health import collapse_message, dead_gradient_message

    v = 1024
    uniform = math.log(v)
    assert collapse_message([uniform, uniform * 0.99, uniform * 0.97], v) is None  # random init stays near uniform
    assert collapse_message([1.2, 0.9, 0.8], v) is None
    message = collapse_message([1.2, 0.9, uniform * 0.999], v)
    assert message is not None and "collapsed" in message and "6.93" in message
    assert dead_gradient_message([1.0, 0.0, 0.0]) is None
    assert "exactly 0 for 3 logging steps" in dead_gradient_message([1.0, 0.0, 0.0, 0.0])


def test_log_lines_are_readable():
    from posttrain.health import format_log

    line = format_log({"loss": 0.123456, "grad_norm": 2.0, "learning_rate": 1e-4, "total_flos": 9.0, "epoch": 0.5}, 10,
                      100)
    assert line == "step 10/100: loss 0.1235, grad_norm 2, learning_rate 0.0001, epoch 0.5"


def test_schedule_and_short_run_warnings():
    from posttrain.recipe.training_args import schedule_warnings

    assert schedule_warnings({"max_steps": 100, "warmup_steps": 10}) == []
    warnings = schedule_warnings({"max_steps": 5, "warmup_steps": 20})
    assert any(w.startswith("training.warmup_steps: 20 >= max_steps 5") for w in warnings)
    assert any(w.startswith("training.max_steps: 5 optimizer steps is a smoke test") for w in warnings)


def test_accumulation_larger_than_the_data():
    from posttrain.recipe.training_args import check_batch_fits_data

    check_batch_fits_data({"gradient_accumulation_steps": 5, "per_device_train_batch_size": 4}, "sft", "data.train",
                          20)
    with pytest.raises(UserError, match=r"training.gradient_accumulation_steps: 6 micro-batches .* is 5 micro-batches"):
        check_batch_fits_data({"gradient_accumulation_steps": 6, "per_device_train_batch_size": 4}, "sft",
                              "data.train", 20)
    with pytest.raises(UserError, match="x 2 processes"):  # the processes share the epoch: 3 micro-batches each
        check_batch_fits_data({"gradient_accumulation_steps": 4, "per_device_train_batch_size": 4}, "sft",
                              "data.train", 20, num_processes=2)
    # RL: each prompt yields num_generations completions
    check_batch_fits_data({"gradient_accumulation_steps": 4, "per_device_train_batch_size": 4,
                           "num_generations": 2}, "rl", "data.train", 8)


# ----------------------------------------------------------------------------------------------------------------
# a short run: readable log lines, --resume keeps the before accuracy and says "already finished" once


def test_resume_keeps_accuracy_before_and_prints_each_line_once(tmp_path, capsys):
    recipe = {**SFT, "data": {**SFT["data"], "test": {"source": "builtin:arithmetic-rl", "split": "test",
                                                      "max_samples": 8}},
              "training": {**SFT["training"], "save_strategy": "steps", "save_steps": 1}, "output_dir": str(tmp_path / "out")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    first = capsys.readouterr()
    assert first.out.count("test accuracy before training") == 1 and first.err.count("test accuracy") == 0
    assert "step 1/2: loss " in first.out + first.err and "{'loss'" not in first.out + first.err
    out = tmp_path / "out"
    (out / "POSTTRAIN_COMPLETE").unlink()  # as if killed during the final save
    assert main(["train", str(path), "--resume"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    assert main(["train", str(path), "--resume"]) == 0
    again = capsys.readouterr()
    assert (again.out + again.err).count("already finished") == 1


# ----------------------------------------------------------------------------------------------------------------
# paths


def test_eval_of_a_missing_run_directory_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["eval", "runs/nope"]) == 2
    line = _error(capsys)
    assert "no directory 'runs/nope'" in line and "huggingface" not in line


def test_relative_data_paths_are_read_next_to_the_recipe_first(tmp_path, monkeypatch, caplog):
    from posttrain.recipe import load_recipe

    folder, elsewhere = tmp_path / "recipes", tmp_path / "work"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "rows.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**SFT, "data": {"train": "rows.jsonl"}, "output_dir": "out"}))
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(folder / "recipe.yaml")
    assert recipe.data.train.source == str(folder / "rows.jsonl")
    assert recipe._path_notes == [f"data.train.source: 'rows.jsonl' is the one next to the recipe: "
                                  f"{folder / 'rows.jsonl'}"]
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**SFT, "data": {"train": "missing.jsonl"}}))
    with pytest.raises(UserError, match=f"looked next to the recipe in {folder} and in the working directory "
                                        f"{elsewhere}"):
        load_recipe(folder / "recipe.yaml")
    from posttrain.train import preflight

    (folder / "recipe.yaml").write_text(yaml.safe_dump({**SFT, "output_dir": "."}))
    monkeypatch.chdir(folder)
    with pytest.raises(UserError, match="output_dir: '.*' is the recipe's own folder"):
        preflight(load_recipe(folder / "recipe.yaml"), load_data=False)


def test_column_renames_identity_swap_and_clashes(tmp_path):
    from posttrain.data.sources import load_rows
    from posttrain.recipe import DataSource

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": "1", "b": "2", "c": "3"}\n')
    assert load_rows(DataSource(source=str(rows), columns={"a": "a"}), "data.train")[0] == {"a": "1", "b": "2",
                                                                                            "c": "3"}
    assert load_rows(DataSource(source=str(rows), columns={"a": "b", "b": "a"}), "data.train")[0] == {
        "b": "1", "a": "2", "c": "3"}
    assert load_rows(DataSource(source=str(rows), columns={"a": "c"}), "data.train")[0] == {"b": "2", "c": "1"}
    with pytest.raises(ValueError, match="'a' and 'b' are both renamed to 'x'"):
        DataSource(source=str(rows), columns={"a": "x", "b": "x"})


def test_write_failures_reported_by_other_libraries_are_machine_errors():
    from posttrain.cli import expected_failure

    assert "file too large" in expected_failure(
        Exception("Error while serializing: I/O error: File too large (os error 27)"))
    assert "no space left on device" in expected_failure(RuntimeError("I/O error: (os error 28)"))
    try:  # torch's zip writer: the failing write is the context of what is raised last
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5000256 vs 5000148")
    except RuntimeError as exc:
        assert "a file write failed" in expected_failure(exc)
    assert expected_failure(RuntimeError("index out of range in self")) is None  # a bug keeps its traceback
