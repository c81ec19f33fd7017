"""The log-prob engine (posttrain.logprobs): its heads against hand-computed values and full logits, the shared-prompt
layout by hand, and shared vs unshared forwards equal in log-probs, losses and gradients (<= 1e-5 relative, fp32) with
left and right padding, different prompt lengths, LoRA, gradient accumulation, Qwen2 and Llama, sdpa and eager."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from posttrain.errors import UserError
from posttrain.logprobs import LogProbEngine, Needs
from posttrain.logprobs import heads as H
from posttrain.logprobs.layout import PAD, PREFIX, additive_mask, block_mask, shared_layout

REL = 1e-5


def assert_rel_close(actual, expected, rel=REL, msg=""):
    """max |actual - expected| <= rel * max |expected| (the issue's 1e-5 relative, fp32)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    diff = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert diff <= rel * max(scale, 1e-30), f"{msg}: max |diff| {diff:.3g} > {rel} x {scale:.3g}"


# ----------------------------------------------------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------------------------------------------------


def test_chunked_head_hand_computed():
    # one row, logits [1, 0, 0]: log p(0) = 1 - log(e + 2), log p(1) = -log(e + 2)
    # entropy = log(e + 2) - e / (e + 2)
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    logps, entropy = H.chunked_token_logps(hidden, weight, None, torch.tensor([0, 1]), with_entropy=True)
    z = math.log(math.e + 2)
    assert logps.tolist() == pytest.approx([1 - z, -z], abs=1e-6)
    assert entropy.tolist() == pytest.approx([z - math.e / (math.e + 2)] * 2, abs=1e-6)
    # scale 2 (temperature 0.5): logits [2, 0, 0]
    logps, _ = H.chunked_token_logps(hidden[:1], weight, None, torch.tensor([0]), scale=2.0)
    assert logps.item() == pytest.approx(2 - math.log(math.e ** 2 + 2), abs=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
@pytest.mark.parametrize("grads", ["logps", "entropy", "both"])
def test_chunked_head_matches_full_logits_values_and_gradients(chunk_rows, grads):
    torch.manual_seed(0)
    n, h, v = 11, 8, 97
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    bias = torch.randn(v, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    w_lp, w_ent = torch.randn(n), torch.randn(n)

    def loss(lp, ent):
        return (lp * w_lp).sum() * (grads != "entropy") + (ent * w_ent).sum() * (grads != "logps")

    lp_full = torch.log_softmax((hidden @ weight.T + bias) * 0.8, -1)
    expected = (lp_full.gather(1, targets[:, None]).squeeze(1), -(lp_full.exp() * lp_full).sum(-1))
    g_expected = torch.autograd.grad(loss(*expected), [hidden, weight, bias])
    got = H.chunked_token_logps(hidden, weight, bias, targets, scale=0.8, chunk_rows=chunk_rows, with_entropy=True)
    g_got = torch.autograd.grad(loss(*got), [hidden, weight, bias])
    for a, e, what in zip(got, expected, ("logps", "entropy")):
        assert_rel_close(a, e, msg=what)
    for a, e, what in zip(g_got, g_expected, ("d hidden", "d weight", "d bias")):
        assert_rel_close(a, e, msg=what)


def test_tiled_kl_hand_computed_npo_retain_example():
    # docs/methods/npo.md worked example of the retain KL: p_ref = [.5,.3,.2], [.6,.2,.2];
    # p_theta = [.4,.4,.2], [.6,.3,.1]; mean over the two positions of KL(p_ref || p_theta) = 0.041402
    eye = torch.eye(3)
    policy = torch.tensor([[0.4, 0.4, 0.2], [0.6, 0.3, 0.1]]).log()
    ref = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]]).log()
    kl = H.tiled_token_kl(policy, eye, None, ref, eye, None, direction="base_to_policy")
    assert kl.mean().item() == pytest.approx(0.041402, abs=1e-6)
    by_hand = sum(q * math.log(q / p) for q, p in zip([0.5, 0.3, 0.2], [0.4, 0.4, 0.2]))
    assert kl[0].item() == pytest.approx(by_hand, abs=1e-6)
    reverse = H.tiled_token_kl(policy, eye, None, ref, eye, None, direction="policy_to_base")
    assert reverse[0].item() == pytest.approx(sum(p * math.log(p / q) for q, p in zip([0.5, 0.3, 0.2],
                                                                                    [0.4, 0.4, 0.2])), abs=1e-6)


