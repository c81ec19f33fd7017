"""The GRPO trainer on the log-prob engine (completion rows only, each prompt computed once for its group) against the
path before it (TRL's fused LM head on whole rows, ``trainer.use_engine = False``), on the same generated batch: the
loss and gradients of the training forward for the surrogate's aggregations and clipping rules, an off-policy second
iteration, a KL term, PACS, RLOO, LoRA and gradient accumulation; the old-policy and reference log-probs TRL computes
at generation; sharing on and off; the recipe keys. (test_rl_trainer.py compares the loss math with stock TRL.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

NUM_GEN = 4
REL = 1e-5


def forced(prompts, completions, forced, **kwargs):
    """The rows' ``forced`` column as the reward (correct and wrong rows in every group, whatever is sampled)."""
    return list(forced)


def _trainer(policy_dir, tmp_path, *, ref_dir=None, peft=False, config=None, **params):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.families.rl.config import RLConfig
    from posttrain.families.rl.parts import AGGREGATIONS
    from posttrain.families.rl.trainer import PosttrainGRPOTrainer
    from posttrain.methods import GRPOParams

    torch.manual_seed(0)
    p = GRPOParams(**params)
    rows = [dict(r, forced=float(i % 3 == 0)) for i, r in enumerate(
        r for r in arithmetic_rows("rl", num_samples=4, seed=3) for _ in range(NUM_GEN))]
    cfg = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, num_generations=NUM_GEN,
               per_device_train_batch_size=4 * NUM_GEN, max_completion_length=6, max_steps=1, logging_steps=1,
               beta=p.beta, epsilon=p.epsilon, loss_type=AGGREGATIONS[p.aggregation].trl_loss_type, temperature=1.5,
               disable_tqdm=True)
    cfg.update(config or {})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False) if peft else None
    trainer = PosttrainGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir), reward_funcs=[forced], args=RLConfig(**cfg),
        train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(policy_dir),
        peft_config=lora, params=p, ref_model=AutoModelForCausalLM.from_pretrained(ref_dir) if ref_dir else None)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(1)
    inputs = trainer._generate_and_score_completions([dict(r) for r in rows])
    assert inputs["advantages"].abs().sum() > 0
    assert bool((inputs["prompt_mask"] == 0).any()), "no left padding in the prompts"
    return trainer, inputs


def _run(trainer, inputs, *, engine: bool, share: bool = True, ga: int = 1):
    """Loss and gradients (a copy per parameter) of compute_loss + backward, and whether each engine call shared."""
    trainer.use_engine = engine
    trainer.engine.share_prompts = share
    trainer.current_gradient_accumulation_steps = ga
    trainer.model.zero_grad()
    calls = []
    forward = trainer.engine.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(out.shared)
        return out

    trainer.engine.forward = spy
    try:
        loss = trainer._compute_loss(trainer.model, dict(inputs))
    finally:
        trainer.engine.forward = forward
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


def _assert_same(got, expected):
    loss, grads = got[:2]
    loss_0, grads_0 = expected[:2]
    assert abs(loss.item() - loss_0.item()) <= REL * max(abs(loss_0.item()), 1e-6), (loss.item(), loss_0.item())
    assert grads.keys() == grads_0.keys() and grads
    diff = sum(float(((grads[n] - grads_0[n]).double() ** 2).sum()) for n in grads) ** 0.5
    norm = sum(float((g.double() ** 2).sum()) for g in grads_0.values()) ** 0.5
    assert norm > 0 and diff <= REL * norm, f"gradient differs by {diff / norm:.3g} of its norm"


def _off_policy(inputs, scale=0.3):
    """A second iteration's old log-probs: moved away from the current ones, so that the clipping rule acts."""
    g = torch.Generator().manual_seed(0)
    old = inputs["old_per_token_logps"] if "old_per_token_logps" in inputs else None
    assert old is not None, "num_iterations 2: TRL computes the old policy's log-probs at generation"
    return {**inputs, "old_per_token_logps": old + scale * torch.randn(old.shape, generator=g)}


