"""The preference-family trainer (dpo, wpo, sparsepo, asft_aligned, simpo, orpo) against stock TRL (DPOTrainer; the
experimental CPO and ORPO trainers for the reference-free simpo and orpo), the formulas, and bad input.

Where TRL 1.16 and the paper/reference code differ docs/methods/dpo.md#differences-from-the-paper-and-trl, docs/methods/wpo.md#differences-from-the-paper-and-trl, the stock-TRL comparison uses the settings where
they agree and the other form is checked against an independent implementation here:
- cDPO (`label_smoothing > 0` with `loss: sigmoid`): TRL >= 0.29 ignores label_smoothing for sigmoid; ours applies it.
- IPO `ipo_length_normalize: false` (eric-mitchell reference form): TRL only has the length-normalised form.
- WPO `wpo_weight_clamp_max: 1.0` (our default; reference code, TRL <= 0.28): TRL 1.16 does not clamp (= `null`).
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from fp32 import assert_fp32_close

BATCH = 8


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _dataset(n=16, **options):
    from posttrain.data.sources import load_source
    from posttrain.recipe import DataSource

    src = DataSource(source="builtin:arithmetic-pref", options={"num_samples": n, **options})
    return load_source(src, "data.train", "preference")


def _config(tmp_path, **kw):
    from trl import DPOConfig

    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                per_device_train_batch_size=BATCH, max_length=64, seed=0)
    return DPOConfig(**{**base, **kw})


def _pair(policy_dir, ref_dir, tmp_path, method, params, stock_kw=None, ours_kw=None):
    """Stock TRL DPOTrainer and ours on the same policy, reference and data; one collated batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from posttrain.families.preference.trainer import PosttrainPreferenceTrainer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    ds = _dataset()
    stock = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=ds,
                       processing_class=tok, args=_config(tmp_path / "stock", **(stock_kw or {})))
    ours = PosttrainPreferenceTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=ds,
                                      processing_class=tok, args=_config(tmp_path / "ours", **(ours_kw or {})),
                                      method=method, params=params)
    batch = next(iter(stock.get_train_dataloader()))
    stock.model.train()
    ours.model.train()
    return stock, ours, batch


