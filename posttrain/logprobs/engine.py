"""The log-prob engine: per-token log-probs of completion tokens, and what an objective needs besides them.

One call, :meth:`LogProbEngine.forward`, takes a batch in the collators' layout (``input_ids``, ``attention_mask``,
``completion_mask``, all ``[B, T]``; left or right padding) and returns :class:`LogProbs` aligned with it:
``logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` wherever ``completion_mask`` is 1, zero elsewhere. On the
way it

1. runs the model's body only (``model.base_model``: the decoder without its LM head), through the model's own
   ``forward`` so that DDP, DeepSpeed, FSDP2 and PEFT wrappers (LoRA and the variants in :mod:`posttrain.adapters`)
   see an ordinary call: :func:`install` adds a ``posttrain_logprobs=`` keyword to the causal LM's ``forward``;
2. gathers the hidden states of the positions that predict a completion token, and only those;
3. runs the LM head over those rows (:mod:`posttrain.logprobs.heads`: ``chunked`` | ``fused`` | ``liger``, ``auto``
   per device and model, logged once), plus, when the objective's :class:`Needs` ask: the entropy per token, the
   hidden states, full-vocabulary log-prob rows at chosen positions, the rows themselves (for another model's KL),
   and a tiled per-token KL against another model's rows (:func:`posttrain.logprobs.heads.tiled_token_kl`).

With ``groups`` (a group id per row: the two rows of a preference pair, the G completions of a GRPO prompt), rows of
a group are packed around their shared prompt (:mod:`posttrain.logprobs.layout`, arXiv 2410.20305 / 2506.05433):
the prompt runs through the body once per group, under a block attention mask and restarted position ids, and every
output equals the unshared one. Attention implementations that cannot take an explicit mask (flash-attention, flex
without a block mask, sliding-window layers, models without ``position_ids``) run the rows unshared, said once in the
log. The reference side is the same call under ``torch.no_grad()`` (:meth:`LogProbEngine.reference_forward`).

docs/logprob_engine.md describes the guarantees and the measured costs (benchmarks/logprob_engine.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from dataclasses import dataclass

import torch

from posttrain.logprobs import heads as H
from posttrain.logprobs.layout import additive_mask, block_mask, shared_layout
from posttrain.distributed import full_weight, gathered, wants_fsdp, zero3_enabled

logger = logging.getLogger("posttrain")
_LOGGED: set[str] = set()

# attention implementations that take an explicit [B, 1, L, L] mask, and the form they take it in
MASK_FORMS = {"sdpa": "bool", "eager": "additive"}


def log_once(message: str) -> None:
    """Log ``message`` (INFO, ``posttrain`` logger) the first time this process sees it."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


@dataclass(frozen=True)
class Needs:
    """What an objective asks of the forward besides per-token log-probs of the completion tokens.

    ``entropy``: entropy of each completion token's next-token distribution. ``hidden``: the body's last hidden
    states ``[B, T, H]`` in the caller's layout. ``full_vocab``: full-vocabulary log-prob rows at the positions the
    call's ``full_vocab_mask`` gives (default: every completion token). ``rows``: the hidden rows that predict the
    completion tokens, with the head, for another model's tiled KL against them (:class:`HeadRows`).
    ``statistics``: per-token :data:`~posttrain.logprobs.heads.ROW_STATISTICS` (mean logit, whether the target is the
    argmax, log sum_v p_v^2), never differentiated, from the head's own chunks of logits. ``layer_states``: the
    body's hidden states after the embeddings and after every layer (``output_hidden_states``), each ``[B, T, H]`` in
    the caller's layout (SparsePO's masks read them from the reference).
    """

    entropy: bool = False
    hidden: bool = False
    full_vocab: bool = False
    rows: bool = False
    statistics: tuple[str, ...] = ()
    layer_states: bool = False


