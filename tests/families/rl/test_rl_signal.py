"""RL signals that silently vanish (issue 12, failures 4 and 5): runs without learning signal warn with the likely
cause and end with a warning line; stratified advantages warn on singleton strata and their default key (tool_calls)
gives one stratum per group on free text."""

import json
from pathlib import Path

import pytest
import torch

from posttrain.families.rl.diagnostics import BatchSignal, SignalMonitor, batch_signal, diagnose

ROOT = Path(__file__).resolve().parents[3]


def _batch(has_signal=False, lo=0.0, hi=0.0, clipped=0.0, means=None, zero_std=1.0):
    return BatchSignal(has_signal=has_signal, frac_zero_std=zero_std, reward_mean=(lo + hi) / 2, reward_min=lo,
                       reward_max=hi, clipped_frac=clipped, reward_means=means or {})


def test_batch_signal_by_hand():
    # 2 groups of 3: group 0 all equal (zero std), group 1 varied; a NaN (unscored) row is left out
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, float("nan")])
    adv = torch.tensor([0.0, 0.0, 0.0, -0.7, 0.7, 0.0])
    keep = torch.ones(6, dtype=torch.bool)
    clipped = torch.tensor([False, False, True, True, False, False])
    rpf = torch.tensor([[1.0], [1.0], [1.0], [0.0], [1.0], [float("nan")]])
    b = batch_signal(rewards, adv, keep, 3, clipped=clipped, rewards_per_func=rpf, names=["exact_match"])
    assert b.has_signal and b.frac_zero_std == 0.5 and b.clipped_frac == pytest.approx(2 / 6)
    assert (b.reward_mean, b.reward_min, b.reward_max) == (pytest.approx(0.8), 0.0, 1.0)
    assert b.reward_means == {"exact_match": pytest.approx(0.8)}
    # the same rewards with every non-zero advantage dropped (PSR/NSR keep mask): no signal
    assert not batch_signal(rewards, adv, torch.tensor([1, 1, 1, 0, 0, 1]), 3).has_signal


def test_diagnose_names_the_likely_cause():
    assert diagnose([_batch(clipped=0.9)], 8).startswith(
        "completion length too short: 90% of completions were cut at training.max_completion_length=8 before they ended")
    assert diagnose([_batch(means={"format": 0.0, "exact_match": 0.0})]).startswith("format mismatch")
    assert diagnose([_batch(means={"exact_match": 0.0})]).startswith("reward never matches: every completion scored 0")
    assert diagnose([_batch(lo=1.0, hi=1.0)]).startswith("every completion already scores 1: the task is too easy")
    assert diagnose([_batch(lo=0.0, hi=1.0, zero_std=1.0)]).startswith("each prompt's completions all scored the same")
    assert diagnose([_batch(lo=0.5, hi=0.5)], correct_reward=0.5).startswith("every completion already scores 0.5")


def test_monitor_warns_after_patience_windows_and_summarises():
    m = SignalMonitor(patience=2, max_completion_length=4)
    m.add(_batch(has_signal=True, hi=1.0, zero_std=0.5))
    assert m.on_log({"grad_norm": 0.3}) is None  # signal: the dead streak does not start
    for _ in range(2):
        m.add(_batch())
    assert m.on_log({"grad_norm": 0.0}) is None  # one dead window: not yet
    m.add(_batch())
    warning = m.on_log({"grad_norm": 0.0})
    assert warning.startswith("no learning signal for 2 logging steps in a row (all rewards equal within every group, "
                              "so every advantage is 0, grad norm 0); likely cause: reward never matches")
    m.add(_batch())
    assert m.on_log({"grad_norm": 0.0}) is None  # warned once per dead streak
    assert m.warnings == [warning]
    assert m.summary().startswith("no learning signal in 4 of 5 generation batches (mean reward 0.100, 90% of prompt "
                                  "groups with equal rewards); likely cause: reward never matches")
    healthy = SignalMonitor()
    healthy.add(_batch(has_signal=True, hi=1.0))
    assert healthy.on_log({"grad_norm": 1.0}) is None and healthy.summary() is None
    off = SignalMonitor(patience=0)
    for _ in range(3):
        off.add(_batch())
        assert off.on_log({}) is None
    assert off.summary() is not None  # the final line stays


# ----------------------------------------------------------------------------------------------------------------
# whole runs


