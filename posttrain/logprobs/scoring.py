"""Scoring whole datasets with the engine (no gradient): per-example completion log-likelihoods for evaluation
(unlearning metrics, PoFT's aligned-model scores, tests), and the patch for TRL's fused head that the trainers call
until they use the engine (issue #25, second part)."""

from __future__ import annotations

import torch


def ensure_fused_head(model) -> None:
    """Patch ``model`` once with ``trl``'s fused LM head so ``model(..., fused_lm_head=True)`` returns log-probs."""
    from trl.trainer.utils import add_fused_lm_head

    if not getattr(model, "_posttrain_fused_head", False):
        add_fused_lm_head(model)
        model._posttrain_fused_head = True


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list, completions: list, batch_size: int = 8):
    """Per example: (sum of completion-token log-probs, completion token count), through
    :class:`posttrain.logprobs.engine.LogProbEngine` (completion rows only; head ``auto``). Rows are tokenised by
    :func:`posttrain.data.formatting.tokenize_prompt_completion`: plain text gets EOS appended to the completion,
    conversational rows go through the chat template and score the completion's assistant turns, each with its
    end-of-turn token. A completion token in the first column (an empty prompt) has nothing to be predicted from and
    is not counted."""
    from posttrain.data.formatting import tokenize_prompt_completion
    from posttrain.logprobs.engine import LogProbEngine

    engine = LogProbEngine()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(prompts), batch_size):
        ids, scored = [], []
        for prompt, completion in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            row = tokenize_prompt_completion(prompt, completion, tokenizer)
            ids.append(row.input_ids)
            scored.append([0] + [int(x != -100) for x in row.labels()[1:]])
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([x + [0] * (width - len(x)) for x in scored], device=device)
        out = engine.forward(model, input_ids, attn, mask)
        sums.extend(out.logps.sum(-1).tolist())
        counts.extend(out.mask.sum(-1).tolist())
    return sums, counts
