"""``method.loss``: the clipped surrogate of the selected parts (``grpo``) or a policy loss of its own (``pacs``), one
file each, imported here; a new file needs no edit (docs/contributing.md)."""

from posttrain.families.rl.parts import import_part_modules

import_part_modules(__name__, __path__, ("grpo", "pacs"))
