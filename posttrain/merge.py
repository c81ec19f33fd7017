"""``posttrain merge RUN_DIR OUT_DIR``: a full model (``AutoModelForCausalLM.from_pretrained(OUT_DIR)``) from a run.

* LoRA and LoRA-GGPO runs (an adapter in RUN_DIR): the base model named in ``RUN_DIR/recipe.yaml`` (else the
  adapter's ``base_model_name_or_path``) + the adapter, merged with PEFT's ``merge_and_unload``.
* PLoRA runs already save the merged full model (backbone + last adapter; the accumulated update is high-rank, so
  there is no low-rank adapter to export): their model files are copied.
* Full fine-tuning runs (no adapter): copied as well.
* GOAT runs cannot be merged: each token is routed to its own mixture of experts, so no single weight matrix equals
  the adapter. ``merge`` refuses with one line saying how to load the adapter instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from posttrain.errors import UserError

# run-directory bookkeeping that is not part of the model
_NOT_MODEL = {"metrics.jsonl", "summary.json", "recipe.yaml", "training_args.bin", "posttrain_adapter.json",
              "README.md", "POSTTRAIN_COMPLETE"}


def _copy_model_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.is_file() and item.name not in _NOT_MODEL and not item.name.startswith("."):
            shutil.copy2(item, dst / item.name)


def merge_run(run_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> str:
    """Write the merged full model of ``run_dir`` to ``out_dir``; return a one-line description of what was done.

    The base model's own code runs only with ``trust_remote_code=True`` (``--trust-remote-code``): a run folder's
    ``recipe.yaml`` saying ``model.trust_remote_code: true`` is not enough, since anyone who can write to a shared run
    folder could otherwise run code on whoever merges it."""
    from posttrain.adapters.trainer import _base_model_for, run_adapter_type, run_adapter_variant

    run, out = Path(run_dir), Path(out_dir)
    if not run.is_dir():
        raise UserError(f"{run}: run directory not found")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty directory")
    if out.resolve() == run.resolve():
        raise UserError(f"{out}: OUT_DIR must differ from RUN_DIR")
    has_adapter = (run / "adapter_config.json").is_file()
    has_model = (run / "config.json").is_file()
    kind, variant = run_adapter_type(run), run_adapter_variant(run)
    if variant is not None and not variant.mergeable:
        raise UserError(f"{run}: {variant.merge_refusal.format(run=run)}")
    if not has_adapter:
        if not has_model:
            raise UserError(f"{run}: no adapter_config.json or config.json; not a finished posttrain run directory")
        out.mkdir(parents=True, exist_ok=True)
        _copy_model_files(run, out)
        what = variant.merged_description if variant is not None and variant.saved_merged else "full model"
        return f"{what}: copied to {out}"

    from peft import PeftModel

    base = _base_model_for(run, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, str(run))
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(run)).save_pretrained(str(out))
    except Exception:  # noqa: BLE001 - a run without a tokenizer still yields a loadable model
        pass
    return f"{kind or 'lora'} adapter merged into its base model: wrote {out}"