def _check_all_paths(trainer, inputs):
    before = _run(trainer, inputs, engine=False)
    assert before[2] == []  # the TRL-head path never calls the engine
    shared = _run(trainer, inputs, engine=True)
    assert shared[2] == [True]
    _assert_same(shared, before)
    unshared = _run(trainer, inputs, engine=True, share=False)
    assert unshared[2] == [False]
    _assert_same(unshared, before)
    _assert_same(unshared, shared)


CASES = {
    "grpo": dict(),
    "dr_grpo": dict(aggregation="dr_grpo"),
    "dapo": dict(aggregation="dapo", epsilon_high=0.28),
    "bnpo": dict(aggregation="bnpo"),
    "rloo": dict(advantage="rloo"),
    "gspo": dict(clipping="gspo"),
    "cispo": dict(clipping="cispo", cispo_weight_max=1.2),
    "gppo-sft": dict(clipping="gppo", sft_coef=0.5),
    "entropy-bonus": dict(entropy_coef=0.01),
    "pacs": dict(loss="pacs", pacs_weight="none"),
}


@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
def test_engine_equals_the_trl_head_path(arith_model_dir, tmp_path, params):
    trainer, inputs = _trainer(arith_model_dir, tmp_path, **params)
    _check_all_paths(trainer, inputs)


@pytest.mark.parametrize("clipping", ["ppo", "gspo", "cispo"])
def test_second_iteration_with_a_kl_term(arith_model_dir, tiny_model_dir, tmp_path, clipping):
    """num_iterations 2 (the old policy's log-probs from generation, moved off-policy: the rule clips) and beta > 0
    against a reference model, both computed at generation through the engine (shared) and TRL's head: equal."""
    keys = dict(cispo_weight_max=1.2) if clipping == "cispo" else dict(epsilon_high=0.28)
    trainer, inputs = _trainer(arith_model_dir, tmp_path, ref_dir=tiny_model_dir, clipping=clipping, beta=0.1,
                               config=dict(num_iterations=2), **keys)
    _check_generation_logps(trainer, inputs, ("old_per_token_logps", "ref_per_token_logps"))
    off = _off_policy(inputs)
    _check_all_paths(trainer, off)
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0


