"""Stable-SPAM: AdamW with per-tensor gradient conditioning (AdaClip, AdaGN) and periodic momentum reset (MoRet).

Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam" (arXiv 2502.17055); the method page
is docs/methods/stable_spam.md. Per parameter tensor with gradient ``G``, at global step ``t`` (``step()`` calls):

1. decoupled weight decay ``p <- p (1 - lr wd)``;
2. AdaClip: ``M <- theta M + (1 - theta) max|G|``, ``T = M / (1 - theta^t)``; entries with ``|G| > T`` become
   ``G T / max|G|`` (the largest becomes exactly ``+-T``);
3. AdaGN: ``n = ||G||``, ``mu <- g1 mu + (1 - g1) n``, ``nu <- gamma2 nu + (1 - gamma2) n^2`` with ``g1 = gamma1 s_t``;
   ``c = mu_hat / (sqrt(nu_hat) + eps)`` (bias-corrected with ``t``), ``G <- G c / n`` when ``n > 0``;
4. MoRet: every ``update_proj_gap`` steps the Adam moments and the Adam counter ``k`` are zeroed, before this step's
   update;
5. Adam with ``beta1' = beta1 s_t`` and bias corrections for ``k``.

``s_t`` is 1 unless ``total_T`` is set: ``eta_min + (1 - eta_min) (1 + cos(pi min(t, T+1) / (T+1))) / 2``.

The global step is kept in every param group (``"global_step"``), so ``state_dict()`` / ``load_state_dict()``
continue a run bit-identically. ``reference_quirks=True`` reproduces the official code instead (one per-tensor
counter for every bias correction, MoRet one step late, the global step not saved, the gradient clipped in place
in ``p.grad``, the cosine factor rising again after ``T + 1``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

_FP32_STATE = ("max_ema", "norm_ema", "sqnorm_ema")  # kept in fp32 (fp64 for fp64 parameters), never bf16/fp16


def _stat_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


class _StepHyper(NamedTuple):
    """A param group's per-step quantities: global step, ``gamma1 s_t``, ``beta1 s_t``, whether MoRet fires."""

    t: int
    g1: float
    b1: float
    reset: bool


_CHUNK_NUMEL = 1 << 24  # elements of the tensors stepped together (more when one tensor is larger)


def _chunks(tensors: list[torch.Tensor], cap: int) -> list[list[int]]:
    """Indices of ``tensors`` in consecutive runs of at most ``cap`` elements (a larger tensor alone)."""
    runs: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        if runs[-1] and size + t.numel() > cap:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += t.numel()
    return runs


class _Scratch:
    """Uninitialised buffers of ``cap`` elements (the largest chunk), one per role, allocated on first use and reused by every chunk of a
    bucket: a step touches one chunk-sized buffer per role instead of a new tensor per pass and tensor."""

    def __init__(self, cap: int, device: torch.device):
        self.cap, self.device, self.flat = cap, device, {}

    def views(self, role: str, like: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        if role not in self.flat:
            self.flat[role] = torch.empty(self.cap, dtype=dtype, device=self.device)
        sizes = [t.numel() for t in like]
        parts = self.flat[role][:sum(sizes)].split(sizes)
        return [part.view_as(t) for part, t in zip(parts, like)]


def _foreach_scalar_(op: str, tensors: list[torch.Tensor], scalar: float) -> None:
    """``torch._foreach_<op>_(tensors, scalar)``; bf16/fp16 tensors one by one (``t.<op>_(scalar)``): torch's CPU
    foreach op rounds the scalar to the tensors' dtype first (bf16(0.999) is 1), the per-tensor op computes in fp32."""
    if tensors and tensors[0].dtype in (torch.bfloat16, torch.float16):
        for t in tensors:
            getattr(t, f"{op}_")(scalar)
    else:
        getattr(torch, f"_foreach_{op}_")(tensors, scalar)


def _stacked(states: list[dict[str, Any]], key: str) -> torch.Tensor:
    return torch.stack([state[key] for state in states])


def _one_minus_pow(base: float, exponents: list[int], like: torch.Tensor) -> float | torch.Tensor:
    """``1 - base^k`` for each tensor's bias-correction step ``k``: a Python float when they agree (the op is then the
    loop's tensor-by-scalar division), else a vector in ``like``'s dtype (the same float values)."""
    if len(set(exponents)) == 1:
        return 1 - base ** exponents[0]
    return torch.tensor([1 - base**k for k in exponents], dtype=like.dtype, device=like.device)


def cosine_factor(t: int, total_T: int | None, eta_min: float, rising: bool = False) -> float:
    """``s_t``: 1 without ``total_T``; else the closed form of ``CosineAnnealingLR(T_max=total_T + 1)`` from 1 to
    ``eta_min``, held at ``eta_min`` after ``total_T + 1`` (``rising=True``: the reference's factor, which rises
    again)."""
    if total_T is None:
        return 1.0
    period = total_T + 1
    phase = t if rising else min(t, period)
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * phase / period)) / 2.0


