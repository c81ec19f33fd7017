"""Evaluation during training, from the recipe's ``eval`` block (docs/observability.md).

Every ``eval.steps`` optimizer steps (and at step 0 and at the last step) :class:`PeriodicEvalCallback` scores the
model on a bounded number of rows and logs the results through the trainer, so that they reach ``metrics.jsonl``
and every tracker of ``training.report_to`` like any training metric. What is measured follows from the recipe:

* ``data.test`` (prompt + answer rows): greedy accuracy, ``eval_test_accuracy`` (:mod:`posttrain.eval.accuracy`,
  the same scoring as the before/after lines), and with ``eval.pass_k`` (default ``[1, 4]`` for RL methods)
  ``eval_test_pass@k`` and ``eval_test_mean_sample_accuracy`` (:mod:`posttrain.eval.sampling`).
* unlearning methods (``eval.unlearning``, on by default), the suites of ``eval.suites``: ``tofu`` gives
  ``eval_<set>_Q_A_Prob``, ``eval_<set>_Q_A_ROUGE``, the truth ratios, ``eval_model_utility`` and, with
  ``eval.retain_model``, ``eval_forget_quality`` (:func:`posttrain.eval.unlearning.evaluate_sets`); ``unlearning``
  gives ``eval_mia_*``, ``eval_privleak``, ``eval_verbmem_f``, ``eval_knowmem_f``, ``eval_knowmem_r``,
  ``eval_extraction_strength``, ``eval_exact_memorization`` (:func:`posttrain.eval.unlearning_suite.evaluate_suite`).
  They score the run's data.forget / data.retain / data.holdout, on a built-in task with its matching splits (the
  same rows as ``posttrain eval RUN --suite tofu|unlearning --max-samples N``).

Each set is cut to its first ``eval.max_samples`` rows. Evaluation runs on every process (ZeRO-3 needs all of them
for a forward) with the random-number state forked, so a run with evaluation trains exactly like one without.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from posttrain.errors import UserError

logger = logging.getLogger("posttrain")

Evaluator = Callable[[Any, Any], dict[str, float]]  # (model, tokenizer) -> {metric name without "eval_": value}
PREFIX = "eval_"
UNLEARNING_MAX_NEW_TOKENS = 48  # as `posttrain eval --suite tofu`


def _rows(ds, n: int) -> list[dict]:
    return [ds[i] for i in range(min(n, len(ds)))]


def test_set_evaluators(recipe) -> list[Evaluator]:
    """Greedy accuracy (and pass@k when ``eval.pass_k`` is set) on the first ``eval.max_samples`` rows of data.test."""
    from posttrain.data.sources import load_source

    ev = recipe.eval
    if recipe.data.test is None:
        return []
    ds = load_source(recipe.data.test, "data.test", "test")
    logger.info("evaluation during training: every %d steps on the first %d of %d data.test rows (eval.max_samples)%s",
                ev.steps, min(ev.max_samples, len(ds)), len(ds), f", pass@{ev.pass_k}" if ev.pass_k else "")
    ds = ds.select(range(min(ev.max_samples, len(ds))))
    max_new = ev.max_new_tokens  # None: the accuracy default (posttrain.eval.accuracy), as the before/after lines
    out: list[Evaluator] = []

    def rows():  # data.chat_template is resolved once the tokenizer is loaded (posttrain.data.formatting)
        from posttrain.data.formatting import apply_chat_format

        return apply_chat_format(ds, recipe._chat_format)

    def accuracy(model, tokenizer):
        from posttrain.eval.accuracy import greedy_accuracy

        return {"test_accuracy": greedy_accuracy(model, tokenizer, rows(), max_new, ev.batch_size,
                                                 where="data.test (evaluation during training)")}

    out.append(accuracy)
    if ev.pass_k:

        def pass_at_k(model, tokenizer):
            from posttrain.eval.sampling import pass_at_k_eval

            res = pass_at_k_eval(model, tokenizer, rows(), ev.pass_k, ev.num_samples, ev.temperature, max_new,
                                 ev.batch_size, seed=recipe.seed)
            for warning in res["warnings"]:
                logger.warning("%s", warning)
            metrics = {f"test_pass@{k}": v for k, v in res["pass@k"].items()}
            metrics["test_mean_sample_accuracy"] = res["mean_sample_accuracy"]
            return metrics

        out.append(pass_at_k)
    return out


def unlearning_sets(recipe, suite: str = "tofu") -> dict[str, list[dict]]:
    """The rows an unlearning ``suite`` scores during training: the run's data.forget / data.retain / data.holdout
    and, on a built-in task, its matching evaluation splits (:mod:`posttrain.eval.unlearning_data`), the first
    ``eval.max_samples`` of each."""
    from posttrain.eval.unlearning_data import load_rows, resolve_sources

    data = recipe.data
    if data.forget is None:
        return {}
    run = {role: getattr(data, role) for role in ("forget", "retain", "holdout") if getattr(data, role) is not None}
    try:
        sources = resolve_sources(suite, recipe_data=run)
    except UserError as exc:
        raise UserError(f"{exc} (the unlearning evaluation during training, eval.steps; or set eval.unlearning: "
                        "false)") from None
    return load_rows(sources, recipe.eval.max_samples)


def _retain_model(recipe):
    from posttrain.data.formatting import resolve_chat_format
    from posttrain.loading import load_model_or_run as load_model
    from posttrain.models import load_tokenizer

    ev = recipe.eval
    tok = load_tokenizer(ev.retain_model, key="eval.retain_model")
    chat = resolve_chat_format(recipe.data, ev.retain_model, tok, recipe._source_dir)  # the run's rule, its tokenizer
    return load_model(ev.retain_model, key="eval.retain_model"), tok, chat


def tofu_evaluator(recipe) -> Evaluator | None:
    """TOFU metrics (:func:`posttrain.eval.unlearning.evaluate_sets`): forget/retain/holdout/world-facts probability,
    ROUGE, truth ratio, model utility and, with ``eval.retain_model``, forget quality."""
    ev = recipe.eval
    sets = unlearning_sets(recipe, "tofu")
    if not sets:
        return None
    logger.info("evaluation during training: every %d steps, TOFU metrics on %s (at most eval.max_samples=%d rows "
                "each)", ev.steps, ", ".join(f"{k} {len(v)}" for k, v in sets.items()), ev.max_samples)
    max_new = ev.max_new_tokens or UNLEARNING_MAX_NEW_TOKENS
    retain_tr = None
    if ev.retain_model is not None:
        from posttrain.data.formatting import apply_chat_format
        from posttrain.eval.unlearning import has_truth_ratio_columns, score_set

        if not has_truth_ratio_columns(sets["forget"]):
            raise UserError(
                "eval.retain_model: forget_quality compares truth ratios, which need 'paraphrased_answer' and "
                "'perturbed_answers' columns in data.forget"
            )
        retain, tok, chat = _retain_model(recipe)
        retain_tr = score_set(retain, tok, apply_chat_format(sets["forget"], chat), batch_size=ev.batch_size,
                              generate=False)["tr"]
        del retain
        logger.info("eval.retain_model: truth ratios of %s on %d forget rows", ev.retain_model, len(retain_tr))

    def tofu(model, tokenizer):
        from posttrain.data.formatting import apply_chat_format
        from posttrain.eval.unlearning import evaluate_sets

        formatted = {name: apply_chat_format(rows, recipe._chat_format) for name, rows in sets.items()}
        res = evaluate_sets(model, tokenizer, formatted, retain_tr=retain_tr, max_new_tokens=max_new,
                            batch_size=ev.batch_size, key="eval.retain_model")
        res.pop("_scored")
        res.pop("_warnings")
        return {k: v for k, v in res.items() if v is not None}

    return tofu


def suite_evaluator(recipe) -> Evaluator | None:
    """The unlearning suite (:func:`posttrain.eval.unlearning_suite.evaluate_suite`): membership-inference AUCs and
    privleak (with ``eval.retain_model``: against its Min-K% AUC, computed once now; else against 0.5), verbatim and
    knowledge memorisation, extraction strength, exact memorisation. ``mia_reference`` needs a reference model in
    memory and is left to ``posttrain eval --suite unlearning``."""
    from posttrain.eval.unlearning_suite import PRIVLEAK_ATTACK, evaluate_suite

    ev = recipe.eval
    sets = unlearning_sets(recipe, "unlearning")
    if not sets:
        return None
    logger.info("evaluation during training: every %d steps, the unlearning suite on %s (at most eval.max_samples=%d "
                "rows each)", ev.steps, ", ".join(f"{k} {len(v)}" for k, v in sets.items()), ev.max_samples)
    kw = dict(batch_size=ev.batch_size, verbmem_max_new_tokens=ev.max_new_tokens,
              knowmem_max_new_tokens=ev.max_new_tokens)
    reference_auc = None
    if ev.retain_model is not None and sets.get("holdout"):
        from posttrain.eval.unlearning_suite import _formatted

        retain, tok, chat = _retain_model(recipe)
        retain_sets = _formatted({r: sets[r] for r in ("forget", "holdout")}, chat)
        reference_auc = evaluate_suite(retain, tok, retain_sets, **kw)["metrics"][f"mia_{PRIVLEAK_ATTACK}"]
        del retain
        logger.info("eval.retain_model: mia_%s AUC of %s = %.4f (privleak's reference)", PRIVLEAK_ATTACK,
                    ev.retain_model, reference_auc)

    def suite(model, tokenizer):
        from posttrain.eval.unlearning_suite import _formatted

        res = evaluate_suite(model, tokenizer, _formatted(sets, recipe._chat_format), reference_auc=reference_auc,
                             **kw)
        return res["metrics"]

    return suite


def unlearning_evaluators(recipe, family: str) -> list[Evaluator]:
    """The unlearning evaluations of ``eval.suites`` (unlearning methods with ``eval.unlearning``)."""
    ev = recipe.eval
    from posttrain.families.base import FAMILIES

    if not FAMILIES[family].evaluates_forgetting or not ev.unlearning:
        return []
    builders = {"tofu": tofu_evaluator, "unlearning": suite_evaluator}
    evaluators = [builders[name](recipe) for name in dict.fromkeys(ev.suites)]
    return [e for e in evaluators if e is not None]


class PeriodicEvalCallback(TrainerCallback):
    """Runs ``evaluators`` at step 0, every ``steps`` optimizer steps and at the last step, and logs their metrics
    (prefixed ``eval_``) through :meth:`transformers.Trainer.log` of the trainer given to :meth:`attach`.

    The base ``Trainer.log`` is called, not the family trainer's override: TRL's trainers fold the training metrics
    averaged since the last logging step into whatever row they log next, which belongs to the next training row.
    """

    def __init__(self, steps: int, evaluators: list[Evaluator]):
        self.steps, self.evaluators = steps, evaluators
        self.trainer: Trainer | None = None
        self.tokenizer = None
        self._last_step: int | None = None

    def attach(self, trainer, tokenizer) -> None:
        self.trainer, self.tokenizer = trainer, tokenizer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # not on resume: step 0 was logged by the first run
            self.evaluate(state, control, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.steps == 0 or state.global_step >= state.max_steps:
            self.evaluate(state, control, model)

    def evaluate(self, state, control, model) -> dict[str, float]:
        if self.trainer is None:
            raise RuntimeError("PeriodicEvalCallback.attach(trainer, tokenizer) was not called")
        if self._last_step == state.global_step:
            return {}
        self._last_step = state.global_step
        start = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        metrics: dict[str, float] = {}
        with torch.random.fork_rng(devices=devices):  # evaluation must not change the training's random stream
            for evaluator in self.evaluators:
                metrics.update(evaluator(model, self.tokenizer))
        logs = {PREFIX + k: float(v) for k, v in metrics.items()}
        logs[PREFIX + "periodic_runtime"] = round(time.perf_counter() - start, 4)
        # Logging resets control.should_log, which on_step_end may just have set for this step's training row.
        should_log = control.should_log
        Trainer.log(self.trainer, logs)
        control.should_log = self.trainer.control.should_log = should_log
        return logs


def build_periodic_eval(recipe, family: str) -> PeriodicEvalCallback | None:
    """The callback for ``recipe.eval`` (``None`` when ``eval.steps`` is not set); loads the evaluation rows (and the
    retain model's truth ratios) now, so that a bad set is reported before the model is loaded and trained. Call
    :meth:`PeriodicEvalCallback.attach` once the trainer is built."""
    if recipe.eval.steps is None:
        return None
    evaluators = test_set_evaluators(recipe) + unlearning_evaluators(recipe, family)
    if not evaluators:
        return None
    return PeriodicEvalCallback(recipe.eval.steps, evaluators)
