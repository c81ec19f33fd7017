"""What a hostile but realistic user does (issue 11): every case is one `error:` line naming the key or file, exit
code 2, no traceback, and (where the model is not needed to tell) before any model is loaded; plus the output-folder,
non-finite, data and security rules."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

SFT = {
    "model": "builtin:tiny-qwen2",
    "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 16}}},
    "method": {"name": "sft"},
    "training": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no", "logging_steps": 1,
                 "disable_tqdm": True},
}


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model (or tokenizer) fails the test: the error must come first."""
    import posttrain.models

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(posttrain.models, "load_model", boom)
    monkeypatch.setattr(posttrain.models, "load_tokenizer", boom)


def _train(tmp_path, capsys, recipe, *sets, extra=()):
    path = tmp_path / "recipe.yaml"
    recipe = {**recipe, "output_dir": recipe.get("output_dir", str(tmp_path / "out"))}
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    code = main(["train", str(path), *[a for s in sets for a in ("--set", s)], *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def _one_error(code, err, *needles, exit_code=2):
    assert code == exit_code, err
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    assert not any("Traceback" in line for line in err), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _shipped(name):
    return yaml.safe_load((ROOT / "recipes" / name).read_text())


# (recipe, --set overrides, text the error line must contain); every case from the issue's list
CASES = [
    ("sft", ["seed=-1"], "seed"),
    ("sft", ["seed=4294967296"], "seed"),
    ("sft", ["training.learning_rate=.nan"], "training.learning_rate"),
    ("sft", ["training.learning_rate=-1e-4"], "training.learning_rate"),
    ("sft", ["training.learning_rate=true"], "training.learning_rate"),
    ("sft", ["training.per_device_train_batch_size=0"], "training.per_device_train_batch_size"),
    ("sft", ["training.gradient_accumulation_steps=0"], "training.gradient_accumulation_steps"),
    ("sft", ["training.logging_steps=.inf"], "training.logging_steps"),
    ("sft", ["training.logging_steps=-.inf"], "training.logging_steps"),
    ("sft", ["output_dir=''"], "output_dir"),
    ("sft", ["peft={r: 1000000000}"], "peft.r"),
    ("sft", ["peft={r: 1e9}"], "peft.r"),
    ("sft", ["peft={r: 8, lora_alpha: .inf}"], "peft.lora_alpha"),
    ("sft", ["peft={r: 8, use_rslora: 'yes'}"], "peft.use_rslora"),
    ("sft", ["data.train.options.max_operand=2147483648"], "data.train"),
    ("sft", ["training.eval_strategy=steps"], "training.eval_strategy"),
    ("sft", ["training.max_steps=-5"], "training.max_steps"),
    ("sft", ["training.max_steps=0"], "training.max_steps"),
    ("sft", ["training.max_steps=.nan"], "training.max_steps"),
    ("sft", ["training.weight_decay=-.inf"], "training.weight_decay"),
    ("sft", ["training.fp16=true"], "training.fp16"),
    ("sft", ["data.forget=builtin:facts"], "data.forget"),
    ("grpo.yaml", ["training.num_generations=0"], "training.num_generations"),
    ("grpo.yaml", ["training.max_completion_length=-1"], "training.max_completion_length"),
    ("grpo.yaml", ["method.rewards=[{name: exact_match, weight: .nan}]"], "method.rewards"),
    ("grpo.yaml", ["method.entropy_coef=.nan"], "method.entropy_coef"),
    ("grpo.yaml", ["method.beta=.inf"], "method.beta"),
    ("grpo.yaml", ["training.use_bias_correction_kl=true"], "method.use_bias_correction_kl"),
    ("poft.yaml", ["method.poft_gamma=.nan"], "method.poft_gamma"),
    ("unlearn_simnpo.yaml", ["method.delta=.inf"], "method.delta"),
    ("dpo.yaml", ["method.beta=.inf"], "method.beta"),
    ("sft_goat.yaml", ["peft.goat.init_cof=.nan"], "peft.goat.init_cof"),
    ("sft_goat.yaml", ["peft.goat.rho=.inf"], "peft.goat.rho"),
    ("sft_ggpo.yaml", ["peft.ggpo.beta=.inf"], "peft.ggpo.beta"),
]


@pytest.mark.parametrize("recipe,sets,needle", CASES, ids=[f"{r}:{s[0]}" for r, s, _ in CASES])
def test_issue_cases_are_one_error_line_before_any_model_loads(recipe, sets, needle, tmp_path, capsys, no_model_load):
    base = SFT if recipe == "sft" else _shipped(recipe)
    code, err = _train(tmp_path, capsys, base, *sets, "data.test=null")
    _one_error(code, err, needle)


def test_non_utf8_recipe_and_data_and_deep_yaml(tmp_path, capsys, no_model_load):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(yaml.safe_dump(SFT).encode() + b"# caf\xe9\n")
    code = main(["train", str(recipe)])
    _one_error(code, capsys.readouterr().err.splitlines(), "latin1.yaml:", "not UTF-8")

    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "caf\xe9", "completion": "3"}\n')
    code, err = _train(tmp_path, capsys, {**SFT, "data": {"train": str(data)}})
    _one_error(code, err, "rows.jsonl:2", "not UTF-8")

    deep = tmp_path / "deep.yaml"
    deep.write_text("model: builtin:tiny-qwen2\nx: " + "[" * 600 + "]" * 600 + "\n")
    code = main(["train", str(deep)])
    _one_error(code, capsys.readouterr().err.splitlines(), "deep.yaml", "nested")
    nested = {**SFT, "training": {**SFT["training"], "gradient_checkpointing_kwargs": json.loads(
        "{\"a\": " * 40 + "1" + "}" * 40)}}
    code, err = _train(tmp_path, capsys, nested)
    _one_error(code, err, "training.gradient_checkpointing_kwargs", "nested")


def test_data_rows_name_file_and_row_and_bom_is_accepted(tmp_path, capsys, no_model_load):
    from posttrain.data.sources import load_source
    from posttrain.recipe import DataSource

    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "1+1=", "completion": "2"}\n\n{"prompt": "2+2=", "completion": 4}\n')
    code, err = _train(tmp_path, capsys, {**SFT, "data": {"train": str(wrong)}})
    _one_error(code, err, "wrong.jsonl:3", "completion")
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps([{"prompt": "1+1=", "completion": "2"}, {"prompt": "a", "completion": ["x", "y"]}]))
    code, err = _train(tmp_path, capsys, {**SFT, "data": {"train": str(listed)}})
    _one_error(code, err, "listed.json:row 1", "column 'completion' must be text")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "1+1=", "completion": "2"}\n')
    ds = load_source(DataSource(source=str(bom)), "data.train", "sft")
    assert ds[0] == {"prompt": "1+1=", "completion": "2"}
    # conversational rows (TRL's format) are text too
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1="}],
                                "completion": [{"role": "assistant", "content": "2"}]}) + "\n")
    assert len(load_source(DataSource(source=str(chat)), "data.train", "sft")) == 1


