"""Pieces every posttrain trainer shares: crash-safe checkpoints, resume, the non-finite guard, the model card, and
the run folder.

Markers posttrain writes (and the only folders it ever deletes are ones carrying them):

* ``checkpoint-N/POSTTRAIN_SAVING``: written before HF writes anything into a checkpoint folder;
* ``checkpoint-N/POSTTRAIN_COMPLETE``: written once the checkpoint is fully written and synced (``--resume`` uses
  only these), after the weights were checked to be finite;
* ``output_dir/POSTTRAIN_COMPLETE``: the run finished (final model saved); JSON with the step count and the files
  the final save wrote (what ``--overwrite`` removes besides the marked checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from posttrain.errors import UserError, did_you_mean

logger = logging.getLogger("posttrain")
COMPLETE_MARKER = "POSTTRAIN_COMPLETE"
SAVING_MARKER = "POSTTRAIN_SAVING"
RUN_MARKER = COMPLETE_MARKER  # in output_dir itself: the run finished
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# files a run writes into output_dir besides the model: their presence means "another run's outputs"
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "summary.json", RUN_MARKER)
MODEL_FILES = ("config.json", "adapter_config.json", "model.safetensors", "adapter_model.safetensors",
               "pytorch_model.bin", "trainer_state.json", "training_args.bin")


class TrainingDiverged(UserError):
    """A NaN/inf loss, gradient norm or weight: the run stops; no later checkpoint is marked complete."""


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def non_finite_parameters(model, accelerator=None) -> list[str]:
    """Names of the parameters of ``model`` holding NaN or inf (a few, for the message). Sharded parameters (ZeRO-3,
    FSDP2) are checked on each process's own shard; with ``accelerator`` every process learns whether any shard is
    bad (so that all of them stop together)."""
    import torch

    from posttrain.distributed import local_shard

    bad = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            shard = local_shard(param)
            if shard.numel() and not bool(torch.isfinite(shard).all()):
                bad.append(name)
                if len(bad) >= 3:
                    break
    if accelerator is not None and accelerator.num_processes > 1:
        count = torch.tensor(float(len(bad)), device=accelerator.device)
        if float(accelerator.reduce(count, reduction="sum")) > 0 and not bad:
            bad = ["a shard held by another process"]
    return bad


def _diverged(what: str, step: int) -> TrainingDiverged:
    return TrainingDiverged(
        f"training: {what} at step {step}; training diverged (lower training.learning_rate, set "
        "training.max_grad_norm, or check the method's hyperparameters); no checkpoint from this step on was marked "
        "complete"
    )


def is_posttrain_checkpoint(path: Path) -> bool:
    return (path / COMPLETE_MARKER).exists() or (path / SAVING_MARKER).exists()


def _rotate_checkpoints(run_dir: Path, limit: int | None, best: str | None) -> None:
    """HF's rotation, over the checkpoints this run marked complete only (never someone else's folder)."""
    if limit is None or limit <= 0:
        return
    ckpts = sorted(
        (int(m.group(1)), child)
        for child in run_dir.iterdir()
        if (m := _CHECKPOINT_RE.match(child.name)) and child.is_dir() and (child / COMPLETE_MARKER).exists()
    )
    if len(ckpts) <= limit:
        return
    protected = {ckpts[-1][1].resolve()}
    if best:
        protected.add(Path(best).resolve())
    remaining, keep = len(ckpts), max(limit, len(protected))
    for _, path in ckpts:
        if remaining <= keep:
            break
        if path.resolve() not in protected:
            shutil.rmtree(path, ignore_errors=True)
            remaining -= 1


class AtomicCheckpointMixin:
    """Checkpoints that a killed or diverged run cannot corrupt, and the non-finite guard.

    HF writes ``checkpoint-N`` in place and then rotates old ones. Here the folder is marked ``POSTTRAIN_SAVING``
    first, rotation is deferred until the new checkpoint is fully written, synced to disk, its weights checked finite
    and marked complete (``POSTTRAIN_COMPLETE``), and rotation only ever deletes marked checkpoints; ``--resume`` only
    considers complete ones, so a run killed mid-save resumes from the previous one.

    Non-finite guard (every family): a NaN/inf training loss (checked per micro-batch, before HF's
    ``logging_nan_inf_filter`` hides it) or gradient norm stops the run with :class:`TrainingDiverged` naming the step.
    """

    # Set by posttrain.train.run: what the model card (posttrain.card) is written from.
    card_context = None

    def create_accelerator_and_postprocess(self):
        """HF's accelerator, with FSDP also on a CPU-only launch (:func:`posttrain.distributed.fsdp_on_cpu`)."""
        from posttrain.distributed import fsdp_on_cpu

        with fsdp_on_cpu():
            return super().create_accelerator_and_postprocess()

    def create_model_card(self, *args, **kwargs):
        """posttrain's card in ``output_dir/README.md``, instead of TRL's (which cannot name the base model of a
        posttrain run and says "fine-tuned version of [None]"). TRL calls this on every checkpoint save."""
        self.write_model_card(self.args.output_dir)

    def write_model_card(self, directory, checkpoint: bool = False) -> None:
        if not self.args.should_save:
            return
        from posttrain.card import last_metrics, minimal_card, model_card, write_card

        if self.card_context is None:
            base = getattr(getattr(self.model, "config", None), "_name_or_path", None)
            write_card(directory, minimal_card(getattr(self, "method", None), base))
            return
        text = model_card(self.card_context, metrics=last_metrics(self.state.log_history),
                          step=self.state.global_step, checkpoint=checkpoint)
        write_card(directory, text)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Every save (checkpoints and the final one) also writes the model card next to the weights."""
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        checkpoint = Path(output_dir).name.startswith("checkpoint-")
        self.write_model_card(output_dir, checkpoint=checkpoint)
        if checkpoint:  # the run folder's card follows the newest checkpoint (all families, not only TRL's)
            self.write_model_card(self.args.output_dir)

    # posttrain's own optimizers (``training.optim: stable_spam``; posttrain.optim): HF builds them through
    # ``optimizer_cls_and_kwargs``, so its decay / no-decay parameter groups and LR schedule apply unchanged.
    _posttrain_num_steps = None

    def create_optimizer_and_scheduler(self, num_training_steps: int):
        self._posttrain_num_steps = num_training_steps
        return super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, *args, **kwargs):
        own = getattr(self.args, "posttrain_optim", None)
        if own is not None and self.optimizer is None:
            from posttrain.optim import refuse_sharded, stable_spam_kwargs
            from posttrain.optim.stable_spam import StableSPAM

            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise refuse_sharded("training.optim")
            config, spec = self.args, own[1]
            steps = self._posttrain_num_steps or getattr(self.state, "max_steps", 0) or config.max_steps
            self.optimizer_cls_and_kwargs = (StableSPAM, stable_spam_kwargs(config, spec, steps))
        return super().create_optimizer(*args, **kwargs)

    def log(self, logs, *args, **kwargs):
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if "loss" in logs and hasattr(optimizer, "last_metrics"):
            logs = {**logs, **{f"optim/{k}": v for k, v in optimizer.last_metrics.items()}}
        return super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        value = float(loss.detach().float().mean()) if hasattr(loss, "detach") else float(loss)
        if not math.isfinite(value):
            raise _diverged(f"the loss is {value}", self.state.global_step + 1)
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        if grad_norm is not None and not getattr(self.accelerator, "optimizer_step_was_skipped", False):
            value = float(grad_norm.detach().float() if hasattr(grad_norm, "detach") else grad_norm)
            if not math.isfinite(value):  # fp16 overflow steps are skipped by the scaler, not an error
                raise _diverged(f"the gradient norm is {value}", self.state.global_step)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        ckpt = run_dir / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            if ckpt.exists() and not is_posttrain_checkpoint(ckpt) and any(ckpt.iterdir()):
                raise UserError(f"output_dir: {ckpt} exists and was not written by posttrain; move it away")
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / SAVING_MARKER).write_text("posttrain checkpoint being written\n")
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # no rotation until the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        bad = non_finite_parameters(self.model, self.accelerator)  # every process: each checks its own shard
        if bad:
            raise _diverged(f"the weights hold NaN/inf ({', '.join(bad)})", self.state.global_step)
        if self.args.should_save:
            _fsync_tree(ckpt)
            (ckpt / COMPLETE_MARKER).write_text("ok\n")
            (ckpt / SAVING_MARKER).unlink(missing_ok=True)
            _rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint)


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[1])


def latest_complete_checkpoint(output_dir: str | Path, remove_incomplete: bool = True) -> str | None:
    """Newest ``checkpoint-N`` carrying the completion marker. Incomplete ones (a killed save) are removed when
    posttrain wrote them (``POSTTRAIN_SAVING``) or they are empty; any other folder is left alone."""
    out = Path(output_dir)
    found = []
    for child in out.iterdir() if out.is_dir() else []:
        match = _CHECKPOINT_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        if (child / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), child))
        elif not remove_incomplete:
            continue
        elif (child / SAVING_MARKER).exists():
            logger.warning("removing incomplete checkpoint %s (interrupted save)", child)
            shutil.rmtree(child, ignore_errors=True)
        elif not any(child.iterdir()):
            child.rmdir()
        else:
            logger.warning("ignoring %s: not a complete checkpoint and not written by posttrain (left in place)", child)
    return str(max(found)[1]) if found else None


# --------------------------------------------------------------------------------------------------------------------
# the run folder


def read_run_marker(out: Path) -> dict[str, Any] | None:
    path = out / RUN_MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_run_marker(out: Path, steps: int, files: list[str]) -> None:
    tmp = out / f".{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps({"steps": steps, "files": sorted(files)}, indent=1) + "\n")
    os.replace(tmp, out / RUN_MARKER)


def previous_outputs(out: Path) -> list[str]:
    """What in ``out`` looks like another run's outputs: logged metrics, a summary or completion marker, a saved
    model, checkpoints. (A ``recipe.yaml`` alone is what a run that failed before training leaves: not counted.)"""
    if not out.is_dir():
        return []
    metrics = out / "metrics.jsonl"
    found = ["metrics.jsonl"] if metrics.is_file() and metrics.stat().st_size > 0 else []
    found += [name for name in ("summary.json", RUN_MARKER, *MODEL_FILES) if (out / name).exists()]
    found += sorted((c.name for c in out.iterdir() if _CHECKPOINT_RE.match(c.name)), key=checkpoint_step)
    return found


def check_output_dir(out: Path, probe: bool = True, create: bool = True) -> None:
    """``out`` is (or can be made) a writable directory; else one error line. ``create=False``: check without
    creating or writing anything (the folder, or its nearest existing parent, is a directory we may write to)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: '{out}' exists and is not a directory")
    if not create:
        existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"output_dir: '{out}' is not a writable directory ('{existing}' cannot be written to)")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        if probe:
            test = out / f".posttrain-write-test-{os.getpid()}"
            test.write_text("")
            test.unlink()
    except OSError as exc:
        raise UserError(f"output_dir: '{out}' is not a writable directory ({exc.strerror or exc})") from None


