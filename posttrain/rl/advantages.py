"""Moved to :mod:`posttrain.families.rl` (issue #24): the estimators, one file each, to
:mod:`posttrain.families.rl.advantages` (registered in :data:`posttrain.families.rl.parts.ADVANTAGES`), the shared
helpers (``combine_rewards``, ``AdvantageOutput``, ...) to :mod:`posttrain.families.rl.common`. This alias stays only
for :mod:`posttrain.trainers.spo` (``combine_rewards``): a direct import there would close the trainers <-> families
folder cycle. Remove it when SPO's trainer wiring moves into ``posttrain/families/rl/``. It forwards on first use (no
import at load)."""

import importlib


def __getattr__(name: str):
    for module in ("posttrain.families.rl.common", "posttrain.families.rl.parts"):
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
