"""NPO+RT vs GA vs the untouched model under the unlearning suite (``posttrain eval --suite unlearning``), on the
built-in facts task (TOFU in miniature) and the built-in news task (MUSE in miniature), over several seeds.

    python benchmarks/unlearning_eval.py --seeds 0 1 2 --out benchmarks/results/unlearning_eval_cpu.json
    python benchmarks/unlearning_eval.py --tasks news --seeds 0 1 2 --methods ga npo_rt --out ...  # a subset
    python benchmarks/unlearning_eval.py --tasks news --seeds 0 --lm-eval     # + the shipped lm-eval task (extra)
    python benchmarks/unlearning_eval.py --table benchmarks/results/unlearning_eval_news_cpu.json  # the docs' table
    python benchmarks/unlearning_eval.py --tasks news --sweep benchmarks/results/unlearning_sweep_cpu.jsonl --lm-eval
    python benchmarks/unlearning_eval.py --sweep-table benchmarks/results/unlearning_sweep_cpu.jsonl

For each task: the retain model (never trained on the forget set) is evaluated once and is every other row's
reference (its JSON gives privleak's AUC; the model itself is the reference attack's model); the untouched start
model is evaluated; then ``recipes/unlearn_ga.yaml`` and ``recipes/unlearn_npo_rt.yaml`` are trained as shipped (on
news with the model and data swapped for the news ones; on news also ``recipes/unlearn_news.yaml``), one run per seed,
and evaluated. Every command runs as
``posttrain ...`` in a subprocess; the table gives each metric's mean and standard deviation over the seeds. The
seed changes the order of the forget rows and the retain rows paired with them; the start model is the same.

``--sweep JSONL`` compares GA and NPO+RT at equal forgetting instead of at their shipped budgets: seed-0 trajectories
over learning rate and steps (:data:`SWEEP_GRID`, evaluated during training), then every seed at each method's point
closest to the retain model's privleak, evaluated in full (and the task's own recipes, every seed); ``--stages
retain_prob --keep DIR`` adds TOFU's retain probability of the kept runs. Every record is appended to JSONL as soon
as it exists (a rerun resumes); each subprocess's CPU seconds are recorded.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# task -> start model, retain model, the --set that point the facts recipes at the task (and at its retain set, for
# methods with a retain term), and the task's own recipes (run as they are)
TASKS = {
    "facts": {"model": "builtin:tiny-qwen2-facts", "retain_model": "builtin:tiny-qwen2-facts-retain95",
              "set": {}, "retain": {}, "own": {}},
    "news": {"model": "builtin:tiny-qwen2-news", "retain_model": "builtin:tiny-qwen2-news-retain",
             "set": {"model": "builtin:tiny-qwen2-news", "data.forget": "{source: builtin:news, split: forget}"},
             "retain": {"data.retain": "{source: builtin:news, split: retain}"},
             "own": {"unlearn_news": "recipes/unlearn_news.yaml"},
             # the world facts are not in the news models (chance, 0.25, for all of them): the retain-article questions
             "lm_eval": ["posttrain_news_retain"]},
}
RECIPES = {"ga": "recipes/unlearn_ga.yaml", "npo_rt": "recipes/unlearn_npo_rt.yaml"}
METRICS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_reference", "privleak", "verbmem_f",
           "knowmem_f", "extraction_strength", "exact_memorization", "knowmem_r")
LM_EVAL_TASK = "posttrain_world_facts"


def posttrain(*args: str) -> float:
    """Run ``posttrain ARGS`` (this interpreter); return its wall time in seconds."""
    return posttrain_timed(*args)[0]


def posttrain_timed(*args: str) -> tuple[float, float]:
    """Run ``posttrain ARGS`` (this interpreter); return its wall time and its CPU time (user + system) in seconds."""
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"posttrain {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - start, cpu


def evaluate(model: str, out: Path, task: dict, retain_json: Path | None, lm_eval: bool) -> tuple[dict, float]:
    """``posttrain eval MODEL --suite unlearning``: a run folder scores its recipe's data, a built-in model the
    forget split of the task it was trained on."""
    args = ["eval", model, "--suite", "unlearning", "--reference-model", task["retain_model"], "--output", str(out)]
    if retain_json is not None:
        args += ["--retain-model", str(retain_json)]
    if lm_eval:
        args += ["--lm-eval", LM_EVAL_TASK]
    seconds = posttrain(*args)
    return json.loads(out.read_text())["metrics"], seconds


def summarise(rows: list[dict]) -> dict:
    out = {}
    for name in rows[0]:
        values = [r[name] for r in rows if r.get(name) is not None]
        if values:
            out[name] = {"mean": statistics.fmean(values),
                         "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return out


def table(task: str, result: dict) -> str:
    names = [m for m in (*METRICS, f"lm_eval/{LM_EVAL_TASK}/acc") if m in result["untouched"]["metrics"]]
    short = {f"lm_eval/{LM_EVAL_TASK}/acc": "world-facts acc (lm-eval)"}
    lines = [f"| {task} | " + " | ".join(short.get(n, n) for n in names) + " |",
             "|---|" + "---:|" * len(names)]

    def cell(stats, name):
        s = stats.get(name)
        if s is None:
            return "-"
        fmt = "{:.1f}" if name == "privleak" else "{:.3f}"
        text = fmt.format(s["mean"])
        return text + (" ± " + fmt.format(s["sd"]) if s.get("n", 1) > 1 else "")

    rows = [("retain model (the reference)", {k: {"mean": v} for k, v in result["retain"]["metrics"].items()
                                              if k != "privleak"}),
            ("untouched", {k: {"mean": v} for k, v in result["untouched"]["metrics"].items()})]
    rows += [(f"`{method}` ({len(runs)} seeds)", result["summary"][method]) for method, runs in result["runs"].items()]
    for label, stats in rows:
        lines.append(f"| {label} | " + " | ".join(cell(stats, n) for n in names) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# --sweep: GA and NPO+RT at equal forgetting (MUSE compares methods along their forget/utility trade-off, not at one
# arbitrary budget). Stage "trajectories": one seed-0 run per method and learning rate, evaluated every few steps
# during training (eval.suites: [unlearning], eval.retain_model; the learning rate is constant after warm-up, so step
# k of a run is the run with max_steps k). Stage "points": per method, the trajectory point whose privleak is closest
# to 0 (the retain model's value), trained to that step with every seed and evaluated in full like the shipped rows.
# Every record goes to a JSONL file as soon as it exists; a rerun skips what the file already holds.
# --------------------------------------------------------------------------------------------------------------------

SWEEP_GRID = {  # task -> method -> (learning rate, max_steps, eval every) of each trajectory; the rest as shipped
    "news": {"ga": [(1e-4, 120, 15), (3e-4, 60, 5)], "npo_rt": [(1e-4, 120, 15), (3e-4, 60, 5)]},
    # facts: the shipped NPO+RT (lr 3e-4) crosses the retain model's privleak between steps 20 and 30 (the trajectory
    # in docs/unlearning.md), too fast to match at that lr; lr 1e-4 crosses it slowly enough for both methods
    "facts": {"ga": [(1e-4, 120, 15)], "npo_rt": [(1e-4, 120, 15)]},
}
TRAJECTORY_MAX_SAMPLES = 100  # every forget / holdout / verbatim / forget-question row; the first 100 retain questions


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train_args(task: dict, method: str, recipe: str, seed: int, run: Path, extra: dict) -> list[str]:
    own = method in task["own"]
    sets = {**({} if own else task["set"]), **(task["retain"] if method == "npo_rt" else {}),
            "seed": str(seed), "output_dir": str(run), "training.save_strategy": "no", "report": "false",
            "eval.steps": "null", "eval.retain_model": "null", **extra}
    return ["train", recipe, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def trajectory(path: Path, tmp: Path, name: str, method: str, lr: float, steps: int, every: int, seed: int) -> None:
    task = TASKS[name]
    run = tmp / f"traj_{name}_{method}_{lr:g}_{seed}"
    extra = {"training.learning_rate": f"{lr:g}", "training.max_steps": str(steps), "eval.steps": str(every),
             "eval.suites": "[unlearning]", "eval.max_samples": str(TRAJECTORY_MAX_SAMPLES),
             "eval.retain_model": task["retain_model"]}
    print(f"[{name}] trajectory {method} lr {lr:g} seed {seed} ...", flush=True)
    wall, cpu = posttrain_timed(*train_args(task, method, RECIPES[method], seed, run, extra))
    evals = {}
    for line in read_jsonl(run / "metrics.jsonl"):
        for key, value in line.items():
            if key.startswith("eval_") and isinstance(value, (int, float)):
                evals.setdefault(line["step"], {})[key[len("eval_"):]] = value
    for step, metrics in sorted(evals.items()):
        append_jsonl(path, {"stage": "trajectory", "task": name, "method": method, "lr": lr, "step": step,
                            "seed": seed, "metrics": metrics})
    append_jsonl(path, {"stage": "trajectory_done", "task": name, "method": method, "lr": lr, "seed": seed,
                        "steps": steps, "every": every, "max_samples": TRAJECTORY_MAX_SAMPLES, "wall_s": wall,
                        "cpu_s": cpu})
    shutil.rmtree(run, ignore_errors=True)


def matched_points(records: list[dict], name: str) -> dict[str, tuple[float, int]]:
    """Per method, the (learning rate, step) of its trajectories whose privleak is closest to 0, ties to the higher
    knowmem_r; step 0 (the untouched model) is never chosen."""
    out = {}
    for method in SWEEP_GRID[name]:
        points = [r for r in records if r["stage"] == "trajectory" and r["task"] == name and r["method"] == method
                  and r["step"] > 0 and "privleak" in r["metrics"]]
        if points:
            best = min(points, key=lambda r: (abs(r["metrics"]["privleak"]), -r["metrics"].get("knowmem_r", 0)))
            out[method] = (best["lr"], best["step"])
    return out


def lm_eval_tasks(name: str) -> list[str]:
    return TASKS[name].get("lm_eval", [LM_EVAL_TASK])


def lr_text(lr: float) -> str:
    """``0.0003`` -> ``"3e-4"``."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt(name: str, mean: float, sd: float | None = None) -> str:
    f = "{:+.1f}" if name == "privleak" else "{:.3f}"
    return f.format(mean) + ("" if sd is None else " ± " + f.format(sd).lstrip("+"))


