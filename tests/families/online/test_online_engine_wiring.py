"""Online DPO on the log-prob engine (completion rows only, each pair's prompt computed once for its two completions,
the model's own distribution: temperature 1) against the path before it (TRL's fused LM head on whole rows at
temperature 1, reproduced here from TRL's own ``GRPOTrainer._get_per_token_logps_and_entropies``), on the same
sampled batch: the reference's log-probs computed at generation, the loss, the gradients and every logged metric, for
every online method and loss, with left-padded and chat-template prompts, LoRA (the adapter-disabled reference),
gradient accumulation and sharing on and off; the recipe keys. (test_online_dpo.py compares with stock TRL's
``OnlineDPOTrainer``.)"""

from __future__ import annotations

import contextlib
import typing

import pytest
import torch

PROMPTS = 6
REL = 1e-5
SAMPLING_TEMPERATURE = 0.7  # the DPO log-probs stay at temperature 1 whatever the sampling temperature


def _online_cases():
    """Every online method of the registry, with each of its DPO loss forms."""
    from posttrain.methods import METHODS

    cases = {}
    for info in METHODS.values():
        if info.family != "online":
            continue
        for loss in typing.get_args(info.params.model_fields["loss"].annotation):
            cases[f"{info.name}-{loss}"] = (info.name, dict(loss=loss, beta=0.5 if loss == "ipo" else 0.1))
    assert cases
    return cases


CASES = _online_cases()


def forced(prompts, completions, forced, **kwargs):
    """The rows' ``forced`` column as the reward: each pair's first or second completion wins, or they tie."""
    return list(forced)


def _rows(chat: bool):
    from posttrain.data.arithmetic import arithmetic_rows

    pattern = [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]  # first chosen, second chosen, tied
    rows = []
    for i, row in enumerate(arithmetic_rows("rl", num_samples=PROMPTS, max_operand=300, seed=5)):
        prompt = [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"]
        rows += [dict(row, prompt=prompt, forced=value) for value in pattern[i % 3]]
    return rows


def _trainer(policy_dir, ref_dir, tmp_path, *, method="online_dpo", peft=False, chat=False, config=None, **params):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.families.online.trainer import PosttrainOnlineDPOTrainer
    from posttrain.families.rl.config import RLConfig
    from posttrain.methods import METHODS

    info = METHODS[method]
    p = info.params(**params)
    torch.manual_seed(0)
    rows = _rows(chat)
    cfg = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, num_generations=2,
               per_device_train_batch_size=2 * PROMPTS, max_completion_length=6, max_steps=1, beta=p.beta,
               temperature=SAMPLING_TEMPERATURE, disable_tqdm=True)
    cfg.update(config or {})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False) if peft else None
    assert info.family == "online"
    trainer = PosttrainOnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir), reward_funcs=[forced], args=RLConfig(**cfg),
        train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(policy_dir),
        peft_config=lora, params=p, ref_model=None if peft else AutoModelForCausalLM.from_pretrained(ref_dir))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(1)
    inputs = trainer._generate_and_score_completions([dict(r) for r in rows])
    assert bool((inputs["prompt_mask"] == 0).any()), "no left padding in the prompts"
    assert inputs["pair_keep"].sum() > 0
    # the untrained policy samples distinct completions: a kept pair of identical ones has a gradient that cancels
    # to fp32 rounding, which no relative tolerance can compare
    identical = (inputs["completion_ids"][:, 0] == inputs["completion_ids"][:, 1]).all(-1)
    assert not bool((identical & inputs["pair_keep"].bool()).any())
    return trainer, inputs


# ----------------------------------------------------------------------------------------------------------------------
# the path before the engine


def _with_trl_head(model):
    """TRL's fused LM head at temperature 1 on the causal LM inside ``model`` (as the trainer added it before)."""
    from trl.trainer.utils import add_fused_lm_head

    from posttrain.logprobs.engine import causal_lm

    lm = causal_lm(model)
    if not getattr(lm, "_test_trl_head_t1", False):
        add_fused_lm_head(lm, outputs=("log_probs", "entropy"))
        lm._test_trl_head_t1 = True
    return model


def _trl_head_logps(trainer, model, input_ids, attention_mask, keep):
    from trl import GRPOTrainer

    return GRPOTrainer._get_per_token_logps_and_entropies(trainer, _with_trl_head(model), input_ids, attention_mask,
                                                          keep, compute_entropy=True)[:2]


def _rows_of(inputs):
    from posttrain.families.online.trainer import _by_row

    ids = torch.cat([_by_row(inputs["prompt_ids"]), _by_row(inputs["completion_ids"])], dim=1)
    att = torch.cat([_by_row(inputs["prompt_mask"]), _by_row(inputs["completion_mask"])], dim=1)
    return ids, att, inputs["completion_ids"].size(-1)


