"""Sampled evaluation of verifiable tasks: pass@k from n samples per prompt (RL-style prompt + answer data).

For each prompt, ``n`` completions are sampled (temperature ``temperature``, no top-k/top-p truncation), each is
checked with :func:`posttrain.rl.rewards.answers_match` (its final answer, the ``exact_match`` reward's rule), and pass@k is the unbiased estimator of Chen et al. 2021
(arXiv 2107.03374) averaged over prompts (:func:`posttrain.eval.passk.estimate_pass_at_k`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from posttrain.errors import UserError
from posttrain.eval.accuracy import (
    CHAT_MAX_NEW_TOKENS,
    cut_warning,
    default_max_new_tokens,
    generate_completions,
)
from posttrain.eval.passk import estimate_pass_at_k
from posttrain.rl.rewards import answers_match


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list,
    num_samples: int,
    temperature: float = 1.0,
    max_new_tokens: int = CHAT_MAX_NEW_TOKENS,
    batch_size: int = 64,
    seed: int = 0,
    cut: list[bool] | None = None,
) -> list[list[str]]:
    """``num_samples`` completions per prompt sampled at ``temperature`` (no top-k / top-p truncation) with torch's
    generator seeded by ``seed`` and restored after (:func:`posttrain.eval.accuracy.generate_completions`), as a list
    per prompt. ``cut``: a list that gets, per sample, whether it reached ``max_new_tokens`` without ending."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        texts = generate_completions(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=max(1, batch_size // num_samples),
            cut=cut, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=num_samples,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def pass_at_k_eval(
    model,
    tokenizer,
    rows,
    ks: Sequence[int],
    num_samples: int | None = None,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    where: str = "data.test",
) -> dict[str, Any]:
    """pass@k for each k in ``ks`` from ``num_samples`` (default ``max(ks)``) samples per row of prompt/answer rows.

    Returns ``{"num_samples", "temperature", "pass@k": {k: score}, "mean_sample_accuracy", "cut_at_max_new_tokens"
    (the fraction of samples that reached the generation limit without ending), "warnings"}``.
    """
    ks = sorted(set(int(k) for k in ks))
    n = int(num_samples or max(ks))
    if not ks or ks[0] < 1:
        raise UserError(f"--pass-k: every k must be >= 1, got {ks}")
    if ks[-1] > n:
        raise UserError(f"--pass-k: k={ks[-1]} is larger than --num-samples={n}")
    if temperature <= 0:
        raise UserError(f"--temperature: must be > 0 for sampling, got {temperature}")
    prompts, answers = list(rows["prompt"]), list(rows["answer"])
    max_new = max_new_tokens or default_max_new_tokens(prompts, answers, tokenizer)
    cut: list[bool] = []
    samples = sample_completions(model, tokenizer, prompts, n, temperature, max_new, batch_size, seed, cut=cut)
    warning = cut_warning(f"{where} (pass@k samples)", cut, max_new)
    correct = [sum(answers_match(c, a) for c in cs) for cs, a in zip(samples, answers, strict=True)]
    return {
        "num_samples": n,
        "temperature": temperature,
        "pass@k": {str(k): float(estimate_pass_at_k(n, correct, k).mean()) for k in ks},
        "mean_sample_accuracy": sum(correct) / (n * max(len(correct), 1)),
        "cut_at_max_new_tokens": sum(cut) / max(len(cut), 1),
        "warnings": [warning] if warning else [],
    }
