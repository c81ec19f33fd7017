"""Seeing a run: report.html per family and overlaid, evaluation during training, trackers, the model card.

One short run per family (4 steps, tiny models, evaluation every 2 steps) is shared by the module's tests.
"""

import base64
import importlib.util
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
TEST = {"source": "builtin:arithmetic-rl", "split": "test", "max_samples": 8, "options": {"max_operand": 30}}
COMMON_TRAINING = {"max_steps": 4, "logging_steps": 1, "save_steps": 2, "disable_tqdm": True}
EVAL_STEPS = [0, 2, 4]

RECIPES = {
    "sft": {
        "model": "builtin:tiny-qwen2-arith",
        "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 64, "max_operand": 30}},
                 "eval": {"source": "builtin:arithmetic-sft", "split": "test", "max_samples": 8},
                 "test": TEST},
        "method": {"name": "sft"},
        "training": {**COMMON_TRAINING, "per_device_train_batch_size": 8, "learning_rate": 1.0e-3,
                     **({"report_to": "tensorboard"} if HAS_TENSORBOARD else {})},
        "eval": {"steps": 2},
    },
    "preference": {
        "model": "builtin:tiny-qwen2-arith",
        "data": {"train": {"source": "builtin:arithmetic-pref", "options": {"num_samples": 64, "max_operand": 30}},
                 "eval": {"source": "builtin:arithmetic-pref", "split": "test", "max_samples": 8,
                          "options": {"max_operand": 30}},
                 "test": TEST},
        "method": {"name": "dpo", "beta": 0.1},
        "training": {**COMMON_TRAINING, "per_device_train_batch_size": 8, "learning_rate": 5.0e-4},
        "eval": {"steps": 2},
    },
    "rl": {  # every RL diagnostic at once: stratified advantages, ΔL aggregation, GPPO clipping, a KL term
        "model": "builtin:tiny-qwen2-arith",
        "data": {"train": {"source": "builtin:arithmetic-rl", "options": {"num_samples": 64, "max_operand": 30}},
                 "test": TEST},
        "method": {"name": "grpo", "rewards": [{"name": "exact_match", "weight": 1.0}], "advantage": "stratified",
                   "stratum_key": "posttrain.rl.strata:completion_length", "aggregation": "delta_l",
                   "clipping": "gppo", "beta": 0.01},
        "training": {**COMMON_TRAINING, "per_device_train_batch_size": 8, "num_generations": 4,
                     "max_completion_length": 8, "learning_rate": 1.0e-4},
        "eval": {"steps": 2},  # pass@k defaults to [1, 4] for RL
    },
    "unlearning": {  # the starting model doubles as the retain model: forget_quality is 1 at step 0
        "model": "builtin:tiny-qwen2-facts",
        "data": {"forget": {"source": "builtin:facts", "split": "forget05"},
                 "retain": {"source": "builtin:facts", "split": "retain95", "max_samples": 32}},
        "method": {"name": "npo_rt"},
        "training": {**COMMON_TRAINING, "per_device_train_batch_size": 4, "learning_rate": 3.0e-4},
        "eval": {"steps": 2, "max_samples": 8, "retain_model": "builtin:tiny-qwen2-facts"},
    },
}

