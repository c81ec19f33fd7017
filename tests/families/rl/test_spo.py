"""SPO math (posttrain/families/rl/spo_tracker.py; docs/methods/spo.md): the worked example, properties and the two
review fixes (rewards outside [0, 1] refused, at most n0 offline scores)."""

from __future__ import annotations

import pytest
import torch

from posttrain.families.rl.spo_tracker import (
    SPOTracker,
    forgetting_factor,
    check_reward_range,
    offline_init,
    policy_shift,
    rescale_rewards,
    sampling_weights,
    spo_advantages,
)


def _close(a, b, tol=1e-6):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          rtol=0, atol=tol), (a, b)


def _tracker():
    t = SPOTracker()
    t.init_offline({"A": [1, 1, 0, 1, 0, 0, 1, 1], "B": [0] * 8, "C": [1] * 8})  # D: no offline scores
    return t


def test_worked_offline_init_and_sampling():
    t = _tracker()
    keys = ["A", "B", "C", "D"]
    _close([t.alpha.get(k, 0.5) for k in keys], [4.888889, 0.444444, 7.555556, 0.5])
    _close([t.beta.get(k, 0.5) for k in keys], [3.111111, 7.555556, 0.444444, 0.5])
    p = t.p_hat(keys)
    _close(p, [0.611111, 0.055556, 0.944444, 0.5])
    w = sampling_weights(p)
    _close(w, [0.537498, 0.279061, 0.279061, 0.55])
    _close(w / w.sum(), [0.326623, 0.169578, 0.169578, 0.334220])


def test_worked_advantages():
    p = _tracker().p_hat(["A", "B", "C", "D"])
    adv = spo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), p)
    _close(adv, [0.630126, -1.050210, -0.630126, 1.050210])
    _close(-adv / 10, [-0.063013, 0.105021, 0.063013, -0.105021])  # dapo on-policy per-token gradient, 10 tokens
    _close(spo_advantages(torch.ones(4), p), [-0.226995, 1.286305, -1.134975, 0.075665])  # all correct: not zero


def test_worked_policy_shift_and_tracker_update():
    D = policy_shift(torch.tensor([[-0.50, -1.20, -0.30, -9.0]]), torch.tensor([[-0.52, -1.19, -0.31, 0.0]]),
                     torch.tensor([[1, 1, 1, 0]]))
    _close(D, [0.013333])
    _close(torch.pow(2.0, -D / 0.06), [0.857244])
    _close(forgetting_factor(D), [0.875])
    rho = forgetting_factor(torch.tensor([0.005, 0.03, 0.0, 0.001]))
    _close(rho, [0.943874, 0.875, 0.96, 0.96])
    t = _tracker()
    keys = ["A", "B", "C", "D"]
    t.update(keys, torch.tensor([1.0, 0.0, 1.0, 1.0]), rho)
    _close([t.alpha[k] for k in keys], [5.614497, 0.388889, 8.253333, 1.48])
    _close([t.beta[k] for k in keys], [2.936498, 7.611111, 0.426667, 0.48])
    _close(t.p_hat(keys), [0.656590, 0.048611, 0.950845, 0.755102])


def test_properties():
    # equal p_hat: the z-score of r
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    _close(spo_advantages(r, torch.full((5,), 0.3)), (r - r.mean()) / (r.std() + 1e-8))
    # offline init: alpha + beta = 8, p_hat0 = (S + 0.5) / (n + 1); own count n when fewer scores
    a, b = offline_init([1, 0, 1])
    assert a + b == pytest.approx(8.0) and a / (a + b) == pytest.approx(2.5 / 4)
    assert offline_init([]) == (0.5, 0.5)
    # rho within bounds, first visit rho_max
    rho = forgetting_factor(torch.linspace(0, 1, 50))
    assert float(rho.min()) >= 0.875 and float(rho.max()) <= 0.96 and float(forgetting_factor(torch.zeros(1))) == 0.96
    # constant rho, repeated reward: alpha + beta -> 1 / (1 - rho), p_hat -> r
    t = SPOTracker()
    for _ in range(400):
        t.update(["x"], torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64))
    assert t.alpha["x"] + t.beta["x"] == pytest.approx(10.0, rel=1e-9) and float(t.p_hat(["x"])) == pytest.approx(0.7)
    # weights: largest at 0.5, never below eps
    w = sampling_weights(torch.linspace(0, 1, 101))
    assert float(w.min()) == pytest.approx(0.05) and int(w.argmax()) == 50
    # non-finite rewards: no statistics, zero advantage, no tracker update; one row: 0
    adv = spo_advantages(torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0.5, 0.5, 0.2]))
    assert adv[1] == 0 and adv[0] > 0 > adv[2]
    assert spo_advantages(torch.tensor([1.0]), torch.tensor([0.2])).tolist() == [0.0]
    t2 = SPOTracker()
    t2.update(["y"], torch.tensor([float("nan")]), torch.tensor([0.9]))
    assert "y" not in t2.alpha