@pytest.mark.parametrize("direction", ["base_to_policy", "policy_to_base"])
def test_tiled_kl_matches_token_kl_values_and_gradients(direction):
    from posttrain.losses.sft import token_kl

    torch.manual_seed(1)
    n, h, v = 9, 6, 53
    hidden, weight, bias = (torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True),
                            torch.randn(v, requires_grad=True))
    other_hidden, other_weight = torch.randn(n, h), torch.randn(v, h)
    w = torch.randn(n)
    expected = token_kl(hidden @ weight.T + bias, other_hidden @ other_weight.T, direction)
    g_expected = torch.autograd.grad((expected * w).sum(), [hidden, weight, bias])
    got = H.tiled_token_kl(hidden, weight, bias, other_hidden, other_weight, None, direction=direction, chunk_rows=4)
    g_got = torch.autograd.grad((got * w).sum(), [hidden, weight, bias])
    assert_rel_close(got, expected, msg="kl")
    for a, e in zip(g_got, g_expected):
        assert_rel_close(a, e)
    with pytest.raises(ValueError, match="unknown KL direction"):
        H.tiled_token_kl(hidden, weight, bias, other_hidden, other_weight, None, direction="forward")


def test_fused_head_is_trl_kernel_and_agrees_with_chunked():
    torch.manual_seed(2)
    hidden, weight = torch.randn(7, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(0, 40, (7,))
    kw = dict(transform=H.LogitTransform(), temperature=0.7, chunk_rows=None, with_entropy=True)
    statistics = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    *fused, fused_stats = H.LOGPROB_HEADS["fused"].fn(hidden, weight, None, targets, statistics=statistics, **kw)
    *chunked, chunked_stats = H.LOGPROB_HEADS["chunked"].fn(hidden, weight, None, targets, statistics=statistics, **kw)
    for a, e in zip(fused, chunked):
        assert_rel_close(a, e)
    for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
        assert_rel_close(fused_stats[name], chunked_stats[name], msg=name)
    assert_rel_close(chunked_stats["entropy"], chunked[1], msg="entropy statistic = entropy")
    assert torch.equal(fused_stats["is_top1"], chunked_stats["is_top1"])
    g_fused = torch.autograd.grad(fused[0].sum() + fused[1].sum(), [hidden, weight])
    g_chunked = torch.autograd.grad(chunked[0].sum() + chunked[1].sum(), [hidden, weight])
    for a, e in zip(g_fused, g_chunked):
        assert_rel_close(a, e)


def test_row_statistics_hand_computed_and_equal_in_every_path():
    # logits [1, 0, 0] (target 0) and [0, 2, 1] (target 2): mean logit 1/3 and 1; top-1 hit yes / no;
    # log sum_v p_v^2 = log((e^2 + 2) / (e + 2)^2) and log((1 + e^4 + e^2) / (1 + e^2 + e)^2);
    # entropy of the first row log(e + 2) - e / (e + 2)
    hidden = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    weight = torch.eye(3)
    targets = torch.tensor([0, 2])
    statistics = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    e = math.e
    expected_sq = [math.log((e ** 2 + 2) / (e + 2) ** 2), math.log((1 + e ** 4 + e ** 2) / (1 + e ** 2 + e) ** 2)]
    for chunk_rows in (1, 2):
        _, _, stats = H.chunked_token_logps_and_statistics(hidden, weight, None, targets, chunk_rows=chunk_rows,
                                                           statistics=statistics)
        assert stats["mean_logits"].tolist() == pytest.approx([1 / 3, 1.0], abs=1e-6)
        assert stats["entropy"][0].item() == pytest.approx(math.log(e + 2) - e / (e + 2), abs=1e-6)
        assert stats["is_top1"].tolist() == [True, False]
        assert stats["log_sum_sq_probs"].tolist() == pytest.approx(expected_sq, abs=1e-6)
    no_grad = H.row_statistics(hidden, weight, None, targets, statistics)
    assert no_grad["is_top1"].tolist() == [True, False]
    assert no_grad["log_sum_sq_probs"].tolist() == pytest.approx(expected_sq, abs=1e-6)


def test_full_vocab_rows_are_log_softmax():
    torch.manual_seed(3)
    hidden, weight = torch.randn(5, 4), torch.randn(30, 4)
    rows = H.full_vocab_logps(hidden, weight, None, temperature=2.0)
    assert_rel_close(rows, torch.log_softmax(hidden @ weight.T / 2.0, -1))
    capped = H.full_vocab_logps(hidden, weight, None, transform=H.LogitTransform(softcap=3.0))
    assert_rel_close(capped, torch.log_softmax(3.0 * torch.tanh(hidden @ weight.T / 3.0), -1))


def test_head_choice_per_device_and_refusals():
    plain, capped = H.LogitTransform(), H.LogitTransform(softcap=30.0)
    assert H.choose_head("auto", "cpu", plain, False)[0] == "chunked"
    assert H.choose_head("auto", "cpu", capped, False)[0] == "fused"
    assert H.choose_head("fused", "cpu", plain, True) == ("fused", "requested")
    assert set(H.head_choices()) == {"auto", "chunked", "fused", "liger"}
    with pytest.raises(UserError, match=r"^training\.logprob_head: liger cannot run here: liger-kernel runs on CUDA"):
        H.choose_head("liger", "cpu", plain, False)
    with pytest.raises(UserError, match=r"^training\.logprob_head: chunked cannot run here: the model soft-caps"):
        H.choose_head("chunked", "cpu", capped, False)
    with pytest.raises(UserError, match=r"^training\.logprob_head: unknown head 'fast'"):
        LogProbEngine("fast")


def test_logit_transform_reads_the_config():
    from transformers import Gemma2Config, GraniteConfig, Qwen2Config

    assert H.logit_transform(Qwen2Config()) == H.LogitTransform(1.0, None)
    assert H.logit_transform(Gemma2Config(final_logit_softcapping=30.0)).softcap == 30.0
    assert H.logit_transform(GraniteConfig(logits_scaling=8.0)).scale == pytest.approx(1 / 8)


# ----------------------------------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------------------------------


def test_shared_layout_of_a_pair_by_hand():
    # prompt [5 6 7], chosen [8 9], rejected [10]; right padding with 0
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 10, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    comp = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]])
    lay = shared_layout(ids, attn, comp, [0, 0])
    assert lay.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]  # the rejected token restarts at the prompt's end
    assert lay.segments.tolist() == [[PREFIX] * 3 + [1, 1, 2]]
    assert lay.index.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 5, -1]]
    assert lay.prefix_lengths.tolist() == [3] and lay.tokens == 6
    allowed = block_mask(lay.segments)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 0],
                       [1, 1, 1, 0, 0, 1]]  # the rejected token does not see the chosen ones
    add = additive_mask(block_mask(lay.segments), torch.float32)[0, 0]
    assert add[5, 3].item() == torch.finfo(torch.float32).min and add[5, 2].item() == 0.0


