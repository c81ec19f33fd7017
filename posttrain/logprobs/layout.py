"""Shared-prompt layout: rows that start with the same tokens (a preference pair, a GRPO group) become one packed row
``[prefix; continuation_1; ...; continuation_k]`` whose attention mask keeps each continuation blind to the others.

Prefix sharing for paired preference data (Wang & Hegde 2024, arXiv 2410.20305) and the shared-prefix forward of GRPO
groups (Prefix Grouper, Liu et al. 2025, arXiv 2506.05433): every token of continuation ``k`` sees the prefix and the
earlier tokens of its own continuation, exactly the tokens it sees in its own unshared row, and its position id is its
index in that row (the continuation restarts where the prefix ends). So the hidden state of every token equals the
unshared one, and so do all log-probs, losses and gradients (the prefix's gradient is the sum of what each row gave it).

The prefix of a group is the longest run of tokens its rows share from their first real token, cut at the first
completion token of any row (a completion token is always in a continuation, predicted from its own row). Padding
(either side) and rows whose prompts differ need nothing special: a group whose rows share nothing packs them side by
side, still exact. Pure tensor code: the caller (:mod:`posttrain.logprobs.engine`) runs the model on the packed rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFIX, PAD = 0, -1  # segment ids; continuation k of a packed row has segment k (1-based)


@dataclass
class SharedLayout:
    """Packed rows and where every original token went.

    ``input_ids``, ``position_ids``, ``segments``: ``[R, L]`` (one packed row per group, right-padded; segment
    :data:`PREFIX` for the shared prefix, ``k`` for continuation ``k``, :data:`PAD` for padding). ``index``: ``[B, T]``,
    the flat position ``r * L + l`` of original token ``(b, t)`` in the packed rows (-1 where ``attention_mask`` is 0).
    ``prefix_lengths``: ``[R]`` tokens shared per group.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    index: torch.Tensor
    prefix_lengths: torch.Tensor

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens in the packed rows: what the body computes."""
        return int((self.segments != PAD).sum())


def _group_order(groups: list) -> list[list[int]]:
    """Row indices per group, groups in order of first appearance, rows in batch order."""
    order: dict = {}
    for row, g in enumerate(groups):
        order.setdefault(g, []).append(row)
    return list(order.values())


def shared_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                  groups, pad_token_id: int = 0) -> SharedLayout:
    """Pack the rows of each group (``groups[b]``: any hashable group id per row) around their shared prefix; see
    the module docstring. Real tokens of a row are those with ``attention_mask`` 1 (left or right padding)."""
    batch, width = input_ids.shape
    groups = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    if len(groups) != batch:
        raise ValueError(f"{len(groups)} group ids for {batch} rows")
    ids_list = input_ids.tolist()
    real = attention_mask.bool().tolist()
    comp = completion_mask.bool().tolist()
    positions = [[t for t in range(width) if real[b][t]] for b in range(batch)]  # real token columns per row
    tokens = [[ids_list[b][t] for t in positions[b]] for b in range(batch)]

    packed_ids, packed_pos, packed_seg, prefix_lengths = [], [], [], []
    index = [[-1] * width for _ in range(batch)]
    for r, rows in enumerate(_group_order(groups)):
        first_completion = min((j for b in rows for j, t in enumerate(positions[b]) if comp[b][t]),
                               default=min(len(tokens[b]) for b in rows))
        p = 0
        while p < first_completion and all(p < len(tokens[b]) for b in rows) and len(
                {tokens[b][p] for b in rows}) == 1:
            p += 1
        ids, pos, seg = list(tokens[rows[0]][:p]), list(range(p)), [PREFIX] * p
        for k, b in enumerate(rows, start=1):
            for j, t in enumerate(positions[b]):
                if j < p:  # the shared prefix: slot j of the packed row
                    index[b][t] = (r, j)
                else:
                    index[b][t] = (r, len(ids))
                    ids.append(tokens[b][j])
                    pos.append(j)
                    seg.append(k)
        packed_ids.append(ids)
        packed_pos.append(pos)
        packed_seg.append(seg)
        prefix_lengths.append(p)

    length = max(len(x) for x in packed_ids)
    flat = [[-1 if not isinstance(x, tuple) else x[0] * length + x[1] for x in row] for row in index]
    device = input_ids.device

    def padded(rows, fill):
        return torch.tensor([x + [fill] * (length - len(x)) for x in rows], dtype=torch.long, device=device)

    return SharedLayout(padded(packed_ids, pad_token_id), padded(packed_pos, 0), padded(packed_seg, PAD),
                        torch.tensor(flat, dtype=torch.long, device=device),
                        torch.tensor(prefix_lengths, dtype=torch.long, device=device))


def block_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[R, 1, L, L]`` boolean attention mask (True = may attend) of packed rows: query ``i`` sees key ``j <= i``
    when ``j`` is in the prefix or in the same continuation as ``i``; a padding position sees only itself (no row
    is fully masked, which would give NaN in SDPA)."""
    length = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (q != PAD) & (k != PAD) & ((k == PREFIX) | (k == q))
    eye = torch.eye(length, dtype=torch.bool, device=segments.device)
    allowed = allowed | (eye & (q == PAD))
    return allowed[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as an additive float mask (0 where allowed, the dtype's minimum elsewhere): what eager
    attention adds to its scores."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
