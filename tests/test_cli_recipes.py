"""End to end: every recipe runs from the CLI with a few steps and leaves the promised outputs; --resume is exact."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_passes_preflight(name, tmp_path):
    """Every shipped recipe (each stage of a multi-stage one) parses, and its data, method keys and TRL config pass
    every check that needs no model (what ``posttrain train`` runs before loading anything)."""
    from posttrain.recipe import load_recipe
    from posttrain.stages import load_stages
    from posttrain.train import preflight

    raw = yaml.safe_load((ROOT / "recipes" / name).read_text())
    sets = [s for s in _short_run_overrides(raw, tmp_path / "run") if s != "--set"]
    stages = load_stages(ROOT / "recipes" / name, sets) or [(name, load_recipe(ROOT / "recipes" / name, sets))]
    for _, recipe in stages:
        info, config, datasets = preflight(recipe)
        assert config.max_steps == 2 and datasets


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, cwd=cwd)


def _short_run_overrides(recipe: dict, out: Path) -> list[str]:
    sets = [f"output_dir={out}", "training.max_steps=2", "training.logging_steps=1", "training.save_steps=2"]
    if str(recipe.get("model", "")).startswith("runs/"):  # a second stage (grpo_tools after sft_tools): the start model
        sets.append("model=builtin:tiny-qwen2-arith")
    for key in ("train", "eval", "test", "forget", "retain"):
        if recipe.get("data", {}).get(key) is not None:
            sets.append(f"data.{key}.max_samples=16")
    return [x for s in sets for x in ("--set", s)]


# Through the CLI in a subprocess, the default suite runs an SFT-family recipe and a multi-stage preference recipe
# end to end; every other recipe runs in `pytest -m slow` (about 15 s each on 2 cores), and all of them pass preflight
# below in seconds. The other families train end to end in-process in the default suite: GRPO in
# tests/families/rl/test_rl_trainer.py, unlearning (npo_rt) in tests/families/unlearning/test_unlearning_trainer.py,
# GOAT in tests/adapters/test_adapter_recipes.py, DPO in both stages of pre_dpo.yaml and tests/families/preference/.
DEFAULT_SUITE_RECIPES = {"dft.yaml", "pre_dpo.yaml"}


@pytest.mark.parametrize("name", [n if n in DEFAULT_SUITE_RECIPES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in RECIPES])
def test_recipe_runs_end_to_end(name, tmp_path, arith_model_dir):
    recipe = yaml.safe_load((ROOT / "recipes" / name).read_text())
    out = tmp_path / "run"
    proc = _cli("train", f"recipes/{name}", *_short_run_overrides(recipe, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if recipe.get("stages"):  # a multi-stage recipe (posttrain.stages): every stage has its folder; check the last
        assert all((out / stage["name"] / "POSTTRAIN_COMPLETE").is_file() for stage in recipe["stages"])
        out = out / recipe["stages"][-1]["name"]
    if recipe.get("data", {}).get("test") is not None:  # the task accuracy before and after training
        assert re.search(r"test accuracy before training: +\d+\.\d%", proc.stdout), proc.stdout[-2000:]
        assert re.search(r"test accuracy after training: +\d+\.\d%", proc.stdout), proc.stdout[-2000:]
    if not recipe.get("training", {}).get("disable_tqdm"):
        assert "2/2 [" in proc.stderr  # a progress bar
    # resolved recipe with defaults filled in and overrides applied
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["training"]["max_steps"] == 2
    assert resolved["method"]["name"] == recipe["method"]["name"]
    assert set(resolved) == {"model", "ref_model", "data", "method", "peft", "training", "eval", "report", "output_dir",
                             "seed"}
    # metrics.jsonl: one object per logging event with step and loss
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert (out / "checkpoint-2").is_dir()
    # the final model loads with from_pretrained
    if (recipe.get("peft") or {}).get("type", "lora") in ("plora", "goat"):
        from posttrain.adapters import load_adapter_run

        model = load_adapter_run(out)  # PLoRA: its merged full model; GOAT: its adapter via the GOAT loader
    elif recipe.get("peft"):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("1+2=", return_tensors="pt")
    assert torch.isfinite(model(**ids).logits).all()


def test_methods_command_lists_every_method_with_paper_and_recipe():
    from posttrain.methods import METHODS

    proc = _cli("methods", "--json")
    assert proc.returncode == 0
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == set(METHODS)
    for row in rows.values():
        assert row["paper"] and row["summary"]
        assert (ROOT / row["recipe"]).is_file(), row


def test_every_command_has_useful_help():
    for cmd in ([], ["train"], ["methods"], ["init-model"], ["tasks"], ["eval"], ["merge"], ["poft-score"]):
        proc = _cli(*cmd, "--help")
        assert proc.returncode == 0 and "usage: posttrain" in proc.stdout and len(proc.stdout) > 150, cmd


def test_init_model_writes_a_loadable_model(tmp_path):
    proc = _cli("init-model", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "qwen2" and len(tok) == model.config.vocab_size
    # digits are single tokens, so arithmetic is learnable
    assert tok.tokenize("123+45=168") == ["1", "2", "3", "+", "4", "5", "=", "1", "6", "8"]


def test_resume_equals_uninterrupted_run(tmp_path):
    """Kill a run after its step-3 checkpoint, resume it: final weights equal an uninterrupted run's, bit for bit."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from posttrain.recipe import parse_recipe
    from posttrain.train import run

    def recipe(out):
        return parse_recipe({
            "model": "builtin:tiny-qwen2",
            "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 64}}},
            "method": {"name": "dft"},
            "training": {"max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                         "save_steps": 3, "logging_steps": 1, "disable_tqdm": True},
            "output_dir": str(out),
            "seed": 3,
        })

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise RuntimeError("simulated kill")

    run(recipe(tmp_path / "full"), quiet=True)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(recipe(tmp_path / "killed"), callbacks=[Kill()], quiet=True)
    assert (tmp_path / "killed" / "checkpoint-3").is_dir() and not (tmp_path / "killed" / "checkpoint-6").exists()
    # a checkpoint interrupted mid-save (no completion marker) is ignored and removed
    (tmp_path / "killed" / "checkpoint-5").mkdir()
    run(recipe(tmp_path / "killed"), resume=True, quiet=True)
    assert not (tmp_path / "killed" / "checkpoint-5").exists()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "killed").state_dict()
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, different
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s <= 6] == sorted(steps[:-1]) + steps[-1:]  # no duplicated steps after resume


