"""``posttrain.trainers.reward`` is :mod:`posttrain.families.reward.trainer`
(moved by issue #24; kept for existing imports)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("posttrain.families.reward.trainer")