def side_by_side(traj: list[dict]) -> list[str]:
    """GA and NPO+RT trajectories at the same learning rate, one row per evaluated step, one table per rate."""
    out, cols = [], ("privleak", "verbmem_f", "knowmem_f", "knowmem_r")
    for lr in sorted({r["lr"] for r in traj}):
        by = {(r["method"], r["step"]): r["metrics"] for r in traj if r["lr"] == lr}
        steps = sorted({s for m, s in by if all((k, s) in by for k in ("ga", "npo_rt"))})
        if not steps:
            continue
        out += [f"\n*lr {lr_text(lr)}*, GA | NPO+RT:\n",
                "| step | " + " | ".join(f"{c} GA | {c} NPO+RT" for c in cols) + " |",
                "|---:|" + "---:|" * (2 * len(cols))]
        for step in steps:
            out.append(f"| {step} | " + " | ".join(f"{fmt(c, by[('ga', step)][c])} | {fmt(c, by[('npo_rt', step)][c])}"
                                                     for c in cols) + " |")
    return out


def points_table(records: list[dict], name: str) -> list[str]:
    """The matched points of task ``name`` (and its baselines and own recipes): mean ± sd over the seeds."""
    task = TASKS[name]
    probs = {(r["model"], r["method"], r["seed"]): r["retain_prob"] for r in records
             if r["stage"] == "retain_prob" and r["task"] == name}
    points = [{**r, "metrics": {**r["metrics"], **({"retain_prob": probs[(r["model"], r["method"], r["seed"])]}
                                                  if (r["model"], r["method"], r["seed"]) in probs else {})}}
              for r in records if r["stage"] == "point" and r["task"] == name]
    if not points:
        return []
    cols = [m for m in (*METRICS, "retain_prob", *(f"lm_eval/{t}/acc" for t in lm_eval_tasks(name)))
            if any(m in r["metrics"] for r in points)]
    out = ["| row | seeds | " + " | ".join(c.split("/")[1] + " (lm-eval)" if c.startswith("lm_eval/") else c
                                        for c in cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
    groups: dict[str, list[dict]] = {}
    for r in points:
        if r["method"] is None:
            label = "retain model (the reference)" if r["model"] == task["retain_model"] else "untouched"
        elif r["lr"] is None:
            label = f"`{r['recipe']}` as shipped"
        else:
            label = f"`{r['method']}`, lr {lr_text(r['lr'])}, {r['step']} steps"
        groups.setdefault(label, []).append(r)
    for label, rows in groups.items():
        stats = summarise([r["metrics"] for r in rows])
        if rows[0]["model"] == task["retain_model"]:
            stats.pop("privleak", None)  # the reference itself: its privleak is against 0.5, not against itself
        cells = [fmt(c, stats[c]["mean"], stats[c]["sd"] if stats[c]["n"] > 1 else None) if c in stats else "-"
                 for c in cols]
        out.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    return out


def sweep_tables(path: Path) -> str:
    """The markdown tables of a --sweep JSONL: each trajectory, GA and NPO+RT side by side, then the matched points
    over their seeds."""
    records, out = read_jsonl(path), []
    traj_cols = ("mia_min_k", "privleak", "verbmem_f", "extraction_strength", "knowmem_f", "knowmem_r")
    for name in TASKS:
        traj = [r for r in records if r["stage"] == "trajectory" and r["task"] == name]
        if traj:
            out += [f"\n{name}, trajectories (seed {traj[0]['seed']}, eval.max_samples {TRAJECTORY_MAX_SAMPLES})\n",
                    "| method | lr | step | " + " | ".join(traj_cols) + " |", "|---|---:|---:|" + "---:|" * len(traj_cols)]
            for r in sorted(traj, key=lambda r: (r["method"], r["lr"], r["step"])):
                out.append(f"| {r['method']} | {r['lr']:g} | {r['step']} | "
                           + " | ".join(fmt(c, r["metrics"][c]) if c in r["metrics"] else "-" for c in traj_cols) + " |")
            out += side_by_side(traj)
        table = points_table(records, name)
        if table:
            out += [f"\n{name}, matched points (full sets)\n", *table]
        cpu = [r["train_cpu_s"] + r["eval_cpu_s"] for r in records if r["stage"] == "point" and r["task"] == name
               and r["method"] is not None]
        if cpu:
            out.append(f"\nCPU seconds per trained point (train + eval): {min(cpu):.0f}-{max(cpu):.0f}")
    return "\n".join(out)


def point_eval(model: str, out: Path, name: str, retain_json: Path | None, lm_eval: bool) -> tuple[dict, float, float]:
    task = TASKS[name]
    args = ["eval", model, "--suite", "unlearning", "--reference-model", task["retain_model"], "--output", str(out)]
    if retain_json is not None:
        args += ["--retain-model", str(retain_json)]
    if lm_eval:
        args += ["--lm-eval", ",".join(lm_eval_tasks(name))]
    wall, cpu = posttrain_timed(*args)
    return json.loads(out.read_text())["metrics"], wall, cpu


RETAIN_QUESTIONS = {"facts": ("facts", "retain95"), "news": ("news", "retain_qa")}  # task -> builtin rows, split


def retain_probability(model: str, name: str) -> float:
    """TOFU's ``retain_Q_A_Prob`` on the task's retain questions (mean over questions of exp(-mean answer NLL),
    :func:`posttrain.eval.unlearning_metrics.mean_answer_probability`), computed in this process."""
    import importlib

    from posttrain.eval.unlearning import score_set
    from posttrain.eval.unlearning_metrics import mean_answer_probability
    from posttrain.loading import load_model_or_run
    from posttrain.models import load_tokenizer

    module, split = RETAIN_QUESTIONS[name]
    rows = getattr(importlib.import_module(f"posttrain.data.{module}"), f"{module}_rows")(split)
    scored = score_set(load_model_or_run(model), load_tokenizer(model), rows, generate=False)
    return mean_answer_probability(scored["avg_loss"])


def add_retain_probabilities(path: Path, keep: Path) -> None:
    """The retain probability of every point of ``path`` whose model is a built-in one or was kept in ``keep``."""
    records = read_jsonl(path)
    have = {(r["task"], r["model"], r["method"], r["seed"]) for r in records if r["stage"] == "retain_prob"}
    for r in records:
        if r["stage"] != "point" or (r["task"], r["model"], r["method"], r["seed"]) in have:
            continue
        model = r["model"] or str(keep / f"{r['task']}_{r['method']}_{r['seed']}")
        if r["model"] is None and not Path(model).is_dir():
            continue
        print(f"[{r['task']}] retain probability of {model} ...", flush=True)
        append_jsonl(path, {"stage": "retain_prob", **{k: r[k] for k in ("task", "model", "method", "lr", "step",
                                                                          "seed")},
                            "retain_prob": retain_probability(model, r["task"])})
        have.add((r["task"], r["model"], r["method"], r["seed"]))


def run_sweep(args) -> int:
    path = Path(args.sweep)
    done = read_jsonl(path)
    have = {(r["task"], r["method"], r["lr"], r["seed"]) for r in done if r["stage"] == "trajectory_done"}
    with tempfile.TemporaryDirectory(prefix="unlearning_sweep_") as tmp:
        tmp = Path(tmp)
        if "trajectories" in args.stages:
            for name in args.tasks:
                for method, grid in SWEEP_GRID[name].items():
                    for lr, steps, every in grid:
                        if (name, method, lr, args.seeds[0]) not in have:
                            trajectory(path, tmp, name, method, lr, steps, every, args.seeds[0])
        if "retain_prob" in args.stages:
            add_retain_probabilities(path, Path(args.keep))
        if "points" not in args.stages:
            return 0
        for name in args.tasks:
            task, records = TASKS[name], read_jsonl(path)
            key = lambda r: (r.get("model"), r.get("method"), r.get("lr"), r.get("step"), r.get("seed"))  # noqa: E731
            have = {key(r) for r in records if r["stage"] == "point" and r["task"] == name
                    and (not args.lm_eval or any(k.startswith("lm_eval/") for k in r["metrics"]))}
            retain_json = tmp / f"{name}_retain.json"
            for model in (task["retain_model"], task["model"]):  # the reference first: the others need its JSON
                is_retain = model == task["retain_model"]
                record = {"stage": "point", "task": name, "model": model, "method": None, "lr": None, "step": None,
                          "seed": None}
                if key(record) in have and not is_retain:
                    continue
                print(f"[{name}] {model} ...", flush=True)
                metrics, wall, cpu = point_eval(model, retain_json if is_retain else tmp / "m.json", name,
                                                None if is_retain else retain_json, args.lm_eval)
                if key(record) not in have:
                    append_jsonl(path, {**record, "metrics": metrics, "eval_wall_s": wall, "eval_cpu_s": cpu})
            chosen = {m: (lr, step, RECIPES[m]) for m, (lr, step) in matched_points(records, name).items()}
            chosen.update({m: (None, None, recipe) for m, recipe in task["own"].items()})
            print(f"[{name}] matched points: {chosen}", flush=True)
            for seed in args.seeds:
                for method, (lr, step, recipe) in chosen.items():
                    record = {"stage": "point", "task": name, "model": None, "method": method, "lr": lr,
                              "step": step, "seed": seed}
                    if key(record) in have:
                        continue
                    run = (Path(args.keep) if args.keep else tmp) / f"{name}_{method}_{seed}"
                    extra = {} if lr is None else {"training.learning_rate": f"{lr:g}",
                                                   "training.max_steps": str(step)}
                    print(f"[{name}] {method} lr {lr} steps {step} seed {seed} ...", flush=True)
                    t_wall, t_cpu = posttrain_timed(*train_args(task, method, recipe, seed, run, extra))
                    metrics, e_wall, e_cpu = point_eval(str(run), tmp / "m.json", name, retain_json, args.lm_eval)
                    append_jsonl(path, {**record, "recipe": recipe, "metrics": metrics, "train_wall_s": t_wall,
                                        "train_cpu_s": t_cpu, "eval_wall_s": e_wall, "eval_cpu_s": e_cpu})
                    if not args.keep:
                        shutil.rmtree(run, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None,
                        choices=[*RECIPES, *(m for task in TASKS.values() for m in task["own"])], help="recipes to train (default: ga, npo_rt and the "
                        "task's own, unlearn_news on news)")
    parser.add_argument("--lm-eval", action="store_true", help=f"also the shipped lm-eval task {LM_EVAL_TASK} "
                        "(needs the lm-eval extra)")
    parser.add_argument("--out", help="write every result and the summary as JSON here")
    parser.add_argument("--table", metavar="JSON", help="only print the markdown tables of a saved --out file")
    parser.add_argument("--sweep", metavar="JSONL", help="GA and NPO+RT at equal forgetting: the trajectories of "
                        "SWEEP_GRID (first seed), then every seed at each method's point closest to privleak 0, "
                        "appended to JSONL (a rerun resumes)")
    parser.add_argument("--stages", nargs="+", default=["trajectories", "points"], choices=["trajectories", "points", "retain_prob"],
                        help="--sweep: which stages to run")
    parser.add_argument("--keep", metavar="DIR", help="--sweep: keep the trained runs of the points stage in DIR")
    parser.add_argument("--sweep-table", metavar="JSONL", help="only print the markdown tables of a --sweep file")
    args = parser.parse_args(argv)
    if args.sweep_table:
        print(sweep_tables(Path(args.sweep_table)))
        return 0
    if args.sweep:
        return run_sweep(args)
    if args.table:
        for name, res in json.loads(Path(args.table).read_text())["results"].items():
            print(table(name, res))
        return 0
    import platform

    import torch
    import transformers

    results = {}
    report = {"command": "python benchmarks/unlearning_eval.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "recipes": RECIPES, "results": results}

    def save(res: dict) -> None:
        """The summary so far, written after every run: an interrupted benchmark keeps the seeds it finished."""
        res["summary"] = {m: summarise([r["metrics"] for r in runs]) for m, runs in res["runs"].items()}
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="unlearning_eval_") as tmp:
        tmp = Path(tmp)
        for name in args.tasks:
            task = TASKS[name]
            print(f"[{name}] retain model {task['retain_model']} ...", flush=True)
            retain_json = tmp / f"{name}_retain.json"
            retain, t_retain = evaluate(task["retain_model"], retain_json, task, None, args.lm_eval)
            print(f"[{name}] untouched {task['model']} ...", flush=True)
            untouched, t_untouched = evaluate(task["model"], tmp / f"{name}_untouched.json", task, retain_json,
                                              args.lm_eval)
            results[name] = res = {"retain": {"model": task["retain_model"], "metrics": retain, "eval_s": t_retain},
                                   "untouched": {"model": task["model"], "metrics": untouched,
                                                 "eval_s": t_untouched},
                                   "runs": {}}
            methods = {m: r for m, r in {**RECIPES, **task["own"]}.items()
                       if args.methods is None or m in args.methods}
            for seed in args.seeds:
                for method, recipe in methods.items():
                    run = tmp / f"{name}_{method}_{seed}"
                    own = method in task["own"]
                    sets = {**({} if own else task["set"]), **(task["retain"] if method == "npo_rt" else {}),
                            "seed": str(seed), "output_dir": str(run), "training.save_strategy": "no",
                            "report": "false", "eval.steps": "null", "eval.retain_model": "null"}
                    print(f"[{name}] {method} seed {seed} ...", flush=True)
                    t_train = posttrain("train", recipe, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
                    metrics, t_eval = evaluate(str(run), tmp / f"{name}_{method}_{seed}.json", task, retain_json,
                                               args.lm_eval)
                    res["runs"].setdefault(method, []).append(
                        {"seed": seed, "metrics": metrics, "train_s": t_train, "eval_s": t_eval})
                    save(res)
            save(res)
            print(table(name, res), flush=True)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
