"""WAGLE weight mask (posttrain/families/unlearning/wagle_mask.py, posttrain/families/unlearning/wagle.py; docs/methods/wagle.md):
hand-computed scores and masks, the masked AdamW step, invariances, the scoring pass, and the trainer wiring."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.families.unlearning.wagle_mask import (
    FrozenWeights,
    keep_count,
    summed_gradients,
    top_k_mask,
    wagle_mask,
    wagle_scores,
)

# worked example: W (2x2) then b (2); flat order [W00, W01, W10, W11, b0, b1]
THETA = [0.5, -0.2, 0.1, 0.0, 0.3, -0.3]
G_F = [0.4, 0.15, -0.2, 0.3, 0.0, 0.05]
G_R = [0.0, 0.001, 0.03, 0.05, 0.1, 0.0]


def _split(values):
    t = torch.tensor(values, dtype=torch.float64)
    return {"W": t[:4].reshape(2, 2), "b": t[4:]}


def _flat(d):
    return torch.cat([d["W"].reshape(-1), d["b"].reshape(-1)])


@pytest.mark.parametrize("gamma, scores, mask", [
    (0.1, [0.2, 0.0315, 0.04, 0.15, 0.0, 0.015], [1, 0, 1, 1, 0, 0]),
    (1e-6, [0.2, 150.03, 5999.98, 15000.0, 0.0, 0.015], [0, 1, 1, 1, 0, 0]),
    (math.inf, [0.2, 0.03, 0.02, 0.0, 0.0, 0.015], [1, 1, 1, 0, 0, 0]),  # SNIP; the two zeros: smaller index wins
])
def test_worked_scores_and_masks(gamma, scores, mask):
    s = _flat(wagle_scores(_split(THETA), _split(G_F), _split(G_R), gamma))
    expected = torch.tensor(scores, dtype=torch.float32)
    assert torch.allclose(s, expected, rtol=1e-6, atol=1e-7 * float(expected.abs().max()))
    m = wagle_mask(_split(THETA), _split(G_F), _split(G_R), gamma, sparsity=0.5)
    assert _flat(m).int().tolist() == mask
    if gamma == 0.1:
        assert m["W"].int().tolist() == [[1, 0], [1, 1]] and m["b"].int().tolist() == [0, 0]


@pytest.mark.parametrize("decay_masked, expected", [
    (False, [0.4895, -0.2, 0.0899, -0.01, 0.3, -0.3]),
    (True, [0.4895, -0.1998, 0.0899, -0.01, 0.2997, -0.2997]),  # the authors' code: frozen weights still decay
])
def test_worked_masked_adamw_step(decay_masked, expected):
    masks = wagle_mask(_split(THETA), _split(G_F), _split(G_R), 0.1, sparsity=0.5)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in _split(THETA).items()}
    grads = _split([0.3, -0.2, 0.1, 0.4, -0.5, 0.2])
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    frozen = FrozenWeights(params, masks)
    for k, p in params.items():
        p.grad = grads[k] * masks[k]
    opt.step()
    if not decay_masked:
        frozen.restore()
    got = _flat({k: p.detach() for k, p in params.items()})
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)
    if not decay_masked:  # bit-identical, not just close
        assert got[1] == THETA[1] and got[4] == THETA[4] and got[5] == THETA[5]


def test_keep_count_is_exact_floor():
    assert keep_count(100, 0.05) == 95 and keep_count(6, 0.5) == 3 and keep_count(7, 0.5) == 3
    assert keep_count(10, 0.0) == 10 and keep_count(10, 1.0) == 0
    assert keep_count(1000, 0.2) == 800 and keep_count(3, 0.1) == 2
    torch.manual_seed(0)
    scores = {"a": torch.rand(37, 5), "b": torch.rand(11)}
    for sparsity in (0.0, 0.05, 0.2, 0.6, 0.95):
        m = wagle_mask(scores, {k: torch.ones_like(v) for k, v in scores.items()}, None, math.inf, sparsity)
        assert sum(int(x.sum()) for x in m.values()) == math.floor((1 - sparsity) * 196 + 1e-9)


def test_invariances_and_snip_limit():
    torch.manual_seed(1)
    theta = {"a": torch.randn(8, 4, dtype=torch.float64), "b": torch.randn(6, dtype=torch.float64)}
    g_f = {k: torch.randn_like(v) for k, v in theta.items()}
    g_r = {k: torch.randn_like(v) * 1e-3 for k, v in theta.items()}
    base = wagle_mask(theta, g_f, g_r, 0.01, 0.6)
    scaled_f = wagle_mask(theta, {k: 7.5 * v for k, v in g_f.items()}, g_r, 0.01, 0.6)
    scaled_r = wagle_mask(theta, g_f, {k: 3.0 * v for k, v in g_r.items()}, 0.03, 0.6)
    snip = wagle_mask(theta, g_f, None, math.inf, 0.6)
    huge = wagle_mask(theta, g_f, g_r, 1e12, 0.6)
    for k in theta:
        assert torch.equal(base[k], scaled_f[k]) and torch.equal(base[k], scaled_r[k])
        assert torch.equal(snip[k], huge[k])


def test_top_k_ties_prefer_smaller_flat_index():
    m = top_k_mask({"x": torch.tensor([1.0, 2.0, 2.0]), "y": torch.tensor([2.0, 0.0])}, 2)
    assert m["x"].tolist() == [False, True, True] and m["y"].tolist() == [False, False]


def test_scoring_pass_leaves_weights_grads_and_mode():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    net.train()
    before = [p.detach().clone() for p in net.parameters()]
    batches = [torch.randn(5, 3) for _ in range(3)]

    def loss_fn(model, x):
        assert not model.training  # dropout off while scoring
        return model(x).pow(2).mean()

    g = summed_gradients(net, batches, loss_fn)
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    net.eval()
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for x in batches:  # the sum of per-batch gradients
        grads = torch.autograd.grad(net(x).pow(2).mean(), list(net.parameters()))
        for (n, _), gr in zip(net.named_parameters(), grads):
            expected[n] += gr
    for n in g:
        assert torch.allclose(g[n], expected[n], rtol=1e-6, atol=1e-7)


def test_sparsity_zero_is_dense_adamw_bit_for_bit():
    torch.manual_seed(3)
    p1 = torch.nn.Parameter(torch.randn(5, 5))
    p2 = torch.nn.Parameter(p1.detach().clone())
    masks = top_k_mask({"p": torch.rand(5, 5)}, keep_count(25, 0.0))
    o1, o2 = torch.optim.AdamW([p1], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1)
    frozen = FrozenWeights({"p": p2}, masks)
    for _ in range(5):
        g = torch.randn(5, 5)
        p1.grad, p2.grad = g.clone(), g.clone() * masks["p"]
        o1.step()
        o2.step()
        frozen.restore()
    assert torch.equal(p1, p2)


# --------------------------------------------------------------------------------------------------------------------
# trainer wiring


def _recipe(out, **method):
    from posttrain.recipe import parse_recipe

    return parse_recipe({
        "model": "builtin:tiny-qwen2-facts",
        "data": {"forget": {"source": "builtin:facts", "split": "forget05", "max_samples": 8},
                 "retain": {"source": "builtin:facts", "split": "retain95", "max_samples": 16}},
        "method": {"name": "npo", "mask": "wagle", "mask_sparsity": 0.5, **method},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "weight_decay": 0.1,
                     "max_grad_norm": 1.0, "logging_steps": 1, "save_steps": 10, "disable_tqdm": True},
        "output_dir": str(out),
        "seed": 0,
    })


def _changed(out):
    from transformers import AutoModelForCausalLM

    from posttrain.models import builtin_model_dir

    base = AutoModelForCausalLM.from_pretrained(builtin_model_dir("tiny-qwen2-facts")).state_dict()
    new = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = sum(int((base[k] != new[k]).sum()) for k in base if k != "lm_head.weight")
    return changed, sum(v.numel() for k, v in base.items() if k != "lm_head.weight")


def test_trainer_frozen_weights_bit_identical_with_weight_decay_and_clipping(tmp_path):
    """npo (no retain term) with the mask: after 3 AdamW steps with weight decay 0.1 and clipping on, at most the
    selected half of the weights differ from the start; with mask_decay_masked (the authors' behaviour) decay moves
    (nearly) every weight."""
    import json

    from posttrain.train import run

    run(_recipe(tmp_path / "frozen"), quiet=True)
    changed, total = _changed(tmp_path / "frozen")
    rows = [json.loads(line) for line in (tmp_path / "frozen" / "metrics.jsonl").read_text().splitlines()]
    selected = next(r["wagle/num_selected"] for r in rows if "wagle/num_selected" in r)
    assert selected == keep_count(total, 0.5)  # tied lm_head counted once
    assert 0.25 * total < changed <= selected
    run(_recipe(tmp_path / "decayed", mask_decay_masked=True), quiet=True)
    changed_ref, _ = _changed(tmp_path / "decayed")
    assert changed_ref > 0.9 * total


def test_config_errors(tmp_path):
    from posttrain.errors import UserError
    from posttrain.recipe import parse_recipe
    from posttrain.train import preflight

    with pytest.raises(UserError, match=r"^method\.mask_sparsity: required with mask: wagle"):
        parse_recipe({"model": "builtin:tiny-qwen2-facts", "data": {"forget": "builtin:facts"},
                      "method": {"name": "npo", "mask": "wagle"}})
    with pytest.raises(UserError, match=r"^method\.mask_gamma: only used with method\.mask: wagle"):
        parse_recipe({"model": "builtin:tiny-qwen2-facts", "data": {"forget": "builtin:facts"},
                      "method": {"name": "npo", "mask_gamma": 0.1}})
    recipe = _recipe(tmp_path)
    recipe.data.retain = None
    with pytest.raises(UserError, match=r"^data\.retain: method\.mask: wagle scores"):
        preflight(recipe, load_data=False)
    recipe = parse_recipe({**_recipe(tmp_path).resolved(), "peft": {"r": 4}})
    with pytest.raises(UserError, match=r"^method\.mask: wagle selects base-model weights"):
        preflight(recipe, load_data=False)
    with pytest.raises(UserError, match=r"method\.mask_sparsity"):
        _recipe(tmp_path, mask_sparsity=1.0)
