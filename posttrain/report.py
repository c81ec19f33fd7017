"""``posttrain.report`` is :mod:`posttrain.run.report` (kept for existing imports and monkeypatches)."""

import sys

from posttrain.run import report

sys.modules[__name__] = report
