"""Tool calling in GRPO rollouts from a recipe (method.tools / rollout_func / environment, TRL 1.16's multi-turn
loop), the calculator example task, and stratified advantages keyed on the rollouts' real tool-call counts."""

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import UserError
from posttrain.rl.tools import calculator

ROOT = Path(__file__).resolve().parents[2]


def test_calculator():
    assert calculator("437+285") == "722"
    assert calculator(" 2*(3+4)= ") == "14"
    assert calculator("1/2") == "0.5" and calculator("-3-4") == "-7"
    for bad in ("__import__('os')", "2**10", "x+1", "1" * 101):
        with pytest.raises((ValueError, SyntaxError)):
            calculator(bad)


@pytest.fixture
def tool_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rl.tools import prepare_tool_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prepare_tool_tokenizer(tok, model)
    return tok, model


def test_builtin_chatml_tokenizer_gets_a_tool_format_trl_accepts(tool_tokenizer):
    """The built-in ChatML template cannot render tool calls; posttrain's ChatML tool template can, keeps prefixes
    (TRL's requirement for the multi-turn loop), and TRL's Qwen parser reads the calls back."""
    from trl.chat_template_utils import is_chat_template_prefix_preserving, parse_response, supports_tool_calling

    tok, model = tool_tokenizer
    assert supports_tool_calling(tok) and is_chat_template_prefix_preserving(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id  # a turn ends generation
    prompt = tok.apply_chat_template([{"role": "user", "content": "43+20="}], tools=[calculator],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    call = tok('<tool_call>\n{"name": "calculator", "arguments": {"expression": "43+20"}}\n</tool_call><|im_end|>',
               add_special_tokens=False)["input_ids"]
    parsed = parse_response(tok, call, prefix=prompt, tools=[calculator])
    assert parsed["tool_calls"] == [{"type": "function",
                                     "function": {"name": "calculator", "arguments": {"expression": "43+20"}}}]
    plain = parse_response(tok, tok("63<|im_end|>", add_special_tokens=False)["input_ids"], prefix=prompt)
    assert plain == {"role": "assistant", "content": "63"}


@pytest.mark.parametrize("tool", ["calculate", "calculator"])
def test_tool_sft_traces_render_what_the_grpo_run_renders(tool, tool_tokenizer):
    """builtin:arithmetic-tool-sft rows are the text the GRPO run's tokenizer renders for the same conversation, with
    the environment's calculate() tool (the recipe's) or the calculator(expression) function."""
    from posttrain.data.arithmetic import arithmetic_tool_rows
    from posttrain.rl.tools import ArithmeticEnv

    tok, _ = tool_tokenizer
    fn = ArithmeticEnv().calculate if tool == "calculate" else calculator
    sft = arithmetic_tool_rows("sft", num_samples=40, tool_fraction=0.5, tool=tool)
    rl = arithmetic_tool_rows("rl", num_samples=40)
    calls = [i for i, r in enumerate(sft) if r["completion"].startswith("<tool_call>")]
    assert 10 < len(calls) < 30  # about half call the tool
    for i, (s, r) in enumerate(zip(sft, rl, strict=True)):
        expr = r["prompt"][0]["content"].rstrip("=")
        arguments = {"expression": expr} if tool == "calculator" else {}
        turns = [{"role": "assistant", "content": r["answer"]}]
        if i in calls:
            turns = [{"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": tool, "arguments": arguments}}]},
                {"role": "tool", "name": tool, "content": calculator(expr)}, *turns]
        assert s["prompt"] == tok.apply_chat_template(r["prompt"], tools=[fn], add_generation_prompt=True,
                                                      tokenize=False)
        assert s["prompt"] + s["completion"] == tok.apply_chat_template([*r["prompt"], *turns], tools=[fn],
                                                                        tokenize=False)


# ----------------------------------------------------------------------------------------------------------------
# rollouts

_SCRIPTED = '''
import json

CALLS = {"calculator": '<tool_call>\\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\\n</tool_call>',
         "calculate": '<tool_call>\\n{{"name": "calculate", "arguments": {{}}}}\\n</tool_call>'}


def scripted(prompts, trainer):
    """First turns written by hand (0, 1 or 2 tool calls, by position), so that the test does not depend on what a
    tiny model has learnt; TRL's tool loop then runs the calls and the model writes the rest."""
    tok = trainer.processing_class
    call = CALLS["calculate" if any(t.__name__ == "calculate" for t in trainer.tools) else "calculator"]
    prompt_ids, completion_ids = [], []
    for i, prompt in enumerate(prompts):
        prompt_ids.append(tok.apply_chat_template(prompt, tools=trainer.tools, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
        expr = prompt[-1]["content"].rstrip("=")
        text = ["7", call.format(expr), call.format(expr) + call.format(expr)][i % 3 if i % 4 else 0]
        completion_ids.append(tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def recording(prompts, completions, answer, path, **kwargs):
    """exact_match plus a little per character of the final answer (rewards that differ inside each stratum), and a
    record of the rollouts (what TRL built) for the test."""
    from posttrain.rl.rewards import exact_match, final_text

    values = [e + 0.01 * len(final_text(c)) for e, c in zip(exact_match(prompts, completions, answer=answer),
                                                            completions)]
    with open(path, "a") as fh:
        fh.write(json.dumps({"prompts": prompts, "completions": completions, "rewards": values}) + "\\n")
    return values
'''


