"""Online DPO (docs/methods/online_dpo.md): pair ranking and the loss normaliser by hand, the trainer against TRL's
experimental OnlineDPOTrainer on the same generated batch (loss and gradients; bf16 off), pairs kept together through
TRL's shuffling, bad input, and the learning check (expected reward up on the built-in arithmetic task)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.losses.preference import online_dpo_loss, rank_pairs

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = 8


def test_pairs_are_ranked_by_reward_and_ties_skipped_or_first():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, float("nan"), 1.0, 0.3, 0.7])
    first, keep = rank_pairs(r)
    assert first.tolist() == [True, True, False, False, False] and keep.tolist() == [True, False, True, False, True]
    first, keep = rank_pairs(r, "first")  # TRL: first >= second wins, ties trained on
    assert first.tolist() == [True, True, False, False, False] and keep.tolist() == [True, True, True, False, True]
    with pytest.raises(ValueError, match="ties"):
        rank_pairs(r, "random")


def test_loss_is_the_mean_over_kept_pairs_of_the_global_batch():
    losses = torch.tensor([0.5, 0.9, 0.7, 0.1], requires_grad=True)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert online_dpo_loss(losses, keep, 3).item() == pytest.approx((0.5 + 0.7 + 0.1) / 3)
    # two processes, 6 kept pairs in all, this one holds 3 of them: its share times 2 (DDP averages the gradients)
    assert online_dpo_loss(losses, keep, 6, num_processes=2).item() == pytest.approx(2 * 1.3 / 6)
    every = online_dpo_loss(losses, torch.ones(4), 4)
    assert every.item() == pytest.approx(losses.mean().item())  # TRL's losses.mean()
    none = online_dpo_loss(losses, torch.zeros(4), 0)
    none.backward()
    assert none.item() == 0.0 and losses.grad.abs().sum() == 0


# ----------------------------------------------------------------------------------------------------------------------
# against TRL's OnlineDPOTrainer


def _rows(n=PROMPTS, seed=0):
    from posttrain.data.arithmetic import arithmetic_rows

    return arithmetic_rows("rl", num_samples=n, max_operand=30, seed=seed)


def _ours(policy, ref, tok, tmp_path, params, rows=None, **config):
    from datasets import Dataset
    from trl import GRPOConfig

    from posttrain.rl.rewards import make_exact_match
    from posttrain.families.online.trainer import PosttrainOnlineDPOTrainer

    cfg = dict(output_dir=str(tmp_path / "ours"), report_to="none", use_cpu=True, bf16=False,
               per_device_train_batch_size=2 * PROMPTS, num_generations=2, max_completion_length=6, beta=params.beta,
               max_steps=1, temperature=0.7, disable_tqdm=True)
    cfg.update(config)
    trainer = PosttrainOnlineDPOTrainer(model=policy, ref_model=ref, reward_funcs=[make_exact_match()],
                                        args=GRPOConfig(**cfg), train_dataset=Dataset.from_list(rows or _rows(32)),
                                        processing_class=tok, params=params)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.parametrize("params", [dict(loss="sigmoid", beta=0.1, ties="first"),
                                    dict(loss="ipo", beta=0.5, ties="first", missing_eos_penalty=0.5)],
                         ids=["sigmoid", "ipo-eos-penalty"])
def test_loss_and_grads_match_trl_online_dpo_on_the_same_generated_batch(arith_model_dir, tiny_model_dir, tmp_path,
                                                                         params):
    """Ours samples the pairs (temperature 0.7) and scores them; TRL's OnlineDPOTrainer gets the same prompts,
    completions and rewards (its generation and reward call replaced by ours) and computes its loss and gradients:
    they agree (the DPO log-probs are the model's own, temperature 1, in both; ties train with the first completion
    as chosen: ``ties: first``)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from posttrain.methods import OnlineDPOParams

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(arith_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    p = OnlineDPOParams(**params)
    torch.manual_seed(0)
    ours = _ours(copy.deepcopy(policy), copy.deepcopy(ref), tok, tmp_path, p)
    rows = [r for r in _rows() for _ in range(2)]
    batch = ours._generate_and_score_completions(rows)
    rewards = ours._metrics["train"]["reward"][-1]
    assert batch["completion_ids"].shape[:2] == (PROMPTS, 2)

    # the same batch in TRL's layout: [first completions of every prompt; second completions]
    def trl_layout(key):
        t = batch[key]
        return torch.cat([t[:, 0], t[:, 1]])

    recorded = (trl_layout("prompt_ids"), trl_layout("prompt_mask"), trl_layout("completion_ids"),
                trl_layout("completion_mask"), None)
    from posttrain.rl.rewards import answers_match

    answers = [r["answer"] for r in _rows()] * 2
    texts = tok.batch_decode(recorded[2], skip_special_tokens=True)
    trl_rewards = [float(answers_match(c, a)) for c, a in zip(texts, answers)]

    def reward(prompts, completions, **kwargs):
        return trl_rewards

    stock = OnlineDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), reward_funcs=[reward],
                             args=OnlineDPOConfig(output_dir=str(tmp_path / "stock"), report_to="none", use_cpu=True,
                                                  bf16=False, per_device_train_batch_size=PROMPTS, beta=p.beta,
                                                  loss_type=p.loss, missing_eos_penalty=p.missing_eos_penalty,
                                                  max_length=512),
                             train_dataset=Dataset.from_list(_rows(32)), processing_class=tok)
    stock._generate = lambda model, prompts, images=None: recorded
    stock.model.zero_grad()
    l_stock = stock.training_step(stock.model, {"prompt": [r["prompt"] for r in _rows()],
                                                "answer": [r["answer"] for r in _rows()]})
    ours.model.zero_grad()
    l_ours = ours._compute_loss(ours.model, batch)
    l_ours.backward()
    assert abs(sum(trl_rewards) / len(trl_rewards) - rewards) < 1e-6  # both saw the same rewards
    assert abs(l_stock.item() - 0.6931) > 1e-3 or p.loss == "ipo"  # a reference unlike the policy: non-trivial
    torch.testing.assert_close(l_ours.detach(), l_stock, atol=1e-5, rtol=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        a, b = ours._metrics["train"][name][-1], stock.stats[name][-1]
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (name, a, b)
    for (name, a), b in zip(stock.model.named_parameters(), ours.model.parameters(), strict=True):
        # the log-prob engine (completion rows, shared prompts) vs TRL's full log-softmax: fp32 sums in another order,
        # relative to the gradient's scale (IPO's squared loss on summed log-probs gives gradients of order 5)
        scale = max(1.0, a.grad.abs().max().item())
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_the_two_completions_of_a_prompt_stay_in_one_micro_batch(arith_model_dir, tmp_path):
    """With gradient accumulation TRL shuffles the generation batch and splits it into micro-batches; the batch is
    grouped by pair, so every micro-batch holds whole pairs and the kept-pair count spans the whole batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.methods import OnlineDPOParams
    from posttrain.families.online.trainer import NUM_PAIRS, PAIR_KEEP

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(arith_model_dir)
    trainer = _ours(policy, copy.deepcopy(policy), tok, tmp_path, OnlineDPOParams(ties="first"),
                    per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert trainer.args.steps_per_generation == 2
    loader = iter(trainer.get_train_dataloader())
    first = trainer._prepare_inputs(next(loader))
    second = trainer._buffered_inputs[1]
    for micro in (first, second):
        assert micro["completion_ids"].shape[:2] == (2, 2)  # 2 pairs of 2 completions
        assert torch.equal(micro["prompt_ids"][:, 0], micro["prompt_ids"][:, 1])  # each pair: one prompt
        assert micro[NUM_PAIRS].item() == 4.0 and micro[PAIR_KEEP].sum().item() == 2.0


def test_conversational_prompts_are_sampled_through_the_chat_template(arith_model_dir, tmp_path):
    """Chat prompts (lists of messages): TRL renders them with the model's chat template for sampling, the pairs are
    ranked and the DPO loss over them is finite and has a gradient."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.methods import OnlineDPOParams

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(arith_model_dir)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in _rows(32)]
    trainer = _ours(policy, copy.deepcopy(policy), tok, tmp_path, OnlineDPOParams(ties="first"), rows=rows)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    prompt = tok.decode(batch["prompt_ids"][0, 0][batch["prompt_mask"][0, 0].bool()])
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n"), prompt
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# recipes


