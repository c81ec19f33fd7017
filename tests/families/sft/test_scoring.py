"""PoFT's aligned-model scores: `posttrain poft-score` writes them into the data, `method.aligned_models` computes them
before training; both give the r_j of docs/methods/poft.md#aligned-model-scores (mean response log-prob, EOS included) and the same training loss."""

import json

import pytest
import torch

ALIGNED = "builtin:tiny-qwen2-arith"


def _mean_response_logp_by_hand(model, tok, prompt, completion):
    """Full-logits reference: log-softmax over the vocabulary, the response tokens (and EOS) averaged."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    per_token = logp.gather(-1, targets[:, None]).squeeze(-1)[len(p) - 1 :]
    return per_token.mean().item()


def test_poft_score_command_and_trainer_scoring_agree(tmp_path, arith_model_dir):
    from posttrain.cli import main
    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.models import load_model, load_tokenizer
    from posttrain.recipe import parse_recipe
    from posttrain.train import run

    rows = arithmetic_rows("sft", num_samples=16, max_operand=30, seed=4)
    raw, scored = tmp_path / "raw.jsonl", tmp_path / "scored.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["poft-score", "--data", str(raw), "--aligned-model", ALIGNED, "--output", str(scored)]) == 0
    out = [json.loads(line) for line in scored.read_text().splitlines()]
    assert [(r["prompt"], r["completion"]) for r in out] == [(r["prompt"], r["completion"]) for r in rows]
    model, tok = load_model(ALIGNED).eval(), load_tokenizer(ALIGNED)
    for r in out[:4]:
        assert len(r["poft_ref_scores"]) == 1
        by_hand = _mean_response_logp_by_hand(model, tok, r["prompt"], r["completion"])
        assert r["poft_ref_scores"][0] == pytest.approx(by_hand, abs=1e-5)

    def step1_loss(data, name, **method):
        run(parse_recipe({
            "model": "builtin:tiny-qwen2",
            "data": {"train": str(data)},
            "method": {"name": "poft", "poft_beta": 1.0, **method},
            "training": {"max_steps": 1, "per_device_train_batch_size": 16, "learning_rate": 0.0, "logging_steps": 1,
                         "save_strategy": "no", "disable_tqdm": True},
            "output_dir": str(tmp_path / name),
        }), quiet=True)
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return next(m["loss"] for m in metrics if "loss" in m)

    precomputed = step1_loss(scored, "pre")
    computed = step1_loss(raw, "live", aligned_models=[ALIGNED])
    assert precomputed == pytest.approx(computed, abs=1e-6)
    # the scores are really used: a better-scoring aligned model (every r_j + 1) changes the loss
    shifted = tmp_path / "shifted.jsonl"
    shifted.write_text("".join(json.dumps({**r, "poft_ref_scores": [r["poft_ref_scores"][0] + 1.0]}) + "\n"
                               for r in out))
    assert abs(step1_loss(shifted, "shifted") - precomputed) > 1e-3