def _check_generation_logps(trainer, inputs, keys):
    """What TRL computes at generation (old policy, reference), recomputed on the engine with sharing off and on and
    on TRL's head: equal to 1e-5 relative (per token)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    mask = inputs["completion_mask"].bool()
    models = {"old_per_token_logps": trainer.model, "ref_per_token_logps": trainer.ref_model}
    for key in keys:
        model = models[key]
        if model is None:  # LoRA: the adapter-disabled base
            model = trainer.model
        context = trainer.model.disable_adapter() if key == "ref_per_token_logps" and trainer.ref_model is None \
            else contextlib.nullcontext()
        results = []
        with torch.no_grad(), context:
            for engine, share in ((False, True), (True, True), (True, False)):
                trainer.use_engine, trainer.engine.share_prompts = engine, share
                logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, att, ids.size(1) - inputs[
                    "prompt_ids"].size(1), batch_size=8)
                results.append(logps[mask])
        trainer.use_engine, trainer.engine.share_prompts = True, True
        torch.testing.assert_close(inputs[key][mask], results[1], rtol=REL, atol=REL)
        for other in results[::2]:
            torch.testing.assert_close(other, results[1], rtol=REL, atol=REL)


def test_lora_with_the_adapter_disabled_reference(arith_model_dir, tmp_path):
    trainer, inputs = _trainer(arith_model_dir, tmp_path, peft=True, beta=0.1)
    assert trainer.ref_model is None
    _check_generation_logps(trainer, inputs, ("ref_per_token_logps",))
    before = _run(trainer, inputs, engine=False)
    assert before[1] and all("lora" in n for n in before[1])
    _check_all_paths(trainer, inputs)


def test_gradient_accumulation_over_shuffled_micro_batches(arith_model_dir, tmp_path):
    """Two micro-batches of rows shuffled as TRL shuffles a generation batch (groups split across them, each
    micro-batch's rows of a prompt still packed around it): summed losses and gradients equal the TRL-head path's."""
    trainer, inputs = _trainer(arith_model_dir, tmp_path, aggregation="dapo",
                               config=dict(gradient_accumulation_steps=2, per_device_train_batch_size=2 * NUM_GEN))
    n = inputs["completion_ids"].size(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    halves = [{k: v[order[part]] if torch.is_tensor(v) and v.dim() and v.size(0) == n else v
               for k, v in inputs.items()} for part in (slice(0, n // 2), slice(n // 2, n))]

    def accumulated(**kw):
        losses, grads = [], {}
        for half in halves:
            loss, g, _ = _run(trainer, half, ga=2, **kw)
            losses.append(loss)
            grads = {k: grads.get(k, 0) + v for k, v in g.items()}
        return sum(losses), grads

    before = accumulated(engine=False)
    _assert_same(accumulated(engine=True), before)
    _assert_same(accumulated(engine=True, share=False), before)


def test_single_stream_rows_run_unpacked_and_equal(arith_model_dir, tmp_path):
    """Rows whose prompts all differ (SPO's one completion per prompt, or a micro-batch of distinct prompts) still
    pass through the shared layout, each its own group: the same results."""
    trainer, inputs = _trainer(arith_model_dir, tmp_path)
    firsts = torch.arange(0, inputs["completion_ids"].size(0), NUM_GEN)
    n = inputs["completion_ids"].size(0)
    distinct = {k: v[firsts] if torch.is_tensor(v) and v.dim() and v.size(0) == n else v for k, v in inputs.items()}
    _check_all_paths(trainer, distinct)


def test_prompt_groups_find_equal_prompts_wherever_they_are():
    from posttrain.families.rl.common import prompt_groups

    ids = torch.tensor([[0, 5, 6], [7, 5, 6], [5, 6, 8], [9, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]])
    # rows 0 and 4 hold prompt [5, 6] (left-padded); every other prompt differs
    assert prompt_groups(ids, mask) == [0, 1, 2, 3, 0]


def test_recipe_keys_reach_the_trainer(tmp_path):
    from posttrain.errors import UserError
    from posttrain.recipe.training_args import check_training

    assert check_training({"logprob_head": "chunked", "share_prompts": False}, "rl") == {
        "logprob_head": "chunked", "share_prompts": False}
    with pytest.raises(UserError, match=r"^training.share_prompts: expected true or false, got 'no'$"):
        check_training({"share_prompts": "no"}, "rl")


def test_liger_on_cpu_is_refused_before_the_model_loads(tmp_path):
    import yaml

    from posttrain.errors import UserError
    from posttrain.families.base import FAMILIES
    from posttrain.methods import METHODS
    from posttrain.recipe import load_recipe
    from posttrain.registry import load

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": "builtin:tiny-qwen2", "method": {"name": "grpo", "rewards": [{"name": "exact_match"}]},
        "output_dir": str(tmp_path / "out"), "data": {"train": {"source": "builtin:arithmetic-rl"}},
        "training": {"logprob_head": "liger"}}))
    recipe = load_recipe(path)
    with pytest.raises(UserError, match="^training.logprob_head: liger cannot run here: liger-kernel runs on CUDA"):
        load(FAMILIES["rl"].build_config)(recipe, METHODS["grpo"])


def test_sharing_off_and_the_fallback_are_logged_once(arith_model_dir, tmp_path, caplog):
    """``share_prompts: false`` runs every row whole (said once); a router aux loss turns the engine off for TRL's
    head (said once)."""
    import logging

    from posttrain.logprobs import engine as E

    off = "shared prompts off (training.share_prompts: false): every completion runs with its prompt"
    fallback = ("log-prob engine off (the model's router aux loss: the full model forward is needed): TRL's fused "
                "head scores every row whole (same losses, no saving)")
    E._LOGGED.difference_update({off, fallback})
    with caplog.at_level(logging.INFO, logger="posttrain"):
        trainer, inputs = _trainer(arith_model_dir, tmp_path, config=dict(share_prompts=False))
        assert not trainer.engine.share_prompts
        assert _run(trainer, inputs, engine=True, share=trainer.engine.share_prompts)[2] == [False]
        assert not trainer._engine_runs(True, {}) and not trainer._engine_runs(True, {})
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(off) == 1 and messages.count(fallback) == 1
