"""What a run leaves in ``output_dir``, and reading it back on ``--resume``.

Every run leaves ``recipe.yaml`` (fully resolved), ``metrics.jsonl`` (one JSON object per logging event, appended as
training goes), the final model + tokenizer (or adapter), HF checkpoints for ``--resume``, the model card
``README.md``, ``summary.json`` and ``report.html`` (docs/observability.md), and ``POSTTRAIN_COMPLETE`` once the final
model is saved. :func:`prepare_output_dir` refuses a folder that holds another run's outputs unless ``--resume`` /
``--overwrite`` says what to do with them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import UserError
from posttrain.methods import MethodInfo
from posttrain.recipe import Recipe

logger = logging.getLogger("posttrain")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0

def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool, create: bool = True) -> None:
    """Refuse a folder that is not a writable directory, or that holds another run's outputs (unless ``--resume``
    continues that run or ``--overwrite`` replaces it: then the previous run's outputs are removed). ``create=False``:
    the same checks without creating or removing anything."""
    from posttrain.trainers.common import check_output_dir, previous_outputs, remove_previous_run

    if resume and overwrite:
        raise UserError("--overwrite: cannot be combined with --resume")
    check_output_dir(out, create=create)
    if resume or not create and overwrite:
        return
    previous = previous_outputs(out)
    if not previous:
        return
    if not overwrite:
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise UserError(
            f"output_dir: '{out}' holds another run's outputs ({shown}); pass --resume to continue that run, "
            "--overwrite to replace it, or choose another output_dir"
        )
    if create and is_main_process():
        removed = remove_previous_run(out)
        logger.info("--overwrite: removed the previous run's outputs from %s (%s)", out, ", ".join(removed) or "none")

def write_resolved_recipe(recipe: Recipe) -> None:
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".recipe.yaml.tmp"
    text = yaml.safe_dump(recipe.resolved(), sort_keys=False)
    for key, mixture in recipe._mixtures.items():  # the resolved mixtures, as comments (the file still loads)
        text += f"# {key}: {mixture}\n"
    tmp.write_text(text)
    os.replace(tmp, out / "recipe.yaml")

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

def checkpoint_state(checkpoint: str) -> dict[str, Any]:
    try:
        return json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}

def finished_summary(out: Path, info: MethodInfo, marker: dict[str, Any]) -> dict[str, Any]:
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {"method": info.name, "output_dir": str(out), "steps": marker.get("steps")}
    summary.update(already_finished=True, output_dir=str(out))
    summary.setdefault("steps", marker.get("steps"))
    return summary

def copy_checkpoint_model(checkpoint: str, out: Path) -> list[str]:
    """Copy the saved model of ``checkpoint`` (weights, configs, adapter files; not the trainer's resume state) into
    ``out``; returns the names copied."""
    import re
    import shutil

    model_file = re.compile(r"^(config\.json|generation_config\.json|adapter_config\.json|goat_config\.json|"
                            r"posttrain_adapter\.json|training_args\.bin|pytorch_model\.bin|.*\.safetensors|"
                            r".*\.safetensors\.index\.json)$")
    names = sorted(f.name for f in Path(checkpoint).iterdir() if f.is_file() and model_file.match(f.name))
    for name in names:
        shutil.copy(Path(checkpoint) / name, out / name)  # new mtime: listed in the run marker
    return names

def write_report(recipe: Recipe) -> Path | None:
    """``report.html`` of a finished run (``report: false`` skips it). A report that cannot be drawn is a warning:
    the run itself has succeeded."""
    if not recipe.report:
        return None
    from posttrain.run.report import write_report as _write

    try:
        path = _write([recipe.output_dir])
    except Exception as exc:  # noqa: BLE001 - never lose a finished run to a plotting problem
        logger.warning("report not written: %s: %s", type(exc).__name__, exc)
        return None
    logger.info("report: %s", path)
    return path


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: ``finished``, the run marker of a run that is complete (nothing to train), or
    ``checkpoint``, the newest complete checkpoint ``--resume`` continues from (None: from the start)."""

    finished: dict[str, Any] | None = None
    checkpoint: str | None = None


def resume_point(out: Path, config, resume: bool) -> ResumePoint:
    """``--resume``: a finished run (``POSTTRAIN_COMPLETE`` with at least ``max_steps`` steps) is not trained again;
    else the newest complete checkpoint (incomplete ones are removed), and the metric rows logged after it dropped."""
    if not resume:
        return ResumePoint()
    from posttrain.trainers.common import checkpoint_step, latest_complete_checkpoint, read_run_marker

    marker = read_run_marker(out)
    if marker is not None and (config.max_steps <= 0 or config.max_steps <= int(marker.get("steps") or 0)):
        return ResumePoint(finished=marker)
    checkpoint = latest_complete_checkpoint(out, remove_incomplete=is_main_process())
    if checkpoint is None:
        raise UserError(f"--resume: no complete checkpoint-* directory in output_dir '{out}' to resume from")
    logger.info("resuming from %s", checkpoint)
    if is_main_process():
        _truncate_metrics(out / "metrics.jsonl", checkpoint_step(checkpoint))
    return ResumePoint(checkpoint=checkpoint)


def start_outputs(recipe: Recipe, out: Path, *, resume: bool, overwrite: bool) -> None:
    """Once every check passed: the output folder (another run's outputs removed with ``--overwrite``), marked in
    progress again, with the resolved ``recipe.yaml`` and, unless resuming, no ``metrics.jsonl`` of an earlier run."""
    from posttrain.trainers.common import RUN_MARKER

    prepare_output_dir(out, resume=resume, overwrite=overwrite)
    if is_main_process():
        (out / RUN_MARKER).unlink(missing_ok=True)  # in progress (again)
        write_resolved_recipe(recipe)
        if not resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)


def save_final_model(trainer, out: Path) -> float:
    """Save the final model into ``out`` (refused when its weights hold NaN/inf); returns when its files started to be
    written (``time.time()``)."""
    from posttrain.trainers.common import TrainingDiverged, non_finite_parameters

    bad = non_finite_parameters(trainer.model, trainer.accelerator)
    if bad:
        raise TrainingDiverged(f"training: the final weights hold NaN/inf ({', '.join(bad)}); not saved")
    saved_since = time.time()
    trainer.save_model(str(out))
    return saved_since


def write_outputs(recipe: Recipe, out: Path, trainer, card, summary: dict[str, Any], saved_since: float) -> None:
    """The main process's last files: ``summary.json``, the model card, ``report.html``, and the run marker listing
    the files written since the final save began (``saved_since``, a ``time.time()``)."""
    if not is_main_process():
        return
    from posttrain.card import last_metrics, model_card, write_card
    from posttrain.trainers.common import write_run_marker

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics = last_metrics(trainer.state.log_history)
    write_card(out, model_card(card, metrics=metrics, summary=summary, step=summary["steps"]))
    write_report(recipe)
    written = [f.name for f in out.iterdir() if f.is_file() and f.stat().st_mtime >= saved_since - 1.0]
    write_run_marker(out, summary["steps"], written)
