"""The unlearning objectives: ``L = gamma * L_forget + alpha * L_retain`` (docs/methods/npo.md#objectives), built from
registered terms. Importable without torch (the functions import it inside).

:data:`FORGET_TERMS` and :data:`RETAIN_TERMS` hold one entry per term (``terms/<name>.py``);
:data:`UNLEARNING_OBJECTIVES` one entry per objective (``methods/<page>.py``), naming its two terms and its default
weights, whose ``fn`` is a pure ``objective(params, fwd: UnlearningForward) -> UnlearningOutput``. Every term and
every objective declares what it ``needs`` from the forward pass (:data:`UNLEARNING_NEEDS`; an objective's
``needs(params)`` is its forget term's plus, when the params' retain weight is not 0, its retain term's); whether it
reads the retain set or a frozen reference model follows from them (:func:`uses_retain`, :func:`uses_reference`).
The trainer computes exactly the declared needs into :class:`UnlearningForward`, never asking the method's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from posttrain.registry import Registry, UnlearningObjectiveEntry, UnlearningTermEntry

if TYPE_CHECKING:
    import torch

    from posttrain.losses.unlearning import UnlearningOutput

# What a term or objective can ask of the forward pass (its entry's ``needs``); the trainer computes exactly these.
FORGET_LOGPS = "forget_logps"  # the policy's per-token log-probs of the forget answers
FORGET_REF_LOGPS = "forget_ref_logps"  # the reference's per-token log-probs of the forget answers
RETAIN_LOGPS = "retain_logps"  # the policy's per-token log-probs of the retain answers
RETAIN_KL = "retain_kl"  # the token KL(pi_ref || pi_theta) on the retain rows (params.retain_kl_every_position)
FORGET_ACTIVATIONS = "forget_activations"  # one layer's policy hidden states on the forget rows (RMU)
RETAIN_ACTIVATIONS = "retain_activations"  # one layer's policy and reference hidden states on the retain rows (RMU)
UNLEARNING_NEEDS = frozenset({FORGET_LOGPS, FORGET_REF_LOGPS, RETAIN_LOGPS, RETAIN_KL, FORGET_ACTIVATIONS,
                              RETAIN_ACTIVATIONS})
REFERENCE_NEEDS = frozenset({FORGET_REF_LOGPS, RETAIN_KL, RETAIN_ACTIVATIONS})  # computed with the frozen reference
RETAIN_NEEDS = frozenset({RETAIN_LOGPS, RETAIN_KL, RETAIN_ACTIVATIONS})  # read the retain rows

FORGET_TERMS: Registry[UnlearningTermEntry] = Registry("unlearning forget term", UnlearningTermEntry)
"""A forget term: ``fn(logps, mask, ref_logps, num_items, *, beta, delta) -> (loss, metrics)``."""
RETAIN_TERMS: Registry[UnlearningTermEntry] = Registry("unlearning retain term", UnlearningTermEntry)
"""A retain term: ``fn(num_items, *, logps, mask, logits, ref_logits, kl_mask, token_kl) -> (loss, metrics)``, reading
the ones its ``needs`` name."""
UNLEARNING_OBJECTIVES: Registry[UnlearningObjectiveEntry] = Registry("unlearning objective", UnlearningObjectiveEntry)
"""``method.name`` of the unlearning family (and ``ga_kl``, not selectable) -> its pure objective ``fn(params, fwd)``:
:func:`forget_retain_objective` of its terms on log-probs, or, for an entry that ``steers_activations`` (RMU),
:func:`posttrain.losses.unlearning.rmu_loss` on one layer's hidden states."""


@dataclass(frozen=True)
class ObjectiveWeights:
    """The weights of ``L = gamma * L_forget + alpha * L_retain`` and the forget term's ``beta`` / ``delta`` that a
    method's params set (``params.objective_weights()``); None: the objective's default."""

    gamma: float | None = None
    alpha: float | None = None
    beta: float | None = None
    delta: float | None = None