# slow: the default suite's 2-process launches are in tests/test_distributed.py (DDP failure propagation, and the
# ZeRO-3 equality check where deepspeed is installed), which CI runs without the deepspeed extra too.
@pytest.mark.slow
def test_two_process_run_with_accelerate(tmp_path):
    """A real 2-process (gloo, CPU) data-parallel run through accelerate."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate_cpu_2proc.yaml"), "-m", "posttrain.cli", "train", "recipes/dft.yaml",
           "--set", "model=builtin:tiny-qwen2", "--set", "training.max_steps=3", "--set", "training.logging_steps=1",
           "--set", "data.test.max_samples=4", "--set", f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # written once (main process), not per rank
    # two processes: each step consumes 2 x 64 of the 4000 rows, an epoch is ceil(2000 / 64) = 32 steps (63 with one)
    assert [r["epoch"] for r in rows if "loss" in r][-1] == pytest.approx(3 / 32, abs=1e-3)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_two_process_deepspeed_zero2_run(tmp_path):
    """DeepSpeed ZeRO-2 through accelerate, 2 CPU processes (needs the `deepspeed` extra; compiles a comm op once)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "deepspeed_zero2.yaml"), "-m", "posttrain.cli", "train", "recipes/dft.yaml",
           "--set", "model=builtin:tiny-qwen2", "--set", "training.max_steps=3", "--set", "training.logging_steps=1",
           "--set", "data.test.max_samples=4", "--set", f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["epoch"] for r in rows if "loss" in r][-1] == pytest.approx(3 / 32, abs=1e-3)  # two processes (63 steps with one)
    nll = [r["nll"] for r in rows if "nll" in r]
    assert nll[-1] < nll[0]  # the sharded optimizer really stepped
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert (out / "checkpoint-3").is_dir()


_RECORDING_REWARD = '''
import json, os

def reward(prompts, completions, completion_ids, trainer_state, **kwargs):
    """Varied rewards (exact match + a little per character); records what this process scored."""
    from posttrain.rl.rewards import answers_match

    values = [float(answers_match(c, a)) + 0.05 * len(c) for c, a in zip(completions, kwargs["answer"])]
    with open(os.environ["RL_RECORD"] + "." + os.environ.get("RANK", "0"), "a") as fh:
        fh.write(json.dumps({"step": trainer_state.global_step, "completions": completions, "rewards": values,
                             "lengths": [len(ids) for ids in completion_ids]}) + "\\n")
    return values
'''


