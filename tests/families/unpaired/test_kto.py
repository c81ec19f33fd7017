"""KTO (docs/methods/kto.md): the pure loss against hand-computed values, the trainer against stock TRL's KTOTrainer on
the same batch (loss, metrics, gradients; bf16 off), paired and conversational data, and bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from posttrain.errors import UserError
from posttrain.losses.preference import kto_loss, kto_reference_point, rotate_within_batches

BATCH = 8


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------------------------------
# the math


def test_worked_example_loss_and_reference_point():
    """beta 0.1, z0 0.2, lambda_D 1, lambda_U 1.5; r = [1.0, -2.0, 0.5], desirable [T, F, T]:
    desirable rows 1 - sigma(0.1 (r - 0.2)), the undesirable one 1.5 (1 - sigma(0.1 (0.2 - r)))."""
    r = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    out = kto_loss(r, torch.tensor([True, False, True]), torch.tensor(0.2), beta=0.1, desirable_weight=1.0,
                   undesirable_weight=1.5)
    want = [1 - _sig(0.08), 1.5 * (1 - _sig(0.22)), 1 - _sig(0.03)]
    assert torch.allclose(out.losses, torch.tensor(want), atol=1e-6)
    assert torch.allclose(out.losses, torch.tensor([0.480011, 0.667831, 0.492501]), atol=1e-6)
    assert torch.allclose(out.chosen_rewards, torch.tensor([0.1, 0.05])) and torch.allclose(
        out.rejected_rewards, torch.tensor([-0.2]))
    out.losses.mean().backward()
    # d/dr of lambda (1 - sigma(beta (r - z0))) = -lambda beta s (1 - s); undesirable: +lambda beta s (1 - s)
    s1, s2, s3 = _sig(0.08), _sig(0.22), _sig(0.03)
    grad = [-0.1 * s1 * (1 - s1) / 3, 1.5 * 0.1 * s2 * (1 - s2) / 3, -0.1 * s3 * (1 - s3) / 3]
    assert torch.allclose(r.grad, torch.tensor(grad), atol=1e-7)
    # the reference point: mean KL log-ratio of the mismatched pairs, clamped at 0, no gradient
    kl = torch.tensor([0.3, -0.1, 0.4], requires_grad=True)
    z0 = kto_reference_point(kl)
    assert z0.item() == pytest.approx(0.2, abs=1e-7) and not z0.requires_grad
    assert kto_reference_point(torch.tensor([-0.3, 0.1])).item() == 0.0


def test_reference_point_shifts_both_sides_and_weights_scale():
    r, labels = torch.tensor([0.4, 0.4]), torch.tensor([True, False])
    base = kto_loss(r, labels, 0.0, beta=1.0).losses
    shifted = kto_loss(r + 0.3, labels, 0.3, beta=1.0).losses  # only r - z0 matters
    assert torch.allclose(base, shifted, atol=1e-6)
    assert torch.allclose(base, torch.tensor([1 - _sig(0.4), 1 - _sig(-0.4)]), atol=1e-6)
    heavy = kto_loss(r, labels, 0.0, beta=1.0, desirable_weight=2.0, undesirable_weight=0.5).losses
    assert torch.allclose(heavy, base * torch.tensor([2.0, 0.5]))
    with pytest.raises(ValueError, match="beta"):
        kto_loss(r, labels, 0.0, beta=0.0)


def test_mismatched_completions_rotate_within_each_micro_batch():
    assert rotate_within_batches([1, 2, 3, 4, 5, 6, 7], 3) == [3, 1, 2, 6, 4, 5, 7]
    assert rotate_within_batches(["a", "b"], 2) == ["b", "a"]
    with pytest.raises(ValueError):
        rotate_within_batches([1], 0)


def test_mismatched_completions_never_come_from_the_same_prompt():
    """With keys (the prompt ids) each block takes the smallest shift that gives no row its own prompt's completion:
    the side-by-side rows of unpaired pairs need a shift of 2; a block of one prompt keeps the shift of 1."""
    assert rotate_within_batches(list("abcd"), 4, [0, 0, 1, 1]) == list("cdab")
    assert rotate_within_batches(list("abcdef"), 6, [0, 0, 1, 1, 2, 2]) == list("efabcd")
    # block 1: distinct keys, TRL's shift of 1; block 2: keys [5, 6, 5]: shift 1 gives row 0 row 2's value (key 5),
    # shift 2 gives row 2 row 0's value (key 5): no shift works, the shift of 1 is kept
    assert rotate_within_batches([1, 2, 3, 4, 5, 6], 3, [7, 8, 9, 5, 6, 5]) == [3, 1, 2, 6, 4, 5]
    # keys [0, 1, 1, 2]: shift 1 gives row 2 row 1's value (key 1); shift 2 works
    assert rotate_within_batches(list("abcd"), 4, [0, 1, 1, 2]) == list("cdab")
    assert rotate_within_batches(["a", "b"], 2, [0, 0]) == ["b", "a"]
    with pytest.raises(ValueError, match="keys"):
        rotate_within_batches([1, 2], 2, [0])


# ----------------------------------------------------------------------------------------------------------------------
# the trainer against stock TRL


def _unpaired(n=16, seed=0):
    """Unpaired arithmetic rows in a fixed, mixed order (what both trainers read sequentially)."""
    import random

    from posttrain.data.arithmetic import arithmetic_rows

    rows = []
    for r in arithmetic_rows("preference", num_samples=n, max_operand=30):
        rows += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                 {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    random.Random(seed).shuffle(rows)
    return rows


def _config(tmp_path, **kw):
    from trl import KTOConfig

    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                per_device_train_batch_size=BATCH, max_length=64, seed=0, learning_rate=1e-3)
    return KTOConfig(**{**base, **kw})


def _pair(policy_dir, ref_dir, tmp_path, params, rows=None):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOTrainer

    from posttrain.families.unpaired.trainer import PosttrainKTOTrainer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    ds = Dataset.from_list(rows or _unpaired())
    kw = dict(beta=params.beta, desirable_weight=params.desirable_weight, undesirable_weight=params.undesirable_weight)
    stock = KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=ds,
                       processing_class=tok, args=_config(tmp_path / "stock", **kw))
    ours = PosttrainKTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=ds,
                               processing_class=tok, args=_config(tmp_path / "ours", **kw), params=params)
    stock.model.train()
    ours.model.train()
    return stock, ours


METRICS = ("kl", "entropy", "logits/chosen", "logits/rejected", "rewards/chosen", "rewards/rejected", "logps/chosen",
           "logps/rejected", "rewards/margins")


@pytest.mark.parametrize("params", [dict(beta=0.1), dict(beta=0.5, desirable_weight=1.33, undesirable_weight=0.8)],
                         ids=["default", "weighted"])
def test_loss_metrics_and_grads_match_stock_trl(arith_model_dir, tiny_model_dir, tmp_path, params):
    """Same policy, reference and unpaired rows: the prepared columns (KL completions included), and on one collated
    batch the loss, TRL's metrics and every gradient agree with stock ``trl.KTOTrainer`` (bf16 off)."""
    from posttrain.methods import KTOParams

    p = KTOParams(**params)
    stock, ours = _pair(arith_model_dir, tiny_model_dir, tmp_path, p)
    for column in ("prompt_ids", "completion_ids", "KL_completion_ids", "label"):
        assert stock.train_dataset[column] == ours.train_dataset[column], column
    batch = next(iter(stock.get_train_dataloader()))
    assert 0 < int(batch["label"].sum()) < BATCH  # both kinds of rows in the batch
    l_stock = stock.compute_loss(stock.model, dict(batch))
    l_ours = ours.compute_loss(ours.model, dict(batch))
    assert stock._metrics["train"]["kl"][-1] > 0  # a reference that differs from the policy: z0 is not clamped to 0
    torch.testing.assert_close(l_ours, l_stock, atol=1e-6, rtol=1e-5)
    for name in METRICS:
        a, b = ours._metrics["train"][name][-1], stock._metrics["train"][name][-1]
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (name, a, b)
    stock.model.zero_grad()
    ours.model.zero_grad()
    l_stock.backward()
    l_ours.backward()
    for (name, a), b in zip(stock.model.named_parameters(), ours.model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_precomputed_reference_equals_live_reference(arith_model_dir, tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.methods import KTOParams
    from posttrain.families.unpaired.trainer import PosttrainKTOTrainer

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    ds = Dataset.from_list(_unpaired())
    losses = []
    for precompute in (False, True):
        p = KTOParams(precompute_ref_log_probs=precompute)
        trainer = PosttrainKTOTrainer(
            model=AutoModelForCausalLM.from_pretrained(arith_model_dir),
            ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), train_dataset=ds, processing_class=tok,
            args=_config(tmp_path / str(precompute), precompute_ref_log_probs=precompute), params=p)
        assert (trainer.ref_model is None) == precompute  # precomputed: no reference kept in memory
        trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        losses.append(trainer.compute_loss(trainer.model, dict(batch)).item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# data


def test_paired_rows_are_shuffled_by_pair_and_unpaired_side_by_side():
    """Pairs shuffled once with the seed, then each pair's desirable row right before its undesirable one: every
    even-sized micro-batch holds whole pairs, half desirable (docs/methods/kto.md#data)."""
    from datasets import Dataset

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.families.unpaired.trainer import unpair

    pairs = arithmetic_rows("preference", num_samples=40, max_operand=30)
    rows = unpair(Dataset.from_list(pairs), seed=0)
    assert len(rows) == 80 and sum(rows["label"]) == 40
    want = {(p["prompt"], p["chosen"], True) for p in pairs} | {(p["prompt"], p["rejected"], False) for p in pairs}
    assert {(r["prompt"], r["completion"], r["label"]) for r in rows} == want
    assert rows["label"] == [True, False] * 40
    assert all(rows["prompt"][2 * k] == rows["prompt"][2 * k + 1] for k in range(40))
    assert rows["prompt"][::2] != [p["prompt"] for p in pairs]  # the pairs are shuffled ...
    assert unpair(Dataset.from_list(pairs), seed=0)["completion"] == rows["completion"]  # ... with the seed
    for start in range(0, 80, 8):
        assert sum(rows["label"][start:start + 8]) == 4


def test_paired_data_gets_mismatched_completions_of_other_prompts(arith_model_dir, tmp_path):
    """Through the trainer, paired rows unpaired side by side: each row's KL completion is the completion of another
    prompt's row of its own micro-batch (the rotation by 2), never its own pair's other completion."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.methods import KTOParams
    from posttrain.families.unpaired.trainer import PosttrainKTOTrainer

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    pairs = arithmetic_rows("preference", num_samples=12, max_operand=30)
    trainer = PosttrainKTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(arith_model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(arith_model_dir), train_dataset=Dataset.from_list(pairs),
        processing_class=tok, args=_config(tmp_path), params=KTOParams())
    ds = trainer.train_dataset
    prompts, completions, kl = ds["prompt_ids"], ds["completion_ids"], ds["KL_completion_ids"]
    assert len(ds) == 24 and ds["label"] == [True, False] * 12
    for i in range(24):
        block = range(i - i % BATCH, i - i % BATCH + BATCH)
        j = block[(i % BATCH - 2) % BATCH]
        assert kl[i] == completions[j] and prompts[j] != prompts[i], i
    batch = next(iter(trainer.get_train_dataloader()))
    assert int(batch["label"].sum()) == BATCH // 2


def test_conversational_rows_score_the_assistant_turns(arith_model_dir, tmp_path):
    """Conversational completions are tokenised by posttrain's formatting (any chat template): the completion mask
    the trainer uses is the assistant turns plus their end-of-turn token, as tokenize_prompt_completion finds them,
    and the KL sequences carry the rotated masks."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.formatting import tokenize_prompt_completion
    from posttrain.methods import KTOParams
    from posttrain.families.unpaired.trainer import KL_TURN_MASK, TURN_MASK, PosttrainKTOTrainer

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}="}],
             "completion": [{"role": "assistant", "content": str(2 * i + (i % 2))}], "label": i % 2 == 0}
            for i in range(8)]
    trainer = PosttrainKTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(arith_model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(arith_model_dir), train_dataset=Dataset.from_list(rows),
        processing_class=tok, args=_config(tmp_path, per_device_train_batch_size=4), params=KTOParams())
    ds = trainer.train_dataset
    for i, row in enumerate(rows):
        tokens = tokenize_prompt_completion(row["prompt"], row["completion"], tok)
        start = tokens.spans[0][0]
        assert ds[i]["prompt_ids"] + ds[i]["completion_ids"] == tokens.input_ids
        assert ds[i][TURN_MASK] == tokens.mask[start:]
    assert ds[KL_TURN_MASK] == rotate_within_batches(ds[TURN_MASK], 4)
    text = tok.decode(ds[0]["prompt_ids"])
    assert text.startswith("<|im_start|>user\n0+0=") and text.endswith("<|im_start|>assistant\n")
    batch = next(iter(trainer.get_train_dataloader()))
    scored = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    assert tok.decode(scored) == "0<|im_end|>"  # the answer and its end-of-turn token, not the template's newline
    trainer.model.train()
    assert torch.isfinite(trainer.compute_loss(trainer.model, dict(batch)))


