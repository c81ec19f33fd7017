"""Every results table in docs/, regenerated from one command on the shipped built-in models, over several seeds.

    python benchmarks/results.py all                 # every family, full settings (sized for ~90 min on 2 idle cores)
    python benchmarks/results.py rlvr --seeds 5      # one family, more seeds
    python benchmarks/results.py all --quick         # fewer steps / seeds / methods

Families (``FAMILIES``): ``sft``, ``preference``, ``rlvr``, ``unlearning``, ``lora``, ``stable_spam``. Each answers the
question a user of that family asks, with the methods taken from the registries (``posttrain.methods.METHODS`` and
the recipe each method ships, ``ADVANTAGES`` / ``AGGREGATIONS`` / ``CLIPPINGS``, ``ADAPTER_VARIANTS``), so a method
registered later joins without editing a list here. Every run goes through ``posttrain.train.run`` (the code path
of ``posttrain train``), one after another in this process.

Per family it writes, under ``--out`` (default ``docs/results``; ``docs/results/quick`` with ``--quick``):
``<family>.json`` (every run: final metrics, curves, timings), ``<family>.md`` (a table of mean ± sample standard
deviation over seeds, headed by the command, package versions, device and CPU load) and ``<family>_*.png``
(learning curves per method, mean ± one standard deviation band). When ``--out`` is ``docs/results``, the table is
also spliced into the docs page that shows it, between ``<!-- results:<family> -->`` and
``<!-- /results:<family> -->``, so every page's numbers come from its last run; a ``--quick`` run into
``docs/results/quick`` is spliced only where the page does not show a full run yet. Every finished run is also
appended to ``<family>.partial.jsonl`` there (removed when the family is written), so that rerunning the same command
after an interruption reuses the runs already done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

DOCS_OUT = ROOT / "docs" / "results"
PAGES = {  # family -> the docs page that embeds its table
    "sft": "docs/results.md", "preference": "docs/preference.md", "rlvr": "docs/rlvr.md",
    "unlearning": "docs/unlearning.md", "lora": "docs/lora_variants.md", "stable_spam": "docs/results.md",
}
COMMON_SETS = ["training.save_strategy='no'", "training.disable_tqdm=true", "report=false"]


# ----------------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run of a family: ``label`` is its line in the plot and row in the table, ``panel`` the plot /
    table section it belongs to; ``recipe`` a recipe file (relative to the repository) or a recipe dict."""

    label: str
    panel: str
    recipe: str | dict
    sets: list[str] = field(default_factory=list)
    probe: Callable | None = None  # (model, tokenizer) -> {metric: value}, evaluated every ``probe_every`` steps
    probe_every: int = 10
    finish: Callable | None = None  # (output_dir, summary) -> {metric: value} after training
    panel_key: str = ""  # the recipe's setting without its method (runs that share it share a baseline)
    unset: list[str] = field(default_factory=list)  # dotted keys removed from the recipe file before the sets


