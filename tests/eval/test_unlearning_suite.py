"""The unlearning evaluations on a model: token statistics, the MUSE-style suite (``posttrain eval --suite
unlearning``), which data ``--suite tofu`` / ``--suite unlearning`` score (issue 31, item 1), the suite during
training and in the report, and lm-evaluation-harness (skipped without the ``lm-eval`` extra)."""

import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.data.facts import facts_rows

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _qa(rows):
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def _chat(rows):
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"].strip()}]} for r in rows]


@pytest.fixture()
def fake_run(tmp_path):
    """A run folder (the facts model's weights) whose recipe.yaml trained on the user's own forget/retain files."""
    from posttrain.models import builtin_model_dir

    run = tmp_path / "run"
    shutil.copytree(builtin_model_dir("tiny-qwen2-facts"), run, ignore=shutil.ignore_patterns("DONE"))
    forget = _jsonl(tmp_path / "my_forget.jsonl", _qa(facts_rows("forget05")[:5]))
    retain = _jsonl(tmp_path / "my_retain.jsonl", _qa(facts_rows("retain95")[:6]))
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"path": "builtin:tiny-qwen2-facts"}, "method": {"name": "npo_rt"},
        "data": {"forget": {"source": forget, "split": "train"}, "retain": {"source": retain, "split": "train"},
                 "chat_template": "none"}}))
    return run


# --------------------------------------------------------------------------------------------------------------------
# Token statistics
# --------------------------------------------------------------------------------------------------------------------


def test_stats_from_logits_hand_computed():
    from posttrain.eval.unlearning_suite import stats_from_logits

    logits = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]).log()
    logp, mu, var, match = stats_from_logits(logits, torch.tensor([1, 2]))
    np.testing.assert_allclose(logp.numpy(), [math.log(0.25), math.log(0.7)], atol=1e-6)
    assert mu[0].item() == pytest.approx(-1.5 * math.log(2), abs=1e-6)
    assert var[0].item() == pytest.approx((math.log(2) / 2) ** 2, abs=1e-6)
    assert match.tolist() == [False, True]


