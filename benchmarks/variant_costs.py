"""Step cost of every registered variant against its family's baseline: same model, data and batch, interleaved A/B.

    OMP_NUM_THREADS=1 python benchmarks/variant_costs.py --out benchmarks/results/variant_costs_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/variant_costs.py --families lora optimizer --repeats 5
    python benchmarks/variant_costs.py --from-json all.json rl.json    # one table: rl.json's rows replace all.json's
    python benchmarks/variant_costs.py --quick           # smoke run: one variant per family, one process, ~1 minute
    python benchmarks/variant_costs.py --list            # the cells only (variant, baseline, recipe, overrides)

The variants come from the registries, so a method, part or adapter registered later joins without an edit here:

- ``sft``: every SFT-family method of ``posttrain.methods.METHODS`` on its own shipped recipe, against ``sft`` on the
  same recipe;
- ``preference``: every paired preference method (and every other shipped recipe of the family, e.g. DPO's IPO loss)
  against ``dpo`` (sigmoid) on the same recipe;
- ``unlearning``: every unlearning method against ``npo`` when it uses a reference model (``MethodInfo.reference``) and
  ``ga`` when it does not: NPO is GA plus the reference's log-ratio, so each method is compared with the cheapest
  baseline that has the same models, and what is left is its own objective (a retain set, a KL, activations);
- ``rl``: ``recipes/grpo.yaml`` (group advantage, DAPO aggregation, PPO clipping) with one registry axis changed at a
  time: every ``ADVANTAGES``, ``AGGREGATIONS`` and ``CLIPPINGS`` entry (clipping at ``num_iterations: 2`` on both
  sides, where the ratio is not 1) and every other ``POLICY_LOSSES`` entry on the shipped recipe that selects it;
  generation is excluded (TRL's ``_generate_single_turn`` returns fixed random completions of
  ``max_completion_length`` tokens), everything else of the step runs: rewards, the advantage estimator, the loss, the
  backward and the optimizer. A single-stream estimator (SPO: one completion per prompt, its own sampler and offline
  start) has no same-batch baseline and is listed as not measured;
- ``lora``: every ``ADAPTER_VARIANTS`` entry on ``recipes/sft_<variant>.yaml`` against plain LoRA on the same recipe;
- ``optimizer``: every ``posttrain.optim.OPTIMIZERS`` entry on the shipped recipe that selects it, against AdamW.
``unpaired`` (KTO) and the other families have one method each: nothing to compare (listed).

Every arm runs ``posttrain.train.run`` (the code path of ``posttrain train``) in a fresh process with the recipe and
the common overrides (``--steps`` steps, ``--batch`` rows per step, no evaluation, test set, checkpoint or report);
``--model random`` (default) replaces each recipe's model with a seeded random-init Qwen2 of ``--vocab/--hidden/
--layers`` (the issue-25 shape by default) that keeps the recipe model's tokenizer, ``--model recipe`` keeps the
built-in model. A callback measures the CPU seconds of the process per optimizer step after ``--warmup`` steps and the
peak RSS growth over ``train()`` (at ``on_train_begin``: the allocator's free pages handed back, then the high-water
mark reset; so the growth is what the training touches: gradients, optimizer state, activations, the step's
temporaries). Repeats alternate the order of all arms (A B C ..., then ... C B A); a baseline arm shared by several
variants runs once per repeat; with ``--paired`` each cell runs its baseline and its variant back to back (a shared
baseline once per cell), so the ratio compares neighbouring runs and a drift of the machine's speed cancels. Reported
per variant: its and its baseline's CPU s/step (median [min..max]), the median [min..max] over repeats of the per-repeat
ratios variant / baseline of CPU time and of peak growth, their geometric mean with its 90 % confidence interval
(Student's t on the log-ratios), the ratio of the two arms' fastest measured steps over all repeats (``timeit``'s
reading: on a shared machine interference only adds time; it reads a constant per-step difference, not a periodic one
such as PLoRA's unload), and a verdict read from the interval: within 5 % (its top at most 1.05x), over (its bottom
above 1.05x) or not resolved (it contains 1.05), with what the variant declares it computes beyond the baseline (its
registry entry's needs, a reference model, an adapter's trainer hooks, an optimizer's state) or "nothing declared"
(waste to look for). ``--from-json a.json b.json`` rebuilds the table from earlier runs, a row from the last file that
ran both of its arms (the whole table, then a newer run of one family).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import _common  # noqa: E402

FAMILIES = ("sft", "preference", "unpaired", "unlearning", "rl", "lora", "optimizer")
TOLERANCE = 1.05  # "within 5 %" of the baseline
RL_BASE = "recipes/grpo.yaml"
# what every arm overrides in its recipe: no evaluation, test accuracy, checkpoint, report or progress bar
COMMON_SETS = ["training.save_strategy='no'", "training.disable_tqdm=true", "report=false", "data.test=null",
               "data.eval=null", "training.gradient_accumulation_steps=1"]


@dataclass
class Cell:
    """One variant against its baseline: both run ``recipe`` with the common overrides plus their own ``sets``
    (``key=value`` as ``--set``; ``-key``: the key removed from the recipe)."""

    family: str
    variant: str
    baseline: str
    recipe: str
    sets: list[str] = field(default_factory=list)
    base_sets: list[str] = field(default_factory=list)
    not_measured: str = ""  # why this variant has no same-batch baseline

    @property
    def arm(self) -> tuple[str, tuple[str, ...]]:
        return self.recipe, tuple(self.sets)

    @property
    def base_arm(self) -> tuple[str, tuple[str, ...]]:
        return self.recipe, tuple(self.base_sets)


# ----------------------------------------------------------------------------------------------------------------------
# the cells, from the registries
# ----------------------------------------------------------------------------------------------------------------------


def _yaml(path: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / path).read_text())


def _family_recipes(*families: str) -> list[str]:
    from results import family_recipes  # the shipped single-stage full-fine-tuning recipes of the families

    return family_recipes(*families)


def _method_cells(family: str, baseline: str | None, label_loss: bool = False) -> list[Cell]:
    """Every shipped recipe of ``family`` (``MethodInfo.family``) whose method is not the baseline, against the
    baseline method on the same recipe; ``baseline`` None: ``npo`` / ``ga`` by the method's reference use."""
    from posttrain.methods import METHODS

    cells, seen = [], set()
    for recipe in _family_recipes(family):
        method = _yaml(recipe)["method"]
        name = method["name"]
        base = baseline or ("npo" if METHODS[name].reference != "none" else "ga")
        default_loss = METHODS[name].params.model_fields.get("loss")
        loss = method.get("loss")
        label = name if not (label_loss and loss and default_loss and loss != default_loss.default) else \
            f"{name} loss={loss}"
        if (name == base and label == name) or label in seen:
            continue
        seen.add(label)
        base_sets = [f"method={{name: {base}}}"]
        if family == "unlearning" and _yaml(recipe)["data"].get("retain") and not _reads_retain(base):
            base_sets.append("data.retain=null")  # refused by a method without a retain term
        cells.append(Cell(family, label, base, recipe, [], base_sets))
    return cells