def _probe_callback(fn: Callable, every: int, tokenizer):
    import torch
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        """Evaluates ``fn`` at step 0, every ``every`` steps and at the last step (RNG state forked)."""

        def __init__(self):
            self.points: list[dict] = []

        def _eval(self, step, model):
            if self.points and self.points[-1]["step"] == step:
                return
            was_training = model.training
            model.eval()
            with torch.random.fork_rng(), torch.no_grad():
                self.points.append({"step": step, **fn(model, tokenizer)})
            model.train(was_training)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._eval(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step >= state.max_steps:
                self._eval(state.global_step, model)

    return Probe()


def _meter_callback():
    """Trainable parameters (at train begin) and step-end timestamps."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.trainable, self.stamps = None, []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    return Meter()


def train_one(run: Run, seed: int) -> dict:
    """Train ``run`` with ``seed``; return its curves (metrics.jsonl rows and probe points) and final metrics."""
    from posttrain.models import load_tokenizer
    from posttrain.recipe import apply_override, attach_source_dir, parse_recipe, read_recipe_file
    from posttrain.train import run as train

    with tempfile.TemporaryDirectory(prefix="results_") as tmp:
        sets = [*COMMON_SETS, *run.sets, f"seed={seed}", f"output_dir={tmp}"]
        if isinstance(run.recipe, dict):
            training = {**run.recipe["training"], "save_strategy": "no", "disable_tqdm": True}
            recipe = parse_recipe({**run.recipe, "training": training, "seed": seed, "output_dir": tmp,
                                   "report": False})
        else:
            path, data = read_recipe_file(ROOT / run.recipe)
            for key in run.unset:
                *parents, last = key.split(".")
                node = data
                for part in parents:
                    node = node[part]
                del node[last]
            for assignment in sets:
                apply_override(data, assignment)
            recipe = attach_source_dir(parse_recipe(data), path)
        meter = _meter_callback()
        callbacks = [meter]
        probe = None
        if run.probe is not None:
            probe = _probe_callback(run.probe, run.probe_every, load_tokenizer(recipe.model.path))
            callbacks.append(probe)
        start, cpu = time.perf_counter(), time.process_time()
        summary = train(recipe, quiet=True, callbacks=callbacks)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        final = {"accuracy_before": summary.get("accuracy_before"), "accuracy_after": summary.get("accuracy_after"),
                 "train_loss": summary.get("train_loss")}
        if run.finish is not None:
            final.update(run.finish(tmp, summary))
    steps = [b - a for a, b in zip(meter.stamps, meter.stamps[1:])]
    return {"label": run.label, "panel": run.panel, "seed": seed, "steps": summary.get("steps"), "wall_s": wall,
            "cpu_s": cpu, "step_s": statistics.median(steps) if steps else None, "trainable_params": meter.trainable,
            "final": final, "log": rows, "probe": probe.points if probe else []}


# ----------------------------------------------------------------------------------------------------------------------
# recipes from the registries
# ----------------------------------------------------------------------------------------------------------------------


def _yaml(path: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / path).read_text())


def family_recipes(*families: str) -> list[str]:
    """Every shipped single-stage, full-fine-tuning recipe of the ``families`` (``MethodInfo.family``) whose method is
    registered (``posttrain.methods.METHODS``), on the built-in data, with the default optimizer: each method's own
    recipe first (by name), then the other recipes of the families (loss variants such as ``ipo.yaml``)."""
    from posttrain.methods import METHODS

    names = sorted(info.recipe for info in METHODS.values() if info.family in families)  # not registration order
    names += sorted(f"recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml"))
    out = []
    for name in dict.fromkeys(names):
        if not (ROOT / name).is_file():
            continue
        d = _yaml(name)
        method = (d.get("method") or {}).get("name")
        info = METHODS.get(method)
        training = d.get("training") or {}
        sources = json.dumps(d.get("data") or {})
        if (info is None or info.family not in families or "peft" in d or "stages" in d or "optim" in training
                or "builtin:" not in sources or "chat" in sources or "tool" in name):
            continue
        out.append(name)
    return out


def _setting_key(recipe: dict) -> str:
    body = {k: v for k, v in recipe.items() if k not in ("method", "output_dir", "seed")}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _stem(path: str) -> str:
    return Path(path).stem


# ----------------------------------------------------------------------------------------------------------------------
# families
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Family:
    name: str
    title: str
    question: str
    runs: Callable[[bool], list[Run]]
    columns: list[tuple[str, str, str]]  # (final-metric key, column header, format)
    curves: list[tuple[str, str]]  # (curve key: a metrics.jsonl key or a probe key, y-axis label)
    seeds: int = 3
    quick_seeds: int = 2


# -- SFT ---------------------------------------------------------------------------------------------------------------


SFT_MAX_STEPS = {True: 40, False: 150}  # --quick / full: steps of a method recipe (poft.yaml's 300 cut to 150)


def sft_runs(quick: bool) -> list[Run]:
    """Each SFT-family method on its own recipe, and plain SFT on the same recipe (same model, data, lr, steps; at most
    ``SFT_MAX_STEPS``); plus the quickstart as shipped (full settings only). ``quick``: only the first method recipe's
    setting, scored on the recipe's own 100 test problems and curves on the first 50."""
    runs, panels = [], {}
    for name in family_recipes("sft"):
        d = _yaml(name)
        steps = d["training"]["max_steps"]
        if name.endswith("quickstart.yaml"):
            if quick:
                continue
        else:
            steps = min(steps, SFT_MAX_STEPS[quick])
        key = _setting_key(d)
        if quick and panels and key not in panels:
            continue
        lr = d["training"]["learning_rate"]
        panel = panels.setdefault(key, f"{_stem(name)}: {d['model']}, {steps} steps, lr {lr}")
        sets = [f"training.max_steps={steps}", f"eval.steps={max(steps // (2 if quick else 5), 1)}",
                f"training.logging_steps={max(steps // 10, 1)}"]
        sets += ["eval.max_samples=50"] if quick else ["data.test.max_samples=null", "eval.max_samples=100"]
        method = d["method"]["name"]
        if method != "sft" and (key, "sft") not in {(r.panel_key, r.label) for r in runs}:
            runs.append(Run("sft", panel, name, [*sets, "method={name: sft}"], panel_key=key))
        if (key, method) not in {(r.panel_key, r.label) for r in runs}:
            runs.append(Run(method, panel, name, sets, panel_key=key))
    return runs


# -- preference --------------------------------------------------------------------------------------------------------

QUICK_PREFERENCE = ("dpo", "asft_aligned")  # --quick: these recipes, the reference-based and reference-free contrast
PREF = {"n_train": 256, "max_operand": 30, "steps": 48, "batch": 32, "lr": 1e-3, "sft_steps": 200}
# METHODS families in the preference table: paired (DPO family), unpaired (KTO), online (online DPO), reward models
PREFERENCE_FAMILIES = ("preference", "unpaired", "online", "reward")
# rows of a batch per preference pair: KTO unpairs each pair into a desirable and an undesirable row, online DPO
# samples two completions per prompt; their batch is doubled so that every method sees 32 prompts a step
ROWS_PER_PAIR = {"unpaired": 2, "online": 2}
GENERATION_KEYS = ("max_completion_length", "temperature")  # kept from an online method's own recipe


class PreferenceData:
    """The pairs of benchmarks/preference_accuracy.py (train / held-out / test split), built once."""

    _cache: dict = {}

    @classmethod
    def get(cls):
        if not cls._cache:
            from preference_accuracy import build_sets

            train, held, test = build_sets(PREF["n_train"], PREF["max_operand"])
            folder = Path(tempfile.mkdtemp(prefix="results_pref_"))
            (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
            # an online method samples its own pairs: the same prompts, each with its right answer for the reward
            (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["chosen"]})
                                                          + "\n" for r in train))
            cls._cache.update(train=str(folder / "train.jsonl"), prompts=str(folder / "prompts.jsonl"), held=held,
                              test=test)
        return cls._cache


