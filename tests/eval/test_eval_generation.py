"""One generation setting for every accuracy path (issue 31, failures 2 and 3): the before/after ``data.test``
lines, evaluation during training and ``posttrain eval`` generate ``eval.max_new_tokens`` tokens (default long enough
for a chat model's reply, not 8), and say so when many completions reach that limit without ending."""

from __future__ import annotations

import json

import pytest
import transformers

from posttrain.cli import main
from posttrain.recipe import parse_recipe
from posttrain.train import run


@pytest.fixture()
def generate_lengths(monkeypatch):
    """The max_new_tokens of every generate call."""
    lengths: list[int] = []
    original = transformers.GenerationMixin.generate

    def generate(self, *args, **kwargs):
        lengths.append(kwargs.get("max_new_tokens"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    return lengths


def _recipe(tmp_path, model="builtin:tiny-qwen2", test=None, **eval_block):
    return parse_recipe({
        "model": model,  # builtin:tiny-qwen2 is a random init: it never ends a completion
        "data": {"train": {"source": "builtin:arithmetic-sft", "max_samples": 8},
                 "test": test or {"source": "builtin:arithmetic-rl", "split": "test", "max_samples": 4}},
        "method": {"name": "sft"},
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no", "disable_tqdm": True},
        "eval": eval_block, "report": False, "output_dir": str(tmp_path / "run"),
    })


def test_before_after_lines_use_eval_max_new_tokens_and_warn_when_cut(tmp_path, generate_lengths):
    summary = run(_recipe(tmp_path, max_new_tokens=5), quiet=True)
    assert generate_lengths == [5, 5]  # before and after (main: always 8)
    for when in ("before", "after"):
        warning = f"data.test {when} training: 4 of 4 completions (100%) reached max_new_tokens=5 without ending"
        assert any(w.startswith(warning) for w in summary["warnings"]), summary.get("warnings")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"] == summary["warnings"]


def test_every_accuracy_path_defaults_to_a_chat_length_on_chat_prompts(tmp_path, generate_lengths):
    test = tmp_path / "chat_test.jsonl"
    test.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}], "answer": a}) + "\n"
                            for p, a in (("2+3=", "5"), ("4+4=", "8"))))
    # before/after lines, evaluation during training (accuracy and pass@k): all at the chat default (main: 8)
    run(_recipe(tmp_path, model="builtin:tiny-qwen2-arith", test={"source": str(test)}, steps=1, pass_k=[1],
                num_samples=2), quiet=True)
    assert len(generate_lengths) >= 4 and set(generate_lengths) == {256}


def test_posttrain_eval_default_length_and_cut_warning(tmp_path, generate_lengths, capsys, arith_model_dir):
    out = tmp_path / "res.json"
    assert main(["eval", "builtin:tiny-qwen2", "--max-samples", "3", "--output", str(out)]) == 0
    # plain-text a+b= prompts with 1-3 token answers: at least 32 (main: 8), and the cut completions are reported
    assert generate_lengths == [32]
    stdout = capsys.readouterr().out
    assert "warning: --data: 3 of 3 completions (100%) reached max_new_tokens=32" in stdout
    assert json.loads(out.read_text())["cut_at_max_new_tokens"] == 1.0
    # a model that ends its answers: no warning; a run folder's eval.max_new_tokens is the default of `eval RUN`
    generate_lengths.clear()
    assert main(["eval", str(arith_model_dir), "--max-samples", "3", "--output", str(out)]) == 0
    assert "warning:" not in capsys.readouterr().out and json.loads(out.read_text())["cut_at_max_new_tokens"] == 0.0
    run_dir = tmp_path / "run"
    run(_recipe(tmp_path, max_new_tokens=6), quiet=True)
    generate_lengths.clear()
    assert main(["eval", str(run_dir), "--max-samples", "2"]) == 0
    assert generate_lengths == [6]


def test_cut_warning_threshold():
    from posttrain.eval.accuracy import cut_warning

    assert cut_warning("x", [False] * 10, 8) is None
    assert cut_warning("x", [True] + [False] * 9, 8).startswith("x: 1 of 10 completions (10%) reached")