@pytest.mark.parametrize("via", ["environment", "tools"])
def test_tool_rollouts_stratify_on_their_real_tool_call_count(via, tmp_path):
    """recipes/grpo_tools.yaml (its ArithmeticEnv environment, or the calculator as a tool function) with a scripted
    first turn (method.rollout_func, from a file next to the recipe): TRL's loop runs the tool calls and appends their
    results; the stratum of each rollout is its number of tool calls (0, 1, 2), and the logged advantages are the
    stratified advantages recomputed from the recorded rollouts."""
    from posttrain.recipe import load_recipe
    from posttrain.families.rl.common import Groups, stratum_ids
    from posttrain.families.rl.parts import ADVANTAGES
    from posttrain.methods import GRPOParams
    from posttrain.rl.strata import count_tool_calls
    from posttrain.train import run

    (tmp_path / "tool_rollout.py").write_text(_SCRIPTED)
    (tmp_path / "recipe.yaml").write_text((ROOT / "recipes" / "grpo_tools.yaml").read_text())
    record = tmp_path / "record.jsonl"
    recipe = load_recipe(tmp_path / "recipe.yaml", [
        "model=builtin:tiny-qwen2-arith", f"output_dir={tmp_path / 'run'}", "method.rollout_func=tool_rollout.py:scripted",
        f"method.rewards=[{{function: 'tool_rollout.py:recording', options: {{path: '{record}'}}}}]",
        "training.max_steps=1", "training.per_device_train_batch_size=18", "training.num_generations=6",
        "training.max_completion_length=256", "training.temperature=1.0", "training.logging_steps=1",
        "training.save_strategy='no'", "training.disable_tqdm=true", "data.train.max_samples=8",
        *(["method.environment=null", "method.tools=[posttrain.rl.tools:calculator]"] if via == "tools" else []),
    ])
    run(recipe, quiet=True)
    logged = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "policy_loss" in r]
    batches = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(logged) == len(batches) == 1
    for row, batch in zip(logged, batches, strict=True):
        completions = batch["completions"]
        executed = [sum(m["role"] == "tool" for m in c) for c in completions]  # results TRL appended
        keys = [count_tool_calls(c) for c in completions]  # the default stratum key
        assert keys == executed and set(keys) == {0, 1, 2}
        assert row["tools/call_frequency"] == pytest.approx(sum(executed) / len(executed))
        assert row["tools/failure_frequency"] == 0.0
        assert row["san/stratum_key_mean"] == pytest.approx(sum(keys) / len(keys))
        for prompt, c in zip(batch["prompts"], completions, strict=True):  # each call ran on its rollout's problem
            for m in c:
                if m["role"] == "tool":
                    assert m["name"] == ("calculate" if via == "environment" else "calculator")
                    assert m["content"] == calculator(prompt[-1]["content"])
        adv = ADVANTAGES["stratified"].fn(torch.tensor(batch["rewards"]), Groups(6, strata=stratum_ids(keys)),
                                          GRPOParams(advantage="stratified")).advantages  # alpha 0.8, per group
        for stat in ("mean", "std", "min", "max"):
            assert row[f"advantages/{stat}"] == pytest.approx(getattr(adv, stat)().item(), abs=1e-5), stat
        assert row["san/num_strata_per_group"] > 1 and adv.abs().sum() > 0  # not vacuous


def test_arithmetic_env_computes_its_rollouts_problem():
    from posttrain.rl.tools import ArithmeticEnv

    env = ArithmeticEnv()
    env.reset(prompt=[{"role": "user", "content": "43+20="}], answer="63")
    assert env.calculate() == "63" and env.calls == 1
    env.reset(prompt=[{"role": "user", "content": "70+59="}])
    assert env.calculate() == "129" and env.calls == 1


def test_tool_recipe_errors(tmp_path, capsys, monkeypatch):
    """Bad tool settings: one error line naming the key; import errors before any model is loaded."""
    import posttrain.train
    from posttrain.cli import main

    def train(*sets):
        return main(["train", str(ROOT / "recipes" / "grpo_tools.yaml"), "--set", f"output_dir={tmp_path / 'run'}",
                     "--set", "model=builtin:tiny-qwen2-arith", *[a for s in sets for a in ("--set", s)]])

    assert train("data.train=builtin:arithmetic-rl") == 2  # plain-text prompts
    original = posttrain.train.load_models
    monkeypatch.setattr(posttrain.train, "load_models", lambda *a, **k: pytest.fail("model loaded before the error"))
    assert train("method.tools=[posttrain.rl.tools:calculatr]") == 2
    assert train("method.environment=nowhere.py:Env") == 2
    assert train("method.rollout_func=posttrain.rl.tools") == 2
    monkeypatch.setattr(posttrain.train, "load_models", original)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 4, err
    assert err[0].startswith("error: method.environment: tool calling needs conversational prompts")
    assert err[1] == ("error: method.tools[0]: module 'posttrain.rl.tools' has no attribute 'calculatr' "
                      "(did you mean 'calculator'?)")
    assert err[2].startswith("error: method.environment: file 'nowhere.py' not found")
    assert err[3].startswith("error: method.rollout_func: expected 'module:function' or 'path/to/file.py:function'")


def test_tokenizer_without_a_tool_format_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    from posttrain.rl.tools import prepare_tool_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match=r"method.tools: the model's tokenizer has no chat template that renders"):
        prepare_tool_tokenizer(tok)
