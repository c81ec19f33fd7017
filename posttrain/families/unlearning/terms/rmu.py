"""RMU's forget term (docs/methods/rmu.md#objective): one layer's forget activations steered to the control vector.

RMU's terms work on activations, not log-probs: its objective (:func:`posttrain.losses.unlearning.rmu_loss`, an
entry that ``steers_activations``) calls :func:`~posttrain.losses.unlearning.rmu_activation_loss` for both."""

from posttrain.families.unlearning.objective import FORGET_ACTIVATIONS, FORGET_TERMS
from posttrain.registry import Lazy

FORGET_TERMS.add("rmu", Lazy("posttrain.losses.unlearning:rmu_activation_loss"), doc="docs/methods/rmu.md#objective",
                 needs=frozenset({FORGET_ACTIVATIONS}))