@dataclass(frozen=True)
class UnlearningForward:
    """What an unlearning objective receives: the forward of one micro-batch's forget and retain rows (per-token
    tensors ``[B, T]``), holding what its terms need (None otherwise).

    On log-probs: the policy's ``forget_logps`` / ``forget_mask`` (shifted label mask); the reference's
    ``forget_ref_logps`` (a forget term that ``uses_reference``); the retain NLL's ``retain_logps`` / ``retain_mask``;
    the retain KL's ``retain_logits`` / ``retain_ref_logits`` (``[B, T, V]``) and ``retain_kl_mask`` (None: every
    position); ``forget_num_items`` / ``retain_num_items``: the token-mean denominators (None: the micro-batch's count;
    with several processes each process's share of the global count). On activations (``steers_activations``):
    ``forget_activations`` / ``retain_activations`` / ``retain_ref_activations`` ``[B, T, d]`` of one layer, the
    answer-token masks ``forget_mask`` / ``retain_mask`` and the ``control_vector``."""

    forget_logps: torch.Tensor | None = None
    forget_mask: torch.Tensor | None = None
    forget_ref_logps: torch.Tensor | None = None
    retain_logps: torch.Tensor | None = None
    retain_mask: torch.Tensor | None = None
    retain_logits: torch.Tensor | None = None
    retain_ref_logits: torch.Tensor | None = None
    retain_kl_mask: torch.Tensor | None = None
    retain_token_kl: torch.Tensor | None = None
    forget_num_items: Any = None
    retain_num_items: Any = None
    forget_activations: torch.Tensor | None = None
    retain_activations: torch.Tensor | None = None
    retain_ref_activations: torch.Tensor | None = None
    control_vector: torch.Tensor | None = None


def term_needs(forget: frozenset[str], retain: frozenset[str] = frozenset()) -> Callable[[Any], frozenset[str]]:
    """An objective's ``needs(params)``: ``forget``, plus ``retain`` unless the params' retain weight is 0."""
    forget, retain = frozenset(forget), frozenset(retain)

    def needs(params) -> frozenset[str]:
        return forget | retain if retain and params.retain_weight != 0.0 else forget

    return needs


def uses_retain(name: str, params) -> bool:
    """Whether objective ``name`` with ``params`` reads the retain set (a retain term with a non-zero weight)."""
    return bool(UNLEARNING_OBJECTIVES[name].needs(params) & RETAIN_NEEDS)


def uses_reference(name: str, params) -> bool:
    """Whether objective ``name`` with ``params`` compares with a frozen reference model: its forget term does (NPO),
    or its retain term, when there is one, does (the KL and RMU activation terms)."""
    return bool(UNLEARNING_OBJECTIVES[name].needs(params) & REFERENCE_NEEDS)


