"""``posttrain spo-init``: SPO's offline value-initialisation pass as its own command (docs/methods/spo.md, "The
offline pass as a command"). The pass itself is
:meth:`posttrain.families.rl.spo_trainer.SPOGRPOTrainer.spo_offline_scores`; this module sets the trainer up as
``posttrain train`` does and writes the scores file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.families.base import FAMILIES
from posttrain.recipe import Recipe
from posttrain.registry import load
from posttrain.run.pipeline import (
    RunContext,
    check_rows_fit,
    check_user_code,
    load_models,
    load_run_tokenizer,
    preflight,
    prepare_chat_format,
    setup_logging,
)
from posttrain.threads import configure_cpu_threads


def spo_init(recipe: Recipe, out: Path) -> dict[str, Any]:
    """The offline pass of an SPO recipe with its start policy, set up as ``posttrain train`` sets up its run (same
    data, chat format, seed and trainer), written to ``out`` atomically with the record of the pass (``out.partial``
    keeps the progress of an interrupted pass, which a second call continues). Returns a summary of what was written."""
    from transformers import set_seed

    from posttrain.families.rl.spo_trainer import write_json_atomic

    setup_logging()
    info, config, datasets = preflight(recipe)
    tokenizer = load_run_tokenizer(recipe)
    prepare_chat_format(recipe, info, config, tokenizer, datasets)
    check_rows_fit(config, tokenizer, datasets)
    check_user_code(recipe, info)
    if config.use_cpu:
        configure_cpu_threads()
    set_seed(recipe.seed)
    tokenizer, model, ref_model = load_models(recipe, info, tokenizer)
    ctx = RunContext(recipe, info, tokenizer, model, ref_model, {}, [], config=config, datasets=datasets)
    trainer = load(FAMILIES[info.family].build_trainer)(ctx)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    scores = trainer.spo_offline_scores(partial=partial)
    if trainer.accelerator.is_main_process:
        write_json_atomic(out, {"pass": trainer.spo_pass_record(), "scores": scores})
        partial.unlink(missing_ok=True)
    samples = sum(len(v) for v in scores.values())
    return {"path": str(out), "prompts": len(scores), "samples": samples,
            "success_rate": sum(sum(v) for v in scores.values()) / max(samples, 1)}
