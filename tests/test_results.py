"""One short rerun per family of ``benchmarks/results.py`` (the runs it builds from the registries, cut to a few
steps), checking the direction its docs page reports, not the numbers (docs/results.md, docs/preference.md,
docs/rlvr.md, docs/unlearning.md, docs/lora_variants.md)."""

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results as R  # noqa: E402


def _runs(family, labels, *extra, quick=True, panel=None):
    runs = [r for r in R.FAMILIES[family].runs(quick) if r.label in labels and (panel is None or panel in r.panel)]
    assert {r.label for r in runs} == set(labels), [r.label for r in runs]
    for r in runs:
        r.sets = [*r.sets, *extra]
    return runs


def _final(results, label, key):
    values = [r["final"][key] for r in results if r["label"] == label]
    assert values and all(v is not None for v in values), (label, key, results)
    return statistics.mean(values)


def _check_outputs(family, results, tmp_path, curves=True):
    assert not [r for r in results if "error" in r], [r["error"] for r in results if "error" in r]
    meta = {"quick": True, "seeds": [0], "env": R.environment(), "command": "pytest", "date": "today",
            "load_before": 0.0, "load_after": 0.0, "wall_s": 1.0}
    R.write_family(family, results, meta, tmp_path)
    table = (tmp_path / f"{family}.md").read_text()
    assert "torch" in table and "Device:" in table and "±" in table
    assert list(tmp_path.glob(f"{family}_*.png")) or not curves


def test_sft_family_baseline_is_the_same_recipe_with_plain_sft():
    """Every SFT-family method is paired with plain SFT on its own recipe (same start, data, lr and steps), one
    baseline per distinct setting."""
    from posttrain.methods import METHODS

    runs = R.sft_runs(quick=False)
    methods = {name for name, info in METHODS.items() if info.family == "sft"} - {"sft"}
    assert methods <= {r.label for r in runs}
    assert len({r.panel for r in R.sft_runs(quick=True)}) == 1  # --quick: the first method recipe's setting only
    for panel in {r.panel for r in runs if r.label != "sft"}:
        mine = [r for r in runs if r.panel == panel]
        assert [r.label for r in mine].count("sft") == 1
        baseline = next(r for r in mine if r.label == "sft")
        assert all(r.recipe == baseline.recipe or r.panel_key == baseline.panel_key for r in mine)
        assert baseline.sets[-1] == "method={name: sft}"


@pytest.mark.slow
def test_sft_family_weak_start_direction(tmp_path):
    """docs/results.md: from the shipped tiny-qwen2-arith, dft.yaml's 100 steps at lr 2e-4 keep plain SFT's greedy
    test accuracy at the start's (not the 8 points lr 1e-3 cost), and DFT ends below SFT."""
    runs = _runs("sft", ["sft", "dft"], "training.max_steps=100", "eval.steps=null", panel="tiny-qwen2-arith")
    results = R.run_family("sft", [0], quick=True, runs=runs)
    _check_outputs("sft", results, tmp_path, curves=False)  # no evaluation during training: no curves
    assert _final(results, "sft", "accuracy_after") >= _final(results, "sft", "accuracy_before") - 0.02
    assert _final(results, "dft", "accuracy_after") < _final(results, "sft", "accuracy_after")


def test_preference_dpo_raises_held_out_preference_accuracy_from_random_init(tmp_path):
    """docs/preference.md: from random init, DPO raises held-out preference accuracy and the log-prob margin."""
    runs = _runs("preference", ["dpo"], panel="random")
    for r in runs:
        r.recipe["training"]["max_steps"] = 12
        r.probe_every = 12
        r.finish = None  # the probe's curve is what is checked; skip the final test-split scoring
    results = R.run_family("preference", [0], quick=True, runs=runs)
    _check_outputs("preference", results, tmp_path)
    curve = results[0]["probe"]
    assert curve[-1]["held_out_accuracy"] > curve[0]["held_out_accuracy"] + 0.02, curve
    assert curve[-1]["held_out_logp_margin"] > curve[0]["held_out_logp_margin"], curve


@pytest.mark.slow
def test_rlvr_grpo_raises_expected_reward(tmp_path):
    """docs/rlvr.md: GRPO raises the expected exact-match reward on the pool it trains on (60 steps, ~1 min)."""
    runs = _runs("rlvr", ["grpo"], "training.max_steps=60", quick=False)
    results = R.run_family("rlvr", [0], quick=False, runs=runs)
    _check_outputs("rlvr", results, tmp_path)
    assert _final(results, "grpo", "expected_reward_gain") > 0.02