def test_modules_to_save_and_rank_checked_against_the_model(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, {**SFT, "peft": {"r": 8, "modules_to_save": ["nonexistent"]}})
    _one_error(code, err, "peft.modules_to_save", "'nonexistent'")
    code, err = _train(tmp_path, capsys, {**SFT, "peft": {"r": 4096}})
    _one_error(code, err, "peft.r", "hidden size")


# ----------------------------------------------------------------------------------------------------------------
# expected failures of the environment, and programming errors


def test_top_level_handler_turns_expected_failures_into_error_lines(monkeypatch, capsys):
    import errno

    import posttrain.cli as cli

    def failing(exc):
        def fn(args):
            raise exc
        return fn

    cases = [
        (OSError(errno.ENOSPC, "No space left on device", "/data/run/model.safetensors"), "No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/run"), "/data/run: Permission denied"),
        (UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"), "not UTF-8"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 GiB"), "out of memory"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"), "out of memory"),
        (MemoryError(), "out of memory"),
    ]
    for exc, needle in cases:
        monkeypatch.setattr(cli, "_cmd_tasks", failing(exc))
        assert cli.main(["tasks"]) == 1
        _one_error(1, capsys.readouterr().err.splitlines(), needle, exit_code=1)
    # a programming error keeps its traceback
    monkeypatch.setattr(cli, "_cmd_tasks", failing(RuntimeError("index out of range in self")))
    with pytest.raises(RuntimeError):
        cli.main(["tasks"])
    monkeypatch.setattr(cli, "_cmd_tasks", failing(KeyError("x")))
    with pytest.raises(KeyError):
        cli.main(["tasks"])