def _per_token(model, batch):
    """Independent per-token log-probs (plain forward, full log_softmax), logits and the shifted completion mask."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    lp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    return lp * mask, logits, mask


def assert_grads_match(ours, stock, rel=1e-5, per_tensor=1e-3):
    """The gradient of every parameter of ``ours`` equals ``stock``'s as a whole to ``rel`` (relative L2 over all
    parameters: the issue's 1e-5 in fp32), and each tensor to ``per_tensor`` of its largest entry (a missing or doubled
    term shows as O(1)). Per tensor, fp32 itself is far from 1e-5 here: stock TRL's own gradient differs from an fp64
    computation by up to 1.5e-4 of a tensor's largest entry (the small q/k gradients of a saturated attention layer),
    while both are within 6e-6 of it as a whole."""
    pairs = [(name, a.grad.double(), b.grad.double())
             for (name, a), b in zip(stock.named_parameters(), ours.parameters(), strict=True) if a.grad is not None]
    assert all(b.grad is not None for (_, a), b in zip(stock.named_parameters(), ours.parameters()) if a.grad is not None)
    diff = sum(float(((g_ours - g_stock) ** 2).sum()) for _, g_stock, g_ours in pairs) ** 0.5
    norm = sum(float((g_stock ** 2).sum()) for _, g_stock, _ in pairs) ** 0.5
    assert diff <= rel * norm, f"gradient differs by {diff / norm:.3g} of its norm (> {rel})"
    for name, g_stock, g_ours in pairs:
        worst = float((g_ours - g_stock).abs().max())
        assert worst <= per_tensor * max(float(g_stock.abs().max()), 1e-30), f"{name}: max |diff| {worst:.3g}"


def _last(trainer, name):
    return trainer._metrics["train"][name][-1]


REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                  "logps/rejected")


# ----------------------------------------------------------------------------------------------------------------------
# (a) against stock TRL DPOTrainer
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,params,stock_kw,ours_kw",
    [
        ("dpo", dict(loss="sigmoid", beta=0.1), dict(loss_type=["sigmoid"], beta=0.1), {}),
        ("dpo", dict(loss="ipo", beta=0.5), dict(loss_type=["ipo"], beta=0.5), {}),
        ("dpo", dict(loss="robust", beta=0.2, label_smoothing=0.1),
         dict(loss_type=["robust"], beta=0.2, label_smoothing=0.1), {}),
        ("wpo", dict(beta=0.1, wpo_weight_clamp_max=None), dict(loss_type=["sigmoid"], beta=0.1, use_weighting=True),
         dict(use_weighting=True)),
    ],
    ids=["sigmoid", "ipo", "robust", "wpo-noclamp"],
)
def test_loss_metrics_and_grads_match_stock_trl(arith_model_dir, tiny_model_dir, tmp_path, method, params, stock_kw,
                                                ours_kw):
    from posttrain.methods import METHODS

    p = METHODS[method].params(**params)
    stock, ours, batch = _pair(arith_model_dir, tiny_model_dir, tmp_path, method, p, stock_kw,
                               dict(beta=p.beta, **ours_kw))
    l_stock = stock.compute_loss(stock.model, dict(batch))
    l_ours = ours.compute_loss(ours.model, dict(batch))
    assert abs(l_stock.item() - 0.6931) > 1e-3  # a reference that differs from the policy: a non-trivial value
    torch.testing.assert_close(l_ours, l_stock, atol=1e-5, rtol=1e-5)
    for name in (*REWARD_METRICS, "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert abs(_last(ours, name) - _last(stock, name)) <= 1e-5 * max(1.0, abs(_last(stock, name))), name
    stock.model.zero_grad()
    ours.model.zero_grad()
    l_stock.backward()
    l_ours.backward()
    assert_grads_match(ours.model, stock.model)


def _cpo_style_batch(batch):
    """Our collated ``[chosen; rejected]`` batch as the ``chosen_*`` / ``rejected_*`` tensors TRL's CPO and ORPO
    trainers take (labels -100 off the completion)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = {}
    for side, rows in (("chosen", slice(0, BATCH)), ("rejected", slice(BATCH, None))):
        out[f"{side}_input_ids"] = batch["input_ids"][rows]
        out[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{side}_labels"] = labels[rows]
    return out


@pytest.mark.parametrize("method,params,stock_kw", [
    ("simpo", dict(beta=2.0, gamma_beta_ratio=0.25), dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)),
    ("simpo", dict(beta=2.5, gamma_beta_ratio=0.4, sft_coef=0.5),
     dict(loss_type="simpo", beta=2.5, simpo_gamma=1.0, cpo_alpha=0.5)),
    ("orpo", dict(beta=0.1), dict(beta=0.1)),
    ("orpo", dict(beta=0.5), dict(beta=0.5)),
], ids=["simpo", "cpo-simpo", "orpo", "orpo-beta0.5"])
def test_reference_free_losses_match_stock_trl_cpo_and_orpo(arith_model_dir, tmp_path, method, params, stock_kw):
    """SimPO against TRL's CPOTrainer (``loss_type="simpo"``, ``simpo_gamma = beta * gamma_beta_ratio``, ``cpo_alpha
    = sft_coef``) and ORPO against TRL's ORPOTrainer (SFT term on prompt + response, our ``nll_on_prompt: true``), on
    the same batch with bf16 off: loss, metrics and gradients. TRL's experimental CPO/ORPO trainers tokenise on their
    own; both get the tensors of our collated batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from posttrain.methods import METHODS
    from posttrain.families.preference.trainer import PosttrainPreferenceTrainer

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(arith_model_dir)
    ds = _dataset()
    p = METHODS[method].params(**params)
    ours = PosttrainPreferenceTrainer(model=copy.deepcopy(policy), train_dataset=ds, processing_class=tok,
                                      args=_config(tmp_path / "ours", beta=p.beta), method=method, params=p)
    assert ours.ref_model is None
    config_cls, trainer_cls = (CPOConfig, CPOTrainer) if method == "simpo" else (ORPOConfig, ORPOTrainer)
    stock = trainer_cls(model=copy.deepcopy(policy), train_dataset=ds, processing_class=tok,
                        args=config_cls(output_dir=str(tmp_path / "stock"), report_to="none", use_cpu=True, bf16=False,
                                        max_length=64, **stock_kw))
    batch = next(iter(ours.get_train_dataloader()))
    stock.model.train()
    ours.model.train()
    l_ours = ours.compute_loss(ours.model, dict(batch))
    l_stock, stock_metrics = stock.get_batch_loss_metrics(stock.model, _cpo_style_batch(batch))
    torch.testing.assert_close(l_ours, l_stock, atol=1e-5, rtol=1e-5)
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected"]
    if method == "orpo":
        names += ["nll_loss", "log_odds_ratio", "log_odds_chosen"]
    for name in names:
        assert abs(_last(ours, name) - float(stock_metrics[name])) <= 1e-5 * max(1.0, abs(float(stock_metrics[name]))), name
    stock.model.zero_grad()
    ours.model.zero_grad()
    l_stock.backward()
    l_ours.backward()
    assert_grads_match(ours.model, stock.model)


def test_ipo_with_empty_prompt_rows_matches_stock_trl(arith_model_dir, tiny_model_dir, tmp_path):
    """IPO's N is the completion token count on the unshifted completion mask (dpo.md, TRL): with an empty prompt the
    first completion token has no scored position but still counts in N."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from posttrain.methods import DPOParams
    from posttrain.families.preference.trainer import PosttrainPreferenceTrainer

    rows = list(_dataset(BATCH))
    for i in (0, 3, 5):
        rows[i] = {**rows[i], "prompt": ""}
    ds = datasets.Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(arith_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stock = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=ds,
                       processing_class=tok, args=_config(tmp_path / "stock", loss_type=["ipo"], beta=0.5))
    ours = PosttrainPreferenceTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=ds,
                                      processing_class=tok, args=_config(tmp_path / "ours", beta=0.5), method="dpo",
                                      params=DPOParams(loss="ipo", beta=0.5))
    batch = next(iter(stock.get_train_dataloader()))
    assert int((batch["completion_mask"][:, 0] == 1).sum()) >= 2  # rows whose completion starts at position 0
    stock.model.train()
    ours.model.train()
    l_stock = stock.compute_loss(stock.model, dict(batch))
    l_ours = ours.compute_loss(ours.model, dict(batch))
    torch.testing.assert_close(l_ours, l_stock, atol=1e-5, rtol=1e-5)
    l_stock.backward()
    l_ours.backward()
    assert_grads_match(ours.model, stock.model)


