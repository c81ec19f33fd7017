"""``posttrain check RECIPE --show N``: the first training rows as the trainer sees them, before any model loads.

Each row is tokenised by the code the trainer runs on it: the SFT and preference families call their trainer's own
dataset preparation (TRL's tokenisation, posttrain's assistant-turn masks of conversational rows,
:mod:`posttrain.data.formatting`) on an instance that holds no model; the unlearning family its ``tokenize_rows``;
RL prompts are rendered as the generation sees them. For each row it shows the text with the tokens the loss (or the
preference score) is on marked ``⟦…⟧``, the token counts and what ``training.max_length`` cuts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from posttrain.families.base import FAMILIES
from posttrain.registry import load

OPEN, CLOSE = "⟦", "⟧"


@dataclasses.dataclass
class Sequence:
    """One token sequence of a row: its ids and loss mask (None: no loss, e.g. an RL prompt)."""

    label: str  # "" for the row's only sequence, else "chosen" / "rejected" / "prompt"
    ids: list[int]
    mask: list[int] | None
    kept: int  # tokens the trainer keeps (training.max_length, truncation_mode keep_start)
    note: str = ""  # what happens to the row beyond truncation (dropped, ...)


@dataclasses.dataclass
class RowPreview:
    key: str
    index: int
    sequences: list[Sequence]


def _kept(length: int, config) -> int:
    max_length = getattr(config, "max_length", None)
    return length if max_length is None else min(length, max_length)


def _prepared(trainer_cls, config, fields: dict[str, Any], *args):
    """``trainer_cls._prepare_dataset(*args)`` without ``max_length`` (the full rows), on an instance that has only
    the attributes that method reads (``fields``): the trainer's own tokenisation, with no model."""
    from posttrain.trainers.common import _NoMaxLength

    trainer = trainer_cls.__new__(trainer_cls)
    for name, value in fields.items():
        setattr(trainer, name, value)
    with _NoMaxLength(config):
        return trainer._prepare_dataset(*args)


def sft_rows(ctx, rows, key: str) -> list[RowPreview]:
    from posttrain.families.sft.trainer import PosttrainSFTTrainer

    config, tok = ctx["config"], ctx["tokenizer"]
    first = rows[0]
    completion_only = config.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in first and "completion" in first
    ds = _prepared(PosttrainSFTTrainer, config, {"_tokenizer": tok, "completion_only_loss": completion_only,
                                                  "chat_template": None},
                   rows, tok, config, False, None, key.split(".", 1)[1])
    out = []
    for i in range(len(ds)):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        kept = _kept(len(ids), config)
        note = "" if any(label != -100 for label in labels[:kept]) else "dropped: no token with loss is left"
        out.append(RowPreview(key, i, [Sequence("", ids, [int(label != -100) for label in labels], kept, note)]))
    return out


def preference_rows(ctx, rows, key: str) -> list[RowPreview]:
    from posttrain.families.preference.trainer import PosttrainPreferenceTrainer

    config, tok = ctx["config"], ctx["tokenizer"]
    ds = _prepared(PosttrainPreferenceTrainer, config, {"_tokenizer": tok, "args": config,
                                                         "assistant_turns": ctx["recipe"].data.assistant_turns},
                   rows, tok, config, key.split(".", 1)[1])
    out = []
    for i in range(len(ds)):
        row, seqs = ds[i], []
        prompt = list(row["prompt_ids"])
        for side in ("chosen", "rejected"):
            completion = list(row[f"{side}_ids"])
            scored = list(row.get(f"{side}_mask") or [1] * len(completion))
            ids = prompt + completion
            kept = _kept(len(ids), config)
            note = ("dropped: the prompt alone fills training.max_length" if config.max_length is not None and
                    config.truncation_mode == "keep_start" and len(prompt) >= config.max_length else "")
            seqs.append(Sequence(side, ids, [0] * len(prompt) + scored, kept, note))
        out.append(RowPreview(key, i, seqs))
    return out


def unpaired_rows(ctx, rows, key: str) -> list[RowPreview]:
    from posttrain.families.unpaired.trainer import TURN_MASK, PosttrainKTOTrainer

    config, tok, params = ctx["config"], ctx["tokenizer"], ctx["recipe"].params
    ds = _prepared(PosttrainKTOTrainer, config, {"_tokenizer": tok, "calculate_KL": False,
                                                  "assistant_turns": ctx["recipe"].data.assistant_turns,
                                                  "desirable_weight": params.desirable_weight,
                                                  "undesirable_weight": params.undesirable_weight},
                   rows, tok, config, key.split(".", 1)[1])
    out = []
    for i in range(len(ds)):
        row = ds[i]
        prompt, completion = list(row["prompt_ids"]), list(row["completion_ids"])
        scored = list(row.get(TURN_MASK) or [1] * len(completion))
        ids = prompt + completion
        note = ("dropped: the prompt alone fills training.max_length" if config.max_length is not None and
                len(prompt) >= config.max_length else "")
        side = "desirable" if row["label"] else "undesirable"
        out.append(RowPreview(key, i, [Sequence(side, ids, [0] * len(prompt) + scored, _kept(len(ids), config),
                                                note)]))
    return out