@dataclass
class HeadRows:
    """The rows predicting the completion tokens (``hidden [N, H]``, in ``mask.nonzero()`` order) and the head that
    turns them into logits (``weight``, ``bias``, ``scale`` = logit scale / temperature)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float


@dataclass
class LogProbs:
    """The engine's output, aligned with the caller's ``[B, T]`` batch (zeros where ``mask`` is False)."""

    logps: torch.Tensor  # [B, T] fp32
    mask: torch.Tensor  # [B, T] bool: completion tokens scored
    entropy: torch.Tensor | None = None  # [B, T] fp32
    kl: torch.Tensor | None = None  # [B, T] fp32, against ``kl_with``
    hidden: torch.Tensor | None = None  # [B, T, H]
    full_vocab: torch.Tensor | None = None  # [n, V] fp32 rows, in full_vocab_mask.nonzero() order
    rows: HeadRows | None = None
    statistics: dict[str, torch.Tensor] | None = None  # name -> [B, T] (Needs.statistics)
    layer_states: tuple[torch.Tensor, ...] | None = None  # each [B, T, H] (Needs.layer_states)
    shared: bool = False  # whether the body ran on shared-prompt packed rows
    body_tokens: int = 0  # real tokens the body computed

    def sequence_logps(self) -> torch.Tensor:
        """Sum of the completion tokens' log-probs per row ``[B]``."""
        return self.logps.sum(-1)


# ----------------------------------------------------------------------------------------------------------------------
# the model side: unwrapping and the patched forward
# ----------------------------------------------------------------------------------------------------------------------


