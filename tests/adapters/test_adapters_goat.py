"""GOAT tests (docs/methods/goat.md#how-it-is-tested)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from posttrain.adapters.goat import (  # noqa: E402
    GOATTrainerMixin,
    GoatLinear,
    apply_goat,
    clear_goat_aux,
    goat_aux_loss,
    goat_balance_loss,
    goat_balance_loss_from_sums,
    goat_layers,
    goat_metrics,
    goat_scaling,
    goat_svd_factors,
    load_goat,
    save_goat,
    topk_route,
)
from posttrain.errors import UserError  # noqa: E402

torch.set_num_threads(1)

QWEN = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_qwen(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN)).eval()


class One(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.lin(x)


def worked_model(top_k=2):
    m = One(6, 4)
    with torch.no_grad():
        m.lin.weight.zero_()
        for i, v in enumerate([4.0, 3.0, 2.0, 1.0]):
            m.lin.weight[i, i] = v
    pm = apply_goat(m, ["lin"], rank=2, num_experts=2, top_k=top_k, rho=10.0, eta=1.0, lora_dropout=0.0)
    layer = pm.base_model.model.lin
    assert isinstance(layer, GoatLinear)
    return pm, layer


# 1. worked init ---------------------------------------------------------------------------------------------------
def test_worked_init_numbers():
    pm, layer = worked_model()
    s = layer.scaling["default"]
    assert s == pytest.approx(math.sqrt(18), abs=1e-6) and s == pytest.approx(4.242641, abs=1e-6)
    A, B = layer.lora_expert_A["default"].detach(), layer.lora_expert_B["default"].detach()
    assert A.shape == (2, 1, 6) and B.shape == (2, 4, 1)
    assert B[0].abs().max().item() == pytest.approx(0.307052, abs=1e-6)
    assert A[0].abs().max().item() == pytest.approx(0.307052, abs=1e-6)
    assert B[1].abs().max().item() == pytest.approx(0.217119, abs=1e-6)
    assert A[1].abs().max().item() == pytest.approx(0.217119, abs=1e-6)
    d0, d1 = s * B[0] @ A[0], s * B[1] @ A[1]
    exp0, exp1 = torch.zeros(4, 6), torch.zeros(4, 6)
    exp0[0, 0], exp1[2, 2] = 0.4, 0.2
    torch.testing.assert_close(d0, exp0, atol=1e-6, rtol=0)
    torch.testing.assert_close(d1, exp1, atol=1e-6, rtol=0)
    R = layer.lora_res_B["default"] @ layer.lora_res_A["default"]
    expR = torch.zeros(4, 6)
    expR[0, 0], expR[2, 2] = 0.2, 0.1
    torch.testing.assert_close(R, expR, atol=1e-6, rtol=0)
    # the base weight itself is untouched (residual kept as frozen factors)
    assert layer.get_base_layer().weight[0, 0].item() == 4.0


def test_worked_forward_uniform_and_forced_top1():
    pm, layer = worked_model(top_k=2)
    with torch.no_grad():
        layer.lora_router["default"].weight.zero_()
        y = pm(torch.ones(6))
    torch.testing.assert_close(y, torch.tensor([4.0, 3.0, 2.0, 1.0]), atol=1e-6, rtol=0)

    pm1, layer1 = worked_model(top_k=1)
    with torch.no_grad():
        layer1.lora_router["default"].weight.zero_()
        layer1.lora_router["default"].weight[0].fill_(1.0)  # expert 0 wins for x = ones -> w = [1, 0]
        y1 = pm1(torch.ones(6))
    torch.testing.assert_close(y1, torch.tensor([4.2, 3.0, 1.9, 1.0]), atol=1e-6, rtol=0)


def test_scaling_values():
    assert goat_scaling("theory", 4096, 1, eta=1.0) == pytest.approx(110.8513, abs=1e-4)
    assert goat_scaling("theory", 4096, 1, eta=0.1) == pytest.approx(35.0542, abs=1e-4)
    assert goat_scaling("theory", 1024, 4, eta=1.0) == pytest.approx(27.7128, abs=1e-4)
    assert goat_scaling("alpha", 4096, 1, lora_alpha=16) == 16.0
    assert goat_scaling("rslora", 4096, 4, lora_alpha=16) == 8.0


# 2. segments ------------------------------------------------------------------------------------------------------
def test_segments_64x48():
    torch.manual_seed(0)
    m = One(48, 64)
    W0 = m.lin.weight.detach().clone()
    pm = apply_goat(m, ["lin"], rank=16, num_experts=8, top_k=2, lora_dropout=0.0)
    layer = pm.base_model.model.lin
    s = layer.scaling["default"]
    assert s == pytest.approx(math.sqrt(3 * 48 / 2))
    _, _, segs = goat_svd_factors(W0, 8, 16, s, 10.0)
    assert segs == [[6 * j, 6 * j + 1] for j in range(8)]
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    A, B = layer.lora_expert_A["default"].detach(), layer.lora_expert_B["default"].detach()
    assert A.shape == (8, 2, 48) and B.shape == (8, 64, 2)
    for j in range(8):
        seg = [6 * j, 6 * j + 1]
        expect = U[:, seg] @ torch.diag(S[seg]) @ Vh[seg, :] / 10.0
        torch.testing.assert_close(s * B[j] @ A[j], expect, atol=1e-5, rtol=0)


def test_rank_not_divisible_errors():
    with pytest.raises(UserError, match="peft.r"):
        apply_goat(One(8, 8), ["lin"], rank=6, num_experts=4)


def test_small_targets_left_unwrapped():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(16, 16)
            self.small = nn.Linear(16, 2)

    pm = apply_goat(Two(), ["big", "small"], rank=4, num_experts=2)
    assert pm.goat_skipped_targets == ["small"]
    assert isinstance(pm.base_model.model.big, GoatLinear)
    assert type(pm.base_model.model.small) is nn.Linear


# 3 & 6. whole-model equality ----------------------------------------------------------------------------------------
def test_uniform_routing_equals_base_and_disable_is_exact():
    base = tiny_qwen()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(input_ids=ids).logits.clone()
    pm = apply_goat(base, "all-linear", rank=8, num_experts=4, top_k=4, lora_dropout=0.0).eval()
    with torch.no_grad():
        default_router = pm(input_ids=ids).logits
        with pm.disable_adapter():
            assert torch.equal(pm(input_ids=ids).logits, ref)
        for layer in goat_layers(pm):
            layer.lora_router["default"].weight.zero_()
        uniform = pm(input_ids=ids).logits
    assert (uniform - ref).abs().max().item() <= 1e-5
    assert torch.isfinite(default_router).all()  # differs slightly from base; never asserted equal


def test_merge_refused():
    pm = apply_goat(tiny_qwen(), ["q_proj"], rank=4, num_experts=2, top_k=1)
    with pytest.raises(UserError, match="cannot be merged"):
        pm.merge_and_unload()


def test_fold_residual_matches_unfolded():
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    a = apply_goat(tiny_qwen(), ["q_proj", "v_proj"], rank=4, num_experts=2, top_k=1, lora_dropout=0.0).eval()
    torch.manual_seed(7)
    for layer in goat_layers(a):
        nn.init.normal_(layer.lora_router["default"].weight)
    b = apply_goat(tiny_qwen(), ["q_proj", "v_proj"], rank=4, num_experts=2, top_k=1, lora_dropout=0.0,
                   fold_residual=True).eval()
    for la, lb in zip(goat_layers(a), goat_layers(b)):
        lb.lora_router["default"].weight.data.copy_(la.lora_router["default"].weight)
    with torch.no_grad():
        assert (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item() <= 1e-5


# 4. routing weights and gradients ---------------------------------------------------------------------------------
def test_topk_weights_and_gradients():
    p, w, sel = topk_route(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    assert ((w > 0).sum(-1) == 2).all() and torch.equal(sel, (w > 0).float())

    torch.manual_seed(0)
    pm = apply_goat(One(16, 16), ["lin"], rank=8, num_experts=4, top_k=2, lora_dropout=0.0)
    layer = pm.base_model.model.lin
    with torch.no_grad():  # with x > 0, experts 0 and 1 always win; 2 and 3 are never selected
        Wz = layer.lora_router["default"].weight
        for e, v in enumerate([1.0, 0.5, -1.0, -2.0]):
            Wz[e].fill_(v)
    pm.train()
    x = torch.rand(32, 16) + 0.1
    loss = pm(x).pow(2).mean() + goat_aux_loss(pm)
    loss.backward()
    gA, gB = layer.lora_expert_A["default"].grad, layer.lora_expert_B["default"].grad
    assert gA[:2].abs().sum() > 0 and gB[:2].abs().sum() > 0
    assert torch.all(gA[2:] == 0) and torch.all(gB[2:] == 0)
    assert layer.lora_router["default"].weight.grad.abs().sum() > 0
    assert layer.get_base_layer().weight.grad is None
    assert not layer.lora_res_A["default"].requires_grad


# 5. balance loss ----------------------------------------------------------------------------------------------------
def test_balance_loss_worked_numbers():
    p = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    for k, paper, ref in [(1, 1.0, 1.0), (2, 1.0, 2.0)]:
        _, sel = p.topk(k, -1)
        selected = torch.zeros_like(p).scatter(-1, sel, 1.0)
        assert selected.sum(0).tolist() == [k, k]
        assert goat_balance_loss(p, selected, k).item() == pytest.approx(paper, abs=1e-7)
        assert goat_balance_loss(p, selected, k, match_reference=True).item() == pytest.approx(ref, abs=1e-7)
    assert p.mean(0).tolist() == pytest.approx([0.55, 0.45])


def test_model_aux_is_sum_over_layers_and_mask():
    pm = apply_goat(tiny_qwen(), "all-linear", rank=8, num_experts=4, top_k=2, lora_dropout=0.0)
    pm.train()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    clear_goat_aux(pm)
    pm(input_ids=ids)
    layers = goat_layers(pm)
    assert len(layers) == 14 and all(len(l._goat_aux) == 1 for l in layers)
    total = goat_aux_loss(pm)
    torch.testing.assert_close(total, sum(goat_balance_loss_from_sums(*l._goat_aux[0][:3], 2) for l in layers))
    # perfectly balanced routing gives exactly 1 per layer; here it is >= ~1 per layer
    assert total.item() > 0.9 * len(layers)
    m = goat_metrics(pm)
    assert len(m["goat/expert_load"]) == 4 and sum(m["goat/expert_load"]) == pytest.approx(1.0, abs=1e-5)
    clear_goat_aux(pm)
    assert goat_aux_loss(pm).item() == 0.0
    with torch.no_grad():
        pm.eval()
        pm(input_ids=ids)
    assert all(len(l._goat_aux) == 0 for l in layers)  # eval forwards record nothing


# 7. save / load -------------------------------------------------------------------------------------------------------
def test_save_load_roundtrip_without_svd(tmp_path, monkeypatch):
    pm = apply_goat(tiny_qwen(), "all-linear", rank=8, num_experts=4, top_k=2, lora_dropout=0.0)
    with torch.no_grad():  # move away from init so the test is meaningful
        for layer in goat_layers(pm):
            layer.lora_expert_B["default"].add_(0.01)
    pm.eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        live = pm(input_ids=ids).logits
    save_goat(pm, str(tmp_path))
    import json

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is False and cfg["r"] == 8
    gcfg = json.loads((tmp_path / "goat_config.json").read_text())
    assert gcfg["num_experts"] == 4 and gcfg["top_k"] == 2 and gcfg["s"] == pytest.approx(math.sqrt(3 * 32 / 2))

    def no_svd(*a, **k):
        raise AssertionError("SVD must not run at load")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    loaded = load_goat(tiny_qwen(), str(tmp_path)).eval()
    with torch.no_grad():
        out = loaded(input_ids=ids).logits
    assert (out - live).abs().max().item() <= 1e-6


def test_plain_peft_load_is_not_silent(tmp_path):
    from peft import PeftModel

    pm = apply_goat(tiny_qwen(), ["q_proj"], rank=4, num_experts=2, top_k=1)
    save_goat(pm, str(tmp_path))
    with pytest.raises(Exception, match="load with posttrain.adapters.load_goat"):
        PeftModel.from_pretrained(tiny_qwen(), str(tmp_path))
    from peft import AutoPeftModelForCausalLM

    with pytest.raises(Exception, match="load with posttrain.adapters.load_goat"):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))


# short training run -----------------------------------------------------------------------------------------------------
class _DS(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8):
        g = torch.Generator().manual_seed(0)
        base = torch.arange(length) % 8
        self.items = [(base + torch.randint(0, 4, (1,), generator=g)) % 64 for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i], "attention_mask": torch.ones(8, dtype=torch.long)}


def test_trainer_short_run_loss_decreases(tmp_path):
    from transformers import Trainer, TrainingArguments

    class GOATTrainer(GOATTrainerMixin, Trainer):
        pass

    pm = apply_goat(tiny_qwen(), "all-linear", rank=8, num_experts=4, top_k=2, lora_dropout=0.0, eta=1.0)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=10, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = GOATTrainer(model=pm, args=args, train_dataset=_DS())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert min(h["loss"] for h in logs[-3:]) < logs[0]["loss"]
    assert "goat/aux_loss" in logs[0] and "goat/max_load" in logs[0]
    # loss = task + coef · aux
    batch = {k: torch.stack([_DS()[i][k] for i in range(4)]) for k in ("input_ids", "labels", "attention_mask")}
    pm.train()
    total = trainer.compute_loss(pm, batch)
    clear_goat_aux(pm)
    task = pm(**batch).loss
    torch.testing.assert_close(total, task + 1e-3 * goat_aux_loss(pm), atol=1e-6, rtol=0)


@pytest.mark.parametrize("logging_steps,first,strategy,expected", [
    (3, False, "steps", [False, False, True, False, False, True]),
    (3, True, "steps", [True, False, True, False, False, True]),
    (1, False, "steps", [True] * 6),
    (3, False, "no", [False] * 6),
    (3, False, "epoch", [True] * 6),
])
def test_goat_metrics_are_computed_in_the_steps_that_log_only(logging_steps, first, strategy, expected):
    """HF's DefaultFlowCallback logs after step t (1-based) when t % logging_steps == 0, and after step 1 with
    logging_first_step; the metrics (and their cross-process reductions) are computed for those steps only."""
    from types import SimpleNamespace

    from posttrain.adapters.goat import logs_at_step_end

    args = SimpleNamespace(logging_strategy=strategy, logging_first_step=first, logging_steps=logging_steps)
    got = [logs_at_step_end(SimpleNamespace(args=args, state=SimpleNamespace(global_step=g, logging_steps=None)))
           for g in range(6)]
    assert got == expected


# the experts and the residual in one product ------------------------------------------------------------------------
def _separate_terms(layer, x: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i s B_i A_i x − res_B res_A x`` term by term in fp64 (the formula the fused product must equal)."""
    A = layer.lora_expert_A["default"].double()
    B = layer.lora_expert_B["default"].double()
    s = layer.scaling["default"]
    _, w, _ = topk_route(layer.lora_router["default"](x.float()).double(), layer.goat.top_k)
    y = sum(w[:, i:i + 1] * s * (x.double() @ A[i].T @ B[i].T) for i in range(A.shape[0]))
    if not layer.goat.fold_residual:
        y = y - x.double() @ layer.lora_res_A["default"].double().T @ layer.lora_res_B["default"].double().T
    return y


