"""LoRA-GGPO tests (docs/methods/ggpo.md#how-it-is-tested)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402

from posttrain.adapters.ggpo import (  # noqa: E402
    GGPOPerturbation,
    GGPOTrainerMixin,
    check_ggpo_reference_model,
    ggpo_layers,
    ggpo_row_std,
    lora_equivalent_grad,
    lora_grad_row_norm2,
    sigma_at,
)
from posttrain.errors import UserError  # noqa: E402

torch.set_num_threads(1)

QWEN = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_peft(seed=0, r=4):
    torch.manual_seed(seed)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN))
    m = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B so that s·B·A and ∇A matter
        for _, _, layer in ggpo_layers(m):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return m


def base_weights(m):
    return {n: l.get_base_layer().weight.detach().clone() for _, n, l in ggpo_layers(m)}


# worked example ----------------------------------------------------------------------------------------------------
WA = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
WB = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
GA = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
GB = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
W0 = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)


def test_worked_example_row_std_exact():
    Wp = W0 + 1.0 * WB @ WA
    torch.testing.assert_close(Wp, torch.tensor([[3.0, 4, 0, 1], [0, 0, 1, 0]], dtype=torch.float64))
    w2 = (Wp**2).sum(1)
    assert w2.tolist() == [26.0, 1.0]
    G = lora_equivalent_grad(WA, WB, GA, GB, 1.0)
    torch.testing.assert_close(G, torch.tensor([[1.0, 0, 0, 0.5], [0, 0, 0, 2]], dtype=torch.float64))
    g2_explicit = (G**2).sum(1)
    g2_gram = lora_grad_row_norm2(WA, WB, GA, GB, 1.0)
    assert g2_explicit.tolist() == [1.25, 4.0]
    torch.testing.assert_close(g2_gram, g2_explicit, rtol=1e-12, atol=0)
    std = ggpo_row_std(w2, g2_gram, 0.05, 0.01, 4)
    torch.testing.assert_close(std**2, torch.tensor([0.0162578125, 0.00065], dtype=torch.float64), rtol=1e-7, atol=0)
    torch.testing.assert_close(std, torch.tensor([0.1275061, 0.0254951], dtype=torch.float64), rtol=1e-6, atol=0)


def test_gram_equals_explicit_random():
    g = torch.Generator().manual_seed(0)
    A, B, gA, gB = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3, 9), (7, 3), (3, 9), (7, 3)])
    torch.testing.assert_close(lora_grad_row_norm2(A, B, gA, gB, 2.5),
                               (lora_equivalent_grad(A, B, gA, gB, 2.5) ** 2).sum(1), rtol=1e-10, atol=1e-12)


def test_sigma_schedule():
    assert sigma_at(0.05, "constant", 7, None) == 0.05
    assert sigma_at(0.05, "cosine_ramp", 0, 10) == 0.0
    assert sigma_at(0.05, "cosine_ramp", 5, 10) == pytest.approx(0.025)
    assert sigma_at(0.05, "cosine_ramp", 10, 10) == pytest.approx(0.05)


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.lin(x)


def worked_peft():
    m = get_peft_model(One(), LoraConfig(r=1, lora_alpha=1, target_modules=["lin"]))
    layer = m.base_model.model.lin
    with torch.no_grad():
        layer.get_base_layer().weight.copy_(W0.float())
        layer.lora_A["default"].weight.copy_(WA.float())
        layer.lora_B["default"].weight.copy_(WB.float())
    layer.lora_A["default"].weight.grad = GA.float().clone()
    layer.lora_B["default"].weight.grad = GB.float().clone()
    return m, layer


def test_layer_path_and_noise_statistics():
    m, layer = worked_peft()
    pert = GGPOPerturbation(sigma=0.05, beta=0.01, seed=0)
    pert.update_grad_norms(m)
    torch.testing.assert_close(pert.gnorm2["base_model.model.lin"], torch.tensor([1.25, 4.0]))
    std, w2, _ = pert.row_std(layer, "base_model.model.lin", 0.05)
    torch.testing.assert_close(std, torch.tensor([0.1275061, 0.0254951]), rtol=1e-6, atol=0)
    draws = torch.stack([pert.draw_noise(m, t)["base_model.model.lin"] for t in range(2000)])  # 2000 x 2 x 4
    per_row = draws.permute(1, 0, 2).reshape(2, -1)
    emp_std, emp_mean = per_row.std(1), per_row.mean(1)
    assert ((emp_std / std - 1).abs() < 0.03).all()
    assert (emp_mean.abs() < 3 * std / per_row.shape[1] ** 0.5).all()


# restoration -------------------------------------------------------------------------------------------------------
def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 8), generator=g) for _ in range(n)]


def test_restore_copy_bitwise_with_grad_accumulation():
    m = tiny_peft()
    before = base_weights(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    pert = GGPOPerturbation(sigma=0.05, beta=0.01, seed=0, restore="copy")
    pert.apply(m, step=0)
    assert any(not torch.equal(before[n], l.get_base_layer().weight) for _, n, l in ggpo_layers(m))
    for ids in _batches(2):  # GA = 2
        (m(input_ids=ids, labels=ids).loss / 2).backward()
    pert.remove(m)
    opt.step()
    for _, n, l in ggpo_layers(m):
        assert torch.equal(l.get_base_layer().weight, before[n])
    assert pert.metrics()["ggpo/copy_bytes"] > 0 and pert.extra_flops > 0


def test_restore_regenerate_fp32_within_4_ulp():
    m = tiny_peft()
    before = base_weights(m)
    pert = GGPOPerturbation(sigma=0.05, beta=0.01, seed=0, restore="regenerate")
    eps = pert.draw_noise(m, step=0)
    with pert.perturbed(m, step=0):
        ids = _batches(1)[0]
        m(input_ids=ids, labels=ids).loss.backward()
    for _, n, l in ggpo_layers(m):
        W, W0_ = l.get_base_layer().weight.detach(), before[n]
        # ulp at the magnitude the value passed through (max of |W| and |W + eps|): W + eps - eps rounds there
        mag = torch.maximum(W0_.abs(), (W0_ + eps[n]).abs())
        ulp = torch.nextafter(mag, torch.tensor(float("inf"))) - mag
        assert ((W - W0_).abs() <= 4 * ulp).all()
        assert (W - W0_).abs().max() < 1e-6


# equivalence with a plain LoRA step on W + ε -------------------------------------------------------------------------
def _train_params(m):
    return [p for p in m.parameters() if p.requires_grad]


def test_step_equals_plain_lora_step_on_perturbed_weights():
    m = tiny_peft()
    ref = copy.deepcopy(m)
    batches = _batches(2)
    pert = GGPOPerturbation(sigma=0.05, beta=0.01, seed=3, restore="copy")
    # one warm-up step so gnorm2 != 0 (the gradient term is exercised)
    for model in (m, ref):
        model.zero_grad()
    m(input_ids=batches[0], labels=batches[0]).loss.backward()
    pert.update_grad_norms(m)
    assert all(v.sum() > 0 for v in pert.gnorm2.values())
    m.zero_grad()

    eps = pert.draw_noise(m, step=1)
    opt = torch.optim.AdamW(_train_params(m), lr=1e-2)
    pert.apply(m, step=1)
    for ids in batches:
        (m(input_ids=ids, labels=ids).loss / 2).backward()
    pert.remove(m)
    torch.nn.utils.clip_grad_norm_(_train_params(m), 1.0)
    opt.step()

    with torch.no_grad():
        for _, n, l in ggpo_layers(ref):
            l.get_base_layer().weight.add_(eps[n])
    opt_r = torch.optim.AdamW(_train_params(ref), lr=1e-2)
    for ids in batches:
        (ref(input_ids=ids, labels=ids).loss / 2).backward()
    torch.nn.utils.clip_grad_norm_(_train_params(ref), 1.0)
    opt_r.step()
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), ref.named_parameters()):
        if p1.requires_grad:
            torch.testing.assert_close(p1, p2, atol=1e-7, rtol=0)


def test_sigma_zero_is_plain_lora_bitwise():
    m = tiny_peft()
    ref = copy.deepcopy(m)
    ids = _batches(1)[0]
    pert = GGPOPerturbation(sigma=0.0, seed=0)
    with pert.perturbed(m, step=0):
        m(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    for p1, p2 in zip(m.parameters(), ref.parameters()):
        if p1.requires_grad:
            assert torch.equal(p1.grad, p2.grad)


def test_gnorm2_from_accumulated_preclip_grads():
    m = tiny_peft()
    params = _train_params(m)
    pert = GGPOPerturbation(sigma=0.05, beta=0.01, seed=0)
    pert.apply(m, step=0)
    for ids in _batches(2):
        (m(input_ids=ids, labels=ids).loss / 2).backward()
    pre = {n: (l.lora_A["default"].weight.grad.clone(), l.lora_B["default"].weight.grad.clone())
           for _, n, l in ggpo_layers(m)}
    pert.remove(m)
    total = torch.nn.utils.clip_grad_norm_(params, 1e-4)
    assert total > 1e-4  # clipping is active
    for _, n, l in ggpo_layers(m):
        gA, gB = pre[n]
        A, B = l.lora_A["default"].weight.detach(), l.lora_B["default"].weight.detach()
        expect = (lora_equivalent_grad(A, B, gA, gB, l.scaling["default"]) ** 2).sum(1)
        torch.testing.assert_close(pert.gnorm2[n], expect, rtol=1e-5, atol=1e-10)


def test_reference_model_guard_and_state_roundtrip():
    with pytest.raises(UserError, match="ggpo.*beta"):
        check_ggpo_reference_model(beta=0.1, ref_model=None, precompute_ref_log_probs=False)
    check_ggpo_reference_model(beta=0.1, precompute_ref_log_probs=True)
    check_ggpo_reference_model(beta=0.0)
    p = GGPOPerturbation(seed=4)
    p.gnorm2 = {"x": torch.tensor([1.0, 2.0])}
    p.step = 9
    q = GGPOPerturbation()
    q.load_state_dict(p.state_dict())
    assert q.seed == 4 and q.step == 9 and torch.equal(q.gnorm2["x"], p.gnorm2["x"])


# short Trainer run ---------------------------------------------------------------------------------------------------
class _DS(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8):
        g = torch.Generator().manual_seed(0)
        base = torch.arange(length) % 8
        self.items = [(base + torch.randint(0, 4, (1,), generator=g)) % 64 for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def test_trainer_short_run_restores_and_learns(tmp_path):
    from transformers import Trainer, TrainingArguments

    class GGPOTrainer(GGPOTrainerMixin, Trainer):
        pass

    m = tiny_peft()
    before = base_weights(m)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=10,
        learning_rate=1e-2, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True,
    )
    trainer = GGPOTrainer(model=m, args=args, train_dataset=_DS(), ggpo_sigma=0.05, ggpo_beta=0.01,
                          ggpo_restore="copy")
    trainer.train()
    assert not trainer.ggpo.active and trainer.ggpo.num_perturbed_steps == 10
    for _, n, l in ggpo_layers(m):
        assert torch.equal(l.get_base_layer().weight, before[n])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert min(h["loss"] for h in logs[-3:]) < logs[0]["loss"]
    assert logs[-1]["ggpo/noise_std_mean"] > 0 and logs[-1]["ggpo/g_row_norm_mean"] > 0
    assert 0 <= logs[-1]["ggpo/grad_term_frac"] < 1


def test_grpo_rollouts_see_clean_weights(tmp_path, monkeypatch):
    """GRPO makes its rollouts (and old log-probs) in ``_prepare_inputs``: the noise must go on only after that, for
    the loss forward and backward, and be on for every micro-batch's loss."""
    from pathlib import Path

    from posttrain.recipe import load_recipe
    from posttrain.train import run
    from posttrain.families.rl.trainer import PosttrainGRPOTrainer

    seen: dict[str, list[bool]] = {"generate": [], "loss": []}
    generate, compute_loss = PosttrainGRPOTrainer._generate_and_score_completions, PosttrainGRPOTrainer.compute_loss

    def spy_generate(self, *args, **kwargs):
        seen["generate"].append(self.ggpo.active)
        return generate(self, *args, **kwargs)

    def spy_loss(self, *args, **kwargs):
        seen["loss"].append(self.ggpo.active)
        return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(PosttrainGRPOTrainer, "_generate_and_score_completions", spy_generate)
    monkeypatch.setattr(PosttrainGRPOTrainer, "compute_loss", spy_loss)
    root = Path(__file__).resolve().parents[2]
    recipe = load_recipe(root / "recipes" / "grpo.yaml", [
        f"output_dir={tmp_path}", "training.max_steps=2", "training.per_device_train_batch_size=8",
        "training.num_generations=4", "training.gradient_accumulation_steps=2", "training.save_strategy='no'",
        "data.test=null", "report=false",
        "peft={type: ggpo, r: 4, lora_alpha: 8, target_modules: all-linear, ggpo: {sigma: 0.05}}",
    ])
    run(recipe, quiet=True)
    assert seen["generate"] and not any(seen["generate"]), seen
    assert len(seen["loss"]) == 4 and all(seen["loss"]), seen