def test_tracker_state_round_trip():
    t = _tracker()
    t.update(["A", "D"], torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.96]))
    u = SPOTracker()
    u.load_state_dict(t.state_dict())
    assert u.state_dict() == t.state_dict()
    assert torch.equal(u.p_hat(["A", "B", "D", "Z"]), t.p_hat(["A", "B", "D", "Z"]))


def test_offline_init_keeps_at_most_n0_scores():
    """12 correct offline scores with n0 = 8: alpha0 = 8 * 8.5 / 9 = 7.555556 (all 12 would give 8 * 12.5 / 13 =
    7.692308); a random subsample of 8 mixed scores keeps alpha0 + beta0 = 8 and p_hat0 = (S + 0.5) / 9."""
    a, b = offline_init([1.0] * 12)
    _close([a, b], [7.555556, 0.444444])
    assert offline_init([1.0] * 12, max_scores=12)[0] == pytest.approx(7.692308, abs=1e-6)
    import random

    scores = [1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0]  # 6 of 12 correct
    a, b = offline_init(scores, rng=random.Random(5))
    kept = random.Random(5).sample(scores, 8)
    assert a + b == pytest.approx(8.0) and a / (a + b) == pytest.approx((sum(kept) + 0.5) / 9)
    assert offline_init([1, 1, 1], max_scores=0) == (0.5, 0.5)  # spo_offline_n: 0 -> Jeffreys
    t = SPOTracker()
    t.init_offline({"A": [1.0] * 12, "B": [0.0] * 3})
    _close([t.alpha["A"], t.alpha["B"]], [7.555556, 8 * 0.5 / 4])


def test_rewards_outside_the_unit_interval_are_refused():
    """r = 2 would give beta = rho * beta + (1 - r) = 0.96 * 0.5 - 1 = -0.52 < 0 (p_hat no longer a probability)."""
    t = SPOTracker()
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\], got \[2.0\]"):
        t.update(["x", "y"], torch.tensor([1.0, 2.0]), torch.tensor([0.96, 0.96]))
    assert t.alpha == {} and t.beta == {}  # nothing updated
    with pytest.raises(ValueError, match="-0.5"):
        check_reward_range(torch.tensor([-0.5, 0.3]))
    check_reward_range(torch.tensor([0.0, 0.25, 1.0, float("nan")]))  # soft successes and unscorable rows are fine
    _close(rescale_rewards(torch.tensor([-1.0, 0.0, 1.0, 3.0, float("nan")]), -1.0, 1.0)[:4], [0.0, 0.5, 1.0, 1.0])
    assert torch.isnan(rescale_rewards(torch.tensor([float("nan")]), 0.0, 2.0)).all()


# ----------------------------------------------------------------------------------------------------------------------
# SPO wired into the GRPO trainer (method.advantage: spo; posttrain/families/rl/spo_trainer.py)


def _spo_recipe(out, data=None, **method):
    from posttrain.recipe import parse_recipe

    return parse_recipe(_spo_recipe_data(out, data, **method))