def _reads_retain(method: str) -> bool:
    from posttrain.families.unlearning.objective import UNLEARNING_OBJECTIVES

    return UNLEARNING_OBJECTIVES[method].retain is not None


def rl_cells() -> list[Cell]:
    """One registry axis of ``recipes/grpo.yaml`` changed at a time (the baseline part's keys that default to None are
    reset, as benchmarks/results.py does), and every other policy loss on the shipped recipe that selects it."""
    from posttrain.families.rl.parts import ADVANTAGES, AGGREGATIONS, CLIPPINGS, POLICY_LOSSES
    from posttrain.methods import METHODS

    base = _yaml(RL_BASE)["method"]
    fields = METHODS[base["name"]].params.model_fields
    cells = []
    for key, registry, extra in (("advantage", ADVANTAGES, []), ("aggregation", AGGREGATIONS, []),
                                 ("clipping", CLIPPINGS, ["training.num_iterations=2"])):
        for entry in registry:
            if entry.name == base[key]:
                continue
            label = f"{key}={entry.name}" + (" (2 iterations)" if extra else "")
            baseline = f"grpo ({key}={base[key]}" + (", 2 iterations)" if extra else ")")
            if entry.single_stream if hasattr(entry, "single_stream") else False:
                cells.append(Cell("rl", label, baseline, RL_BASE, not_measured="single-stream estimator: one "
                                  "completion per prompt, its own prompt sampler and offline start; no same-batch "
                                  "baseline"))
                continue
            unset = [f"-method.{k}" for k in registry[base[key]].keys if k in base and fields[k].default is None]
            cells.append(Cell("rl", label, baseline, RL_BASE, [*extra, *unset, f"method.{key}={entry.name}"], extra))
    recipes = _family_recipes("rl")
    for entry in POLICY_LOSSES:
        if entry.name == fields["loss"].default:
            continue
        own = next((r for r in recipes if _yaml(r)["method"].get("loss") == entry.name), None)
        if own is None:
            cells.append(Cell("rl", f"loss={entry.name}", "grpo", RL_BASE, not_measured="no shipped recipe selects it"))
            continue
        keys = [k for k in _yaml(own)["method"] if k in fields and k not in base and k not in ("name", "loss")]
        cells.append(Cell("rl", f"loss={entry.name} ({Path(own).stem})", f"loss={fields['loss'].default}", own, [],
                          [f"method.loss={fields['loss'].default}", *(f"-method.{k}" for k in keys)]))
    return cells