def test_restore_copy_sets_the_original_storage_aside_without_cloning_it():
    """One noise draw and no weight clone per step: ``W + eps`` replaces the weight's storage for the step and the
    original storage itself (not a copy) comes back at ``remove``."""
    m = tiny_peft()
    originals = {n: l.get_base_layer().weight.data for _, n, l in ggpo_layers(m)}
    pointers = {n: t.data_ptr() for n, t in originals.items()}
    draws = []
    pert = GGPOPerturbation(sigma=0.05, beta=0.01, seed=0, restore="copy")
    noise = pert._noise
    pert._noise = lambda *a: draws.append(a[0]) or noise(*a)
    pert.apply(m, step=0)
    for _, n, l in ggpo_layers(m):
        assert pert._saved[n].data_ptr() == pointers[n] != l.get_base_layer().weight.data_ptr()
    ids = _batches(1)[0]
    m(input_ids=ids, labels=ids).loss.backward()
    pert.remove(m)
    assert len(draws) == len(originals)  # one draw per layer and step
    for _, n, l in ggpo_layers(m):
        assert l.get_base_layer().weight.data_ptr() == pointers[n]


# the noise draw against its formula, bit for bit ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("restore", ["copy", "regenerate"])
def test_perturbed_weights_and_metrics_equal_the_formula_bitwise(dtype, restore):
    """``apply`` builds W' and W + ε in the buffers it already owns and reduces its metrics only when they are read;
    the perturbed weights (second step: β||G_i||² from the first step's gradients) and every metric are the plain
    formula's bits: ``W' = W + s·B·A``, ``std = σ·sqrt((||W'_i||² + β||G_i||²)/n)``, ``ε = randn(layer's own
    generator)·std``, ``(W + ε)`` rounded to the weight's dtype."""
    from posttrain.adapters.ggpo import _seed

    m = tiny_peft().to(dtype)
    pert = GGPOPerturbation(sigma=0.05, beta=0.5, seed=7, restore=restore)
    ids = _batches(1)[0]
    with pert.perturbed(m, step=0):
        m(input_ids=ids, labels=ids).loss.backward()
    g_row_norm_mean = pert.metrics()["ggpo/g_row_norm_mean"]  # of the gradients just accumulated
    expected, stds, fracs, wnorms, gnorms = {}, [], [], [], []
    for idx, name, layer in ggpo_layers(m):
        W = layer.get_base_layer().weight.detach()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = (B.detach().float() @ A.detach().float()) * layer.scaling["default"]  # peft's, in the LoRA dtype
        Wp = W.float() + delta.to(dtype).float()
        w2 = (Wp * Wp).sum(dim=1)
        g2 = lora_grad_row_norm2(A.detach().float(), B.detach().float(), A.grad.float(), B.grad.float(),
                                 layer.scaling["default"])
        std = ggpo_row_std(w2, g2, 0.05, 0.5, W.shape[1])
        gen = torch.Generator().manual_seed(_seed(7, 1, 0, idx))
        eps = torch.randn(W.shape, generator=gen, dtype=torch.float32) * std[:, None]
        expected[name] = (W.float() + eps).to(dtype)
        stds.append(std.mean())
        fracs.append((0.5 * g2 / (w2 + 0.5 * g2).clamp_min(1e-30)).mean())
        wnorms.append(w2.sqrt().mean())
        gnorms.append(g2.sqrt().mean())
    pert.apply(m, step=1)
    for _, name, layer in ggpo_layers(m):
        assert torch.equal(layer.get_base_layer().weight, expected[name]), name
    assert g_row_norm_mean == float(torch.stack(gnorms).mean())
    got = pert.metrics()
    assert got["ggpo/noise_std_mean"] == float(torch.stack(stds).mean())
    assert got["ggpo/grad_term_frac"] == float(torch.stack(fracs).mean())
    assert got["ggpo/w_row_norm_mean"] == float(torch.stack(wnorms).mean())
    pert.remove(m, update_norms=False)