def preference_probe(model, tok) -> dict:
    from preference_accuracy import pair_logps

    chosen, rejected = pair_logps(model, tok, PreferenceData.get()["held"])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"held_out_accuracy": sum(m > 0 for m in margins) / len(margins),
            "held_out_logp_margin": statistics.mean(margins)}


def reward_probe(model, tok) -> dict:
    """A reward model's held-out pair accuracy (chosen scored above rejected) and mean score margin."""
    from posttrain.families.reward.trainer import pairwise_scores

    chosen, rejected = pairwise_scores(model, tok, PreferenceData.get()["held"])
    margins = (chosen - rejected).tolist()
    return {"held_out_accuracy": sum(m > 0 for m in margins) / len(margins),
            "held_out_score_margin": statistics.mean(margins)}


def reward_finish(out_dir, summary) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.families.reward.trainer import pairwise_scores

    model = AutoModelForSequenceClassification.from_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    chosen, rejected = pairwise_scores(model, tok, PreferenceData.get()["test"])
    return {**reward_probe(model, tok), "test_split_accuracy": (chosen > rejected).float().mean().item()}


def preference_finish(out_dir, summary) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preference_accuracy import preference_accuracy

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
    return {**preference_probe(model, tok), "test_split_accuracy": preference_accuracy(model, tok,
                                                                                       PreferenceData.get()["test"]),
            "train_reward_margin": margins[-1] if margins else None}


class SFTStart:
    """``builtin:tiny-qwen2`` after ``PREF['sft_steps']`` steps of the SFT recipe that builds tiny-qwen2-arith, once per
    seed (benchmarks/preference_accuracy.py's weak start)."""

    _paths: dict[int, str] = {}

    @classmethod
    def path(cls, seed: int, steps: int) -> str:
        if seed not in cls._paths:
            from preference_accuracy import sft_warm_start

            out = Path(tempfile.mkdtemp(prefix="results_sftstart_")) / "start"
            cls._paths[seed] = sft_warm_start("builtin:tiny-qwen2", steps, out, seed)
        return cls._paths[seed]