def lora_cells(window: int | None = None) -> list[Cell]:
    """Every adapter variant on its own recipe (``recipes/sft_<variant>.yaml``) against plain LoRA there.

    A variant that acts every ``stage_steps`` steps (PLoRA's unload) runs with ``stage_steps`` = ``window``, the
    number of measured steps, so that exactly one of its periodic updates falls inside the measured window: its
    per-step cost is then the unload amortised over a stage of ``window`` steps (with the recipe's own period, a short
    window may hold none and the row would measure nothing of the method)."""
    from posttrain.adapters.spec import ADAPTER_VARIANTS, VARIANT_SPECS

    cells = []
    for entry in ADAPTER_VARIANTS:
        if entry.name == "lora":
            continue
        recipe = f"recipes/sft_{entry.name}.yaml"
        if not (ROOT / recipe).is_file():
            cells.append(Cell("lora", entry.name, "lora", recipe, not_measured=f"no shipped {recipe}"))
            continue
        options = [f"peft.{entry.name}=null"] if entry.variant.options else []
        periodic = window is not None and "stage_steps" in getattr(VARIANT_SPECS.get(entry.name), "model_fields", {})
        sets = [f"peft.{entry.name}.stage_steps={window}"] if periodic else []
        cells.append(Cell("lora", entry.name, "lora", recipe, sets, ["peft.type=lora", *options]))
    return cells


def optimizer_cells() -> list[Cell]:
    """Every posttrain optimizer (``posttrain.optim.OPTIMIZERS``) on the shipped recipe that selects it, against
    AdamW on the same recipe."""
    from posttrain.optim import OPTIMIZERS

    cells = []
    shipped = sorted(f"recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml"))
    for name in OPTIMIZERS:
        own = next((r for r in shipped if (_yaml(r).get("training") or {}).get("optim") == name), None)
        if own is None:
            cells.append(Cell("optimizer", name, "adamw_torch", "", not_measured="no shipped recipe selects it"))
            continue
        cells.append(Cell("optimizer", name, "adamw_torch", own, [],
                          ["training.optim=adamw_torch", "training.optim_args=null"]))
    return cells


def cells(families: tuple[str, ...] = FAMILIES, window: int | None = None) -> list[Cell]:
    """The cells of ``families``; ``window``: the measured steps per arm (a periodic adapter's period, see
    :func:`lora_cells`)."""
    out = []
    for family in families:
        if family == "sft":
            out += _method_cells("sft", "sft")
        elif family == "preference":
            out += _method_cells("preference", "dpo", label_loss=True)
        elif family == "unpaired":
            out += _method_cells("unpaired", "kto")
        elif family == "unlearning":
            out += _method_cells("unlearning", None)
        elif family == "rl":
            out += rl_cells()
        elif family == "lora":
            out += lora_cells(window)
        elif family == "optimizer":
            out += optimizer_cells()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# what a recipe declares it computes (for the verdict)