def test_token_stats_agree_with_the_answer_log_probabilities_used_everywhere():
    from posttrain.eval.unlearning_suite import token_stats
    from posttrain.logprobs import completion_logps
    from posttrain.models import load_model, load_tokenizer

    rows = _qa(facts_rows("forget05")[:3]) + _chat(facts_rows("retain95")[:2])
    model, tok = load_model("builtin:tiny-qwen2-facts"), load_tokenizer("builtin:tiny-qwen2-facts")
    stats = token_stats(model, tok, rows, batch_size=2)
    sums, counts = completion_logps(model, tok, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    for s, total, n, row in zip(stats, sums, counts, rows):
        assert len(s.logp) == n and float(s.logp.sum()) == pytest.approx(total, abs=1e-3)
        assert len(s.token_logp) == n - 1 and np.array_equal(s.token_logp, s.logp[:-1])  # the EOS left out
        assert np.all(s.var > 0) and np.all(s.mu <= 0)
    assert stats[0].text == facts_rows("forget05")[0]["completion"]  # the scored text, EOS dropped
    assert all(s.match.all() for s in stats[:3])  # the facts model knows its answers token by token


# --------------------------------------------------------------------------------------------------------------------
# Which data the suites score (issue 31, item 1: never a silent fallback to a built-in split)
# --------------------------------------------------------------------------------------------------------------------


def test_resolution_order_of_the_evaluation_data(tmp_path, fake_run):
    from posttrain.errors import UserError
    from posttrain.eval.unlearning_data import parse_source, resolve_sources

    run = resolve_sources("unlearning", model=str(fake_run))
    assert run["forget"].source.source.endswith("my_forget.jsonl") and run["forget"].origin == "the run's data.forget"
    assert run["retain_qa"].source.source.endswith("my_retain.jsonl")  # the retain rows are the retain questions
    assert run["verbmem"].source is run["forget"].source and "holdout" not in run  # no holdout: said in the output
    # a command-line forget set replaces the run's, and the run's retain set no longer belongs to it
    other = parse_source("{source: builtin:facts, split: forget10}", "--forget")
    res = resolve_sources("tofu", model=str(fake_run), cli={"forget": other})
    assert [res[r].source.split for r in ("forget", "retain", "holdout", "wf")] == ["forget10", "retain90",
                                                                                    "holdout10", "world"]
    assert res["forget"].origin == "--forget" and res["retain"].origin == "the builtin:facts split matching forget10"
    # a built-in model names the task it was trained on; --forget-split picks another split of it
    assert resolve_sources("tofu", model="builtin:tiny-qwen2-facts-retain90")["forget"].source.split == "forget10"
    assert resolve_sources("tofu", model="builtin:tiny-qwen2-facts", forget_split="forget01")["holdout"].source.split \
        == "holdout01"
    news = resolve_sources("unlearning", model=None, cli={"forget": parse_source("builtin:news", "--forget")},
                           forget_split="forget")
    assert {r: s.source.split for r, s in news.items()} == {
        "forget": "forget", "holdout": "holdout", "verbmem": "forget_verbmem", "forget_qa": "forget_qa",
        "retain_qa": "retain_qa"}
    with pytest.raises(UserError, match="--forget: nothing to evaluate"):
        resolve_sources("tofu", model=str(tmp_path))
    with pytest.raises(UserError, match="--forget.split: Input should be a valid string"):
        parse_source("{source: a.jsonl, split: [1]}", "--forget")
    with pytest.raises(UserError, match="--forget-split: sets the split of a built-in forget source"):
        resolve_sources("tofu", model=str(fake_run), forget_split="forget05")


def test_suite_tofu_scores_the_runs_own_forget_and_retain_data(fake_run, capsys):
    """Failed on 895e596: a run trained on its own forget file was scored on builtin:facts forget05 (20 rows)."""
    assert main(["eval", str(fake_run), "--suite", "tofu", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((fake_run / "unlearning_eval.json").read_text())
    assert res["n"] == {"forget": 5, "retain": 6}
    assert "my_forget.jsonl" in res["data"]["forget"] and "the run's data.forget" in res["data"]["forget"]
    assert "my_forget.jsonl" in printed and "my_retain.jsonl" in printed
    assert res["forget_Q_A_Prob"] > 0.9 and res["model_utility"] is None  # no world facts: said in the table
    assert "needs the retain and world-facts sets" in printed


def test_suite_tofu_data_flag_is_the_forget_set_and_no_data_is_refused(tmp_path, capsys):
    """Failed on 895e596: --data was silently ignored with --suite tofu, and a model with no run data fell back to
    forget05."""
    data = _jsonl(tmp_path / "f.jsonl", _qa(facts_rows("forget05")[:3]))
    out = tmp_path / "r.json"
    assert main(["eval", "builtin:tiny-qwen2-facts", "--suite", "tofu", "--data", data, "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == {"forget": 3} and "f.jsonl" in res["data"]["forget"]
    capsys.readouterr()
    assert main(["eval", "builtin:tiny-qwen2", "--suite", "tofu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --forget: nothing to evaluate: MODEL is not a run folder")
    assert main(["eval", "builtin:tiny-qwen2", "--suite", "unlearning"]) == 2
    assert main(["eval", "builtin:tiny-qwen2", "--forget", data]) == 2  # the accuracy suite takes no forget set
    assert "error: --forget: not used by --suite accuracy" in capsys.readouterr().err


def test_suite_unlearning_on_a_conversational_forget_set(tmp_path, capsys):
    """The MUSE-style suite on the user's own conversational files: every metric, in range, with its data named."""
    forget = _jsonl(tmp_path / "forget.jsonl", _chat(facts_rows("forget05")[:6]))
    holdout = _jsonl(tmp_path / "holdout.jsonl", _chat(facts_rows("holdout05")[:6]))
    retain = _jsonl(tmp_path / "retain.jsonl", _chat(facts_rows("retain95")[:6]))
    out = tmp_path / "suite.json"
    assert main(["eval", "builtin:tiny-qwen2-facts", "--suite", "unlearning", "--forget", forget, "--holdout", holdout,
                 "--retain", retain, "--max-new-tokens", "12", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    m = res["metrics"]
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "verbmem_f", "extraction_strength",
                 "exact_memorization", "knowmem_f", "knowmem_r"):
        assert 0.0 <= m[name] <= 1.0, name
        assert name in printed and res["about"][name]["better"]
    assert m["privleak"] == pytest.approx((1 - m["mia_min_k"] - 0.5) / 0.5 * 100, abs=1e-6)
    assert "no retain model" in res["privleak_reference"] and "0.5 (no retain model" in printed
    assert "mia_reference" in res["skipped"] and "mia_reference: not computed" in printed
    assert res["samples"]["forget_qa"][0]["prompt"][0]["role"] == "user"  # conversational rows, chat template
    assert "forget.jsonl (6 rows; --forget)" in res["data"]["forget"]
    assert "retain.jsonl" in res["data"]["retain_qa"] and "the retain set (--retain)" in res["data"]["retain_qa"]


def test_suite_unlearning_against_the_retain_model_and_its_saved_json(tmp_path, capsys):
    """On builtin:facts the memorised model's forget rows are told apart from the holdout rows (AUC 1) and it
    reproduces them; the retain model (never trained on them) is the reference of every value, and its JSON can
    stand in for it later."""
    retain_json = tmp_path / "retain.json"
    assert main(["eval", "builtin:tiny-qwen2-facts-retain95", "--suite", "unlearning", "--max-samples", "8",
                 "--max-new-tokens", "16", "--output", str(retain_json)]) == 0
    out = tmp_path / "start.json"
    assert main(["eval", "builtin:tiny-qwen2-facts", "--suite", "unlearning", "--max-samples", "8",
                 "--max-new-tokens", "16", "--retain-model", str(retain_json), "--output", str(out)]) == 0
    res, retain = json.loads(out.read_text()), json.loads(retain_json.read_text())["metrics"]
    m = res["metrics"]
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
        assert m[name] == 1.0 and retain[name] < 0.9, (name, retain[name])
    for name in ("verbmem_f", "knowmem_f", "extraction_strength", "exact_memorization"):
        assert m[name] > 0.95 and retain[name] < 0.7, (name, retain[name])
    assert m["knowmem_r"] > 0.95 and retain["knowmem_r"] > 0.95  # both were trained on the retain set
    assert res["retain_model_metrics"] == {k: v for k, v in retain.items() if k != "privleak"}
    assert m["privleak"] == pytest.approx(-100.0) and res["privleak_reference_auc"] == retain["mia_min_k"]
    assert "mia_reference" in res["skipped"]  # a saved JSON is not a reference model
    capsys.readouterr()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(retain_json.read_text()), "data": {"forget": "x.jsonl (1 rows)"}}))
    assert main(["eval", "builtin:tiny-qwen2-facts", "--suite", "unlearning", "--retain-model", str(other)]) == 2
    assert "was evaluated on forget 'x.jsonl'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# During training, and in the report
# --------------------------------------------------------------------------------------------------------------------


def test_suite_during_training_matches_the_command_and_is_drawn(tmp_path):
    from posttrain.eval.unlearning_suite import evaluate_suite
    from posttrain.models import load_model, load_tokenizer
    from posttrain.report import write_report

    recipe = {
        "model": "builtin:tiny-qwen2-facts",
        "data": {"forget": {"source": "builtin:facts", "split": "forget05"},
                 "retain": {"source": "builtin:facts", "split": "retain95", "max_samples": 16}},
        "method": {"name": "npo_rt"},
        "training": {"max_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                     "save_strategy": "no", "disable_tqdm": True},
        "eval": {"steps": 2, "max_samples": 6, "suites": ["unlearning"], "max_new_tokens": 12},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_mia_loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and not any("eval_model_utility" in r for r in rows)
    from posttrain.eval.unlearning_data import load_rows, resolve_sources
    from posttrain.recipe import load_recipe

    run_recipe = load_recipe(tmp_path / "run" / "recipe.yaml")
    sets = load_rows(resolve_sources("unlearning", recipe_data={"forget": run_recipe.data.forget,
                                                                "retain": run_recipe.data.retain}), 6)
    res = evaluate_suite(load_model(str(tmp_path / "run")), load_tokenizer(str(tmp_path / "run")), sets,
                         verbmem_max_new_tokens=12, knowmem_max_new_tokens=12)
    for key, value in res["metrics"].items():
        assert math.isclose(evals[-1][f"eval_{key}"], value, rel_tol=1e-5, abs_tol=1e-9), key
    # one run: the memorisation curves and forget vs utility; two runs overlaid: the trade-off of each
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    page = write_report([tmp_path / "run", tmp_path / "run2"], tmp_path / "both.html").read_text()
    for signal in ("mia", "privleak", "memorisation", "extraction", "forget_utility", "forget_utility_scatter"):
        assert f'data-signal="{signal}"' in page, signal
    scatter = page.split('data-signal="forget_utility_scatter"')[1].split(">")[0]
    assert "eval_knowmem_f eval_knowmem_r" in scatter and "run2" in page


def test_holdout_is_an_unlearning_data_key_read_by_evaluation_only(tmp_path):
    from posttrain.errors import UserError
    from posttrain.recipe import parse_recipe

    holdout = _jsonl(tmp_path / "h.jsonl", _qa(facts_rows("holdout05")[:2]))
    base = {"model": "builtin:tiny-qwen2-facts", "method": {"name": "ga"},
            "data": {"forget": {"source": "builtin:facts", "split": "forget05"}, "holdout": holdout}}
    assert parse_recipe(base).data.holdout.source == holdout
    with pytest.raises(UserError, match="data.holdout: method 'sft'"):
        parse_recipe({"model": "builtin:tiny-qwen2", "method": {"name": "sft"},
                      "data": {"train": "builtin:arithmetic-sft", "holdout": holdout}})
    with pytest.raises(UserError, match="eval.suites"):
        parse_recipe({**base, "eval": {"steps": 2, "suites": ["muse"]}})


# --------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness (the lm-eval extra)
# --------------------------------------------------------------------------------------------------------------------


def test_lm_eval_summary_keeps_headline_metrics_and_says_which_way_is_better():
    from posttrain.eval.lm_eval import better, parse_tasks, summarise

    results = {"results": {"wmdp_bio": {"acc,none": 0.31, "acc_stderr,none": 0.01, "alias": "wmdp_bio"},
                           "mmlu_anatomy": {"acc,none": 0.4}},
               "groups": {"mmlu": {"acc,none": 0.52, "acc_stderr,none": 0.004}}}
    assert summarise(results, ["mmlu", "wmdp_bio"]) == {"lm_eval/mmlu/acc": 0.52, "lm_eval/wmdp_bio/acc": 0.31}
    assert better("wmdp_cyber").startswith("lower") and better("mmlu") == "higher"
    assert parse_tasks(" mmlu, wmdp_bio ,") == ["mmlu", "wmdp_bio"]


def test_lm_eval_without_the_extra_is_one_error_line(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["eval", "builtin:tiny-qwen2", "--lm-eval", "mmlu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --lm-eval: lm-evaluation-harness is not installed; pip install -e '.[lm-eval]' (or pip "
                   "install lm-eval)"]


@pytest.mark.skipif(not HAS_LM_EVAL, reason="needs the lm-eval extra (pip install -e '.[lm-eval]')")
def test_lm_eval_runs_the_shipped_local_task_offline(tmp_path, capsys):
    """posttrain_world_facts (shipped, no download): the facts model was trained on the world facts (measured 1.0);
    a random model is at chance (0.25 on these 24 questions)."""
    out = tmp_path / "lm.json"
    assert main(["eval", "builtin:tiny-qwen2-facts", "--lm-eval", "posttrain_world_facts", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["lm_eval"] == {"lm_eval/posttrain_world_facts/acc": 1.0}
    assert "better: higher" in capsys.readouterr().out


def test_news_multiple_choice_rows():
    """posttrain_news_retain's rows: every retain question once, its true answer among three different answers to
    the same kind of question, the same rows on every call."""
    from posttrain.data.news import news_rows
    from posttrain.eval.lm_eval_tasks.news_mc import multiple_choice

    questions = news_rows("retain_qa")
    rows = multiple_choice()
    assert rows == multiple_choice() and len(rows) == len(questions) == 360
    first = rows[0]
    assert first["question"] == questions[0]["prompt"] and first["question"].startswith("Question: Which instrument")
    assert first["choices"][first["answer"]] == questions[0]["completion"]
    for row, question in zip(rows, questions, strict=True):
        assert row["choices"][row["answer"]] == question["completion"] and len(set(row["choices"])) == 4
        shape = question["completion"].split()[0]  # " The harp." / " About 412." / " Tessaly." / " Name Surname."
        if shape in ("The", "About"):
            assert all(c.split()[0] == shape for c in row["choices"])
    assert {r["answer"] for r in rows} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="num_choices"):
        multiple_choice(num_choices=20)  # 8 instruments


@pytest.mark.skipif(not HAS_LM_EVAL, reason="needs the lm-eval extra (pip install -e '.[lm-eval]')")
def test_lm_eval_news_task_offline(tmp_path):
    """posttrain_news_retain (shipped, no download): the news model knows the retain articles (measured 1.0); the
    random-init model is near chance (measured 0.256 on the 360 questions)."""
    scores = {}
    for model in ("builtin:tiny-qwen2-news", "builtin:tiny-qwen2"):
        out = tmp_path / "lm.json"
        assert main(["eval", model, "--lm-eval", "posttrain_news_retain", "--output", str(out)]) == 0
        scores[model] = json.loads(out.read_text())["lm_eval"]["lm_eval/posttrain_news_retain/acc"]
    assert scores["builtin:tiny-qwen2-news"] == 1.0
    assert 0.15 < scores["builtin:tiny-qwen2"] < 0.35


def test_suite_warns_when_generations_are_empty(tmp_path, monkeypatch, capsys):
    import posttrain.eval.accuracy as accuracy

    monkeypatch.setattr(accuracy, "greedy_completions", lambda model, tok, prompts, **kw: ["" for _ in prompts])
    out = tmp_path / "suite.json"
    assert main(["eval", "builtin:tiny-qwen2-facts", "--suite", "unlearning", "--max-samples", "2",
                 "--output", str(out)]) == 0
    assert "warning: forget_qa: 2 of 2 greedy generations are empty" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert len(res["warnings"]) == 3 and "knowmem_r is near 0" in res["warnings"][-1]
    assert res["metrics"]["verbmem_f"] == 0.0 and res["metrics"]["exact_memorization"] == 1.0  # teacher forcing