def test_preference_runs_cover_every_preference_family_method():
    """The preference table takes every method of the preference families from the registry (KTO, online DPO and
    reward models included), from both starts; a reward model is probed by its scores, an online method gets the
    same prompts with their answers, and the unpaired / online methods see as many prompts a step as DPO."""
    from posttrain.methods import METHODS

    runs = R.preference_runs(quick=False)
    methods = {name for name, info in METHODS.items() if info.family in R.PREFERENCE_FAMILIES}
    for panel in {r.panel for r in runs}:
        assert methods <= {r.recipe["method"]["name"] for r in runs if r.panel == panel}
    by_label = {r.label: r for r in runs}
    assert by_label["reward"].probe is R.reward_probe and by_label["dpo"].probe is R.preference_probe
    assert by_label["online_dpo"].recipe["data"]["train"] == "PREF_PROMPTS"
    assert by_label["kto"].recipe["data"]["train"] == "PREF_TRAIN"
    batch = {k: by_label[k].recipe["training"]["per_device_train_batch_size"] for k in ("dpo", "kto", "online_dpo")}
    assert batch == {"dpo": R.PREF["batch"], "kto": 2 * R.PREF["batch"], "online_dpo": 2 * R.PREF["batch"]}


def test_rlvr_switching_a_part_resets_the_baseline_parts_keys():
    """GSPO and CISPO run with their own clip ranges, not grpo.yaml's PPO epsilon 0.2 (which they refuse); SPO runs
    on its own recipe (one completion per prompt)."""
    runs = {r.label: r for r in R.rlvr_runs(quick=False)}
    for label in ("clipping=gspo (2 iterations)", "clipping=cispo (2 iterations)"):
        assert runs[label].unset == ["method.epsilon"]
    assert runs["clipping=ppo (2 iterations)"].unset == []
    assert runs["advantage=spo (grpo_spo)"].recipe == "recipes/grpo_spo.yaml"


