"""Conversational data in every family and command (issue 12): the tokens a trainer or evaluator feeds the model
carry the chat template's markers; ``messages`` SFT puts its loss on assistant tokens only; ``data.chat_template``
and ``data.system_prompt`` wrap plain-text prompts.

Every test spies on ``torch.nn.Embedding.forward``: whatever token ids reach a model's input embeddings are what the
trainer or evaluator tokenised, whichever code path produced them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.recipe import parse_recipe
from posttrain.train import run

MARK = "<|im_start|>"


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def seen(monkeypatch, tiny_model_dir):
    """Texts of every batch of token ids that reach an embedding layer of the built-in vocabulary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts: list[str] = []
    original = torch.nn.Embedding.forward

    def forward(self, ids):
        # generation steps after the first feed one new token each (KV cache): only whole sequences are recorded
        if self.num_embeddings >= len(tok) - 8 and ids.dtype == torch.long and ids.shape[-1] > 1:
            texts.extend(tok.batch_decode(ids.reshape(-1, ids.shape[-1])[:4].clamp(min=0)))
        return original(self, ids)

    monkeypatch.setattr(torch.nn.Embedding, "forward", forward)
    return texts


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[posttrain]")]


def _recipe(tmp_path, method, data, model="builtin:tiny-qwen2", **extra):
    return parse_recipe({
        "model": model,
        "data": data,
        "method": {"name": method, **extra.pop("params", {})},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1, "save_strategy": "no",
                     "disable_tqdm": True, **extra.pop("training", {})},
        "report": False,
        "output_dir": str(tmp_path / "run"),
        **extra,
    })


ARITH = [("2+3=", "5"), ("4+4=", "8"), ("1+6=", "7"), ("3+3=", "6")]


def test_sft_and_data_test_on_conversational_prompt_completion(tmp_path, seen):
    train = _jsonl(tmp_path / "sft.jsonl", [{"prompt": _user(p), "completion": _assistant(c)} for p, c in ARITH])
    test = _jsonl(tmp_path / "test.jsonl", [{"prompt": _user(p), "answer": c} for p, c in ARITH])
    summary = run(_recipe(tmp_path, "sft", {"train": train, "test": test}), quiet=True)
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    assert seen and all(MARK in t for t in seen), seen[:2]
    assert any(t.startswith("<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n") for t in seen)


def test_messages_sft_puts_the_loss_on_assistant_tokens_only(tmp_path, seen):
    """Issue 12 failure 1: `messages` rows were labelled on every token (system prompt, user turn, template)."""
    rows = [{"messages": [{"role": "system", "content": "You add numbers."}, *_user(p), *_assistant(c)]}
            for p, c in ARITH]
    train = _jsonl(tmp_path / "msgs.jsonl", rows)
    batches = []

    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            batches.append(next(iter(train_dataloader)))

    recipe = _recipe(tmp_path, "sft", {"train": train})
    run(recipe, quiet=True, callbacks=[Grab()])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run"))
    batch = batches[0]
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        labelled = ids[labels != -100]
        text = tok.decode(labelled)
        # only the assistant answer and its end-of-turn: no system prompt, user turn or template header
        assert text in {c + "<|im_end|>" for _, c in ARITH}, text
        assert len(labelled) == 2 < int((ids != tok.pad_token_id).sum())
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["chat_template"] == "none"