# Two-process GRPO runs are `slow` (about a minute each); tests/test_distributed.py keeps one 2-process run by default.
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["grpo_stratified", "grpo_reinforce_pp"])
def test_two_process_grpo_run_with_accelerate(tmp_path, recipe):
    """GRPO with stratified advantages (and, slow, REINFORCE++, whose whitening spans every completion token of the
    batch) in a real 2-process (gloo, CPU) run started with ``--num-processes 2``: each process scores its own 6
    rollouts, a group of 4 straddles the processes, and the logged advantages and policy loss are those of the
    advantages recomputed over the gathered batch, each process taking its own rows (checked from what each process
    scored)."""
    from posttrain.families.rl.common import Groups, stratum_ids
    from posttrain.families.rl.parts import ADVANTAGES
    from posttrain.methods import GRPOParams
    from posttrain.rl.strata import completion_length

    (tmp_path / "rl2p_reward.py").write_text(_RECORDING_REWARD)
    out, record = tmp_path / "ddp", tmp_path / "record"
    stratified = recipe == "grpo_stratified"
    # several strata per group
    keys_set = ["--set", "method.stratum_key=posttrain.rl.strata:completion_length"] if stratified else []
    # started by posttrain itself (--num-processes: it runs accelerate launch; the dft test above uses accelerate's)
    cmd = [sys.executable, "-m", "posttrain.cli", "train", "--num-processes", "2",
           f"recipes/{recipe}.yaml", "--set", "method.rewards=[{function: 'rl2p_reward:reward'}]", *keys_set,
           "--set", "training.max_steps=2", "--set", "training.logging_steps=1", "--set", "training.save_strategy=no",
           "--set", "training.per_device_train_batch_size=6", "--set", "training.num_generations=4",
           "--set", "training.temperature=1.5", "--set", "data.train.max_samples=12", "--set", "data.test=null",
           "--set", f"output_dir={out}"]
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "RL_RECORD": str(record), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "policy_loss" in r]
    assert [r["step"] for r in logged] == [1, 2]  # written once (main process), not per rank
    per_rank = [[json.loads(line) for line in (tmp_path / f"record.{rank}").read_text().splitlines()]
                for rank in (0, 1)]
    assert [len(r) for r in per_rank] == [2, 2]
    for step, row in enumerate(logged):
        parts = [ranks[step] for ranks in per_rank]
        assert [len(p["rewards"]) for p in parts] == [6, 6] and all(p["step"] == step for p in parts)
        rewards = torch.tensor(parts[0]["rewards"] + parts[1]["rewards"])  # gather order: rank 0, then rank 1
        lengths = torch.tensor(parts[0]["lengths"] + parts[1]["lengths"], dtype=torch.float32)
        if stratified:
            keys = [completion_length(completion=c) for c in parts[0]["completions"] + parts[1]["completions"]]
            adv = ADVANTAGES["stratified"].fn(rewards, Groups(4, strata=stratum_ids(keys)),
                                              GRPOParams(advantage="stratified")).advantages  # alpha 0.8, per group
        else:  # whitened with the token counts of both processes' rows
            adv = ADVANTAGES["reinforce_pp"].fn(rewards, Groups(4, lengths=lengths),
                                                GRPOParams(advantage="reinforce_pp")).advantages  # with the baseline
        assert row["reward"] == pytest.approx(rewards.mean().item(), abs=1e-5)
        for stat in ("mean", "std", "min", "max"):
            assert row[f"advantages/{stat}"] == pytest.approx(getattr(adv, stat)().item(), abs=1e-5), stat
        # ratio 1 on the first iteration: the DAPO loss is -sum(A * L) / sum(L) over the global batch, which is the
        # mean over the 2 processes only if each one took its own rows
        assert row["policy_loss"] == pytest.approx(-(adv * lengths).sum().item() / lengths.sum().item(), abs=1e-5)
    assert adv.abs().sum() > 0  # the check is not vacuous


def test_quiet_run_prints_no_log_dicts(tmp_path, capfd):
    """``run(quiet=True)`` with ``disable_tqdm``: HF's PrinterCallback would print every log dict to stdout."""
    from posttrain.recipe import load_recipe
    from posttrain.train import run

    recipe = load_recipe(ROOT / "recipes" / "dft.yaml", [
        f"output_dir={tmp_path}", "training.max_steps=2", "training.logging_steps=1", "training.disable_tqdm=true",
        "training.save_strategy='no'", "data.test=null", "data.eval=null", "report=false",
    ])
    run(recipe, quiet=True)
    out = capfd.readouterr().out
    assert "'loss'" not in out and "'train_runtime'" not in out, out[-500:]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 2  # the metrics still reach the file


def test_num_processes_checks_the_recipe_before_launching(tmp_path, capsys):
    """``--num-processes`` checks the recipe in the calling process: one error line, exit 2, nothing started."""
    from posttrain.cli import main
    from posttrain.launch import launch_command, train_argv_without_launch_flags

    rc = main(["train", "recipes/dft.yaml", "--num-processes", "2", "--set", "training.max_stepz=3",
               "--set", f"output_dir={tmp_path / 'run'}"])
    assert rc == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith("error: training.max_stepz")
    assert not (tmp_path / "run").exists()
    argv = train_argv_without_launch_flags(["r.yaml", "--num-processes", "4", "--distributed=zero2", "--resume"])
    assert argv == ["r.yaml", "--resume"]
    cmd = launch_command(4, "ddp", argv, port=1234)
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4", "--num_machines",
                       "1", "--mixed_precision", "no", "--main_process_port", "1234", "-m", "posttrain.cli", "train",
                       "r.yaml", "--resume"]


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp2"])
def test_launch_flags_are_accelerate_arguments(backend):
    """Each ``--distributed`` backend's flags parse as ``accelerate launch`` arguments, and every shipped accelerate
    config in configs/ loads (GPU-only backends cannot run on the CPU CI; their flags and files are checked here)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    from posttrain.launch import BACKENDS

    cmd = [*BACKENDS[backend], "--num_processes", "2", "-m", "posttrain.cli", "train", "r.yaml"]
    args = launch_command_parser().parse_args(cmd)
    assert args.num_processes == 2 and args.training_script == "posttrain.cli" and args.module
    assert args.use_deepspeed == backend.startswith("zero") and args.use_fsdp == (backend == "fsdp2")
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        ClusterConfig.from_yaml_file(str(path))