@contextlib.contextmanager
def _reference(trainer):
    """The reference network: the reference model, or the policy with its adapter disabled (LoRA)."""
    if trainer.ref_model is not None:
        yield trainer.ref_model
    else:
        with trainer.model.disable_adapter():
            yield trainer.model


def _trl_reference_logps(trainer, inputs):
    """The reference's per-token log-probs as the path before computed them at generation, pair-grouped."""
    ids, att, keep = _rows_of(inputs)
    with torch.no_grad(), _reference(trainer) as ref:
        logps, _ = _trl_head_logps(trainer, ref, ids, att, keep)
    return logps.view(*inputs["completion_ids"].shape)


# ----------------------------------------------------------------------------------------------------------------------
# running both paths


def _run(trainer, inputs, *, engine: bool, share: bool = True, ga: int = 1):
    """Loss, gradients (a copy per parameter), the metrics this micro-batch logged, and each engine call's
    ``(shared, body_tokens)``. ``engine=False``: TRL's head scores the policy and the reference (the path before)."""
    trainer.engine.share_prompts = share
    trainer.current_gradient_accumulation_steps = ga
    trainer.model.zero_grad()
    calls = []
    forward = trainer.engine.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append((out.shared, out.body_tokens))
        return out

    def trl_head(model, input_ids, attention_mask, keep, *, entropy_grad, entropy_statistic):
        return _trl_head_logps(trainer, model, input_ids, attention_mask, keep)

    if not engine:
        inputs = {**inputs, "ref_per_token_logps": _trl_reference_logps(trainer, inputs)}
    metrics = trainer._metrics["train"]
    logged = {name: len(values) for name, values in metrics.items()}
    trainer.engine.forward = spy
    if not engine:
        trainer._engine_logps = trl_head
    try:
        loss = trainer._compute_loss(trainer.model, dict(inputs))
    finally:
        trainer.engine.forward = forward
        trainer.__dict__.pop("_engine_logps", None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    new = {name: values[logged.get(name, 0):] for name, values in metrics.items() if len(values) > logged.get(name, 0)}
    return loss.detach(), grads, calls, new


def _assert_same(got, expected):
    loss, grads, _, metrics = got
    loss_0, grads_0, _, metrics_0 = expected
    assert abs(loss.item() - loss_0.item()) <= REL * max(abs(loss_0.item()), 1e-6), (loss.item(), loss_0.item())
    assert grads.keys() == grads_0.keys() and grads
    diff = sum(float(((grads[n] - grads_0[n]).double() ** 2).sum()) for n in grads) ** 0.5
    norm = sum(float((g.double() ** 2).sum()) for g in grads_0.values()) ** 0.5
    assert norm > 0 and diff <= REL * norm, f"gradient differs by {diff / norm:.3g} of its norm"
    assert metrics.keys() == metrics_0.keys() and {"entropy", "policy_loss", "rewards/chosen"} <= metrics.keys()
    for name, values in metrics.items():
        for a, b in zip(values, metrics_0[name], strict=True):
            assert abs(a - b) <= REL * max(abs(b), 1.0), (name, a, b)  # differences of O(1) values: absolute floor


def _expected_shared_tokens(inputs) -> int:
    """Real tokens of the rows with each prompt computed once for the completions that share it."""
    from posttrain.families.rl.common import prompt_groups
    from posttrain.families.online.trainer import _by_row

    prompt_mask = _by_row(inputs["prompt_mask"])
    groups = prompt_groups(_by_row(inputs["prompt_ids"]), prompt_mask)
    prompts = {g: int(prompt_mask[g].sum()) for g in groups}
    return sum(prompts.values()) + int(inputs["completion_mask"].sum())


def _check_all_paths(trainer, inputs):
    before = _run(trainer, inputs, engine=False)
    assert before[2] == []  # the TRL-head path never calls the engine
    shared = _run(trainer, inputs, engine=True)
    unshared = _run(trainer, inputs, engine=True, share=False)
    total = int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
    # the prompt once per pair (no copy per completion); unshared, every row whole
    assert shared[2] == [(True, _expected_shared_tokens(inputs))] and shared[2][0][1] < total
    assert unshared[2] == [(False, total)]
    _assert_same(shared, before)
    _assert_same(unshared, before)


def _check_reference_logps(trainer, inputs):
    """The reference's log-probs computed at generation (the engine, shared, temperature 1): equal per token to TRL's
    head at temperature 1, and unlike the sampling temperature's."""
    mask = inputs["completion_mask"].bool()
    expected = _trl_reference_logps(trainer, inputs)
    torch.testing.assert_close(inputs["ref_per_token_logps"][mask], expected[mask], rtol=REL, atol=REL)
    from posttrain.logprobs.engine import LogProbEngine

    ids, att, keep = _rows_of(inputs)
    completion = torch.zeros_like(att)
    completion[:, -keep:] = att[:, -keep:]
    with torch.no_grad(), _reference(trainer) as ref:
        hot = LogProbEngine(temperature=SAMPLING_TEMPERATURE).forward(ref, ids, att, completion).logps[:, -keep:]
    assert (hot.view(expected.shape)[mask] - expected[mask]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_engine_equals_the_trl_head_path(tiny_model_dir, arith_model_dir, tmp_path, case):
    method, params = case
    trainer, inputs = _trainer(tiny_model_dir, arith_model_dir, tmp_path, method=method, **params)
    assert trainer.engine.temperature == 1.0 and trainer.temperature == SAMPLING_TEMPERATURE
    _check_reference_logps(trainer, inputs)
    _check_all_paths(trainer, inputs)


def test_ties_trained_and_a_missing_eos_penalty(tiny_model_dir, arith_model_dir, tmp_path):
    trainer, inputs = _trainer(tiny_model_dir, arith_model_dir, tmp_path, ties="first", missing_eos_penalty=0.5)
    assert inputs["pair_keep"].all()
    _check_all_paths(trainer, inputs)


def test_conversational_prompts_through_the_chat_template(tiny_model_dir, arith_model_dir, tmp_path):
    trainer, inputs = _trainer(tiny_model_dir, arith_model_dir, tmp_path, chat=True)
    prompt = trainer.processing_class.decode(inputs["prompt_ids"][0, 0][inputs["prompt_mask"][0, 0].bool()])
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n"), prompt
    _check_reference_logps(trainer, inputs)
    _check_all_paths(trainer, inputs)


def test_lora_with_the_adapter_disabled_reference(tiny_model_dir, tmp_path):
    trainer, inputs = _trainer(tiny_model_dir, None, tmp_path, peft=True)
    assert trainer.ref_model is None
    _check_reference_logps(trainer, inputs)
    before = _run(trainer, inputs, engine=False)
    assert before[1] and all("lora" in n for n in before[1])
    _check_all_paths(trainer, inputs)


def test_gradient_accumulation_over_shuffled_pairs(tiny_model_dir, arith_model_dir, tmp_path):
    """Two micro-batches of pairs shuffled as TRL shuffles a generation batch: summed losses, gradients and the
    metrics of each equal the TRL-head path's."""
    from posttrain.families.online.trainer import NUM_PAIRS

    trainer, inputs = _trainer(tiny_model_dir, arith_model_dir, tmp_path,
                               config=dict(gradient_accumulation_steps=2, per_device_train_batch_size=PROMPTS))
    pairs = inputs["completion_ids"].size(0)
    order = torch.randperm(pairs, generator=torch.Generator().manual_seed(0))
    halves = [{k: v[order[part]] if k != NUM_PAIRS else v for k, v in inputs.items()}
              for part in (slice(0, pairs // 2), slice(pairs // 2, pairs))]

    def accumulated(**kw):
        losses, grads, metrics = [], {}, {}
        for half in halves:
            loss, g, _, m = _run(trainer, half, ga=2, **kw)
            losses.append(loss)
            grads = {k: grads.get(k, 0) + v for k, v in g.items()}
            metrics = {k: metrics.get(k, []) + v for k, v in m.items()}
        return sum(losses), grads, None, metrics

    before = accumulated(engine=False)
    _assert_same(accumulated(engine=True), before)
    _assert_same(accumulated(engine=True, share=False), before)


def test_recipe_keys_reach_the_trainer(tmp_path):
    from posttrain.recipe.training_args import check_training

    assert check_training({"logprob_head": "chunked", "share_prompts": False}, "online") == {
        "logprob_head": "chunked", "share_prompts": False}


def test_share_prompts_false_runs_every_row_whole(tiny_model_dir, arith_model_dir, tmp_path):
    trainer, inputs = _trainer(tiny_model_dir, arith_model_dir, tmp_path, config=dict(share_prompts=False,
                                                                                      logprob_head="chunked"))
    assert not trainer.engine.share_prompts and trainer.engine.head == "chunked"
    assert _run(trainer, inputs, engine=True, share=False)[2][0][0] is False


def test_liger_on_cpu_is_refused_before_the_model_loads(liger_refused_before_load):
    liger_refused_before_load({"model": "builtin:tiny-qwen2", "method": {"name": "online_dpo"},
                               "data": {"train": "builtin:arithmetic-rl"},
                               "training": {"max_steps": 1, "per_device_train_batch_size": 4}})