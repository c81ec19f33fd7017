"""Multi-stage recipes: several runs from one recipe file, in order, each in its own output folder.

A recipe with a top-level ``stages:`` list holds the keys every stage shares (model, data, method, training, ...)
plus, per stage, a ``name`` and the keys that stage changes (deep-merged onto the shared ones; ``--set`` overrides
apply to every stage after that). Stage ``NAME`` writes to ``<output_dir>/NAME``; ``model`` or ``ref_model`` may be
``stage:NAME`` (or ``{path: stage:NAME}``), the final model of an earlier stage. Pre-DPO (docs/methods/pre_dpo.md) is
such a recipe: a DPO guide, then DPO from the same start with the guide as the reference.

Every stage is checked before the first one trains. With ``--resume``, finished stages are skipped, the stage that
was interrupted resumes from its newest checkpoint, and the later ones start fresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.errors import UserError
from posttrain.recipe import STAGE_REF, merge, split_stages  # noqa: F401 (re-exported)


def load_stages(path: str | Path, overrides: list[str] | None = None):
    """``[(name, Recipe)]`` when the recipe file at ``path`` has ``stages:``, else ``None``. Every stage is
    validated here (an error names ``stages[i]`` or the key)."""
    from posttrain.recipe import load_recipe_stages

    loaded = load_recipe_stages(path, overrides)
    return None if loaded[0][0] is None else loaded


def run_stages(stages, *, resume: bool, overwrite: bool, command: str | None = None) -> list[dict[str, Any]]:
    """Train the stages in order; returns their summaries."""
    import logging

    from posttrain.run.pipeline import run
    from posttrain.trainers.common import previous_outputs

    logger = logging.getLogger("posttrain")
    check_stages(stages, resume=resume, overwrite=overwrite)
    _wait_for_every_process()  # no process starts a stage (and fills its folder) while another still checks it
    summaries = []
    for name, recipe in stages:
        out = Path(recipe.output_dir)
        started = bool(previous_outputs(out))
        logger.info("stage '%s' -> %s", name, out)
        summary = run(recipe, resume=resume and started, overwrite=overwrite and not resume, command=command)
        summary["stage"] = name
        summaries.append(summary)
        _wait_for_every_process()  # the main process has written the stage's final model before the next loads it
        _release_deepspeed_state()
    return summaries


def _release_deepspeed_state() -> None:
    """Under DeepSpeed, accelerate refuses a second ``Accelerator`` with a DeepSpeed plugin in the same process (its
    ``AcceleratorState`` is a process-wide singleton): the next stage's trainer gets a fresh one (the process group,
    accelerate's ``PartialState``, is kept)."""
    from posttrain.distributed import DEEPSPEED, requested_backend

    if requested_backend() in DEEPSPEED:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()


def _wait_for_every_process() -> None:
    """A barrier over the processes of a multi-process launch (``--num-processes N``); nothing in one process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def check_stages(stages, *, resume: bool, overwrite: bool, num_processes: int | None = None,
                 backend: str | None = None) -> None:
    """Every stage's preflight (the TRL config, data, output folder), then every stage's user code, before the first
    stage trains: a bad key of a later stage is reported before anything is trained (an error names the stage).
    ``num_processes`` / ``backend``: checked in the calling process before ``posttrain train --num-processes N``
    launches the stages (the TRL config, whose checks depend on the process count, is then checked by the launched
    processes)."""
    from posttrain.run.pipeline import check_user_code, prepare_output_dir, preflight, setup_logging
    from posttrain.trainers.common import previous_outputs

    setup_logging()
    checked = []
    for name, recipe in stages:
        try:
            if num_processes is None:
                recipe._preflight = preflight(recipe)  # posttrain.run.pipeline.run uses it instead of checking again
            else:
                recipe._preflight = preflight(recipe, build_trainer_config=False, num_processes=num_processes,
                                              backend=backend)
            info = recipe._preflight[0]
            out = Path(recipe.output_dir)
            if not (resume and previous_outputs(out)) and not overwrite:
                prepare_output_dir(out, resume=False, overwrite=False, create=False)
        except UserError as exc:
            raise UserError(f"stage '{name}': {exc}") from None
        checked.append((name, recipe, info))
    for name, recipe, info in checked:
        try:
            check_user_code(recipe, info)
        except UserError as exc:
            raise UserError(f"stage '{name}': {exc}") from None
