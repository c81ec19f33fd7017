"""The LoRA variants end to end: each trains from its recipe through ``posttrain.train.run``, saves, and reloads
(adapter, and merged via ``posttrain merge`` where the variant allows) with the trained model's outputs (to fp32
rounding: :func:`same_logits`)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.recipe import parse_recipe
from fp32 import assert_fp32_close

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["plora", "goat", "ggpo"]


def _recipe(name: str, out: Path, **training) -> dict:
    data = yaml.safe_load((ROOT / "recipes" / name).read_text())
    data["output_dir"] = str(out)
    data["data"] = {"train": {**data["data"]["train"], "max_samples": 64}}
    data["training"].update(max_steps=4, per_device_train_batch_size=8, logging_steps=1, save_steps=2,
                            disable_tqdm=True, **training)
    return data


class _KeepModel:
    """Captures the trained model at the end of training."""

    def __new__(cls, box: dict):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                box["model"] = model

        return _CB()


def same_logits(actual, expected, msg=""):
    """Equal up to fp32 rounding: a merged weight or a reloaded adapter computes the same function in another order.
    The tiny models' longest reduction is their MLP width (384); 8 ulp of the largest logit per sqrt(384)."""
    assert_fp32_close(actual, expected, reductions=384, ulps=8, msg=msg)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _train_data(data: dict):
    from posttrain.train import run

    box: dict = {}
    run(parse_recipe(data), callbacks=[_KeepModel(box)], quiet=True)
    return box["model"]