def _spo_recipe_data(out, data=None, **method):
    return {
        "model": "builtin:tiny-qwen2-arith",
        "data": data or {"train": {"source": "builtin:arithmetic-rl", "options": {"num_samples": 12,
                                                                                 "max_operand": 30}}},
        "method": {"name": "grpo", "advantage": "spo", "spo_offline_n": 2, **method},
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "max_completion_length": 6,
                     "learning_rate": 1e-3, "save_steps": 3, "logging_steps": 1, "disable_tqdm": True,
                     "temperature": 1.0},
        "output_dir": str(out),
        "seed": 3,
        "report": False,
    }


def test_num_generations_one_only_with_spo(tmp_path):
    from posttrain.errors import UserError
    from posttrain.recipe import parse_recipe
    from posttrain.train import preflight

    recipe = _spo_recipe(tmp_path)
    _, config, _ = preflight(recipe, load_data=False)
    assert config.num_generations == 1 and config.num_generations_eval == 1
    base = recipe.resolved()
    for method, training, message in [
        ({"name": "grpo"}, {"num_generations": 1}, "training.num_generations: must be >= 2 for method.advantage: group"),
        ({"name": "grpo", "advantage": "spo"}, {"num_generations": 4},
         "training.num_generations: method.advantage: spo generates one completion per prompt"),
    ]:
        data = {**base, "method": method, "training": {**recipe.training, **training}}
        with pytest.raises(UserError, match=message):
            preflight(parse_recipe(data), load_data=False)
    with pytest.raises(UserError, match=r"^method\.spo_rho: only used with advantage: spo \(advantage is rloo\)"):
        parse_recipe({**base, "method": {"name": "grpo", "advantage": "rloo", "spo_rho": "constant"}})
    with pytest.raises(UserError, match=r"^method\.scale_rewards: advantage spo z-scores"):
        parse_recipe({**base, "method": {"name": "grpo", "advantage": "spo", "scale_rewards": "batch"}})
    with pytest.raises(UserError, match=r"^method\.spo_offline_scores: spo_offline_n is 0"):
        parse_recipe({**base, "method": {"name": "grpo", "advantage": "spo", "spo_offline_n": 0,
                                         "spo_offline_scores": "scores.json"}})
    with pytest.raises(UserError, match=r"^method\.spo_reward_range: expected \[low, high\] with low < high"):
        parse_recipe({**base, "method": {"name": "grpo", "advantage": "spo", "spo_reward_range": [1.0, 0.0]}})
    with pytest.raises(UserError, match=r"^method\.spo_rho_min: 0.95 is above method\.spo_rho_max"):
        parse_recipe({**base, "method": {"name": "grpo", "advantage": "spo", "spo_rho_min": 0.95, "spo_rho_max": 0.9}})


def test_prioritized_draws_follow_the_weights():
    from posttrain.families.rl.spo_trainer import draw_prompts

    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.55, 0.05, 0.05, 0.55])
    counts = torch.zeros(4)
    for _ in range(2000):
        idx = draw_prompts(weights, 1, g)
        counts[idx] += 1
    share = counts / counts.sum()
    assert abs(share[0] - 0.4583) < 0.04 and abs(share[1] - 0.0417) < 0.02  # 0.55 / 1.2, 0.05 / 1.2
    batch = draw_prompts(weights, 4, torch.Generator().manual_seed(1))
    assert sorted(batch) == [0, 1, 2, 3]  # without replacement
    assert len(draw_prompts(weights, 6, torch.Generator().manual_seed(1))) == 6  # pool smaller: with replacement