EXPECTED_SIGNALS = {
    "sft": {"loss", "learning_rate", "grad_norm", "eval_loss", "test_accuracy", "token_accuracy", "entropy"},
    "preference": {"loss", "learning_rate", "grad_norm", "eval_loss", "test_accuracy", "reward_margins",
                   "reward_accuracies", "rewards", "logps"},
    "rl": {"loss", "learning_rate", "grad_norm", "test_accuracy", "pass_at_k", "reward", "reward_std",
           "completion_length", "clip_ratio", "kl", "stratified", "delta_l", "advantages"},
    "unlearning": {"loss", "learning_rate", "grad_norm", "answer_prob", "qa_prob", "truth_ratio", "rouge",
                   "model_utility", "forget_quality", "unlearning_terms"},
}
PERIODIC_METRICS = {
    "sft": ["eval_test_accuracy"],
    "preference": ["eval_test_accuracy"],
    "rl": ["eval_test_accuracy", "eval_test_pass@1", "eval_test_pass@4", "eval_test_mean_sample_accuracy"],
    "unlearning": ["eval_forget_Q_A_Prob", "eval_retain_Q_A_Prob", "eval_forget_Q_A_ROUGE", "eval_forget_truth_ratio",
                   "eval_model_utility", "eval_forget_quality"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family -> finished run folder (run through the CLI, in this process)."""
    root = tmp_path_factory.mktemp("observability")
    out = {}
    for family, recipe in RECIPES.items():
        path = root / f"{family}.yaml"
        path.write_text(yaml.safe_dump({**recipe, "output_dir": str(root / family), "seed": 0}))
        assert main(["train", str(path)]) == 0
        out[family] = root / family
    return out


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _Page(HTMLParser):
    """The figures, images and external references of a report page."""

    def __init__(self):
        super().__init__()
        self.figures, self.images, self.external, self.tables = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figures.append(a)
        if tag == "img":
            self.images.append(a)
        if tag == "table":
            self.tables.append(a.get("id"))
        if tag in ("script", "link", "iframe") or (tag != "a" and any(k in a for k in ("src", "href"))
                                                      and not (a.get("src") or "").startswith("data:")):
            self.external.append((tag, a))
        if tag == "a" and not (a.get("href") or "").startswith("#"):
            self.external.append((tag, a))


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


# ------------------------------------------------------------------------------------------------------------------
# report.html
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(RECIPES))
def test_every_run_writes_a_self_contained_report_with_its_family_signals(runs, family):
    run_dir = runs[family]
    report = run_dir / "report.html"
    assert report.is_file()
    page = _page(report)
    assert page.external == []  # one file: no scripts, stylesheets or links to fetch
    assert page.images and all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    for img in page.images:
        assert base64.b64decode(img["src"].split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    signals = [f["data-signal"] for f in page.figures]
    assert len(signals) == len(set(signals)) == len(page.images)
    assert EXPECTED_SIGNALS[family] <= set(signals), EXPECTED_SIGNALS[family] - set(signals)
    # a plot only for logged data, and each plot's metrics were logged by this run
    logged = {k for row in _rows(run_dir) for k in row} | {"summary/test_accuracy"}
    for fig in page.figures:
        assert set(fig["data-metrics"].split()) <= logged, fig
    # the PNGs next to the page, one per plot
    assert sorted(p.stem for p in (run_dir / "report_plots").glob("*.png")) == sorted(signals)
    assert {"runs-table", "summary-table", "recipe-table"} <= set(page.tables)
    assert RECIPES[family]["method"]["name"] in report.read_text()


def test_signals_without_data_are_not_drawn(runs):
    sft = {f["data-signal"] for f in _page(runs["sft"] / "report.html").figures}
    assert not sft & {"reward_margins", "pass_at_k", "reward", "forget_quality", "qa_prob"}
    rl = {f["data-signal"] for f in _page(runs["rl"] / "report.html").figures}
    assert not rl & {"eval_loss", "reward_margins", "qa_prob"}  # the RL recipe has no data.eval


def test_signal_table_claims_each_metric_once_and_groups_the_rest():
    from posttrain.report import assign_metrics

    names = {"loss", "eval_loss", "rewards/exact_match/mean", "reward", "rewards/margins", "my_reward/x",
             "eval_my_reward/y", "eval_test_pass@8"}
    groups = {s.id: m for s, m in assign_metrics(names)}
    assert groups["loss"] == ["loss"] and groups["eval_loss"] == ["eval_loss"]
    assert groups["reward"] == ["reward", "rewards/exact_match/mean"]
    assert groups["reward_margins"] == ["rewards/margins"]
    assert groups["pass_at_k"] == ["eval_test_pass@8"]
    assert groups["other_my_reward"] == ["eval_my_reward/y", "my_reward/x"]
    claimed = [m for ms in groups.values() for m in ms]
    assert sorted(claimed) == sorted(names)
    assert "grad_norm" not in groups and "forget_quality" not in groups


def test_report_overlays_several_runs_on_the_same_axes(runs, tmp_path, capsys):
    from posttrain.report import SIGNALS, draw, load_run

    a, b = load_run(runs["sft"]), load_run(runs["preference"])
    signal = next(s for s in SIGNALS if s.id == "loss")
    fig, labels = draw(signal, ["loss"], [a, b])
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sft", "preference"]
    lines = ax.get_lines()
    assert len(lines) == 2 and lines[0].get_color() != lines[1].get_color()
    assert list(lines[0].get_xdata()) == [1, 2, 3, 4] and list(lines[1].get_xdata()) == [1, 2, 3, 4]
    # through the command line: one page, both runs in each shared plot's legend, differing recipe rows marked
    out = tmp_path / "compare.html"
    assert main(["report", str(runs["sft"]), str(runs["preference"]), "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = _page(out)
    figures = {f["data-signal"]: f for f in page.figures}
    for sid in ("loss", "learning_rate", "grad_norm", "eval_loss", "test_accuracy"):
        labels = json.loads(figures[sid]["data-labels"])
        assert any(lab.startswith("sft") for lab in labels) and any(lab.startswith("preference") for lab in labels)
    assert {"reward_margins", "token_accuracy"} <= set(figures)  # each run's own signals too
    assert re.search(r'<tr class="diff"><th>method\.name</th><td>sft</td><td>dpo</td></tr>', out.read_text())
    assert (tmp_path / "compare_plots" / "loss.png").is_file()


def test_runs_with_the_same_folder_name_get_distinct_names(tmp_path):
    from posttrain.report import _unique_names

    assert _unique_names([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]
    assert _unique_names([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: run directory not found"
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2}\n')
    assert main(["report", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'run' / 'metrics.jsonl'}:2: not a JSON object"


def test_report_false_skips_the_page(tmp_path):
    from posttrain.recipe import parse_recipe
    from posttrain.train import write_report

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    recipe = dict(RECIPES["sft"], output_dir=str(tmp_path), report=False)
    assert write_report(parse_recipe(recipe)) is None and not (tmp_path / "report.html").exists()
    assert write_report(parse_recipe(dict(recipe, report=True))) == tmp_path / "report.html"


# ------------------------------------------------------------------------------------------------------------------
# Evaluation during training
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(RECIPES))
def test_periodic_evaluation_is_logged_at_the_expected_steps(runs, family):
    rows = _rows(runs[family])
    for name in PERIODIC_METRICS[family]:
        steps = [r["step"] for r in rows if name in r]
        assert steps == EVAL_STEPS, (name, steps)
        assert all(0.0 <= r[name] <= 1.0 for r in rows if name in r)
    # the training rows are still logged at every step (an evaluation row does not swallow them)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert "grad_norm" in next(r for r in rows if r["step"] == 2 and "loss" in r)


def test_periodic_test_accuracy_is_the_greedy_accuracy_of_the_model_at_that_step(runs):
    from posttrain.data.sources import load_source
    from posttrain.eval.accuracy import greedy_accuracy
    from posttrain.models import load_model, load_tokenizer
    from posttrain.recipe import DataSource

    rows = {r["step"]: r["eval_test_accuracy"] for r in _rows(runs["sft"]) if "eval_test_accuracy" in r}
    test = load_source(DataSource(**TEST), "data.test", "test")
    for step, model_path in ((0, "builtin:tiny-qwen2-arith"), (2, runs["sft"] / "checkpoint-2"),
                             (4, runs["sft"])):
        model = load_model(str(model_path))
        assert rows[step] == greedy_accuracy(model, load_tokenizer(str(runs["sft"])), test)
    summary = json.loads((runs["sft"] / "summary.json").read_text())
    assert summary["accuracy_after"] == rows[4]  # the same 8 rows: the before/after lines are kept


def test_periodic_unlearning_metrics_match_the_tofu_suite_on_the_final_model(runs):
    from posttrain.eval.unlearning import evaluate_unlearning
    from posttrain.models import load_model, load_tokenizer

    rows = [r for r in _rows(runs["unlearning"]) if "eval_model_utility" in r]
    assert rows[0]["eval_forget_quality"] == 1.0  # step 0: the policy is the retain model
    assert rows[-1]["eval_forget_quality"] <= 1.0
    model = load_model(str(runs["unlearning"]))
    res = evaluate_unlearning(model, load_tokenizer(str(runs["unlearning"])), forget_split="forget05", max_samples=8)
    for key in ("forget_Q_A_Prob", "retain_Q_A_Prob", "holdout_Q_A_ROUGE", "forget_truth_ratio", "wf_Truth_Ratio",
                "model_utility"):
        assert math.isclose(rows[-1][f"eval_{key}"], res[key], rel_tol=1e-5, abs_tol=1e-9), key
    # the forget set is being unlearned: its answer probability falls
    assert rows[-1]["eval_forget_Q_A_Prob"] < rows[0]["eval_forget_Q_A_Prob"]


def test_evaluation_during_training_does_not_change_the_training(runs, tmp_path):
    """The RL run samples pass@k at steps 0 and 2; the same recipe without evaluation trains identically (its first
    two steps: the learning-rate schedule of a 2-step run differs after the first update)."""
    recipe = {**RECIPES["rl"], "training": {**RECIPES["rl"]["training"], "max_steps": 2}, "eval": {},
              "report": False, "output_dir": str(tmp_path / "plain"), "seed": 0}
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    plain = [r for r in _rows(tmp_path / "plain") if "loss" in r]
    with_eval = [r for r in _rows(runs["rl"]) if "loss" in r][:2]
    for key in ("loss", "grad_norm", "reward", "reward_std", "completions/mean_length", "kl"):
        assert [r[key] for r in plain] == [r[key] for r in with_eval], key


def test_a_resumed_run_evaluates_once_per_step_and_exactly_as_the_uninterrupted_one(runs, tmp_path):
    import shutil

    copy = tmp_path / "sft"
    # without its last checkpoint and its completion marker: a run killed after checkpoint-2 (a finished run would
    # not be trained again by --resume)
    top = Path(runs["sft"])  # only the top-level marker: each checkpoint keeps its own (same name)
    shutil.copytree(top, copy, ignore=lambda folder, names: [
        n for n in names if Path(folder) == top and n in ("checkpoint-4", "runs", "POSTTRAIN_COMPLETE")])
    assert main(["train", str(copy / "recipe.yaml"), "--resume", "--output-dir", str(copy)]) == 0
    rows = _rows(copy)
    assert [r["step"] for r in rows if "eval_test_accuracy" in r] == EVAL_STEPS
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]

    def trace(run_rows):  # evaluation and training rows, in order; losses compared with a relative tolerance
        return [(r["step"], r.get("eval_test_accuracy"), r.get("loss")) for r in run_rows
                if "eval_test_accuracy" in r or "loss" in r]

    resumed, original = trace(rows), trace(_rows(runs["sft"]))
    assert [(s, a) for s, a, _ in resumed] == [(s, a) for s, a, _ in original]
    assert [x for *_, x in resumed if x is not None] == pytest.approx([x for *_, x in original if x is not None],
                                                                  rel=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"train": RECIPES["sft"]["data"]["train"]}},
         "eval.steps: nothing to evaluate during training; set data.test (prompt + answer rows)"),
        ({"eval": {"steps": 2, "pass_k": [8], "num_samples": 4}},
         "eval.pass_k: k=8 is larger than eval.num_samples=4"),
        ({"eval": {"steps": 2, "pass_k": [0]}}, "eval.pass_k: every k must be >= 1, got [0]"),
        ({"eval": {"steps": 2, "retain_model": "builtin:tiny-qwen2"}},
         "eval.retain_model: only unlearning methods use a retain model (for forget_quality)"),
        ({"eval": {"steps": 0}}, "eval.steps: Input should be greater than or equal to 1 (got 0)"),
        ({"eval": {"step": 2}}, "eval.step: unknown key (did you mean 'steps'?)"),
    ],
)
def test_eval_block_errors_name_the_key(change, message):
    from posttrain.errors import UserError
    from posttrain.recipe import parse_recipe

    with pytest.raises(UserError) as err:
        parse_recipe({**RECIPES["sft"], **change})
    assert str(err.value) == message


def test_eval_defaults_are_resolved_per_family():
    from posttrain.recipe import parse_recipe

    assert parse_recipe(RECIPES["rl"]).resolved()["eval"]["pass_k"] == [1, 4]
    assert parse_recipe(RECIPES["sft"]).resolved()["eval"]["pass_k"] == []
    assert parse_recipe(RECIPES["sft"]).resolved()["report"] is True


# ------------------------------------------------------------------------------------------------------------------
# Trackers
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed (pip install 'posttrain[tensorboard]')")
def test_tensorboard_receives_training_and_periodic_metrics(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((runs["sft"] / "runs").glob("*/events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/test_accuracy"} <= tags
    assert [e.step for e in acc.Scalars("eval/test_accuracy")] == EVAL_STEPS
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    logged = [r["loss"] for r in _rows(runs["sft"]) if "loss" in r]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(logged, rel=1e-6)
    assert (runs["sft"] / "metrics.jsonl").is_file()  # written in any case


def test_a_tracker_that_is_not_installed_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**RECIPES["sft"], "output_dir": str(tmp_path / "out")}))
    assert main(["train", str(path), "--set", "training.report_to=[wandb]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: training.report_to: wandb is not installed (pip install 'posttrain[wandb]', "
                   "or pip install wandb)")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_report_to_defaults_to_none_and_passes_through():
    from transformers import TrainingArguments

    from posttrain.recipe import parse_recipe
    from posttrain.train import training_config

    recipe = parse_recipe({**RECIPES["sft"], "training": {"max_steps": 1}})
    assert training_config(TrainingArguments, recipe).report_to == []
    recipe = parse_recipe({**RECIPES["sft"], "training": {"max_steps": 1, "report_to": "tensorboard"}})
    assert training_config(TrainingArguments, recipe).report_to == ["tensorboard"]


# ------------------------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(RECIPES))
def test_model_card_names_model_method_paper_data_hyperparameters_metrics_and_command(runs, family):
    from posttrain.methods import get_method

    recipe = RECIPES[family]
    info = get_method(recipe["method"]["name"])
    card = (runs[family] / "README.md").read_text()
    assert "[None]" not in card and "fine-tuned version of" not in card  # not TRL's card
    assert card.startswith("---\n") and f"- {info.name}\n" in card
    assert f"`{recipe['model']}`" in card
    assert info.paper in card
    for key, src in recipe["data"].items():
        assert re.search(rf"\| data\.{key} \| `{re.escape(src['source'])}` \| {src.get('split', 'train')} \|", card)
    assert re.search(rf"\| training\.learning_rate \| {recipe['training']['learning_rate']:.4g} \|", card)
    assert "| method.name | `" + info.name + "` |" in card
    summary = json.loads((runs[family] / "summary.json").read_text())
    assert f"| train_loss | {summary['train_loss']:.4g} |" in card
    assert f"| steps | {summary['steps']} |" in card
    assert "posttrain train recipe.yaml --output-dir" in card
    assert re.search(r"posttrain train \S+/" + family + r"\.yaml", card)  # the command that ran it
    # every checkpoint carries the card as of its step
    ckpt = (runs[family] / "checkpoint-2" / "README.md").read_text()
    assert "checkpoint at step 2" in ckpt and info.paper in ckpt


def test_model_card_shows_the_last_logged_metrics(runs):
    card = (runs["rl"] / "README.md").read_text()
    last = {}
    for row in _rows(runs["rl"]):
        last.update({k: (row["step"], v) for k, v in row.items()})
    for key in ("loss", "reward", "eval_test_accuracy", "eval_test_pass@4"):
        step, value = last[key]
        assert f"| {key} | {step} | {value:.4g} |" in card


RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPE_DIR.glob("*.yaml")))
def test_the_resolved_recipe_reproduces_the_run(name):
    """The card's reproduce command reads the saved recipe.yaml: every recipe's resolved form loads again as the same
    recipe (defaults of parts a GRPO recipe does not use are left out, since the method refuses them when given)."""
    from posttrain.recipe import load_recipe, parse_recipe

    recipe = load_recipe(RECIPE_DIR / name)
    if recipe.data.test is not None:  # an eval block evaluates data.test
        recipe = load_recipe(RECIPE_DIR / name, ["eval.max_samples=4"])
    again = parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.resolved(), sort_keys=False)))
    assert again.resolved() == recipe.resolved()
    assert again.params == recipe.params and again.eval == recipe.eval
