"""Moved to :mod:`posttrain.families.rl.trainer` (issue #24). This alias stays only for
:mod:`posttrain.trainers.spo` (``PosttrainGRPOTrainer``): a direct import there would be a trainers -> families edge
and close the trainers <-> families folder cycle. Remove it when SPO's trainer wiring moves into
``posttrain/families/rl/``. It forwards names on first use (no import at load)."""

import importlib


def __getattr__(name: str):
    return getattr(importlib.import_module("posttrain.families.rl.trainer"), name)
