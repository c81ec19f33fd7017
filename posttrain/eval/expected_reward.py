"""The expected exact-match reward of a policy on a set of prompts, computed exactly instead of sampled.

For a prompt x with reference answer a, sampling at temperature T returns exactly ``a`` followed by end-of-sequence with
probability ``P_T(a + EOS | x) = prod_t softmax(z_t / T)[a_t]``. Its mean over the prompts is the expected exact-match
reward of the policy on them (a lower bound when several strings count as correct, e.g. ``"19\\n..."``), with none of
the sampling noise of a measured reward: the clean signal for "did RL on these prompts raise the reward it optimises"
(``tests/families/rl/test_rl_trainer.py``, ``benchmarks/rl_variants.py``).
"""

from __future__ import annotations

from typing import Any

import torch


def _prompt_text(prompt: Any, tokenizer) -> str:
    from posttrain.data.formatting import render_prompt

    return render_prompt(prompt, tokenizer)


@torch.no_grad()
def answer_probabilities(model, tokenizer, rows, *, temperature: float = 1.0, batch_size: int = 64) -> list[float]:
    """``P_T(answer + EOS | prompt)`` for each ``{prompt, answer}`` row (prompt: text or chat messages)."""
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pairs = []
    for row in rows:
        p = tokenizer(_prompt_text(row["prompt"], tokenizer), add_special_tokens=False)["input_ids"]
        a = tokenizer(str(row["answer"]), add_special_tokens=False)["input_ids"] + [eos]
        pairs.append((p, a))
    out: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (p, a) in enumerate(chunk):  # right padding: positions start at 0 for every row
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            target[i, len(p) - 1 : len(seq) - 1] = torch.tensor(a)  # logits at t predict token t + 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float() / temperature
        logps = torch.log_softmax(logits, dim=-1)
        mask = target.to(device) != -100
        token_lp = logps.gather(-1, target.to(device).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.extend((token_lp * mask).sum(-1).exp().tolist())
    model.train(model_was_training)
    return out


def expected_exact_match(model, tokenizer, rows, *, temperature: float = 1.0, batch_size: int = 64) -> float:
    """Mean of :func:`answer_probabilities`: the policy's expected exact-match reward on ``rows`` at ``temperature``."""
    probs = answer_probabilities(model, tokenizer, rows, temperature=temperature, batch_size=batch_size)
    return sum(probs) / max(len(probs), 1)
