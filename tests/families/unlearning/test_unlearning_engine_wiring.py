"""The unlearning trainer on the log-prob engine (completion rows only, the retain KL as the engine's tiled KL, the
reference under ``no_grad``) against the path before it (TRL's fused LM head, full logits for the KL;
``trainer.use_engine = False``), on the same batch: every objective's loss, metrics and gradients, with WAGLE, LoRA
(the adapter-disabled reference), gradient accumulation, plain and conversational rows; and the forwards the trainer
runs are the ones the objective's ``needs`` declare; ``training.logprob_head`` (chunked and fused heads give the same
step; a head that cannot run here is refused before the model loads)."""

from __future__ import annotations

import pytest
import torch

from posttrain.families.unlearning.objective import UNLEARNING_OBJECTIVES
from posttrain.recipe import parse_recipe

REL = 1e-5
FORGET = {"source": "builtin:facts", "split": "forget05"}
RETAIN = {"source": "builtin:facts", "split": "retain95", "max_samples": 16}


def _trainer(method, tmp_path, *, objective=None, peft=None, accumulation=1, training=None, **params):
    """An unlearning trainer of ``method`` on the tiny model, the policy moved away from the reference (so that the
    NPO ratio and the retain KL and their gradients are not 0). ``objective``: run another objective with
    ``method``'s params (``ga_kl``, not a recipe method)."""
    from posttrain.families.unlearning.trainer import build_unlearning_trainer
    from posttrain.methods import get_method
    from posttrain.train import RunContext, load_models

    no_retain = UNLEARNING_OBJECTIVES[method].retain is None and params.get("mask") is None
    recipe = parse_recipe({
        "model": "builtin:tiny-qwen2",
        "data": {"forget": FORGET} if no_retain else {"forget": FORGET, "retain": RETAIN},
        "method": {"name": method, **params},
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                     "gradient_accumulation_steps": accumulation, "save_strategy": "no", "disable_tqdm": True,
                     **(training or {})},
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        **({"peft": peft} if peft else {}),
    })
    info = get_method(method)
    tok, model, ref = load_models(recipe, info)
    trainer = build_unlearning_trainer(RunContext(recipe, info, tok, model, ref, {}, []))
    if objective is not None:
        trainer.method, trainer.objective = objective, UNLEARNING_OBJECTIVES[objective]
        trainer.needs = trainer.objective.needs(trainer.params)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and ("lora_B" in name or peft is None):
                p.add_(0.05 * p.detach().abs().mean().clamp(min=0.02) * torch.randn(p.shape, generator=gen))
    trainer.model.train()
    return trainer


def _batch(trainer, start=0, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + n)])


def _conversational_batch(trainer, n=3):
    """Forget / retain rows through the chat template (the labels on the assistant turn and its end-of-turn)."""
    from posttrain.families.unlearning.trainer import tokenize_rows

    def rows(tag):
        return {"prompt": [[{"role": "user", "content": f"{tag} question {i}: where is place {i * 7}?"}]
                           for i in range(n)],
                "completion": [[{"role": "assistant", "content": f"It is in region {i * 3} of the {tag} map."}]
                               for i in range(n)]}

    tok = trainer.processing_class
    forget = tokenize_rows(rows("forget"), tok, 64)
    retain = tokenize_rows(rows("retain"), tok, 64)
    return trainer.data_collator([{"forget": f, "retain": r} for f, r in zip(forget, retain)])


class _Spy:
    """Counts the engine's calls (``forward``, with or without ``kl_with``; ``reference_forward``)."""

    def __init__(self, engine):
        self.engine, self.calls, self.inside_reference = engine, [], False
        self.forward, self.reference_forward = engine.forward, engine.reference_forward

    def __enter__(self):
        def forward(*args, **kwargs):
            if not self.inside_reference:
                self.calls.append("forward+kl" if kwargs.get("kl_with") is not None else "forward")
            return self.forward(*args, **kwargs)

        def reference_forward(*args, **kwargs):
            self.calls.append("reference")
            self.inside_reference = True
            try:
                return self.reference_forward(*args, **kwargs)
            finally:
                self.inside_reference = False

        self.engine.forward, self.engine.reference_forward = forward, reference_forward
        return self

    def __exit__(self, *exc):
        self.engine.forward, self.engine.reference_forward = self.forward, self.reference_forward


