"""TOFU-style evaluation of an unlearned model on the built-in fictitious-facts task (``posttrain eval --suite tofu``).

Runs a model over four sets of :mod:`posttrain.data.facts` and reduces them with the pure metrics of
:mod:`posttrain.eval.unlearning_metrics` (open-unlearning definitions, docs/methods/npo.md#tofu-evaluation-metrics):

* ``forget`` (``forgetNN``): ``forget_Q_A_Prob``, ``forget_Q_A_ROUGE``, ``forget_truth_ratio`` (closer-to-1 aggregate)
  and ``forget_quality``: the KS-test p-value between this model's per-question truth ratios on the forget set and a
  retain model's (a model fine-tuned without the forget set, e.g. ``builtin:tiny-qwen2-facts-retain95``, or the JSON
  of an earlier eval of it). ``None`` without one.
* ``retain`` (``retainNN``): ``retain_Q_A_Prob``, ``retain_Q_A_ROUGE``, ``retain_Truth_Ratio`` (``max(0, 1 - TR)``).
* ``holdout`` (``holdoutNN``, people never trained on): ``holdout_Q_A_Prob``, ``holdout_Q_A_ROUGE``,
  ``holdout_truth_ratio`` (closer-to-1, as for the forget set: what a model that never saw them does).
* ``wf`` (``world``, facts the base fine-tuning included; TOFU's world facts): ``wf_Q_A_Prob``,
  ``wf_Q_A_Prob_normalised`` (paraphrased answer vs its perturbed variants), ``wf_Q_A_ROUGE``, ``wf_Truth_Ratio``.
* ``model_utility``: the harmonic mean of the retain and world-facts values (six values: TOFU's nine less the
  real-authors set, which this task does not have).

Answer probabilities use prompt + answer + EOS (the training format); ROUGE-L recall is of greedy generations
(``max_new_tokens`` tokens, left padding) against the answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.errors import UserError
from posttrain.eval import unlearning_metrics as um

FORGET_SPLITS = {"forget01": ("retain99", "holdout01"), "forget05": ("retain95", "holdout05"),
                 "forget10": ("retain90", "holdout10")}
UTILITY_KEYS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")
RESULT_FILE = "unlearning_eval.json"
logger = logging.getLogger("posttrain")


def _avg_losses(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int) -> np.ndarray:
    from posttrain.logprobs import completion_logps

    sums, counts = completion_logps(model, tokenizer, prompts, answers, batch_size=batch_size)
    return -np.asarray(sums, dtype=np.float64) / np.maximum(np.asarray(counts, dtype=np.float64), 1.0)


def has_truth_ratio_columns(rows: list[dict]) -> bool:
    """Whether rows carry ``paraphrased_answer`` and a non-empty ``perturbed_answers`` (truth ratio, normalised
    probability)."""
    return bool(rows) and all(r.get("paraphrased_answer") and r.get("perturbed_answers") for r in rows)


def score_set(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 48, batch_size: int = 32,
              generate: bool = True) -> dict[str, Any]:
    """Per-question arrays for one set: ``avg_loss`` (answer), ``rouge``, and, for rows with a paraphrased answer and
    perturbed answers (:func:`has_truth_ratio_columns`), ``para``, ``pert`` ``[N, K]`` and ``tr``."""
    from posttrain.eval.accuracy import greedy_completions

    prompts = [r["prompt"] for r in rows]
    out: dict[str, Any] = {"n": len(rows)}
    out["avg_loss"] = _avg_losses(model, tokenizer, prompts, [r["completion"] for r in rows], batch_size)
    if has_truth_ratio_columns(rows):
        k = len(rows[0]["perturbed_answers"])
        out["para"] = _avg_losses(model, tokenizer, prompts, [r["paraphrased_answer"] for r in rows], batch_size)
        pert = _avg_losses(model, tokenizer, [p for p in prompts for _ in range(k)],
                           [a for r in rows for a in r["perturbed_answers"][:k]], batch_size)
        out["pert"] = pert.reshape(len(rows), k)
        out["tr"] = um.truth_ratios(out["para"], out["pert"])
    if generate:
        gens = greedy_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        out["generations"] = gens
        from posttrain.data.formatting import content_text

        out["rouge"] = np.asarray([um.rouge_l_recall(content_text(r["completion"]), g) for r, g in zip(rows, gens)])
    return out


def forget_truth_ratios(model, tokenizer, forget_split: str = "forget05", options: dict | None = None,
                        max_samples: int | None = None, batch_size: int = 32, chat=None) -> np.ndarray:
    """Per-question truth ratios on the forget split (what a retain model contributes to ``forget_quality``)."""
    from posttrain.data.facts import facts_rows
    from posttrain.data.formatting import apply_chat_format

    rows = apply_chat_format(facts_rows(forget_split, **(options or {}))[:max_samples], chat)
    return score_set(model, tokenizer, rows, batch_size=batch_size, generate=False)["tr"]


def evaluate_unlearning(model, tokenizer, *, forget_split: str = "forget05", retain_tr=None,
                        options: dict | None = None, max_samples: int | None = None, max_new_tokens: int = 48,
                        batch_size: int = 32, chat=None) -> dict[str, Any]:
    """All TOFU-style metrics of ``model`` (see the module docstring); ``retain_tr`` = the retain model's per-question
    forget-set truth ratios (``None``: ``forget_quality`` is ``None``)."""
    from posttrain.data.facts import facts_rows

    if forget_split not in FORGET_SPLITS:
        raise UserError(f"--forget-split: expected one of {', '.join(FORGET_SPLITS)}, got '{forget_split}'")
    retain_split, holdout_split = FORGET_SPLITS[forget_split]
    opts = dict(options or {})
    try:
        sets = {name: facts_rows(split, **opts)[:max_samples] for name, split in
                (("forget", forget_split), ("retain", retain_split), ("holdout", holdout_split), ("wf", "world"))}
    except (TypeError, ValueError) as exc:
        raise UserError(f"facts options: {exc}") from None
    from posttrain.data.formatting import apply_chat_format, content_text

    sets = {name: apply_chat_format(rows, chat) for name, rows in sets.items()}  # chat: a ChatFormat (or None)
    res = evaluate_sets(model, tokenizer, sets, retain_tr=retain_tr, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, key="--retain-model")
    scored = res.pop("_scored")
    res["warnings"] = res.pop("_warnings")
    res["forget_truth_ratio_values"] = [float(x) for x in scored["forget"]["tr"]]
    res["n"] = {name: s["n"] for name, s in scored.items()}
    res["forget_split"] = forget_split
    res["samples"] = {name: [{"prompt": r["prompt"], "answer": content_text(r["completion"]), "generation": g}
                             for r, g in zip(sets[name][:3], scored[name]["generations"][:3])] for name in sets}
    return res


# Truth-ratio aggregation of each set (open-unlearning): forget and holdout closer-to-1, retain and world true-better.
TRUTH_RATIO_KEYS = {"forget": ("forget_truth_ratio", "closer_to_1_better"),
                    "holdout": ("holdout_truth_ratio", "closer_to_1_better"),
                    "retain": ("retain_Truth_Ratio", "true_better"),
                    "wf": ("wf_Truth_Ratio", "true_better")}


def evaluate_sets(model, tokenizer, sets: dict[str, list[dict]], *, retain_tr=None, max_new_tokens: int = 48,
                  batch_size: int = 32, key: str = "retain_model") -> dict[str, Any]:
    """The metrics of whichever of the sets ``forget``, ``retain``, ``holdout``, ``wf`` are given.

    Every set gives ``<set>_Q_A_Prob`` and ``<set>_Q_A_ROUGE``; sets whose rows carry paraphrased and perturbed
    answers also give their truth ratio (:data:`TRUTH_RATIO_KEYS`), ``wf`` its ``wf_Q_A_Prob_normalised``.
    ``model_utility`` is given when all of :data:`UTILITY_KEYS` are, ``forget_quality`` when ``retain_tr`` is (the
    retain model's per-question truth ratios on the same forget rows). ``_scored`` holds the per-set arrays.
    """
    scored = {name: score_set(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
              for name, rows in sets.items() if rows}
    res: dict[str, Any] = {}
    for name, s in scored.items():
        res[f"{name}_Q_A_Prob"] = um.mean_answer_probability(s["avg_loss"])
        res[f"{name}_Q_A_ROUGE"] = float(np.mean(s["rouge"]))
    for name, (metric, aggregator) in TRUTH_RATIO_KEYS.items():
        if name in scored and "tr" in scored[name]:
            res[metric] = um.aggregate_truth_ratio(scored[name]["tr"], aggregator)
    if "wf" in scored and "tr" in scored["wf"]:
        res["wf_Q_A_Prob_normalised"] = float(np.mean(um.normalised_probability(scored["wf"]["para"],
                                                                                 scored["wf"]["pert"])))
    forget_tr = scored.get("forget", {}).get("tr")
    if retain_tr is not None and (forget_tr is None or len(retain_tr) != len(forget_tr)):
        raise UserError(
            f"{key}: its forget-set truth ratios cover {len(retain_tr)} questions, this eval "
            f"{0 if forget_tr is None else len(forget_tr)} (use the same --forget-split and --max-samples)"
        )
    res["forget_quality"] = um.forget_quality(forget_tr, retain_tr) if forget_tr is not None else None
    if all(k in res for k in UTILITY_KEYS):
        res["model_utility"] = um.model_utility({k: res[k] for k in UTILITY_KEYS})
    res["_scored"] = scored
    res["_warnings"] = empty_generation_warnings(scored)
    for warning in res["_warnings"]:
        logger.warning("%s", warning)
    return res


def empty_generation_warnings(scored: dict[str, dict[str, Any]], metrics: dict[str, str] | None = None) -> list[str]:
    """A warning per set where most greedy generations are empty: its ROUGE (``metrics[set]``, default
    ``<set>_Q_A_ROUGE``; and so model_utility) then measures the prompt format, not what the model knows (a chat model
    ending its turn at once on a raw-text prompt)."""
    out = []
    for name, s in scored.items():
        gens = s.get("generations") or []
        empty = sum(1 for g in gens if not g.strip())
        if gens and empty * 2 > len(gens):
            metric = (metrics or {}).get(name, f"{name}_Q_A_ROUGE")
            out.append(f"{name}: {empty} of {len(gens)} greedy generations are empty (the model ends at once), so "
                       f"{metric} is near 0 whatever the model knows; check the prompt format (data.chat_template "
                       "/ --chat-template: a chat model needs its template)")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Command line (posttrain eval MODEL --suite tofu)
# --------------------------------------------------------------------------------------------------------------------


def _retain_truth_ratios(spec: str | None, forget_rows: list[dict], data: dict[str, str], batch_size,
                         chat_template=None, system_prompt=None):
    """The retain model's per-question truth ratios on the same forget rows (a model, or the JSON of an earlier
    ``--suite tofu`` eval of it on the same forget set)."""
    if spec is None:
        return None
    if not has_truth_ratio_columns(forget_rows):
        raise UserError("--retain-model: forget_quality compares truth ratios, which need 'paraphrased_answer' and "
                        "'perturbed_answers' columns in the forget set")
    path = Path(spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"--retain-model: file '{spec}' not found")
        saved = json.loads(path.read_text())
        if "forget_truth_ratio_values" not in saved:
            raise UserError(f"--retain-model: {spec} has no forget_truth_ratio_values (not a --suite tofu result)")
        theirs = (saved.get("data") or {}).get("forget", "").split(" (")[0] or f"builtin:facts {saved.get('forget_split')}"
        mine = data["forget"].split(" (")[0]
        if theirs != mine:
            raise UserError(f"--retain-model: {spec} was evaluated on forget set '{theirs}', this eval on '{mine}'")
        return np.asarray(saved["forget_truth_ratio_values"])
    from posttrain.data.formatting import apply_chat_format, command_chat_format
    from posttrain.loading import load_model_or_run as load_model
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(spec, key="--retain-model")
    chat = command_chat_format(spec, tok, chat_template, system_prompt)
    model = load_model(spec, key="--retain-model")
    return score_set(model, tok, apply_chat_format(forget_rows, chat), batch_size=batch_size, generate=False)["tr"]


def format_table(res: dict[str, Any], model: str, retain_model: str | None) -> str:
    def f(x):
        return "-" if x is None else f"{x:.4f}"

    lines = [f"TOFU-style unlearning eval of {model}", "data:"]
    lines += [f"  {role:<8} {text}" for role, text in res["data"].items()]
    lines.append(f"{'set':<9}{'n':>5}  {'Q_A_Prob':>9}  {'ROUGE-L':>8}  {'truth ratio':>11}")
    tr_key = {name: metric for name, (metric, _) in TRUTH_RATIO_KEYS.items()}
    for name in ("forget", "retain", "holdout", "wf"):
        if name in res["n"]:
            lines.append(f"{name:<9}{res['n'][name]:>5}  {f(res.get(f'{name}_Q_A_Prob')):>9}  "
                         f"{f(res.get(f'{name}_Q_A_ROUGE')):>8}  {f(res.get(tr_key[name])):>11}")
    if "wf_Q_A_Prob_normalised" in res:
        lines.append(f"wf_Q_A_Prob_normalised  {f(res['wf_Q_A_Prob_normalised'])}")
    fq = f(res["forget_quality"]) if retain_model else "- (no --retain-model)"
    lines.append(f"forget_quality          {fq}  (higher is better: KS p-value of forget-set truth ratios vs the "
                 "retain model's)")
    mu = res.get("model_utility")
    lines.append(f"model_utility           {f(mu)}" + ("" if mu is not None else "  (needs the retain and world-facts "
                                                         "sets with truth-ratio columns)"))
    return "\n".join(lines)


def cli_eval(args) -> int:
    """``posttrain eval MODEL --suite tofu [--forget SRC --retain SRC --holdout SRC] [--forget-split S]
    [--retain-model M|JSON] [--output FILE]``: the run's own data.forget / data.retain (or the overrides; see
    :mod:`posttrain.eval.unlearning_data`)."""
    from posttrain.data.formatting import apply_chat_format, command_chat_format, content_text
    from posttrain.eval.unlearning_data import cli_sources, describe, load_rows, resolve_sources
    from posttrain.loading import load_model_or_run as load_model
    from posttrain.models import load_tokenizer

    sources = resolve_sources("tofu", model=args.model, cli=cli_sources(args), forget_split=args.forget_split)
    rows = load_rows(sources, args.max_samples)  # bad data: one error line before any model loads
    data = describe(sources, rows)
    tok = load_tokenizer(args.model, key="MODEL")
    chat = command_chat_format(args.model, tok, args.chat_template, args.system_prompt)
    model = load_model(args.model, key="MODEL")
    retain_tr = _retain_truth_ratios(args.retain_model, rows["forget"], data, args.batch_size, args.chat_template,
                                     args.system_prompt)
    sets = {role: apply_chat_format(r, chat) for role, r in rows.items()}
    res = evaluate_sets(model, tok, sets, retain_tr=retain_tr, max_new_tokens=args.max_new_tokens or 48,
                        batch_size=args.batch_size, key="--retain-model")
    scored = res.pop("_scored")
    res["warnings"] = res.pop("_warnings")
    res.setdefault("model_utility", None)  # needs the retain and world-facts sets with truth-ratio columns
    forget = sources["forget"].source
    res["forget_truth_ratio_values"] = [float(x) for x in scored["forget"].get("tr", [])]
    res["n"] = {name: s["n"] for name, s in scored.items()}
    res["data"] = data
    res["forget_split"] = None if isinstance(forget, list) else forget.split
    res["samples"] = {name: [{"prompt": r["prompt"], "answer": content_text(r["completion"]), "generation": g}
                             for r, g in zip(sets[name][:3], scored[name]["generations"][:3])] for name in scored}
    res = {"model": args.model, "retain_model": args.retain_model, **res}
    out = Path(args.output) if args.output else (Path(args.model) / RESULT_FILE if Path(args.model).is_dir() else None)
    if out is not None:
        out.write_text(json.dumps(res, indent=2) + "\n")
    print(format_table(res, args.model, args.retain_model))
    for warning in res["warnings"]:
        print(f"warning: {warning}")
    if out is not None:
        print(f"wrote {out}")
    return 0
