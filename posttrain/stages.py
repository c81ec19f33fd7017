"""``posttrain.stages`` is :mod:`posttrain.run.stages` (kept for existing imports and monkeypatches)."""

import sys

from posttrain.run import stages

sys.modules[__name__] = stages