def _train(tmp_path, recipe, *sets):
    from posttrain.cli import main

    rc = main(["train", str(ROOT / "recipes" / recipe), "--set", f"output_dir={tmp_path / 'run'}",
               "--set", "training.logging_steps=1", "--set", "training.save_strategy=no",
               "--set", "training.disable_tqdm=true", "--set", "data.test=null", *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return [r for r in rows if "reward" in r], summary


@pytest.mark.parametrize("sets, cause", [
    # the run: completions cut before they can hold an answer -> reward 0 everywhere
    (["training.max_completion_length=1", "data.train={source: SUMS}"], "completion length too short"),
    (["method.rewards=[{name: format}]"], "format mismatch"),
])
def test_run_without_signal_warns_and_ends_with_a_warning_line(sets, cause, tmp_path, capsys):
    """recipes/grpo.yaml where every reward is 0: a warning during training naming the cause, and a final warning line
    after 'done:' (on main the run only printed 'done: 6 steps, train loss 0.0000')."""
    from posttrain.data.arithmetic import arithmetic_rows

    sums = tmp_path / "sums.jsonl"  # two-digit answers only: a single token can never be right
    sums.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows("rl", num_samples=200) if int(r["answer"]) >= 10))
    sets = [s.replace("SUMS", str(sums)) for s in sets]
    rows, summary = _train(tmp_path, "grpo.yaml", "training.max_steps=4", "training.per_device_train_batch_size=16",
                           "training.num_generations=4", "data.train.max_samples=16", *sets)
    out, err = capsys.readouterr()
    assert len(rows) == 4 and all(r["reward"] == 0.0 and r["frac_reward_zero_std"] == 1.0 for r in rows)
    assert all(r["grad_norm"] == 0.0 for r in rows)
    warned = [line for line in err.splitlines() if "no learning signal for 2 logging steps in a row" in line]
    assert len(warned) == 1 and f"likely cause: {cause}" in warned[0], err[-2000:]
    lines = out.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("done:")):]
    assert lines[0].startswith("done: 4 steps, train loss 0.0000")
    assert lines[-1].startswith("warning: no learning signal in 4 of 4 generation batches") and cause in lines[-1]
    assert summary["warnings"][-1] == lines[-1][len("warning: "):]


def test_healthy_run_has_no_warning(tmp_path, capsys):
    rows, summary = _train(tmp_path, "grpo.yaml", "training.max_steps=2", "training.per_device_train_batch_size=32",
                           "training.num_generations=8", "training.temperature=1.5", "data.train.max_samples=8")
    assert any(r["frac_reward_zero_std"] < 1 for r in rows)
    # the only warning: a 2-step run is a smoke test (posttrain.recipe.training_args.schedule_warnings)
    assert [w[:18] for w in summary["warnings"]] == ["training.max_steps"]
    assert [line[:27] for line in capsys.readouterr().out.splitlines() if "warning" in line] == [
        "warning: training.max_steps"]


def test_shipped_stratified_recipe_is_one_stratum_per_group_on_free_text(tmp_path, capsys):
    """Issue 12, failure 5: recipes/grpo_stratified.yaml on free text (the random-init model writes 16 tokens of
    anything) put every completion in its own stratum (key: completion length), so A = 0.2 * A_GRPO. The shipped key
    is now the number of tool calls: 0 for every free-text completion, one stratum per group, A = A_GRPO."""
    rows, summary = _train(tmp_path, "grpo_stratified.yaml", "model=builtin:tiny-qwen2", "training.max_steps=2",
                           "training.per_device_train_batch_size=16", "training.num_generations=4",
                           "training.max_completion_length=16", "method.rewards=[{function: 'test_rl_signal:by_length'}]",
                           "data.train.max_samples=8")
    for row in rows:
        assert row["san/num_strata_per_group"] == 1.0 and row["san/frac_singleton_strata"] == 0.0
        assert row["san/adv_abs_diff"] == 0.0  # A_SAN == A_GRPO: the blend is GRPO exactly
        assert row["advantages/max"] > 0
    assert [w[:18] for w in summary["warnings"]] == ["training.max_steps"]  # only: a 2-step run is a smoke test


def test_singleton_strata_warn(tmp_path, capsys):
    """The old key (completion length in characters) on free text: most strata are singletons -> one warning naming
    method.stratum_key and the (1 - san_alpha) cut."""
    rows, summary = _train(tmp_path, "grpo_stratified.yaml", "model=builtin:tiny-qwen2", "training.max_steps=2",
                           "training.per_device_train_batch_size=16", "training.num_generations=4",
                           "training.max_completion_length=16", "method.rewards=[{function: 'test_rl_signal:by_length'}]",
                           "method.stratum_key=posttrain.rl.strata:completion_length", "data.train.max_samples=8")
    assert all(r["san/frac_singleton_strata"] > 0.5 for r in rows)
    warned = [w for w in summary["warnings"] if w.startswith("method.stratum_key: posttrain.rl.strata:completion_length")]
    assert len(warned) == 1 and "keep only (1 - san_alpha) = 0.2 of the GRPO advantage" in warned[0]
    assert capsys.readouterr().err.count("warning: method.stratum_key") == 1


def by_length(prompts, completions, **kwargs):
    """A reward that differs inside every group whatever the model writes."""
    return [float(len(c)) for c in completions]
