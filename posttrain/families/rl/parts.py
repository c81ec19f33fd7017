"""The RL family's selectable parts: one registry per recipe key, one file per part, importable without torch.

``method.advantage`` (:data:`ADVANTAGES`, files in ``advantages/``), ``method.aggregation`` (:data:`AGGREGATIONS`,
``aggregations/``), ``method.clipping`` (:data:`CLIPPINGS`, ``clippings/``) and ``method.loss`` (:data:`POLICY_LOSSES`,
``policy_losses/``: the clipped surrogate built from the three, or PACS). Each part file holds the pydantic model of
the method keys the part owns (a :class:`PartOptions`), its pure math and its registration; ``GRPOParams``
(:mod:`posttrain.methods`) is assembled from the options models. Every module of the four packages is imported when
this family's package is (``posttrain/families/rl/__init__.py``), so a new part is one new file. A part file keeps
torch out of module level (its functions import it), so that the recipe schema imports no torch.

One signature per kind (``opts``: the method's params, which hold every selected part's keys):

* advantage: ``fn(rewards, groups, opts) -> AdvantageOutput`` (``groups``: :class:`~posttrain.families.rl.common.Groups`);
* aggregation: ``fn(per_token_loss, mask, normalizer) -> scalar`` (``normalizer``:
  :class:`~posttrain.families.rl.common.Normalizer`);
* clipping: ``fn(logps, old_logps, advantages, mask, opts) -> ClipOutput``;
* policy loss: ``fn(fwd, opts) -> (loss, metrics)`` over the training forward (``fwd``:
  :class:`~posttrain.families.rl.forward.RLForward`, filled with what the entry's ``needs(opts)`` declares); the
  clipped surrogate (``grpo``) calls the three kinds above.

Pages: docs/methods/grpo_advantages.md, grpo_aggregation.md, grpo_clipping.md, pacs.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from posttrain.registry import AdvantageEntry, AggregationEntry, ClippingEntry, PolicyLossEntry, Registry


class PartOptions(BaseModel):
    """The method keys one part reads (strict, as every method key: no coercion, no NaN or infinities)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


ADVANTAGES: Registry[AdvantageEntry] = Registry("advantage estimator", AdvantageEntry)
"""``method.advantage`` -> :class:`posttrain.registry.AdvantageEntry` (its fields say what each one needs)."""

AGGREGATIONS: Registry[AggregationEntry] = Registry("loss aggregation", AggregationEntry)
"""``method.aggregation`` -> :class:`posttrain.registry.AggregationEntry`."""

CLIPPINGS: Registry[ClippingEntry] = Registry("clipping rule", ClippingEntry)
"""``method.clipping`` -> :class:`posttrain.registry.ClippingEntry`."""

POLICY_LOSSES: Registry[PolicyLossEntry] = Registry("policy loss", PolicyLossEntry)
"""``method.loss`` -> :class:`posttrain.registry.PolicyLossEntry`."""

# (recipe key, registry) of the surrogate's parts, in the order GRPOParams lists them
SURROGATE_PARTS: tuple[tuple[str, Registry], ...] = (
    ("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS), ("clipping", CLIPPINGS))


def import_part_modules(package: str, path: Iterable[str], listed_first: tuple[str, ...] = ()) -> None:
    """Import (and so register) every module of a part package: those of ``listed_first`` first, in that order (the
    order `posttrain methods` and the schema list the shipped parts in), then any other, alphabetically. A new part
    needs no edit here."""
    names = sorted(m.name for m in pkgutil.iter_modules(path))
    for name in [*[n for n in listed_first if n in names], *[n for n in names if n not in listed_first]]:
        importlib.import_module(f"{package}.{name}")
