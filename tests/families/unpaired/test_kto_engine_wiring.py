"""The KTO trainer on the log-prob engine (completion rows only, for the target rows, the mismatched KL rows and the
reference) against the path before it (TRL's fused LM head on whole rows, ``trainer.use_engine = False``), on the same
batch: loss, TRL's metrics and gradients, with LoRA (the adapter-disabled reference), gradient accumulation,
conversational rows and the reference precomputed through the engine; ``training.logprob_head`` (chunked and fused
heads give the same step; a head that cannot run here is refused before the model loads). (test_kto.py compares the engine path with
stock TRL's KTOTrainer.)"""

from __future__ import annotations

import random

import pytest
import torch

BATCH = 8
REL = 1e-5


def _rows(n=12, conversational=False):
    from posttrain.data.arithmetic import arithmetic_rows

    rows = []
    for r in arithmetic_rows("preference", num_samples=n, max_operand=30):
        rows += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                 {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    random.Random(0).shuffle(rows)
    if conversational:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]} for r in rows]
    return rows


def _trainer(policy_dir, ref_dir, tmp_path, *, peft=False, conversational=False, **config):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.families.unpaired.config import UnpairedConfig
    from posttrain.families.unpaired.trainer import PosttrainKTOTrainer
    from posttrain.methods import KTOParams

    p = KTOParams(beta=0.2, desirable_weight=1.2)
    args = UnpairedConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_length=64, seed=0,
                     per_device_train_batch_size=BATCH, beta=p.beta, desirable_weight=p.desirable_weight,
                     gradient_checkpointing=False, **config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False) if peft else None
    trainer = PosttrainKTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir),
        ref_model=None if peft else AutoModelForCausalLM.from_pretrained(ref_dir),
        train_dataset=Dataset.from_list(_rows(conversational=conversational)),
        processing_class=AutoTokenizer.from_pretrained(policy_dir), args=args, peft_config=lora, params=p)
    trainer.model.train()
    return trainer


def _run(trainer, batches, *, engine: bool):
    """Summed loss, gradients and last metrics of ``training_step`` over ``batches``, and the engine calls made."""
    trainer.use_engine = engine
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by the training loop
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    calls = []
    forward = trainer.engine.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(int(out.mask.sum()))
        return out

    trainer.engine.forward = spy
    try:
        loss = sum(trainer.training_step(trainer.model, dict(b)).detach() for b in batches)
    finally:
        trainer.engine.forward = forward
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss, grads, metrics, calls


def _assert_same(got, expected):
    loss, grads, metrics, _ = got
    loss_0, grads_0, metrics_0, _ = expected
    assert abs(loss.item() - loss_0.item()) <= REL * max(abs(loss_0.item()), 1e-6), (loss.item(), loss_0.item())
    assert grads.keys() == grads_0.keys() and grads
    diff = sum(float(((grads[n] - grads_0[n]).double() ** 2).sum()) for n in grads) ** 0.5
    norm = sum(float((g.double() ** 2).sum()) for g in grads_0.values()) ** 0.5
    assert norm > 0 and diff <= REL * norm, f"gradient differs by {diff / norm:.3g} of its norm"
    assert metrics.keys() == metrics_0.keys() and "kl" in metrics
    for name, value in metrics_0.items():
        assert abs(metrics[name] - value) <= 1e-4 * max(1.0, abs(value)), (name, metrics[name], value)


def test_engine_equals_the_fused_head_path(arith_model_dir, tiny_model_dir, tmp_path):
    trainer = _trainer(arith_model_dir, tiny_model_dir, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    got = _run(trainer, [batch], engine=True)
    _assert_same(got, _run(trainer, [batch], engine=False))
    # policy, policy's KL rows, reference, reference's KL rows: completion tokens only
    completion = int(batch["completion_mask"][:, 1:].sum())
    kl_completion = int(batch["KL_completion_mask"][:, 1:].sum())
    assert got[3] == [completion, kl_completion, completion, kl_completion]
    assert completion < int(batch["attention_mask"].sum()) // 2  # the prompt is most of each row


def test_lora_and_gradient_accumulation(arith_model_dir, tiny_model_dir, tmp_path):
    trainer = _trainer(arith_model_dir, tiny_model_dir, tmp_path, peft=True, gradient_accumulation_steps=2)
    assert trainer.ref_model is None  # the reference is the policy with its adapter disabled
    loader = iter(trainer.get_train_dataloader())
    batches = [next(loader), next(loader)]
    got = _run(trainer, batches, engine=True)
    _assert_same(got, _run(trainer, batches, engine=False))
    assert all("lora_" in name for name in got[1])


def test_conversational_rows(arith_model_dir, tiny_model_dir, tmp_path):
    trainer = _trainer(arith_model_dir, tiny_model_dir, tmp_path, conversational=True)
    batch = next(iter(trainer.get_train_dataloader()))
    _assert_same(_run(trainer, [batch], engine=True), _run(trainer, [batch], engine=False))


def test_reference_precomputed_through_the_shared_plan(arith_model_dir, tiny_model_dir, tmp_path, reference_cache):
    live = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "live")
    pre = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "pre", precompute_ref_log_probs=True)
    assert reference_cache == [1] and len(list((tmp_path / "reference-cache").iterdir())) == 1
    assert pre.ref_model is None and "ref_logps" in pre.train_dataset.column_names
    batch = next(iter(live.get_train_dataloader()))
    pre_batch = next(iter(pre.get_train_dataloader()))
    assert torch.equal(pre_batch["input_ids"], batch["input_ids"])
    got = _run(pre, [pre_batch], engine=True)
    _assert_same(got, _run(live, [batch], engine=True))
    assert len(got[3]) == 2  # the policy's two calls; the reference was computed once before training
    again = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "again", precompute_ref_log_probs=True)
    assert reference_cache == [1]  # the rerun read the cached file
    assert again.train_dataset["ref_logps"] == pre.train_dataset["ref_logps"]
    assert again.train_dataset["ref_KL_logps"] == pre.train_dataset["ref_KL_logps"]


def test_precomputed_reference_with_lora_is_the_adapter_disabled_policy(arith_model_dir, tiny_model_dir, tmp_path,
                                                                        reference_cache):
    live = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "live", peft=True)
    pre = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "pre", peft=True, precompute_ref_log_probs=True)
    batch, pre_batch = (next(iter(t.get_train_dataloader())) for t in (live, pre))
    got = _run(pre, [pre_batch], engine=True)
    _assert_same(got, _run(live, [batch], engine=True))
    assert len(got[3]) == 2 and reference_cache == [1]


def test_chunked_and_fused_heads_give_the_same_step(arith_model_dir, tiny_model_dir, tmp_path):
    chunked = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "chunked", logprob_head="chunked")
    fused = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "fused", logprob_head="fused")
    assert (chunked.engine.head, fused.engine.head) == ("chunked", "fused")
    batch = next(iter(chunked.get_train_dataloader()))
    assert torch.equal(next(iter(fused.get_train_dataloader()))["input_ids"], batch["input_ids"])
    _assert_same(_run(fused, [batch], engine=True), _run(chunked, [batch], engine=True))
    assert fused.engine.resolve_head(fused.model) == "fused"


def test_an_unavailable_head_is_refused_before_the_model_loads(liger_refused_before_load):
    liger_refused_before_load({"model": "builtin:tiny-qwen2", "method": {"name": "kto"},
                               "data": {"train": {"source": "builtin:arithmetic-pref"}},
                               "training": {"max_steps": 1, "per_device_train_batch_size": 2}})