def test_messages_sft_on_a_template_without_generation_markers(tmp_path, capsys):
    """Issue 23: a marker-less template (as almost every released one) trains the assistant tokens only."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    train = _jsonl(tmp_path / "msgs.jsonl", [{"messages": [*_user(p), *_assistant(c)]} for p, c in ARITH])
    batches = []

    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            batches.append(next(iter(train_dataloader)))

    recipe = _recipe(tmp_path, "sft", {"train": train, "chat_template": str(template)},
                     training={"per_device_train_batch_size": 4})
    run(recipe, quiet=True, callbacks=[Grab()])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run"))
    labelled = {tok.decode(ids[labels != -100]) for ids, labels in zip(batches[0]["input_ids"], batches[0]["labels"])}
    assert labelled == {c + "<|im_end|>" for _, c in ARITH}
    # the documented way out of assistant-only loss: every token
    recipe = _recipe(tmp_path, "sft", {"train": train, "chat_template": str(template)},
                     training={"per_device_train_batch_size": 4, "assistant_only_loss": False})
    batches.clear()
    run(recipe, quiet=True, callbacks=[Grab()], overwrite=True)
    assert all((labels != -100).sum() >= (ids != tok.pad_token_id).sum() - 1
               for ids, labels in zip(batches[0]["input_ids"], batches[0]["labels"]))


def test_preference_on_conversational_rows(tmp_path, seen):
    """Issue 23: the scored tokens of a conversational pair are its assistant turns and their end-of-turn token
    (not the template's newline after it; not a tool result inside a multi-message completion)."""
    rows = [{"prompt": _user(p), "chosen": _assistant(c), "rejected": _assistant("9")} for p, c in ARITH[:3]]
    tool_turns = [{"role": "assistant", "content": "call"}, {"role": "tool", "content": "7"}]
    rows.append({"prompt": _user("1+6="), "chosen": [*tool_turns, *_assistant("7")],
                 "rejected": [*tool_turns, *_assistant("6")]})
    batches = []

    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            batches.append(next(iter(train_dataloader)))

    run(_recipe(tmp_path, "dpo", {"train": _jsonl(tmp_path / "pref.jsonl", rows)},
                training={"per_device_train_batch_size": 4}), quiet=True, callbacks=[Grab()])
    assert seen and all(MARK in t for t in seen)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run"))
    batch = batches[0]
    scored = sorted(tok.decode(ids[mask == 1]) for ids, mask in zip(batch["input_ids"], batch["completion_mask"]))
    want = [c + "<|im_end|>" for c in ("5", "8", "7", "9", "9", "9")] + ["call<|im_end|>7<|im_end|>",
                                                                           "call<|im_end|>6<|im_end|>"]
    assert scored == sorted(want)


def test_unlearning_on_conversational_rows(tmp_path, seen):
    forget = _jsonl(tmp_path / "f.jsonl", [{"prompt": _user(p), "completion": _assistant(c)} for p, c in ARITH[:2]])
    retain = _jsonl(tmp_path / "r.jsonl", [{"prompt": _user(p), "completion": c} for p, c in ARITH[2:]])
    run(_recipe(tmp_path, "npo_rt", {"forget": forget, "retain": retain}), quiet=True)
    assert seen and all(MARK in t for t in seen)
    assert any("<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n5<|im_end|>" in t for t in seen)


def test_unlearning_tokenize_rows_labels_only_the_answer(tiny_model_dir):
    from transformers import AutoTokenizer

    from posttrain.families.unlearning.trainer import tokenize_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    [(ids, labels)] = tokenize_rows({"prompt": [_user("2+3=")], "completion": [_assistant("5")]}, tok, 64)
    assert tok.decode(ids) == "<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    assert tok.decode([t for t, label in zip(ids, labels) if label != -100]) == "5<|im_end|>"


def test_rl_on_conversational_prompts(tmp_path, seen):
    rows = [{"prompt": _user(p), "answer": c} for p, c in ARITH]
    run(_recipe(tmp_path, "grpo", {"train": _jsonl(tmp_path / "rl.jsonl", rows)},
                params={"rewards": [{"name": "exact_match"}]},
                training={"per_device_train_batch_size": 2, "num_generations": 2, "max_completion_length": 4}),
        quiet=True)
    assert seen and all(MARK in t for t in seen)


def test_eval_accuracy_and_pass_at_k_on_conversational_prompts(tmp_path, seen, arith_model_dir, capsys):
    """Issue 12 failure 3: `posttrain eval` crashed on conversational prompts (text input must be of type str)."""
    data = _jsonl(tmp_path / "t.jsonl", [{"prompt": _user(p), "answer": c} for p, c in ARITH])
    out = tmp_path / "res.json"
    assert main(["eval", str(arith_model_dir), "--data", data, "--pass-k", "1", "2", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4 and 0.0 <= res["accuracy"] <= 1.0 and set(res["pass@k"]) == {"1", "2"}
    assert all(MARK in t for t in seen)


def test_eval_tofu_with_a_chat_template_wraps_the_questions(tmp_path, seen, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    template = tmp_path / "chatml.jinja"
    template.write_text(AutoTokenizer.from_pretrained(tiny_model_dir).chat_template)
    assert main(["eval", "builtin:tiny-qwen2-facts", "--suite", "tofu", "--max-samples", "2", "--max-new-tokens", "2",
                 "--chat-template", str(template), "--output", str(tmp_path / "tofu.json")]) == 0
    assert seen and all(MARK in t for t in seen)
    seen.clear()
    assert main(["eval", "builtin:tiny-qwen2-facts", "--suite", "tofu", "--max-samples", "2", "--max-new-tokens", "2",
                 "--output", str(tmp_path / "tofu2.json")]) == 0
    assert seen and not any(MARK in t for t in seen)  # auto on a built-in model: raw text, as it was trained


def test_poft_score_on_conversational_rows(tmp_path, seen, tiny_model_dir):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": _user(p), "completion": _assistant(c)} for p, c in ARITH])
    out = tmp_path / "scored.jsonl"
    assert main(["poft-score", "--data", data, "--aligned-model", str(tiny_model_dir), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["poft_ref_scores"]) == 1 for r in rows)
    assert seen and all(MARK in t for t in seen)


# --------------------------------------------------------------------------------------------------------------------
# data.chat_template / data.system_prompt
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def chat_model_dir(tmp_path, tiny_model_dir):
    """A copy of the tiny model whose tokenizer has a (non-built-in) chat template: what a hub chat model looks like."""
    out = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("DONE"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = tok.chat_template.replace("<|im_start|>' + message['role']", "<|im_start|>' + message.role")
    assert tok.chat_template != AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    tok.save_pretrained(out)
    return out


def test_auto_wraps_plain_prompts_on_a_chat_model_and_logs_it_once(tmp_path, seen, chat_model_dir, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="posttrain")
    recipe = _recipe(tmp_path, "sft", {"train": "builtin:arithmetic-sft", "system_prompt": "Add."},
                     model=str(chat_model_dir))
    run(recipe)
    assert any(t.startswith("<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n") for t in seen), seen[:2]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data.chat_template:")]
    assert len(lines) == 1 and "wrapped as a user turn" in lines[0]
    written = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]
    assert written["chat_template"] == "auto" and written["system_prompt"] == "Add."


def test_none_keeps_plain_prompts_raw(tmp_path, seen, chat_model_dir):
    recipe = _recipe(tmp_path, "sft", {"train": "builtin:arithmetic-sft", "chat_template": "none"},
                     model=str(chat_model_dir))
    run(recipe, quiet=True)
    assert seen and not any(MARK in t for t in seen)


def test_bad_chat_template_values_are_one_line_errors(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "builtin:tiny-qwen2", "data": {"train": "builtin:arithmetic-sft",
                                      "chat_template": "chatml"}, "method": {"name": "sft"},
                                      "output_dir": str(tmp_path / "out")}))
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.startswith("error: data.chat_template: ")
    assert main(["train", str(recipe), "--set", f"data.chat_template={tmp_path}/missing.jinja"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "missing.jinja' not found" in err[0] and not (tmp_path / "out").exists()


def test_tofu_eval_warns_when_generations_are_empty(tmp_path, monkeypatch, capsys):
    """Issue 12 failure 6: model_utility 0.0000 from empty generations (end-of-turn at once), and nothing said so."""
    import posttrain.eval.accuracy as accuracy

    monkeypatch.setattr(accuracy, "greedy_completions", lambda model, tok, prompts, **kw: ["" for _ in prompts])
    out = tmp_path / "tofu.json"
    assert main(["eval", "builtin:tiny-qwen2-facts", "--suite", "tofu", "--max-samples", "2",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warning: forget: 2 of 2 greedy generations are empty" in printed and "chat_template" in printed
    assert len(json.loads(out.read_text())["warnings"]) == 4  # forget, retain, holdout, world facts