def remove_previous_run(out: Path) -> list[str]:
    """``--overwrite``: delete what posttrain wrote in ``out`` (marked checkpoints, its run files, the files the
    previous final save listed in its marker); refuse if a ``checkpoint-N`` folder there is someone else's."""
    foreign = [c for c in out.iterdir()
               if _CHECKPOINT_RE.match(c.name) and c.is_dir() and not is_posttrain_checkpoint(c) and any(c.iterdir())]
    if foreign:
        raise UserError(f"output_dir: {foreign[0]} was not written by posttrain; --overwrite leaves it alone: move it "
                        "away or choose another output_dir")
    marker = read_run_marker(out) or {}
    removed = []
    for child in sorted(out.iterdir()):
        name = child.name
        if _CHECKPOINT_RE.match(name) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        elif name in RUN_FILES or (name in marker.get("files", ()) and child.is_file()):
            child.unlink()
        else:
            continue
        removed.append(name)
    return removed


# --------------------------------------------------------------------------------------------------------------------
# counting what max_length truncates and drops (TRL does both silently)


class _NoMaxLength:
    """``with _NoMaxLength(args):`` -- ``args.max_length`` is None inside (TRL then neither truncates nor drops)."""

    def __init__(self, args):
        self.args, self.saved = args, args.max_length

    def __enter__(self):
        self.args.max_length = None

    def __exit__(self, *exc):
        self.args.max_length = self.saved