@pytest.fixture(scope="module")
def ids(arith_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    return tok(["12+7=19", "3+25=28"], return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_saves_reloads_and_merges(variant, tmp_path, ids, capsys):
    from transformers import AutoModelForCausalLM

    from posttrain.adapters import load_adapter_run

    out = tmp_path / "run"
    if variant == "plora":  # unload every 2 steps (the recipe's stage is longer than this short run)
        trained = _train_data({**_recipe("sft_plora.yaml", out)} | {"peft": {**yaml.safe_load(
            (ROOT / "recipes" / "sft_plora.yaml").read_text())["peft"], "plora": {"mode": "momentum", "stage_steps": 2}}})
    else:
        trained = _train_data(_recipe(f"sft_{variant}.yaml", out))
    ref = _logits(trained, ids)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    assert any(k.startswith(f"{variant}/") for k in logged), sorted(logged)  # the variant's metrics are logged
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]

    reloaded = load_adapter_run(out)
    same_logits(_logits(reloaded, ids), ref, "reloaded")

    capsys.readouterr()  # the training run's own lines (its short-run warning)
    code = main(["merge", str(out), str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip().splitlines()
    if variant == "goat":
        assert code == 2
        assert len(err) == 1 and err[0].startswith("error:") and "GOAT" in err[0] and "cannot be merged" in err[0]
        assert "load_adapter_run" in err[0]
        assert not (tmp_path / "merged").exists()
        # plain PEFT loading must not silently give an ordinary LoRA
        from peft import PeftModel

        from posttrain.models import load_model

        with pytest.raises(Exception, match="load with posttrain.adapters.load_goat"):
            PeftModel.from_pretrained(load_model("builtin:tiny-qwen2-arith"), str(out))
    else:
        assert code == 0, err
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert not any("lora" in n for n, _ in merged.named_parameters())
        same_logits(_logits(merged, ids), ref, "merged")


def test_plora_reset_stages_unload_and_rank_grows(tmp_path, ids):
    """reset mode through the recipe: B is zero right after the last unload, the backbone moved, the optimizer's
    LoRA state was dropped; the final export equals backbone + last adapter."""
    from transformers import AutoModelForCausalLM

    from posttrain.adapters.plora import iter_lora_layers
    from posttrain.models import load_model

    data = _recipe("sft_plora.yaml", tmp_path / "run")
    data["peft"]["plora"] = {"mode": "reset", "stage_steps": 2}
    data["training"]["max_steps"] = 4
    from posttrain.train import run

    box: dict = {}
    with pytest.warns(UserWarning, match="stage_steps=2 is small"):
        run(parse_recipe(data), callbacks=[_KeepModel(box)], quiet=True)
    model = box["model"]
    base = load_model("builtin:tiny-qwen2-arith")
    base_sd = base.state_dict()
    moved = 0
    for name, layer in iter_lora_layers(model):
        assert layer.lora_B["default"].weight.abs().max() == 0  # unloaded at step 4 (the last one)
        key = name.replace("base_model.model.", "") + ".weight"
        moved += int(not torch.equal(layer.get_base_layer().weight, base_sd[key]))
    assert moved > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("plora/stage", 0) for r in rows) == 2
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    same_logits(_logits(merged, ids), _logits(model, ids))


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_equals_uninterrupted_run(variant, tmp_path, ids):
    """Kill after the step-2 checkpoint and resume: PLoRA's backbone / GOAT's experts and router / GGPO's gradient
    norms come back, and the final model equals an uninterrupted run's bit for bit."""
    from transformers import TrainerCallback

    from posttrain.adapters import load_adapter_run
    from posttrain.train import run

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("simulated kill")

    extra = {"plora": {"plora": {"mode": "momentum", "momentum": 0.5, "stage_steps": 1}},
             "goat": {}, "ggpo": {"ggpo": {"sigma": 0.05, "beta": 1.0}}}[variant]

    def recipe(out):
        data = _recipe(f"sft_{variant}.yaml", out)
        data["peft"].update(extra)
        return parse_recipe(data)

    run(recipe(tmp_path / "full"), quiet=True)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(recipe(tmp_path / "killed"), callbacks=[Kill()], quiet=True)
    ckpt = tmp_path / "killed" / "checkpoint-2"
    extra_file = {"plora": "plora_backbone.safetensors", "goat": "goat_config.json", "ggpo": "ggpo_state.pt"}
    assert (ckpt / extra_file[variant]).is_file()
    run(recipe(tmp_path / "killed"), resume=True, quiet=True)
    a = _logits(load_adapter_run(tmp_path / "full"), ids)
    b = _logits(load_adapter_run(tmp_path / "killed"), ids)
    # bitwise: every RNG, optimizer and variant state is restored (GGPO removes its noise with restore: copy, the
    # default; with regenerate the frozen weights drift by a few ulp that no checkpoint holds, docs/lora_variants.md)
    assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("variant, extra", [("goat", {"goat": {"num_experts": 4}}), ("ggpo", {})])
def test_preference_recipe_with_variant(variant, extra, tmp_path, ids):
    """DPO (recipes/dpo.yaml) with a variant: GOAT keeps the adapter-disabled reference exact; GGPO needs the
    reference log-probs precomputed (refused otherwise). Saves and reloads with the same outputs."""
    data = yaml.safe_load((ROOT / "recipes" / "dpo.yaml").read_text())
    data["output_dir"] = str(tmp_path / "run")
    data["data"] = {"train": {**data["data"]["train"], "max_samples": 32}}
    data["training"].update(max_steps=3, per_device_train_batch_size=8, logging_steps=1, save_strategy="no",
                            disable_tqdm=True)
    data["peft"] = {"type": variant, "r": 8, **extra}
    if variant == "ggpo":
        with pytest.raises(UserError, match="peft.ggpo: .*reference"):
            _train_data(copy.deepcopy(data))
        data["method"]["precompute_ref_log_probs"] = True
    from posttrain.adapters import load_adapter_run

    trained = _train_data(data)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith(f"{variant}/") for r in rows for k in r)
    same_logits(_logits(load_adapter_run(tmp_path / "run"), ids), _logits(trained, ids))


@pytest.mark.parametrize("variant, beta", [("goat", 0.0), ("goat", 0.04), ("plora", 0.0), ("plora", 0.04)])
def test_grpo_recipe_with_variant(variant, beta, tmp_path, ids):
    """GRPO (recipes/grpo.yaml) with GOAT and PLoRA (momentum mode, an unload every step). With beta > 0, GOAT's
    reference is the adapter-disabled base, i.e. the base model (same KL as with ref_model: the base model; no "ref"
    adapter copy made or saved); PLoRA needs a ref_model (refused without it) and its KL is 0 at step 1 (LoRA starts
    at the base). Saves and reloads with the trained model's outputs."""
    data = yaml.safe_load((ROOT / "recipes" / "grpo.yaml").read_text())
    data["output_dir"] = str(tmp_path / "run")
    data["data"] = {"train": {**data["data"]["train"], "max_samples": 8}}
    data["method"]["beta"] = beta
    data["training"].update(max_steps=2, per_device_train_batch_size=8, num_generations=4, logging_steps=1,
                            save_strategy="no", disable_tqdm=True)
    extra = {"goat": {"goat": {"num_experts": 4}}, "plora": {"plora": {"mode": "momentum", "stage_steps": 1}}}
    data["peft"] = {"type": variant, "r": 8, "target_modules": "all-linear", **extra[variant]}
    if beta and variant == "plora":
        with pytest.raises(UserError, match=r"peft.plora: .*set ref_model"):
            _train_data(copy.deepcopy(data))
        data["ref_model"] = data["model"]  # a frozen copy of the initial model
    if beta and variant == "goat":
        folded = copy.deepcopy(data)
        folded["peft"]["goat"]["fold_residual"] = True
        with pytest.raises(UserError, match=r"peft.goat.fold_residual: .*set ref_model"):
            _train_data(folded)
    from posttrain.adapters import load_adapter_run

    trained = _train_data(data)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(any(k.startswith(f"{variant}/") for k in r) for r in steps)
    if beta and variant == "plora":
        assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7) and steps[1]["kl"] >= 0
    elif beta:  # GOAT's initial policy is the base only in expectation over the routing: KL > 0 from step 1
        with_ref = copy.deepcopy(data)
        with_ref.update(ref_model=data["model"], output_dir=str(tmp_path / "with_ref"))
        _train_data(with_ref)
        other = [json.loads(line) for line in (tmp_path / "with_ref" / "metrics.jsonl").read_text().splitlines()]
        kls = [r["kl"] for r in other if "policy_loss" in r]
        assert kls == pytest.approx([r["kl"] for r in steps], rel=1e-4, abs=1e-7) and kls[0] > 0
    else:
        assert all("kl" not in r for r in steps)
    assert not (tmp_path / "run" / "ref").exists()
    same_logits(_logits(load_adapter_run(tmp_path / "run"), ids), _logits(trained, ids))


