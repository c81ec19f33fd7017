"""Built-in rewards score only the model's final answer (docs/rlvr.md "Which answer is scored"), and the evaluators
use the same rule; reward specs from files and reward models."""

import pytest

from posttrain.rl.rewards import (
    answers_match,
    exact_match,
    extract_final_answer,
    make_exact_match,
    make_format_reward,
    math_verify,
)


def test_math_verify_does_not_evaluate_an_echo_of_the_question():
    """Issue 12, failure 2: math-verify alone parsed '43+20' and evaluated it to 63."""
    assert math_verify(None, ["43+20"], answer=["63"]) == [0.0]
    assert math_verify(None, ["43+20 = ((1"], answer=["63"]) == [0.0]


# completion, extracted final answer, exact_match and math_verify reward against the answer "63"
ADVERSARIAL = [
    ("63", "63", 1.0, 1.0),
    ("43+20", None, 0.0, 0.0),  # echo of the question: an expression is not an answer
    ("43+20=", None, 0.0, 0.0),  # echo with its "=": nothing after the last "="
    ("43+20 = ((1", "1", 0.0, 0.0),  # the rollout of the issue (reward 1, advantage 2.47 on main)
    ("Hint: 43+20 = ((1", "1", 0.0, 0.0),
    ("$43+20$", "43+20", 0.0, 0.0),  # in math mode: still an expression, math_verify refuses to evaluate it
    ("\\boxed{43+20}", "43+20", 0.0, 0.0),
    ("63 64", "64", 0.0, 0.0),  # several answers: the last one counts
    ("64 63", "63", 1.0, 1.0),
    ("63 or 64", "64", 0.0, 0.0),
    ("\\boxed{63} then 64", "63", 1.0, 1.0),  # boxed beats a later number
    ("\\boxed{64} \\boxed{63}", "63", 1.0, 1.0),  # the last box
    ("63 \\boxed{64}", "64", 0.0, 0.0),
    ("\\boxed{\\text{63}}", "\\text{63}", 0.0, 1.0),  # exact match compares the text; math-verify reads LaTeX
    ("<answer>63</answer> 12", "63", 1.0, 1.0),  # answer tag beats a later number
    ("<answer> 63 </answer>", "63", 1.0, 1.0),
    ("63 blah blah", "63", 1.0, 1.0),  # answer then text without numbers
    ("63\nthe end", "63", 1.0, 1.0),
    ("63\n\nExplanation 43+20", None, 0.0, 0.0),  # answer then the question's numbers: the answer must come last
    ("63\n\nExplanation: 43+20=63", "63", 1.0, 1.0),
    ("The answer is 63.", "63", 1.0, 1.0),
    ("43 + 20 = 63", "63", 1.0, 1.0),
    ("  63  ", "63", 1.0, 1.0),
    ("6 3", "3", 0.0, 0.0),
    ("63.0", "63.0", 1.0, 1.0),
    ("-63", "-63", 0.0, 0.0),
    ("", None, 0.0, 0.0),
    ("no number at all", None, 0.0, 0.0),
]


@pytest.mark.parametrize("completion, extracted, em, mv", ADVERSARIAL, ids=[repr(c[0]) for c in ADVERSARIAL])
def test_adversarial_completions(completion, extracted, em, mv):
    assert extract_final_answer(completion) == extracted
    assert exact_match(None, [completion], answer=["63"]) == [em]
    assert math_verify(None, [completion], answer=["63"]) == [mv]


# Issue 31, failure 4: echoes of the question that math-verify evaluated to the answer (1.0 on main 895e596), each
# inside every answer format. Question -> (answer, echo forms).
ECHOES = {
    "What is 19 \u2212 2?": ("17", ["(19)-(2)", "19 - (2)", "19\\,-\\,2", "19\\!-\\!2", "{19}-{2}",
                                     "\\left(19\\right)-2", "19 + (-2)"]),
    "What is 5 \u00d7 3?": ("15", ["5\\times{3}", "5 \\cdot (3)"]),
    "What is 4 + 10?": ("14", ["(4)+(10)"]),
}
FORMATS = ["\\boxed{{{}}}", "<answer>{}</answer>", "${}$", "\\({}\\)"]
ECHO_TABLE = [(q, fmt.format(echo), a) for q, (a, echoes) in ECHOES.items() for echo in echoes for fmt in FORMATS]