# ----------------------------------------------------------------------------------------------------------------
# output folders


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_overwrite_refusal_and_output_dir_errors(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _train(tmp_path, capsys, {**SFT, "output_dir": str(out)})
    assert code == 0, err
    before = _weights(out)
    # a second recipe into the same folder is refused, and the first run is untouched
    other = {**SFT, "output_dir": str(out), "method": {"name": "dft"}}
    code, err = _train(tmp_path, capsys, other)
    _one_error(code, err, "output_dir", "holds another run's outputs", "--overwrite")
    after = _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # --overwrite replaces it, leaving files it did not write alone
    (out / "notes.txt").write_text("mine")
    code, err = _train(tmp_path, capsys, other, extra=["--overwrite"])
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["method"]["name"] == "dft"
    # not a writable directory
    (tmp_path / "afile").write_text("x")
    for bad, needle in ((tmp_path / "afile", "not a directory"), (tmp_path / "afile" / "sub", "not a writable"),
                        (Path("/proc/posttrain-test"), "not a writable")):
        code, err = _train(tmp_path, capsys, {**SFT, "output_dir": str(bad)})
        _one_error(code, err, "output_dir", needle)


def test_tilde_output_dir_is_expanded(tmp_path, monkeypatch):
    from posttrain.recipe import parse_recipe

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = parse_recipe({**SFT, "output_dir": "~/runs/x"})
    assert recipe.output_dir == str(tmp_path / "runs" / "x")


def test_resume_finished_run_and_kill_during_final_save(tmp_path, capsys, monkeypatch):
    """A kill during the final save resumes to the same weights without training; `--resume` of a finished run says
    so and exits 0 without training; checkpoint folders posttrain did not write are never deleted."""
    from posttrain.families.sft.trainer import PosttrainSFTTrainer

    recipe = {**SFT, "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 64}}},
              "training": {**SFT["training"], "max_steps": 2, "save_strategy": "steps", "save_steps": 2,
                           "learning_rate": 1e-3}}
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _train(tmp_path, capsys, {**recipe, "output_dir": str(full)})[0] == 0
    reference = _weights(full)

    original = PosttrainSFTTrainer.save_model

    def dies_in_final_save(self, output_dir=None, _internal_call=False):
        if not _internal_call:  # the final save (checkpoints pass _internal_call=True)
            Path(output_dir, "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt
        return original(self, output_dir, _internal_call)

    monkeypatch.setattr(PosttrainSFTTrainer, "save_model", dies_in_final_save)
    code, err = _train(tmp_path, capsys, {**recipe, "output_dir": str(killed)})
    assert code == 130 and not (killed / "POSTTRAIN_COMPLETE").exists()
    monkeypatch.setattr(PosttrainSFTTrainer, "save_model", original)
    (killed / "checkpoint-7").mkdir()
    (killed / "checkpoint-7" / "user-notes.txt").write_text("not posttrain's")
    steps = []
    monkeypatch.setattr(PosttrainSFTTrainer, "training_step",
                        lambda self, *a, **k: steps.append(1) or pytest.fail("trained after the final checkpoint"))
    code, err = _train(tmp_path, capsys, {**recipe, "output_dir": str(killed)}, extra=["--resume"])
    assert code == 0, err
    assert not steps and (killed / "POSTTRAIN_COMPLETE").exists()
    resumed = _weights(killed)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert (killed / "checkpoint-7" / "user-notes.txt").exists()  # not ours: left alone
    mtime = (killed / "model.safetensors").stat().st_mtime
    code = main(["train", str(tmp_path / "recipe.yaml"), "--resume"])
    captured = capsys.readouterr()
    assert code == 0 and "already finished" in captured.out, captured
    assert (killed / "model.safetensors").stat().st_mtime == mtime


def test_killed_mid_save_checkpoint_is_removed_only_when_posttrain_wrote_it(tmp_path):
    from posttrain.trainers.common import SAVING_MARKER, latest_complete_checkpoint

    for name, files in (("checkpoint-2", ["POSTTRAIN_COMPLETE"]), ("checkpoint-4", [SAVING_MARKER, "model.bin"]),
                        ("checkpoint-6", []), ("checkpoint-8", ["user.txt"])):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("x")
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-8"]


# ----------------------------------------------------------------------------------------------------------------
# non-finite guard


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("what", ["loss", "grad_norm"])
def test_nan_guard_stops_the_run_naming_the_step(what, tmp_path, capsys, monkeypatch):
    """A NaN loss (or an infinite gradient with a finite loss) at step 3 stops the run with one error line naming step
    3; checkpoints 1-2 are complete, none after, and the run is not marked finished."""
    from posttrain.families.sft.trainer import PosttrainSFTTrainer

    original = PosttrainSFTTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 2:  # the third optimizer step
            if what == "loss":
                return loss * float("nan")
            return loss + _InfGrad.apply(next(model.parameters()).sum())
        return loss

    monkeypatch.setattr(PosttrainSFTTrainer, "compute_loss", compute_loss)
    recipe = {**SFT, "training": {**SFT["training"], "max_steps": 4, "save_strategy": "steps", "save_steps": 1}}
    code, err = _train(tmp_path, capsys, recipe)
    needle = "the loss is nan at step 3" if what == "loss" else "the gradient norm is inf at step 3"
    _one_error(code, err, "training:", needle, "diverged")
    out = tmp_path / "out"
    assert not (out / "POSTTRAIN_COMPLETE").exists()
    complete = sorted(p.name for p in out.glob("checkpoint-*") if (p / "POSTTRAIN_COMPLETE").exists())
    assert complete == ["checkpoint-1", "checkpoint-2"]


def test_grad_norm_guard_spares_fp16_overflow_steps():
    """With fp16 loss scaling an overflowing step has an inf gradient norm and is skipped by the scaler: not an
    error. The same norm on a step that was applied is."""
    from types import SimpleNamespace

    from posttrain.trainers.common import AtomicCheckpointMixin, TrainingDiverged

    class Base:
        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
            return "logged"

    class Trainer(AtomicCheckpointMixin, Base):
        def __init__(self, skipped):
            self.accelerator = SimpleNamespace(optimizer_step_was_skipped=skipped)
            self.state = SimpleNamespace(global_step=5)

    inf = torch.tensor(float("inf"))
    assert Trainer(skipped=True)._maybe_log_save_evaluate(torch.tensor(1.0), inf, None) == "logged"
    assert Trainer(skipped=False)._maybe_log_save_evaluate(torch.tensor(1.0), 0.5, None) == "logged"
    with pytest.raises(TrainingDiverged, match="the gradient norm is inf at step 5"):
        Trainer(skipped=False)._maybe_log_save_evaluate(torch.tensor(1.0), inf, None)


def test_checkpoint_with_non_finite_weights_is_never_marked_complete(tmp_path):
    from posttrain.trainers.common import TrainingDiverged

    from posttrain.recipe import parse_recipe
    from posttrain.train import run
    from transformers import TrainerCallback

    class Poison(TrainerCallback):  # the weights become NaN after step 2 without a NaN loss or gradient
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    recipe = parse_recipe({**SFT, "output_dir": str(tmp_path / "out"),
                           "training": {**SFT["training"], "max_steps": 4, "save_strategy": "steps", "save_steps": 1}})
    with pytest.raises(TrainingDiverged, match="at step 2"):
        run(recipe, callbacks=[Poison()], quiet=True)
    assert (tmp_path / "out" / "checkpoint-1" / "POSTTRAIN_COMPLETE").exists()
    assert not (tmp_path / "out" / "checkpoint-2" / "POSTTRAIN_COMPLETE").exists()


# ----------------------------------------------------------------------------------------------------------------
# data: dropped and truncated rows are counted; infinite rewards


def test_truncated_and_dropped_rows_are_counted(tmp_path, capsys):
    long_prompt = "1+" * 40 + "1="
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(6)]
    rows += [{"prompt": long_prompt, "completion": "41"}, {"prompt": "2+2=", "completion": "4" * 40}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _train(tmp_path, capsys, {**SFT, "data": {"train": str(data)}}, "training.max_length=20")
    assert code == 0, err
    text = "\n".join(err)
    assert "data.train: 1 of 8 rows are longer than training.max_length=20 tokens and are truncated" in text, text
    assert "data.train: dropped 1 of 8 rows: no completion token is left after truncation" in text, text

    pref = tmp_path / "pref.jsonl"
    pref.write_text("".join(json.dumps({"prompt": p, "chosen": "2", "rejected": "3"}) + "\n"
                            for p in ["1+1="] * 6 + [long_prompt]))
    recipe = {**SFT, "data": {"train": str(pref)}, "method": {"name": "asft_aligned"}}
    code, err = _train(tmp_path, capsys, {**recipe, "output_dir": str(tmp_path / "pref")}, "training.max_length=20")
    assert code == 0, err
    assert "data.train: dropped 1 of 7 rows: the prompt alone fills max_length" in "\n".join(err)


def test_unlearning_rows_truncated_away_are_dropped_and_counted(caplog):
    from transformers import AutoTokenizer

    from posttrain.models import builtin_model_dir
    from posttrain.families.unlearning.trainer import tokenize_rows

    tok = AutoTokenizer.from_pretrained(builtin_model_dir("tiny-qwen2"))
    rows = {"prompt": ["1+1=", "1+" * 30 + "1=", "2+2="], "completion": ["2", "31", "4" * 30]}
    with caplog.at_level("WARNING", logger="posttrain"):
        out = tokenize_rows(rows, tok, 16, "data.forget")
    assert len(out) == 2 and all(any(label != -100 for label in labels) for _, labels in out)
    assert "data.forget: truncated 1 of 3 rows" in caplog.text
    assert "data.forget: dropped 1 of 3 rows whose answer is truncated away entirely" in caplog.text
    with pytest.raises(UserError, match="data.forget: no rows left"):
        tokenize_rows({"prompt": ["1+" * 30], "completion": ["2"]}, tok, 8, "data.forget")


def test_infinite_rewards_are_an_error():
    from posttrain.rl.rewards import CheckedReward

    with pytest.raises(UserError, match=r"method.rewards\[0\] \(big\): value 1 is inf; rewards must be finite"):
        CheckedReward(lambda **kw: [1.0, math.inf], "big", "method.rewards[0]")(["a", "b"], ["c", "d"])


# ----------------------------------------------------------------------------------------------------------------
# security


def test_merge_needs_the_flag_to_trust_remote_code(tmp_path, capsys, monkeypatch):
    import posttrain.models

    class Loaded(Exception):
        pass

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"path": "some/model", "trust_remote_code": True},
                                                     "peft": {"type": "lora"}}))
    loaded = []

    def load_model(*args, **kwargs):
        loaded.append(kwargs)
        raise Loaded

    monkeypatch.setattr(posttrain.models, "load_model", load_model)
    code = main(["merge", str(run), str(tmp_path / "merged")])
    _one_error(code, capsys.readouterr().err.splitlines(), "trust_remote_code is true", "--trust-remote-code")
    assert not loaded
    with pytest.raises(Loaded):
        main(["merge", str(run), str(tmp_path / "merged"), "--trust-remote-code"])
    assert loaded == [{"dtype": "auto", "trust_remote_code": True, "revision": None}]