def _unlearning_recipe(name: str, out: Path, peft: dict, max_steps: int = 2) -> dict:
    data = yaml.safe_load((ROOT / "recipes" / name).read_text())
    data["output_dir"] = str(out)
    if "retain" in data["data"]:
        data["data"]["retain"] = {**data["data"]["retain"], "max_samples": 16}
    data["training"].update(max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                            warmup_steps=0, disable_tqdm=True)
    data["peft"] = peft
    return data


@pytest.mark.parametrize("variant, extra", [("plora", {"plora": {"mode": "momentum", "stage_steps": 1}}),
                                            ("goat", {"goat": {"num_experts": 4}}), ("ggpo", {})])
def test_unlearning_recipe_with_variant(variant, extra, tmp_path, ids):
    """GradDiff (recipes/unlearn_grad_diff.yaml) with each variant: it has no reference model, so PLoRA (an unload
    every step) and GGPO are allowed. Every logged step carries the variant's metrics; the run saves and reloads with
    the trained model's outputs."""
    from posttrain.adapters import load_adapter_run
    from posttrain.models import load_model

    peft = {"type": variant, "r": 8, "target_modules": "all-linear", **extra}
    data = _unlearning_recipe("unlearn_grad_diff.yaml", tmp_path / "run", peft)
    trained = _train_data(copy.deepcopy(data))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(any(k.startswith(f"{variant}/") for k in r) for r in steps), [sorted(r) for r in steps]
    assert all("forget_loss" in r and "retain_loss" in r for r in steps)  # GradDiff's own metrics still logged
    if variant == "plora":
        assert [r["plora/stage"] for r in steps] == [1.0, 2.0]
    ref = _logits(trained, ids)
    assert (ref - _logits(load_model(data["model"]), ids)).abs().max() > 1e-3  # the saved run is not the base model
    same_logits(_logits(load_adapter_run(tmp_path / "run"), ids), ref)