@pytest.mark.parametrize("question, completion, answer", ECHO_TABLE, ids=[c for _, c, _ in ECHO_TABLE])
def test_an_echo_of_the_question_scores_0_in_every_format(question, completion, answer):
    for prompts in ([question], [[{"role": "user", "content": question}]], None):
        assert math_verify(prompts, [completion], answer=[answer]) == [0.0]
        assert exact_match(prompts, [completion], answer=[answer]) == [0.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_correct_answer_scores_1_in_every_format(fmt):
    for question, (answer, _) in ECHOES.items():
        for value in (answer, f"{answer}.0", f"({answer})"):
            assert math_verify([question], [fmt.format(value)], answer=[answer]) == [1.0], (fmt, value)
        assert exact_match([question], [fmt.format(answer)], answer=[answer]) == [1.0]
    # a closed form that is not arithmetic left undone still verifies, even with the question's numbers in it
    assert math_verify(["Simplify sqrt(8)."], [fmt.format("2\\sqrt{2}")], answer=["2\\sqrt{2}"]) == [1.0]
    assert math_verify(["What is 1 divided by 2?"], [fmt.format("\\frac{1}{2}")], answer=["0.5"]) == [1.0]


@pytest.mark.parametrize("completion, answer, expected", [
    ("1,234", "1234", True),  # thousands separators
    ("The total is 1,234.", "1234", True),
    ("1234", "1,234", True),
    ("x = -5", "-5", True),  # negative numbers
    ("10 - 15 = -5", "-5", True),
    ("10-15", "-5", False),  # an expression, not an answer
    ("−5", "-5", True),  # unicode minus
    ("The answer is -5.", "5", False),
    ("1/2", "0.5", True),  # numbers compare as numbers
    ("0.50", "1/2", True),
    ("$\\frac{1}{2}$", "\\frac{1}{2}", True),
    ("<answer>Paris</answer>", "Paris", True),
    ("<answer>paris</answer>", "Paris", False),
    ("Paris", "Paris", False),  # no tag, no number: no final answer
])
def test_final_answer_rule(completion, answer, expected):
    assert answers_match(completion, answer) is expected


def test_conversational_completions_score_the_last_assistant_message():
    """A tool-calling rollout: the tool's result is not the model's answer."""
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "43+20"}}}]}
    tool = {"role": "tool", "name": "calculator", "content": "63"}
    answered = [call, tool, {"role": "assistant", "content": "63"}]
    silent = [call, tool]  # the model never answered after the tool call
    assert exact_match(None, [answered, silent], answer=["63", "63"]) == [1.0, 0.0]
    assert math_verify(None, [answered, silent], answer=["63", "63"]) == [1.0, 0.0]
    assert exact_match(None, [[{"role": "assistant", "content": "<answer>12</answer>"}]], answer=["12"]) == [1.0]
    fmt = make_format_reward()
    assert fmt(None, [[call, {"role": "tool", "content": "<answer>63</answer>"}]]) == [0.0]


def test_exact_match_strict_option_and_format_reward():
    strict = make_exact_match(strict=True)
    assert strict(None, ["63", " 63\n", "The answer is 63.", "63 64"], answer=["63"] * 4) == [1.0, 1.0, 0.0, 0.0]
    fmt = make_format_reward()
    assert fmt(["q"] * 3, ["<answer>5</answer>", "5", "<answer> </answer>"]) == [1.0, 0.0, 0.0]
    assert make_format_reward("final")(None, ["<final>x</final>", "<answer>x</answer>"]) == [1.0, 0.0]
    assert math_verify(["q"] * 3, ["The answer is $\\frac{1}{2}$", "so 0.5", "it is 3"],
                       answer=["0.5", "\\frac{1}{2}", "4"]) == [1.0, 1.0, 0.0]


def test_greedy_accuracy_uses_the_reward_rule(monkeypatch):
    """Evaluation and reward agree: greedy accuracy counts a completion correct exactly when exact_match gives 1
    (issue 12: "43 + 20 = 63" and "The answer is 63." scored 0 in eval)."""
    from posttrain.eval import accuracy

    completions = ["43 + 20 = 63", "The answer is 63.", "43+20", "63\n\nExplanation 43+20"]
    monkeypatch.setattr(accuracy, "greedy_completions", lambda *a, **k: completions)
    acc = accuracy.greedy_accuracy(None, None, {"prompt": ["43+20="] * 4, "answer": ["63"] * 4}, max_new_tokens=8)
    assert acc == sum(exact_match(None, completions, answer=["63"] * 4)) / 4 == 0.5


# ----------------------------------------------------------------------------------------------------------------
# reward specs: file.py:function, reward models, errors before the model loads

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _grpo_recipe(tmp_path, rewards: str, *sets: str, name: str = "recipe.yaml"):
    """recipes/grpo.yaml copied to tmp_path/<name> (so relative file paths resolve next to it), shortened."""
    from posttrain.recipe import load_recipe

    path = tmp_path / name
    path.write_text((ROOT / "recipes" / "grpo.yaml").read_text())
    return load_recipe(path, [
        f"output_dir={tmp_path / 'run'}", f"method.rewards={rewards}", "training.max_steps=2",
        "training.per_device_train_batch_size=16", "training.num_generations=4", "training.logging_steps=1",
        "training.save_strategy='no'", "training.disable_tqdm=true", "data.train.max_samples=8", "data.test=null",
        *sets,
    ])