def _cli(tmp_path, capsys, recipe):
    from posttrain.cli import main

    path = tmp_path / "recipe.yaml"
    recipe.setdefault("output_dir", str(tmp_path / "out"))
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and not any("Traceback" in line for line in err), err
    return lines[0]


def _recipe(**training):
    return {"model": "builtin:tiny-qwen2", "data": {"train": "builtin:arithmetic-rl"}, "method": {"name": "online_dpo"},
            "training": {"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no", **training}}


def test_bad_input_is_one_line(tmp_path, capsys):
    line = _cli(tmp_path, capsys, _recipe(per_device_train_batch_size=3))
    assert "training.per_device_train_batch_size: online DPO trains on pairs" in line, line
    line = _cli(tmp_path, capsys, _recipe(num_generations=4))
    assert "training.num_generations: set by method 'online_dpo'" in line, line
    line = _cli(tmp_path, capsys, _recipe(loss_type="dapo"))
    assert "training.loss_type: a GRPO loss option; method 'online_dpo' trains with the DPO loss" in line, line
    line = _cli(tmp_path, capsys, {**_recipe(), "method": {"name": "online_dpo", "advantage": "rloo"}})
    assert line == "error: method.advantage: not a key of method 'online_dpo'; only used by method grpo", line
    line = _cli(tmp_path, capsys, {**_recipe(), "method": {"name": "online_dpo", "ties": "random"}})
    assert line.startswith("error: method.ties: Input should be 'skip' or 'first'"), line
    line = _cli(tmp_path, capsys, {**_recipe(), "method": {"name": "online_dpo", "rewards": [{"name": "exact"}]}})
    assert "method.rewards[0]" in line and "unknown built-in reward 'exact'" in line, line
    recipe = _recipe()
    recipe["data"]["eval"] = "builtin:arithmetic-rl"
    line = _cli(tmp_path, capsys, recipe)
    assert "data.eval: method 'online_dpo' (online family) reads data.train and data.test" in line, line
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1="}\n{"prompt": "2+2="}\n')
    line = _cli(tmp_path, capsys, {**_recipe(), "data": {"train": str(data)}})
    assert line.startswith("error: method.rewards[0] (exact_match): needs an 'answer' column in data.train"), line
    line = _cli(tmp_path, capsys, {**_recipe(), "ref_model": "none"})
    assert "ref_model" in line and "online_dpo" in line and "needs a reference model" in line, line
    line = _cli(tmp_path, capsys, {**_recipe(), "method": {"name": "online_dpo", "rollout_func": "no_such_mod:fn"}})
    assert line.startswith("error: method.rollout_func"), line