def test_shared_layout_left_padding_groups_and_caps():
    # group 0: two rows with left padding, prompts [4 5] shared, then [6] vs [7 8]
    # group 1: rows share [9] but the second row's completion starts at its second token: the prefix stops at 1
    # group 2: one row: its prompt is the prefix; a padding position in a packed row sees only itself
    ids = torch.tensor([[0, 0, 4, 5, 6], [0, 4, 5, 7, 8], [0, 0, 9, 3, 3], [0, 0, 9, 3, 2], [0, 1, 2, 3, 4]])
    attn = (ids != 0).long()
    comp = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]])
    lay = shared_layout(ids, attn, comp, [0, 0, 1, 1, 2])
    assert lay.prefix_lengths.tolist() == [2, 1, 2]
    assert lay.input_ids.tolist() == [[4, 5, 6, 7, 8], [9, 3, 3, 3, 2], [1, 2, 3, 4, 0]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 1, 2], [0, 1, 2, 3, 0]]
    assert lay.segments.tolist() == [[0, 0, 1, 2, 2], [0, 1, 1, 2, 2], [0, 0, 1, 1, PAD]]
    assert lay.index[1].tolist() == [-1, 0, 1, 3, 4] and lay.index[3].tolist() == [-1, -1, 5, 8, 9]
    assert block_mask(lay.segments)[2, 0, 4].tolist() == [False] * 4 + [True]


