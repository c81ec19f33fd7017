"""LoRA-GGPO: gradient-guided perturbation optimization for LoRA fine-tuning.

Paper: Chang, Guo, Chang, Wu, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided
Perturbation Optimization", arXiv 2502.14538v1 (Eq. 6-8; v2/v3 of the same id are the successor LoRA-MGPO).
Method page: docs/methods/ggpo.md (sections #objective, #step-by-step, #cost, #how-it-is-tested).

Objective: ``min_{A,B} E_{ε~N(0,Σ)} L(W + s·B·A + ε)`` with one noise sample per optimizer step on each targeted
layer's merged weight ``W' = W + s·B·A`` (m x n); the noise is added to the frozen base-weight storage only.
Row-wise variance (v1 Eq. 6): ``ε[i, j] ~ N(0, (σ²/n)·(||W'_i||² + β·||G_i||²))``, i.i.d. over j, where
``G = s·(∇B·A + B·∇A)`` is the LoRA-equivalent gradient of the previous optimizer step. Its row norms are computed
without forming G (Gram formula): with ``u_i = [∇B_i, B_i]`` (1 x 2r), ``M = [A; ∇A]`` (2r x n), ``K = M Mᵀ``,
``||G_i||² = s²·u_i K u_iᵀ``.

Step t (docs/methods/ggpo.md#step-by-step): (1) before the first micro-batch's forward, ``W <- W + ε`` (under no_grad, fp32 math);
(2) all micro-batches run forward/backward at ``W + ε``; (3) after the last backward, ε is removed (``copy``: the
weight's original storage, set aside by reference when ``W + ε`` replaced it, is put back -- bitwise, with no clone
and no copy; ``regenerate``: ε is redrawn from the same generator state and subtracted, holding nothing) and
``gnorm2`` is set from the accumulated, unclipped ∇A/∇B; (4) clipping/optimizer/scheduler as plain LoRA.
Not SAM: random direction, one forward/backward per micro-batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peft.tuners.lora import LoraLayer

from posttrain.errors import UserError

__all__ = [
    "GGPOPerturbation",
    "GGPOTrainerMixin",
    "check_ggpo_reference_model",
    "ggpo_layers",
    "ggpo_row_std",
    "lora_equivalent_grad",
    "lora_grad_row_norm2",
    "sigma_at",
]


# --------------------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------------------
def ggpo_row_std(w_row_norm2: torch.Tensor, g_row_norm2: torch.Tensor, sigma: float, beta: float, n: int) -> torch.Tensor:
    """Per-row noise std (v1 Eq. 6): ``σ·sqrt((||W'_i||² + β·||G_i||²)/n)``."""
    return sigma * torch.sqrt((w_row_norm2 + beta * g_row_norm2) / n)


def lora_equivalent_grad(A, B, grad_A, grad_B, s: float) -> torch.Tensor:
    """Explicit ``G = s·(∇B·A + B·∇A)`` (m x n)."""
    return s * (grad_B @ A + B @ grad_A)


def lora_grad_row_norm2(A, B, grad_A, grad_B, s: float) -> torch.Tensor:
    """``||G_i||²`` via the Gram formula, O(m·r² + r²·n) without forming G."""
    u = torch.cat([grad_B, B], dim=1)  # m x 2r
    M = torch.cat([A, grad_A], dim=0)  # 2r x n
    K = M @ M.T  # 2r x 2r
    return (s * s) * ((u @ K) * u).sum(dim=1).clamp_min(0.0)


def sigma_at(sigma: float, schedule: str, step: int, total_steps: int | None) -> float:
    """``constant`` -> σ; ``cosine_ramp`` (Flat-LoRA) -> σ·0.5·(1 − cos(π·t/t_total))."""
    if schedule == "constant":
        return float(sigma)
    if schedule == "cosine_ramp":
        if not total_steps:
            raise UserError("ggpo.sigma_schedule: 'cosine_ramp' needs the total number of training steps")
        return float(sigma) * 0.5 * (1.0 - math.cos(math.pi * min(step, total_steps) / total_steps))
    raise UserError(f"ggpo.sigma_schedule: unknown {schedule!r}; expected constant | cosine_ramp")


def check_ggpo_reference_model(beta: float, ref_model: Any = None, precompute_ref_log_probs: bool = False) -> None:
    """DPO-style trainers with a PEFT policy compute reference log-probs from the adapter-disabled policy inside
    ``compute_loss``, i.e. at the perturbed W: refuse unless there is an explicit ref model or precomputed log-probs."""
    if beta and beta > 0 and ref_model is None and not precompute_ref_log_probs:
        raise UserError(
            "ggpo: with beta > 0 the reference log-probs would be computed at the perturbed weights; "
            "set precompute_ref_log_probs: true or give an explicit ref_model"
        )


def ggpo_layers(model: nn.Module) -> Iterator[tuple[int, str, LoraLayer]]:
    """(index, qualified name, layer) for every linear-type PEFT LoRA layer, in module order."""
    idx = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and len(module.lora_A) > 0:
            yield idx, name, module
            idx += 1


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_METRIC_ORDER = ["ggpo/noise_std_mean", "ggpo/grad_term_frac", "ggpo/w_row_norm_mean", "ggpo/copy_bytes",
                 "ggpo/g_row_norm_mean"]


def _active(layer: LoraLayer) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _out_in_view(layer: LoraLayer, t: torch.Tensor) -> torch.Tensor:
    """View of a storage-orientation tensor as (out, in)."""
    return t.T if getattr(layer, "fan_in_fan_out", False) else t


# --------------------------------------------------------------------------------------------------------------
# The perturbation object
# --------------------------------------------------------------------------------------------------------------
class GGPOPerturbation:
    """Apply / remove the GGPO noise around one optimizer step (docs/methods/ggpo.md#step-by-step).

    Usage (plain torch, GA micro-batches)::

        pert = GGPOPerturbation(sigma=0.05, beta=0.01, seed=0)
        pert.apply(model, step)             # before the first micro-batch forward
        for mb in micro_batches: loss(mb).backward()
        pert.remove(model)                  # restores W, sets gnorm2 from the accumulated (pre-clip) grads
        clip_(...); optimizer.step(); optimizer.zero_grad()

    or ``with pert.perturbed(model, step): ...``. Extra compute is counted in ``self.extra_flops`` (estimate:
    s·B·A, row norms, randn, add/subtract, Gram), wall time in ``self.extra_seconds``.
    """

    def __init__(self, sigma: float = 0.05, beta: float = 0.01, seed: int = 0, restore: str = "copy",
                 sigma_schedule: str = "constant", total_steps: int | None = None, every_n_steps: int = 1,
                 rank: int = 0):
        if sigma < 0:
            raise UserError("ggpo.sigma: must be >= 0")
        if beta < 0:
            raise UserError("ggpo.beta: must be >= 0")
        if restore not in ("copy", "regenerate"):
            raise UserError(f"ggpo.restore: unknown {restore!r}; expected copy | regenerate")
        if int(every_n_steps) < 1:
            raise UserError("ggpo.every_n_steps: must be >= 1")
        sigma_at(sigma, sigma_schedule, 0, total_steps or 1)  # validates the schedule name
        # restore="copy" by default, for every dtype: (W + eps) - eps is not W in floating point (weights smaller than
        # eps change binade); that drift is in no checkpoint, so "regenerate" breaks bit-exact resume and makes the
        # saved adapter (on the original base) differ from the trained model. docs/methods/ggpo.md#removing-the-noise-restore.
        self.sigma, self.beta, self.seed, self.restore = float(sigma), float(beta), int(seed), restore
        self.sigma_schedule, self.total_steps, self.every_n_steps = sigma_schedule, total_steps, int(every_n_steps)
        self.rank = int(rank)
        self.gnorm2: dict[str, torch.Tensor] = {}
        self.step: int = 0
        self.active = False
        self._saved: dict[str, torch.Tensor] = {}
        self._regen: dict[str, tuple[int, torch.Tensor]] = {}
        self.extra_flops = 0.0
        self.extra_seconds = 0.0
        self.num_perturbed_steps = 0
        self._metrics: dict[str, Any] = {}  # last_metrics, with the per-layer tensors not yet reduced

    # -- noise ---------------------------------------------------------------------------------------------------
    def _generator(self, step: int, layer_index: int, device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(_seed(self.seed, step, self.rank, layer_index))
        return g

    @torch.no_grad()
    def row_std(self, layer: LoraLayer, name: str, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(std, ||W'_i||², β||G_i||²) of one layer, all fp32 (out,)."""
        W = layer.get_base_layer().weight
        Wp = None  # W' = W + the adapters' deltas, in the first delta's buffer (W itself is only read)
        for ad in _active(layer):
            delta = layer.get_delta_weight(ad).detach().float()
            Wp = delta.add_(W.detach()) if Wp is None else Wp.add_(delta)  # W + delta, in delta's buffer
        Wp = W.detach().float() if Wp is None else Wp
        Wp = _out_in_view(layer, Wp)
        m, n = Wp.shape
        w2 = (Wp.mul_(Wp) if Wp.data_ptr() != W.data_ptr() else Wp * Wp).sum(dim=1)
        g2 = self.gnorm2.get(name)
        g2 = torch.zeros_like(w2) if g2 is None else g2.to(w2.device)
        r = sum(layer.r[a] for a in _active(layer))
        self.extra_flops += 2.0 * m * r * n + 2.0 * m * n
        return ggpo_row_std(w2, g2, sigma, self.beta, n), w2, self.beta * g2

    @torch.no_grad()
    def draw_noise(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        """The ε (fp32, storage orientation) that :meth:`apply` adds at ``step``, without applying it."""
        sigma = sigma_at(self.sigma, self.sigma_schedule, step, self.total_steps)
        out = {}
        for idx, name, layer in ggpo_layers(model):
            std, _, _ = self.row_std(layer, name, sigma)
            out[name] = self._noise(layer, idx, step, std)
        return out

    def _noise(self, layer: LoraLayer, idx: int, step: int, std: torch.Tensor) -> torch.Tensor:
        """ε of one layer (a new fp32 tensor, which :meth:`apply` turns into ``W + ε`` in place)."""
        W = layer.get_base_layer().weight
        m, n = _out_in_view(layer, W).shape
        g = self._generator(step, idx, W.device)
        eps = torch.randn((m, n), generator=g, device=W.device, dtype=torch.float32).mul_(std[:, None])
        self.extra_flops += 2.0 * m * n
        return _out_in_view(layer, eps)

    # -- apply / remove -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: nn.Module, step: int | None = None) -> bool:
        """Perturb every targeted base weight for optimizer step ``step``; returns whether noise was added."""
        if self.active:
            raise RuntimeError("GGPOPerturbation.apply: already applied; call remove() first")
        t0 = time.perf_counter()
        self.step = int(step) if step is not None else self.step
        self.active = True
        self._saved.clear()
        self._regen.clear()
        sigma = sigma_at(self.sigma, self.sigma_schedule, self.step, self.total_steps)
        if sigma == 0.0 or self.step % self.every_n_steps != 0:
            self._metrics = {"ggpo/noise_std_mean": 0.0}
            return False
        rows, copy_bytes = [], 0
        for idx, name, layer in ggpo_layers(model):
            W = layer.get_base_layer().weight
            if not W.dtype.is_floating_point:
                raise UserError("ggpo: quantized base weights cannot be perturbed in place")
            std, w2, bg2 = self.row_std(layer, name, sigma)
            eps = self._noise(layer, idx, self.step, std)
            if eps.stride() == W.stride():  # W + ε in ε's buffer (one pass, no new tensor for fp32 weights)
                perturbed = eps.add_(W.data).to(W.dtype)
            else:  # a transposed (fan_in_fan_out) ε: the sum in W's layout
                perturbed = (W.data.float() + eps).to(W.dtype)
            if self.restore == "copy":  # the original storage is set aside by reference: no clone, restored bitwise
                self._saved[name] = W.data
                copy_bytes += W.numel() * W.element_size()
                W.data = perturbed
            else:
                self._regen[name] = (idx, std)
                W.data.copy_(perturbed)
            self.extra_flops += float(W.numel())
            rows.append((std, w2, bg2))
        self.num_perturbed_steps += 1
        self.extra_seconds += time.perf_counter() - t0
        if rows:  # reduced to floats when read (last_metrics): no device sync in the step
            self._metrics = {"rows": rows, "ggpo/copy_bytes": float(copy_bytes)}
        return True

    @torch.no_grad()
    def remove(self, model: nn.Module, grad_scale: float | None = None, update_norms: bool = True) -> None:
        """Remove ε (bitwise copy or regenerate-and-subtract), then set gnorm2 from the current (pre-clip) grads."""
        t0 = time.perf_counter()
        if self.active:
            for idx, name, layer in ggpo_layers(model):
                W = layer.get_base_layer().weight
                if name in self._saved:
                    W.data = self._saved.pop(name)
                elif name in self._regen:
                    i, std = self._regen.pop(name)
                    eps = self._noise(layer, i, self.step, std)
                    W.data.copy_((W.data.float() - eps).to(W.dtype))
                    self.extra_flops += float(W.numel())
        self.active = False
        self._saved.clear()
        self._regen.clear()
        if update_norms:
            self.update_grad_norms(model, grad_scale)
        self.step += 1
        self.extra_seconds += time.perf_counter() - t0

    @property
    def last_metrics(self) -> dict[str, float]:
        """``ggpo/*`` of the last step: the noise std, the gradient term's share of the variance and ``||W'_i||``
        (means over rows, then layers), the set-aside bytes, the LoRA-equivalent gradient's row norm."""
        m = self._metrics
        if "rows" in m:
            rows = m.pop("rows")
            m = self._metrics = {**m, **{
                "ggpo/noise_std_mean": float(torch.stack([std.mean() for std, _, _ in rows]).mean()),
                "ggpo/grad_term_frac": float(torch.stack(
                    [(bg2 / (w2 + bg2).clamp_min(1e-30)).mean() for _, w2, bg2 in rows]).mean()),
                "ggpo/w_row_norm_mean": float(torch.stack([w2.sqrt().mean() for _, w2, _ in rows]).mean()),
            }}
        if "g_rows" in m:
            m["ggpo/g_row_norm_mean"] = float(torch.stack([g2.sqrt().mean() for g2 in m.pop("g_rows")]).mean())
        return {k: m[k] for k in sorted(m, key=_METRIC_ORDER.index)}

    @torch.no_grad()
    def update_grad_norms(self, model: nn.Module, grad_scale: float | None = None) -> None:
        """gnorm2 <- ||G_i||² (Gram formula) from the accumulated ∇A, ∇B (divided by ``grad_scale`` if given)."""
        g_rows = []
        for _, name, layer in ggpo_layers(model):
            total = None
            for ad in _active(layer):
                A, B = layer.lora_A[ad].weight, layer.lora_B[ad].weight
                if A.grad is None or B.grad is None:
                    continue
                gA, gB = A.grad.float(), B.grad.float()
                if grad_scale:
                    gA, gB = gA / grad_scale, gB / grad_scale
                g2 = lora_grad_row_norm2(A.float(), B.float(), gA, gB, float(layer.scaling[ad]))
                r, n = A.shape
                self.extra_flops += 2.0 * (2 * r) ** 2 * n + 2.0 * B.shape[0] * (2 * r) ** 2
                total = g2 if total is None else total + g2  # several adapters: sum (cross terms ignored)
            if total is not None:
                self.gnorm2[name] = total.detach()
                g_rows.append(self.gnorm2[name])
        if g_rows:
            self._metrics["g_rows"] = g_rows

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, step: int | None = None, grad_scale: float | None = None):
        """``apply`` on enter; ``remove`` on exit (norms updated only on normal exit)."""
        self.apply(model, step)
        try:
            yield self
        except BaseException:
            self.remove(model, update_norms=False)
            raise
        self.remove(model, grad_scale=grad_scale)

    def metrics(self) -> dict[str, float]:
        m = dict(self.last_metrics)
        m["ggpo/extra_flops"] = float(self.extra_flops)
        m["ggpo/extra_seconds"] = float(self.extra_seconds)
        m["ggpo/perturbed_steps"] = float(self.num_perturbed_steps)
        return m

    # -- resume ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Contents of ``ggpo_state.pt``: gnorm2 per layer, seed, step."""
        return {"gnorm2": {k: v.cpu() for k, v in self.gnorm2.items()}, "seed": self.seed, "step": self.step,
                "format_version": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gnorm2 = {k: v.clone() for k, v in state["gnorm2"].items()}
        self.seed, self.step = int(state["seed"]), int(state["step"])


# --------------------------------------------------------------------------------------------------------------
# Trainer wiring
# --------------------------------------------------------------------------------------------------------------
class GGPOTrainerMixin:
    """Mixin for ``transformers.Trainer`` / TRL trainers (put it first in the bases).

    The noise goes on in the first micro-batch of each optimizer step once its inputs are prepared (so GRPO's
    rollouts and old/reference log-probs, made in ``_prepare_inputs``, see the clean weights) and comes off after
    the last micro-batch's backward (``accelerator.sync_gradients``), before clipping / optimizer.step().
    Evaluation, generation and checkpoint saves therefore see the clean weights. Adds ``ggpo/*`` to the logs and
    writes ``ggpo_state.pt`` into checkpoints.
    """

    def __init__(self, *args, ggpo_sigma: float = 0.05, ggpo_beta: float = 0.01, ggpo_restore: str = "copy",
                 ggpo_sigma_schedule: str = "constant", ggpo_every_n_steps: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.ggpo = GGPOPerturbation(
            sigma=ggpo_sigma, beta=ggpo_beta, seed=int(getattr(self.args, "seed", 0)), restore=ggpo_restore,
            sigma_schedule=ggpo_sigma_schedule, every_n_steps=ggpo_every_n_steps,
            rank=int(getattr(self.args, "process_index", 0)),
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._ggpo_model = model  # _prepare_inputs perturbs it
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            if self.ggpo.active:
                self.ggpo.remove(model, update_norms=False)
            raise
        finally:
            self._ggpo_model = None
        if self.accelerator.sync_gradients and self.ggpo.active:
            scaler = getattr(self.accelerator, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
            self.ggpo.remove(model, grad_scale=scale)
        return loss

    def _prepare_inputs(self, inputs):
        # The noise goes on after the inputs are ready, right before the loss forward: GRPO's _prepare_inputs
        # generates the rollouts and computes old/reference log-probs, which must see the clean weights.
        inputs = super()._prepare_inputs(inputs)
        model = getattr(self, "_ggpo_model", None)
        if model is not None and not self.ggpo.active:
            self.ggpo.total_steps = self.ggpo.total_steps or getattr(self.state, "max_steps", None) or None
            self.ggpo.apply(model, step=self.state.global_step)
        return inputs

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs.update(self.ggpo.metrics())
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        out = super()._save_checkpoint(model, trial, *args, **kwargs)
        try:
            import os

            ckpt = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            if os.path.isdir(ckpt) and self.args.should_save:
                torch.save(self.ggpo.state_dict(), os.path.join(ckpt, "ggpo_state.pt"))
        except Exception:  # pragma: no cover - never break a save for the resume extra
            pass
        return out
