"""``method.clipping``: one file per clipping rule (options model, pure ``fn(logps, old_logps, advantages, mask,
opts)``, registration), each imported here; a new file needs no edit (docs/contributing.md)."""

from posttrain.families.rl.parts import import_part_modules

import_part_modules(__name__, __path__, ("ppo", "gppo", "gspo", "cispo"))
