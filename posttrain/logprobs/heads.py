"""The LM head over gathered rows: per-token log-probs (and entropy), full-vocabulary rows, and a tiled token KL.

Every function here takes the hidden states of the rows to score, ``hidden [N, H]``, and the head's ``weight [V, H]``
(and ``bias [V]`` or None). Rows are the completion positions only (:mod:`posttrain.logprobs.engine` gathers them),
so nothing here ever sees a prompt position. The logits of a row are ``scale * (hidden @ weight.T + bias)`` with
``scale = logit_scale / temperature``.

* :func:`chunked_token_logps`: log p(target) and the entropy per row, ``chunk_rows`` rows at a time: the ``[rows, V]``
  intermediate is bounded by the chunk, and the backward recomputes each chunk's logits instead of keeping them
  (``d log p_y / dz = onehot(y) - p``; ``d H / dz = -p (log p + H)``). Plain matmul + logsumexp: what runs on CPU.
* :func:`tiled_token_kl`: the per-row KL between the policy's and another model's next-token distributions
  (``base_to_policy`` = KL(p_other || p_policy), ``policy_to_base`` = KL(p_policy || p_other); the same quantity as
  :func:`posttrain.losses.sft.token_kl`, docs/methods/asft_anchored.md#kl-direction) with the same chunking, for the
  token-level KL terms of ``asft_anchored`` (arXiv 2509.23753) and ``npo_kl`` / ``ga_kl`` (arXiv 2404.05868) without
  a ``[B, T, V]`` tensor. Gradient ``q - b`` (base_to_policy) or ``q (log q - log b - KL)`` (policy_to_base).
* :func:`full_vocab_logps`: ``log_softmax`` rows ``[N, V]`` for the few positions a method needs whole.

:data:`LOGPROB_HEADS` registers the heads the engine can run (``training.logprob_head``): ``chunked`` (the above),
``fused`` (TRL's fused LM head kernel, ``trl.kernels.ChunkedLogProbFunction``: Triton on CUDA, online logsumexp over
vocabulary tiles) and ``liger`` (liger-kernel's fused linear cross-entropy, CUDA only, an optional extra);
:func:`choose_head` resolves ``auto`` per device and model.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from posttrain.errors import UserError
from posttrain.distributed import gathered
from posttrain.registry import LogprobHeadEntry, Registry

# fp32 elements of one [rows, V] logits chunk (64 MiB): chunk_rows = CHUNK_ELEMENTS // V
CHUNK_ELEMENTS = 1 << 24
FUSED_VOCAB_TILE = 32768  # the vocabulary tile of TRL's fused head (``add_fused_lm_head``'s default)
# Per-row statistics a head can return besides log-probs, never differentiated (TRL's fused-head names): the entropy
# (for logging; a differentiable entropy is ``with_entropy``), the mean logit, whether the target is the first argmax,
# and log(sum_v p_v^2) (WPO's sampled weight alignment).
ROW_STATISTICS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
KL_DIRECTIONS = ("base_to_policy", "policy_to_base")
LIGER_MIN_VERSION = "0.8.2"  # first release whose reduction="none" backward takes per-token upstream gradients


@dataclass(frozen=True)
class LogitTransform:
    """How a model turns ``hidden @ weight.T + bias`` into logits: a multiplier and an optional tanh soft cap
    (Gemma 2's ``final_logit_softcapping``), read from its config by :func:`logit_transform`."""

    scale: float = 1.0
    softcap: float | None = None


def logit_transform(config) -> LogitTransform:
    """The logit multiplier and soft cap of a model config, read as TRL's fused head reads them (``logit_scale``,
    ``output_multiplier``, ``lm_head_multiplier``, or ``1 / logits_scaling``; ``final_logit_softcapping``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, name, None) is not None:
            scale = float(getattr(text, name))
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = float(text.logits_scaling)
        scale = scaling if getattr(text, "model_type", "") == "hyperclovax" else 1.0 / scaling
    softcap = getattr(text, "final_logit_softcapping", None)
    return LogitTransform(1.0 if scale is None else scale, None if softcap is None else float(softcap))


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one ``[rows, V]`` fp32 chunk holds :data:`CHUNK_ELEMENTS` elements."""
    return max(1, CHUNK_ELEMENTS // max(int(vocab), 1))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for a compute dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h, weight, bias, scale: float, dtype) -> torch.Tensor:
    """Logits of one chunk of rows: the matmul in the compute dtype, the rest in fp32 (fp64 for fp64 inputs)."""
    z = (h.to(dtype) @ weight.to(dtype).t()).to(_acc(dtype))
    if bias is not None:
        z += bias.to(z.dtype)
    if scale != 1.0:
        z *= scale
    return z


class _ChunkedLogProbs(torch.autograd.Function):
    """Per-row log p(target) and entropy, chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float, chunk_rows: int, with_entropy: bool,
                statistics: tuple[str, ...]):
        dtype = _compute_dtype(hidden)
        n = hidden.shape[0]
        logps = hidden.new_empty(n, dtype=_acc(dtype))
        log_z = hidden.new_empty(n, dtype=_acc(dtype))
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=_acc(dtype))
        stats = hidden.new_empty(len(statistics), n, dtype=_acc(dtype))
        with gathered(weight, bias):
            for s in range(0, n, chunk_rows):
                e = min(s + chunk_rows, n)
                z = _chunk_logits(hidden[s:e], weight, bias, scale, dtype)
                lse = torch.logsumexp(z, dim=-1)
                log_z[s:e] = lse
                logps[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse
                for k, name in enumerate(statistics):
                    stats[k, s:e] = _row_statistic(name, z, lse, targets[s:e])
                if with_entropy:
                    z.sub_(lse[:, None])  # log p
                    entropy[s:e] = -(z.exp() * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy)
        ctx.scale, ctx.chunk_rows, ctx.dtype = scale, chunk_rows, dtype
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(stats)
        return logps, entropy, stats

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, _grad_stats):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        if grad_entropy is not None and entropy.numel() == 0:
            grad_entropy = None
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None, None, None, None, None
        acc = _acc(ctx.dtype)
        grad_h = torch.zeros_like(hidden, dtype=acc) if want_h else None
        n = hidden.shape[0]
        with gathered(weight, bias):
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
            for s in range(0, n, ctx.chunk_rows):
                e = min(s + ctx.chunk_rows, n)
                g = _chunk_logits(hidden[s:e], weight, bias, ctx.scale, ctx.dtype).sub_(log_z[s:e, None])  # log p
                g_lp = None if grad_logps is None else grad_logps[s:e].to(acc)[:, None]
                if grad_entropy is not None:  # d H / dz = -p (log p + H)
                    p = g.exp()
                    g.add_(entropy[s:e, None]).mul_(p).mul_(-grad_entropy[s:e].to(acc)[:, None])
                    if g_lp is not None:  # d log p_y / dz = onehot(y) - p
                        g.sub_(p.mul_(g_lp))
                        g.scatter_add_(1, targets[s:e, None], g_lp)
                else:
                    g.exp_().mul_(-g_lp)
                    g.scatter_add_(1, targets[s:e, None], g_lp)
                if ctx.scale != 1.0:
                    g.mul_(ctx.scale)
                if want_h:
                    grad_h[s:e] = g.to(ctx.dtype) @ weight.to(ctx.dtype)
                if want_w:
                    grad_w.addmm_(g.t(), hidden[s:e].to(acc))
                if want_b:
                    grad_b += g.sum(0)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None,
        )


def _row_statistic(name: str, z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One of :data:`ROW_STATISTICS` of a chunk of logits ``z [rows, V]`` (``lse``: their logsumexp), as TRL's fused
    head defines it."""
    if name == "entropy":  # H = lse - sum_v p_v z_v
        return lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    if name == "mean_logits":
        return z.mean(-1)
    if name == "is_top1":  # the first maximal logit is the target's (torch.argmax returns the first)
        return (z.argmax(-1) == targets).to(z.dtype)
    if name == "log_sum_sq_probs":  # log sum_v p_v^2 = logsumexp(2 (z - lse))
        return torch.logsumexp(2.0 * (z - lse[:, None]), dim=-1)
    raise ValueError(f"unknown row statistic {name!r}; known: {ROW_STATISTICS}")


def _statistics_dict(statistics: tuple[str, ...], stats: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: (stats[k] > 0.5 if name == "is_top1" else stats[k].float()) for k, name in enumerate(statistics)}


def row_statistics(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   statistics: tuple[str, ...], *, transform: LogitTransform = LogitTransform(),
                   temperature: float = 1.0, chunk_rows: int | None = None) -> dict[str, torch.Tensor]:
    """:data:`ROW_STATISTICS` of the given rows without gradient, chunk by chunk (for a head that does not compute
    them on its way: liger)."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in statistics}
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    with torch.no_grad(), gathered(weight, bias):
        for s in range(0, hidden.shape[0], rows):
            z = _chunk_logits(hidden[s:s + rows], weight, bias, transform.scale, _compute_dtype(hidden))
            if transform.softcap is not None:
                z = transform.softcap * torch.tanh(z / transform.softcap)
            z = z / temperature
            lse = torch.logsumexp(z, dim=-1)
            for name in statistics:
                out[name].append(_row_statistic(name, z, lse, targets[s:s + rows]))
    return {name: (torch.cat(v) if v else hidden.new_zeros(0, dtype=torch.float32)).to(
        torch.bool if name == "is_top1" else torch.float32) for name, v in out.items()}


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        *, scale: float = 1.0, chunk_rows: int | None = None, with_entropy: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log p(targets) [N], entropy [N] or None)`` in fp32 under ``softmax(scale * (hidden @ weight.T + bias))``,
    ``chunk_rows`` rows at a time (default :func:`default_chunk_rows`), differentiable in hidden, weight and bias
    (through both outputs) with the chunk's logits recomputed in the backward. The standard next-token log-likelihood
    of the LM objective (Radford et al. 2018; as a fine-tuning loss, Ouyang et al. 2022, arXiv 2203.02155)."""
    logps, entropy, _ = chunked_token_logps_and_statistics(hidden, weight, bias, targets, scale=scale,
                                                           chunk_rows=chunk_rows, with_entropy=with_entropy)
    return logps, entropy


def chunked_token_logps_and_statistics(hidden, weight, bias, targets, *, scale: float = 1.0,
                                       chunk_rows: int | None = None, with_entropy: bool = False,
                                       statistics: tuple[str, ...] = ()):
    """:func:`chunked_token_logps` plus the requested :data:`ROW_STATISTICS` (a dict, computed from the same chunks
    of logits at no extra matmul; ``is_top1`` boolean, the others fp32)."""
    if hidden.shape[0] == 0:
        zero = hidden.sum(-1).float() + weight.sum() * 0.0  # keeps the (empty) outputs connected to the graph
        empty = {name: zero.detach().to(torch.bool if name == "is_top1" else torch.float32) for name in statistics}
        return zero, (zero if with_entropy else None), empty
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    logps, entropy, stats = _ChunkedLogProbs.apply(hidden, weight, bias, targets, float(scale), int(rows),
                                                   bool(with_entropy), tuple(statistics))
    return logps, (entropy if with_entropy else None), _statistics_dict(tuple(statistics), stats)


class _TiledKL(torch.autograd.Function):
    """Per-row KL between two next-token distributions, chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, other_hidden, other_weight, other_bias, scale: float, other_scale: float,
                chunk_rows: int, policy_first: bool):
        dtype = _compute_dtype(hidden)
        n = hidden.shape[0]
        kl = hidden.new_empty(n, dtype=_acc(dtype))
        with gathered(weight, bias), gathered(other_weight, other_bias), torch.no_grad():
            for s in range(0, n, chunk_rows):
                e = min(s + chunk_rows, n)
                logq = torch.log_softmax(_chunk_logits(hidden[s:e], weight, bias, scale, dtype), -1)
                logb = torch.log_softmax(
                    _chunk_logits(other_hidden[s:e], other_weight, other_bias, other_scale, dtype), -1)
                if policy_first:
                    kl[s:e] = (logq.exp() * (logq - logb)).sum(-1)
                else:
                    kl[s:e] = (logb.exp() * (logb - logq)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, other_hidden, other_weight, other_bias, kl)
        ctx.scales, ctx.chunk_rows, ctx.dtype, ctx.policy_first = (scale, other_scale), chunk_rows, dtype, policy_first
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, other_hidden, other_weight, other_bias, kl = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        scale, other_scale = ctx.scales
        n = hidden.shape[0]
        acc = _acc(ctx.dtype)
        grad_h = torch.zeros_like(hidden, dtype=acc) if want_h else None
        with gathered(weight, bias), gathered(other_weight, other_bias):
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
            for s in range(0, n, ctx.chunk_rows):
                e = min(s + ctx.chunk_rows, n)
                logq = torch.log_softmax(_chunk_logits(hidden[s:e], weight, bias, scale, ctx.dtype), -1)
                logb = torch.log_softmax(
                    _chunk_logits(other_hidden[s:e], other_weight, other_bias, other_scale, ctx.dtype), -1)
                if ctx.policy_first:  # d KL(q||b) / dz = q (log q - log b - KL)
                    q = logq.exp()
                    g = logq.sub_(logb).sub_(kl[s:e, None]).mul_(q)
                else:  # d KL(b||q) / dz = q - b
                    g = logq.exp_().sub_(logb.exp_())
                g.mul_(grad_kl[s:e].to(acc)[:, None] * scale)
                if want_h:
                    grad_h[s:e] = g.to(ctx.dtype) @ weight.to(ctx.dtype)
                if want_w:
                    grad_w.addmm_(g.t(), hidden[s:e].to(acc))
                if want_b:
                    grad_b += g.sum(0)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None, None, None,
        )


def tiled_token_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   other_hidden: torch.Tensor, other_weight: torch.Tensor, other_bias: torch.Tensor | None, *,
                   direction: str = "base_to_policy", scale: float = 1.0, other_scale: float = 1.0,
                   chunk_rows: int | None = None) -> torch.Tensor:
    """Per-row KL ``[N]`` (fp32) between the policy's next-token distribution (``hidden``, ``weight``, ``bias``) and
    another model's (``other_*``, never differentiated), without a ``[N, V]`` tensor beyond one chunk.
    ``base_to_policy``: KL(p_other || p_policy), ``policy_to_base``: KL(p_policy || p_other) -- the per-token KL of
    :func:`posttrain.losses.sft.token_kl` (ASFT, arXiv 2509.23753) and of the NPO retain KL (arXiv 2404.05868)."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; known: {KL_DIRECTIONS}")
    if other_hidden.shape != hidden.shape:
        raise ValueError(f"row shapes differ: {tuple(hidden.shape)} vs {tuple(other_hidden.shape)}")
    if hidden.shape[0] == 0:
        return hidden.sum(-1).float() + weight.sum() * 0.0
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    return _TiledKL.apply(hidden, weight, bias, other_hidden.detach(), other_weight.detach(),
                          None if other_bias is None else other_bias.detach(), float(scale), float(other_scale),
                          int(rows), direction == "policy_to_base")


def full_vocab_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                     transform: LogitTransform = LogitTransform(), temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax`` rows ``[N, V]`` (fp32, differentiable) of the given rows: for the positions a method needs
    whole (e.g. WPO's greedy alignment, arXiv 2406.11827). Soft cap applied as the model does."""
    z = _chunk_logits(hidden, weight, bias, transform.scale, _compute_dtype(hidden))
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    return torch.log_softmax(z / temperature, dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# The heads the engine can run: one entry each, ``fn(hidden, weight, bias, targets, *, transform, temperature,
# chunk_rows, with_entropy, statistics) -> (logps, entropy | None, {statistic: [N]})``; ``unavailable(device,
# transform, with_entropy)`` gives the reason a head cannot run there (None when it can).
# ----------------------------------------------------------------------------------------------------------------------

LOGPROB_HEADS: Registry[LogprobHeadEntry] = Registry("training.logprob_head", LogprobHeadEntry)
HEAD_CHOICES = ("auto",)  # + LOGPROB_HEADS.names(), see head_choices()


def head_choices() -> tuple[str, ...]:
    """The values ``training.logprob_head`` accepts: ``auto`` and every registered head."""
    return HEAD_CHOICES + LOGPROB_HEADS.names()


def _chunked_unavailable(device, transform: LogitTransform, with_entropy: bool) -> str | None:
    if transform.softcap is not None:
        return "the model soft-caps its logits (final_logit_softcapping), which the chunked head does not implement"
    return None


@LOGPROB_HEADS.register("chunked", doc="docs/logprob_engine.md#heads", unavailable=_chunked_unavailable)
def chunked_head(hidden, weight, bias, targets, *, transform: LogitTransform, temperature: float,
                 chunk_rows: int | None, with_entropy: bool, statistics: tuple[str, ...] = ()):
    """:func:`chunked_token_logps` over the completion rows (plain matmul + logsumexp per chunk of rows)."""
    return chunked_token_logps_and_statistics(hidden, weight, bias, targets, scale=transform.scale / temperature,
                                              chunk_rows=chunk_rows, with_entropy=with_entropy, statistics=statistics)


@LOGPROB_HEADS.register("fused", doc="docs/logprob_engine.md#heads", unavailable=lambda *a: None)
def fused_head(hidden, weight, bias, targets, *, transform: LogitTransform, temperature: float,
               chunk_rows: int | None, with_entropy: bool, statistics: tuple[str, ...] = ()):
    """TRL's fused LM head kernel (``trl.kernels.ChunkedLogProbFunction``, what ``add_fused_lm_head`` runs) over the
    completion rows only: Triton on CUDA, its torch fallback elsewhere; online logsumexp over vocabulary tiles."""
    from trl.kernels import ChunkedLogProbFunction

    if hidden.shape[0] == 0:
        return chunked_token_logps_and_statistics(hidden, weight, bias, targets, with_entropy=with_entropy,
                                                  statistics=statistics)
    outputs = ("log_probs", *(("entropy",) if with_entropy or "entropy" in statistics else ()),
               *(name for name in statistics if name != "entropy"))
    with gathered(weight, bias):
        logps, entropy, log_sum_sq, mean_logits, is_top1 = ChunkedLogProbFunction.apply(
            hidden, weight, bias, targets, temperature, FUSED_VOCAB_TILE, transform.softcap, transform.scale,
            outputs)
    got = {"entropy": None if entropy is None else entropy.detach(), "log_sum_sq_probs": log_sum_sq,
           "mean_logits": mean_logits, "is_top1": is_top1}
    stats = {name: got[name] if name == "is_top1" else got[name].float() for name in statistics}
    return logps.float(), (entropy.float() if with_entropy else None), stats


def _liger_unavailable(device, transform: LogitTransform, with_entropy: bool) -> str | None:
    if torch.device(device).type != "cuda":
        return f"liger-kernel runs on CUDA only (this model is on {torch.device(device).type})"
    if importlib.util.find_spec("liger_kernel") is None:
        return f"liger-kernel is not installed (pip install 'liger-kernel>={LIGER_MIN_VERSION}')"
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("liger-kernel")) < Version(LIGER_MIN_VERSION):
        return (f"liger-kernel {version('liger-kernel')} is too old: per-token gradients need >= {LIGER_MIN_VERSION} "
                "(pip install -U liger-kernel)")
    if with_entropy:
        return "liger-kernel's fused cross-entropy gives no entropy; use logprob_head: fused or chunked"
    if transform.scale != 1.0:
        return "the model scales its logits, which liger-kernel's fused cross-entropy does not"
    return None


@LOGPROB_HEADS.register("liger", doc="docs/logprob_engine.md#heads", unavailable=_liger_unavailable)
def liger_head(hidden, weight, bias, targets, *, transform: LogitTransform, temperature: float,
               chunk_rows: int | None, with_entropy: bool, statistics: tuple[str, ...] = ()):
    """liger-kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv 2410.10989), ``reduction="none"``:
    ``log p = -CE`` per row, the temperature folded into the hidden states and the bias (row statistics: one more
    no-grad pass, :func:`row_statistics`)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    with gathered(weight, bias):
        ce = liger_fused_linear_cross_entropy(
            hidden / temperature, weight, targets, None if bias is None else bias / temperature,
            reduction="none", softcap=transform.softcap)
    stats = row_statistics(hidden, weight, bias, targets, statistics, transform=transform, temperature=temperature,
                           chunk_rows=chunk_rows) if statistics else {}
    return -ce.float(), None, stats


def _fused_is_native(device) -> bool:
    """TRL's fused kernel runs as Triton on this device (else its tile-by-tile torch fallback)."""
    from trl.kernels.chunked_logprob import _use_triton

    return _use_triton(torch.device(device))


def choose_head(requested: str, device, transform: LogitTransform, with_entropy: bool) -> tuple[str, str]:
    """``(head, why)`` for ``training.logprob_head: requested`` on ``device``. ``auto``: TRL's fused kernel where it
    runs as Triton (CUDA) or where the model soft-caps its logits, else the chunked head. A head that cannot run
    there is refused with one line naming the key."""
    if requested == "auto":
        if transform.softcap is not None:
            return "fused", "auto: the model soft-caps its logits"
        if _fused_is_native(device):
            return "fused", f"auto: TRL's Triton kernel on {torch.device(device).type}"
        return "chunked", f"auto: plain matmul + logsumexp over completion rows on {torch.device(device).type}"
    if requested not in LOGPROB_HEADS:
        raise UserError(f"training.logprob_head: unknown head {requested!r}; known: {', '.join(head_choices())}")
    reason = LOGPROB_HEADS[requested].unavailable(device, transform, with_entropy)
    if reason is not None:
        raise UserError(f"training.logprob_head: {requested} cannot run here: {reason}")
    return requested, "requested"


def check_head_here(config) -> None:
    """Refuse a training config's ``logprob_head`` that cannot run on this machine (before any model loads; what the
    model's config adds, a soft cap or a logit scale, is checked when it loads)."""
    if config.logprob_head == "auto":
        return
    device = "cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu"
    reason = LOGPROB_HEADS[config.logprob_head].unavailable(device, LogitTransform(), False)
    if reason is not None:
        raise UserError(f"training.logprob_head: {config.logprob_head} cannot run here: {reason}")
