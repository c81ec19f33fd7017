"""Moved to :mod:`posttrain.families.rl.aggregations` (issue #24): one file per aggregation, registered in
:data:`posttrain.families.rl.parts.AGGREGATIONS`. This alias keeps ``AGGREGATIONS`` importable from the old path; it
forwards on first use (no import at load, so the lower layer does not import the family)."""

import importlib


def __getattr__(name: str):
    return getattr(importlib.import_module("posttrain.families.rl.parts"), name)
