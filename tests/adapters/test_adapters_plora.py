"""PLoRA tests (docs/methods/plora.md#how-it-is-tested)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

from posttrain.adapters.plora import (  # noqa: E402
    PLoRACallback,
    PLoRAMixin,
    export_merged,
    iter_lora_layers,
    lora_parameters,
    make_periodic_scheduler,
    merge_and_reinit,
    plora_unload_,
    stage_generator,
)
from posttrain.errors import UserError  # noqa: E402

torch.set_num_threads(1)


def tiny_qwen(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def tiny_peft(r: int = 4, seed: int = 0):
    model = tiny_qwen(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, cfg)


def randomize_B(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)


class One(nn.Module):
    def __init__(self, n_in=2, n_out=2):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.lin(x)


def worked_layer():
    m = get_peft_model(One(), LoraConfig(r=1, lora_alpha=2, target_modules=["lin"]))  # s = alpha/r = 2
    layer = m.base_model.model.lin
    with torch.no_grad():
        layer.get_base_layer().weight.copy_(torch.eye(2))
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[0.5], [-1.0]]))
    return layer


def eff(layer):
    return layer.get_base_layer().weight + layer.get_delta_weight("default")


# 1. worked example ---------------------------------------------------------------------------------------------
def test_worked_example_reset():
    layer = worked_layer()
    assert layer.scaling["default"] == 2
    norm = plora_unload_(layer, "default", "reset", generator=stage_generator(0, 0, "lin"))
    W = layer.get_base_layer().weight
    torch.testing.assert_close(W, torch.tensor([[2.0, 2.0], [-2.0, -3.0]]), atol=1e-7, rtol=0)
    assert torch.all(layer.lora_B["default"].weight == 0)
    assert not torch.allclose(layer.lora_A["default"].weight, torch.tensor([[1.0, 2.0]]))
    assert norm == pytest.approx(math.sqrt(1 + 4 + 4 + 16), abs=1e-6)


def test_worked_example_momentum():
    layer = worked_layer()
    plora_unload_(layer, "default", "momentum", lam=0.1)
    W = layer.get_base_layer().weight
    torch.testing.assert_close(W, torch.tensor([[1.1, 0.2], [-0.2, 0.6]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight, torch.tensor([[0.45], [-0.9]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].weight, torch.tensor([[1.0, 2.0]]), atol=0, rtol=0)
    torch.testing.assert_close(eff(layer), torch.tensor([[2.0, 2.0], [-2.0, -3.0]]), atol=1e-6, rtol=0)


def test_worked_example_momentum_scale_both():
    layer = worked_layer()
    plora_unload_(layer, "default", "momentum_scale_both", lam=0.1)
    torch.testing.assert_close(layer.get_base_layer().weight, torch.tensor([[1.1, 0.2], [-0.2, 0.6]]),
                               atol=1e-7, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].weight, torch.tensor([[0.9, 1.8]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight, torch.tensor([[0.45], [-0.9]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(eff(layer), torch.tensor([[1.91, 1.82], [-1.82, -2.64]]), atol=1e-6, rtol=0)
    # steady-state fraction lam / (1 - (1-lam)^2) of each LoRA update reaches W
    assert 0.1 / (1 - 0.9**2) == pytest.approx(0.5263, abs=1e-4)


def test_generator_deterministic_and_distinct():
    a = torch.rand(3, generator=stage_generator(1, 2, "x.q_proj"))
    b = torch.rand(3, generator=stage_generator(1, 2, "x.q_proj"))
    c = torch.rand(3, generator=stage_generator(1, 3, "x.q_proj"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_config_validation():
    with pytest.raises(UserError, match="peft.plora.stage_steps"):
        PLoRACallback(mode="reset", stage_steps=None)
    with pytest.raises(UserError, match="peft.plora.stage_steps"):
        PLoRACallback(mode="reset", stage_steps=1)
    assert PLoRACallback(mode="momentum").state.stage_steps == 1
    from posttrain.adapters.plora import check_plora_reference_model

    with pytest.raises(UserError, match="peft.plora.*beta"):
        check_plora_reference_model(beta=0.1)
    check_plora_reference_model(beta=0.1, precompute_ref_log_probs=True)


# 2. function preserved across an unload ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reset", "momentum"])
def test_logits_unchanged_by_unload(mode):
    model = tiny_peft()
    randomize_B(model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        delta_before = [l.get_delta_weight("default").abs().max().item() for _, l in iter_lora_layers(model)]
        assert max(delta_before) > 0
        m = merge_and_reinit(model, mode=mode, lam=0.1, seed=0, stage_index=0)
        after = model(input_ids=ids).logits
    assert (before - after).abs().max().item() <= 1e-5
    assert m["plora/unload_norm"] > 0 and m["plora/underflow_frac"] == 0.0
    if mode == "reset":
        for _, layer in iter_lora_layers(model):
            assert torch.all(layer.lora_B["default"].weight == 0)
            assert torch.all(layer.get_delta_weight("default") == 0)
        # disabled adapter now gives the updated backbone (not the original model)
        with torch.no_grad(), model.disable_adapter():
            assert (model(input_ids=ids).logits - after).abs().max().item() <= 1e-5


# 3. optimizer reset ---------------------------------------------------------------------------------------------
def test_optimizer_state_reset_equals_fresh_adamw():
    model = tiny_peft()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def loss_fn():
        return model(input_ids=ids, labels=ids).loss

    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    lora = lora_parameters(model)
    assert all(p in opt.state for p in lora)
    m = merge_and_reinit(model, opt, mode="reset", seed=0, stage_index=0)
    assert m["plora/optimizer_entries_reset"] == len(lora)
    assert not any(p in opt.state for p in lora)

    opt.zero_grad()
    loss_fn().backward()
    snap = [p.detach().clone() for p in params]
    grads = [p.grad.detach().clone() for p in params]
    opt.step()
    # a freshly built AdamW on the same grads / params
    clones = [nn.Parameter(s.clone()) for s in snap]
    for c, g in zip(clones, grads):
        c.grad = g.clone()
    fresh = torch.optim.AdamW(clones, lr=1e-2, weight_decay=0.0)
    fresh.step()
    for p, c in zip(params, clones):
        assert (p.detach() - c.detach()).abs().max().item() <= 1e-7


# 4. LR restarts per stage --------------------------------------------------------------------------------------
def test_periodic_lr_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_periodic_scheduler(opt, "linear", 4, warmup_ratio=0.25)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == lrs[4:]
    assert lrs[:4] == pytest.approx([0.0, 1.0, 2 / 3, 1 / 3])


# 5. rank growth --------------------------------------------------------------------------------------------------
def _regress(stage_steps: int | None, n_steps: int = 80):
    torch.manual_seed(0)
    n = 16
    m = get_peft_model(One(n, n), LoraConfig(r=1, lora_alpha=1, target_modules=["lin"]))
    layer = m.base_model.model.lin
    W0 = layer.get_base_layer().weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    U, V = torch.linalg.qr(torch.randn(n, 4, generator=g))[0], torch.linalg.qr(torch.randn(n, 4, generator=g))[0]
    target = U @ torch.diag(torch.tensor([2.0, 1.5, 1.0, 0.7])) @ V.T  # rank-4 dW*
    X = torch.randn(256, n, generator=g)
    Y = X @ (W0 + target).T
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-2)
    for k in range(1, n_steps + 1):
        opt.zero_grad()
        loss = ((m(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        if stage_steps and k % stage_steps == 0:
            merge_and_reinit(m, opt, mode="reset", seed=0, stage_index=k // stage_steps)
    return layer, W0, loss.item()


def _num_rank(M):
    s = torch.linalg.svdvals(M)
    return int((s > 1e-3 * s.max()).sum())


def test_rank_growth_beyond_adapter_rank():
    layer, W0, loss_plora = _regress(stage_steps=20)  # 4 stages
    rank_plora = _num_rank(layer.get_base_layer().weight.detach() + layer.get_delta_weight("default").detach() - W0)
    assert rank_plora >= 2
    layer_l, W0_l, loss_lora = _regress(stage_steps=None)
    assert _num_rank(layer_l.get_delta_weight("default").detach()) == 1
    assert torch.equal(layer_l.get_base_layer().weight, W0_l)
    assert loss_plora < loss_lora


# 8. merged export --------------------------------------------------------------------------------------------------
def test_export_merged_reproduces_logits(tmp_path):
    model = tiny_peft()
    randomize_B(model)
    merge_and_reinit(model, mode="momentum", lam=0.3)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        live = model(input_ids=ids).logits
    export_merged(model, str(tmp_path / "merged"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        out = loaded(input_ids=ids).logits
    assert (live - out).abs().max().item() <= 1e-5
    # the live model still has its adapter (not mutated)
    assert any(l.get_delta_weight("default").abs().max() > 0 for _, l in iter_lora_layers(model))


# checkpoint state round trip -------------------------------------------------------------------------------------
def test_callback_save_load_state(tmp_path):
    model = tiny_peft()
    randomize_B(model)
    cb = PLoRACallback(mode="reset", stage_steps=10, seed=5)
    merge_and_reinit(model, mode="reset", seed=5)
    cb.state.stage_index = 3
    cb.save_state(model, str(tmp_path))
    fresh = tiny_peft()
    cb2 = PLoRACallback(mode="reset", stage_steps=10)
    cb2.load_state(fresh, str(tmp_path))
    assert cb2.state.stage_index == 3 and cb2.state.seed == 5
    for (n1, l1), (n2, l2) in zip(iter_lora_layers(model), iter_lora_layers(fresh)):
        assert n1 == n2 and torch.equal(l1.get_base_layer().weight, l2.get_base_layer().weight)


# short training run with the HF Trainer -------------------------------------------------------------------------
class _DS(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8):
        g = torch.Generator().manual_seed(0)
        base = torch.arange(length) % 8
        self.items = [(base + torch.randint(0, 4, (1,), generator=g)) % 64 for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


@pytest.mark.filterwarnings("ignore:peft.plora.stage_steps")
def test_trainer_short_run_loss_decreases(tmp_path):
    from transformers import Trainer, TrainingArguments

    class PLoRATrainer(PLoRAMixin, Trainer):
        pass

    model = tiny_peft()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12, learning_rate=2e-2,
        lr_scheduler_type="linear", warmup_steps=0.25, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = PLoRATrainer(model=model, args=args, train_dataset=_DS(), plora_mode="reset", plora_stage_steps=4)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.plora_callback.state.stage_index == 3
    assert min(losses[-3:]) < losses[0]
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[0:4] == pytest.approx(lrs[4:8])


# refusals: DoRA and quantized base weights (docs/methods/plora.md#checkpoints-and-export: rejected with one line naming the key) ---------
def test_dora_is_refused_before_any_weight_changes(tmp_path):
    """A DoRA adapter (``use_dora=True``) is refused at the unload (its magnitude vector depends on W), by the pure
    unload, by ``merge_and_reinit`` and by a PLoRA trainer at its first unload; no weight is touched by the unload.
    A recipe cannot even ask for it: ``peft.use_dora`` is an unknown key."""
    from transformers import Trainer, TrainingArguments

    from posttrain.recipe import parse_recipe

    model = get_peft_model(tiny_qwen(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                   use_dora=True))
    randomize_B(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    name, layer = next(iter_lora_layers(model))
    assert "default" in layer.lora_magnitude_vector  # really a DoRA layer
    for mode in ("reset", "momentum", "momentum_scale_both"):
        with pytest.raises(UserError) as exc:
            plora_unload_(layer, "default", mode, lam=0.1, generator=stage_generator(0, 0, name))
        msg = str(exc.value)
        assert msg.startswith("peft.use_dora: DoRA cannot be combined with peft.plora") and "\n" not in msg, msg
    with pytest.raises(UserError, match=r"^peft\.use_dora: "):
        merge_and_reinit(model, mode="reset", seed=0, stage_index=0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # refused before writing W, A or B

    class PLoRATrainer(PLoRAMixin, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True)
    trainer = PLoRATrainer(model=model, args=args, train_dataset=_DS(), plora_mode="momentum", plora_stage_steps=1)
    with pytest.raises(UserError, match=r"^peft\.use_dora: DoRA cannot be combined with peft\.plora"):
        trainer.train()
    assert trainer.state.global_step == 1 and trainer.plora_callback.state.stage_index == 0  # no unload happened
    for n, lay in iter_lora_layers(model):  # the base weights are the initial ones (only the adapter took a step)
        assert torch.equal(lay.get_base_layer().weight, before[f"{n}.base_layer.weight"])

    with pytest.raises(UserError, match=r"^peft\.use_dora: unknown key"):
        parse_recipe({"model": "builtin:tiny-qwen2", "data": {"train": "builtin:arithmetic-sft"},
                      "method": {"name": "sft"}, "peft": {"type": "plora", "use_dora": True}})


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=["int8", "uint8"])
def test_quantized_base_weight_is_refused(dtype):
    """Quantized storage (bitsandbytes keeps 8-bit weights as int8 and packed 4-bit ones as uint8; simulated here by an
    integer base weight, bitsandbytes is not installed) cannot absorb s·B·A: refused, nothing changed."""
    layer = worked_layer()
    base = layer.get_base_layer()
    base.weight = nn.Parameter(torch.tensor([[1, 0], [0, 1]], dtype=dtype), requires_grad=False)
    A0, B0 = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    for mode in ("reset", "momentum"):
        with pytest.raises(UserError) as exc:
            plora_unload_(layer, "default", mode, lam=0.1, generator=stage_generator(0, 0, "lin"))
        msg = str(exc.value)
        assert msg.startswith("peft.plora: quantized (4/8-bit) base weights cannot absorb") and "\n" not in msg, msg
    assert torch.equal(base.weight, torch.tensor([[1, 0], [0, 1]], dtype=dtype))
    assert torch.equal(layer.lora_A["default"].weight, A0) and torch.equal(layer.lora_B["default"].weight, B0)
