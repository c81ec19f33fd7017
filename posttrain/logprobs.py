"""Per-token log-probs of completions under a model, tile by tile (TRL's fused LM head; no full logits)."""

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
    """Per example: (sum of completion-token log-probs, completion token count). Rows are tokenised by
    :func:`posttrain.data.formatting.tokenize_prompt_completion`: plain text gets EOS appended to the completion,
    conversational rows go through the chat template and score the completion's assistant turns, each with its
    end-of-turn token."""
    from posttrain.data.formatting import tokenize_prompt_completion

    ensure_fused_head(model)
    device = next(model.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(prompts), batch_size):
        ids, labels = [], []
        for prompt, completion in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            row = tokenize_prompt_completion(prompt, completion, tokenizer)
            ids.append(row.input_ids)
            labels.append(row.labels())
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
        out = model(input_ids=input_ids, attention_mask=attn, labels=lab, fused_lm_head=True)
        sums.extend((out.log_probs.float() * out.label_mask).sum(-1).tolist())
        counts.extend(out.label_mask.sum(-1).tolist())
    return sums, counts