def test_rlvr_runs_cover_every_registered_variant():
    """The RL family's runs are the registries' entries, one axis at a time, plus PACS (no list in the script)."""
    from posttrain.families.rl.parts import ADVANTAGES, AGGREGATIONS, CLIPPINGS

    labels = {r.label for r in R.rlvr_runs(quick=False)}
    for key, registry in [("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS), ("clipping", CLIPPINGS)]:
        for entry in registry:
            assert any(label.startswith(f"{key}={entry.name}") for label in labels) or entry.name in ("group", "dapo")
    assert any("pacs" in label for label in labels)


@pytest.mark.slow
def test_unlearning_npo_rt_forgets_and_keeps_utility(tmp_path):
    """docs/unlearning.md: in 30 steps NPO+RT pushes the forget-set probability far down while model utility keeps
    most of its start value, with and without WAGLE."""
    runs = _runs("unlearning", ["npo_rt", "npo_rt+wagle"], "training.max_steps=30", "eval.steps=30",
                 "eval.max_samples=20")
    results = R.run_family("unlearning", [0], quick=True, runs=runs)
    _check_outputs("unlearning", results, tmp_path)
    for label in ("npo_rt", "npo_rt+wagle"):
        assert _final(results, label, "forget_prob") < 0.1 * _final(results, label, "forget_prob_before")
        assert _final(results, label, "utility") > 0.85 * _final(results, label, "utility_before")


def test_lora_variants_cost_and_training(tmp_path):
    """docs/lora_variants.md: every adapter variant trains; GOAT has the most trainable parameters (its routers), the
    others LoRA's."""
    from posttrain.adapters.spec import ADAPTER_VARIANTS

    labels = [r.label for r in R.lora_runs(quick=True)]
    assert len(labels) == len(ADAPTER_VARIANTS)
    runs = _runs("lora", labels, "training.max_steps=2", "eval.steps=null", "data.test=null")
    results = R.run_family("lora", [0], quick=True, runs=runs)
    _check_outputs("lora", results, tmp_path)
    params = {r["label"].split()[0]: r["trainable_params"] for r in results}
    assert params["plora"] == params["ggpo"] == params["lora"] < params["goat"]
    assert all(r["step_s"] > 0 for r in results)


def test_stable_spam_is_more_stable_than_adamw_at_a_high_learning_rate(tmp_path):
    """docs/results.md: at lr 1e-2, full SFT with Stable-SPAM ends at a lower loss than with AdamW."""
    runs = _runs("stable_spam", ["stable_spam", "adamw"], "training.max_steps=12", "data.test=null", panel="0.01")
    results = R.run_family("stable_spam", [0], quick=True, runs=runs)
    _check_outputs("stable_spam", results, tmp_path)
    assert _final(results, "stable_spam", "loss_last") < _final(results, "adamw", "loss_last")


def test_unlearning_npo_rt_lowers_forget_probability(tmp_path):
    """docs/unlearning.md, in a few steps: NPO+RT lowers the forget-set answer probability from the start."""
    runs = _runs("unlearning", ["npo_rt"], "training.max_steps=12", "eval.steps=12", "eval.max_samples=8")
    results = R.run_family("unlearning", [0], quick=True, runs=runs)
    _check_outputs("unlearning", results, tmp_path)
    assert _final(results, "npo_rt", "forget_prob") < _final(results, "npo_rt", "forget_prob_before") - 0.05


def test_compare_measures_each_metric_in_standard_deviations_over_seeds(tmp_path, capsys):
    def run(panel, label, seed, **final):
        return {"panel": panel, "label": label, "seed": seed, "final": {**final, "step_s": seed}}

    old = [run("a", "dpo", 0, acc=0.5, margin=1.0), run("a", "dpo", 1, acc=0.7, margin=1.0),
           run("a", "ipo", 0, acc=0.5)]
    new = [run("a", "dpo", 0, acc=0.9, margin=1.0), run("a", "dpo", 1, acc=0.7, margin=1.005),
           run("b", "dpo", 0, acc=0.5)]
    cells = {(c["setting"], c["method"], c["metric"]): c for c in R.compare_cells(old, new)}
    acc = cells[("a", "dpo", "acc")]  # means 0.6 -> 0.8; sample sd 0.1414 (old) and 0.1414 (new): 1.41 sd apart
    assert acc["old"] == pytest.approx(0.6) and acc["new"] == pytest.approx(0.8)
    assert acc["distance"] == pytest.approx(0.2 / statistics.stdev([0.5, 0.7]))
    # identical seeds: the gap is measured against 1 % of the metric's scale, not a zero sd
    assert cells[("a", "dpo", "margin")]["distance"] == pytest.approx(0.0025 / 0.01)
    assert ("a", "dpo", "step_s") not in cells  # step times follow the machine's load
    assert cells[("a", "ipo", "acc")]["only_in"] == "old" and cells[("b", "dpo", "acc")]["only_in"] == "new"
    report = R.compare_report("preference", list(cells.values()))
    assert report.splitlines()[0] == ("preference: 2 cells in both, 1 within 1 sd, 2 within 2 sd; 2 in one file only "
                                      "(a setting or method added, removed or renamed)")
    for folder, runs in (("old", old), ("new", new)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "preference.json").write_text(json.dumps({"meta": {}, "runs": runs}))
    assert R.main(["preference", "--out", str(tmp_path / "new"), "--compare", str(tmp_path / "old")]) == 0
    assert "  a | dpo | acc: 0.6 ± 0.14 -> 0.8 ± 0.14 (1.4 sd)" in capsys.readouterr().out


def test_run_family_reuses_the_runs_of_an_interrupted_invocation(tmp_path):
    """Every finished run goes to the checkpoint file; a rerun with the same file reuses it instead of training."""
    runs = _runs("stable_spam", ["adamw"], "training.max_steps=2", "data.test=null", panel="0.01")
    checkpoint = tmp_path / "stable_spam.partial.jsonl"
    first = R.run_family("stable_spam", [0], quick=True, runs=runs, checkpoint=checkpoint)
    assert len(checkpoint.read_text().splitlines()) == 1 and "reused" not in first[0]
    again = R.run_family("stable_spam", [0], quick=True, runs=runs, checkpoint=checkpoint)
    assert again[0]["reused"] and again[0]["log"] == first[0]["log"] and again[0]["seed"] == 0
    assert first[0]["cpu_s"] > 0


def test_all_recipes_progress_tables_the_done_recipes_and_names_those_left(tmp_path, capsys):
    """benchmarks/all_recipes.py --progress (docs/results.md "Every recipe"): reads the partial file, runs nothing."""
    import all_recipes

    out = tmp_path / "all.json"
    row = {"recipe": "recipes/dft.yaml", "exit_code": 0, "wall_s": 80.0, "cpu_s": 28.7, "steps": 100,
           "train_loss": 0.11, "accuracy_before": 0.51, "accuracy_after": 0.47}
    failed = {"recipe": "recipes/dpo.yaml", "exit_code": 0, "wall_s": 3.0, "cpu_s": 2.0, "error": "exit 0 without summary"}
    Path(f"{out}.partial.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(failed) + "\n")
    assert all_recipes.main(["--out", str(out), "--recipes", "dft", "dpo", "grpo", "--progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "| `recipes/dft.yaml` | 0 | 100 | 80 | 28.7 | 0.1100 | 51.0% | 47.0% |" in printed
    assert printed[-1] == "2 of 3 left: dpo, grpo"
    assert not out.exists()


def test_all_recipes_lr_probe_scales_each_recipes_lr_and_reuses_per_factor(tmp_path, monkeypatch, capsys):
    """benchmarks/all_recipes.py --lr-scales: one run per recipe and factor, at factor × the recipe's own lr (plus the
    --set overrides), scored by the family's metric; a rerun reuses the finished (recipe, factor) runs."""
    import all_recipes

    calls = []

    def fake_run(name, sets):
        calls.append((name, list(sets)))
        return {"recipe": f"recipes/{name}.yaml", "exit_code": 0, "wall_s": 1.0, "cpu_s": 1.0, "steps": 60,
                "train_loss": 0.5, "accuracy_before": 0.51, "accuracy_after": 0.4, "test_pref_accuracy": 0.6,
                "test_logp_margin": 0.25, "train_reward_margin": 0.1}

    monkeypatch.setattr(all_recipes, "probe_recipe", fake_run)
    monkeypatch.setattr(all_recipes, "start_metrics", lambda names: {n: {"test_pref_accuracy": 0.5} for n in names})
    out = tmp_path / "probe.json"
    argv = ["--recipes", "dpo", "--lr-scales", "1", "0.3", "--set", "method.beta=0.3", "--out", str(out)]
    assert all_recipes.main(argv) == 0
    lr = all_recipes.recipe_lr("dpo")
    assert calls == [("dpo", [f"training.learning_rate={lr}", "method.beta=0.3"]),
                     ("dpo", [f"training.learning_rate={float(f'{0.3 * lr:.3g}')}", "method.beta=0.3"])]
    rows = json.loads(out.read_text())["rows"]
    assert [r["lr_scale"] for r in rows] == [1.0, 0.3] and rows[1]["learning_rate"] == float(f"{0.3 * lr:.3g}")
    printed = capsys.readouterr().out
    row = f"| `recipes/dpo.yaml` | {0.3 * lr:.3g} (0.3×) | 60 | 1.0 | 40.0% | 0.600 | 0.25 | 0.100 |  | 0.5000 |"
    assert row in printed
    assert f"| `dpo` ({lr:.3g}) | 40% · 0.600 | 40% · 0.600 |" in printed  # the pivot: a column per factor
    # an interrupted probe: the finished factor is reused, the other one runs
    Path(f"{out}.partial.jsonl").write_text(json.dumps({**rows[0], "sets": ["method.beta=0.3"]}) + "\n")
    calls.clear()
    assert all_recipes.main(argv) == 0
    assert [c[1][0] for c in calls] == [f"training.learning_rate={float(f'{0.3 * lr:.3g}')}"]


def test_all_recipes_lr_probe_metrics_are_the_families_own():
    """The probe scores a preference recipe by the preference table's test-split accuracy (same pairs, same scorer)
    and an RL recipe by the expected exact-match reward on its own test problems; a multi-stage recipe by its last
    stage's method."""
    import all_recipes
    from preference_accuracy import build_sets, preference_accuracy

    from posttrain.data.sources import load_source
    from posttrain.eval.expected_reward import expected_exact_match
    from posttrain.loading import load_model_or_run
    from posttrain.models import load_tokenizer
    from posttrain.recipe import load_recipe

    assert [all_recipes.recipe_family(n) for n in ("dpo", "kto", "pre_dpo_simpo", "grpo_spo", "dft")] == [
        "preference", "unpaired", "preference", "rl", "sft"]
    model, tok = load_model_or_run("builtin:tiny-qwen2-arith").eval(), load_tokenizer("builtin:tiny-qwen2-arith")
    pref = all_recipes.model_metrics("preference", "dpo", model, tok)
    assert pref["test_pref_accuracy"] == preference_accuracy(model, tok, build_sets(256, 30)[2])
    rows = list(load_source(load_recipe(ROOT / "recipes" / "grpo.yaml").data.test, "data.test", "rl"))
    assert len(rows) == 100
    assert all_recipes.model_metrics("rl", "grpo", model, tok) == {
        "expected_reward": expected_exact_match(model, tok, rows, temperature=1.0)}
    assert all_recipes.model_metrics("sft", "dft", model, tok) == {}