def _spo_trainer(tmp_path, reward=None, data=None, **method):
    from posttrain.train import RunContext, load_models, preflight
    from posttrain.families.rl.trainer import build_rl_trainer

    recipe = _spo_recipe(tmp_path, data, **method)
    if reward is not None:
        recipe.params.rewards[0] = reward
    info, config, datasets = preflight(recipe)
    tok, model, ref = load_models(recipe, info)
    ctx = RunContext(recipe, info, tok, model, ref, {}, [], config=config, datasets=datasets)
    trainer = build_rl_trainer(ctx)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def test_offline_pass_pending_update_and_stored_responses(tmp_path):
    """The offline pass samples n0 = 2 completions per training prompt (scores written next to the run); a generation
    batch draws 4 prompts by the tracker; its update waits for the next generation, which measures D on each
    prompt's stored response (0 on a first visit: rho = rho_max) and stores the new responses."""
    import json

    from posttrain.families.rl.spo_tracker import offline_init
    from posttrain.families.rl.spo_trainer import OFFLINE_SCORES_FILE, SPOGRPOTrainer

    trainer = _spo_trainer(tmp_path)
    assert isinstance(trainer, SPOGRPOTrainer)
    loader = iter(trainer.get_train_dataloader())
    trainer._prepare_inputs(next(loader))
    scores = json.loads((tmp_path / OFFLINE_SCORES_FILE).read_text())["scores"]
    assert len(scores) == 12 and all(len(v) == 2 for v in scores.values())
    t = trainer.spo_tracker
    for key, values in scores.items():
        assert (t.alpha[key], t.beta[key]) == pytest.approx(offline_init(values))
    pending = trainer.spo_pending
    assert len(pending["keys"]) == 4 and len(pending["rows"]) == 4 and t.visits == {}
    alpha = {k: t.alpha[k] for k in pending["keys"]}
    trainer._buffered_inputs, trainer._step = None, 0  # the next call generates again
    trainer._prepare_inputs(next(loader))
    assert sum(t.visits.values()) == 4 and set(t.visits) == set(pending["keys"])
    for key, r in zip(pending["keys"], pending["rewards"]):
        if t.visits[key] == 1:
            assert t.alpha[key] == pytest.approx(0.96 * alpha[key] + r)  # first visit: rho_max
    assert set(t.responses) == set(pending["keys"])
    ids, mask, logps = t.responses[pending["keys"][0]]
    assert len(logps) == sum(mask) > 0 and len(ids) == len(mask)
    row = trainer._metrics["train"]
    assert row["spo/rho_mean"][-1] == pytest.approx(0.96) and row["spo/D_mean"][-1] == 0.0


def test_rewards_outside_the_unit_interval_name_the_rewards(tmp_path):
    from posttrain.errors import UserError
    from posttrain.methods import RewardSpec

    from pathlib import Path

    rewards = Path(__file__).parent / "test_rl_trainer.py"
    spec = RewardSpec(function=f"{rewards}:partial_credit")  # 1 + 0.05 per character: above 1
    trainer = _spo_trainer(tmp_path / "a", reward=spec, spo_offline_n=0)
    batch = next(iter(trainer.get_train_dataloader()))
    with pytest.raises(UserError, match=r"^method\.rewards \(partial_credit\): SPO's success-rate tracker needs rewards "
                                        r"in \[0, 1\], got .*; set method\.spo_reward_range"):
        trainer._prepare_inputs(batch)
    trainer = _spo_trainer(tmp_path / "b", reward=spec, spo_offline_n=0, spo_reward_range=[0.0, 2.0])
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert all(0.0 <= r <= 1.0 for r in trainer.spo_pending["rewards"])


