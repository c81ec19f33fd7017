"""The RL family (docs/rlvr.md): RLVR on TRL's ``GRPOTrainer`` with selectable parts.

``parts.py`` holds the four part registries; ``advantages/``, ``aggregations/``, ``clippings/`` and
``policy_losses/`` hold one file per registered part (its options model, pure math and registration), all imported
here so that importing anything of the family registers every part; ``common.py`` the types and group statistics the
parts share; ``trainer.py`` the trainer (:class:`~posttrain.families.rl.trainer.PosttrainGRPOTrainer`) and the
family's builders; ``diagnostics.py`` the learning-signal monitor. Nothing here imports torch at module level except
``common.py``, ``trainer.py`` and ``diagnostics.py``, which the part files import inside their functions."""

import posttrain.families.rl.advantages  # noqa: F401  (registers the parts)
import posttrain.families.rl.aggregations  # noqa: F401
import posttrain.families.rl.clippings  # noqa: F401
import posttrain.families.rl.policy_losses  # noqa: F401
