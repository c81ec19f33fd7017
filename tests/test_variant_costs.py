"""benchmarks/variant_costs.py: its cells come from the registries, every arm is a valid recipe, the verdict reads the
ratios and the declared needs. (The measurements themselves are the script's, never a timed test.)"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import variant_costs as V  # noqa: E402


def test_cells_cover_every_registered_variant():
    from posttrain.adapters.spec import ADAPTER_VARIANTS
    from posttrain.families.rl.parts import ADVANTAGES, AGGREGATIONS, CLIPPINGS, POLICY_LOSSES
    from posttrain.methods import METHODS
    from posttrain.optim import OPTIMIZERS

    labels = {(c.family, c.variant.split(" ")[0]) for c in V.cells()}
    baselines = {"sft", "dpo", "kto", "ga", "npo"}
    for name, info in METHODS.items():
        if info.family in ("sft", "preference", "unlearning") and name not in baselines:
            assert (info.family, name) in labels, name
    base = V._yaml(V.RL_BASE)["method"]
    for key, registry in (("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS), ("clipping", CLIPPINGS)):
        for entry in registry:
            assert entry.name == base[key] or ("rl", f"{key}={entry.name}") in labels, (key, entry.name)
    assert {("rl", f"loss={e.name}") for e in POLICY_LOSSES if e.name != "grpo"} <= labels
    assert {("lora", e.name) for e in ADAPTER_VARIANTS if e.name != "lora"} <= labels
    assert {("optimizer", name) for name in OPTIMIZERS} <= labels


def test_a_part_registered_later_joins_the_rl_cells():
    from posttrain.families.rl.parts import AGGREGATIONS

    AGGREGATIONS.add("toy_mean", lambda loss, mask, normalizer: (loss * mask).sum() / mask.sum(), doc="toy")
    try:
        cell = next(c for c in V.rl_cells() if c.variant == "aggregation=toy_mean")
        assert cell.sets[-1] == "method.aggregation=toy_mean" and cell.base_sets == []
    finally:
        AGGREGATIONS.remove("toy_mean")


def test_a_periodic_adapter_runs_one_period_in_the_measured_window():
    """PLoRA unloads every ``stage_steps`` steps: its arm runs with the period = the measured steps, so one unload is
    in every measurement (the recipe's period of 10 with 6 measured steps would put none in it)."""
    plora = next(c for c in V.lora_cells(window=6) if c.variant == "plora")
    assert plora.sets == ["peft.plora.stage_steps=6"] and "peft.plora=null" in plora.base_sets
    assert next(c for c in V.lora_cells(window=6) if c.variant == "goat").sets == []
    args = argparse.Namespace(batch=2, rl_prompts=1, steps=8)
    recipe = V.load_arm(plora.recipe, V.arm_sets(args, plora.recipe, plora.sets, {}))
    assert recipe.peft.plora.stage_steps == 6


def test_every_arm_is_a_valid_recipe_and_declares_its_extra_work():
    args = argparse.Namespace(batch=2, rl_prompts=1, steps=3)
    extra = {}
    for c in V.cells():
        if c.not_measured:
            continue
        variant, base = (V.declared(V.load_arm(c.recipe, V.arm_sets(args, c.recipe, sets, {})))
                         for sets in (c.sets, c.base_sets))
        assert variant != base or c.variant in ("dft", "simpo", "orpo", "asft_aligned", "dpo loss=ipo") \
            or c.family == "rl", c.variant
        extra[c.variant] = variant - base
    # what the methods compute beyond their baselines, as their registry entries and params say
    assert "anchor_kl" in extra["asft_anchored"] and "reference model" in extra["asft_anchored"]
    assert {"token_kl", "learned_mask"} <= extra["sparsepo"]
    assert "log_alignment" in extra["wpo"]
    assert "retain_kl" in extra["npo_kl"] and "retain_logps" in extra["grad_diff"]
    assert any(x.startswith("adapter hook GOAT") for x in extra["goat"])
    assert extra["stable_spam"] == {"optimizer stable_spam"}


def _run(recipe, sets, repeat, cpu, growth, declared=(), steps=None):
    run = {"recipe": recipe, "sets": list(sets), "repeat": repeat, "cpu_s_per_step": cpu, "peak_growth_mib": growth,
           "declared": list(declared)}
    return {**run, "cpu_s_each_step": steps} if steps is not None else run


def test_fastest_step_ratio_reads_each_arms_fastest_step_over_every_repeat():
    cell = V.Cell("sft", "v", "sft", "recipes/v.yaml", ["method.a=1"], [])
    runs = [_run(cell.recipe, [], 0, 1.0, 100, steps=[0.30, 0.20, 0.25]),
            _run(cell.recipe, cell.sets, 0, 1.0, 100, steps=[0.40, 0.22]),
            _run(cell.recipe, [], 1, 1.0, 100, steps=[0.21]), _run(cell.recipe, cell.sets, 1, 1.0, 100, steps=[0.21])]
    (row,) = V.summarise([cell], runs)
    assert (row["fastest_step"], row["base_fastest_step"]) == (0.21, 0.20)
    assert row["fastest_ratio"] == pytest.approx(1.05) and "| 1.05 |" in V.markdown([row])
    (row,) = V.summarise([cell], [{k: v for k, v in r.items() if k != "cpu_s_each_step"} for r in runs])
    assert "fastest_ratio" not in row  # runs of an older file: no per-step times


def test_ratio_interval_is_students_t_on_the_log_ratios():
    """Hand-computed: logs of [1.5, 1.0] = [0.405465, 0], mean 0.202733, sd 0.286708, t(0.95, 1) = 6.314, half-width
    6.314 * 0.286708 / sqrt 2 = 1.28003: (exp 0.202733, exp -1.077297, exp 1.482763); the five ratios around 1: logs
    of mean -0.000100 and sd 0.0158134, half-width 2.132 * 0.0158134 / sqrt 5 = 0.0150774; one repeat: no interval."""
    assert V.ratio_interval([1.5, 1.0]) == pytest.approx((1.224745, 0.340531, 4.405157), rel=2e-4)
    assert V.ratio_interval([1.00, 1.02, 0.98, 1.01, 0.99]) == pytest.approx((0.999900, 0.984937, 1.015090), rel=1e-5)
    assert V.ratio_interval([0.97]) == pytest.approx((0.97, 0.97, 0.97))


FIVE = 5


@pytest.mark.parametrize("cpu, growth, declared, verdict", [
    ([1.00, 1.02, 0.98, 1.01, 0.99], [100, 104, 98, 100, 101], ["x"], "within 5 %"),
    ([1.20, 1.10, 1.30, 1.25, 1.15], [100, 100, 100, 100, 100], ["token_kl"], "over (time): declares token_kl"),
    ([1.00, 1.00, 1.00, 1.00, 1.00], [130, 120, 140, 125, 135], [], "over (memory): nothing declared"),
    # centred on 1 but spread +-10 %: the interval (0.93..1.08) contains 1.05; so does a median at 1.05
    ([0.90, 1.10, 1.00, 0.95, 1.06], [100, 100, 100, 100, 100], [], "not resolved (time): nothing declared"),
    ([1.04, 1.06, 1.05, 1.07, 1.03], [100, 100, 100, 100, 100], [], "not resolved (time): nothing declared"),
    # a range reaching over 1.05 whose interval does not: within (the range rule of the earlier tables said not
    # resolved)
    ([1.00, 1.00, 1.06, 0.99, 0.98], [100, 100, 100, 100, 100], ["entropy"], "within 5 %"),
    ([1.20, 1.10, 1.30, 1.25, 1.15], [100, 90, 110, 100, 100], ["token_kl"],
     "over (time); not resolved (memory): declares token_kl"),
])
def test_verdict_reads_the_interval_of_the_paired_ratios_and_the_declared_needs(cpu, growth, declared, verdict):
    cell = V.Cell("preference", "v", "dpo", "recipes/v.yaml", ["method.a=1"], [])
    runs = [r for rep in range(FIVE) for r in (_run(cell.recipe, [], rep, 1.0, 100, ["x"]),
                                              _run(cell.recipe, cell.sets, rep, cpu[rep], growth[rep],
                                                   ["x", *declared]))]
    (row,) = V.summarise([cell], runs)
    assert row["verdict"] == verdict
    assert {k: row["cpu_ratio"][k] for k in ("median", "min", "max")} == {
        "median": pytest.approx(sorted(cpu)[2]), "min": pytest.approx(min(cpu)), "max": pytest.approx(max(cpu))}
    assert row["cpu_ratio"]["ci90"] == pytest.approx(list(V.ratio_interval(cpu)[1:]))
    assert row["growth_ratio"]["median"] == pytest.approx(sorted(growth)[2] / 100)
    assert "| v | dpo |" in V.markdown([row])


def test_merged_jsons_take_each_row_from_the_last_file_that_ran_both_arms():
    """``--from-json old.json new.json``: a cell measured in both files reads the newer one's repeats only (never a
    variant of one run paired with the baseline of another); a cell only the older file ran keeps its row."""
    rerun = V.Cell("rl", "advantage=rloo", "grpo", "recipes/grpo.yaml", ["method.advantage=rloo"], [])
    kept = V.Cell("lora", "goat", "lora", "recipes/sft_goat.yaml", [], ["peft.type=lora"])
    old = {"setting": "old", "runs": [_run(c.recipe, sets, rep, cpu, 100) for rep in range(2)
                                      for c in (rerun, kept) for sets, cpu in ((c.sets, 1.5), (c.base_sets, 1.0))]}
    new = {"setting": "new", "runs": [_run(rerun.recipe, sets, rep, cpu, 100) for rep in range(3)
                                      for sets, cpu in ((rerun.sets, 1.01), (rerun.base_sets, 1.0))]}
    new["runs"].append(_run(kept.recipe, kept.sets, 0, 9.0, 100))  # a variant arm without its baseline: not paired
    runs, settings = V.merge_runs([old, new])
    assert settings == ["old", "new"]
    rows = {r["variant"]: r for r in V.summarise([rerun, kept], runs)}
    assert (rows["advantage=rloo"]["source"], rows["advantage=rloo"]["repeats"]) == (1, 3)
    assert rows["advantage=rloo"]["cpu_ratio"]["max"] == pytest.approx(1.01)
    assert (rows["goat"]["source"], rows["goat"]["repeats"]) == (0, 2)
    assert rows["goat"]["cpu_ratio"]["median"] == pytest.approx(1.5)


def test_from_json_merges_files_into_one_table(tmp_path, capsys):
    cell = next(c for c in V.rl_cells() if c.variant == "advantage=rloo")
    paths = []
    for i, ratio in enumerate((1.5, 1.0)):
        doc = {"setting": f"run {i}", "runs": [_run(cell.recipe, sets, rep, cpu, 100) for rep in range(2)
                                               for sets, cpu in ((cell.sets, ratio), (cell.base_sets, 1.0))]}
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(doc))
    out = tmp_path / "merged.json"
    assert V.main(["--families", "rl", "--only", "advantage=rloo", "--from-json", *map(str, paths),
                   "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"[1] {paths[1]}: run 1" in printed and "| advantage=rloo |" in printed
    (row,) = json.loads(out.read_text())["rows"]
    assert row["verdict"] == "within 5 %" and row["source"] == 1


def test_from_json_pairs_a_periodic_adapter_with_its_runs_window(tmp_path, capsys):
    """The PLoRA arm's ``stage_steps`` is its run's window: ``--from-json`` reads it from the file's recorded argv
    (``--steps 12 --warmup 2``: 10), so the row finds its runs."""
    cell = next(c for c in V.lora_cells(window=10) if c.variant == "plora")
    doc = {"argv": ["variant_costs.py", "--families", "lora", "--steps", "12", "--warmup", "2"], "setting": "s",
           "runs": [_run(cell.recipe, sets, rep, cpu, 100) for rep in range(2)
                    for sets, cpu in ((cell.sets, 1.02), (cell.base_sets, 1.0))]}
    path = tmp_path / "lora.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "merged.json"
    assert V.main(["--families", "lora", "--only", "plora", "--from-json", str(path), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["verdict"] == "within 5 %" and row["repeats"] == 2


def test_paired_runs_each_cells_arms_back_to_back(tmp_path, monkeypatch):
    """``--paired``: every cell runs its own baseline next to its variant (the shared baseline once per cell), the
    pair's order and the cells' order alternating by repeat; each row pairs its own runs. A machine slowing by 3 % per
    run: the neighbouring runs' ratio stays within 5 %, while the interleaved order reads drift as cost."""
    calls = []

    def fake_run_arm(recipe, sets, steps, warmup):
        calls.append((recipe, tuple(s for s in sets if s.startswith("method.advantage"))))
        return {"cpu_s_per_step": 1.03 ** len(calls), "wall_s_per_step": 1.0, "peak_growth_mib": 100.0,
                "base_mib": 0.0, "train_loss": 0.0, "declared": []}

    monkeypatch.setattr(V, "run_arm", fake_run_arm)
    only = ["advantage=rloo", "advantage=reinforce_pp", "advantage=stratified"]
    argv = ["--families", "rl", "--only", *only, "--model", "recipe", "--in-process", "--repeats", "4", "--steps", "2",
            "--warmup", "1"]
    out = tmp_path / "paired.json"
    assert V.main([*argv, "--paired", "--out", str(out)]) == 0
    base, rloo, pp, strat = (), ("method.advantage=rloo",), ("method.advantage=reinforce_pp",), \
        ("method.advantage=stratified",)
    assert [c[1] for c in calls][:12] == [base, strat, base, rloo, base, pp, pp, base, rloo, base, strat, base]
    doc = json.loads(out.read_text())
    assert {r["cell"] for r in doc["runs"]} == set(only)
    rows = {r["variant"]: r for r in doc["rows"]}
    assert all(rows[v]["repeats"] == 4 and rows[v]["verdict"].startswith("within 5 %") for v in only)
    calls.clear()
    assert V.main([*argv, "--out", str(tmp_path / "interleaved.json")]) == 0
    assert len(calls) == 16  # the shared baseline once per repeat
    rows = {r["variant"]: r for r in json.loads((tmp_path / "interleaved.json").read_text())["rows"]}
    assert rows["advantage=reinforce_pp"]["verdict"].startswith("not resolved")  # 3 runs from its baseline: drift


def test_optimizer_step_script_builds_every_registered_optimizer(capsys):
    """benchmarks/optimizer_step.py: every ``training.optim`` entry is constructed at its recipe defaults and timed
    against AdamW (a smoke run on a tiny model: the timings are the script's, not asserted)."""
    import optimizer_step as O
    import torch

    from posttrain.optim import OPTIMIZERS

    for name in ("adamw", *OPTIMIZERS):
        param = torch.nn.Parameter(torch.ones(3))
        param.grad = torch.ones(3)
        optimizer = O.make_optimizer(name, [param], lr=0.1)
        optimizer.step()
        assert isinstance(optimizer, torch.optim.Optimizer) and not torch.equal(param.detach(), torch.ones(3))
    assert O.main(["--vocab", "128", "--hidden", "32", "--layers", "1", "--steps", "1", "--warmup", "0",
                   "--rounds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == sorted(OPTIMIZERS)
    assert all(" ratio " in line for line in lines[1:])


def test_rl_parts_script_runs_every_measurable_rl_cell(capsys):
    """benchmarks/rl_parts.py: the advantage and policy loss of every RL arm run forward and backward without the
    model (a smoke run: the timings are the script's, not asserted)."""
    import importlib.util

    # by path: tests/families/rl/ has a helper module of the same name, which a full run may have imported first
    spec = importlib.util.spec_from_file_location("benchmark_rl_parts", ROOT / "benchmarks" / "rl_parts.py")
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)

    call = P.make_call(V.RL_BASE, ("method.aggregation=delta_l",), rows=16, tokens=4)
    call()
    assert P.main(["--calls", "1", "--rounds", "1"]) == 0
    printed = capsys.readouterr().out
    for c in V.rl_cells():
        assert (f"| {c.variant} | {c.baseline} |" in printed) != bool(c.not_measured), c.variant
    # --model: the model's training forward and backward in the call; an entropy-declaring loss gets the entropy
    # with gradient from the engine (the gradient reaches the model's weights)
    assert P.main(["--model", "--vocab", "256", "--hidden", "32", "--layers", "1", "--prompt", "4", "--calls", "1",
                   "--rounds", "1", "--only", "advantage=psr", "clipping=gspo (2 iterations)"]) == 0
    printed = capsys.readouterr().out
    assert "| advantage=psr |" in printed and "| clipping=gspo (2 iterations) |" in printed
    import torch

    step = P.ModelStep(argparse.Namespace(vocab=256, hidden=32, layers=1, prompt=4), rows=4, tokens=3, group=2)
    logps, entropy = step(torch.ones(4, 3), entropy=True)
    (logps.sum() + entropy.sum()).backward()
    assert logps.shape == entropy.shape == (4, 3)
    assert all(p.grad is not None for p in step.model.parameters() if p.requires_grad)
