"""``posttrain.trainers.sft`` is :mod:`posttrain.families.sft.trainer`
(moved by issue #24; kept for existing imports)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("posttrain.families.sft.trainer")
