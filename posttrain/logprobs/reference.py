"""The reference computed once: the frozen reference model's completion log-probs for a whole tokenised dataset,
before training, cached on disk so that a rerun skips the pass.

When the reference is frozen and the data fixed (DPO-family and unlearning references, the SFT anchor), the reference
forward of every step recomputes numbers that never change. :func:`precompute_reference_logps` runs it once over the
dataset through the engine (no gradient, completion rows only, shared prompts for pairs and groups) and keeps, per
row, the log-prob of each completion token (so sequence sums, means and token-level terms can all be read from it).
The cache file is named by a SHA-256 over the model's fingerprint (:func:`weights_fingerprint`: config and every
weight byte), the tokenised rows, their grouping, the chat template and the engine's temperature: any change in
those recomputes, anything else reuses. :func:`precomputed_reference` is the trainers' entry (the ReferencePlan's
``precomputed`` kind, ``method.precompute_ref_log_probs``): KTO and the unlearning family use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("posttrain")
CACHE_FORMAT = 1


@dataclass
class ReferenceLogps:
    """Per row, the reference log-prob of each of its completion tokens (``token_logps[i]``: ``[n_i]`` fp32)."""

    token_logps: list[torch.Tensor]

    def sums(self) -> torch.Tensor:
        """Sequence log-prob per row ``[n]``."""
        return torch.stack([x.sum() for x in self.token_logps]) if self.token_logps else torch.zeros(0)

    def counts(self) -> torch.Tensor:
        """Completion tokens per row ``[n]``."""
        return torch.tensor([x.numel() for x in self.token_logps], dtype=torch.long)


def weights_fingerprint(model) -> str:
    """SHA-256 of the model's config and of every parameter and buffer (name, dtype, shape, bytes), in order. A
    sharded parameter (ZeRO-3 partition, FSDP2 DTensor) is read whole: every process must call this together."""
    from posttrain.distributed import full_weight, gathered
    from posttrain.logprobs.engine import causal_lm

    lm = causal_lm(model)
    digest = hashlib.sha256(lm.config.to_json_string(use_diff=False).encode())
    for name, tensor in [*lm.named_parameters(), *lm.named_buffers()]:
        with gathered(tensor):
            data = full_weight(tensor).detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cache_key(model_fingerprint: str, rows: Sequence[dict], groups: Sequence | None, template: str | None,
              temperature: float) -> str:
    """The cache key: SHA-256 over the model fingerprint, the tokenised rows (``input_ids`` and
    ``completion_mask``), their groups, the chat template and the temperature."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "model": model_fingerprint,
                                        "template": template, "temperature": temperature}).encode())
    for row in rows:
        digest.update(json.dumps([list(row["input_ids"]), list(row["completion_mask"])]).encode())
    digest.update(json.dumps(None if groups is None else [str(g) for g in groups]).encode())
    return digest.hexdigest()


def _batches(n: int, groups: Sequence | None, batch_size: int) -> list[list[int]]:
    """Row indices per batch: whole groups (rows with the same id), about ``batch_size`` rows each."""
    members: dict = {}
    for i in range(n):
        members.setdefault(i if groups is None else groups[i], []).append(i)
    batches, current = [], []
    for rows in members.values():
        if current and len(current) + len(rows) > batch_size:
            batches.append(current)
            current = []
        current = current + rows
    return batches + ([current] if current else [])


@torch.no_grad()
def _compute(model, rows, groups, engine, batch_size: int, pad_token_id: int) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(rows)
    device = next(model.parameters()).device
    for batch in _batches(len(rows), groups, batch_size):
        width = max(len(rows[i]["input_ids"]) for i in batch)
        ids = torch.tensor([list(rows[i]["input_ids"]) + [pad_token_id] * (width - len(rows[i]["input_ids"]))
                            for i in batch], device=device)
        attn = torch.tensor([[1] * len(rows[i]["input_ids"]) + [0] * (width - len(rows[i]["input_ids"]))
                             for i in batch], device=device)
        comp = torch.tensor([list(rows[i]["completion_mask"]) + [0] * (width - len(rows[i]["completion_mask"]))
                             for i in batch], device=device)
        result = engine.forward(model, ids, attn, comp, groups=None if groups is None else [groups[i] for i in batch])
        for j, i in enumerate(batch):
            out[i] = result.logps[j][result.mask[j]].float().cpu()
    return out


