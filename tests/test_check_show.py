"""``posttrain check RECIPE --show N`` (issue 31): every check that needs no model, and the first training rows as the
trainer sees them (rendered template, system turn, the tokens the loss is on, token counts, truncation) without
loading a model or writing anything."""

from __future__ import annotations

import json

import yaml

from posttrain.cli import main

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _conversations(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"},
                          {"role": "user", "content": "and 4+4="}, {"role": "assistant", "content": "8"}]},
            {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "chatml.jinja").write_text(CHATML)
    return str(path)


def _recipe(tmp_path, data, method="sft", **training):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "builtin:tiny-qwen2", "data": data, "method": {"name": method},
                                    "training": {"max_steps": 1, "per_device_train_batch_size": 2, **training},
                                    "report": False, "output_dir": str(tmp_path / "run")}))
    return str(path)


def test_show_marks_the_assistant_tokens_the_trainer_trains_on(tmp_path, capsys):
    data = {"train": _conversations(tmp_path), "chat_template": str(tmp_path / "chatml.jinja"),
            "system_prompt": "Add."}
    recipe = _recipe(tmp_path, data)
    assert main(["check", recipe, "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {recipe} passes every check that needs no model (method sft, sft family)\n")
    assert ("--- data.train row 0: 52 tokens, 4 with loss ⟦…⟧\n<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n"
            "2+3=<|im_end|>\n<|im_start|>assistant\n⟦5<|im_end|>⟧\n<|im_start|>user\nand 4+4=<|im_end|>\n"
            "<|im_start|>assistant\n⟦8<|im_end|>⟧\n") in out
    assert "--- data.train row 1: " in out and "⟦2<|im_end|>⟧" in out
    assert not (tmp_path / "run").exists()  # nothing written, no model loaded

    # the same tokens and labels as the trainer's first batch
    from transformers import AutoTokenizer, TrainerCallback

    from posttrain.recipe import load_recipe
    from posttrain.train import run

    batches = []

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            batches.append(next(iter(train_dataloader)))

    run(load_recipe(recipe, ["training.shuffle_dataset=false", "training.dataloader_drop_last=false"]), quiet=True,
        callbacks=[Grab()])
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run"))
    trained = sorted(tok.decode(ids[labels != -100]) for ids, labels in zip(batches[0]["input_ids"],
                                                                            batches[0]["labels"]))
    assert trained == ["2<|im_end|>", "5<|im_end|>8<|im_end|>"]


def test_show_reports_truncation_and_dropped_rows(tmp_path, capsys):
    data = {"train": _conversations(tmp_path), "chat_template": str(tmp_path / "chatml.jinja")}
    assert main(["check", _recipe(tmp_path, data, max_length=30), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert ("--- data.train row 0: 39 tokens, 2 with loss ⟦…⟧; truncated to training.max_length=30 (keep_start): "
            "9 tokens are cut\n<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n⟦5<|im_end|>⟧\n"
            "<|im_start|>user\nand 4+") in out
    assert "--- data.train row 1: 18 tokens, 2 with loss ⟦…⟧\n" in out
    assert main(["check", _recipe(tmp_path, data, max_length=10), "--show", "1"]) == 0
    assert "0 with loss ⟦…⟧; truncated to training.max_length=10 (keep_start): 29 tokens are cut; dropped: no " \
           "token with loss is left" in capsys.readouterr().out


def test_show_for_preference_unlearning_and_rl(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": [{"role": "user", "content": "2+3="}],
                                 "chosen": [{"role": "assistant", "content": "5"}],
                                 "rejected": [{"role": "assistant", "content": "6"}]}) + "\n")
    assert main(["check", _recipe(tmp_path, {"train": str(pairs)}, method="dpo"), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- data.train row 0 (chosen): 17 tokens, 2 with loss ⟦…⟧\n<|im_start|>user\n2+3=<|im_end|>\n" \
           "<|im_start|>assistant\n⟦5<|im_end|>⟧" in out
    assert "--- data.train row 0 (rejected): 17 tokens, 2 with loss ⟦…⟧" in out and "⟦6<|im_end|>⟧" in out
    forget = {"source": "builtin:facts", "split": "forget05"}
    assert main(["check", _recipe(tmp_path, {"forget": forget, "retain": {"source": "builtin:facts",
                                                                           "split": "retain95"}}, method="npo_rt"),
                 "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- data.forget row 0: " in out and "--- data.retain row 0: " in out and "Answer:⟦ " in out
    assert main(["check", _recipe(tmp_path, {"train": "builtin:arithmetic-rl"}, method="grpo",
                                  num_generations=2, max_completion_length=4), "--show", "1"]) == 0
    assert "--- data.train row 0 (prompt): " in capsys.readouterr().out


def test_check_errors_are_one_line(tmp_path, capsys):
    recipe = _recipe(tmp_path, {"train": "builtin:arithmetic-sft"}, learning_rate=-1.0)
    assert main(["check", recipe]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[posttrain]")]
    assert len(err) == 1 and err[0].startswith("error: training.learning_rate")
