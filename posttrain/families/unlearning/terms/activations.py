"""RMU's retain term (docs/methods/rmu.md#objective): one layer's retain activations kept equal to the frozen model's
(so it compares with a reference)."""

from posttrain.families.unlearning.objective import RETAIN_ACTIVATIONS, RETAIN_TERMS
from posttrain.registry import Lazy

RETAIN_TERMS.add("activations", Lazy("posttrain.losses.unlearning:rmu_activation_loss"),
                 doc="docs/methods/rmu.md#objective", needs=frozenset({RETAIN_ACTIVATIONS}))
