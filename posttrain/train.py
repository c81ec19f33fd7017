"""Running a recipe: load model and data, build the method's trainer, train, save, and report.

Every run leaves in ``output_dir``: ``recipe.yaml`` (fully resolved), ``metrics.jsonl`` (one JSON object per logging
event, appended as training goes), the final model + tokenizer (or adapter), and HF checkpoints for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import UserError, did_you_mean
from posttrain.methods import MethodInfo, get_method
from posttrain.recipe import Recipe

logger = logging.getLogger("posttrain")

# family -> "module:function" that builds the trainer: build(ctx: RunContext) -> Trainer
TRAINER_BUILDERS = {
    "sft": "posttrain.trainers.build:build_sft_trainer",
    "preference": "posttrain.trainers.preference:build_preference_trainer",
    "unlearning": "posttrain.trainers.unlearning:build_unlearning_trainer",
    "rl": "posttrain.trainers.rl:build_rl_trainer",
}
# family -> "module:function" run before any model is loaded or anything is written: check(recipe) -> None
PREFLIGHT_CHECKS = {
    "rl": "posttrain.trainers.rl:check_rl_recipe",
}


@dataclasses.dataclass
class RunContext:
    recipe: Recipe
    info: MethodInfo
    tokenizer: Any
    model: Any
    ref_model: Any
    config_overrides: dict[str, Any]
    callbacks: list[Any]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (so redirected or captured stderr works)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("posttrain")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[posttrain] %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    import datasets
    import transformers

    import warnings

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def training_config(config_cls, recipe: Recipe, overrides: dict[str, Any] | None = None):
    """Build the TRL/HF config from ``recipe.training`` with posttrain's defaults; errors name ``training.<key>``."""
    import torch

    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in recipe.training:
        if key not in fields:
            raise UserError(f"training.{key}: unknown training argument{did_you_mean(key, fields)}")
    for key in ("output_dir", "seed"):
        if key in recipe.training:
            raise UserError(f"training.{key}: set it as the top-level recipe key '{key}'")
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "report_to": "none",
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "gradient_checkpointing": False,
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
        "use_cpu": not on_gpu,
        "dataloader_num_workers": 0,
        # a progress bar by default: transformers would turn it off because posttrain quiets its logger
        "disable_tqdm": False,
    }
    kwargs.update(overrides or {})
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls) if f.init}
    for key, value in recipe.training.items():
        default = defaults.get(key)
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and not isinstance(value, (int, float)) or isinstance(default, bool) and not isinstance(value, bool):
            want = "true or false" if isinstance(default, bool) else "a number"
            raise UserError(f"training.{key}: expected {want}, got {value!r}")
    kwargs.update(recipe.training)
    kwargs["output_dir"] = recipe.output_dir
    kwargs["seed"] = recipe.seed
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        named = next((k for k in recipe.training if k in text), None)
        where = f"training.{named}" if named else "training"
        raise UserError(f"{where}: {text[:300]}") from None


