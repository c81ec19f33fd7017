"""MUSE-style unlearning evaluation (``posttrain eval MODEL --suite unlearning``, and ``eval.suites: [unlearning]``
during training): membership inference, privacy leakage, verbatim and knowledge memorisation, extraction strength,
exact memorisation, and utility.

The sets (each a list of rows, resolved by :mod:`posttrain.eval.unlearning_data`):

* ``forget`` / ``holdout``: the rows a membership-inference attack tells apart (trained on vs never seen). Each
  attack of :data:`posttrain.eval.unlearning_metrics.MIA_ATTACKS` scores every row; ``mia_<attack>`` is the AUC
  between the two sets. ``privleak`` is MUSE's relative difference of the Min-K% AUC from a retain model's (or from
  0.5 without one, labelled as such).
* ``verbmem``: prompts whose completion the model should no longer reproduce verbatim: ``verbmem_f`` (ROUGE-L F1 of
  the greedy continuation), ``extraction_strength`` and ``exact_memorization`` (teacher-forced argmax matches).
* ``forget_qa`` / ``retain_qa``: questions about the forget and the retain data: ``knowmem_f`` / ``knowmem_r``
  (ROUGE-L F1 of greedy answers cut at MUSE's stop words). ``knowmem_r`` is the utility the suite reports itself;
  ``posttrain eval --lm-eval TASKS`` adds lm-evaluation-harness benchmarks.

Rows are ``{prompt, completion}``, plain or conversational, rendered as everywhere else
(:func:`posttrain.data.formatting.tokenize_prompt_completion`: a plain completion gets the tokenizer's EOS; a
conversational one is scored on its assistant turns and their end-of-turn tokens). The metric
definitions (pure functions, hand-checked tests) are in :mod:`posttrain.eval.unlearning_metrics`;
docs/unlearning.md#evaluation-posttrain-eval-model---suite-unlearning documents them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.eval import unlearning_metrics as um

logger = logging.getLogger("posttrain")

MIN_K = 0.4  # MUSE's privleak attack is Min-40%; open-unlearning's mia_min_k / mia_min_k_plus_plus configs use 0.4
PRIVLEAK_ATTACK = "min_k"
VERBMEM_MAX_NEW_TOKENS = 128  # MUSE verbmem
KNOWMEM_MAX_NEW_TOKENS = 32  # MUSE knowmem
RESULT_FILE = "unlearning_suite_eval.json"


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    """What a metric measures, on which sets, and which way is better (printed next to every value)."""

    what: str
    sets: str
    better: str  # in words
    short: str  # the table's column: lower | higher | ~retain | ~0


MIA_BETTER = "closer to the retain model's AUC (0.5: forget and holdout look alike; 1: the forget set looks trained on)"
FORGET_BETTER = "lower, down to the retain model's value (a model that never saw the forget set)"
METRICS: dict[str, MetricInfo] = {
    **{f"mia_{a.name}": MetricInfo(f"membership-inference AUC, {a.name} attack", "forget vs holdout", MIA_BETTER,
                                   "~retain") for a in um.MIA_ATTACKS},
    "privleak": MetricInfo("MUSE privacy leakage: relative difference of the Min-K% AUC from the reference's, in %",
                           "forget vs holdout", "closer to 0 (< 0: the forget set is still detectable; > 0: "
                           "over-unlearned)", "~0"),
    "verbmem_f": MetricInfo("verbatim memorisation: ROUGE-L F1 of the greedy continuation", "verbmem", FORGET_BETTER,
                            "lower"),
    "extraction_strength": MetricInfo("extraction strength: 1 - the shortest fraction of the answer after which "
                                      "the rest comes out exactly", "verbmem", FORGET_BETTER, "lower"),
    "exact_memorization": MetricInfo("exact memorisation: fraction of answer tokens predicted exactly", "verbmem",
                                     FORGET_BETTER, "lower"),
    "knowmem_f": MetricInfo("knowledge memorisation: ROUGE-L F1 of greedy answers", "forget_qa", FORGET_BETTER,
                            "lower"),
    "knowmem_r": MetricInfo("knowledge kept (utility): ROUGE-L F1 of greedy answers", "retain_qa",
                            "higher, up to the start model's value", "higher"),
}


# --------------------------------------------------------------------------------------------------------------------
# Model side
# --------------------------------------------------------------------------------------------------------------------


def stats_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(logp, mu, var, match)`` per position, from next-token ``logits [n, V]`` that predict ``labels [n]``:
    the true token's log-probability, the moments of :func:`~posttrain.eval.unlearning_metrics.
    token_distribution_moments` and whether the true token is the argmax."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    logp = lp.gather(-1, labels[:, None]).squeeze(-1)
    mu, var = um.token_distribution_moments(lp)
    return logp, mu, var, lp.argmax(-1) == labels


@torch.no_grad()
def token_stats(model, tokenizer, rows: list[dict], batch_size: int = 8) -> list[um.TokenStats]:
    """:class:`~posttrain.eval.unlearning_metrics.TokenStats` of each ``{prompt, completion}`` row under ``model``
    (one forward with full logits per batch of ``batch_size`` rows: memory ``batch_size x length x vocab``)."""
    from posttrain.data.formatting import tokenize_prompt_completion

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[um.TokenStats] = []
    try:
        for start in range(0, len(rows), batch_size):
            encoded = []
            for row in rows[start : start + batch_size]:
                tokens = tokenize_prompt_completion(row["prompt"], row["completion"], tokenizer)
                ids, mask = list(tokens.input_ids), list(tokens.mask)
                if mask and mask[0]:  # the first scored token needs a predecessor
                    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad
                    ids, mask = [start_id] + ids, [0] + mask
                encoded.append((ids, mask))
            width = max(len(ids) for ids, _ in encoded)
            batch = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded], device=device)
            attn = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded], device=device)
            logits = model(input_ids=batch, attention_mask=attn).logits
            for i, (ids, mask) in enumerate(encoded):
                scored = torch.tensor([j for j, m in enumerate(mask) if m], device=device, dtype=torch.long)
                logp, mu, var, match = (t.cpu().numpy().astype(np.float64)
                                        for t in stats_from_logits(logits[i, scored - 1], batch[i, scored]))
                keep = max(1, len(scored) - 1)  # token-level metrics leave out the final EOS / end of turn
                text = tokenizer.decode([ids[j] for j in scored.tolist()], skip_special_tokens=True)
                out.append(um.TokenStats(logp=logp, text=text, token_logp=logp[:keep], mu=mu[:keep], var=var[:keep],
                                         match=match[:keep]))
    finally:
        model.train(was_training)
    return out


def greedy_rouge_f1(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int,
                    cut_stop_words: bool = False) -> tuple[np.ndarray, list[str]]:
    """Per-row ROUGE-L F1 of the greedy completion against the row's completion (cut to ``max_new_tokens`` tokens,
    as MUSE cuts its references), and the generations (cut at MUSE's stop words with ``cut_stop_words``)."""
    from posttrain.data.formatting import content_text
    from posttrain.eval.accuracy import greedy_completions

    gens = greedy_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
    if cut_stop_words:
        gens = [um.cut_at_stop_words(g) for g in gens]
    golds = []
    for row in rows:
        gold = content_text(row["completion"])
        ids = tokenizer(gold, add_special_tokens=False)["input_ids"]
        golds.append(tokenizer.decode(ids[:max_new_tokens]) if len(ids) > max_new_tokens else gold)
    return np.asarray([um.rouge_l_f1(g, x) for g, x in zip(golds, gens, strict=True)]), gens


# --------------------------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Reference:
    """A reference model for the reference attack (open-unlearning uses the retain model), with its tokenizer and
    rows formatted for it."""

    model: Any
    tokenizer: Any
    sets: dict[str, list[dict]]


def mia_scores(stats: list[um.TokenStats], attack, k: float, ref_stats: list[um.TokenStats] | None) -> np.ndarray:
    refs = ref_stats if ref_stats is not None else [None] * len(stats)
    return np.asarray([attack.fn(s, k, r) for s, r in zip(stats, refs, strict=True)])


def evaluate_suite(model, tokenizer, sets: dict[str, list[dict]], *, reference: Reference | None = None,
                   reference_auc: float | None = None, k: float = MIN_K, batch_size: int = 8,
                   verbmem_max_new_tokens: int | None = None, knowmem_max_new_tokens: int | None = None,
                   ) -> dict[str, Any]:
    """Every metric of :data:`METRICS` whose sets are given (see the module docstring). ``reference``: the model of
    ``mia_reference``; ``reference_auc``: the retain model's ``mia_min_k`` for ``privleak`` (``None``: 0.5).

    Returns ``{"metrics": {name: value}, "skipped": {name: why}, "privleak_reference": text, "samples": ...,
    "per_row": {...}}``."""
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    per_row: dict[str, Any] = {}
    generations: dict[str, list[dict]] = {}
    stats: dict[str, list[um.TokenStats]] = {}

    def stats_of(role: str) -> list[um.TokenStats]:
        if role not in stats:
            same = next((r for r in stats if sets[r] is sets[role]), None)  # verbmem is often the forget set itself
            stats[role] = stats[same] if same else token_stats(model, tokenizer, sets[role], batch_size)
        return stats[role]

    if sets.get("forget") and sets.get("holdout"):
        ref_stats = ({role: token_stats(reference.model, reference.tokenizer, reference.sets[role], batch_size)
                      for role in ("forget", "holdout")} if reference is not None else None)
        for attack in um.MIA_ATTACKS:
            if attack.needs_reference and ref_stats is None:
                skipped[f"mia_{attack.name}"] = "no reference model (--reference-model, or --retain-model)"
                continue
            scores = {role: mia_scores(stats_of(role), attack, k, ref_stats[role] if attack.needs_reference else None)
                      for role in ("forget", "holdout")}
            metrics[f"mia_{attack.name}"] = um.mia_auc(scores["forget"], scores["holdout"])
            per_row[f"mia_{attack.name}"] = {role: v.tolist() for role, v in scores.items()}
        ref_value = 0.5 if reference_auc is None else float(reference_auc)
        metrics["privleak"] = um.privleak(metrics[f"mia_{PRIVLEAK_ATTACK}"], ref_value)
    else:
        for name in (*(f"mia_{a.name}" for a in um.MIA_ATTACKS), "privleak"):
            skipped[name] = "no holdout set (--holdout or data.holdout): rows never trained on are needed"
    if sets.get("verbmem"):
        rows = sets["verbmem"]
        f1, gens = greedy_rouge_f1(model, tokenizer, rows, verbmem_max_new_tokens or VERBMEM_MAX_NEW_TOKENS,
                                   batch_size)
        metrics["verbmem_f"] = float(f1.mean())
        verb = stats_of("verbmem")
        metrics["extraction_strength"] = float(np.mean([um.extraction_strength(s.match) for s in verb]))
        metrics["exact_memorization"] = float(np.mean([um.exact_memorization(s.match) for s in verb]))
        generations["verbmem"] = _samples(rows, gens)
    for role, name in (("forget_qa", "knowmem_f"), ("retain_qa", "knowmem_r")):
        if not sets.get(role):
            skipped[name] = f"no {role} set"
            continue
        f1, gens = greedy_rouge_f1(model, tokenizer, sets[role], knowmem_max_new_tokens or KNOWMEM_MAX_NEW_TOKENS,
                                   batch_size, cut_stop_words=True)
        metrics[name] = float(f1.mean())
        generations[role] = _samples(sets[role], gens)
    reference_text = ("the retain model's mia_min_k" if reference_auc is not None
                      else "0.5 (no retain model: the AUC of a model that saw neither set)")
    from posttrain.eval.unlearning import empty_generation_warnings

    warnings = empty_generation_warnings({role: {"generations": [x["generation"] for x in rows]}
                                          for role, rows in generations.items()},
                                         {"verbmem": "verbmem_f", "forget_qa": "knowmem_f", "retain_qa": "knowmem_r"})
    return {"metrics": metrics, "skipped": skipped, "privleak_reference": reference_text,
            "privleak_reference_auc": 0.5 if reference_auc is None else float(reference_auc),
            "samples": {role: rows[:3] for role, rows in generations.items()}, "per_row": per_row,
            "warnings": warnings}


def _samples(rows: list[dict], gens: list[str]) -> list[dict]:
    from posttrain.data.formatting import content_text

    return [{"prompt": r["prompt"], "answer": content_text(r["completion"]), "generation": g}
            for r, g in zip(rows, gens, strict=True)]


# --------------------------------------------------------------------------------------------------------------------
# Command line (posttrain eval MODEL --suite unlearning)
# --------------------------------------------------------------------------------------------------------------------


def _load(spec: str, key: str, chat_template, system_prompt):
    from posttrain.data.formatting import command_chat_format
    from posttrain.loading import load_model_or_run
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(spec, key=key)
    chat = command_chat_format(spec, tok, chat_template, system_prompt)
    return load_model_or_run(spec, key=key), tok, chat


def _formatted(rows: dict[str, list[dict]], chat) -> dict[str, list[dict]]:
    from posttrain.data.formatting import apply_chat_format

    done: dict[int, list[dict]] = {}
    out = {}
    for role, r in rows.items():  # roles sharing rows keep sharing them (token statistics are computed once)
        out[role] = done.setdefault(id(r), apply_chat_format(r, chat))
    return out


def _retain_json(path: Path, data: dict[str, str]) -> dict[str, float]:
    import json

    from posttrain.errors import UserError

    if not path.is_file():
        raise UserError(f"--retain-model: file '{path}' not found")
    saved = json.loads(path.read_text())
    if saved.get("suite") != "unlearning" or "metrics" not in saved:
        raise UserError(f"--retain-model: {path} is not a `posttrain eval --suite unlearning` result")
    for role in ("forget", "holdout"):
        mine, theirs = data.get(role, "").split(" (")[0], saved.get("data", {}).get(role, "").split(" (")[0]
        if mine != theirs:
            raise UserError(f"--retain-model: {path} was evaluated on {role} '{theirs}', this eval on '{mine}'")
    return {k: v for k, v in saved["metrics"].items() if k != "privleak"}


def format_table(result: dict[str, Any]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"

    metrics, retain = result["metrics"], result.get("retain_model_metrics") or {}
    lines = [f"Unlearning eval (MUSE-style) of {result['model']}", "data:"]
    lines += [f"  {role:<10} {text}" for role, text in result["data"].items()]
    lines.append(f"{'metric':<22}{'value':>10}  {'retain model':>12}  better")
    for name, info in {**METRICS, **result.get("about_extra", {})}.items():
        if name not in metrics:
            continue
        better = info.short if isinstance(info, MetricInfo) else info["better"]
        lines.append(f"{name:<22}{f(metrics[name]):>10}  {f(retain.get(name)):>12}  {better}")
    lines.append("better: ~retain = " + MIA_BETTER + "; lower = " + FORGET_BETTER + "; ~0 = "
                 + METRICS["privleak"].better)
    if "privleak" in metrics:
        lines.append(f"privleak reference AUC: {result['privleak_reference']} = {result['privleak_reference_auc']:.4f}")
    for name, why in result["skipped"].items():
        lines.append(f"{name}: not computed ({why})")
    return "\n".join(lines)


def cli_eval_suite(args) -> int:
    """``posttrain eval MODEL --suite unlearning [--forget SRC --retain SRC --holdout SRC ...] [--retain-model M|JSON]
    [--reference-model M] [--lm-eval TASKS]``."""
    import json

    from posttrain.eval import lm_eval as lm
    from posttrain.eval.unlearning_data import cli_sources, describe, load_rows, resolve_sources

    sources = resolve_sources("unlearning", model=args.model, cli=cli_sources(args), forget_split=args.forget_split)
    rows = load_rows(sources, args.max_samples)  # bad data: one error line before any model loads
    data = describe(sources, rows)
    tasks = lm.parse_tasks(args.lm_eval) if args.lm_eval else []
    if tasks:
        lm.check_available()
    retain_json = args.retain_model is not None and Path(args.retain_model).suffix == ".json"
    retain_metrics = _retain_json(Path(args.retain_model), data) if retain_json else None
    model, tok, chat = _load(args.model, "MODEL", args.chat_template, args.system_prompt)
    kw = dict(batch_size=args.batch_size, verbmem_max_new_tokens=args.max_new_tokens,
              knowmem_max_new_tokens=args.max_new_tokens)
    reference_spec = args.reference_model or (args.retain_model if not retain_json else None)
    reference = None
    if reference_spec is not None:
        ref_model, ref_tok, ref_chat = _load(reference_spec, "--reference-model" if args.reference_model else
                                             "--retain-model", args.chat_template, args.system_prompt)
        reference = Reference(ref_model, ref_tok, _formatted(rows, ref_chat))
    if args.retain_model is not None and not retain_json:
        if reference_spec == args.retain_model:
            retain_model, retain_tok, retain_sets = reference.model, reference.tokenizer, reference.sets
        else:
            retain_model, retain_tok, retain_chat = _load(args.retain_model, "--retain-model", args.chat_template,
                                                          args.system_prompt)
            retain_sets = _formatted(rows, retain_chat)
        retain_res = evaluate_suite(retain_model, retain_tok, retain_sets, reference=reference, **kw)
        retain_metrics = {k: v for k, v in retain_res["metrics"].items() if k != "privleak"}
    res = evaluate_suite(model, tok, _formatted(rows, chat), reference=reference,
                         reference_auc=(retain_metrics or {}).get(f"mia_{PRIVLEAK_ATTACK}"), **kw)
    about_extra = {}
    if tasks:
        scores = lm.run_lm_eval(model, tok, tasks, include=args.lm_eval_include, limit=args.lm_eval_limit,
                                batch_size=args.batch_size, apply_chat_template=chat.wrap)
        res["metrics"].update(scores)
        about_extra = {name: {"what": "lm-evaluation-harness", "sets": name.split("/")[1],
                              "better": lm.better(name.split("/")[1])} for name in scores}
    about = {name: dataclasses.asdict(info) for name, info in METRICS.items() if name in res["metrics"]}
    result = {"suite": "unlearning", "model": args.model, "retain_model": args.retain_model,
              "reference_model": reference_spec, "data": data, "metrics": res["metrics"],
              "retain_model_metrics": retain_metrics, "about": {**about, **about_extra}, "skipped": res["skipped"],
              "privleak_reference": res["privleak_reference"], "privleak_reference_auc": res["privleak_reference_auc"],
              "mia_k": MIN_K, "samples": res["samples"], "per_row": res["per_row"], "warnings": res["warnings"]}
    out = Path(args.output) if args.output else (Path(args.model) / RESULT_FILE if Path(args.model).is_dir() else None)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table({**result, "about_extra": about_extra}))
    for warning in res["warnings"]:
        print(f"warning: {warning}")
    if out is not None:
        print(f"wrote {out}")
    return 0