def log_length_effects(key: str, total: int, truncated: int, dropped: int, max_length: int, why: str) -> None:
    """Log the rows ``max_length`` truncates (kept, shortened) and drops (nothing left to score)."""
    if truncated:
        logger.warning("%s: %d of %d rows are longer than training.max_length=%d tokens and are truncated",
                       key, truncated, total, max_length)
    if dropped:
        logger.warning("%s: dropped %d of %d rows: %s (training.max_length=%d)", key, dropped, total, why, max_length)
    if dropped and dropped == total:
        raise UserError(f"{key}: no rows left: {why} (training.max_length={max_length})")


class CountedSFTTruncationMixin:
    """``SFTTrainer._prepare_dataset`` with TRL's truncation to ``max_length`` and its drop of rows left without a
    scored token done here, counted in the log (same slices and filter as TRL 1.16)."""

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        from datasets import Dataset

        max_length = args.max_length
        if max_length is None or packing or not isinstance(dataset, Dataset) or "labels" in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        with _NoMaxLength(args):
            ds = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        mode = args.truncation_mode
        if mode not in ("keep_start", "keep_end"):
            raise UserError(f"training.truncation_mode: expected keep_start or keep_end, got {mode!r}")
        sl = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
        from posttrain.data.sources import column_values

        total = len(ds)
        long = {i for i, ids in enumerate(column_values(ds, "input_ids")) if len(ids) > max_length}
        if long:
            ds = ds.map(lambda ex: {"input_ids": ex["input_ids"][sl], "labels": ex["labels"][sl]})
        keep = [i for i, labels in enumerate(column_values(ds, "labels")) if any(label != -100 for label in labels)]
        if len(keep) < total:
            ds = ds.select(keep)
        log_length_effects(f"data.{dataset_name}", total, len(long.intersection(keep)), total - len(keep), max_length,
                           "no completion token is left after truncation")
        return ds


