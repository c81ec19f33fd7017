"""Greedy task accuracy on prompt + answer rows (the built-in verifiable tasks, or any such dataset).

A completion is correct when its final answer (:func:`posttrain.rl.rewards.extract_final_answer`: last ``\\boxed{}``,
else ``<answer>`` tag, else last number after the final ``=``) equals the answer: the rule the ``exact_match`` reward
uses, so evaluation and training reward agree.
"""

from __future__ import annotations

import torch

from posttrain.rl.rewards import answers_match


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS, the model's generation-config EOS ids and the chat template's end-of-turn token
    (:func:`posttrain.data.formatting.end_of_turn_ids`, e.g. Qwen's ``<|im_end|>``), so generation stops where the
    chat template ends a turn."""
    from posttrain.data.formatting import end_of_turn_ids

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [*(extra if isinstance(extra, list) else [extra]), *end_of_turn_ids(tokenizer)]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list, max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
    """Greedy-decode a completion for each prompt (text, or chat messages rendered through the chat template by
    :func:`posttrain.data.formatting.render_prompts`; left padding, stops at EOS)."""
    from posttrain.data.formatting import render_prompts

    prompts = render_prompts(prompts, tokenizer)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_token_ids(model, tokenizer),
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def greedy_accuracy(model, tokenizer, rows, max_new_tokens: int = 8, batch_size: int = 64) -> float:
    """Fraction of rows whose greedy completion's final answer equals ``row["answer"]`` (:func:`answers_match`, the
    ``exact_match`` reward's rule)."""
    prompts = list(rows["prompt"])
    answers = list(rows["answer"])
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    return sum(answers_match(c, a) for c, a in zip(completions, answers, strict=True)) / max(len(prompts), 1)
