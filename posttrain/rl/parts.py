"""Moved to :mod:`posttrain.families.rl.parts` (issue #24). This alias keeps the old import
path working while other code and users move to the new one; it forwards names on first use (no import at load, so
the lower layer does not import the family)."""

import importlib


def __getattr__(name: str):
    return getattr(importlib.import_module("posttrain.families.rl.parts"), name)