def _run(trainer, batches, *, engine: bool):
    """Summed loss, gradients and the last metrics of ``training_step`` over ``batches`` (one accumulation window),
    and the engine calls made."""
    trainer.use_engine = engine
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by the training loop
    trainer.model.zero_grad()
    trainer._metrics.clear()
    with _Spy(trainer.engine) as spy:
        loss = sum(trainer.training_step(trainer.model, dict(b)).detach() for b in batches)
    metrics = {k: v[-1] for k, v in trainer._metrics.items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss, grads, metrics, spy.calls


def _assert_same(got, expected):
    loss, grads, metrics, _ = got
    loss_0, grads_0, metrics_0, _ = expected
    assert abs(loss.item() - loss_0.item()) <= REL * max(abs(loss_0.item()), 1e-6), (loss.item(), loss_0.item())
    assert grads.keys() == grads_0.keys() and grads
    diff = sum(float(((grads[n] - grads_0[n]).double() ** 2).sum()) for n in grads) ** 0.5
    norm = sum(float((g.double() ** 2).sum()) for g in grads_0.values()) ** 0.5
    assert norm > 0 and diff <= REL * norm, f"gradient differs by {diff / norm:.3g} of its norm"
    assert metrics.keys() == metrics_0.keys()
    for name, value in metrics_0.items():
        assert abs(metrics[name] - value) <= 1e-4 * max(1.0, abs(value)), (name, metrics[name], value)


# the engine calls each objective's declared needs take: one policy call ([forget; retain] stacked with a retain
# NLL), the reference only where a need is the reference's, the tiled KL's policy call on the retain rows
CASES = {
    "ga": ({}, ["forward"]),
    "grad_diff": ({}, ["forward"]),
    "npo": ({}, ["forward", "reference"]),
    "npo_rt": ({}, ["forward", "reference"]),
    "npo_kl": ({}, ["forward", "reference", "reference", "forward+kl"]),
    "simnpo": ({}, ["forward"]),
    "rmu": ({"rmu_layer": 2, "alpha": 50.0}, ["forward", "forward", "forward"]),
}


@pytest.mark.parametrize("method", list(CASES))
def test_every_method_equals_the_path_before_the_engine(method, tmp_path, tiny_model_dir):
    params, calls = CASES[method]
    trainer = _trainer(method, tmp_path, **params)
    batch = _batch(trainer)
    engine = _run(trainer, [batch], engine=True)
    _assert_same(engine, _run(trainer, [batch], engine=False))
    assert engine[3] == calls


def test_ga_kl_on_the_tiled_kl_and_alpha_0_drops_the_retain_forwards(tmp_path, tiny_model_dir):
    trainer = _trainer("npo_kl", tmp_path, objective="ga_kl")
    batch = _batch(trainer)
    engine = _run(trainer, [batch], engine=True)
    _assert_same(engine, _run(trainer, [batch], engine=False))
    assert engine[3] == ["forward", "reference", "forward+kl"] and "retain_kl" in engine[2]
    trainer.params = trainer.params.model_copy(update={"alpha": 0.0})
    trainer.needs = trainer.objective.needs(trainer.params)
    assert _run(trainer, [batch], engine=True)[3] == ["forward"]


def test_npo_kl_every_position_keeps_the_full_logits_path(tmp_path, tiny_model_dir, caplog):
    import logging

    trainer = _trainer("npo_kl", tmp_path, retain_kl_mask="none")
    batch = _batch(trainer)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        got = _run(trainer, [batch], engine=True)
    assert got[3] == [] and got[0].item() == _run(trainer, [batch], engine=False)[0].item()
    assert "retain_kl_mask: none" in caplog.text


@pytest.mark.parametrize("method", ["npo_kl", "npo_rt"])
def test_lora_with_the_adapter_disabled_reference(method, tmp_path, tiny_model_dir):
    trainer = _trainer(method, tmp_path, peft={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert trainer.ref_model is None  # the reference is the policy with its adapter disabled
    batch = _batch(trainer)
    got = _run(trainer, [batch], engine=True)
    _assert_same(got, _run(trainer, [batch], engine=False))
    assert all("lora_" in name for name in got[1])


@pytest.mark.parametrize("method", ["npo_kl", "simnpo"])
def test_gradient_accumulation_and_wagle(method, tmp_path, tiny_model_dir):
    trainer = _trainer(method, tmp_path, accumulation=2, mask="wagle", mask_sparsity=0.5, mask_num_batches=1)
    assert trainer.weight_mask is not None
    batches = [_batch(trainer, 0), _batch(trainer, 4)]
    _assert_same(_run(trainer, batches, engine=True), _run(trainer, batches, engine=False))


@pytest.mark.parametrize("method", ["npo_kl", "grad_diff", "rmu"])
def test_conversational_rows(method, tmp_path, tiny_model_dir):
    trainer = _trainer(method, tmp_path, **CASES[method][0])
    batch = _conversational_batch(trainer)
    assert bool((batch["forget_labels"][:, 0] == -100).all()) and bool((batch["forget_labels"] != -100).any())
    _assert_same(_run(trainer, [batch], engine=True), _run(trainer, [batch], engine=False))


# the methods whose loss scores answer tokens (RMU's loss reads hidden states; its log-probs are logged only)
SCORING = ["ga", "grad_diff", "npo", "npo_rt", "npo_kl", "simnpo"]


@pytest.mark.parametrize("method", SCORING)
def test_chunked_and_fused_heads_give_the_same_step(method, tmp_path, tiny_model_dir):
    chunked = _trainer(method, tmp_path / "chunked", training={"logprob_head": "chunked"}, **CASES[method][0])
    fused = _trainer(method, tmp_path / "fused", training={"logprob_head": "fused"}, **CASES[method][0])
    assert (chunked.engine.head, fused.engine.head) == ("chunked", "fused")
    batch = _batch(chunked)
    got = _run(fused, [batch], engine=True)
    _assert_same(got, _run(chunked, [batch], engine=True))
    assert got[3] == CASES[method][1]


def test_an_unavailable_head_is_refused_before_the_model_loads(liger_refused_before_load):
    liger_refused_before_load({"model": "builtin:tiny-qwen2", "method": {"name": "npo"}, "data": {"forget": FORGET},
                               "training": {"max_steps": 1}})


@pytest.mark.parametrize("method", ["npo", "npo_rt", "npo_kl"])
def test_precomputed_reference_equals_the_live_one_and_is_read_on_a_rerun(method, tmp_path, tiny_model_dir,
                                                                          reference_cache):
    live = _trainer(method, tmp_path / "live")
    pre = _trainer(method, tmp_path / "pre", precompute_ref_log_probs=True)
    assert reference_cache == [1]
    assert (pre.ref_model is None) == (method != "npo_kl")  # npo_kl keeps its reference for the retain KL
    batch, pre_batch = _batch(live), _batch(pre)
    assert "forget_ref_logps" in pre_batch and torch.equal(pre_batch["forget_input_ids"], batch["forget_input_ids"])
    got = _run(pre, [pre_batch], engine=True)
    _assert_same(got, _run(live, [batch], engine=True))
    # no reference call for the forget rows; npo_kl's retain KL still calls its reference
    assert got[3] == (["forward", "reference", "forward+kl"] if method == "npo_kl" else ["forward"])
    _assert_same(_run(pre, [pre_batch], engine=False), _run(live, [batch], engine=False))
    again = _trainer(method, tmp_path / "again", precompute_ref_log_probs=True)
    assert reference_cache == [1]  # the rerun read the cached file
    assert torch.equal(_batch(again)["forget_ref_logps"], pre_batch["forget_ref_logps"])


def test_precomputed_reference_with_lora_is_the_adapter_disabled_policy(tmp_path, tiny_model_dir, reference_cache):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    live = _trainer("npo_rt", tmp_path / "live", peft=lora)
    pre = _trainer("npo_rt", tmp_path / "pre", peft=lora, precompute_ref_log_probs=True)
    assert reference_cache == [1] and live.ref_model is None and pre.ref_model is None
    batch, pre_batch = _batch(live), _batch(pre)
    got = _run(pre, [pre_batch], engine=True)
    _assert_same(got, _run(live, [batch], engine=True))
    assert got[3] == ["forward"]
