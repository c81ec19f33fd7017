"""``method.aggregation``: one file per aggregation (pure ``fn(per_token_loss, mask, normalizer)``, registration),
each imported here; a new file needs no edit (docs/contributing.md)."""

from posttrain.families.rl.parts import import_part_modules

import_part_modules(__name__, __path__, ("grpo", "bnpo", "dr_grpo", "dapo", "delta_l"))