class CountedDPOTruncationMixin:
    """``DPOTrainer._prepare_dataset`` with TRL's drop of rows whose prompt fills ``max_length`` done here, and the
    rows its collator will truncate counted, both in the log."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        from datasets import Dataset

        max_length = args.max_length
        if max_length is None or not isinstance(dataset, Dataset):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        with _NoMaxLength(args):
            ds = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if "prompt_ids" not in ds.column_names:  # pragma: no cover - TRL changed its columns
            return ds
        from posttrain.data.sources import column_values

        total = len(ds)
        prompts = [len(p) for p in column_values(ds, "prompt_ids")]
        chosen, rejected = column_values(ds, "chosen_ids"), column_values(ds, "rejected_ids")
        longest = [max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)]
        keep = list(range(total))
        if args.truncation_mode == "keep_start":  # TRL: the collator would cut every completion token
            keep = [i for i in keep if prompts[i] < max_length]
        truncated = sum(1 for i in keep if prompts[i] + longest[i] > max_length)
        if len(keep) < total:
            ds = ds.select(keep)
        log_length_effects(f"data.{dataset_name}", total, truncated, total - len(keep), max_length,
                           "the prompt alone fills max_length")
        return ds


# --------------------------------------------------------------------------------------------------------------------
# Config objects every family builds (the family builders call these before any model is loaded)
# --------------------------------------------------------------------------------------------------------------------


def training_config(config_cls, recipe, overrides: dict[str, Any] | None = None):
    """Build the TRL/HF config from ``recipe.training`` with posttrain's defaults; errors name ``training.<key>``."""
    import torch

    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in recipe.training:
        if key not in fields:
            raise UserError(f"training.{key}: unknown training argument{did_you_mean(key, fields)}")
    for key in ("output_dir", "seed"):
        if key in recipe.training:
            raise UserError(f"training.{key}: set it as the top-level recipe key '{key}'")
    # types and domains were checked when the recipe was parsed (posttrain.training_args.check_training)
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
    kwargs.update(recipe.training)
    kwargs["output_dir"] = recipe.output_dir
    kwargs["seed"] = recipe.seed
    from posttrain.optim import OPTIMIZERS

    own_optim = None
    if kwargs.get("optim") in OPTIMIZERS:  # built by the trainers (create_optimizer), not by HF; under DeepSpeed / FSDP
        # refused by preflight (posttrain.distributed.check_backend) and again when the optimizer is created
        own_optim = (kwargs.pop("optim"), kwargs.pop("optim_args", None))
    try:
        config = config_cls(**kwargs)
        config.posttrain_optim = own_optim
        return config
    except (TypeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        named = next((k for k in recipe.training if k in text), None)
        where = f"training.{named}" if named else "training"
        raise UserError(f"{where}: {text[:300]}") from None


def peft_config(recipe, task_type: str = "CAUSAL_LM"):
    """The recipe's ``peft:`` block as a ``LoraConfig`` (``task_type`` ``SEQ_CLS`` for reward models: PEFT then also
    trains and saves the score head)."""
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
        task_type=task_type,
    )


def trainer_kwargs(ctx, config, train, evals=None) -> dict[str, Any]:
    """The arguments every family trainer takes, from the run context (``ctx``, a ``RunContext`` of
    :mod:`posttrain.run.pipeline`): the model, the family's training ``config`` (``args``), the train and eval
    datasets, the tokenizer, the recipe's ``peft:`` block, the callbacks, the method's params and the reference model.
    A family builder adds its own arguments and hands the lot to :func:`posttrain.adapters.trainer.make_trainer`."""
    return {"model": ctx.model, "args": config, "train_dataset": train, "eval_dataset": evals,
            "processing_class": ctx.tokenizer, "peft_config": peft_config(ctx.recipe), "callbacks": ctx.callbacks,
            "params": ctx.recipe.params, "ref_model": ctx.ref_model}