def test_rows_cut_or_dropped_by_max_length_are_counted(arith_model_dir, tmp_path, caplog):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.methods import KTOParams
    from posttrain.families.unpaired.trainer import PosttrainKTOTrainer

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    rows = [{"prompt": "1+1=", "completion": "2", "label": True}, {"prompt": "9" * 40 + "+1=", "completion": "1",
                                                                    "label": False},
            {"prompt": "2+2=", "completion": "4" * 30, "label": False}, {"prompt": "3+3=", "completion": "6",
                                                                         "label": True}]
    with caplog.at_level("WARNING", logger="posttrain"):
        trainer = PosttrainKTOTrainer(
            model=AutoModelForCausalLM.from_pretrained(arith_model_dir),
            ref_model=AutoModelForCausalLM.from_pretrained(arith_model_dir), train_dataset=Dataset.from_list(rows),
            processing_class=tok, args=_config(tmp_path, max_length=20, per_device_train_batch_size=2),
            params=KTOParams())
    assert len(trainer.train_dataset) == 3
    text = caplog.text
    assert "data.train: dropped 1 of 4 rows: the prompt alone fills max_length" in text, text
    assert "data.train: 1 of 4 rows are longer than training.max_length=20" in text, text


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


def _recipe(train, **method):
    return {"model": "builtin:tiny-qwen2", "data": {"train": train}, "method": {"name": "kto", **method},
            "training": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"}}


def test_bad_unpaired_rows_name_the_row_and_column(tmp_path, capsys):
    data = tmp_path / "kto.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2", "label": "yes"}, {"prompt": "1+2=", "completion": "4", "label": "no"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = _cli(tmp_path, capsys, _recipe(str(data)))
    assert f"{data}:1 (row 0): column 'label' must be true (desirable) or false (undesirable), got a string 'yes'" \
        in line, line
    data.write_text("".join(json.dumps({**r, "label": 1}) + "\n" for r in rows))
    assert "got a number 1" in _cli(tmp_path, capsys, _recipe(str(data)))
    data.write_text("".join(json.dumps({**r, "label": True}) + "\n" for r in rows[:1]) + json.dumps(
        {**rows[1], "label": "no"}) + "\n")  # a row of another type is named too
    assert f"{data}:2 (row 1): column 'label' is a string" in _cli(tmp_path, capsys, _recipe(str(data)))
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"], "labl": True}) + "\n"
                            for r in rows))
    line = _cli(tmp_path, capsys, _recipe(str(data)))
    assert "data.train" in line and "missing column 'label'" in line and "did you mean 'labl'" in line, line
    data.write_text("".join(json.dumps({**r, "completion": [1, 2]}) + "\n" for r in rows))
    line = _cli(tmp_path, capsys, _recipe(str(data)))
    assert f"{data}:1 (row 0): column 'completion' must be text" in line, line