def unlearning_objective(
    method: str,
    *,
    forget_logps: torch.Tensor,
    forget_mask: torch.Tensor,
    forget_ref_logps: torch.Tensor | None = None,
    retain_logps: torch.Tensor | None = None,
    retain_mask: torch.Tensor | None = None,
    retain_logits: torch.Tensor | None = None,
    retain_ref_logits: torch.Tensor | None = None,
    retain_kl_mask: torch.Tensor | None = None,
    retain_token_kl: torch.Tensor | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    alpha: float | None = None,
    delta: float | None = None,
    forget_num_items: int | torch.Tensor | None = None,
    retain_num_items: int | torch.Tensor | None = None,
) -> UnlearningOutput:
    """Total unlearning objective ``L = gamma * L_forget + alpha * L_retain`` (docs/methods/npo.md#objectives; NPO,
    arXiv 2404.05868), a pure function of the tensors.

    ``method`` names an :data:`UNLEARNING_OBJECTIVES` entry on log-probs, whose ``forget`` / ``retain`` terms and
    default weights apply (``None`` arguments take them): ``ga`` (GA), ``grad_diff`` (GA + retain NLL), ``ga_kl`` (GA
    + retain KL), ``npo``, ``npo_rt`` (NPO + NLL = open-unlearning's ``NPO``), ``npo_kl`` (NPO + KL), ``simnpo``
    (SimNPO + NLL = open-unlearning's ``SimNPO``).

    Inputs: forget per-token ``forget_logps``/``forget_mask`` ``[B, T]``; for a forget term that ``uses_reference``
    also ``forget_ref_logps`` (``[B, T]`` on the same mask, or sequence sums ``[B]``); the retain term's ``inputs``
    (``retain_logps``/``retain_mask`` for the NLL, ``retain_logits``/``retain_ref_logits`` ``[N, V]`` or
    ``[B, T, V]`` and optionally ``retain_kl_mask`` for the KL, see
    :func:`posttrain.losses.unlearning.retain_kl_loss`). ``*_num_items`` override the token-mean denominators of the
    forget NLL (GA and the logged ``forget_nll``) and of the retain NLL / KL (``retain_token_kl`` ``[B, T]``: the KL
    per position, summed over ``retain_kl_mask``, instead of the logits) (with several processes the trainer
    passes each process's share of the global token count, posttrain.distributed.process_share, so that the averaged
    gradient is that of the global token mean).
    """
    import torch

    from posttrain.losses.unlearning import UnlearningOutput, nll_loss

    if method not in UNLEARNING_OBJECTIVES or UNLEARNING_OBJECTIVES[method].steers_activations:
        known = ", ".join(e.name for e in UNLEARNING_OBJECTIVES if not e.steers_activations)
        raise ValueError(f"unknown unlearning method {method!r}; expected one of {known}")
    entry = UNLEARNING_OBJECTIVES[method]
    gamma = entry.gamma if gamma is None else gamma
    alpha = entry.alpha if alpha is None else alpha
    beta = entry.beta if beta is None else beta
    delta = entry.delta if delta is None else delta
    metrics: dict[str, float] = {}

    with torch.no_grad():  # the token mean the GA term sees (forget_num_items: see below)
        metrics["forget_nll"] = float(nll_loss(forget_logps.detach(), forget_mask, forget_num_items))

    forget = FORGET_TERMS[entry.forget]
    if FORGET_REF_LOGPS in forget.needs and forget_ref_logps is None:
        raise ValueError(f"method {method!r} needs forget_ref_logps (the reference model's forget log-probs)")
    forget_loss, forget_metrics = forget.fn(forget_logps, forget_mask, forget_ref_logps, forget_num_items, beta=beta,
                                            delta=delta)
    metrics.update(forget_metrics)

    retain_loss = None
    if entry.retain is not None and alpha != 0:
        retain = RETAIN_TERMS[entry.retain]
        given = {"logps": retain_logps, "mask": retain_mask, "logits": retain_logits, "ref_logits": retain_ref_logits,
                 "kl_mask": retain_kl_mask, "token_kl": retain_token_kl}
        missing = _missing_retain_inputs(retain.needs, given)
        if missing:
            raise ValueError(f"method {method!r} needs {missing}")
        retain_loss, retain_metrics = retain.fn(retain_num_items, **given)
        metrics.update(retain_metrics)

    loss = gamma * forget_loss
    if retain_loss is not None:
        loss = loss + alpha * retain_loss
    metrics["forget_loss"] = float(forget_loss.detach())
    if retain_loss is not None:
        metrics["retain_loss"] = float(retain_loss.detach())
    metrics["loss"] = float(loss.detach())
    return UnlearningOutput(loss=loss, forget_loss=forget_loss, retain_loss=retain_loss, metrics=metrics)


def _missing_retain_inputs(needs: frozenset[str], given: dict) -> str | None:
    """The retain inputs a term with ``needs`` lacks in ``given``, as a message (None: complete)."""
    if RETAIN_LOGPS in needs and (given["logps"] is None or given["mask"] is None):
        return "retain_logps and retain_mask"
    if RETAIN_KL in needs and given["token_kl"] is None and (given["logits"] is None or given["ref_logits"] is None):
        return "retain_logits and retain_ref_logits (or retain_token_kl)"
    return None


def forget_retain_objective(method: str, params: Any, f: UnlearningForward) -> UnlearningOutput:
    """:func:`unlearning_objective` of objective ``method`` on ``f``'s tensors, with the weights the params give
    (``params.objective_weights()``; None: the objective's default); the body of every log-prob objective (NPO,
    arXiv 2404.05868)."""
    w = params.objective_weights()
    return unlearning_objective(
        method,
        forget_logps=f.forget_logps,
        forget_mask=f.forget_mask,
        forget_ref_logps=f.forget_ref_logps,
        retain_logps=f.retain_logps,
        retain_mask=f.retain_mask,
        retain_logits=f.retain_logits,
        retain_ref_logits=f.retain_ref_logits,
        retain_kl_mask=f.retain_kl_mask,
        retain_token_kl=f.retain_token_kl,
        forget_num_items=f.forget_num_items,
        retain_num_items=f.retain_num_items,
        gamma=w.gamma,
        alpha=w.alpha,
        beta=w.beta,
        delta=w.delta,
    )
