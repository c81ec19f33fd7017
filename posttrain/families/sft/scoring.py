"""PoFT aligned-model scores: r_j = mean per-token log-prob of the response under aligned LLM j (docs/methods/poft.md#aligned-model-scores).

Scores are either precomputed into the data (``poft_ref_scores``: a list of M floats, or ``poft_ref_score``: already
averaged), or computed here from named aligned models, each with its own tokenizer (``posttrain poft-score`` writes
them to a file; ``method.aligned_models`` computes them before training).
"""

from __future__ import annotations

import logging
import math

from posttrain.errors import UserError

logger = logging.getLogger("posttrain")
SCORE_COLUMN = "poft_ref_score"
SCORES_COLUMN = "poft_ref_scores"


def score_rows(prompts: list, completions: list, model_paths: list[str], batch_size: int = 8, *,
               chat_template: str | None = None, system_prompt: str | None = None) -> list[list[float]]:
    """Per example, the list of mean response log-probs under each aligned model (no gradient). Each model reads the
    rows through its own chat template (:mod:`posttrain.data.formatting`: conversational rows always, plain text as
    ``chat_template`` says, default auto)."""
    from posttrain.data.formatting import apply_chat_format, command_chat_format
    from posttrain.logprobs import completion_logps
    from posttrain.loading import load_model_or_run as load_model
    from posttrain.models import load_tokenizer

    per_model = []
    for i, path in enumerate(model_paths):
        key = f"method.aligned_models.{i}"
        tok = load_tokenizer(path, key=key)
        fmt = command_chat_format(path, tok, chat_template, system_prompt)
        rows = apply_chat_format([{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)],
                                 fmt)
        model = load_model(path, key=key)
        model.eval()
        sums, counts = completion_logps(model, tok, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                                        batch_size)
        per_model.append([s / max(c, 1) for s, c in zip(sums, counts, strict=True)])
        logger.info("scored %d rows with aligned model %s", len(prompts), path)
        del model
    return [list(scores) for scores in zip(*per_model, strict=True)]


def attach_scores(ds, params, key: str = "data.train"):
    """Return ``ds`` with a float ``poft_ref_score`` column (the mean over aligned LLMs), validated per row."""
    if params.aligned_models:
        check_scores(ds, params, key)
        scores = score_rows(list(ds["prompt"]), list(ds["completion"]), params.aligned_models, params.scoring_batch_size)
        ds = ds.add_column(SCORES_COLUMN, scores) if SCORES_COLUMN not in ds.column_names else ds
        values = [sum(s) / len(s) for s in scores]
        _check_finite(values, key)
    else:
        values = _data_scores(ds, key)
    if SCORE_COLUMN in ds.column_names:
        ds = ds.remove_columns(SCORE_COLUMN)
    return ds.add_column(SCORE_COLUMN, values)


def check_scores(ds, params, key: str = "data.train") -> None:
    """Everything :func:`attach_scores` checks that needs no model (preflight): the aligned models are model folders
    or hub ids with prompt/completion rows to score, or else the data carries a finite score for every row."""
    if not params.aligned_models:
        _data_scores(ds, key)
        return
    from posttrain.models import resolve_model_path

    if "prompt" not in ds.column_names or "completion" not in ds.column_names:
        raise UserError(f"{key}: scoring with method.aligned_models needs prompt/completion columns")
    for i, path in enumerate(params.aligned_models):
        resolve_model_path(path, key=f"method.aligned_models[{i}]")


def _data_scores(ds, key: str) -> list[float]:
    """Each row's mean aligned score from the data (``poft_ref_scores`` lists or ``poft_ref_score``)."""
    if SCORES_COLUMN in ds.column_names:
        values = []
        for i, scores in enumerate(ds[SCORES_COLUMN]):
            if not isinstance(scores, list) or not scores or any(s is None for s in scores):
                raise UserError(f"{key}: row {i}: '{SCORES_COLUMN}' must be a non-empty list of numbers")
            values.append(sum(float(s) for s in scores) / len(scores))
    elif SCORE_COLUMN in ds.column_names:
        values = [float("nan") if v is None else float(v) for v in ds[SCORE_COLUMN]]
    else:
        raise UserError(
            f"{key}: method poft needs a '{SCORES_COLUMN}' or '{SCORE_COLUMN}' column, or method.aligned_models "
            "to score the data (see `posttrain poft-score`)"
        )
    _check_finite(values, key)
    return values


def _check_finite(values: list[float], key: str) -> None:
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise UserError(f"{key}: row {i}: PoFT aligned score is missing or not finite")