def preference_runs(quick: bool) -> list[Run]:
    """Each recipe of the preference families (``PREFERENCE_FAMILIES``: DPO family, KTO, online DPO, reward models)
    with its method block, trained on the same 256 arithmetic pairs (an online method: on their prompts, sampling its
    own pairs) from the random-init start and from a weak SFT start. A reward model is scored by the same held-out
    pairs, its score in place of the log-probability. ``quick``: the ``QUICK_PREFERENCE`` recipes, 16 steps from a
    60-step SFT start."""
    from posttrain.data.sources import REQUIRED_COLUMNS
    from posttrain.methods import METHODS
    from posttrain.families.base import FAMILIES

    steps = 16 if quick else PREF["steps"]
    sft_steps = 60 if quick else PREF["sft_steps"]
    runs = []
    for start in ("random", "sft"):
        for name in family_recipes(*PREFERENCE_FAMILIES):
            d = _yaml(name)
            method = d["method"]
            if quick and _stem(name) not in QUICK_PREFERENCE:
                continue
            family = METHODS[method["name"]].family
            pairs = ("prompt", "chosen", "rejected") in REQUIRED_COLUMNS[FAMILIES[family].data["train"]]
            generation = {k: v for k, v in d["training"].items() if k in GENERATION_KEYS}
            recipe = {"model": "builtin:tiny-qwen2" if start == "random" else f"sft-start:{sft_steps}",
                      "data": {"train": "PREF_TRAIN" if pairs else "PREF_PROMPTS"}, "method": method,
                      "training": {"max_steps": steps, "learning_rate": PREF["lr"], "logging_steps": max(1, steps // 4),
                                   "per_device_train_batch_size": PREF["batch"] * ROWS_PER_PAIR.get(family, 1),
                                   **generation}}
            panel = ("random init (builtin:tiny-qwen2)" if start == "random"
                     else f"weak SFT start (tiny-qwen2 + {sft_steps} SFT steps)")
            scored = FAMILIES[family].model_head != "causal"  # a reward model: its score head, not the LM's log-probs
            runs.append(Run(_stem(name), panel, recipe, probe=reward_probe if scored else preference_probe,
                            probe_every=max(1, steps // 4), finish=reward_finish if scored else preference_finish))
    return runs


def _resolve_preference(recipe: dict, seed: int) -> dict:
    recipe = json.loads(json.dumps(recipe))
    recipe["data"]["train"] = PreferenceData.get()[{"PREF_TRAIN": "train", "PREF_PROMPTS": "prompts"}[
        recipe["data"]["train"]]]
    if recipe["model"].startswith("sft-start:"):
        recipe["model"] = SFTStart.path(seed, int(recipe["model"].split(":")[1]))
    return recipe


# -- RLVR --------------------------------------------------------------------------------------------------------------

RL_BASE = "recipes/grpo.yaml"
BASELINE = "baseline"  # a panel drawn (dashed) in every plot panel of its family


class RLPool:
    """The fixed pool of 64 training problems the RL runs train on and are scored on (exactly, no sampling)."""

    _rows: list = []

    @classmethod
    def rows(cls):
        if not cls._rows:
            from posttrain.data.sources import load_source
            from posttrain.recipe import load_recipe

            recipe = load_recipe(ROOT / RL_BASE, ["data.train.max_samples=64", "data.test=null"])
            cls._rows.extend(load_source(recipe.data.train, "data.train", "rl"))
        return cls._rows


def base_name(recipe: str) -> str:
    return _yaml(recipe)["method"]["name"]


def expected_reward_probe(model, tok) -> dict:
    from posttrain.eval.expected_reward import expected_exact_match

    return {"expected_reward": expected_exact_match(model, tok, RLPool.rows(), temperature=1.0)}


def rlvr_runs(quick: bool) -> list[Run]:
    """GRPO (group advantage, DAPO aggregation, PPO clip), then one registry axis changed at a time: every advantage
    estimator, every aggregation, every clipping rule (clipping with ``num_iterations: 2``, where the ratio is not 1),
    and every shipped RL recipe with another ``method.loss`` (PACS). A single-stream estimator (its entry's
    ``single_stream``: one completion per prompt, SPO) runs on the shipped recipe that selects it, whose batch layout
    it needs, with the same steps, pool and schedule. Switching a part removes the baseline part's keys that the recipe
    sets and that default to the selected part's own value (``epsilon: 0.2`` of PPO: GSPO's default is 3e-4, CISPO
    takes none). ``quick``: 16 steps, one alternative per axis, no loss variants."""
    from posttrain.methods import METHODS
    from posttrain.families.rl.parts import ADVANTAGES, AGGREGATIONS, CLIPPINGS

    fields = METHODS[base_name(RL_BASE)].params.model_fields
    steps = 16 if quick else 50
    base = _yaml(RL_BASE)["method"]
    sets = [f"training.max_steps={steps}", "training.lr_scheduler_type=constant", "data.train.max_samples=64",
            "data.test=null", "training.logging_steps=5"]
    every = 8 if quick else 10
    axes = [("advantage", ADVANTAGES, []), ("aggregation", AGGREGATIONS, []),
            ("clipping", CLIPPINGS, ["training.num_iterations=2"])]
    runs = [Run("grpo", BASELINE, RL_BASE, sets, probe=expected_reward_probe, probe_every=every)]
    recipes = family_recipes("rl")
    for key, registry, extra in axes:
        for entry in registry:
            if entry.name == base[key] and not extra:
                continue  # the baseline itself
            if quick and entry.name not in (base[key], next(e.name for e in registry if e.name != base[key])):
                continue
            label = f"{key}={entry.name}" + (" (2 iterations)" if extra else "")
            if getattr(entry, "single_stream", False):
                own = next((n for n in recipes if _yaml(n)["method"].get(key) == entry.name), None)
                if own is None:
                    continue  # no shipped recipe gives it its batch layout
                runs.append(Run(f"{label} ({_stem(own)})", key, own, [*sets, *extra], probe=expected_reward_probe,
                                probe_every=every))
                continue
            unset = [f"method.{k}" for k in registry[base[key]].keys
                     if entry.name != base[key] and k in base and fields[k].default is None]
            runs.append(Run(label, key, RL_BASE, [*sets, *extra, f"method.{key}={entry.name}"],
                            probe=expected_reward_probe, probe_every=every, unset=unset))
    for name in [] if quick else recipes:  # --quick: the registry axes only
        loss = (_yaml(name)["method"]).get("loss")
        if loss:
            runs.append(Run(f"loss={loss} ({_stem(name)})", "loss", name, sets, probe=expected_reward_probe,
                            probe_every=every))
    return runs


# -- unlearning --------------------------------------------------------------------------------------------------------


QUICK_UNLEARNING = ("ga", "npo_rt")  # --quick: forget-only and forget + retain
WAGLE_RETAIN = "{source: builtin:facts, split: retain95}"  # WAGLE scores weights with retain gradients
UNLEARNING_MAX_STEPS = {True: 20, False: 60}  # --quick / full: at most this many of a recipe's steps (50 or 100)


def unlearning_runs(quick: bool) -> list[Run]:
    """Each unlearning method's recipe, as shipped and with the WAGLE weight mask (``method.mask: wagle``; a recipe
    without a retain set gets TOFU's retain95 for the mask's scores only)."""
    runs = []
    for name in family_recipes("unlearning"):
        d = _yaml(name)
        if d["method"].get("mask"):
            continue  # a mask variant of another recipe: every method runs with and without WAGLE below
        if "builtin:facts" not in json.dumps(d["data"]):
            continue  # the table is TOFU in miniature; other tasks have their own suites (docs/unlearning.md)
        steps = min(d["training"]["max_steps"], UNLEARNING_MAX_STEPS[quick])
        sets = [f"training.max_steps={steps}", f"eval.steps={max(steps // (2 if quick else 4), 1)}",
                f"eval.max_samples={10 if quick else 20}", "training.logging_steps=5"]
        method = d["method"]["name"]
        if quick and method not in QUICK_UNLEARNING:
            continue
        runs.append(Run(method, "without WAGLE", name, sets))
        if not _accepts_mask(d["method"]):
            continue  # a method that chooses its own weights (RMU's trainable_params) refuses a mask
        retain = [] if (d.get("data") or {}).get("retain") else [f"data.retain={WAGLE_RETAIN}"]
        runs.append(Run(f"{method}+wagle", "with WAGLE (sparsity 0.2)", name,
                        [*sets, *retain, "method.mask=wagle", "method.mask_sparsity=0.2"]))
    return runs


def _accepts_mask(method: dict) -> bool:
    """Whether the method's parameters (``posttrain.methods.METHODS``) accept the WAGLE mask."""
    from posttrain.errors import UserError
    from posttrain.methods import METHODS

    try:
        settings = {k: v for k, v in method.items() if k != "name"}
        METHODS[method["name"]].params(**{**settings, "mask": "wagle", "mask_sparsity": 0.2})
    except (UserError, ValueError):
        return False
    return True


def unlearning_final(r: dict) -> dict:
    evals = [row for row in r["log"] if "eval_model_utility" in row]
    first, last = evals[0], evals[-1]
    return {"forget_prob_before": first.get("eval_forget_Q_A_Prob"), "forget_prob": last.get("eval_forget_Q_A_Prob"),
            "retain_prob": last.get("eval_retain_Q_A_Prob"), "utility_before": first.get("eval_model_utility"),
            "utility": last.get("eval_model_utility")}


# -- LoRA variants -----------------------------------------------------------------------------------------------------


LORA_MAX_STEPS = {True: 40, False: 200}  # --quick / full: at most this many of a recipe's 300 steps


def lora_runs(quick: bool) -> list[Run]:
    """Every registered adapter variant (``ADAPTER_VARIANTS``) on its own recipe ``recipes/sft_<variant>.yaml``; a
    variant without one runs on the first variant recipe's settings with ``peft.type`` swapped."""
    from posttrain.adapters.spec import ADAPTER_VARIANTS

    own = [e.name for e in ADAPTER_VARIANTS if (ROOT / f"recipes/sft_{e.name}.yaml").is_file()]
    template = f"recipes/sft_{own[-1]}.yaml"
    runs = []
    for entry in ADAPTER_VARIANTS:
        recipe = f"recipes/sft_{entry.name}.yaml"
        sets = []
        if entry.name not in own:
            recipe, sets = template, [f"peft.type={entry.name}", f"peft.{own[-1]}=null"]
        steps = min(_yaml(recipe)["training"]["max_steps"], LORA_MAX_STEPS[quick])
        sets += [f"training.max_steps={steps}", f"eval.steps={max(steps // (2 if quick else 5), 1)}",
                 f"training.logging_steps={max(steps // 10, 1)}"]
        sets += ["eval.max_samples=50"] if quick else ["data.test.max_samples=null", "eval.max_samples=100"]
        lr = _yaml(recipe)["training"]["learning_rate"]
        runs.append(Run(f"{entry.name} (lr {lr:g})", "adapter variants", recipe, sets))
    return runs


# -- Stable-SPAM -------------------------------------------------------------------------------------------------------


def stable_spam_runs(quick: bool) -> list[Run]:
    """recipes/sft_stable_spam.yaml with Stable-SPAM and with AdamW (same lr, schedule, no global clip), at the recipe's
    learning rate and at high ones."""
    lrs = [2e-4, 1e-2] if quick else [2e-4, 3e-3, 1e-2, 3e-2]
    steps = 20 if quick else 60
    runs = []
    for lr in lrs:
        for optim in ("stable_spam", "adamw_torch"):
            sets = [f"training.learning_rate={lr}", f"training.max_steps={steps}", "training.logging_steps=2",
                    f"data.test.max_samples={50 if quick else 200}"]
            if optim != "stable_spam":
                sets += [f"training.optim={optim}", "training.optim_args=null"]
            runs.append(Run(optim.replace("_torch", ""), f"lr {lr:g}", "recipes/sft_stable_spam.yaml", sets))
    return runs


def loss_stats(r: dict) -> dict:
    losses = [row["loss"] for row in r["log"] if "loss" in row and isinstance(row["loss"], (int, float))]
    tail = losses[-3:] if losses else []
    finite = [x for x in losses if math.isfinite(x)]
    return {"loss_first": losses[0] if losses else None,
            "loss_last": statistics.mean(tail) if tail and all(map(math.isfinite, tail)) else float("nan"),
            "loss_max": max(finite) if finite else float("nan")}


FAMILIES: dict[str, Family] = {
    "sft": Family(
        "sft", "SFT family: DFT / Anchored SFT / PoFT against plain SFT on the same recipe",
        "Does the method beat plain SFT on the same model, data, learning rate and steps? (greedy exact-match "
        "accuracy on the 200 held-out addition problems)",
        sft_runs,
        [("accuracy_before", "test acc before", "pct"), ("accuracy_after", "test acc after", "pct"),
         ("train_loss", "train loss (own scale)", "f3")],
        [("eval_test_accuracy", "greedy test accuracy (first 100 test problems)")]),
    "preference": Family(
        "preference", "Preference optimisation: held-out preference accuracy and margin",
        "Does the method raise held-out preference accuracy (chosen + EOS more likely than an unseen wrong answer, "
        "300 pairs of trained prompts) from the random-init and from a weak SFT start?",
        preference_runs,
        [("held_out_accuracy_before", "held-out pref. acc, start", "f3"),
         ("held_out_accuracy", "held-out pref. acc, end", "f3"), ("test_split_accuracy", "test-split pref. acc", "f3"),
         ("held_out_logp_margin", "held-out log-prob margin", "f2"),
         ("held_out_score_margin", "held-out score margin (reward model)", "f2"),
         ("train_reward_margin", "train reward margin (last log)", "f3")],
        [("held_out_accuracy", "held-out preference accuracy"), ("held_out_logp_margin",
                                                                 "held-out mean log p(chosen) - log p(rejected)")]),
    "rlvr": Family(
        "rlvr", "RLVR: expected exact-match reward per advantage × aggregation × clipping variant, and PACS",
        "Does the variant raise the policy's expected exact-match reward (computed exactly from its probabilities, "
        "temperature 1) on the 64 problems it trains on, faster than GRPO?",
        rlvr_runs,
        [("expected_reward_before", "expected reward, start", "f3"), ("expected_reward", "expected reward, end",
                                                                      "f3"),
         ("expected_reward_gain", "gain", "f3")],
        [("expected_reward", "expected exact-match reward on the 64-problem pool")]),
    "unlearning": Family(
        "unlearning", "Unlearning: forget vs utility per method, with and without WAGLE",
        "How far does the method push the forget set's answer probability down, and how much model utility does it "
        "keep (TOFU in miniature, forget05 of builtin:tiny-qwen2-facts)?",
        unlearning_runs,
        [("forget_prob_before", "forget Prob (start)", "f3"), ("forget_prob", "forget Prob (end)", "f4"),
         ("retain_prob", "retain Prob (end)", "f3"),
         ("utility", "model utility (end)", "f3"), ("utility_before", "utility (start)", "f3")],
        [("eval_forget_Q_A_Prob", "forget-set answer probability"), ("eval_model_utility", "model utility")]),
    "lora": Family(
        "lora", "LoRA variants: accuracy against trainable parameters and step time",
        "What does each adapter variant reach, with how many trainable parameters, at what cost per step "
        "(continuing builtin:tiny-qwen2-arith with SFT)?",
        lora_runs,
        [("accuracy_before", "test acc before", "pct"), ("accuracy_after", "test acc after", "pct"),
         ("trainable_params", "trainable params", "int"), ("step_s", "s / step (median)", "f3")],
        [("eval_test_accuracy", "greedy test accuracy (first 100 test problems)")]),
    "stable_spam": Family(
        "stable_spam", "Stable-SPAM against AdamW at rising learning rates",
        "Does Stable-SPAM keep full SFT stable at learning rates where AdamW (no global clipping, same schedule) "
        "spikes or diverges (the paper's stability claim in miniature)?",
        stable_spam_runs,
        [("loss_first", "loss, first log (steps 1-2)", "f3"), ("loss_max", "max logged loss", "f3"),
         ("loss_last", "final loss (last 3 logs)", "f3"), ("accuracy_before", "test acc before", "pct"),
         ("accuracy_after", "test acc after", "pct")],
        [("loss", "training loss")]),
}


# ----------------------------------------------------------------------------------------------------------------------
# running a family, summarising, writing
# ----------------------------------------------------------------------------------------------------------------------


def enrich(family: str, r: dict) -> dict:
    """Final metrics that are read from the curves."""
    f = r["final"]
    f["step_s"], f["trainable_params"] = r["step_s"], r["trainable_params"]
    if family == "rlvr" and r["probe"]:
        f["expected_reward_before"] = r["probe"][0]["expected_reward"]
        f["expected_reward"] = r["probe"][-1]["expected_reward"]
        f["expected_reward_gain"] = f["expected_reward"] - f["expected_reward_before"]
    if family == "preference" and r["probe"]:
        f["held_out_accuracy_before"] = r["probe"][0]["held_out_accuracy"]
    if family == "unlearning":
        f.update(unlearning_final(r))
    if family == "stable_spam":
        f.update(loss_stats(r))
    return r


def run_family(family: str, seeds: list[int], quick: bool, log=print, runs: list[Run] | None = None,
               checkpoint: Path | None = None) -> list[dict]:
    """Train every run of ``family`` (or the given ``runs``) with every seed; a failing run is recorded, not raised.
    With ``checkpoint``, every finished run is appended to that JSON-lines file, and the successful runs already there
    are reused (a family cut short, e.g. by ``timeout``, continues where it stopped)."""
    spec = FAMILIES[family]
    done = {}
    if checkpoint is not None and checkpoint.is_file():
        for line in checkpoint.read_text().splitlines():
            r = json.loads(line)
            if "error" not in r:  # a failed run is tried again
                done[(r["panel"], r["label"], r["seed"])] = r
    results = []
    for run in spec.runs(quick) if runs is None else runs:
        for seed in seeds:
            if (run.panel, run.label, seed) in done:
                results.append({**done[(run.panel, run.label, seed)], "reused": True})
                log(f"[{family}] {run.panel} | {run.label} | seed {seed}: reused from {checkpoint}")
                continue
            t0 = time.perf_counter()
            try:
                if isinstance(run.recipe, dict):
                    run_seeded = Run(run.label, run.panel, _resolve_preference(run.recipe, seed), run.sets, run.probe,
                                     run.probe_every, run.finish)
                else:
                    run_seeded = run
                r = enrich(family, train_one(run_seeded, seed))
            except Exception as exc:  # a method that fails here is reported in the table, not hidden
                r = {"label": run.label, "panel": run.panel, "seed": seed, "error": f"{type(exc).__name__}: {exc}",
                     "final": {}, "log": [], "probe": []}
                traceback.print_exc()
            results.append(r)
            if checkpoint is not None:
                with checkpoint.open("a") as f:
                    f.write(json.dumps(r, default=str) + "\n")
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r["final"].items()
                     if k in {c[0] for c in spec.columns}}
            log(f"[{family}] {run.panel} | {run.label} | seed {seed}: {r.get('error') or shown} "
                f"({time.perf_counter() - t0:.0f} s)")
    return results


def curve(r: dict, key: str) -> list[tuple[int, float]]:
    pts = [(p["step"], p[key]) for p in r["probe"] if key in p]
    if not pts:
        pts = [(row["step"], row[key]) for row in r["log"] if key in row and "step" in row]
    return [(s, v) for s, v in pts if isinstance(v, (int, float))]


def mean_spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(m: float, s: float, kind: str) -> str:
    if math.isnan(m):
        return "n/a"
    if kind == "pct":
        return f"{100 * m:.1f} ± {100 * s:.1f}%"
    if kind == "int":
        return f"{m:,.0f}"
    digits = int(kind[1:])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def groups(results: list[dict]) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = {}
    for r in results:
        out.setdefault(r["panel"], {}).setdefault(r["label"], []).append(r)
    return out


def environment() -> dict:
    import torch
    import transformers
    import trl

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "trl": trl.__version__}
    for mod in ("peft", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    device = (f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available()
              else f"CPU only: {os.cpu_count()} x {cpu}, fp32")
    return {"versions": versions, "device": device, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "torch_threads": torch.get_num_threads()}


def markdown(family: str, results: list[dict], meta: dict, img_prefix: str = "") -> str:
    spec = FAMILIES[family]
    v = meta["env"]["versions"]
    lines = [f"**{spec.title}**", "",
             f"Question: {spec.question}", "",
             f"Command: `{meta['command']}` ({meta['date']}; {'quick settings' if meta['quick'] else 'full settings'}, "
             f"seeds {', '.join(map(str, meta['seeds']))}). Device: {meta['env']['device']}; "
             + (f"torch threads {meta['env']['torch_threads']}, " if "torch_threads" in meta["env"] else "")
             + f"OMP_NUM_THREADS={meta['env']['omp_num_threads']}; load average (1 min) {meta['load_before']:.1f} "
             f"before, {meta['load_after']:.1f} after; {meta['wall_s'] / 60:.1f} min for the family"
             + (f", {meta['cpu_s'] / 60:.1f} min of CPU time (user + system)"
                if meta.get("cpu_s") else "")
             + (f" ({meta['reused']} runs reused from `{meta['family']}.partial.jsonl`, an earlier invocation of the "
                "same runs, not in this time)"
                if meta.get("reused") else "") + ". "
             + ", ".join(f"{k} {val}" for k, val in v.items()) + ". Cells: mean ± sample standard deviation over "
             "seeds.", ""]
    header = "| setting | method | " + " | ".join(c[1] for c in spec.columns) + " | seeds |"
    lines += [header, "|" + "---|" * (len(spec.columns) + 3)]
    for panel, labels in groups(results).items():
        for label, rs in labels.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                lines.append(f"| {panel} | {label} | failed: {rs[0]['error'][:120]} |" + " |" * len(spec.columns))
                continue
            cells = []
            for key, _, kind in spec.columns:
                m, s = mean_spread([r["final"].get(key) for r in ok])
                cells.append(_fmt(m, s, kind))
            lines.append(f"| {panel} | {label} | " + " | ".join(cells) + f" | {len(ok)} |")
    lines.append("")
    for name in meta["plots"]:
        lines += [f"![{family} curves]({img_prefix}{name})", ""]
    return "\n".join(lines)


def plot(family: str, results: list[dict], out: Path, quick: bool) -> list[str]:
    """One PNG per curve key: a panel per setting, a line per method (mean over seeds, ± one std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = FAMILIES[family]
    names = []
    panels = groups(results)
    for key, ylabel in spec.curves:
        shown = {k: v for k, v in panels.items() if k != BASELINE} or panels
        fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 3.8), squeeze=False)
        drawn = False
        for ax, (panel, labels) in zip(axes[0], shown.items()):
            shared = panels.get(BASELINE, {}) if panel != BASELINE else {}
            for label, rs in [*shared.items(), *labels.items()]:
                series = [dict(curve(r, key)) for r in rs if "error" not in r]
                series = [s for s in series if s]
                if not series:
                    continue
                steps = sorted(set.intersection(*(set(s) for s in series)))
                if not steps:
                    continue
                stats = [mean_spread([s[t] for s in series]) for t in steps]
                mean = [m for m, _ in stats]
                sd = [d for _, d in stats]
                line, = ax.plot(steps, mean, label=label, lw=1.4, **({"ls": "--", "color": "k"}
                                                                      if rs[0]["panel"] == BASELINE else {}))
                ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                                color=line.get_color(), alpha=0.15)
                drawn = True
            ax.set_title(panel, fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel, fontsize=8)
            if key == "loss" and family == "stable_spam":
                ax.set_yscale("log")
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
        if drawn:
            name = f"{family}_{key.replace('/', '_')}.png"
            title = f"{spec.title} ({'quick' if quick else 'full'}; mean ± std over seeds)"
            fig.suptitle(textwrap.fill(title, 75 * len(shown)), fontsize=9)  # ~75 characters fit a 5.2-inch panel
            fig.tight_layout()
            fig.savefig(out / name, dpi=90)
            names.append(name)
        plt.close(fig)
    if family == "lora":
        names += _plot_lora_scatter(results, out)
    return names


def _plot_lora_scatter(results: list[dict], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, rs in next(iter(groups(results).values())).items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            continue
        acc, acc_sd = mean_spread([r["final"]["accuracy_after"] for r in ok])
        params = ok[0]["trainable_params"]
        step, step_sd = mean_spread([r["step_s"] for r in ok])
        axes[0].errorbar(params, 100 * acc, yerr=100 * acc_sd, fmt="o", label=label, capsize=3)
        axes[1].errorbar(step, 100 * acc, xerr=step_sd, yerr=100 * acc_sd, fmt="o", label=label, capsize=3)
    axes[0].set_xlabel("trainable parameters")
    axes[1].set_xlabel("seconds per optimizer step (median)")
    for ax in axes:
        ax.set_ylabel("test accuracy after (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lora_accuracy_vs_cost.png", dpi=90)
    plt.close(fig)
    return ["lora_accuracy_vs_cost.png"]


def block(page: Path, family: str) -> str:
    """The text between the family's markers in ``page`` ('' when it has none)."""
    start, end = f"<!-- results:{family} -->", f"<!-- /results:{family} -->"
    doc = page.read_text()
    return doc.split(start, 1)[1].split(end, 1)[0] if start in doc and end in doc else ""


def splice(page: Path, family: str, text: str) -> bool:
    """Replace the text between ``<!-- results:family -->`` and ``<!-- /results:family -->`` in ``page``."""
    start, end = f"<!-- results:{family} -->", f"<!-- /results:{family} -->"
    doc = page.read_text()
    if start not in doc or end not in doc:
        return False
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{start}\n{text.rstrip()}\n{end}{tail}")
    return True


def write_family(family: str, results: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta["plots"] = plot(family, results, out, meta["quick"])
    (out / f"{family}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1, default=str) + "\n")
    (out / f"{family}.md").write_text(markdown(family, results, meta) + "\n")
    page = ROOT / PAGES[family]
    full = out.resolve() == DOCS_OUT.resolve()
    if full or (out.resolve() == (DOCS_OUT / "quick").resolve() and "full settings" not in block(page, family)):
        prefix = os.path.relpath(out, page.parent) + "/"
        if splice(page, family, markdown(family, results, meta, img_prefix=prefix)):
            print(f"updated {PAGES[family]}", file=sys.stderr)


def compare_cells(old_runs: list[dict], new_runs: list[dict]) -> list[dict]:
    """Per (setting, method, final metric) of two lists of runs (step times left out: they follow the machine's
    load), a cell present in one only (``only_in``) or, in both: the mean and sample standard deviation over seeds of each, and ``distance``, the gap between the
    means in units of the larger standard deviation (at least 1 % of the metric's scale, so that cells identical over
    seeds do not divide by zero)."""

    def cells(runs: list[dict]) -> dict[tuple, list[float]]:
        acc: dict[tuple, list[float]] = {}
        for r in runs:
            for metric, value in (r.get("final") or {}).items():
                if isinstance(value, (int, float)) and metric not in ("step_s", "trainable_params"):
                    acc.setdefault((r["panel"], r["label"], metric), []).append(float(value))
        return acc

    def spread(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    before, after = cells(old_runs), cells(new_runs)
    out = [{"only_in": "old" if key in before else "new", "setting": key[0], "method": key[1], "metric": key[2]}
           for key in sorted(before.keys() ^ after.keys())]
    for key in sorted(before.keys() & after.keys()):
        a, b = before[key], after[key]
        scale = max(spread(a), spread(b), 0.01 * max(1.0, abs(statistics.mean(a))))
        out.append({"setting": key[0], "method": key[1], "metric": key[2], "old": statistics.mean(a),
                    "old_sd": spread(a), "new": statistics.mean(b), "new_sd": spread(b),
                    "distance": abs(statistics.mean(b) - statistics.mean(a)) / scale})
    return out


def compare_report(family: str, cells: list[dict]) -> str:
    """How many cells lie within one and two standard deviations, and every cell beyond one."""
    both = [c for c in cells if "only_in" not in c]
    within = {k: sum(c["distance"] <= k for c in both) for k in (1, 2)}
    lines = [f"{family}: {len(both)} cells in both, {within[1]} within 1 sd, {within[2]} within 2 sd; "
             f"{len(cells) - len(both)} in one file only (a setting or method added, removed or renamed)"]
    lines += [f"  {c['setting']} | {c['method']} | {c['metric']}: {c['old']:.4g} ± {c['old_sd']:.2g} -> "
              f"{c['new']:.4g} ± {c['new_sd']:.2g} ({c['distance']:.1f} sd)" for c in both if c["distance"] > 1]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=[*FAMILIES, "all"])
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, seeds and variants")
    parser.add_argument("--out", type=Path, default=None, help="folder for the tables, plots and JSON")
    parser.add_argument("--render", action="store_true",
                        help="no training: rewrite the tables and plots (and the docs pages) from <out>/<family>.json")
    parser.add_argument("--compare", type=Path, metavar="OLD_DIR",
                        help="no training: compare <out>/<family>.json with OLD_DIR/<family>.json, metric by metric")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out or (DOCS_OUT / "quick" if args.quick else DOCS_OUT)
    families = list(FAMILIES) if args.family == "all" else [args.family]
    if args.compare:
        for family in families:
            old, new = (json.loads((d / f"{family}.json").read_text())["runs"] for d in (args.compare, out))
            print(compare_report(family, compare_cells(old, new)))
        return 0
    env = environment()
    for family in families:
        if args.render:
            saved = json.loads((out / f"{family}.json").read_text())
            runs = [enrich(family, r) if "error" not in r else r for r in saved["runs"]]
            write_family(family, runs, saved["meta"], out)
            continue
        spec = FAMILIES[family]
        n = args.seeds or (spec.quick_seeds if args.quick else spec.seeds)
        seeds = list(range(n))
        load_before = os.getloadavg()[0]
        t0, cpu0 = time.perf_counter(), time.process_time()
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / f"{family}.partial.jsonl"
        results = run_family(family, seeds, args.quick, log=lambda s: print(s, file=sys.stderr, flush=True),
                             checkpoint=checkpoint)
        meta = {"family": family, "quick": args.quick, "seeds": seeds, "env": env,
                "command": "python benchmarks/results.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": load_before,
                "load_after": os.getloadavg()[0], "wall_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - cpu0,
                "reused": sum(1 for r in results if r.get("reused"))}
        write_family(family, results, meta, out)
        checkpoint.unlink()
        print(markdown(family, results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