@pytest.mark.parametrize("variant", ["plora", "ggpo"])
def test_unlearning_reference_method_with_variant_needs_ref_model(variant, tmp_path):
    """NPO's reference would be the adapter-disabled policy, which PLoRA's unloads move away from the initial model
    (and GGPO would perturb): refused with one line naming peft.<variant>. With ref_model (a frozen copy of the
    initial model) PLoRA trains, and at step 1 the policy equals that reference (LoRA starts at the base): NPO's
    log-ratio is 0."""
    extra = {"plora": {"plora": {"mode": "momentum", "stage_steps": 1}}, "ggpo": {}}[variant]
    peft = {"type": variant, "r": 8, "target_modules": "all-linear", **extra}
    data = _unlearning_recipe("unlearn_npo.yaml", tmp_path / "run", peft, max_steps=1)
    with pytest.raises(UserError, match=rf"^peft\.{variant}: .*adapter-disabled policy.*set ref_model") as exc:
        _train_data(copy.deepcopy(data))
    assert "\n" not in str(exc.value)
    if variant != "plora":
        return
    data["ref_model"] = data["model"]
    _train_data(data)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in rows if r["step"] == 1 and "loss" in r)
    assert step1["npo/log_ratio_mean"] == pytest.approx(0.0, abs=1e-5) and "plora/stage" in step1


# ------------------------------------------------------------------------------------------------------------------
# Recipe validation
# ------------------------------------------------------------------------------------------------------------------
BASE = {"model": "builtin:tiny-qwen2", "data": {"train": "builtin:arithmetic-sft"}, "method": {"name": "sft"}}


@pytest.mark.parametrize(
    "peft, needle",
    [
        ({"type": "lora", "goat": {"top_k": 1}}, "peft.goat: options for peft.type 'goat', but peft.type is 'lora'"),
        ({"type": "ggpo", "plora": {}}, "peft.plora:"),
        ({"type": "ggpo", "ggpo": {"sigmaa": 0.1}}, "peft.ggpo.sigmaa: unknown key (did you mean 'sigma'?)"),
        ({"type": "goat", "goat": {"num_experts": 4, "topk": 2}}, "peft.goat.topk: unknown key"),
        ({"type": "goat", "r": 6, "goat": {"num_experts": 4}}, "peft.r: GOAT needs a total rank divisible"),
        ({"type": "goat", "goat": {"num_experts": 2, "top_k": 3}}, "peft.goat.top_k"),
        ({"type": "goat", "use_rslora": True}, "peft.use_rslora"),
        ({"type": "plora", "plora": {"mode": "reset"}}, "peft.plora.stage_steps: required"),
        ({"type": "plora", "plora": {"mode": "reset", "stage_steps": 1}}, "peft.plora.stage_steps: must be >= 2"),
        ({"type": "plora", "plora": {"mode": "periodic"}}, "peft.plora.mode"),
        ({"type": "plora", "plora": {"momentum": 0}}, "peft.plora.momentum"),
        ({"type": "ggpo", "ggpo": {"sigma_schedule": "linear"}}, "peft.ggpo.sigma_schedule"),
        ({"type": "dora"}, "peft.type"),
    ],
)
def test_variant_options_are_validated(peft, needle):
    with pytest.raises(UserError) as exc:
        parse_recipe({**copy.deepcopy(BASE), "peft": peft})
    assert needle in str(exc.value), str(exc.value)


