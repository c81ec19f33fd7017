"""Greedy task accuracy on prompt + answer rows (the built-in verifiable tasks, or any such dataset).

A completion is correct when its final answer (:func:`posttrain.rl.rewards.extract_final_answer`: last ``\\boxed{}``,
else ``<answer>`` tag, else last number after the final ``=``) equals the answer: the rule the ``exact_match`` reward
uses, so evaluation and training reward agree. Every accuracy path generates up to ``eval.max_new_tokens`` tokens
(default :func:`default_max_new_tokens`: 256 for chat prompts) and warns when many completions reach that limit
without ending.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from posttrain.rl.rewards import answers_match

logger = logging.getLogger("posttrain")

# Generation length of every accuracy path (data.test before/after and during training, posttrain eval, pass@k):
# ``eval.max_new_tokens`` / ``--max-new-tokens``, else :func:`default_max_new_tokens`.
CHAT_MAX_NEW_TOKENS = 256  # prompts given to a chat template: room for a chat model's reply
PLAIN_MIN_NEW_TOKENS = 32  # plain-text prompts: 4x the longest reference answer, at least this
CUT_WARNING_FRACTION = 0.1  # warn when at least this fraction of completions reached the limit without ending


def default_max_new_tokens(prompts: list, answers: list, tokenizer) -> int:
    """The generation length when none is set: :data:`CHAT_MAX_NEW_TOKENS` when a prompt is conversational (it goes
    through the chat template: a chat model reasons before it answers), else 4x the longest reference answer in
    tokens, at least :data:`PLAIN_MIN_NEW_TOKENS` (completion-style tasks such as ``a+b=``). Generation stops at
    the end of turn or EOS, so a model that answers briefly costs no more; the cut warning says when it is short."""
    from posttrain.data.formatting import is_conversation

    if any(is_conversation(p) for p in prompts):
        return CHAT_MAX_NEW_TOKENS
    longest = max((len(tokenizer(str(a), add_special_tokens=False)["input_ids"]) for a in answers), default=0)
    return max(PLAIN_MIN_NEW_TOKENS, 4 * longest)


def command_max_new_tokens(model_path: str, given: int | None) -> int | None:
    """The generation length of a command given a model (``posttrain eval``): ``given``, else the run's
    ``eval.max_new_tokens`` (its ``recipe.yaml``) for a run folder, else None (:func:`default_max_new_tokens`)."""
    if given is not None:
        return given
    from pathlib import Path

    recipe_file = Path(str(model_path)).expanduser() / "recipe.yaml"
    if recipe_file.is_file():
        import yaml

        value = ((yaml.safe_load(recipe_file.read_text()) or {}).get("eval") or {}).get("max_new_tokens")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def cut_warning(where: str, cut: list[bool], max_new_tokens: int) -> str | None:
    """The warning for completions that reached ``max_new_tokens`` without ending, when they are many."""
    n, k = len(cut), sum(cut)
    if not n or k / n < CUT_WARNING_FRACTION:
        return None
    return (f"{where}: {k} of {n} completions ({100 * k / n:.0f}%) reached max_new_tokens={max_new_tokens} without "
            "ending, so their answers may be cut off (raise eval.max_new_tokens, or --max-new-tokens of posttrain "
            "eval)")


def generated_cut(new_tokens: torch.Tensor, stop_ids: list[int], max_new_tokens: int) -> list[bool]:
    """Per generated row: whether it holds ``max_new_tokens`` tokens and no stop token (it was cut, not ended)."""
    if new_tokens.shape[1] < max_new_tokens:
        return [False] * new_tokens.shape[0]
    stopped = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device)).any(-1)
    return (~stopped).tolist()


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
def generate_completions(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int,
                         cut: list[bool] | None = None, **generate_kwargs) -> list[str]:
    """Decoded continuations of ``prompts`` (text, or chat messages rendered through the chat template by
    :func:`posttrain.data.formatting.render_prompts`), ``batch_size`` prompts per ``model.generate`` call with
    ``generate_kwargs`` (greedy or sampled; with ``num_return_sequences=n`` the n of each prompt are consecutive):
    left padding, stops at EOS or the template's end of turn, the model's train mode and the tokenizer's padding
    side restored after. ``cut``: a list that gets, per continuation, whether it reached ``max_new_tokens`` without
    ending."""
    from posttrain.data.formatting import render_prompts

    prompts = render_prompts(prompts, tokenizer)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(model, tokenizer)
    outs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
                **generate_kwargs,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            if cut is not None:
                cut.extend(generated_cut(new, stop_ids, max_new_tokens))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def greedy_completions(model, tokenizer, prompts: list, max_new_tokens: int = CHAT_MAX_NEW_TOKENS,
                       batch_size: int = 64, cut: list[bool] | None = None) -> list[str]:
    """Greedy-decode a completion for each prompt (:func:`generate_completions`)."""
    return generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                cut=cut, do_sample=False)


@dataclasses.dataclass(frozen=True)
class AccuracyResult:
    accuracy: float
    cut: list[bool]  # per row: the completion reached max_new_tokens without ending
    max_new_tokens: int

    def warning(self, where: str) -> str | None:
        return cut_warning(where, self.cut, self.max_new_tokens)


def greedy_eval(model, tokenizer, rows, max_new_tokens: int | None = None, batch_size: int = 64) -> AccuracyResult:
    """Greedy accuracy of prompt/answer rows (:func:`answers_match`, the ``exact_match`` reward's rule), with which
    completions were cut at ``max_new_tokens`` (default :func:`default_max_new_tokens`)."""
    prompts, answers = list(rows["prompt"]), list(rows["answer"])
    max_new = max_new_tokens or default_max_new_tokens(prompts, answers, tokenizer)
    cut: list[bool] = []
    completions = greedy_completions(model, tokenizer, prompts, max_new, batch_size, cut=cut)
    correct = sum(answers_match(c, a) for c, a in zip(completions, answers, strict=True))
    return AccuracyResult(correct / max(len(prompts), 1), cut, max_new)


def greedy_accuracy(model, tokenizer, rows, max_new_tokens: int | None = None, batch_size: int = 64,
                    where: str = "data.test") -> float:
    """Fraction of rows whose greedy completion's final answer equals ``row["answer"]`` (:func:`greedy_eval`); logs a
    warning naming ``where`` when many completions were cut at the generation limit."""
    result = greedy_eval(model, tokenizer, rows, max_new_tokens, batch_size)
    warning = result.warning(where)
    if warning:
        logger.warning("%s", warning)
    return result.accuracy