def test_paper_forms_where_trl_differs(arith_model_dir, tiny_model_dir, tmp_path):
    """cDPO, unnormalised IPO and clamped WPO against independent formulas on one batch (TRL 1.16 lacks these)."""
    from transformers import AutoModelForCausalLM

    from posttrain.methods import DPOParams, WPOParams

    policy = AutoModelForCausalLM.from_pretrained(arith_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cases = [
        ("dpo", DPOParams(loss="sigmoid", beta=0.1, label_smoothing=0.2), {}),
        ("dpo", DPOParams(loss="ipo", beta=5.0, ipo_length_normalize=False), {}),
        ("wpo", WPOParams(beta=0.1, wpo_weight_clamp_max=1.0), dict(use_weighting=True)),
        ("wpo", WPOParams(beta=0.1, wpo_alignment="greedy"), {}),
        ("wpo", WPOParams(beta=0.1, wpo_alignment="none", wpo_weight_clamp_max=None), {}),
    ]
    for i, (method, p, kw) in enumerate(cases):
        _, ours, batch = _pair(arith_model_dir, tiny_model_dir, tmp_path / str(i), method, p, None,
                               dict(beta=p.beta, **kw))
        loss = ours.compute_loss(ours.model, dict(batch)).item()
        lp, logits, mask = _per_token(policy, batch)
        rlp, _, _ = _per_token(ref, batch)
        s, s_ref, n = lp.sum(-1), rlp.sum(-1), mask.sum(-1)
        c, r = (s[:BATCH] - s_ref[:BATCH]), (s[BATCH:] - s_ref[BATCH:])
        d = c - r
        if p.loss == "ipo":
            expected = ((d - 1 / (2 * p.beta)) ** 2).mean()
        else:
            eps = p.label_smoothing
            per_pair = -(1 - eps) * F.logsigmoid(p.beta * d) - eps * F.logsigmoid(-p.beta * d)
            if method == "wpo":
                if p.wpo_alignment == "sampled":
                    log_s = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
                elif p.wpo_alignment == "greedy":
                    log_s = logits.max(-1).values - torch.logsumexp(logits, -1)
                else:
                    log_s = torch.zeros_like(lp)
                w = torch.exp(((lp - log_s) * mask).sum(-1) / n)
                pair_w = w[:BATCH] * w[BATCH:]
                if p.wpo_weight_clamp_max is not None:
                    pair_w = pair_w.clamp(max=p.wpo_weight_clamp_max)
                per_pair = per_pair * pair_w
                assert abs(_last(ours, "wpo/pair_weight_mean") - pair_w.mean().item()) < 1e-5
            expected = per_pair.mean()
        # IPO reaches ~100 here: compare relative to the magnitude (summed log-probs of up to ~8 tokens per row)
        assert_fp32_close(loss, expected.item(), scale=max(1.0, abs(expected.item())), reductions=16,
                          msg=f"{method} {p}")


def test_precomputed_reference_equals_live_reference(arith_model_dir, tiny_model_dir, tmp_path):
    from posttrain.methods import DPOParams

    p = DPOParams(beta=0.1)
    _, live, batch = _pair(arith_model_dir, tiny_model_dir, tmp_path / "live", "dpo", p)
    _, pre, _ = _pair(arith_model_dir, tiny_model_dir, tmp_path / "pre", "dpo", p, None,
                      dict(precompute_ref_log_probs=True))
    assert pre.ref_model is None  # no reference kept in memory
    pre_batch = next(iter(pre.get_train_dataloader()))
    assert "ref_chosen_logps" in pre_batch
    torch.testing.assert_close(pre_batch["input_ids"], batch["input_ids"])
    l_live = live.compute_loss(live.model, dict(batch))
    l_pre = pre.compute_loss(pre.model, dict(pre_batch))
    torch.testing.assert_close(l_pre, l_live, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# (b) learning_rate = 0: the logged step-1 loss is the formula on the initial policy and a different reference
# ----------------------------------------------------------------------------------------------------------------------


def _recipe(tmp_path, method: dict, ref="builtin:tiny-qwen2", peft=None, **training):
    from posttrain.recipe import parse_recipe

    data = {
        "model": "builtin:tiny-qwen2-arith",
        "data": {"train": {"source": "builtin:arithmetic-pref", "options": {"num_samples": BATCH}}},
        "method": method,
        "training": {"max_steps": 1, "per_device_train_batch_size": BATCH, "learning_rate": 0.0, "logging_steps": 1,
                     "save_strategy": "no", "disable_tqdm": True, **training},
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
    }
    if ref is not None:
        data["ref_model"] = ref
    if peft is not None:
        data["peft"] = peft
    return parse_recipe(data)


def _all_pairs_batch(model_dir):
    """Every pair of the 8-row dataset tokenised as TRL does (prompt, completion + EOS), right-padded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = _dataset(BATCH)
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for row in rows:
            prompt = tok(row["prompt"])["input_ids"]
            full = tok(row["prompt"] + row[side] + tok.eos_token)["input_ids"]
            assert full[: len(prompt)] == prompt
            seqs.append(full)
            masks.append([0] * len(prompt) + [1] * (len(full) - len(prompt)))
    width = max(map(len, seqs))
    pad = lambda x, v: x + [v] * (width - len(x))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(s, tok.pad_token_id or 0) for s in seqs]),
        "attention_mask": torch.tensor([pad([1] * len(s), 0) for s in seqs]),
        "completion_mask": torch.tensor([pad(m, 0) for m in masks]),
    }


@pytest.mark.parametrize("method", ["dpo", "ipo", "wpo", "asft_aligned", "simpo", "orpo"])
def test_lr0_step1_loss_equals_formula_on_initial_models(tmp_path, arith_model_dir, tiny_model_dir, method):
    from transformers import AutoModelForCausalLM

    from posttrain.train import run

    spec = {"dpo": {"name": "dpo", "beta": 0.1, "label_smoothing": 0.1}, "ipo": {"name": "dpo", "loss": "ipo"},
            "wpo": {"name": "wpo", "beta": 0.1}, "asft_aligned": {"name": "asft_aligned", "asft_lambda": 0.5},
            "simpo": {"name": "simpo", "sft_coef": 0.3},
            "orpo": {"name": "orpo", "beta": 0.2, "nll_on_prompt": False}}[method]
    reference_free = method in ("asft_aligned", "simpo", "orpo")
    recipe = _recipe(tmp_path, spec, ref=None if reference_free else "builtin:tiny-qwen2")
    run(recipe, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["loss"] for r in rows if r["step"] == 1 and "loss" in r)

    batch = _all_pairs_batch(arith_model_dir)
    lp, logits, mask = _per_token(AutoModelForCausalLM.from_pretrained(arith_model_dir), batch)
    rlp, _, _ = _per_token(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    s, n = lp.sum(-1), mask.sum(-1)
    c, r = s[:BATCH] - rlp.sum(-1)[:BATCH], s[BATCH:] - rlp.sum(-1)[BATCH:]
    beta = recipe.params.beta
    if method == "dpo":
        eps = 0.1
        d = beta * (c - r)
        expected = (-(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)).mean()
    elif method == "ipo":
        expected = ((c / n[:BATCH] - r / n[BATCH:] - 1 / (2 * beta)) ** 2).mean()
    elif method == "wpo":
        log_s = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
        w = torch.exp(((lp - log_s) * mask).sum(-1) / n)
        expected = ((w[:BATCH] * w[BATCH:]).clamp(max=1.0) * -F.logsigmoid(beta * (c - r))).mean()
    elif method == "simpo":  # -logsig(beta (lbar_w - lbar_l - ratio)) + sft_coef * token-mean NLL of the chosen
        lbar = s / n
        nll = -lp[:BATCH].sum() / mask[:BATCH].sum()
        expected = -F.logsigmoid(2.0 * (lbar[:BATCH] - lbar[BATCH:] - 0.25)).mean() + 0.3 * nll
    elif method == "orpo":  # response NLL + beta * -logsig(odds_w - odds_l)
        lbar = s / n
        odds = lbar - torch.log1p(-lbar.exp())
        nll = -lp[:BATCH].sum() / mask[:BATCH].sum()
        expected = nll - 0.2 * F.logsigmoid(odds[:BATCH] - odds[BATCH:]).mean()
    else:
        lbar = s / n
        pw, pl = lbar[:BATCH].exp(), lbar[BATCH:].exp()
        odds_w, odds_l = lbar[:BATCH] - torch.log1p(-pw), lbar[BATCH:] - torch.log1p(-pl)
        align = -F.logsigmoid(beta * odds_w) - F.logsigmoid(-beta * odds_l)
        expected = (-1.0 * lbar[:BATCH] + 0.5 * align).mean()
    print(f"{method}: logged step-1 loss {logged:.6f}, formula {expected.item():.6f}")
    assert abs(expected.item() - 0.6931) > 1e-2  # non-trivial: the reference differs from the policy
    assert abs(logged - expected.item()) < 1e-5


def _minmax_map(a, mask):
    """Per row: (a - min) / (max - min) over the completion tokens, 1 where max == min, 0 off the completion."""
    out = torch.zeros_like(a)
    for i in range(a.shape[0]):
        sel = mask[i].bool()
        v = a[i][sel]
        span = v.max() - v.min()
        out[i][sel] = (v - v.min()) / span if span > 0 else torch.ones_like(v)
    return out


def _mapo_mask_by_hand(model, batch, mask):
    """MaPO mask (docs/methods/sparsepo.md#reference-mask-mapo, Qwen2 port) from the reference model's activations, with our own hooks: the
    mean over the last dim of each hooked tensor at positions 0..T-2 (position t-1 weights token t), min-max per
    sequence, averaged within the mlp / attn / resid / logits streams, then over the streams."""
    streams = {"mlp": [], "attn": [], "resid": [], "logits": []}
    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args: streams["mlp"].append(args[0].float().mean(-1))))
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            hooks.append(proj.register_forward_hook(lambda m, args, out: streams["attn"].append(out.float().mean(-1))))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args: streams["attn"].append(args[0].float().mean(-1))))
    try:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    streams["resid"] = [h.float().mean(-1) for h in out.hidden_states]
    streams["logits"] = [out.logits.float().mean(-1)]
    per_stream = [torch.stack([_minmax_map(t[:, :-1], mask) for t in ts]).mean(0) for ts in streams.values()]
    return torch.stack(per_stream).mean(0)


def _learned_mask_by_hand(tensors, prefix, hidden_states, eps):
    """SparsePO's learned mask (docs/methods/sparsepo.md#learned-mask) from its saved weights, no dropout: shared LayerNorm, per layer
    Linear(H, 1) + ReLU, mixer Linear(L, 1, no bias) + ReLU, on the reference's hidden_states[1:] at 0..T-2."""
    norm_w, norm_b = tensors[f"{prefix}.norm.weight"], tensors[f"{prefix}.norm.bias"]
    per_layer = []
    for i, h in enumerate(hidden_states[1:]):
        x = F.layer_norm(h[:, :-1].float(), (h.shape[-1],), norm_w, norm_b, eps)
        w, bias = tensors[f"{prefix}.layers.{i}.weight"], tensors[f"{prefix}.layers.{i}.bias"]
        per_layer.append(torch.relu(x @ w.T + bias))
    return torch.relu(torch.cat(per_layer, -1) @ tensors[f"{prefix}.mixer.weight"].T).squeeze(-1)


@pytest.mark.parametrize(
    "extra",
    [{"mask": "reference"}, {"mask": "reference", "l1_norm_param_u": 0.05, "l1_norm_param_d": 0.02},
     {"mask": "learned", "beta": 1.0, "mask_dropout": 0.0, "l1_norm_param_u": 0.05, "l1_norm_param_d": 0.02},
     {"mask": "learned", "beta": 1.0, "mask_dropout": 0.0, "rw_kl_independent": True}],
    ids=["reference", "reference-l1", "learned-l1", "learned-indp"],
)
def test_lr0_step1_sparsepo_loss_equals_pure_loss_on_initial_models(tmp_path, arith_model_dir, tiny_model_dir, extra):
    """SparsePO with a reference that differs from the policy (tiny-qwen2 vs tiny-qwen2-arith): the logged step-1
    loss is ``posttrain.losses.sparsepo_loss`` on per-token log-ratios, full-vocab token KLs and masks computed here
    from the two checkpoints on the same 8 pairs. The MaPO mask is rebuilt from our own hooks; the learned mask from
    the saved ``sparsepo_mask.safetensors`` (learning rate 0: still the initial network), with ``mask_dropout: 0``
    (the default 0.01 draws a dropout pattern that cannot be reproduced outside the run); beta 1 there, since the
    freshly initialised mask is small. L1 terms (halved for the common mask) are included where set."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from posttrain.losses.preference import sparsepo_loss
    from posttrain.train import run

    recipe = _recipe(tmp_path, {"name": "sparsepo", **extra})
    p = recipe.params
    run(recipe, quiet=True)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if r["step"] == 1 and "loss" in r)

    batch = _all_pairs_batch(arith_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(arith_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lp, logits, mask = _per_token(policy, batch)
    rlp, rlogits, _ = _per_token(ref, batch)
    token_kl = (rlogits.softmax(-1) * (rlogits.log_softmax(-1) - logits.log_softmax(-1))).sum(-1) * mask
    if p.mask == "reference":
        masks = {"common": _mapo_mask_by_hand(ref, batch, mask)}
    else:
        tensors = load_file(str(out / "sparsepo_mask.safetensors"))
        with torch.no_grad():
            hidden = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True).hidden_states
        eps = ref.config.rms_norm_eps
        masks = {name: _learned_mask_by_hand(tensors, name, hidden, eps) * mask
                 for name in (["reward", "kl"] if p.rw_kl_independent else ["common"])}
    common = "common" in masks
    split = lambda t: t.chunk(2, dim=0)  # noqa: E731 - rows 0..7 chosen, 8..15 rejected
    reward_mask = masks["common"] if common else masks["reward"]
    expected = sparsepo_loss(
        *split(lp - rlp), *split(token_kl), *split(mask), *split(reward_mask),
        *((None, None) if common else split(masks["kl"])),
        beta=p.beta, l1_reward=p.l1_norm_param_u, l1_kl=p.l1_norm_param_d, common_mask=common,
    )
    value = expected.losses.mean().item()
    print(f"sparsepo {extra}: logged step-1 loss {logged['loss']:.6f}, pure loss {value:.6f}, "
          f"L1 {expected.l1.mean().item():.6f}, density {logged['sparsepo/mask_density']:.3f}")
    if p.mask == "learned":
        assert 0.0 < logged["sparsepo/mask_density"] < 1.0  # some exact zeros from the ReLU, not all
    # non-trivial: the per-pair margin terms are far from log 2 (the reference differs from the policy), and their
    # mean is 100x the tolerance away from it ...
    margin_terms = expected.losses - expected.l1
    assert (margin_terms - 0.693147).abs().max().item() > 0.1
    assert abs(margin_terms.mean().item() - 0.693147) > 1e-3
    if p.l1_norm_param_u:  # ... and the L1 term is material at this tolerance
        assert expected.l1.mean().item() > 1e-3
    assert abs(logged["loss"] - value) < 1e-5
    wkl = expected.chosen_kl.mean().item()  # the masked KL sum D(y_w), logged as WgtSeqKL/chosen
    assert abs(logged["WgtSeqKL/chosen"] - wkl) < 1e-5 * max(1.0, abs(wkl))


def test_dpo_lora_without_ref_model_uses_the_adapter_disabled_base(tmp_path, arith_model_dir):
    """DPO with plain LoRA and no ref_model: the reference is the adapter-disabled base (the original checkpoint), not
    the trained policy. 2 steps at learning rate 1e-2 on the 8 pairs (each step sees all 8), then, with our own
    forwards, the chosen/rejected log-prob sums of (a) the trained policy and (b) the original checkpoint loaded fresh.

    * The step-2 log: DPO logs ``logps/chosen`` (policy) and ``rewards/chosen = beta * (policy - reference)``, so
      ``logps/chosen - rewards/chosen / beta`` is the reference's mean chosen sum: it equals (b), while the step-2
      policy's own ``logps/chosen`` is far from it (the reference is not the policy being trained).
    * After training, the trainer's loss on the same batch is the DPO loss with (b) as reference (the loss with (a)
      as reference would be log 2 exactly), and the adapter is enabled again afterwards.
    """
    from transformers import AutoModelForCausalLM

    from posttrain.methods import get_method
    from posttrain.train import RunContext, load_models
    from posttrain.families.preference.trainer import build_preference_trainer

    beta = 0.1
    recipe = _recipe(tmp_path, {"name": "dpo", "beta": beta}, ref=None, max_steps=2, learning_rate=1e-2,
                     peft={"type": "lora", "r": 8, "target_modules": "all-linear"})
    info = get_method("dpo")
    tok, model, ref = load_models(recipe, info)
    assert ref is None
    trainer = build_preference_trainer(RunContext(recipe, info, tok, model, ref, {}, []))
    assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default"}  # no reference copy anywhere
    trainer.train()
    logs = {r["step"]: r for r in trainer.state.log_history if "loss" in r}
    assert sorted(logs) == [1, 2]

    policy = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 * BATCH  # all 8 pairs
    lp_a, _, _ = _per_token(policy, batch)
    lp_b, _, _ = _per_token(AutoModelForCausalLM.from_pretrained(arith_model_dir), batch)
    a, b = lp_a.sum(-1), lp_b.sum(-1)
    assert (a - b).abs().max().item() > 0.5  # the two steps moved the policy away from the base

    # step 1: the fresh LoRA is the base, so policy == reference and the loss is log 2
    assert abs(logs[1]["loss"] - 0.693147) < 1e-5
    # step 2: the reference implied by the log is the base's mean chosen sum; the policy has moved away from it
    implied_ref = logs[2]["logps/chosen"] - logs[2]["rewards/chosen"] / beta
    assert abs(implied_ref - b[:BATCH].mean().item()) < 1e-4, (implied_ref, b[:BATCH].mean().item())
    assert abs(logs[2]["logps/chosen"] - b[:BATCH].mean().item()) > 0.1

    with torch.no_grad():
        loss = trainer.compute_loss(policy, dict(batch)).item()
    margin_b = (a[:BATCH] - b[:BATCH]) - (a[BATCH:] - b[BATCH:])
    expected_b = -F.logsigmoid(beta * margin_b).mean().item()
    # (a) as reference would give a loss of log 2 and rewards of 0: both are far (>= 100x the tolerance) from (b)'s
    assert abs(expected_b - 0.693147) > 1e-3
    assert abs(loss - expected_b) < 1e-5, (loss, expected_b)
    rewards_b = beta * (a[:BATCH] - b[:BATCH]).mean().item()
    assert abs(rewards_b) > 1e-3  # >= 100x the tolerance below: (a) as reference (rewards 0) is ruled out
    assert abs(_last_eval(trainer, "rewards/chosen") - rewards_b) < 1e-5
    lp_again, _, _ = _per_token(policy, batch)
    assert torch.allclose(lp_again, lp_a, atol=1e-6)  # the adapter is on again after the reference forward


def _last_eval(trainer, name):
    return trainer._metrics["eval"][name][-1]


# ----------------------------------------------------------------------------------------------------------------------
# SparsePO: structural checks and the learned mask's file
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", ["reference", "learned"])
def test_sparsepo_runs_logs_density_and_saves_the_mask(tmp_path, mask):
    from posttrain.train import run

    recipe = _recipe(tmp_path, {"name": "sparsepo", "mask": mask, "beta": 0.5}, ref=None, max_steps=2,
                     learning_rate=1e-3, save_strategy="steps", save_steps=2)
    run(recipe, quiet=True)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["step"] == 1 and "loss" in r)
    assert 0.0 < first["sparsepo/mask_density"] <= 1.0
    assert "WgtSeqKL/chosen" in first and "rewards/accuracies" in first
    # step 1: policy == reference, so log-ratios and KL are 0 and the loss is log 2 (no L1 by default)
    assert abs(first["loss"] - 0.693147) < 1e-5
    if mask == "learned":
        from safetensors.torch import load_file

        for where in (out, out / "checkpoint-2"):
            tensors = load_file(str(where / "sparsepo_mask.safetensors"))
            assert any(k.startswith("common.mixer") for k in tensors)
    else:
        assert not (out / "sparsepo_mask.safetensors").exists()


def test_sparsepo_learned_mask_reloads_on_resume(tmp_path):
    """Kill a learned-mask SparsePO run after its step-2 checkpoint and resume: the mask network is reloaded from
    ``sparsepo_mask.safetensors`` (with its optimizer state), so final policy and mask equal an uninterrupted run's bit
    for bit."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, TrainerCallback

    from posttrain.train import run

    def recipe(where):
        return _recipe(where, {"name": "sparsepo", "mask": "learned", "beta": 0.5}, ref=None, max_steps=4,
                       learning_rate=1e-2, save_strategy="steps", save_steps=2)

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("simulated kill")

    run(recipe(tmp_path / "full"), quiet=True)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(recipe(tmp_path / "killed"), callbacks=[Kill()], quiet=True)
    killed = tmp_path / "killed" / "run"
    at_kill = load_file(str(killed / "checkpoint-2" / "sparsepo_mask.safetensors"))
    run(recipe(tmp_path / "killed"), resume=True, quiet=True)
    full_mask = load_file(str(tmp_path / "full" / "run" / "sparsepo_mask.safetensors"))
    resumed_mask = load_file(str(killed / "sparsepo_mask.safetensors"))
    assert set(full_mask) == set(resumed_mask)
    assert max((full_mask[k] - at_kill[k]).abs().max().item() for k in full_mask) > 1e-4  # the mask did train
    for k in full_mask:  # bitwise: the mask network, its optimizer state and every RNG are restored
        assert torch.equal(resumed_mask[k], full_mask[k]), k
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "run").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(killed).state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_sparsepo_all_ones_masks_reduce_to_tdpo_and_zero_kl_mask_to_dpo(arith_model_dir, tiny_model_dir, tmp_path):
    """mask_on_reward/kl off (all-ones masks) gives TDPO1; its reward part (KL mask zero) is DPO docs/methods/sparsepo.md#objective."""
    from transformers import AutoModelForCausalLM

    from posttrain.methods import SparsePOParams

    p = SparsePOParams(beta=0.1, mask_on_reward=False, mask_on_kl=False)
    _, ours, batch = _pair(arith_model_dir, tiny_model_dir, tmp_path, "sparsepo", p, None, dict(beta=0.1))
    loss = ours.compute_loss(ours.model, dict(batch)).item()
    lp, logits, mask = _per_token(AutoModelForCausalLM.from_pretrained(arith_model_dir), batch)
    rlp, rlogits, _ = _per_token(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    kl = (rlogits.softmax(-1) * (rlogits.log_softmax(-1) - logits.log_softmax(-1))).sum(-1) * mask
    u = (lp - rlp).sum(-1)
    dsum = kl.sum(-1)
    z = (u[:BATCH] - u[BATCH:]) - (dsum[BATCH:] - dsum[:BATCH])
    expected = -F.logsigmoid(0.1 * z).mean()
    assert abs(loss - expected.item()) < 1e-5
    assert abs(_last(ours, "SeqKL/chosen") - dsum[:BATCH].mean().item()) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# (c) learning check
# ----------------------------------------------------------------------------------------------------------------------


def preference_accuracy(model, tok, rows) -> float:
    """Share of pairs whose chosen completion (+EOS) has a higher summed log-prob than the rejected one."""
    model.eval()

    def score(prompt, completion):
        p = tok(prompt)["input_ids"]
        ids = torch.tensor([tok(prompt + completion + tok.eos_token)["input_ids"]])
        with torch.no_grad():
            lp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return lp[len(p) - 1 :].sum().item()

    return sum(score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in rows) / len(rows)


# DPO is the preference family's learning check in the default suite; the others (~20 s each) are `slow`.
@pytest.mark.parametrize("method, gain", [
    pytest.param({"name": "dpo", "beta": 0.1}, 0.08, id="dpo"),
    pytest.param({"name": "dpo", "loss": "ipo", "beta": 0.5}, 0.08, id="ipo", marks=pytest.mark.slow),
    pytest.param({"name": "wpo", "beta": 0.1}, 0.05, id="wpo", marks=pytest.mark.slow),
    pytest.param({"name": "sparsepo", "mask": "reference", "beta": 0.1}, 0.05, id="sparsepo", marks=pytest.mark.slow),
    pytest.param({"name": "asft_aligned", "beta": 1.0}, 0.05, id="asft_aligned", marks=pytest.mark.slow),
    pytest.param({"name": "simpo"}, 0.05, id="simpo", marks=pytest.mark.slow),
    pytest.param({"name": "orpo"}, 0.05, id="orpo", marks=pytest.mark.slow),
    pytest.param({"name": "orpo", "nll_on_prompt": False}, 0.05, id="orpo-response-nll", marks=pytest.mark.slow),
    # the unpaired family's check: the pairs are unpaired (two rows each, side by side) and a batch counts rows, so it
    # gets twice the batch to see the same 32 pairs a step (docs/methods/kto.md#learning-check)
    pytest.param({"name": "kto"}, 0.05, id="kto", marks=pytest.mark.slow),
])
def test_each_method_raises_held_out_preference_accuracy(tmp_path, capsys, method, gain):
    """Each preference method from the random-init tiny model on 256 arithmetic pairs (8 epochs, ~10-20 s each on
    CPU) raises held-out preference accuracy by at least ``gain`` (300 pairs: s.e. ~0.029; measured +0.08 (sparsepo) .. +0.15 (ipo)).

    Held out: pairs never trained on, for the trained prompts with a different (unseen) rejected answer; the test-split
    numbers (unseen prompts) are printed too; ``benchmarks/preference_accuracy.py`` measures every method
    (docs/preference.md). From ``tiny-qwen2-arith`` (already ~88-92% on these measures) the
    DPO-family objectives do not raise held-out preference accuracy on this tiny task within a short budget (they lower
    the chosen log-prob along with the rejected one); see docs/preference.md.
    """
    from transformers import AutoModelForCausalLM

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.methods import get_method
    from posttrain.models import load_model, load_tokenizer
    from posttrain.recipe import parse_recipe
    from posttrain.train import run

    rows_per_pair = 2 if get_method(method["name"]).family == "unpaired" else 1
    n_train, pool = 256, 761  # 961 problems with max_operand 30, 200 held out as the test split
    rows = arithmetic_rows("preference", split="train", max_operand=30, num_samples=4 * pool)
    train = rows[:n_train]
    seen = {(r["prompt"], r["rejected"]) for r in train}
    prompts = {r["prompt"] for r in train}
    held = [r for r in rows[pool:] if r["prompt"] in prompts and (r["prompt"], r["rejected"]) not in seen][:300]
    test = arithmetic_rows("preference", split="test", max_operand=30, num_samples=200)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))

    tok = load_tokenizer("builtin:tiny-qwen2")
    start = load_model("builtin:tiny-qwen2")
    before_held, before_test = preference_accuracy(start, tok, held), preference_accuracy(start, tok, test)
    recipe = parse_recipe({
        "model": "builtin:tiny-qwen2",
        "data": {"train": str(data)},
        "method": method,
        "training": {"max_steps": 64, "per_device_train_batch_size": 32 * rows_per_pair, "learning_rate": 1e-3,
                     "logging_steps": 8,
                     "save_strategy": "no", "disable_tqdm": True},
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
    })
    run(recipe, quiet=True)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    after_held, after_test = preference_accuracy(trained, tok, held), preference_accuracy(trained, tok, test)
    with capsys.disabled():
        print(f"\n[{method['name']}/{method.get('loss', method.get('mask', ''))} learning check] held-out pairs ({len(held)}): {before_held:.3f} -> {after_held:.3f}; "
              f"test-split pairs (unseen prompts, 200): {before_test:.3f} -> {after_test:.3f}")
    assert after_held >= before_held + gain