def causal_lm(model):
    """The causal LM (the module with the LM head) inside DDP / DeepSpeed (``.module``) and PEFT wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DeepSpeedEngine
            model = model.module
        else:
            return model


def install(model) -> None:
    """Give the causal LM inside ``model`` a ``posttrain_logprobs=`` keyword on its ``forward`` (once; the
    original forward runs unchanged without it, so generation and TRL's own fused head keep working)."""
    lm = causal_lm(model)
    if getattr(lm, "_posttrain_logprob_engine", False):
        return
    original = lm.forward

    @functools.wraps(type(lm).forward)  # keep the signature: generate() validates model kwargs against it
    def forward(self, *args, posttrain_logprobs=None, **kwargs):
        if posttrain_logprobs is None:
            return original(*args, **kwargs)
        return posttrain_logprobs.run(self, **kwargs)

    lm.forward = types.MethodType(forward, lm)
    lm._posttrain_logprob_engine = True


def _shared_prompt_blocker(lm) -> str | None:
    """Why this model cannot run shared-prompt packed rows (None when it can)."""
    cfg = lm.config.get_text_config()
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in MASK_FORMS:
        return f"attention implementation {impl!r} takes no explicit block mask"
    layer_types = getattr(cfg, "layer_types", None)
    if (layer_types is None and getattr(cfg, "sliding_window", None) is not None) or (
            layer_types is not None and any(t != "full_attention" for t in layer_types)):
        return "the model has sliding-window (or other non-full) attention layers"
    if "position_ids" not in inspect.signature(lm.base_model.forward).parameters:
        return f"{type(lm.base_model).__name__} takes no position_ids"
    return None


@dataclass
class _Call:
    """One engine request, run inside the causal LM's forward (so under ZeRO-3 / FSDP2 the body and the head are
    used where the sharding hooks expect them)."""

    predictors: torch.Tensor  # [N] flat positions (in the body's [R * L] output) that predict each completion token
    targets: torch.Tensor  # [N] the completion tokens
    head: str
    temperature: float
    chunk_rows: int | None
    needs: Needs
    hidden_index: torch.Tensor | None  # [B, T] flat positions of the caller's tokens (-1: padding), for needs.hidden
    # and needs.layer_states
    full_vocab_rows: torch.Tensor | None  # [n] indices into the N rows
    kl_with: HeadRows | None
    kl_direction: str

    def run(self, lm, **kwargs):
        # wrappers pass their own keywords along (PEFT: labels=None, return_dict=None, ...): the body gets its inputs
        body = {k: kwargs[k] for k in ("input_ids", "attention_mask", "position_ids") if kwargs.get(k) is not None}
        states = lm.base_model(**body, use_cache=False, **(
            {"output_hidden_states": True} if self.needs.layer_states else {}))
        hidden = states.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        head = lm.get_output_embeddings()
        weight = full_weight(head.weight)
        bias = None if getattr(head, "bias", None) is None else full_weight(head.bias)
        rows = flat[self.predictors].to(weight.device)
        transform = H.logit_transform(lm.config)
        logps, entropy, statistics = H.LOGPROB_HEADS[self.head].fn(
            rows, weight, bias, self.targets.to(weight.device), transform=transform, temperature=self.temperature,
            chunk_rows=self.chunk_rows, with_entropy=self.needs.entropy, statistics=self.needs.statistics)
        out = {"logps": logps, "entropy": entropy, "statistics": statistics}
        scale = transform.scale / self.temperature
        if self.kl_with is not None:
            other = self.kl_with
            out["kl"] = H.tiled_token_kl(rows, weight, bias, other.hidden.to(rows.device), other.weight, other.bias,
                                         direction=self.kl_direction, scale=scale, other_scale=other.scale,
                                         chunk_rows=self.chunk_rows)
        if self.full_vocab_rows is not None:
            if getattr(head.weight, "ds_id", None) is not None:  # plain autograd would keep a released ZeRO-3 shard
                raise NotImplementedError("full-vocabulary log-prob rows under DeepSpeed ZeRO-3 (partitioned LM head) "
                                          "are not supported yet")
            out["full_vocab"] = H.full_vocab_logps(rows[self.full_vocab_rows], weight, bias, transform=transform,
                                                   temperature=self.temperature)
        if self.needs.rows:
            if wants_fsdp() or zero3_enabled():
                # a sharded head is freed after the forward (FSDP2), or not gathered again for another model's call
                # (ZeRO-3, a reference's inference engine): keep a whole copy for the later KL (no gradient)
                with gathered(weight, bias):
                    out["rows"] = HeadRows(rows, weight.detach().clone(),
                                           None if bias is None else bias.detach().clone(), scale)
            else:
                out["rows"] = HeadRows(rows, head.weight, getattr(head, "bias", None), scale)
        if self.hidden_index is not None:
            keep = self.hidden_index >= 0

            def caller_layout(states):
                states = states.reshape(-1, states.shape[-1])
                return states[self.hidden_index.clamp(min=0)] * keep[..., None].to(states.dtype)

            if self.needs.hidden:
                out["hidden"] = caller_layout(hidden)
            if self.needs.layer_states:
                out["layer_states"] = tuple(caller_layout(h) for h in states.hidden_states)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------------


class LogProbEngine:
    """Completion-only log-probs with shared prompts; see the module docstring.

    ``head``: ``auto`` | ``chunked`` | ``fused`` | ``liger`` (``training.logprob_head``). ``share_prompts``: pack
    the rows of a group (``groups=`` of :meth:`forward`) around their shared prompt where the attention
    implementation allows. ``temperature``: logits are divided by it. ``chunk_rows``: rows per head chunk (default:
    one ``[rows, V]`` fp32 chunk of 64 MiB).
    """

    def __init__(self, head: str = "auto", *, share_prompts: bool = True, temperature: float = 1.0,
                 chunk_rows: int | None = None):
        if head not in H.head_choices():
            from posttrain.errors import UserError

            raise UserError(f"training.logprob_head: unknown head {head!r}; known: {', '.join(H.head_choices())}")
        self.head = head
        self.share_prompts = share_prompts
        self.temperature = float(temperature)
        self.chunk_rows = chunk_rows

    def resolve_head(self, model, needs: Needs = Needs()) -> str:
        """The head this engine runs for ``model`` (``auto`` resolved; refused when unavailable), logged once."""
        lm = causal_lm(model)
        device = lm.get_output_embeddings().weight.device
        name, why = H.choose_head(self.head, device, H.logit_transform(lm.config), needs.entropy)
        log_once(f"log-prob head: {name} ({why})")
        return name

    def sharing(self, model, groups) -> bool:
        """Whether a call with ``groups`` runs shared-prompt packed rows on ``model`` (else unshared, logged once)."""
        if groups is None or not self.share_prompts:
            return False
        blocker = _shared_prompt_blocker(causal_lm(model))
        if blocker is not None:
            log_once(f"shared prompts off: {blocker}; every row runs whole (same results, no saving)")
            return False
        return True

    def forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, *,
                groups=None, needs: Needs = Needs(), full_vocab_mask: torch.Tensor | None = None,
                kl_with: HeadRows | None = None, kl_direction: str = "base_to_policy",
                share_until: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> LogProbs:
        """Score the completion tokens of a ``[B, T]`` batch with ``model`` (see :class:`LogProbs`).

        ``groups``: a group id per row (rows of a group share their prompt; None: no sharing). ``share_until``: a
        ``[B, T]`` mask whose first token in each group ends the shared prompt (default: ``completion_mask``; give the
        responses when ``completion_mask`` also scores prompt tokens, as ORPO's SFT term does: a scored prompt token
        is predicted from the shared prompt, the same for every row). ``kl_with``: another
        model's :class:`HeadRows` for the same batch (``needs.rows`` of its call), giving ``kl`` per token in
        ``kl_direction`` (``base_to_policy`` = KL(other || model), ``policy_to_base`` = KL(model || other)).
        ``position_ids``: the caller's own positions, for packed rows (several sequences per row, positions restarting
        at 0: TRL's padding-free collation); with ``attention_mask=None`` the body gets no mask and attends within
        each sequence, as the model does for packed rows. Rows then run unshared.
        """
        install(model)
        lm = causal_lm(model)
        packed = attention_mask is None
        if packed and position_ids is None:
            raise ValueError("attention_mask=None needs the packed rows' position_ids")
        attention_mask = torch.ones_like(input_ids) if packed else attention_mask.to(input_ids.device)
        mask = completion_mask.to(input_ids.device).bool() & attention_mask.bool()
        if bool(mask[:, 0].any()):
            raise ValueError("a completion token in the first column has no preceding token to predict it from")
        if needs.full_vocab and full_vocab_mask is None:
            full_vocab_mask = mask
        batch, width = input_ids.shape
        shared = position_ids is None and self.sharing(model, groups)
        if shared:
            cut = mask if share_until is None else share_until.to(mask.device).bool() & attention_mask.bool()
            layout = shared_layout(input_ids, attention_mask, cut, groups,
                                   pad_token_id=int(getattr(lm.config, "pad_token_id", None) or 0))
            index = layout.index
            allowed = block_mask(layout.segments)
            form = MASK_FORMS[lm.config.get_text_config()._attn_implementation or "eager"]
            attn = allowed if form == "bool" else additive_mask(allowed, lm.get_input_embeddings().weight.dtype)
            body = {"input_ids": layout.input_ids, "attention_mask": attn, "position_ids": layout.position_ids}
            body_tokens = layout.tokens
        else:
            index = torch.arange(batch * width, device=input_ids.device).view(batch, width)
            index = index.masked_fill(~attention_mask.bool(), -1)
            # positions count real tokens only, as in the packed rows: a left-padded row is scored at the positions
            # it has alone (RoPE is shift-invariant, but its rounding is not)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if position_ids is None else position_ids
            body = {"input_ids": input_ids, "position_ids": positions.to(input_ids.device)}
            if not packed:
                body["attention_mask"] = attention_mask
            body_tokens = int(attention_mask.sum())
        rows_b, rows_t = mask.nonzero(as_tuple=True)
        predictors = index[rows_b, rows_t - 1]
        if bool((predictors < 0).any()):
            raise ValueError("a completion token follows a padding position: its predictor is not a real token")
        full_rows = None
        if needs.full_vocab or full_vocab_mask is not None:
            full_rows = (full_vocab_mask.to(mask.device).bool() & mask)[mask].nonzero(as_tuple=True)[0]
        if kl_with is not None and kl_with.hidden.shape[0] != predictors.shape[0]:
            raise ValueError(f"kl_with has {kl_with.hidden.shape[0]} rows for {predictors.shape[0]} completion tokens")
        call = _Call(predictors, input_ids[rows_b, rows_t], self.resolve_head(model, needs), self.temperature,
                     self.chunk_rows, needs, index if needs.hidden or needs.layer_states else None, full_rows, kl_with,
                     kl_direction)
        out = model(**body, posttrain_logprobs=call)

        def spread(flat):
            return None if flat is None else flat.new_zeros(mask.shape).masked_scatter(mask, flat.to(mask.device))

        statistics = {name: spread(value) for name, value in out["statistics"].items()} if needs.statistics else None
        return LogProbs(logps=spread(out["logps"]), mask=mask, entropy=spread(out["entropy"]), kl=spread(out.get("kl")),
                        hidden=out.get("hidden"), full_vocab=out.get("full_vocab"), rows=out.get("rows"),
                        statistics=statistics, layer_states=out.get("layer_states"), shared=shared,
                        body_tokens=body_tokens)

    def reference_forward(self, reference, policy, input_ids, attention_mask, completion_mask, *, groups=None,
                          needs: Needs = Needs(), share_until: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None) -> LogProbs:
        """The same forward for a frozen reference (:class:`posttrain.reference.Reference`: a separate model, or
        ``policy`` with its adapter disabled), under ``torch.no_grad()``."""
        with torch.no_grad(), reference.network(policy) as network:
            return self.forward(network, input_ids, attention_mask, completion_mask, groups=groups, needs=needs,
                                share_until=share_until, position_ids=position_ids)