def _run_spo(recipe, callbacks=(), quiet=True, **kw):
    """``posttrain.train.run`` of an SPO recipe; returns the trainer's SPO state and sampler generator state at the
    end of training."""
    import dataclasses

    from transformers import TrainerCallback

    from posttrain.families.base import FAMILIES
    from posttrain.registry import load
    from posttrain.train import run

    found = {}

    class Grab(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            found["state"] = (found["trainer"].spo_state_dict(), found["trainer"].spo_generator.get_state().clone())

    original = FAMILIES["rl"]

    def build(ctx):
        found["trainer"] = load(original.build_trainer)(ctx)
        return found["trainer"]

    FAMILIES["rl"] = dataclasses.replace(original, build_trainer=build)
    try:
        run(recipe, callbacks=[Grab(), *callbacks], quiet=quiet, **kw)
    finally:
        FAMILIES["rl"] = original
    return found.get("state")


@pytest.mark.parametrize("pool", [None, 6])
def test_resume_is_bit_identical_with_tracker_and_sampler_state(tmp_path, pool):
    """Kill an SPO run after its step-3 checkpoint and resume it: the final weights, the tracker (alpha, beta, visits,
    stored responses), the candidate pools' shuffled pass (pools of 6 out of 12 rows: a new permutation every other
    step, the checkpoint half-way through one) and the sampler's next draw equal an uninterrupted run's."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise RuntimeError("simulated kill")

    a = _run_spo(_spo_recipe(tmp_path / "full", spo_candidate_pool=pool))
    with pytest.raises(RuntimeError, match="simulated kill"):
        _run_spo(_spo_recipe(tmp_path / "killed", spo_candidate_pool=pool), callbacks=[Kill()])
    assert (tmp_path / "killed" / "checkpoint-3" / "spo_state_0.pt").is_file()
    b = _run_spo(_spo_recipe(tmp_path / "killed", spo_candidate_pool=pool), resume=True)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "killed").state_dict()
    assert [k for k in full if not torch.equal(full[k], resumed[k])] == []
    assert a[0]["tracker"] == b[0]["tracker"] and a[0]["pending"] == b[0]["pending"]
    assert (a[0]["pool_order"], a[0]["pool_cursor"]) == (b[0]["pool_order"], b[0]["pool_cursor"])
    assert torch.equal(a[1], b[1])  # the sampler's generator: the same next draw
    assert sum(a[0]["tracker"]["visits"].values()) == 5 * 4  # 6 steps of 4 prompts, the last update still pending
    if pool is not None:  # 6 pools of 6 out of 12 rows: the third permutation, used up
        assert sorted(a[0]["pool_order"]) == list(range(12)) and a[0]["pool_cursor"] == 12


def test_conversational_prompts(tmp_path):
    """Chat prompts (lists of messages) are keyed by their canonical JSON, go through the chat template in the offline
    pass and in training, and one generation batch updates the tracker of exactly the prompts it drew."""
    import json

    from posttrain.families.rl.spo_trainer import OFFLINE_SCORES_FILE, row_key

    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i + 1}="}], "answer": str(2 * i + 1)} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = _spo_trainer(tmp_path / "run", data={"train": {"source": str(data)}})
    loader = iter(trainer.get_train_dataloader())
    output = trainer._prepare_inputs(next(loader))
    keys = {row_key(r["prompt"]) for r in rows}
    assert set(json.loads((tmp_path / "run" / OFFLINE_SCORES_FILE).read_text())["scores"]) == keys
    prompt = trainer.processing_class.decode(output["prompt_ids"][0][output["prompt_mask"][0].bool()])
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    drawn = trainer.spo_pending["keys"]
    assert len(drawn) == 4 and set(drawn) <= keys
    trainer._buffered_inputs, trainer._step = None, 0
    trainer._prepare_inputs(next(loader))
    assert set(trainer.spo_tracker.visits) == set(drawn)


# ----------------------------------------------------------------------------------------------------------------------
# spo_candidate_pool


def test_candidate_pools_cut_a_shuffled_pass():
    """Pools are consecutive slices of a seeded permutation (a new one when too few rows are left, the rest skipped);
    a pool as large as the batch is drawn whole, whatever the weights."""
    from posttrain.families.rl.spo_trainer import draw_prompts, next_candidate_pool

    g = torch.Generator().manual_seed(0)
    first = torch.randperm(6, generator=torch.Generator().manual_seed(0)).tolist()
    pool, order, cursor = next_candidate_pool([], 0, 3, 6, g)
    assert order == first and pool == first[:3] and cursor == 3
    pool2, order, cursor = next_candidate_pool(order, cursor, 3, 6, g)
    assert pool2 == first[3:] and sorted(pool + pool2) == list(range(6)) and cursor == 6  # one pass: every row once
    pool3, order3, cursor = next_candidate_pool(order, cursor, 4, 6, g)
    assert order3 != order and sorted(order3) == list(range(6)) and pool3 == order3[:4] and cursor == 4
    _, order4, cursor = next_candidate_pool(order3, cursor, 4, 6, g)  # 2 rows left < 4: they are skipped
    assert order4 != order3 and cursor == 4
    weights = torch.tensor([0.55, 0.05, 0.05])
    assert sorted(draw_prompts(weights, 3, torch.Generator().manual_seed(1))) == [0, 1, 2]


def test_candidate_pool_in_the_trainer(tmp_path):
    """Pools of 4 with a generation batch of 4 over 12 rows: each batch is its whole pool, so three batches visit every
    prompt exactly once; a pool below the batch or above the data is one error naming the key."""
    from posttrain.errors import UserError
    from posttrain.recipe import parse_recipe

    trainer = _spo_trainer(tmp_path / "a", spo_offline_n=0, spo_candidate_pool=4)
    loader = iter(trainer.get_train_dataloader())
    drawn = []
    for _ in range(3):
        trainer._buffered_inputs, trainer._step = None, 0
        trainer._prepare_inputs(next(loader))
        drawn += trainer.spo_pending["keys"]
        assert trainer._spo_cursor == len(drawn)
    assert sorted(drawn) == sorted(trainer._spo_keys) and len(set(drawn)) == 12
    with pytest.raises(UserError, match=r"^method\.spo_candidate_pool: 3 is below the generation batch of 4 prompts"):
        _spo_trainer(tmp_path / "b", spo_offline_n=0, spo_candidate_pool=3)
    with pytest.raises(UserError, match=r"^method\.spo_candidate_pool: 13 is above the 12 rows of data\.train"):
        _spo_trainer(tmp_path / "c", spo_offline_n=0, spo_candidate_pool=13)
    with pytest.raises(UserError, match=r"^method\.spo_candidate_pool: .*greater than or equal to 1"):
        parse_recipe(_spo_recipe_data(tmp_path, spo_candidate_pool=0))


# ----------------------------------------------------------------------------------------------------------------------
# posttrain spo-init


def _write_recipe(path, out, method=None):
    import yaml

    data = _spo_recipe_data(out)
    path.write_text(yaml.safe_dump({**data, "method": method or data["method"]}))
    return str(path)


def test_spo_init_writes_resumes_and_refuses(tmp_path, monkeypatch, capsys):
    """`posttrain spo-init` writes n0 scores per training prompt to output_dir/spo_offline_scores.json; a pass killed
    after two of its six rounds continues from its partial file to the same scores (the partial file of another
    pass is started over); an existing file, a non-SPO recipe, n0 = 0 and a missing recipe are one error line each
    (exit 2)."""
    import json

    from posttrain.cli import main
    from posttrain.families.rl.spo_trainer import OFFLINE_SCORES_FILE, SPOGRPOTrainer

    recipe = _write_recipe(tmp_path / "spo.yaml", tmp_path / "run")
    assert main(["spo-init", recipe]) == 0
    assert "wrote " in capsys.readouterr().out
    scores = json.loads((tmp_path / "run" / OFFLINE_SCORES_FILE).read_text())["scores"]
    assert len(scores) == 12 and all(len(v) == 2 and set(v) <= {0.0, 1.0} for v in scores.values())

    original, calls = SPOGRPOTrainer._generate_and_score_local, []

    def dies_in_round_three(self, rows):
        calls.append(len(rows))
        if len(calls) == 3:
            raise RuntimeError("simulated kill")
        return original(self, rows)

    out = tmp_path / "other" / "scores.json"
    monkeypatch.setattr(SPOGRPOTrainer, "_generate_and_score_local", dies_in_round_three)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main(["spo-init", recipe, "--out", str(out)])
    partial = json.loads((out.parent / "scores.json.partial").read_text())
    assert partial["rounds_done"] == 2 and not out.exists()
    monkeypatch.setattr(SPOGRPOTrainer, "_generate_and_score_local", original)
    assert main(["spo-init", recipe, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["scores"] == scores and not (out.parent / "scores.json.partial").exists()
    assert "set method.spo_offline_scores: " in capsys.readouterr().out
    stale = {**partial, "layout": {**partial["layout"], "rewards": [["other"], [1.0], None]}, "rounds_done": 6,
             "scores": {k: [0.0, 0.0] for k in scores}}  # another pass's progress (other rewards): started over
    (tmp_path / "third.json.partial").write_text(json.dumps(stale))
    assert main(["spo-init", recipe, "--out", str(tmp_path / "third.json")]) == 0
    assert json.loads((tmp_path / "third.json").read_text())["scores"] == scores
    assert "is another pass's (other prompts, rewards or sampling settings): starting again" in capsys.readouterr().err

    def error(*argv):
        assert main(["spo-init", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "exists (`posttrain train` reads it as it is); pass --overwrite" in error(recipe)
    grpo = _write_recipe(tmp_path / "grpo.yaml", tmp_path / "g", {"name": "grpo", "advantage": "group"})
    assert "method.advantage: spo (method.advantage is group)" in error(grpo)
    assert error(recipe, "--set", "method.spo_offline_n=0", "--out", str(tmp_path / "x.json")).startswith(
        "error: method.spo_offline_n: 0 starts every prompt at the Jeffreys prior")
    assert "no-such.yaml" in error(str(tmp_path / "no-such.yaml"))


def test_train_reading_spo_init_scores_equals_the_automatic_pass(tmp_path, caplog):
    """A run that reads `posttrain spo-init`'s file (the default path in its output_dir) and a run that samples the
    offline pass itself, same seed: the same scores file, tracker, sampler state and final weights (the pass is seeded
    by rounds and leaves the run's random state as it was)."""
    import json
    import logging

    from transformers import AutoModelForCausalLM

    from posttrain.cli import main
    from posttrain.families.rl.spo_trainer import OFFLINE_SCORES_FILE

    assert main(["spo-init", _write_recipe(tmp_path / "spo.yaml", tmp_path / "read")]) == 0
    written = (tmp_path / "read" / OFFLINE_SCORES_FILE).read_text()

    def recipe_for(out):
        from posttrain.recipe import parse_recipe

        data = _spo_recipe_data(out)
        return parse_recipe({**data, "training": {**data["training"], "max_steps": 2, "save_steps": 10}})

    with caplog.at_level(logging.INFO, logger="posttrain"):
        read = _run_spo(recipe_for(tmp_path / "read"), quiet=False)  # the INFO line
    assert any("12 of 12 training prompts; 0 missing" in m for m in caplog.messages)
    sampled = _run_spo(recipe_for(tmp_path / "sampled"))
    assert json.loads((tmp_path / "sampled" / OFFLINE_SCORES_FILE).read_text()) == json.loads(written)
    assert read[0]["tracker"] == sampled[0]["tracker"] and torch.equal(read[1], sampled[1])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "read").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "sampled").state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_scores_file_errors_and_coverage(tmp_path, caplog):
    """A scores file of the wrong shape or for other prompts is one error naming the key and the file; one that covers
    some prompts starts those from their scores and the rest at the Jeffreys prior, with the counts logged."""
    import json
    import logging

    from posttrain.errors import UserError
    from posttrain.families.rl.spo_tracker import offline_init

    def first_batch(trainer):
        trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    for i, (content, message) in enumerate([
        ("[1, 0]", r"holds a JSON list, expected an object of prompt keys to score lists"),
        ('{"abc": [1, "x"]}', r"prompt abc: expected a list of finite scores"),
        ('{"abc": [1, 0]}', r"holds the scores of 1 prompts, none of them in data\.train"),
        ("{", r"cannot read"),
    ]):
        path = tmp_path / f"bad{i}.json"
        path.write_text(content)
        trainer = _spo_trainer(tmp_path / f"run{i}", spo_offline_scores=str(path))
        with pytest.raises(UserError, match=rf"^method\.spo_offline_scores: .*{message}") as caught:
            first_batch(trainer)
        assert str(path) in str(caught.value)
    trainer = _spo_trainer(tmp_path / "part")
    keys = sorted(set(trainer._spo_keys))
    covered = {k: [1.0, 0.0] for k in keys[:5]}
    (tmp_path / "part" / "spo_offline_scores.json").write_text(json.dumps({**covered, "other": [1.0]}))
    with caplog.at_level(logging.INFO, logger="posttrain"):
        first_batch(trainer)
    assert any("output_dir/spo_offline_scores.json): 5 of 12 training prompts; 7 missing start at the Jeffreys prior "
               "(0.5, 0.5); 1 prompts of the file are not in data.train" in m for m in caplog.messages)
    t = trainer.spo_tracker
    assert all((t.alpha[k], t.beta[k]) == pytest.approx(offline_init([1.0, 0.0])) for k in covered)
    assert all(k not in t.alpha for k in keys[5:]) and "other" not in t.alpha  # p_hat 0.5 until visited