def test_vllm_importance_sampling_correction_is_off(tmp_path, capsys):
    """The DPO loss reads no old-policy log-probs, so GRPO's vLLM importance-sampling correction (on by default in
    TRL's GRPOConfig, an extra policy forward over every rollout) is off in the built config; a recipe that turns it
    on, or sets how it would be computed, is refused with one line; one that turns it off is accepted."""
    import dataclasses

    from trl import GRPOConfig

    from posttrain.families.online.trainer import online_config
    from posttrain.methods import METHODS
    from posttrain.recipe import load_recipe

    default = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}["vllm_importance_sampling_correction"]
    assert default is True  # TRL's
    for training in ({}, {"vllm_importance_sampling_correction": False}):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({**_recipe(**training), "output_dir": str(tmp_path / "out")}))
        assert online_config(load_recipe(path), METHODS["online_dpo"]).vllm_importance_sampling_correction is False
    line = _cli(tmp_path, capsys, _recipe(vllm_importance_sampling_correction=True))
    assert line.startswith("error: training.vllm_importance_sampling_correction: a GRPO loss option (it weights "
                           "GRPO's policy gradient by the policy / vLLM probability ratio); method 'online_dpo' trains "
                           "with the DPO loss"), line
    line = _cli(tmp_path, capsys, _recipe(vllm_importance_sampling_mode="token_mask"))
    assert "training.vllm_importance_sampling_mode: a GRPO loss option" in line, line


@pytest.mark.slow
def test_online_dpo_raises_the_expected_reward(tmp_path):
    """recipes/online_dpo.yaml as shipped, on a fixed pool of 64 problems for 60 steps at a constant learning rate
    (GRPO's check in tests/families/rl/test_rl_trainer.py): the exact expected exact-match reward on that pool rises."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.sources import load_source
    from posttrain.eval.expected_reward import expected_exact_match
    from posttrain.models import resolve_model_path
    from posttrain.recipe import load_recipe
    from posttrain.train import run

    recipe = load_recipe(ROOT / "recipes" / "online_dpo.yaml", [
        f"output_dir={tmp_path}", "training.max_steps=60", "training.lr_scheduler_type=constant",
        "data.train.max_samples=64", "data.test=null", "training.logging_steps=10", "training.save_strategy='no'",
        "training.disable_tqdm=true", "report=false",
    ])
    pool = load_source(recipe.data.train, "data.train", "rl")

    def expected_reward(path):
        return expected_exact_match(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                    pool, temperature=recipe.training["temperature"])

    before = expected_reward(resolve_model_path(recipe.model.path))
    run(recipe, quiet=True)
    after = expected_reward(tmp_path)
    assert after > before + 0.02, (before, after)
