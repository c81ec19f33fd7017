"""``method.advantage``: one file per estimator (options model, pure ``fn(rewards, groups, opts)``, registration),
each imported here; a new file needs no edit (docs/contributing.md)."""

from posttrain.families.rl.parts import import_part_modules

import_part_modules(__name__, __path__, ("group", "stratified", "psr", "nsr", "w_reinforce", "rloo", "reinforce_pp",
                                         "spo"))