# ----------------------------------------------------------------------------------------------------------------------
# (d) bad input
# ----------------------------------------------------------------------------------------------------------------------


def _cli_run(tmp_path, capsys, recipe):
    from posttrain.cli import main

    path = tmp_path / "recipe.yaml"
    recipe.setdefault("output_dir", str(tmp_path / "out"))
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and not any("Traceback" in line for line in err), err
    return lines[0]


def _bad_recipe(train, method="dpo", **extra):
    return {"model": "builtin:tiny-qwen2", "data": {"train": train}, "method": {"name": method},
            "training": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"}, **extra}


def test_dataset_without_rejected_names_the_column(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejectd": "0"})
                              for i in range(4)))
    line = _cli_run(tmp_path, capsys, _bad_recipe(str(data)))
    assert "data.train" in line and "'rejected'" in line and "did you mean 'rejectd'" in line, line


def test_dataset_without_chosen_names_the_column(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) for i in range(4)))
    line = _cli_run(tmp_path, capsys, _bad_recipe(str(data), method="wpo"))
    assert "data.train" in line and "missing column 'chosen'" in line, line


def test_empty_responses_name_the_column(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": " "})
                              for i in range(4)))
    line = _cli_run(tmp_path, capsys, _bad_recipe(str(data), method="asft_aligned"))
    assert "data.train" in line and "no usable rows" in line and "'rejected'" in line, line


def test_reference_needed_but_none(tmp_path, capsys):
    line = _cli_run(tmp_path, capsys, _bad_recipe("builtin:arithmetic-pref", method="sparsepo", ref_model="none"))
    assert "ref_model" in line and "sparsepo" in line and "needs a reference model" in line, line


def test_method_keys_set_under_training_and_precompute_for_asft(tmp_path, capsys):
    line = _cli_run(tmp_path, capsys, {**_bad_recipe("builtin:arithmetic-pref"), "training": {"beta": 0.3}})
    assert "training.beta" in line and "method.beta" in line, line
    recipe = _bad_recipe("builtin:arithmetic-pref", method="asft_aligned")
    recipe["method"]["precompute_ref_log_probs"] = True
    line = _cli_run(tmp_path, capsys, recipe)
    assert "method.precompute_ref_log_probs: not a key of method 'asft_aligned'; only used by method dpo or wpo" in line, line