# ----------------------------------------------------------------------------------------------------------------------


def declared(recipe) -> set[str]:
    """What the run computes by declaration: its objective's needs (the family registry's entry), a reference model,
    the params' extra forward outputs, the adapter variant's trainer hooks and model wrapping, the optimizer."""
    from posttrain.adapters.spec import ADAPTER_VARIANTS

    info, p = recipe._info, recipe.params
    out: set[str] = set()
    if info.family == "sft":
        from posttrain.families.sft.forward import SFT_LOSSES

        out |= set(SFT_LOSSES[info.name].needs(p))
    elif info.family == "preference":
        from posttrain.families.preference.forward import PREFERENCE_LOSSES

        out |= set(PREFERENCE_LOSSES[info.name].needs(p))
    elif info.family == "unlearning":
        from posttrain.families.unlearning.objective import UNLEARNING_OBJECTIVES

        out |= set(UNLEARNING_OBJECTIVES[info.name].needs(p))
    elif info.family == "rl":
        from posttrain.families.rl.parts import ADVANTAGES, AGGREGATIONS, CLIPPINGS, POLICY_LOSSES

        out |= set(POLICY_LOSSES[p.loss].needs(p))
        adv = ADVANTAGES[p.advantage]
        out |= {f"advantage {k}" for k in ("needs_strata", "needs_lengths") if getattr(adv, k)}
        out |= {"aggregation row weights"} if AGGREGATIONS[p.aggregation].row_weights else set()
        out |= {"gradient through clipped tokens"} if CLIPPINGS[p.clipping].gradient_preserved else set()
    if recipe.reference.used:
        out.add("reference model" + (" (precomputed)" if recipe.reference.precomputed else ""))
    for flag in ("needs_hidden_states", "fused_weighting", "learned_mask", "scores_prompt_tokens"):
        if getattr(p, flag, False):
            out.add(flag)
    if recipe.peft is not None:
        variant = ADAPTER_VARIANTS[recipe.peft.type].variant
        out |= {f"adapter hook {m.rsplit(':', 1)[-1]}" for m in variant.trainer_mixins}
        if variant.prepare_model:
            out.add(f"adapter model {variant.prepare_model.rsplit(':', 1)[-1]}")
    optim = recipe.training.get("optim")
    if optim:
        out.add(f"optimizer {optim}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# one arm (inside its process)
# ----------------------------------------------------------------------------------------------------------------------


def release_free_heap() -> None:
    """Hand the C allocator's free pages back to the system (glibc ``malloc_trim(0)``; nothing where there is no
    glibc), so that the peak RSS growth measured next counts the pages the arm touches, not how much freed memory an
    earlier phase left for reuse (the model's loading, or in ``--in-process`` the previous arm, whose freed heap made the
    next arm's growth smaller by up to its own size)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _meter():
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.cpu: list[float] = []
            self.wall: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            gc.collect()
            release_free_heap()
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
            self.base = _common._rss_kib("VmRSS") * 1024
            self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.cpu.append(time.process_time())
            self.wall.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.peak = _common._rss_kib("VmHWM") * 1024

    return Meter()


def _skip_generation(seed: int = 0) -> None:
    """TRL's generation returns fixed random completions of ``max_completion_length`` tokens (the rest of the GRPO
    step runs as in training)."""
    import torch
    from trl import GRPOTrainer

    gen = torch.Generator().manual_seed(seed)

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        vocab = len(self.processing_class)
        ids = torch.randint(4, vocab, (len(prompt_ids), self.max_completion_length), generator=gen)
        return ids.tolist(), None

    GRPOTrainer._generate_single_turn = generate


def arm_sets(args, recipe: str, sets: tuple[str, ...], model_dirs: dict[str, str]) -> list[str]:
    data = _yaml(recipe)
    rl = "num_generations" in (data.get("training") or {})
    batch = args.rl_prompts * data["training"]["num_generations"] if rl else args.batch
    out = [*COMMON_SETS, f"training.max_steps={args.steps}", f"training.logging_steps={args.steps}",
           f"training.per_device_train_batch_size={batch}", *sets]
    # the rows the steps read, not the recipe's thousands (whose tokenisation would dominate the run)
    rows = args.steps * (args.rl_prompts if rl else args.batch)
    out[:0] = [f"data.{key}.max_samples={rows}" for key, source in (data.get("data") or {}).items()
               if isinstance(source, dict) and key in ("train", "forget", "retain")]
    model = data["model"] if isinstance(data["model"], str) else data["model"]["path"]
    if model in model_dirs:
        out.append(f"model={model_dirs[model]}")
    return out


def load_arm(recipe: str, sets: list[str]):
    """The parsed recipe of an arm: ``-key`` entries of ``sets`` removed from the file's mapping, the others applied as
    ``--set`` overrides."""
    from posttrain.recipe import apply_override, attach_source_dir, parse_recipe, read_recipe_file

    path, data = read_recipe_file(ROOT / recipe)
    for assignment in sets:
        if assignment.startswith("-"):
            *parents, last = assignment[1:].split(".")
            node = data
            for part in parents:
                node = node[part]
            del node[last]
        else:
            apply_override(data, assignment)
    return attach_source_dir(parse_recipe(data), path)


def run_arm(recipe: str, sets: list[str], steps: int, warmup: int) -> dict:
    from posttrain.train import run

    with tempfile.TemporaryDirectory(prefix="variant-cost-") as tmp:
        rec = load_arm(recipe, [*sets, f"output_dir={tmp}"])
        if rec._info.family == "rl":
            _skip_generation()
        meter = _meter()
        summary = run(rec, quiet=True, callbacks=[meter])
    assert len(meter.cpu) == steps, (len(meter.cpu), steps)
    cpu = meter.cpu[-1] - (meter.cpu[warmup - 1] if warmup else meter.cpu0)
    wall = meter.wall[-1] - (meter.wall[warmup - 1] if warmup else meter.wall0)
    return {"cpu_s_per_step": cpu / (steps - warmup), "wall_s_per_step": wall / (steps - warmup),
            "peak_growth_mib": (meter.peak - meter.base) / 2**20, "base_mib": meter.base / 2**20,
            "train_loss": summary.get("train_loss"), "declared": sorted(declared(rec)),
            "cpu_s_each_step": [b - a for a, b in zip([meter.cpu0, *meter.cpu[:-1]], meter.cpu)][warmup:]}


def write_random_models(args, recipes: set[str], root: Path) -> dict[str, str]:
    """A seeded random-init Qwen2 (``--vocab/--hidden/--layers``) per model of ``recipes``, saved with that model's
    tokenizer: ``{recipe model: directory}``."""
    from posttrain.models import load_tokenizer

    models = sorted({(_yaml(r)["model"] if isinstance(_yaml(r)["model"], str) else _yaml(r)["model"]["path"])
                     for r in recipes})
    dirs = {}
    for i, model in enumerate(models):
        net = _common.build_model(argparse.Namespace(model="random", vocab=args.vocab, hidden=args.hidden,
                                                     layers=args.layers, seq=256))
        tok = load_tokenizer(model)
        net.config.pad_token_id, net.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        net.generation_config.pad_token_id, net.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        path = root / f"model{i}"
        net.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[model] = str(path)
    return dirs


# ----------------------------------------------------------------------------------------------------------------------
# driving and reporting
# ----------------------------------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ratio_spread(ratios: list[float]) -> dict:
    mean, low, high = ratio_interval(ratios)
    return {**_spread(ratios), "geomean": mean, "ci90": [low, high]}


def _fmt_ratio(s: dict) -> str:
    ci = f"; {s['geomean']:.2f} ({s['ci90'][0]:.2f}..{s['ci90'][1]:.2f})" if "ci90" in s else ""
    return _fmt(s, 2) + ci


def _fmt(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"


# one-sided 95 % quantiles of Student's t (the two-sided 90 % interval) by degrees of freedom; the normal's beyond
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
       12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697}


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """The geometric mean of per-repeat ratios and its two-sided 90 % confidence interval (Student's t on the
    logarithms: a ratio's noise is multiplicative, and 1/x reads as x): ``(mean, low, high)``; one repeat: the value
    three times (no interval)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return (math.exp(mean),) * 3
    df = len(logs) - 1
    t = T95[max(k for k in T95 if k <= df)] if df <= 30 else 1.645  # a df between entries: the smaller one's t
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def reading(ratios: list[float]) -> str:
    """How a variant / baseline ratio over the repeats reads against the 5 % line, from the 90 % confidence interval
    of its geometric mean (:func:`ratio_interval`): ``within`` (the interval's top at most 1.05x), ``over`` (its bottom
    above 1.05x) or ``not resolved`` (the interval contains 1.05: the measurement's spread is larger than the effect
    it would show). Each side is a one-sided 95 % statement."""
    _, low, high = ratio_interval(ratios)
    if high <= TOLERANCE:
        return "within"
    return "over" if low > TOLERANCE else "not resolved"


def verdict(speed: list[float], memory: list[float], extra: list[str]) -> str:
    """``within 5 %``; else ``over (...)`` for the measures resolved over 1.05 and ``not resolved (...)`` for those
    whose range straddles it, with what the variant declares it computes beyond the baseline (``nothing declared``:
    waste to look for, once resolved)."""
    readings = {what: reading(r) for what, r in (("time", speed), ("memory", memory))}
    over = [what for what, r in readings.items() if r == "over"]
    unresolved = [what for what, r in readings.items() if r == "not resolved"]
    if not over and not unresolved:
        return "within 5 %"
    parts = ([f"over ({', '.join(over)})"] if over else []) + \
        ([f"not resolved ({', '.join(unresolved)})"] if unresolved else [])
    return "; ".join(parts) + ": " + ("declares " + ", ".join(extra) if extra else "nothing declared")


def summarise(cell_list: list[Cell], runs: list[dict]) -> list[dict]:
    """One row per cell: the paired per-repeat ratios of the variant's arm to its baseline's. Runs carry ``source``
    (the index of the JSON they came from, :func:`merge_runs`; 0 when absent); a cell pairs the repeats of the last
    source holding both of its arms, so a newer run of some families replaces those rows of an older file."""
    by: dict[tuple, dict[tuple[int, int], dict]] = {}
    for r in runs:  # a run of ``--paired`` belongs to one cell (``cell``): a shared baseline runs once per cell
        by.setdefault((r["recipe"], tuple(r["sets"]), r.get("cell")), {})[(r.get("source", 0), r["repeat"])] = r
    rows = []
    for c in cell_list:
        row = {**asdict(c)}
        if c.not_measured:
            rows.append({**row, "verdict": f"not measured: {c.not_measured}"})
            continue
        var = {**by.get((*c.arm, None), {}), **by.get((*c.arm, c.variant), {})}
        base = {**by.get((*c.base_arm, None), {}), **by.get((*c.base_arm, c.variant), {})}
        common = set(var) & set(base)
        if not common:
            rows.append({**row, "verdict": "not measured: no run"})
            continue
        source = max(s for s, _ in common)
        repeats = sorted(k for k in common if k[0] == source)
        speed = [var[r]["cpu_s_per_step"] / base[r]["cpu_s_per_step"] for r in repeats]
        memory = [var[r]["peak_growth_mib"] / max(base[r]["peak_growth_mib"], 1e-9) for r in repeats]
        extra = sorted(set(var[repeats[0]]["declared"]) - set(base[repeats[0]]["declared"]))
        steps = [min(min(arm[r].get("cpu_s_each_step") or [math.inf]) for r in repeats) for arm in (var, base)]
        if all(math.isfinite(v) for v in steps):  # the fastest measured step of each arm over every repeat
            row.update(fastest_step=steps[0], base_fastest_step=steps[1], fastest_ratio=steps[0] / steps[1])
        row.update(source=source, repeats=len(repeats),
                   cpu=_spread([var[r]["cpu_s_per_step"] for r in repeats]),
                   base_cpu=_spread([base[r]["cpu_s_per_step"] for r in repeats]),
                   growth=_spread([var[r]["peak_growth_mib"] for r in repeats]),
                   base_growth=_spread([base[r]["peak_growth_mib"] for r in repeats]),
                   cpu_ratio=_ratio_spread(speed), growth_ratio=_ratio_spread(memory), extra=extra,
                   verdict=verdict(speed, memory, extra))
        rows.append(row)
    return rows


def merge_runs(documents: list[dict]) -> tuple[list[dict], list[str]]:
    """The runs of several ``--out`` files, each tagged with its file's index (``source``: later files take
    precedence, :func:`summarise`), and each file's setting line."""
    runs, settings = [], []
    for i, doc in enumerate(documents):
        runs += [{**r, "source": i} for r in doc["runs"]]
        settings.append(doc.get("setting", "(interrupted run: no setting line)"))
    return runs, settings


def markdown(rows: list[dict]) -> str:
    lines = ["| family | variant | baseline | CPU s/step variant | CPU s/step baseline | time ratio: median "
             "[min..max]; geometric mean (90 % CI) | fastest step ratio | peak growth MiB variant / baseline | memory ratio, the "
             "same | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "cpu" not in r:
            lines.append(f"| {r['family']} | {r['variant']} | {r['baseline']} | | | | | | | {r['verdict']} |")
            continue
        fastest = f"{r['fastest_ratio']:.2f}" if "fastest_ratio" in r else ""
        lines.append(f"| {r['family']} | {r['variant']} | {r['baseline']} | {_fmt(r['cpu'])} | {_fmt(r['base_cpu'])} "
                     f"| {_fmt_ratio(r['cpu_ratio'])} | {fastest} | {r['growth']['median']:.0f} / "
                     f"{r['base_growth']['median']:.0f} | {_fmt_ratio(r['growth_ratio'])} | {r['verdict']} |")
    return "\n".join(lines)


def _window(parser: argparse.ArgumentParser, doc: dict) -> int | None:
    """The measured steps per arm (``--steps`` - ``--warmup``) of an ``--out`` file, from its recorded argv."""
    argv = doc.get("argv")
    if argv is None:
        return None
    known, _ = parser.parse_known_args(argv)
    return known.steps - known.warmup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--only", nargs="+", default=None, help="variant labels to run (default: all)")
    parser.add_argument("--paired", action="store_true",
                        help="run each cell's baseline and variant back to back (the order alternating by repeat), a "
                             "shared baseline once per cell: the ratio of two neighbouring runs, so a slow drift of "
                             "the machine's speed over the run cancels (costs a baseline run per cell)")
    parser.add_argument("--model", choices=("random", "recipe"), default="random",
                        help="random: a random-init Qwen2 of --vocab/--hidden/--layers with each recipe's tokenizer; "
                             "recipe: each recipe's own model")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="4: the built-in models' depth (RMU steers layer 2)")
    parser.add_argument("--batch", type=int, default=8, help="rows (pairs, forget rows) per step")
    parser.add_argument("--rl-prompts", type=int, default=2, help="RL: prompts per step (x num_generations rows)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the first measurable variant of each family, the recipes' own models, "
                             "3 steps, 1 repeat, in this process")
    parser.add_argument("--in-process", action="store_true",
                        help="every arm in this process (no import per arm: CPU times as in a fresh process; the "
                             "peak growth is less trustworthy: an earlier arm's caches and heap fragmentation stay)")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--from-json", nargs="+", metavar="JSON",
                        help="no runs: the table from the runs of earlier (possibly interrupted) --out files; with "
                             "several, a row comes from the last file that ran both of its arms (e.g. the whole "
                             "table, then a newer run of one family)")
    parser.add_argument("--out", help="write runs, rows and the markdown table as JSON here")
    parser.add_argument("--_arm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._arm:
        spec = json.loads(args._arm)
        print(json.dumps(run_arm(spec["recipe"], spec["sets"], spec["steps"], spec["warmup"])))
        return 0
    if args.quick:
        args.model, args.steps, args.warmup, args.repeats = "recipe", 3, 1, 1
    documents = [json.loads(Path(path).read_text()) for path in args.from_json or []]
    # a periodic adapter's arm carries its run's window (lora_cells): with --from-json, the last file's
    windows = [w for w in (_window(parser, doc) for doc in documents) if w is not None]
    cell_list = cells(tuple(args.families), window=windows[-1] if windows else args.steps - args.warmup)
    if args.only:
        cell_list = [c for c in cell_list if c.variant in args.only]
    if args.quick:
        firsts: dict[str, Cell] = {}
        for c in cell_list:
            if not c.not_measured:
                firsts.setdefault(c.family, c)
        cell_list = list(firsts.values())
    if args.list:
        for c in cell_list:
            print(f"{c.family:<11} {c.variant:<34} vs {c.baseline:<28} {c.recipe} {c.sets} / {c.base_sets}"
                  f"{'  NOT MEASURED: ' + c.not_measured if c.not_measured else ''}")
        return 0
    if args.from_json:
        runs, settings = merge_runs(documents)
        rows = summarise(cell_list, runs)
        head = settings[0] if len(settings) == 1 else "\n".join(
            f"[{i}] {path}: {setting}" for i, (path, setting) in enumerate(zip(args.from_json, settings)))
        print(head + "\n\n" + markdown(rows))
        if args.out:
            Path(args.out).write_text(json.dumps({"from_json": args.from_json, "setting": head, "runs": runs,
                                                  "rows": rows, "markdown": markdown(rows)}, indent=1))
        return 0
    measured = [c for c in cell_list if not c.not_measured]
    arms = list(dict.fromkeys(a for c in measured for a in (c.base_arm, c.arm)))
    load_before = _common.load_average()
    runs = []
    with tempfile.TemporaryDirectory(prefix="variant-cost-models-") as tmp:
        model_dirs = write_random_models(args, {r for r, _ in arms}, Path(tmp)) if args.model == "random" else {}
        for rep in range(args.repeats):
            if args.paired:  # each cell's two arms back to back (baseline first on even repeats), cells reversed
                order = [(a, c.variant) for c in (measured if rep % 2 == 0 else measured[::-1])
                         for a in ((c.base_arm, c.arm) if rep % 2 == 0 else (c.arm, c.base_arm))]
            else:
                order = [(a, None) for a in (arms if rep % 2 == 0 else arms[::-1])]
            for (recipe, sets), cell in order:
                full = arm_sets(args, recipe, sets, model_dirs)
                if args.quick or args.in_process:
                    res = run_arm(recipe, full, args.steps, args.warmup)
                else:
                    spec = json.dumps({"recipe": recipe, "sets": full, "steps": args.steps, "warmup": args.warmup})
                    out = subprocess.run([sys.executable, __file__, "--_arm", spec], capture_output=True, text=True)
                    if out.returncode != 0:
                        sys.stderr.write(out.stderr[-4000:])
                        raise SystemExit(f"run failed: {recipe} {list(sets)}")
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append({"recipe": recipe, "sets": list(sets), "repeat": rep, **res,
                             **({"cell": cell} if cell else {})})
                if args.out:  # what is done so far survives an interruption
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps({"argv": sys.argv, "partial": True, "load_before": load_before,
                                                          "runs": runs}, indent=1))
                print(f"  [{rep}] {recipe:<34} {' '.join(sets)[:60]:<60} {res['cpu_s_per_step']:.4f} CPU s/step  "
                      f"+{res['peak_growth_mib']:.0f} MiB  loss {res['train_loss']}", flush=True)
    rows = summarise(cell_list, runs)
    table = markdown(rows)
    model = (f"random Qwen2 vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers (each recipe's tokenizer)"
             if args.model == "random" else "each recipe's own model")
    import torch

    head = (f"{model}; batch {args.batch} (RL: {args.rl_prompts} prompts x num_generations), {args.steps} steps "
            f"({args.warmup} warm-up), {args.repeats} interleaved repeats"
            f"{' (paired: each cell its own baseline run, back to back)' if args.paired else ''}"
            f"{', in one process' if args.quick or args.in_process else ', a fresh process per arm'}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
            f"load average before {load_before}, after {_common.load_average()}")
    print("\n" + head + "\n\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"argv": sys.argv, "setting": head, "runs": runs, "rows": rows,
                                              "markdown": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
