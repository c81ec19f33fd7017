"""Load what a user names as a model for evaluation or scoring: a hub id, a local model folder, a built-in name, or a
finished posttrain run, including a GOAT adapter run (routed experts that plain PEFT cannot load).

This sits above :mod:`posttrain.models` (plain loading) and :mod:`posttrain.adapters.trainer` (adapter runs, which
load their base model through :mod:`posttrain.models`), so neither imports the other's caller.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.models import load_model, resolve_model_path


def load_model_or_run(path: str, *, key: str = "model.path", trust_remote_code: bool = False, **options):
    """:func:`posttrain.models.load_model`, except that a GOAT run folder loads through its adapter loader."""
    resolved = resolve_model_path(path, key)
    if Path(resolved, "goat_config.json").exists():
        from posttrain.adapters.trainer import load_adapter_run

        return load_adapter_run(resolved, trust_remote_code=trust_remote_code).eval()
    return load_model(path, key=key, trust_remote_code=trust_remote_code, **options)