class MetricsJsonlCallback:
    """Appends one JSON line per logging event to ``metrics.jsonl`` (flushed, so it survives a crash)."""

    def __new__(cls, path: Path):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if not state.is_world_process_zero or not logs:
                    return
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                with open(path, "a") as fh:
                    fh.write(json.dumps(row, default=float) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())

        return _Callback()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric rows logged after the checkpoint (they are logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def write_resolved_recipe(recipe: Recipe) -> None:
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".recipe.yaml.tmp"
    tmp.write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    os.replace(tmp, out / "recipe.yaml")


def load_models(recipe: Recipe, info: MethodInfo):
    """Tokenizer, policy (with adapter when ``peft`` is set) and reference model for a recipe."""
    from posttrain.models import load_model, load_tokenizer

    m = recipe.model
    tokenizer = load_tokenizer(m.path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    model = load_model(m.path, dtype=m.dtype, trust_remote_code=m.trust_remote_code, revision=m.revision)
    ref_model = None
    reference = info.reference
    if reference == "optional":  # used only when the params say so (GRPO: method.beta > 0)
        needed = bool(recipe.params.uses_reference)
        if recipe.ref_model not in (None, "none") and not needed:
            raise UserError(
                f"ref_model: method '{info.name}' uses a reference model only for its KL term, which is off "
                "(method.beta: 0); set method.beta > 0 or remove ref_model"
            )
        if recipe.ref_model == "none" and needed:
            raise UserError(
                f"ref_model: none, but method '{info.name}' needs a reference for its KL term (method.beta > 0); "
                "remove it to use a frozen copy of model, give a path, or set method.beta: 0"
            )
        reference = "required" if needed else "none"
    if recipe.ref_model == "none":
        if reference == "required":
            raise UserError(
                f"ref_model: method '{info.name}' needs a reference model, but the recipe says ref_model: none "
                "(remove it to use a frozen copy of model, or give a path)"
            )
    elif reference == "required":
        if recipe.ref_model is not None:
            r = recipe.ref_model
            ref_model = load_model(
                r.path, dtype=r.dtype, trust_remote_code=r.trust_remote_code, revision=r.revision, key="ref_model.path"
            )
        elif recipe.peft is None:  # default: a frozen copy of the initial policy
            import copy

            ref_model = copy.deepcopy(model)
        # with peft and no ref_model: the adapter-disabled base is the reference (handled by the trainer)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
    elif recipe.ref_model not in (None, "none") and info.reference == "none":
        raise UserError(f"ref_model: method '{info.name}' uses no reference model; remove ref_model")
    return tokenizer, model, ref_model


def peft_config(recipe: Recipe):
    if recipe.peft is None:
        return None
    from peft import LoraConfig

    p = recipe.peft
    return LoraConfig(
        r=p.r,
        lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout,
        target_modules=p.target_modules,
        bias=p.bias,
        use_rslora=p.use_rslora,
        init_lora_weights=p.init_lora_weights,
        modules_to_save=p.modules_to_save,
        task_type="CAUSAL_LM",
    )


def test_accuracy(model, tokenizer, recipe: Recipe) -> float | None:
    if recipe.data.test is None:
        return None
    from posttrain.data.sources import load_source
    from posttrain.eval.accuracy import greedy_accuracy

    rows = load_source(recipe.data.test, "data.test", "test")
    return greedy_accuracy(model, tokenizer, rows)


def run(recipe: Recipe, *, resume: bool = False, callbacks: list | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train ``recipe`` end to end; return a summary (accuracies, final metrics, output_dir)."""
    from transformers import set_seed

    setup_logging(quiet)
    info = get_method(recipe.method.name)
    if info.family in PREFLIGHT_CHECKS:
        module, fn = PREFLIGHT_CHECKS[info.family].split(":")
        getattr(importlib.import_module(module), fn)(recipe)
    out = Path(recipe.output_dir)
    checkpoint = None
    if resume:
        from posttrain.trainers.common import latest_complete_checkpoint

        checkpoint = latest_complete_checkpoint(out, remove_incomplete=is_main_process())
        if checkpoint is None:
            raise UserError(f"--resume: no complete checkpoint-* directory in output_dir '{out}' to resume from")
        logger.info("resuming from %s", checkpoint)
        if is_main_process():
            _truncate_metrics(out / "metrics.jsonl", int(checkpoint.rsplit("-", 1)[1]))
    if is_main_process():
        write_resolved_recipe(recipe)
        if not resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    set_seed(recipe.seed)
    tokenizer, model, ref_model = load_models(recipe, info)
    summary: dict[str, Any] = {"method": info.name, "output_dir": str(out)}

    before = test_accuracy(model, tokenizer, recipe) if not resume else None
    if before is not None and is_main_process():
        logger.info("test accuracy before training: %.1f%%", 100 * before)
    summary["accuracy_before"] = before

    module, fn = TRAINER_BUILDERS[info.family].split(":")
    build = getattr(importlib.import_module(module), fn)
    ctx = RunContext(recipe, info, tokenizer, model, ref_model, {}, [MetricsJsonlCallback(out / "metrics.jsonl")])
    ctx.callbacks.extend(callbacks or [])
    trainer = build(ctx)
    from posttrain.adapters.trainer import check_trainer_supports_variant

    check_trainer_supports_variant(trainer, recipe, info.name)  # peft.type plora/goat/ggpo need make_trainer
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(out))
    if is_main_process():
        tokenizer.save_pretrained(str(out))
    summary["train_loss"] = result.training_loss
    summary["steps"] = result.global_step
    warnings = trainer.run_warnings() if hasattr(trainer, "run_warnings") else []  # RL: no learning signal, ...
    if warnings:
        summary["warnings"] = warnings

    after = test_accuracy(trainer.model, tokenizer, recipe)
    if after is not None and is_main_process():
        logger.info("test accuracy after training:  %.1f%%", 100 * after)
    summary["accuracy_after"] = after
    if is_main_process():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
