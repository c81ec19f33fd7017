"""``posttrain.train`` is :mod:`posttrain.run.pipeline` (kept for existing imports and monkeypatches)."""

import sys

from posttrain.run import pipeline

sys.modules[__name__] = pipeline