# ----------------------------------------------------------------------------------------------------------------------
# the engine on real (tiny) models: shared == unshared == full logits
# ----------------------------------------------------------------------------------------------------------------------


def _model(name="builtin:tiny-qwen2", attn="sdpa"):
    from posttrain.models import load_model

    torch.manual_seed(0)
    return load_model(name, attn_implementation=attn).float().train()  # dropout is 0 in the tiny configs


def _batch(prompts, continuations, side="right", pad=1):
    """Rows prompt_i + continuation_i, padded on ``side``; completion mask on the continuation."""
    rows = [p + c for p, c in zip(prompts, continuations)]
    width = max(map(len, rows))
    ids, attn, comp = [], [], []
    for p, c, row in zip(prompts, continuations, rows):
        fill = width - len(row)
        padding = ([pad] * fill, [0] * fill)
        body = (row, [1] * len(row), [0] * len(p) + [1] * len(c))
        if side == "right":
            ids.append(body[0] + padding[0]); attn.append(body[1] + padding[1]); comp.append(body[2] + padding[1])
        else:
            ids.append(padding[0] + body[0]); attn.append(padding[1] + body[1]); comp.append(padding[1] + body[2])
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(comp)


def _pairs(side="right", seed=0, vocab=1024):
    """Two preference pairs with different prompt lengths, TRL's layout: chosen rows first, then rejected rows."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(4, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rnd(9), rnd(5)]
    chosen, rejected = [rnd(4), rnd(7)], [rnd(6), rnd(3)]
    batch = _batch(prompts * 2, chosen + rejected, side)
    return batch, [0, 1, 0, 1]


def _groups(side="right", num_generations=4, seed=0, vocab=1024):
    """Two GRPO prompts (lengths 8 and 5), ``num_generations`` completions each (lengths 2..7), consecutive rows."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(4, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts, completions = [], []
    for plen in (8, 5):
        prompt = rnd(plen)
        for _ in range(num_generations):
            prompts.append(prompt)
            completions.append(rnd(int(torch.randint(2, 8, (1,), generator=g))))
    return _batch(prompts, completions, side), [i // num_generations for i in range(len(prompts))]


def _full_logits_logps(model, ids, attn, comp):
    """The plain path: full logits, log_softmax, gather (what every trainer would do without a fused head)."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1) * comp


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads_equal(got, expected, what):
    """The gradient w.r.t. all parameters, as one vector, within 1e-5 of its largest entry. (Per parameter would be
    meaningless for the key biases: softmax is shift-invariant, so their exact gradient is 0 and what autograd
    returns is rounding noise.)"""
    assert len(got) == len(expected)
    for a, e in zip(got, expected):
        assert (a is None) == (e is None), what
    flat = lambda grads: torch.cat([g.flatten() for g in grads if g is not None])  # noqa: E731
    assert_rel_close(flat(got), flat(expected), msg=what)


@pytest.mark.parametrize("model_name,attn", [("builtin:tiny-qwen2", "sdpa"), ("builtin:tiny-qwen2", "eager"),
                                             ("builtin:tiny-llama", "sdpa")])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["pairs", "groups"])
def test_shared_prompts_equal_unshared_logps_losses_and_gradients(model_name, attn, side, kind):
    model = _model(model_name, attn)
    (ids, am, cm), groups = _pairs(side) if kind == "pairs" else _groups(side)
    engine = LogProbEngine()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(5))  # a generic per-token loss

    unshared = engine.forward(model, ids, am, cm)
    shared = engine.forward(model, ids, am, cm, groups=groups)
    assert not unshared.shared and shared.shared and shared.body_tokens < unshared.body_tokens
    plain = _full_logits_logps(model, ids, am, cm)
    assert_rel_close(unshared.logps, plain, msg="unshared vs full logits")
    assert_rel_close(shared.logps, unshared.logps, msg="shared vs unshared")
    assert torch.equal(shared.mask, cm.bool())

    g_unshared = _grads(model, (unshared.logps * weights).sum())
    g_shared = _grads(model, (shared.logps * weights).sum())
    _assert_grads_equal(g_shared, g_unshared, "per-token loss")
    if kind == "pairs":  # the DPO loss itself, its reference side from the same engine under no_grad
        from posttrain.losses.preference import dpo_loss
        from posttrain.reference import Reference

        ref = _model(model_name, attn)
        with torch.no_grad():
            ref.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # a reference that differs from the policy

        def loss(out, ref_out):
            seq, ref_seq = out.sequence_logps(), ref_out.sequence_logps()
            return dpo_loss(seq[:2], seq[2:], ref_seq[:2], ref_seq[2:], beta=0.1).losses.mean()

        ref_unshared = engine.reference_forward(Reference(ref), model, ids, am, cm)
        ref_shared = engine.reference_forward(Reference(ref), model, ids, am, cm, groups=groups)
        assert ref_shared.shared and not ref_shared.logps.requires_grad
        assert_rel_close(ref_shared.logps, ref_unshared.logps, msg="reference")
        unshared, shared = engine.forward(model, ids, am, cm), engine.forward(model, ids, am, cm, groups=groups)
        l_unshared, l_shared = loss(unshared, ref_unshared), loss(shared, ref_shared)
        assert_rel_close(l_shared, l_unshared, msg="dpo loss")
        _assert_grads_equal(_grads(model, l_shared), _grads(model, l_unshared), "dpo loss")


def test_needs_entropy_hidden_full_vocab_and_rows_shared_equal_unshared():
    # a trained model: a random-init one predicts nearly uniform distributions, where the entropy's gradient
    # -p (log p + H) cancels almost entirely and fp32 rounding dominates it (full logits included)
    model = _model("builtin:tiny-qwen2-arith")
    (ids, am, cm), groups = _groups("left", num_generations=3)
    engine = LogProbEngine()
    needs = Needs(entropy=True, hidden=True, full_vocab=True, rows=True, layer_states=True)
    pick = cm.bool() & (torch.arange(ids.shape[1]) % 2 == 0)  # full-vocab rows at some completion positions
    unshared = engine.forward(model, ids, am, cm, needs=needs, full_vocab_mask=pick)
    shared = engine.forward(model, ids, am, cm, groups=groups, needs=needs, full_vocab_mask=pick)

    positions = (am.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=am, position_ids=positions, output_hidden_states=True)
    logp_full = torch.log_softmax(out.logits[:, :-1].float(), -1)
    entropy = torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.float32),
                         -(logp_full.exp() * logp_full).sum(-1)], 1) * cm
    assert_rel_close(unshared.entropy, entropy, msg="entropy vs full logits")
    assert_rel_close(shared.entropy, unshared.entropy, msg="entropy")
    hidden = out.hidden_states[-1] * am[..., None]
    assert_rel_close(unshared.hidden, hidden, msg="hidden vs model")
    assert_rel_close(shared.hidden, unshared.hidden, msg="hidden")
    assert len(unshared.layer_states) == len(out.hidden_states) == model.config.num_hidden_layers + 1
    for k, (got, state) in enumerate(zip(unshared.layer_states, out.hidden_states, strict=True)):
        assert_rel_close(got, state * am[..., None], msg=f"layer state {k} vs model")
        assert_rel_close(shared.layer_states[k], got, msg=f"layer state {k}")
    rows_full = torch.cat([torch.zeros_like(logp_full[:, :1]), logp_full], 1)[pick]
    assert_rel_close(unshared.full_vocab, rows_full, msg="full-vocab rows vs model")
    assert_rel_close(shared.full_vocab, unshared.full_vocab, msg="full-vocab rows")
    assert shared.rows.hidden.shape == (int(cm.sum()), model.config.hidden_size)
    assert_rel_close(shared.rows.hidden, unshared.rows.hidden, msg="rows")
    gen = torch.Generator().manual_seed(1)
    w_tok, w_hidden = torch.randn(ids.shape, generator=gen), torch.randn(unshared.hidden.shape, generator=gen)
    w_rows = torch.randn(unshared.full_vocab.shape, generator=gen)
    for what, loss in [("entropy", lambda o: (o.entropy * w_tok).sum()), ("hidden", lambda o: (o.hidden * w_hidden).sum()),
                       ("full-vocab rows", lambda o: (o.full_vocab * w_rows).sum())]:
        _assert_grads_equal(_grads(model, loss(engine.forward(model, ids, am, cm, groups=groups, needs=needs,
                                                              full_vocab_mask=pick))),
                            _grads(model, loss(engine.forward(model, ids, am, cm, needs=needs,
                                                              full_vocab_mask=pick))), what)


@pytest.mark.parametrize("direction", ["base_to_policy", "policy_to_base"])
def test_tiled_kl_against_a_reference_equals_full_logits(direction):
    from posttrain.losses.sft import token_kl
    from posttrain.reference import Reference

    policy, ref = _model(), _model()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (ids, am, cm), groups = _pairs("right")
    engine = LogProbEngine()
    ref_rows = engine.reference_forward(Reference(ref), policy, ids, am, cm, groups=groups, needs=Needs(rows=True))
    got = engine.forward(policy, ids, am, cm, groups=groups, kl_with=ref_rows.rows, kl_direction=direction)
    policy_logits = policy(input_ids=ids, attention_mask=am).logits[:, :-1]
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=am).logits[:, :-1]
    expected = torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.float32),
                          token_kl(policy_logits, ref_logits, direction)], 1) * cm
    assert_rel_close(got.kl, expected, msg="kl")
    _assert_grads_equal(_grads(policy, got.kl.sum()), _grads(policy, expected.sum()), "kl")


def test_lora_shared_equals_unshared_and_reference_is_the_base_model():
    from peft import LoraConfig, get_peft_model

    from posttrain.reference import Reference

    base = _model()
    plain = _model()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    (ids, am, cm), groups = _pairs("left")
    engine = LogProbEngine()
    unshared = engine.forward(model, ids, am, cm)
    shared = engine.forward(model, ids, am, cm, groups=groups)
    assert shared.shared
    assert_rel_close(shared.logps, unshared.logps, msg="lora logps")
    assert_rel_close(unshared.logps, _full_logits_logps(model, ids, am, cm), msg="lora vs full logits")
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    g_shared, g_unshared = _grads(model, (shared.logps * w).sum()), _grads(model, (unshared.logps * w).sum())
    assert len(g_shared) == 4 * 3 * 2 and all(g is not None for g in g_shared)  # only the LoRA factors train
    _assert_grads_equal(g_shared, g_unshared, "lora")
    ref = engine.reference_forward(Reference(), model, ids, am, cm, groups=groups)  # adapter disabled
    assert_rel_close(ref.logps, engine.forward(plain, ids, am, cm).logps, msg="adapter-disabled reference")
    assert float((ref.logps - shared.logps.detach()).abs().max()) > 1e-3  # the adapter did change the policy


def test_goat_adapter_shared_equals_unshared_and_full_logits():
    # GOAT (posttrain.adapters, arXiv 2502.16894) routes each token through its own top-k LoRA experts: a per-token
    # function of the hidden state, so sharing the prompt changes nothing. (Its load-balancing statistics count a
    # shared prompt's tokens once per group: the family trainers' wiring has to decide which count they want.)
    from posttrain.adapters.goat import apply_goat, clear_goat_aux

    model = apply_goat(_model(), ["q_proj", "v_proj", "down_proj"], rank=4, num_experts=2, top_k=1, lora_dropout=0.0)
    (ids, am, cm), groups = _groups("left", num_generations=3)
    engine = LogProbEngine()
    unshared = engine.forward(model, ids, am, cm)
    shared = engine.forward(model, ids, am, cm, groups=groups)
    assert shared.shared
    assert_rel_close(shared.logps, unshared.logps, msg="goat logps")
    assert_rel_close(unshared.logps, _full_logits_logps(model, ids, am, cm), msg="goat vs full logits")
    clear_goat_aux(model)  # the router statistics of the three forwards above
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    g_shared, g_unshared = _grads(model, (shared.logps * w).sum()), _grads(model, (unshared.logps * w).sum())
    assert sum(g is not None for g in g_shared) > 0
    _assert_grads_equal(g_shared, g_unshared, "goat")


@pytest.mark.parametrize("shared", [False, True])
def test_gradient_accumulation_two_micro_batches_equal_one(shared):
    model = _model()
    (ids, am, cm), groups = _groups("right", num_generations=2)  # 4 rows: 2 groups of 2
    engine = LogProbEngine()
    count = cm.sum()

    def loss(rows):
        out = engine.forward(model, ids[rows], am[rows], cm[rows], groups=[groups[i] for i in rows] if shared else None)
        return -out.logps.sum() / count  # token mean over the whole batch

    whole = _grads(model, loss([0, 1, 2, 3]))
    first, second = _grads(model, loss([0, 1])), _grads(model, loss([2, 3]))
    _assert_grads_equal([a + b for a, b in zip(first, second)], whole, "accumulated")


def test_unshareable_attention_falls_back_to_unshared_and_says_so_once(caplog):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                      max_window_layers=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    (ids, am, cm), groups = _pairs("right")
    engine = LogProbEngine()
    with caplog.at_level(logging.INFO, logger="posttrain"):
        first = engine.forward(model, ids, am, cm, groups=groups)
        engine.forward(model, ids, am, cm, groups=groups)
    assert not first.shared
    notes = [r.message for r in caplog.records if r.message.startswith("shared prompts off")]
    assert notes == ["shared prompts off: the model has sliding-window (or other non-full) attention layers; every "
                     "row runs whole (same results, no saving)"]
    assert_rel_close(first.logps, _full_logits_logps(model, ids, am, cm), msg="sliding-window model")


def test_engine_refuses_unscorable_positions_and_keeps_generation_working():
    model = _model()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="first column"):
        LogProbEngine().forward(model, ids, torch.ones_like(ids), torch.tensor([[1, 1, 0]]))
    out = model.generate(ids, max_new_tokens=2, do_sample=False)  # the patched forward passes through
    assert out.shape == (1, 5)


def test_full_vocab_rows_refused_for_a_zero3_partitioned_head():
    # ZeRO-3 marks its partitioned parameters with ds_id; the plain-autograd full-vocabulary rows would keep the
    # gathered weight past its release, so they are refused (the chunked head gathers in its forward and backward)
    model = _model()
    (ids, am, cm), _ = _pairs("right")
    model.lm_head.weight.ds_id = 0
    try:
        assert LogProbEngine("chunked").forward(model, ids, am, cm).logps.shape == ids.shape
        with pytest.raises(NotImplementedError, match="ZeRO-3"):
            LogProbEngine("chunked").forward(model, ids, am, cm, needs=Needs(full_vocab=True))
    finally:
        del model.lm_head.weight.ds_id


def test_completion_logps_matches_full_logits():
    from posttrain.data.formatting import tokenize_prompt_completion
    from posttrain.logprobs import completion_logps
    from posttrain.models import load_tokenizer

    model, tok = _model().eval(), load_tokenizer("builtin:tiny-qwen2")
    prompts, completions = ["1 + 2 =", "10 + 20 + 30 ="], [" 3", " 60"]
    sums, counts = completion_logps(model, tok, prompts, completions, batch_size=2)
    for prompt, completion, s, c in zip(prompts, completions, sums, counts):
        row = tokenize_prompt_completion(prompt, completion, tok)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([row.input_ids])).logits[0, :-1].float(), -1)
        labels = torch.tensor(row.labels()[1:])
        keep = labels != -100
        assert c == int(keep.sum())
        assert s == pytest.approx(float(lp[keep].gather(1, labels[keep, None]).sum()), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# the reference computed once
# ----------------------------------------------------------------------------------------------------------------------


def test_reference_precompute_once_cached_and_keyed_by_model_data_and_template(tmp_path):
    from posttrain.logprobs.reference import precompute_reference_logps, weights_fingerprint

    model = _model().eval()
    (ids, am, cm), groups = _pairs("right")
    rows = [{"input_ids": ids[b][am[b].bool()].tolist(), "completion_mask": cm[b][am[b].bool()].tolist()}
            for b in range(ids.shape[0])]
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    first, cached = precompute_reference_logps(model, rows, cache_dir=tmp_path, groups=groups, template="T1",
                                               batch_size=4)
    assert not cached and len(calls) == 1  # both pairs in one shared-prompt forward
    with torch.no_grad():
        expected = LogProbEngine().forward(model, ids, am, cm)
    for b in range(ids.shape[0]):
        assert_rel_close(first.token_logps[b], expected.logps[b][expected.mask[b]], msg=f"row {b}")
    assert_rel_close(first.sums(), expected.sequence_logps(), msg="sums")
    assert first.counts().tolist() == cm.sum(-1).tolist()
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.iterdir()).name]  # one file, no temporary left

    calls.clear()
    again, cached = precompute_reference_logps(model, rows, cache_dir=tmp_path, groups=groups, template="T1")
    assert cached and calls == []  # the rerun skips the model
    assert all(torch.equal(a, b) for a, b in zip(again.token_logps, first.token_logps))

    fingerprint = weights_fingerprint(model)
    _, cached = precompute_reference_logps(model, rows, cache_dir=tmp_path, groups=groups, template="T2")
    assert not cached  # another chat template
    changed = [dict(rows[0], input_ids=rows[0]["input_ids"][:-1] + [7]), *rows[1:]]
    _, cached = precompute_reference_logps(model, changed, cache_dir=tmp_path, groups=groups, template="T1")
    assert not cached  # other data
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # tied with the embeddings: other weights
    assert weights_fingerprint(model) != fingerprint
    _, cached = precompute_reference_logps(model, rows, cache_dir=tmp_path, groups=groups, template="T1")
    assert not cached
    _, cached = precompute_reference_logps(model, rows, cache_dir=tmp_path, groups=groups, template="T1",
                                           model_fingerprint=fingerprint)
    assert cached  # a caller-given fingerprint is trusted as the model's identity
    assert len(list(tmp_path.iterdir())) == 4


# ----------------------------------------------------------------------------------------------------------------------
# two processes (gloo, CPU): DDP and FSDP2 reproduce one process on the same global batch
# ----------------------------------------------------------------------------------------------------------------------


def _two_process_worker(rank: int, world: int, port: int, path: str) -> None:
    """One pair per process through the shared-prompt engine, under DDP, then under FSDP2 (``fully_shard``: the head
    is a sharded DTensor outside the forward, unsharded inside it); rank 0 saves the full gradients."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    (ids, am, cm), _ = _pairs("right")
    mine = [rank, rank + world]  # this process's pair: its chosen and its rejected row
    results = {}
    for backend in ("ddp", "fsdp2"):
        model = _model()
        if backend == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        out = LogProbEngine().forward(wrapped, ids[mine], am[mine], cm[mine], groups=[0, 0])
        # global token mean: each process divides by the global count; the gradient average over processes * world
        (-out.logps.sum() / cm.sum() * world).backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                 for n, p in model.named_parameters()}
        results[backend] = {"grads": grads, "shared": out.shared}
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_ddp_and_fsdp2_match_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "grads.pt")
    mp.start_processes(_two_process_worker, args=(2, port, path), nprocs=2, start_method="spawn")
    results = torch.load(path)

    model = _model()
    (ids, am, cm), groups = _pairs("right")
    (-LogProbEngine().forward(model, ids, am, cm, groups=groups).logps.sum() / cm.sum()).backward()
    one = [p.grad for _, p in model.named_parameters()]
    for backend, result in results.items():
        assert result["shared"], backend
        _assert_grads_equal([result["grads"][n] for n, _ in model.named_parameters()], one, backend)