def precompute_reference_logps(model, rows: Sequence[dict], *, cache_dir, model_fingerprint: str | None = None,
                               template: str | None = None, groups: Sequence | None = None, engine=None,
                               batch_size: int = 8, pad_token_id: int = 0, is_main: bool = True,
                               barrier: Callable[[], None] | None = None) -> tuple[ReferenceLogps, bool]:
    """``(reference log-probs of every row, whether they came from the cache)``.

    ``rows``: tokenised rows, each ``{"input_ids": [...], "completion_mask": [...]}`` (same length; 1 on the tokens
    to score). ``groups``: a group id per row for shared prompts (the two rows of a pair), kept whole in a batch.
    ``model_fingerprint``: identifies the weights (default :func:`weights_fingerprint`, which reads every weight
    once). ``template``: the chat template the rows were formatted with. ``engine``: a
    :class:`~posttrain.logprobs.engine.LogProbEngine` (default: ``auto`` head, shared prompts). The file
    ``cache_dir/reference-<key>.safetensors`` is written atomically.

    Several processes (``is_main``: this one writes the file; ``barrier``: waits for all) call this together: every
    one looks for the file before any writes it, so all of them compute (a sharded model's forward needs every
    process) or all read.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from posttrain.logprobs.engine import LogProbEngine

    engine = engine or LogProbEngine()
    if groups is not None and len(groups) != len(rows):
        raise ValueError(f"{len(groups)} group ids for {len(rows)} rows")
    for i, row in enumerate(rows):
        if len(row["input_ids"]) != len(row["completion_mask"]):
            raise ValueError(f"row {i}: input_ids and completion_mask differ in length")
    fingerprint = model_fingerprint or weights_fingerprint(model)
    key = cache_key(fingerprint, rows, groups, template, engine.temperature)
    path = Path(cache_dir) / f"reference-{key[:32]}.safetensors"
    found = None
    if path.is_file():
        with safe_open(str(path), "pt") as cached:
            if (cached.metadata() or {}).get("key") == key:
                flat, offsets = cached.get_tensor("logps"), cached.get_tensor("offsets").tolist()
                found = ReferenceLogps([flat[offsets[i]:offsets[i + 1]] for i in range(len(rows))])
    if barrier is not None:
        barrier()
    if found is not None:
        logger.info("reference log-probs of %d rows read from %s", len(rows), path)
        return found, True
    token_logps = _compute(model, rows, groups, engine, batch_size, pad_token_id)
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        offsets = torch.tensor([0] + [x.numel() for x in token_logps], dtype=torch.long).cumsum(0)
        flat = torch.cat(token_logps) if token_logps else torch.zeros(0)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({"logps": flat.contiguous(), "offsets": offsets}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
        logger.info("reference log-probs of %d rows computed once and cached in %s", len(rows), path)
    if barrier is not None:
        barrier()
    return ReferenceLogps(token_logps), False


def reference_cache_dir() -> Path:
    """Where the trainers' precomputed references are cached: ``$POSTTRAIN_REFERENCE_CACHE``, else
    ``$POSTTRAIN_CACHE/reference``."""
    from posttrain.builtin import cache_dir

    own = os.environ.get("POSTTRAIN_REFERENCE_CACHE")
    return Path(own).expanduser() if own else cache_dir() / "reference"


def precomputed_reference(reference, policy, rows: Sequence[dict], *, accelerator, engine, template: str | None,
                          groups: Sequence | None = None, batch_size: int = 8, pad_token_id: int = 0,
                          cache_dir=None) -> ReferenceLogps:
    """A trainer's precomputed reference (``ReferencePlan.precomputed``, the recipe's
    ``method.precompute_ref_log_probs``): :func:`precompute_reference_logps` of ``rows`` under ``reference`` (a
    :class:`posttrain.reference.Reference`: the frozen model, or ``policy`` with its adapter disabled), on every
    process of ``accelerator``, cached in :func:`reference_cache_dir` (``cache_dir`` overrides) so that a rerun on
    the same model, data and chat template reads the file instead."""
    with reference.network(policy) as network:
        logps, _ = precompute_reference_logps(
            network, rows, cache_dir=cache_dir or reference_cache_dir(), template=template, groups=groups,
            engine=engine, batch_size=batch_size, pad_token_id=pad_token_id, is_main=accelerator.is_main_process,
            barrier=accelerator.wait_for_everyone)
    return logps