def test_variant_defaults_fill_in():
    r = parse_recipe({**BASE, "peft": {"type": "goat", "r": 8}})
    assert r.peft.goat.num_experts == 8 and r.peft.goat.top_k == 2 and r.peft.plora is None
    assert parse_recipe({**BASE, "peft": {"type": "plora"}}).peft.plora.mode == "momentum"
    assert parse_recipe({**BASE, "peft": {"type": "ggpo"}}).peft.ggpo.sigma == 0.05


@pytest.mark.parametrize("variant", ["plora", "ggpo"])
def test_disabled_adapter_reference_is_refused(variant, tmp_path, capsys):
    """Anchored SFT with a PEFT policy and no anchor model uses the adapter-disabled policy: not with PLoRA/GGPO."""
    recipe = {**BASE, "model": "builtin:tiny-qwen2-arith", "method": {"name": "asft_anchored"},
              "data": {"train": {"source": "builtin:arithmetic-sft", "max_samples": 8}},
              "peft": {"type": variant}, "training": {"max_steps": 1, "save_strategy": "no"},
              "output_dir": str(tmp_path / "out")}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"peft.{variant}" in err[0] and "ref_model" in err[0]


def test_merge_refuses_bad_directories(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["merge", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 2 and "not found" in err[0] and "not a finished posttrain run" in err[1]


# Two-process runs of every variant are `slow` (GOAT, the most state to keep consistent, also runs in
# tests/test_distributed.py's backend matrix).
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["goat", "plora", "ggpo"])
def test_two_process_run(variant, tmp_path, ids):
    """A 2-process (gloo, CPU) run through accelerate (~20 s each): trains, logs once, saves one final model that
    reloads (and merges where allowed)."""
    from posttrain.adapters import load_adapter_run

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate_cpu_2proc.yaml"), "-m", "posttrain.cli", "train", f"recipes/sft_{variant}.yaml", "--set", "training.max_steps=3", "--set", "training.logging_steps=1",
           "--set", "training.per_device_train_batch_size=8", "--set", "data.train.max_samples=64",
           "--set", "data.eval.max_samples=8", "--set", "data.test.max_samples=4", "--set", f"output_dir={out}"]
    if variant == "plora":
        cmd += ["--set", "peft.plora.stage_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    # two processes: each step consumes 2 x 8 of the 64 rows, so an epoch is 4 steps (8 with one process)
    assert train_rows[-1]["epoch"] == pytest.approx(3 / 4, abs=1e-3)
    assert all(any(k.startswith(f"{variant}/") for k in r) for r in train_rows)
    if variant == "ggpo":  # the perturbation's extra compute is logged (docs/methods/ggpo.md#cost)
        assert all(r["ggpo/extra_seconds"] >= 0 and r["ggpo/extra_flops"] > 0 for r in train_rows)
    assert torch.isfinite(_logits(load_adapter_run(out), ids)).all()
    assert main(["merge", str(out), str(tmp_path / "merged")]) == (2 if variant == "goat" else 0)


def test_builder_without_variant_support_is_refused(tmp_path, monkeypatch):
    """A family builder that does not go through make_trainer must not silently train plain LoRA."""
    import posttrain.adapters.trainer as T
    from posttrain.train import run

    monkeypatch.setattr(T, "make_trainer", lambda cls, recipe, uses_disabled_adapter_reference=None, **kw: cls(**kw))
    data = _recipe("sft_ggpo.yaml", tmp_path / "run")
    with pytest.raises(UserError, match="peft.type: 'ggpo' is not supported by method 'sft'"):
        run(parse_recipe(data), quiet=True)
