"""Moved to :mod:`posttrain.families.rl` (issue #24): the estimators, one file each, to
:mod:`posttrain.families.rl.advantages` (registered in :data:`posttrain.families.rl.parts.ADVANTAGES`), the shared
helpers (``combine_rewards``, ``AdvantageOutput``, ...) to :mod:`posttrain.families.rl.common`. This alias keeps those
names importable from the old path; it forwards on first use (no import at load, so the lower layer does not import the
family)."""

import importlib


def __getattr__(name: str):
    for module in ("posttrain.families.rl.common", "posttrain.families.rl.parts"):
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