def _first_batch(trainer):
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _other_pass(record, scores):
    """A scores file of another pass (another start model and seed) with every score 0."""
    model = {"model": "builtin:tiny-qwen2", "revision": None, "path": None}
    return {"pass": {**record, "model": model, "seed": 99}, "scores": {k: [0.0, 0.0] for k in scores}}


def test_stale_default_scores_file_is_sampled_again(tmp_path, caplog):
    """The default scores file records its pass (start model included); a default file of another pass (other start
    model and seed) is named in one line with what differs, sampled again and overwritten."""
    import json
    import logging

    from posttrain.families.rl.spo_tracker import offline_init
    from posttrain.families.rl.spo_trainer import OFFLINE_SCORES_FILE

    _first_batch(_spo_trainer(tmp_path))
    written = json.loads((tmp_path / OFFLINE_SCORES_FILE).read_text())
    record = written["pass"]
    assert record["model"] == {"model": "builtin:tiny-qwen2-arith", "revision": None, "path": None}
    assert (record["prompts"], record["n0"], record["seed"]) == (12, 2, 3)
    (tmp_path / OFFLINE_SCORES_FILE).write_text(json.dumps(_other_pass(record, written["scores"])))
    trainer = _spo_trainer(tmp_path)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        _first_batch(trainer)
    lines = [m for m in caplog.messages if "was written by another offline pass" in m]
    assert len(lines) == 1 and "(model, seed differ): sampling the pass again" in lines[0]
    assert json.loads((tmp_path / OFFLINE_SCORES_FILE).read_text()) == written  # the same pass, sampled again
    t = trainer.spo_tracker
    assert all((t.alpha[k], t.beta[k]) == pytest.approx(offline_init(v)) for k, v in written["scores"].items())