def reward_rows(ctx, rows, key: str) -> list[RowPreview]:
    from posttrain.families.reward.trainer import tokenize_pairs

    config, tok = ctx["config"], ctx["tokenizer"]
    ids = tokenize_pairs(rows, tok)
    out = []
    for i in range(len(rows)):
        seqs = []
        for side in ("chosen", "rejected"):
            seq = ids[f"{side}_ids"][i]
            long = config.max_length is not None and len(seq) > config.max_length
            note = "dropped: longer than training.max_length" if long else "the score is read at the last token"
            seqs.append(Sequence(side, seq, [0] * (len(seq) - 1) + [1], len(seq), note))
        out.append(RowPreview(key, i, seqs))
    return out


def unlearning_rows(ctx, rows, key: str) -> list[RowPreview]:
    from posttrain.families.unlearning.trainer import tokenize_rows

    config, tok = ctx["config"], ctx["tokenizer"]
    full = tokenize_rows(rows, tok, 2**31 - 1, key)
    out = []
    for i, (ids, labels) in enumerate(full):
        kept = _kept(len(ids), config)
        note = "" if any(label != -100 for label in labels[:kept]) else "dropped: the answer is cut away entirely"
        out.append(RowPreview(key, i, [Sequence("", ids, [int(label != -100) for label in labels], kept, note)]))
    return out


def rl_rows(ctx, rows, key: str) -> list[RowPreview]:
    from posttrain.data.formatting import render_prompt

    tok = ctx["tokenizer"]
    out = []
    for i in range(len(rows)):
        text = render_prompt(rows[i]["prompt"], tok, f"{key}: row {i}")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append(RowPreview(key, i, [Sequence("prompt", ids, None, len(ids),
                                                "the model generates the completion; its tokens carry the loss")]))
    return out


def preview_rows(recipe, info, config, tokenizer, datasets: dict[str, Any], n: int) -> list[RowPreview]:
    """The first ``n`` rows of the family's training data (for unlearning: ``data.forget`` then ``data.retain``), as
    the trainer tokenises them; ``datasets`` are preflight's, after
    :func:`posttrain.run.preflight.prepare_chat_format`."""
    family = FAMILIES[info.family]
    previewer = load(family.preview)
    ctx = {"recipe": recipe, "config": config, "tokenizer": tokenizer}
    out = []
    for k in family.preview_keys:
        rows = datasets.get(k)
        if rows is not None and len(rows):
            out += previewer(ctx, rows.select(range(min(n, len(rows)))), k)
    return out


def _marked_text(tokenizer, ids: list[int], mask: list[int] | None) -> str:
    if mask is None:
        return tokenizer.decode(ids)
    parts, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            text = tokenizer.decode(ids[start:t])
            parts.append(f"{OPEN}{text}{CLOSE}" if mask[start] else text)
            start = t
    return "".join(parts)


def format_preview(rows: list[RowPreview], tokenizer, config) -> str:
    """The rows as text: a header per sequence (tokens, tokens with loss, truncation), then the marked text."""
    max_length = getattr(config, "max_length", None)
    mode = getattr(config, "truncation_mode", "keep_start")
    lines = []
    for row in rows:
        for seq in row.sequences:
            name = f"{row.key} row {row.index}" + (f" ({seq.label})" if seq.label else "")
            head = f"{len(seq.ids)} tokens"
            if seq.mask is not None:
                head += f", {sum(seq.mask[: seq.kept])} with loss {OPEN}…{CLOSE}"
            if seq.kept < len(seq.ids):
                head += (f"; truncated to training.max_length={max_length} ({mode}): {len(seq.ids) - seq.kept} tokens "
                         "are cut")
            if seq.note:
                head += f"; {seq.note}"
            lines.append(f"--- {name}: {head}")
            ids, mask = seq.ids, seq.mask
            if seq.kept < len(ids):
                sl = slice(None, seq.kept) if mode == "keep_start" else slice(len(ids) - seq.kept, None)
                ids, mask = ids[sl], (mask[sl] if mask is not None else None)
            lines.append(_marked_text(tokenizer, ids, mask))
    return "\n".join(lines)


def check_recipe(path: str, overrides: list[str], show: int = 0, write=print) -> None:
    """``posttrain check``: every check of ``posttrain train`` that needs no model (each stage of a multi-stage
    recipe), and with ``show`` the first rows of the training data as the trainer sees them (loads the tokenizer
    only). Writes nothing to the recipe's ``output_dir``."""
    from posttrain.recipe import load_recipe_stages
    from posttrain.run.pipeline import (check_report_to, load_run_tokenizer, prepare_chat_format, preflight,
                                        setup_logging)

    setup_logging()
    for name, recipe in load_recipe_stages(path, overrides):
        where = f"stage {name}: " if name else ""
        check_report_to(recipe)
        info, config, datasets = preflight(recipe)
        write(f"ok: {where}{path} passes every check that needs no model (method {info.name}, {info.family} family)")
        if not show:
            continue
        if str(recipe.model.path).startswith("stage:"):
            write(f"{where}--show: the model is {recipe.model.path}, not trained yet: no rows shown")
            continue
        tokenizer = load_run_tokenizer(recipe)
        prepare_chat_format(recipe, info, config, tokenizer, datasets)
        rows = preview_rows(recipe, info, config, tokenizer, datasets, show)
        write(f"{where}the first rows as the trainer sees them ({OPEN}…{CLOSE}: the tokens the loss is on):")
        write(format_preview(rows, tokenizer, config))