def _logged(tmp_path):
    import json

    return [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def _no_model_loads(monkeypatch):
    """Any model load fails the test: errors must come before it."""
    import posttrain.train

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(posttrain.train, "load_models", refuse)


def test_reward_function_from_a_file_next_to_the_recipe(tmp_path):
    """`function: path/to/file.py:function` is looked up from the recipe's directory (this runs the file's code)."""
    from posttrain.train import run

    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "mine.py").write_text(
        "from helper import BONUS\n"  # the file's own directory is importable while it loads
        "def longer(prompts, completions, answer, bonus=0.0, **kw):\n"
        "    return [BONUS + bonus + 0.1 * len(c) for c in completions]\n")
    (tmp_path / "rewards" / "helper.py").write_text("BONUS = 1.0\n")
    recipe = _grpo_recipe(tmp_path, "[{function: 'rewards/mine.py:longer', weight: 2.0, options: {bonus: 0.5}}]")
    run(recipe, quiet=True)
    rows = _logged(tmp_path)
    assert len(rows) == 2
    for row in rows:
        assert row["rewards/longer/mean"] >= 1.5 and row["reward"] == pytest.approx(2 * row["rewards/longer/mean"])


def test_reward_file_found_from_the_working_directory(tmp_path, monkeypatch):
    from posttrain.rl.rewards import import_function

    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "r.py").write_text("def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path / "cwd")
    fn = import_function("r.py:one", "method.rewards[0].function", base_dirs=[tmp_path / "elsewhere"])
    assert fn(None, ["a", "b"]) == [1.0, 1.0]


@pytest.mark.parametrize("rewards, message", [
    ("[{function: 'missing.py:fn'}]", r"error: method.rewards\[0\].function: file 'missing.py' not found \(looked in "),
    ("[{name: exact_match}, {function: 'bad.py:fn'}]",
     r"error: method.rewards\[1\].function: cannot load '.*bad.py' \(SyntaxError: "),
    ("[{function: 'good.py:rewrd'}]",
     r"error: method.rewards\[0\].function: file 'good.py' has no attribute 'rewrd' \(did you mean 'reward'\?\)"),
    ("[{function: 'no_such_module:fn'}]", r"error: method.rewards\[0\].function: cannot import module 'no_such_module'"),
    ("[{model: does/not/exist}]", r"error: method.rewards\[0\].model: local model directory 'does/not/exist' not found"),
    ("[{model: 'CAUSAL'}]", r"error: method.rewards\[0\].model: '.*' is not a sequence-classification reward model "
                            r"\(architectures: \['Qwen2ForCausalLM'\]\); its score head would be random"),
    ("[{model: 'x', options: {a: 1}}]", r"error: method\.rewards\[0\]: .*options: not used with a reward model"),
    ("[{name: format, model: 'x'}]", r"error: method\.rewards\[0\]: .*give exactly one of name"),
])
def test_bad_reward_specs_fail_with_one_line_before_any_model_loads(rewards, message, tmp_path, capsys, monkeypatch,
                                                                    tiny_model_dir):
    import re

    from posttrain.cli import main

    (tmp_path / "bad.py").write_text("def fn(:\n")
    (tmp_path / "good.py").write_text("def reward(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    (tmp_path / "recipe.yaml").write_text((ROOT / "recipes" / "grpo.yaml").read_text())
    _no_model_loads(monkeypatch)
    rewards = rewards.replace("CAUSAL", str(tiny_model_dir))
    rc = main(["train", str(tmp_path / "recipe.yaml"), "--set", f"method.rewards={rewards}",
               "--set", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len([line for line in err if line.startswith("error:")]) == 1 and re.match(message, err[-1]), err[-1]
    assert not (tmp_path / "run").exists()  # checked before anything was written


def _tiny_reward_model(tmp_path, tiny_model_dir):
    """A sequence-classification reward model (one label, random score head) from the built-in tiny config."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    out = tmp_path / "tiny-rm"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_reward_model_with_weight(tmp_path, tiny_model_dir):
    """`model:` a local sequence-classification model: TRL scores prompt + completion with it (its own tokenizer);
    the weighted sum with exact_match is the logged reward."""
    from posttrain.train import run

    rm = _tiny_reward_model(tmp_path, tiny_model_dir)
    run(_grpo_recipe(tmp_path, f"[{{name: exact_match}}, {{model: '{rm}', weight: 0.5}}]"), quiet=True)
    rows = _logged(tmp_path)
    assert len(rows) == 2
    for row in rows:
        scores = row["rewards/tiny-rm/mean"]
        assert row["rewards/tiny-rm/std"] > 0  # the model scores completions differently
        expected = row["rewards/exact_match/mean"] + 0.5 * scores
        assert row["reward"] == pytest.approx(expected, rel=1e-5, abs=1e-6 * max(1.0, abs(expected)))