def test_explicit_scores_file_of_another_pass_is_used_with_a_warning(tmp_path, caplog):
    """method.spo_offline_scores written by another pass is read as the user asked, with a warning naming what
    differs; nothing is sampled or written."""
    import json
    import logging

    from posttrain.families.rl.spo_tracker import offline_init
    from posttrain.families.rl.spo_trainer import OFFLINE_SCORES_FILE

    trainer = _spo_trainer(tmp_path / "run", spo_offline_scores=str(tmp_path / "scores.json"))
    stale = _other_pass(trainer.spo_pass_record(), set(trainer._spo_keys))
    (tmp_path / "scores.json").write_text(json.dumps(stale))
    with caplog.at_level(logging.INFO, logger="posttrain"):
        _first_batch(trainer)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "offline pass" in r.message]
    assert len(warnings) == 1 and "(method.spo_offline_scores) was written by another offline pass (model, seed " \
        "differ): used as set" in warnings[0]
    t = trainer.spo_tracker
    assert all((t.alpha[k], t.beta[k]) == pytest.approx(offline_init([0.0, 0.0])) for k in stale["scores"])
    assert not (tmp_path / "run" / OFFLINE_SCORES_FILE).exists()


def test_plain_scores_file_without_a_pass_record_is_read(tmp_path, caplog):
    """An older plain {prompt key: [scores]} default file is read as it is (logged: no pass record), not resampled."""
    import json
    import logging

    from posttrain.families.rl.spo_tracker import offline_init
    from posttrain.families.rl.spo_trainer import OFFLINE_SCORES_FILE

    trainer = _spo_trainer(tmp_path)
    plain = {k: [1.0, 1.0] for k in set(trainer._spo_keys)}
    (tmp_path / OFFLINE_SCORES_FILE).write_text(json.dumps(plain))
    with caplog.at_level(logging.INFO, logger="posttrain"):
        _first_batch(trainer)
    assert any("output_dir/spo_offline_scores.json) has no pass record (an older file): read as it is" in m
               for m in caplog.messages)
    assert not any("another offline pass" in m for m in caplog.messages)
    t = trainer.spo_tracker
    assert all((t.alpha[k], t.beta[k]) == pytest.approx(offline_init([1.0, 1.0])) for k in plain)
    assert json.loads((tmp_path / OFFLINE_SCORES_FILE).read_text()) == plain
