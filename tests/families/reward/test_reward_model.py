"""Reward-model training (method.name: reward; docs/methods/reward.md): the Bradley-Terry loss by hand, the trainer
against stock TRL's RewardTrainer on the same batch (loss, metrics, gradients; bf16 off), the text a reward model is
trained on equals the text GRPO scores, a trained model used by a GRPO recipe end to end (full and LoRA), bad input,
and the learning check (pairwise accuracy above chance on the built-in preference task)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from posttrain.losses.reward import bradley_terry_loss, pairwise_accuracy

BATCH = 8


def test_worked_example_loss():
    """s_c = [1.0, 0.2], s_r = [0.0, 0.5], margins [0.5, 0.0], centering 0.01:
    losses = [-logsig(0.5), -logsig(-0.3)] = [0.474077, 0.854355]; L = 0.664216 + 0.01 * (1 + 0.49) / 2."""
    c = torch.tensor([1.0, 0.2], requires_grad=True)
    r = torch.tensor([0.0, 0.5])
    out = bradley_terry_loss(c, r, torch.tensor([0.5, 0.0]), center_coef=0.01)
    assert torch.allclose(out.losses, torch.tensor([0.474077, 0.854355]), atol=1e-6)
    assert out.loss.item() == pytest.approx(0.671666, abs=1e-6) and out.center.item() == pytest.approx(0.745)
    out.loss.backward()
    # dL/ds_c = -sigma(-(d - m)) / B + coef * 2 (s_c + s_r) / B
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [-sig(-0.5) / 2 + 0.01 * 2 * 1.0 / 2, -sig(0.3) / 2 + 0.01 * 2 * 0.7 / 2]
    assert torch.allclose(c.grad, torch.tensor(want), atol=1e-6)
    plain = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]))
    assert plain.loss.item() == pytest.approx(math.log(2))
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, 2.0, 1.0])) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------------------------------
# the trainer against stock TRL


def _pairs(n=16, margin=False):
    from posttrain.data.arithmetic import arithmetic_rows

    rows = arithmetic_rows("preference", num_samples=n, max_operand=30)
    if margin:
        rows = [{**r, "margin": 0.25 * (i % 4)} for i, r in enumerate(rows)]
    return rows


def _config(tmp_path, **kw):
    from trl import RewardConfig

    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                per_device_train_batch_size=BATCH, max_length=64, seed=0)
    return RewardConfig(**{**base, **kw})


def _seq_cls(model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)


@pytest.mark.parametrize("margin,center", [(False, 0.0), (True, 0.01)], ids=["plain", "margin-centered"])
def test_loss_metrics_and_grads_match_stock_trl(arith_model_dir, tmp_path, margin, center):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardTrainer

    from posttrain.methods import RewardParams
    from posttrain.families.reward.trainer import PosttrainRewardTrainer

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    model = _seq_cls(arith_model_dir)
    ds = Dataset.from_list(_pairs(margin=margin))
    stock = RewardTrainer(model=copy.deepcopy(model), train_dataset=ds, processing_class=tok,
                          args=_config(tmp_path / "stock", center_rewards_coefficient=center or None))
    ours = PosttrainRewardTrainer(model=copy.deepcopy(model), train_dataset=ds, processing_class=tok,
                                  args=_config(tmp_path / "ours"),
                                  params=RewardParams(margin=margin, center_rewards_coef=center))
    batch = next(iter(ours.get_train_dataloader()))
    assert ("margin" in batch) == margin
    stock.model.train()
    ours.model.train()
    l_stock = stock.compute_loss(stock.model, dict(batch))
    l_ours = ours.compute_loss(ours.model, dict(batch))
    torch.testing.assert_close(l_ours, l_stock, atol=1e-6, rtol=1e-5)
    for name in ("min_reward", "mean_reward", "max_reward", "accuracy", "margin"):
        a, b = ours._metrics["train"][name][-1], stock._metrics["train"][name][-1]
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (name, a, b)
    stock.model.zero_grad()
    ours.model.zero_grad()
    l_stock.backward()
    l_ours.backward()
    for (name, a), b in zip(stock.model.named_parameters(), ours.model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_training_text_equals_what_grpo_scores(arith_model_dir, tmp_path):
    """The sequences a reward model is trained on are the ones TRL's GRPOTrainer feeds it for prompt + completion
    (plain text, and conversations through the chat template): the scores of our scorer equal GRPO's rewards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from datasets import Dataset

    from posttrain.families.reward.trainer import pairwise_scores

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    rm = _seq_cls(arith_model_dir).eval()
    rm.config.pad_token_id = tok.pad_token_id
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(arith_model_dir), reward_funcs=[rm],
                          reward_processing_classes=[tok],
                          args=GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                                          per_device_train_batch_size=4, num_generations=2),
                          train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 4), processing_class=tok)
    plain = [("12+7=", "19"), ("3+25=", "28 or so"), ("30+30=", "5")]
    chat = [([{"role": "user", "content": p}], [{"role": "assistant", "content": c}]) for p, c in plain]
    for cases in (plain, chat):
        prompts, completions = [p for p, _ in cases], [c for _, c in cases]
        grpo = trainer._calculate_rewards([{"prompt": p} for p in prompts], prompts, completions, [[0]] * 3)
        ours, _ = pairwise_scores(rm, tok, [{"prompt": p, "chosen": c, "rejected": c} for p, c in cases])
        torch.testing.assert_close(grpo[:, 0].cpu(), ours, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# end to end


def _run(tmp_path, name, **overrides):
    from posttrain.recipe import load_recipe
    from posttrain.train import run

    sets = [f"output_dir={tmp_path / name}", "training.disable_tqdm=true", "report=false",
            "training.save_strategy='no'", "data.eval=null"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return run(load_recipe("recipes/reward.yaml" if name.startswith("rm") else "recipes/grpo.yaml", sets), quiet=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_trained_reward_model_is_used_by_a_grpo_recipe(tmp_path, lora, monkeypatch):
    """`method.name: reward` saves a model (LoRA: an adapter of task SEQ_CLS with the score head) that a GRPO recipe
    loads with `method.rewards: [{model: DIR}]` (a LoRA run merged on load) and trains with, logging the reward
    model's scores (that GRPO feeds it the text it was trained on: test_training_text_equals_what_grpo_scores)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from posttrain.rl.rewards import load_rewards
    from posttrain.methods import RewardSpec

    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    extra = {"peft": "{r: 8, lora_alpha: 16}"} if lora else {}
    summary = _run(tmp_path, "rm", **{"training.max_steps": 3, "data.train.max_samples": 64,
                                       "data.test.max_samples": 16}, **extra)
    assert summary["test_metric"] == "pairwise accuracy" and summary["steps"] == 3
    rm_dir = tmp_path / "rm"
    assert (rm_dir / ("adapter_config.json" if lora else "config.json")).is_file()
    if lora:
        assert json.loads((rm_dir / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    rewards = load_rewards([RewardSpec(model=str(rm_dir))])
    model = rewards.funcs[0]
    assert type(model).__name__.endswith("ForSequenceClassification")
    from posttrain.families.reward.trainer import pairwise_scores

    tok = AutoTokenizer.from_pretrained(rm_dir)
    scores, _ = pairwise_scores(model, tok, [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    assert torch.isfinite(scores).all()
    grpo = _run(tmp_path, "grpo", **{"training.max_steps": 2, "data.train.max_samples": 16, "data.test": "null",
                                     "training.per_device_train_batch_size": 8, "training.num_generations": 4,
                                     "training.logging_steps": 1, "method.rewards": f"[{{model: {rm_dir}}}]"})
    assert grpo["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("rewards/") and k.endswith("/mean") for k in rows[0]), rows[0]


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


def _recipe(train="builtin:arithmetic-pref", **method):
    return {"model": "builtin:tiny-qwen2", "data": {"train": train}, "method": {"name": "reward", **method},
            "training": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"}}


def test_conversational_pairs_train_and_score(tmp_path, monkeypatch):
    """Conversational pairs (messages in every column) train through the chat template and data.test reports their
    pairwise accuracy; the trained sequences are the chat-template renderings GRPO would score."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from posttrain.families.reward.trainer import scored_text, tokenize_pairs

    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in _pairs(24)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _run(tmp_path, "rm-chat", **{"data.train": f"{{source: {data}}}", "data.test": f"{{source: {data}}}",
                                           "training.max_steps": 2, "training.per_device_train_batch_size": 8})
    assert summary["test_metric"] == "pairwise accuracy" and 0.0 <= summary["accuracy_after"] <= 1.0, summary
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm-chat")
    text = scored_text(rows[0]["prompt"], rows[0]["chosen"], tok)
    assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text, text
    assert tokenize_pairs(rows[:1], tok)["chosen_ids"][0] == tok(text, add_special_tokens=False)["input_ids"]


def test_bad_input_is_one_line(tmp_path, capsys):
    line = _cli(tmp_path, capsys, _recipe(margin=True))
    assert line.startswith("error: data.train: method.margin: true reads a 'margin' column"), line
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({**r, "margin": "big"}) + "\n" for r in _pairs(4)))
    line = _cli(tmp_path, capsys, _recipe(str(data), margin=True))
    assert line == "error: data.train: row 0: column 'margin' must be a finite number, got 'big'", line
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n" for r in _pairs(4)))
    line = _cli(tmp_path, capsys, _recipe(str(data)))
    assert "data.train" in line and "missing column 'rejected'" in line, line
    line = _cli(tmp_path, capsys, _recipe(beta=0.1))
    assert line.startswith("error: method.beta: not a key of method 'reward'; only used by method"), line
    line = _cli(tmp_path, capsys, {**_recipe(), "training": {"center_rewards_coefficient": 0.1}})
    assert "training.center_rewards_coefficient: set by the method; use method.center_rewards_coef" in line, line
    recipe = _recipe()
    recipe["data"]["test"] = "builtin:arithmetic-pref"
    recipe["eval"] = {"steps": 2}
    line = _cli(tmp_path, capsys, recipe)
    assert line.startswith("error: eval.steps: a reward model is scored on pairs"), line
    line = _cli(tmp_path, capsys, {**_recipe(), "ref_model": "builtin:tiny-qwen2"})
    assert "ref_model: method 'reward' uses no reference model" in line, line


@pytest.mark.slow
def test_pairwise_accuracy_above_chance_on_the_builtin_preference_task(tmp_path, monkeypatch):
    """recipes/reward.yaml as shipped (100 steps from tiny-qwen2-arith, learning rate 1e-3) on a fixed pool of 64
    arithmetic pairs that is also data.test (as the RL learning checks train and measure on one fixed pool): the
    pairwise accuracy goes from chance to above 90% (measured 45.3% -> 100%, seed 0, CPU). On unseen problems (the
    test split) the shipped recipe stays at chance (47.5% -> 50.0%): docs/methods/reward.md."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    pool = "{source: builtin:arithmetic-pref, options: {num_samples: 64, max_operand: 30}}"
    summary = _run(tmp_path, "rm-learn", **{"data.train": pool, "data.test": pool})
    assert summary["accuracy_before"] < 0.6 and summary["accuracy_after"] >= 0.9, summary