class StableSPAM(torch.optim.Optimizer):
    """Stable-SPAM (see the module docstring and docs/methods/stable_spam.md).

    Defaults are the reference code's: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, gamma1=0.7,
    gamma2=0.9, theta=0.999, update_proj_gap=1000`` (0 disables MoRet), ``total_T=None``, ``eta_min=0.5``.
    ``gamma1=-1`` means "use beta1". After each ``step()``, :attr:`last_metrics` holds ``clip_frac`` (fraction of
    gradient entries AdaClip rescaled), ``gn_scale_mean`` (mean ``c / n`` over tensors), ``moret_reset`` and
    ``beta1_eff``.

    ``foreach=True`` (default) steps each param group's tensors together (``torch._foreach_*`` ops, the per-tensor
    statistics as one vector, one scratch buffer instead of a new tensor per pass); ``foreach=False`` is the
    per-tensor loop, the reference: on CPU both give the same bits (tests/optim/test_stable_spam_foreach.py).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, gamma1: float = 0.7, gamma2: float = 0.9, theta: float = 0.999,
                 update_proj_gap: int = 1000, total_T: int | None = None, eta_min: float = 0.5,
                 reference_quirks: bool = False, foreach: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if gamma1 == -1:
            gamma1 = betas[0]
        for name, value in (("gamma1", gamma1), ("gamma2", gamma2), ("theta", theta)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
        if update_proj_gap < 0:
            raise ValueError("update_proj_gap must be >= 0 (0 disables the momentum reset)")
        if total_T is not None and total_T < 1:
            raise ValueError("total_T must be >= 1 or None")
        if not 0.0 <= eta_min <= 1.0:
            raise ValueError("eta_min must lie in [0, 1]")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, gamma1=gamma1, gamma2=gamma2,
                        theta=theta, update_proj_gap=update_proj_gap, total_T=total_T, eta_min=eta_min, global_step=0)
        super().__init__(params, defaults)
        self.reference_quirks = reference_quirks
        self.foreach = foreach
        self._total_steps = 0  # quirks mode: the reference's attribute, not part of state_dict
        self._last = None

    # ----------------------------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the AdaClip/AdaGN statistics stay fp32 (torch would cast them to the parameter dtype)."""
        saved = {idx: {k: v.detach().clone() for k, v in s.items() if k in _FP32_STATE}
                 for idx, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for idx, values in saved.items():
            param = params[int(idx)]
            for key, value in values.items():
                self.state[param][key] = value.to(device=param.device, dtype=_stat_dtype(param))

    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        quirks = self.reference_quirks
        if quirks:
            self._total_steps += 1
        clipped: list[torch.Tensor] = []
        total = 0
        scales: list[torch.Tensor] = []
        reset = False
        beta1_eff = None
        for group in self.param_groups:
            if quirks:
                t = self._total_steps
            else:
                group["global_step"] += 1
                t = group["global_step"]
            s = cosine_factor(t, group["total_T"], group["eta_min"], rising=quirks)
            hp = _StepHyper(t=t, g1=group["gamma1"] * s, b1=group["betas"][0] * s,
                            reset=group["update_proj_gap"] > 0 and t % group["update_proj_gap"] == 0)
            beta1_eff = hp.b1
            reset = reset or hp.reset
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse or p.grad.is_complex():
                    raise RuntimeError("StableSPAM: sparse or complex gradients are not supported")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    for key in _FP32_STATE:
                        state[key] = torch.zeros((), dtype=_stat_dtype(p), device=p.device)
                if quirks:
                    state["step"] += 1  # (a): one counter for every bias correction
                total += p.numel()
            group_step = self._group_foreach if self.foreach else self._group_loop
            counts, group_scales = group_step(group, params, hp)
            clipped += counts
            scales += group_scales
        self._last = (clipped, total, scales, reset, beta1_eff)
        return loss

    def _bias_t(self, p: torch.Tensor, t: int) -> int:
        """The step count of the AdaClip/AdaGN bias corrections: the global step (quirks: the tensor's counter)."""
        return self.state[p]["step"] if self.reference_quirks else t

    def _group_loop(self, group, params, hp: _StepHyper) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One param group, tensor by tensor (``foreach=False``; the reference of :meth:`_group_foreach`)."""
        quirks = self.reference_quirks
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta2 = group["betas"][1]
        theta, gamma2 = group["theta"], group["gamma2"]
        g1, b1 = hp.g1, hp.b1
        counts, scales = [], []
        for p in params:
            state = self.state[p]
            bc_t = self._bias_t(p, hp.t)
            # 1. decoupled weight decay
            if wd != 0:
                p.mul_(1 - lr * wd)
            # 2. AdaClip (fp32 statistics)
            grad = p.grad.to(_stat_dtype(p))  # never modified in place: p.grad keeps the raw gradient (default)
            magnitude = grad.abs()
            gmax = magnitude.max()
            state["max_ema"].mul_(theta).add_((1 - theta) * gmax)
            thresh = state["max_ema"] / (1 - theta**bc_t)
            over = magnitude > thresh
            del magnitude
            counts.append(torch.count_nonzero(over))  # (a bool .sum() would copy the mask to int64 first)
            grad = torch.where(over, grad * (thresh / gmax), grad)
            # 3. AdaGN
            norm = torch.linalg.vector_norm(grad)
            state["norm_ema"].mul_(g1).add_((1 - g1) * norm)
            state["sqnorm_ema"].mul_(gamma2).add_((1 - gamma2) * norm * norm)
            mu_hat = state["norm_ema"] / (1 - g1**bc_t)
            nu_hat = state["sqnorm_ema"] / (1 - gamma2**bc_t)
            c = mu_hat / (nu_hat.sqrt() + eps)
            scale = torch.where(norm > 0, c / torch.where(norm > 0, norm, torch.ones_like(norm)),
                                torch.ones_like(norm))
            scales.append(scale)
            grad.mul_(scale)  # grad is torch.where's new tensor here: p.grad is untouched
            if quirks:
                p.grad.copy_(grad)  # (d): the reference conditions p.grad in place
            grad = grad.to(p.dtype)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            # 4. MoRet
            if hp.reset:
                if quirks:  # (b): new tensors are bound, this step still uses the old ones with k = 1
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] = 1
                else:
                    exp_avg.zero_()
                    exp_avg_sq.zero_()
                    state["step"] = 0
            # 5. Adam
            if not quirks:
                state["step"] += 1
            k = state["step"]
            exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = 1 - b1**k
            bias2 = 1 - beta2**k
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias1)
        return counts, scales

    def _group_foreach(self, group, params, hp: _StepHyper) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One param group, its tensors together: the same operations as :meth:`_group_loop` in the same order on
        every element, so the same bits on CPU (on CUDA, torch's multi-tensor kernels may round the norms and the
        scalar divisions differently by an ulp). Per (device, dtype) bucket, in chunks of about ``_CHUNK_NUMEL``
        elements: the per-tensor scalars (gradient max, threshold, norm, EMAs, scale) are one vector each; the
        conditioned gradient and Adam's denominator share one chunk-sized scratch buffer, reused by every chunk, so a
        step allocates one buffer instead of a new tensor per pass and tensor."""
        counts: list[torch.Tensor | None] = [None] * len(params)
        scales: list[torch.Tensor | None] = [None] * len(params)
        buckets = Optimizer._group_tensors_by_device_and_dtype([params], with_indices=True)
        for (device, dtype), ((bucket,), bucket_indices) in buckets.items():
            cap = max(_CHUNK_NUMEL, max(p.numel() for p in bucket))
            scratch = _Scratch(min(cap, sum(p.numel() for p in bucket)), device)
            for run in _chunks(bucket, cap):
                ps, indices = [bucket[i] for i in run], [bucket_indices[i] for i in run]
                self._chunk_foreach(group, hp, ps, indices, dtype, scratch, counts, scales)
        return counts, scales

    def _chunk_foreach(self, group, hp: _StepHyper, ps: list[torch.Tensor], indices: list[int], dtype: torch.dtype,
                       scratch: _Scratch, counts: list, scales: list) -> None:
        """Steps ``ps`` (one device and dtype; at most a chunk of elements) together; ``counts`` / ``scales`` get
        their clipped-entry counts and AdaGN scales at ``indices``."""
        quirks = self.reference_quirks
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta2 = group["betas"][1]
        theta, gamma2 = group["theta"], group["gamma2"]
        g1, b1 = hp.g1, hp.b1
        states = [self.state[p] for p in ps]
        stat = _stat_dtype(ps[0])
        # 1. decoupled weight decay
        if wd != 0:
            _foreach_scalar_("mul", ps, 1 - lr * wd)
        grads = [p.grad for p in ps]
        if stat != dtype:  # bf16/fp16: the fp32 gradient, as p.grad.to(fp32)
            grads = scratch.views("grad", ps, stat)
            torch._foreach_copy_(grads, [p.grad for p in ps])
        work = scratch.views("work", ps, stat)
        # 2. AdaClip: work = |G|; then the clipped gradient
        for g, w in zip(grads, work):
            torch.abs(g, out=w)
        gmax = torch.stack(torch._foreach_max(work))
        bc = [self._bias_t(p, hp.t) for p in ps]
        max_ema = _stacked(states, "max_ema")
        max_ema.mul_(theta).add_((1 - theta) * gmax)
        thresh = max_ema / _one_minus_pow(theta, bc, max_ema)
        ratio = thresh / gmax
        for i, g, w, th, r in zip(indices, grads, work, thresh.unbind(), ratio.unbind()):
            over = w > th
            counts[i] = torch.count_nonzero(over)
            torch.mul(g, r, out=w)
            torch.where(over, w, g, out=w)
        # 3. AdaGN
        norm = torch.stack(torch._foreach_norm(work))
        norm_ema, sqnorm_ema = _stacked(states, "norm_ema"), _stacked(states, "sqnorm_ema")
        norm_ema.mul_(g1).add_((1 - g1) * norm)
        sqnorm_ema.mul_(gamma2).add_((1 - gamma2) * norm * norm)
        mu_hat = norm_ema / _one_minus_pow(g1, bc, norm_ema)
        nu_hat = sqnorm_ema / _one_minus_pow(gamma2, bc, sqnorm_ema)
        c = mu_hat / (nu_hat.sqrt() + eps)
        scale = torch.where(norm > 0, c / torch.where(norm > 0, norm, torch.ones_like(norm)),
                            torch.ones_like(norm))
        torch._foreach_copy_([st[key] for st in states for key in _FP32_STATE],
                             [v for row in zip(max_ema, norm_ema, sqnorm_ema) for v in row])
        scale_list = scale.unbind()
        for i, sc in zip(indices, scale_list):
            scales[i] = sc
        torch._foreach_mul_(work, scale_list)
        if quirks:
            torch._foreach_copy_([p.grad for p in ps], work)  # (d): the reference conditions p.grad in place
        update = work
        if stat != dtype:  # as grad.to(p.dtype)
            update = scratch.views("update", ps, dtype)
            torch._foreach_copy_(update, work)
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        # 4. MoRet
        if hp.reset:
            if quirks:  # (b): new tensors are bound, this step still uses the old ones with k = 1
                for st, p in zip(states, ps):
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["step"] = 1
            else:
                torch._foreach_zero_(exp_avgs)
                torch._foreach_zero_(exp_avg_sqs)
                for st in states:
                    st["step"] = 0
        # 5. Adam
        if not quirks:
            for st in states:
                st["step"] += 1
        ks = [st["step"] for st in states]
        _foreach_scalar_("mul", exp_avgs, b1)
        torch._foreach_add_(exp_avgs, update, alpha=1 - b1)
        _foreach_scalar_("mul", exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, update, update, value=1 - beta2)
        denom = update  # the update is in the moments now: its buffer takes the denominator
        for e, d in zip(exp_avg_sqs, denom):
            torch.sqrt(e, out=d)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**k) for k in ks])
        _foreach_scalar_("add", denom, eps)
        torch._foreach_addcdiv_(ps, exp_avgs, denom, [-lr / (1 - b1**k) for k in ks])

    @property
    def last_metrics(self) -> dict[str, float]:
        """Signals of the last ``step()`` (read on demand: converting them to floats syncs with the device)."""
        if self._last is None:
            return {}
        clipped, total, scales, reset, beta1_eff = self._last
        return {
            "clip_frac": float(torch.stack(clipped).sum()) / total if total else 0.0,
            "gn_scale_mean": float(torch.stack(scales).mean()) if scales else 0.0,
            "moret_reset": float(reset),
            "beta1_eff": float(beta1_eff) if beta1_eff is not None else 0.0,
        }
