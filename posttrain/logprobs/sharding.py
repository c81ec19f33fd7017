"""Direct access to a sharded LM head from inside the model's forward (the engine reads ``lm_head.weight`` itself).

The same two helpers, with the same names and meaning, as ``posttrain.distributed`` on the multi-process branch
(issue #22); once that module is in main, this one becomes ``from posttrain.distributed import full_weight, gathered``.

* :func:`full_weight`: an FSDP2 DTensor parameter as the whole tensor (all-gathered with autograd, its gradient flows
  back to the shard); any other tensor unchanged. Inside the root module's forward FSDP2 has already unsharded it.
* :func:`gathered`: DeepSpeed ZeRO-3 partitioned parameters gathered for the duration of the block (TRL's
  ``maybe_gather_lm_head_ctx``, the helper its fused head uses in its forward and again in its backward); a no-op
  for parameters that are not partitioned or already available.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a parameter that FSDP2 shards (a DTensor, gathered with autograd); others unchanged."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def gathered(*params):
    """ZeRO-3: the given parameters gathered for the duration of the block; a null context elsewhere."""
    if not any(getattr(p, "ds_id", None) is not None for p in params if p is not None):
        return nullcontext()
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(*params)
