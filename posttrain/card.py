"""``posttrain.card`` is :mod:`posttrain.run.card` (kept for existing imports and monkeypatches)."""

import sys

from posttrain.run import card

sys.modules[__name__] = card
