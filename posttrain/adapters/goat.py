"""GOAT: SVD-structured mixture of LoRA experts with theoretical scaling.

Paper: Fan et al., "Make LoRA Great Again: Boosting LoRA with Adaptive Singular Values and Mixture-of-Experts
Optimization Alignment", ICML 2025, arXiv 2502.16894 (Sec. 3 Eq. 9-19, Lemma 3.3, Thm 3.4-3.5, Alg. 1, App. C).
Method page: docs/methods/goat.md (sections #architecture, #initialization, #scaling, #load-balancing-loss,
#save-and-load).

Per targeted ``nn.Linear`` with base weight ``W0`` (m x n = out x in), E experts of rank ``d = r/E``:

* Router ``Wz`` (E x n, no bias, fp32): ``p(x) = softmax(Wz x)``; ``Ω(x)`` = top-k of p;
  ``w_i = p_i / Σ_{j∈Ω} p_j`` for i in Ω, else 0 (Eq. 10).
* ``y = W0 x − R x + Σ_{i∈Ω(x)} w_i(x) · s · B_i A_i drop_i(x)``.
* Init (Eq. 13/19, Alg. 1): thin SVD ``W0 = U diag(σ) Vᵀ``; ``t = floor(min(m,n)/E)``; expert j takes singular
  indices ``[j·t, j·t+d)``; ``B_j = U_seg diag(sqrt(σ_seg/(s·ρ)))``, ``A_j = diag(sqrt(σ_seg/(s·ρ))) V_segᵀ``, so
  ``s·B_j A_j = U_seg Σ_seg V_segᵀ / ρ``.
* Residual (Thm 3.4): ``R = init_cof · s · Σ_j B_j A_j`` with ``init_cof = 1/E`` (paper, E[w_i] = 1/E). Framework
  design: W0 is never edited; R is kept as frozen persistent factors ``lora_res_B = init_cof·s·[B_1..B_E]`` (m x r)
  and ``lora_res_A = [A_1; ..; A_E]`` (r x n) and subtracted in the forward, so ``disable_adapter()`` is exactly the
  base model and loading needs no SVD. ``fold_residual=True`` edits W0 in place instead (the reference's behaviour).
* Scaling (Thm 3.5): ``s = sqrt(3·n·η/d)`` ("theory", default). ``"alpha"``: ``α/d``; ``"rslora"``: ``α/sqrt(d)``.
* Load balance (App. C): per layer and forward over T tokens, ``c_i`` = #tokens whose top-k contains i,
  ``P_i = mean_t p_i``; paper ``L_b = Σ_i (E·c_i/(k·T))·P_i``. Model aux = Σ over layers (mean over the forwards
  recorded since the last clear). Total loss = task + coef·aux (coef 1e-3, App. F.4).

Where the released code (Facico/GOAT-PEFT @ ef4d21a) differs from the paper (flags here):
* ``scaling="alpha"`` reproduces the released runs (the "goat" init never reaches the theory branch: s = α/d).
* ``aux_match_reference=True``: the code's balance loss ``E·Σ (c_i/T)·P_i`` (k times the paper's).
* ``init_cof``: the code's config classes default to 1.0; the paper and launch scripts use 1/E (our default).
* ``fold_residual=True``: the code subtracts R from W0 in place.
* ``aux_count_padding=True``: the code counts padding tokens in the balance loss; we count attention_mask == 1.

GOAT cannot be merged: routing depends on each token (``merge`` raises).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import LoraLayer

from posttrain.errors import UserError

logger = logging.getLogger("posttrain")

GOAT_FORMAT_VERSION = 1
GOAT_CONFIG_NAME = "goat_config.json"
# ``peft_type`` written to adapter_config.json: plain PEFT loading (PeftModel / AutoPeftModel.from_pretrained) then
# fails with this string instead of silently building an ordinary (randomly initialised) LoRA.
GOAT_PEFT_TYPE = "GOAT (not a plain LoRA; load with posttrain.adapters.load_goat)"

__all__ = [
    "GOATSettings",
    "GOATTrainerMixin",
    "GoatLinear",
    "apply_goat",
    "clear_goat_aux",
    "goat_aux_loss",
    "goat_balance_loss",
    "goat_layers",
    "goat_metrics",
    "goat_scaling",
    "goat_svd_factors",
    "goat_token_mask",
    "load_goat",
    "make_goat_linear",
    "save_goat",
    "topk_route",
]


@dataclass
class GOATSettings:
    """GOAT hyperparameters not carried by ``LoraConfig`` (written to ``goat_config.json``)."""

    num_experts: int = 8
    top_k: int = 2
    rho: float = 10.0
    eta: float = 1.0
    scaling: str = "theory"  # "theory" | "alpha" | "rslora"
    init_cof: float | None = None  # None -> 1/E (paper)
    fold_residual: bool = False
    aux_coef: float = 1e-3
    aux_match_reference: bool = False
    aux_count_padding: bool = False

    def validate(self) -> None:
        if self.num_experts < 1:
            raise UserError("peft.goat.num_experts: must be >= 1")
        if not (1 <= self.top_k <= self.num_experts):
            raise UserError(f"peft.goat.top_k: must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.scaling not in ("theory", "alpha", "rslora"):
            raise UserError(f"peft.goat.scaling: unknown {self.scaling!r}; expected theory | alpha | rslora")
        if self.rho <= 0:
            raise UserError("peft.goat.rho: must be > 0")


# --------------------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------------------
def goat_scaling(kind: str, in_features: int, expert_rank: int, lora_alpha: float = 16.0, eta: float = 1.0) -> float:
    """Scaling s: ``theory`` sqrt(3·n·η/d) (Thm 3.5), ``alpha`` α/d (released runs), ``rslora`` α/sqrt(d)."""
    if kind == "theory":
        return math.sqrt(3.0 * in_features * eta / expert_rank)
    if kind == "alpha":
        return float(lora_alpha) / expert_rank
    if kind == "rslora":
        return float(lora_alpha) / math.sqrt(expert_rank)
    raise UserError(f"peft.goat.scaling: unknown {kind!r}; expected theory | alpha | rslora")


@torch.no_grad()
def goat_svd_factors(
    weight: torch.Tensor, num_experts: int, rank: int, s: float, rho: float
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """SVD init (docs/methods/goat.md#initialization). Returns A (E, d, n), B (E, m, d) in fp32 and the segment indices.

    Expert j takes singular indices ``[j·t, j·t + d)`` with ``t = floor(min(m,n)/E)``, ``d = rank/E``.
    """
    E = int(num_experts)
    d = rank // E
    W = weight.detach().float()
    m, n = W.shape
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    t = min(m, n) // E
    As, Bs, segs = [], [], []
    for j in range(E):
        seg = list(range(j * t, j * t + d))
        sq = torch.sqrt(S[seg] / (s * rho))
        Bs.append(U[:, seg] * sq[None, :])
        As.append(sq[:, None] * Vh[seg, :])
        segs.append(seg)
    return torch.stack(As), torch.stack(Bs), segs


def topk_route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 10: ``p = softmax(logits)``; weights renormalised over the top-k, zero elsewhere.

    Returns (p, w, selected) with ``selected`` a 0/1 float mask of the top-k per token.
    """
    p = F.softmax(logits, dim=-1)
    topv, topi = p.topk(top_k, dim=-1)
    w = torch.zeros_like(p).scatter(-1, topi, topv / topv.sum(-1, keepdim=True))
    selected = torch.zeros_like(p).scatter(-1, topi, 1.0)
    return p, w, selected


def goat_balance_loss(p: torch.Tensor, selected: torch.Tensor, top_k: int, match_reference: bool = False) -> torch.Tensor:
    """App. C balance loss over T tokens (rows). Paper: ``Σ_i (E·c_i/(k·T))·P_i``; reference: ``E·Σ_i (c_i/T)·P_i``."""
    return goat_balance_loss_from_sums(p.sum(0), selected.detach().sum(0), p.shape[0], top_k, match_reference)


def goat_balance_loss_from_sums(p_sum: torch.Tensor, counts: torch.Tensor, tokens, top_k: int,
                                match_reference: bool = False, num_processes: int = 1) -> torch.Tensor:
    """:func:`goat_balance_loss` from per-expert sums: ``p_sum_i = Σ_t p_ti`` (differentiable), ``counts_i = c_i``
    and ``tokens = T``. Data-parallel (docs/methods/goat.md#load-balancing-loss): ``counts`` and ``tokens`` are those of
    the global batch (summed over the processes) and ``p_sum`` this process's, divided by ``tokens / num_processes``,
    so that the processes' mean (the averaged gradient) is the balance loss of the global batch."""
    tokens = torch.as_tensor(tokens, dtype=torch.float32, device=p_sum.device)
    if float(tokens) == 0:
        return p_sum.sum() * 0.0
    E = p_sum.shape[-1]
    f = E * counts / tokens if match_reference else E * counts / (top_k * tokens)
    return (f * (p_sum / (tokens / num_processes))).sum()


# --------------------------------------------------------------------------------------------------------------
# The PEFT custom LoRA layer
# --------------------------------------------------------------------------------------------------------------
class GoatLinear(nn.Module, LoraLayer):
    """GOAT layer for ``nn.Linear``, hosted by PEFT's LoRA dynamic dispatch (``LoraConfig._register_custom_module``).

    Build concrete classes with :func:`make_goat_linear` (binds :class:`GOATSettings`). Parameters (per adapter):
    ``lora_expert_A`` (E, d, n), ``lora_expert_B`` (E, m, d), ``lora_router`` (nn.Linear n -> E); frozen persistent
    buffers ``lora_res_A`` (r, n), ``lora_res_B`` (m, r).
    """

    goat: GOATSettings = GOATSettings()
    adapter_layer_names = ("lora_expert_A", "lora_expert_B", "lora_router")
    other_param_names = ("lora_res_A", "lora_res_B", "r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        if getattr(config, "use_dora", False):
            raise UserError("peft.use_dora: not supported with GOAT")
        self.fan_in_fan_out = False
        self.lora_expert_A = nn.ParameterDict({})
        self.lora_expert_B = nn.ParameterDict({})
        self.lora_router = nn.ModuleDict({})
        self.lora_res_A = BufferDict({}, persistent=True)
        self.lora_res_B = BufferDict({}, persistent=True)
        self._goat_aux: list[tuple] = []  # per training forward: see _record
        self._goat_token_mask: torch.Tensor | None = None
        self.goat_init_svd_seconds = 0.0
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        g = self.goat
        E = g.num_experts
        if r <= 0 or r % E != 0:
            raise UserError(f"peft.r: GOAT needs a total rank divisible by num_experts={E}, got r={r}")
        d = r // E
        n, m = self.in_features, self.out_features
        if min(m, n) < r:
            raise UserError(f"peft.r: r={r} exceeds min(out, in)={min(m, n)} of a targeted layer")
        W = self.get_base_layer().weight
        dev = W.device
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        s = goat_scaling(g.scaling, n, d, lora_alpha, g.eta)
        self.scaling[adapter_name] = s
        p = float(config.lora_dropout)
        self.lora_dropout[adapter_name] = nn.ModuleList(
            [nn.Dropout(p) if p > 0 else nn.Identity() for _ in range(E)]
        )
        self.lora_router[adapter_name] = nn.Linear(n, E, bias=False, device=dev, dtype=torch.float32)
        A = torch.zeros(E, d, n, device=dev, dtype=torch.float32)
        B = torch.zeros(E, m, d, device=dev, dtype=torch.float32)
        cof = g.init_cof if g.init_cof is not None else 1.0 / E
        if config.init_lora_weights is not False:
            from posttrain.distributed import gathered

            t0 = time.perf_counter()
            with gathered(W):  # ZeRO-3 loads the base weights partitioned (zero.Init)
                A, B, _ = goat_svd_factors(W, E, r, s, g.rho)
            A, B = A.to(dev), B.to(dev)
            self.goat_init_svd_seconds = time.perf_counter() - t0
            _svd_progress(self.goat_init_svd_seconds)
        self.lora_expert_A[adapter_name] = nn.Parameter(A)
        self.lora_expert_B[adapter_name] = nn.Parameter(B)
        res_B = (cof * s) * B.permute(1, 0, 2).reshape(m, r)  # [B_1 .. B_E]
        res_A = A.reshape(r, n)  # [A_1; ..; A_E]
        self.lora_res_A[adapter_name] = res_A.clone()
        self.lora_res_B[adapter_name] = res_B.clone()
        if g.fold_residual and config.init_lora_weights is not False:
            self.fold_residual_(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def fold_residual_(self, adapter_name: str) -> None:
        """W0 <- W0 - res_B @ res_A (the reference's in-place edit; ``fold_residual=True``)."""
        W = self.get_base_layer().weight
        R = self.lora_res_B[adapter_name] @ self.lora_res_A[adapter_name]
        W.data.copy_((W.data.float() - R.to(W.device)).to(W.dtype))

    # GOAT cannot be merged (routing is per token).
    def merge(self, *args, **kwargs) -> None:
        raise UserError("GOAT adapters cannot be merged: the expert mixture is routed per token")

    def unmerge(self) -> None:
        return None

    def get_delta_weight(self, adapter) -> torch.Tensor:
        raise UserError("GOAT adapters cannot be merged: the expert mixture is routed per token")

    def goat_delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The adapter's additive output: ``Σ_i w_i s B_i A_i drop_i(x) − R x`` (fp32).

        One product for the experts and the frozen residual (docs/methods/goat.md#architecture): the residual's factors
        are an extra expert of weight 1, ``h = x [A_1; ..; A_E; res_A]ᵀ`` (T x 2r), ``y = (h ⊙ [w, 1]) [s B_1 .. s B_E,
        −res_B]ᵀ``: two matmuls forward (four with the residual apart), ``s`` applied to B (m x r) rather than to y
        (T x m). The same sum as the separate terms up to fp32 rounding (tests/adapters/test_adapters_goat.py)."""
        g = self.goat
        A = self.lora_expert_A[adapter]
        B = self.lora_expert_B[adapter]
        s = self.scaling[adapter]
        E, d, n = A.shape
        xt = x.reshape(-1, n).to(A.dtype)
        p, w, selected = topk_route(self.lora_router[adapter](xt), g.top_k)
        weights = w.repeat_interleave(d, dim=1)  # (T, r): expert i's weight on its d columns
        right = (B * s).permute(1, 0, 2).reshape(B.shape[1], E * d)  # (m, r) = [s B_1 .. s B_E]
        drops = self.lora_dropout[adapter]
        residual = not g.fold_residual
        if all(isinstance(dm, nn.Identity) for dm in drops):
            left = A.reshape(E * d, n)
            h = xt @ (torch.cat([left, self.lora_res_A[adapter]]) if residual else left).T
        else:
            h = torch.cat([drops[i](xt) @ A[i].T for i in range(E)], dim=1)
            if residual:
                h = torch.cat([h, xt @ self.lora_res_A[adapter].T], dim=1)
        if residual:
            weights = torch.cat([weights, weights.new_ones(weights.shape[0], h.shape[1] - E * d)], dim=1)
            right = torch.cat([right, -self.lora_res_B[adapter]], dim=1)
        y = (h * weights) @ right.T
        if self.training:
            self._record(p, selected)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _record(self, p: torch.Tensor, selected: torch.Tensor) -> None:
        mask = self._goat_token_mask
        if mask is not None and not self.goat.aux_count_padding and mask.numel() == p.shape[0]:
            keep = mask.reshape(-1).to(p.device) != 0
            p, selected = p[keep], selected[keep]
        # sums of this forward over its tokens: router probabilities per expert (differentiable), selections per
        # expert, the token count and the router entropy; goat_aux_loss / goat_metrics turn them into the balance
        # loss and the logged statistics
        with torch.no_grad():
            entropy = -(p * p.clamp_min(1e-12).log()).sum()
        self._goat_aux.append((p.sum(0), selected.detach().sum(0), float(p.shape[0]), entropy))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_expert_A:
                continue
            result = result + self.goat_delta(x, adapter).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "goat." + super().__repr__()


def make_goat_linear(settings: GOATSettings | None = None, **kw) -> type[GoatLinear]:
    """A :class:`GoatLinear` subclass bound to ``settings`` (or to ``GOATSettings(**kw)``)."""
    st = settings if settings is not None else GOATSettings(**kw)
    st.validate()
    return type("GoatLinearBound", (GoatLinear,), {"goat": st})


# --------------------------------------------------------------------------------------------------------------
# Model-level API
# --------------------------------------------------------------------------------------------------------------
_DEFAULT_EXCLUDE = ("lm_head", "embed_out", "output_layer", "score", "classifier")


def _resolve_targets(model: nn.Module, target_modules: str | list[str], rank: int) -> tuple[list[str], list[str]]:
    names, skipped = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if target_modules == "all-linear":
            ok = name.split(".")[-1] not in _DEFAULT_EXCLUDE
        elif isinstance(target_modules, str):
            import re

            ok = re.fullmatch(target_modules, name) is not None
        else:
            ok = any(name == t or name.endswith("." + t) for t in target_modules)
        if not ok:
            continue
        (names if min(mod.in_features, mod.out_features) >= rank else skipped).append(name)
    return names, skipped


def _goat_lora_config(rank, lora_alpha, lora_dropout, targets, init=True, modules_to_save=None) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                      init_lora_weights=init, bias="none", modules_to_save=modules_to_save)


# progress of the SVD initialisation in apply_goat (one line about every 10% of the layers: it can take a while on
# a real model, one SVD per targeted matrix)
_SVD_PROGRESS: dict[str, Any] = {"total": 0, "done": 0, "seconds": 0.0, "logged": 0}


def _svd_progress(seconds: float) -> None:
    p = _SVD_PROGRESS
    if not p["total"]:
        return
    p["done"] += 1
    p["seconds"] += seconds
    tenth = p["done"] * 10 // p["total"]
    if tenth > p["logged"]:
        p["logged"] = tenth
        logger.info("GOAT: SVD initialisation %d/%d layers (%.1f s)", p["done"], p["total"], p["seconds"])


def apply_goat(
    model: nn.Module,
    target_modules: str | list[str] = "all-linear",
    rank: int = 8,
    num_experts: int = 8,
    top_k: int = 2,
    *,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    rho: float = 10.0,
    eta: float = 1.0,
    scaling: str = "theory",
    init_cof: float | None = None,
    fold_residual: bool = False,
    aux_coef: float = 1e-3,
    aux_match_reference: bool = False,
    aux_count_padding: bool = False,
    adapter_name: str = "default",
    modules_to_save: list[str] | None = None,
) -> PeftModel:
    """Wrap ``model`` with GOAT layers on its targeted ``nn.Linear`` modules; returns a ``PeftModel``.

    ``target_modules``: suffix list (PEFT semantics), a regex string, or ``"all-linear"`` (minus the output head).
    Targets with ``min(out, in) < rank`` are left unwrapped (as in the reference); their names are stored in
    ``model.goat_skipped_targets``. ``rank`` is the total rank r (d = r / num_experts). ``modules_to_save``: fully
    trained (and saved) extra modules, as in ``LoraConfig``.
    """
    settings = GOATSettings(num_experts=num_experts, top_k=top_k, rho=rho, eta=eta, scaling=scaling,
                            init_cof=init_cof, fold_residual=fold_residual, aux_coef=aux_coef,
                            aux_match_reference=aux_match_reference, aux_count_padding=aux_count_padding)
    settings.validate()
    if rank % num_experts != 0:
        raise UserError(f"peft.r: GOAT needs a total rank divisible by num_experts={num_experts}, got r={rank}")
    targets, skipped = _resolve_targets(model, target_modules, rank)
    if not targets:
        raise UserError(f"peft.target_modules: no nn.Linear with min(out, in) >= r={rank} matches {target_modules!r}")
    cfg = _goat_lora_config(rank, lora_alpha, lora_dropout, targets, modules_to_save=modules_to_save)
    cfg._register_custom_module({nn.Linear: make_goat_linear(settings)})
    logger.info("GOAT: SVD initialisation of %d layers", len(targets))
    _SVD_PROGRESS.update(total=len(targets), done=0, seconds=0.0, logged=0)
    try:
        peft_model = get_peft_model(model, cfg, adapter_name=adapter_name, autocast_adapter_dtype=False)
    finally:
        _SVD_PROGRESS["total"] = 0
    peft_model.goat_settings = settings
    peft_model.goat_skipped_targets = skipped
    return peft_model


def goat_layers(model: nn.Module) -> list[GoatLinear]:
    return [m for m in model.modules() if isinstance(m, GoatLinear)]


def clear_goat_aux(model: nn.Module) -> None:
    """Discard recorded balance losses/statistics (call before each policy forward pass)."""
    for layer in goat_layers(model):
        layer._goat_aux.clear()


def _record_counts(layers: list[GoatLinear], sum_over_processes=None) -> list[list[tuple]]:
    """Per layer and recorded forward: ``(selections per expert, tokens, summed router entropy)``, summed over the
    processes (one reduction for every layer) when ``sum_over_processes`` is given."""
    records = [record for layer in layers for record in layer._goat_aux]
    rows = [(c.float(), torch.as_tensor(t, dtype=torch.float32, device=c.device), e.float())
            for _, c, t, e in records]
    if rows and sum_over_processes is not None:
        table = sum_over_processes(torch.stack([torch.cat([c, t.reshape(1), e.reshape(1)]) for c, t, e in rows]))
        rows = [(row[:-2], row[-2], row[-1]) for row in table]
    it = iter(rows)
    return [[next(it) for _ in layer._goat_aux] for layer in layers]


def goat_aux_loss(model: nn.Module, sum_over_processes=None, num_processes: int = 1) -> torch.Tensor:
    """Model aux = Σ over GOAT layers of the mean of the balance losses recorded since the last clear.

    ``sum_over_processes`` (a function summing a tensor over the processes, e.g. ``accelerator.reduce``): the expert
    counts and token totals of every record are those of the global batch, see :func:`goat_balance_loss_from_sums`;
    without it each process's balance loss is its own batch's."""
    layers = [layer for layer in goat_layers(model) if layer._goat_aux]
    shared = num_processes if sum_over_processes is not None else 1
    total = None
    for layer, counts in zip(layers, _record_counts(layers, sum_over_processes), strict=True):
        values = [goat_balance_loss_from_sums(p_sum, c, t, layer.goat.top_k, layer.goat.aux_match_reference, shared)
                  for (p_sum, *_), (c, t, _) in zip(layer._goat_aux, counts, strict=True)]
        v = torch.stack(values).mean()
        total = v if total is None else total + v.to(total.device)
    if total is None:
        p = next(model.parameters())
        return torch.zeros((), device=p.device, dtype=torch.float32)
    return total


@contextlib.contextmanager
def goat_token_mask(model: nn.Module, attention_mask: torch.Tensor | None):
    """Count only ``attention_mask == 1`` tokens in the balance loss during the block."""
    layers = goat_layers(model)
    for layer in layers:
        layer._goat_token_mask = attention_mask
    try:
        yield
    finally:
        for layer in layers:
            layer._goat_token_mask = None


@torch.no_grad()
def goat_metrics(model: nn.Module, sum_over_processes=None) -> dict[str, Any]:
    """``goat/aux_loss``, ``goat/expert_load`` (token fraction per expert, mean over layers), ``goat/max_load``,
    ``goat/router_entropy`` (mean over tokens), ``goat/init_svd_seconds`` from the records since the last clear; the
    counts over every process's tokens with ``sum_over_processes`` (as :func:`goat_aux_loss`)."""
    layers = [layer for layer in goat_layers(model) if layer._goat_aux]
    loads, ents = [], []
    for layer, counts in zip(layers, _record_counts(layers, sum_over_processes), strict=True):
        loads.append(torch.stack([c / (t.clamp(min=1) * layer.goat.top_k) for c, t, _ in counts]).mean(0))
        ents.append(torch.stack([e / t.clamp(min=1) for _, t, e in counts]).mean())
    out: dict[str, Any] = {
        "goat/aux_loss": float(goat_aux_loss(model)),
        "goat/init_svd_seconds": float(sum(l.goat_init_svd_seconds for l in goat_layers(model))),
    }
    if loads:
        load = torch.stack(loads).mean(0)
        out["goat/expert_load"] = [float(v) for v in load]
        out["goat/max_load"] = float(load.max())
        out["goat/router_entropy"] = float(torch.stack(ents).mean())
    return out


def save_goat(model: PeftModel, save_directory: str, write_weights: bool = True) -> str:
    """Write ``adapter_config.json`` (init_lora_weights=False; ``peft_type`` = :data:`GOAT_PEFT_TYPE`, so that plain
    PEFT loading fails loudly), ``adapter_model.safetensors`` and ``goat_config.json``. ``write_weights=False``: the
    adapter was already saved there (by the Trainer, which gathers sharded weights first); only the configs are
    written."""
    settings: GOATSettings | None = getattr(model, "goat_settings", None)
    layers = goat_layers(model)
    if not layers:
        raise ValueError("save_goat: the model has no GOAT layers")
    if settings is None:
        settings = type(layers[0]).goat
    if write_weights:
        model.save_pretrained(save_directory)
    cfg_path = os.path.join(save_directory, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["init_lora_weights"] = False
    cfg["peft_type"] = GOAT_PEFT_TYPE
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    layer = layers[0]
    ad = layer.active_adapters[0]
    d = layer.r[ad] // settings.num_experts
    info = dict(asdict(settings), s=float(layer.scaling[ad]), expert_rank=d, format_version=GOAT_FORMAT_VERSION,
                skipped_targets=list(getattr(model, "goat_skipped_targets", [])))
    with open(os.path.join(save_directory, GOAT_CONFIG_NAME), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return save_directory


def goat_lora_config_from_dir(path: str) -> LoraConfig:
    """The ``LoraConfig`` of a GOAT adapter directory (its ``peft_type`` marker replaced by LORA)."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        raw = json.load(f)
    raw["peft_type"] = "LORA"
    cfg = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**raw))
    cfg.init_lora_weights = False
    return cfg


@torch.no_grad()
def load_goat_weights_(model: PeftModel, path: str, adapter_name: str = "default") -> None:
    """Load a GOAT adapter's weights into an existing GOAT model (resume); every GOAT key must match."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_peft_weights(path, device="cpu"), adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", None):
        raise UserError(f"{path}: GOAT adapter does not match the model (missing {missing[:3]}, unexpected "
                        f"{list(result.unexpected_keys)[:3]})")


def load_goat(base_model: nn.Module, path: str, is_trainable: bool = False, adapter_name: str = "default") -> PeftModel:
    """Load a GOAT adapter saved by :func:`save_goat` onto ``base_model`` (no SVD runs)."""
    gpath = os.path.join(path, GOAT_CONFIG_NAME)
    if not os.path.isfile(gpath):
        raise UserError(f"{path}: no {GOAT_CONFIG_NAME}; not a GOAT adapter directory")
    with open(gpath) as f:
        info = json.load(f)
    if int(info.get("format_version", 0)) > GOAT_FORMAT_VERSION:
        raise UserError(f"{gpath}: format_version {info['format_version']} is newer than supported")
    fields = {k: info[k] for k in GOATSettings.__dataclass_fields__ if k in info}
    settings = GOATSettings(**fields)
    cfg = goat_lora_config_from_dir(path)
    cfg._register_custom_module({nn.Linear: make_goat_linear(settings)})
    model = PeftModel.from_pretrained(base_model, path, config=cfg, is_trainable=is_trainable,
                                      adapter_name=adapter_name, autocast_adapter_dtype=False)
    model.goat_settings = settings
    model.goat_skipped_targets = info.get("skipped_targets", [])
    layers = goat_layers(model)
    if not layers:
        raise UserError(f"{path}: loading produced no GOAT layers")
    if settings.fold_residual:
        for layer in layers:
            layer.fold_residual_(adapter_name)
    return model


# --------------------------------------------------------------------------------------------------------------
# Trainer wiring
# --------------------------------------------------------------------------------------------------------------
def logs_at_step_end(trainer) -> bool:
    """Whether the optimizer step in progress ends with a ``log`` call (HF's ``DefaultFlowCallback`` rule for
    ``logging_strategy: steps``: every ``logging_steps``-th step, and step 1 with ``logging_first_step``). Other
    strategies: True (every step, as their log step is not known in advance)."""
    args, state = trainer.args, trainer.state
    strategy = getattr(args.logging_strategy, "value", args.logging_strategy)
    if strategy != "steps":
        return strategy != "no"
    step = state.global_step + 1
    if step == 1 and args.logging_first_step:
        return True
    every = state.logging_steps or args.logging_steps
    return bool(every) and step % math.ceil(every) == 0


class GOATTrainerMixin:
    """Mixin for ``transformers.Trainer`` / TRL trainers: ``loss = task + aux_coef · goat_aux_loss``.

    ``compute_loss`` clears the per-layer buffers, sets the attention-mask token filter, runs the parent's
    ``compute_loss`` and adds the balance loss. The ``goat/*`` metrics (and their cross-process reductions) are
    computed only in the optimizer steps that end with a ``log`` call (:func:`logs_at_step_end`), from the last
    micro-batch, and logged there.
    """

    goat_aux_coef: float | None = None
    # the balance loss counts each row's real tokens (attention_mask): a trainer that would run a shared prompt once
    # for several rows (posttrain.logprobs shared prompts) runs them whole instead
    counts_body_tokens = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        clear_goat_aux(model)
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        with goat_token_mask(model, mask):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        loss, extra = (out[0], out[1]) if return_outputs else (out, None)
        coef = self.goat_aux_coef
        if coef is None:
            layers = goat_layers(model)
            coef = type(layers[0]).goat.aux_coef if layers else 0.0
        if coef and model.training:
            from posttrain.distributed import reduce_metrics

            accelerator = self.accelerator
            summed = (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None
            aux = goat_aux_loss(model, summed, accelerator.num_processes)
            if logs_at_step_end(self):
                # statistics of the global batch; the balance loss is each process's share of it: averaged
                metrics = goat_metrics(model, summed)
                metrics.update(reduce_metrics(accelerator, {"goat/aux_loss": aux.detach()}))
                self._goat_last_metrics = metrics
            # The Trainer divides the loss by the GA steps only when compute_loss did not already normalise by
            # num_items_in_batch; in that case scale the per-micro-batch aux so it is averaged, not summed, over GA.
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                    getattr(self, "compute_loss_func", None) is not None)
            if scaled:
                aux = aux / max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
            loss = loss + coef * aux.to(loss.device, loss.dtype)
        return (loss, extra) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        m = getattr(self, "_goat_last_metrics", None)
        if m and "loss" in logs:
            logs.update({k: v for k, v in m.items() if not isinstance(v, list)})
        return super().log(logs, *args, **kwargs)