def test_fused_delta_hand_checked_case():
    """E = 2, d = 1 on a 2 x 2 layer: A_0 = [1, 0], A_1 = [0, 1], B_0 = [1; 0], B_1 = [0; 1], s = 2, residual factors
    res_A = [[1, 0], [0, 1]], res_B = [[0.5, 0], [0, 0.5]] (R = I/2); a router that gives w = (0.75, 0.25) on
    x = [2, 4]: y = 0.75·2·2·[1, 0] + 0.25·2·4·[0, 1] − [1, 2] = [3 − 1, 2 − 2] = [2, 0]."""
    pm = apply_goat(nn.Sequential(nn.Linear(2, 2)), ["0"], rank=2, num_experts=2, top_k=2, lora_dropout=0.0)
    layer = goat_layers(pm)[0]
    with torch.no_grad():
        layer.lora_expert_A["default"].copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
        layer.lora_expert_B["default"].copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]]))
        layer.lora_res_A["default"].copy_(torch.eye(2))
        layer.lora_res_B["default"].copy_(0.5 * torch.eye(2))
        layer.lora_router["default"].weight.copy_(torch.tensor([[math.log(3.0) / 2, 0.0], [0.0, 0.0]]))
        layer.scaling["default"] = 2.0
        y = layer.goat_delta(torch.tensor([[2.0, 4.0]]), "default")
    torch.testing.assert_close(y, torch.tensor([[2.0, 0.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fold_residual", [False, True], ids=["residual", "folded"])
def test_fused_delta_equals_the_separate_terms_within_fp32_rounding(fold_residual):
    """On random weights and routers, the fused product equals the term-by-term formula (fp64) to fp32 rounding, for
    the output and for the gradients of x, the experts and the router."""
    torch.manual_seed(0)
    pm = apply_goat(nn.Sequential(nn.Linear(48, 40)), ["0"], rank=8, num_experts=4, top_k=2, lora_dropout=0.0,
                    fold_residual=fold_residual)
    layer = goat_layers(pm)[0]
    with torch.no_grad():
        layer.lora_expert_B["default"].add_(0.1 * torch.randn_like(layer.lora_expert_B["default"]))
        layer.lora_expert_A["default"].add_(0.1 * torch.randn_like(layer.lora_expert_A["default"]))
    x = torch.randn(64, 48, requires_grad=True)
    params = [x, layer.lora_expert_A["default"], layer.lora_expert_B["default"], layer.lora_router["default"].weight]
    fused = layer.goat_delta(x, "default")
    grads = torch.autograd.grad(fused.square().sum(), params)
    x64 = x.detach().double().requires_grad_()
    reference = _separate_terms(layer, x64)
    ref_grads = torch.autograd.grad(reference.square().sum(), [x64, *params[1:]])
    scale = reference.abs().max()
    assert (fused.double() - reference).abs().max() <= 1e-5 * scale
    for got, want in zip(grads, ref_grads):
        assert (got.double() - want.double()).abs().max() <= 1e-4 * want.abs().max()