def test_keys_of_other_methods_and_method_owned_training_keys(tmp_path, capsys):
    line = _cli(tmp_path, capsys, _recipe("builtin:arithmetic-pref", gamma_beta_ratio=0.5))
    assert line == "error: method.gamma_beta_ratio: not a key of method 'kto'; only used by method simpo", line
    line = _cli(tmp_path, capsys, {**_recipe("builtin:arithmetic-pref"), "training": {"desirable_weight": 2.0}})
    assert "training.desirable_weight: set by the method; use method.desirable_weight" in line, line
    line = _cli(tmp_path, capsys, {**_recipe("builtin:arithmetic-pref"),
                                   "training": {"per_device_train_batch_size": 1}})
    assert "training.per_device_train_batch_size: KTO's KL estimate needs at least 2 rows" in line, line
    line = _cli(tmp_path, capsys, _recipe("builtin:arithmetic-pref", undesirable_weight=0))
    assert line.startswith("error: method.undesirable_weight: Input should be greater than 0"), line
    line = _cli(tmp_path, capsys, {**_recipe("builtin:arithmetic-pref"), "ref_model": "none"})
    assert "ref_model" in line and "kto" in line and "needs a reference model" in line, line
    with pytest.raises(UserError, match=r"^method\.desirable_weight: not a key of method 'dpo'; only used by method kto"):
        from posttrain.recipe import parse_recipe

        parse_recipe({**_recipe("builtin:arithmetic-pref"), "method": {"name": "dpo", "desirable_weight": 1.0}})
