"""Moved to :mod:`posttrain.families.rl.clippings` (issue #24): one file per clipping rule, registered in
:data:`posttrain.families.rl.parts.CLIPPINGS`. This alias keeps ``CLIPPINGS`` importable from the old path; it
forwards on first use (no import at load, so the lower layer does not import the family)."""

import importlib


def __getattr__(name: str):
    return getattr(importlib.import_module("posttrain.families.rl.parts"), name)
