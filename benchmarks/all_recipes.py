"""Run every recipe in recipes/ as shipped (full length, CPU, offline) and record what it took and what it printed.

    python benchmarks/all_recipes.py --out benchmarks/results/all_recipes_cpu.json
    python benchmarks/all_recipes.py --recipes quickstart dft grpo

Each recipe runs as ``posttrain train recipes/<name>.yaml`` in a fresh process with ``output_dir`` in a temporary
folder, so the numbers are what a user sees: wall time (including model loading, the built-in models' first-use build
if not cached, and the before/after evaluation), exit code, steps, final train loss, and test accuracy before/after
where the recipe has ``data.test``, and the command's CPU time (user + system of the process and its children:
about its wall time on an idle machine at one thread, and, unlike the wall time, nearly independent of other load).
Prints a markdown table headed by the command, date, device, package versions and the CPU load (1-minute load average
before and after); ``--out`` writes ``{"meta": ..., "rows": [...]}``. With
``--out``, every finished recipe is also appended to ``<out>.partial.jsonl`` (removed when the table is written), and
rerunning the same command after an interruption reuses the recipes that exited 0 there; ``--progress`` prints the
table of those and names the recipes left, running nothing.

Learning-rate probe (``--lr-scales``): each named recipe runs once per factor with ``--set
training.learning_rate=<factor × the recipe's lr>`` (and any ``--set`` given), at the recipe's seed (0), through
``posttrain.train.run`` in this process (the code path of ``posttrain train``, without its ~13 s of imports; no
checkpoints), and its row
adds the family's own metric of the trained model next to the greedy test accuracy: for the preference families
(DPO family, KTO) the preference accuracy and mean log-prob margin of ``log p(chosen) − log p(rejected)`` on the 200
test-split pairs of ``benchmarks/preference_accuracy.py`` (problems never trained on, the preference table's
"test-split pref. acc") and the trainer's last logged reward margin; for RL the expected exact-match reward
(temperature 1, computed exactly) on the recipe's ``data.test`` problems. The start model's values are in the table's
header. Its rows are kept apart from the every-recipe table (``--out`` names the probe's own file)::

    python benchmarks/all_recipes.py --recipes dpo kto grpo --lr-scales 1 0.3 0.1 --out benchmarks/results/lr_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stage_model(name: str, tmp: str) -> list[str]:
    """A recipe that starts from another recipe's output (``model: runs/sft_tools``): run that recipe first."""
    import yaml

    model = str(yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text()).get("model", ""))
    first = model.split("/", 1)[1] if model.startswith("runs/") else None
    if first is None or not (ROOT / "recipes" / f"{first}.yaml").is_file():
        return []
    out = Path(tmp) / "stage"
    subprocess.run([sys.executable, "-m", "posttrain.cli", "train", f"recipes/{first}.yaml", "--set",
                    f"output_dir={out}"], cwd=ROOT, capture_output=True, check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return ["--set", f"model={out}"]


def _last_stage(name: str) -> str:
    """The subfolder of ``output_dir`` that holds a multi-stage recipe's final summary ('' for a one-stage recipe)."""
    import yaml

    stages = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text()).get("stages") or []
    return stages[-1]["name"] if stages else ""


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_recipe(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        stage = _stage_model(name, tmp)  # not timed
        cmd = [sys.executable, "-m", "posttrain.cli", "train", f"recipes/{name}.yaml", "--set", f"output_dir={out}",
               *stage]
        start, cpu = time.perf_counter(), _children_cpu_s()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        row = {"recipe": f"recipes/{name}.yaml", "exit_code": proc.returncode, "wall_s": round(wall, 1),
               "cpu_s": round(_children_cpu_s() - cpu, 1)}
        summary = out / _last_stage(name) / "summary.json"
        if proc.returncode == 0 and summary.is_file():
            s = json.loads(summary.read_text())
            row.update({k: s.get(k) for k in ("steps", "train_loss", "accuracy_before", "accuracy_after")})
        elif proc.returncode == 0:
            row["error"] = f"exit 0 without {summary.relative_to(out)}"
        else:
            row["error"] = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return row


# -- the learning-rate probe -------------------------------------------------------------------------------------------


def _recipe(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())


def recipe_lr(name: str) -> float:
    return float(_recipe(name)["training"]["learning_rate"])


def recipe_family(name: str) -> str:
    """The family (``posttrain.methods.METHODS``) of the recipe's method, of its last stage for a multi-stage one."""
    from posttrain.methods import METHODS

    d = _recipe(name)
    method = {**(d.get("method") or {}), **((d.get("stages") or [{}])[-1].get("method") or {})}
    return METHODS[method["name"]].family


PREFERENCE_SCORED = ("preference", "unpaired")  # scored on pairs by their log-probabilities


def _test_pairs() -> list[dict]:
    """The 200 test-split preference pairs of ``benchmarks/preference_accuracy.py`` (problems never trained on)."""
    from posttrain.data.arithmetic import arithmetic_rows

    return arithmetic_rows("preference", split="test", max_operand=30, num_samples=200)


def model_metrics(family: str, name: str, model, tok) -> dict:
    """The family's own metric of ``model`` (see the module docstring); {} for a family without one here."""
    if family in PREFERENCE_SCORED:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from preference_accuracy import pair_logps

        chosen, rejected = pair_logps(model, tok, _test_pairs())
        margins = [c - r for c, r in zip(chosen, rejected)]
        return {"test_pref_accuracy": sum(m > 0 for m in margins) / len(margins),
                "test_logp_margin": sum(margins) / len(margins)}
    if family == "rl":
        from posttrain.data.sources import load_source
        from posttrain.eval.expected_reward import expected_exact_match
        from posttrain.recipe import load_recipe

        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        rows = list(load_source(recipe.data.test, "data.test", "rl"))
        return {"expected_reward": expected_exact_match(model, tok, rows, temperature=1.0)}
    return {}


def family_metrics(name: str, run_dir: str) -> dict:
    """``model_metrics`` of the trained model in ``run_dir``, and the trainer's last logged reward margin."""
    from transformers import AutoTokenizer

    from posttrain.loading import load_model_or_run

    family = recipe_family(name)
    if family not in PREFERENCE_SCORED and family != "rl":
        return {}
    model = load_model_or_run(run_dir).eval()
    out = model_metrics(family, name, model, AutoTokenizer.from_pretrained(run_dir))
    logged = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    margins = [r["rewards/margins"] for r in logged if "rewards/margins" in r]
    if margins:
        out["train_reward_margin"] = margins[-1]
    return out


PROBE_SETS = ["training.save_strategy='no'", "training.disable_tqdm=true"]  # no checkpoints, no progress bars


def probe_recipe(name: str, sets: list[str]) -> dict:
    """One probe run: the recipe (every stage of a multi-stage one) through ``posttrain.train.run``, the code path of
    ``posttrain train``, in this process (a fresh process per run would add ~13 s of imports to each), with ``--set``
    ``sets``; the row of ``run_recipe`` (CPU time: this process's) and the family's own metric."""
    import traceback

    from posttrain.recipe import load_recipe_stages
    from posttrain.run.stages import run_stages
    from posttrain.train import run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start, cpu = time.perf_counter(), time.process_time()
        row = {"recipe": f"recipes/{name}.yaml"}
        try:
            stages = load_recipe_stages(ROOT / "recipes" / f"{name}.yaml", [f"output_dir={out}", *PROBE_SETS, *sets])
            summary = (run(stages[0][1], quiet=True) if stages[0][0] is None
                       else run_stages(stages, resume=False, overwrite=False)[-1])
            row.update(exit_code=0, **{k: summary.get(k) for k in ("steps", "train_loss", "accuracy_before",
                                                                    "accuracy_after")})
        except Exception as exc:  # recorded in the table, not raised: the other runs go on
            traceback.print_exc()
            row.update(exit_code=1, error=f"{type(exc).__name__}: {exc}"[:300])
        row.update(wall_s=round(time.perf_counter() - start, 1), cpu_s=round(time.process_time() - cpu, 1))
        if row["exit_code"] == 0:
            row.update(family_metrics(name, str(out / _last_stage(name))))
        return row


def start_metrics(names: list[str]) -> dict[str, dict]:
    """``model_metrics`` of each recipe's starting model, once per (model, family)."""
    from posttrain.loading import load_model_or_run
    from posttrain.models import load_tokenizer

    seen, out = {}, {}
    for name in names:
        model_name, family = str(_recipe(name).get("model")), recipe_family(name)
        key = (model_name, family if family in PREFERENCE_SCORED else name)  # RL: each recipe's own test rows
        if key not in seen:
            seen[key] = (model_metrics(family, name, load_model_or_run(model_name).eval(), load_tokenizer(model_name))
                         if model_name.startswith("builtin:") else {})
        out[name] = seen[key]
    return out


def probe_table(rows: list[dict]) -> list[str]:
    """The learning-rate probe's markdown table."""

    def cell(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| recipe | lr (× recipe) | steps | CPU (s) | test acc after | test-split pref. acc "
             "| test log-prob margin | train reward margin (last log) | expected reward (test, T=1) "
             "| final train loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r.get("accuracy_after")
        lines.append(f"| `{r['recipe']}` | {r['learning_rate']:g} ({r['lr_scale']:g}×) | {r.get('steps', '')} | "
                     f"{r.get('cpu_s', '')} | {'' if acc is None else f'{100 * acc:.1f}%'} | "
                     f"{cell(r.get('test_pref_accuracy'), '.3f')} | {cell(r.get('test_logp_margin'), '.2f')} | "
                     f"{cell(r.get('train_reward_margin'), '.3f')} | {cell(r.get('expected_reward'), '.3f')} | "
                     f"{cell(r.get('train_loss'), '.4f')} |" + (f" error: {r['error']}" if "error" in r else ""))
    return lines


def pivot_table(rows: list[dict]) -> list[str]:
    """The probe as one line per recipe and one column per lr factor; a cell is the greedy test accuracy, then the
    family's metric (test-split preference accuracy, or the expected reward)."""
    scales = sorted({r["lr_scale"] for r in rows}, reverse=True)
    lines = ["| recipe (its lr) | " + " | ".join(f"{s:g}×" for s in scales) + " |",
             "|---|" + "---|" * len(scales)]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        cells = []
        for scale in scales:
            r = next((r for r in rows if r["recipe"] == name and r["lr_scale"] == scale), None)
            if r is None or "error" in r:
                cells.append("" if r is None else "error")
                continue
            metric = r.get("test_pref_accuracy", r.get("expected_reward"))
            cells.append(f"{100 * r['accuracy_after']:.0f}%" + ("" if metric is None else f" · {metric:.3f}"))
        lr = next(r["learning_rate"] / r["lr_scale"] for r in rows if r["recipe"] == name)
        lines.append(f"| `{Path(name).stem}` ({lr:.3g}) | " + " | ".join(cells) + " |")
    return lines


def environment() -> str:
    """The device and package versions, one line."""
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    packages = ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "trl", "peft", "accelerate"))
    return (f"CPU only: {os.cpu_count()} x {cpu}, fp32; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
            f"python {platform.python_version()}, {packages}")


def _done(row: dict) -> bool:
    """Whether a recipe's row is complete (exit code 0 and its summary read), so that a rerun reuses it."""
    return row["exit_code"] == 0 and "error" not in row


def table(rows: list[dict]) -> list[str]:
    """The markdown table of ``rows``, one line per recipe."""

    def pct(v):
        return "" if v is None else f"{100 * v:.1f}%"

    lines = ["| recipe | exit | steps | wall (s) | CPU (s) | final train loss | test acc before | test acc after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = r.get("train_loss")
        lines.append(f"| `{r['recipe']}` | {r['exit_code']} | {r.get('steps', '')} | {r['wall_s']:.0f} | "
                     f"{r.get('cpu_s', '')} | {'' if loss is None else f'{loss:.4f}'} | "
                     f"{pct(r.get('accuracy_before'))} | {pct(r.get('accuracy_after'))} |")
    return lines


def _key(row: dict) -> tuple:
    """What a row is a run of: its recipe, and in a probe its learning-rate factor and extra settings."""
    return row["recipe"], row.get("lr_scale"), tuple(row.get("sets", ()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")))
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--progress", action="store_true",
                        help="run nothing: print the table of <out>.partial.jsonl's recipes and name those left")
    parser.add_argument("--lr-scales", nargs="+", type=float, default=None,
                        help="learning-rate probe: run each recipe at these multiples of its learning rate and add "
                             "the family's own metric")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="with --lr-scales: a recipe override for every probe run (e.g. method.beta=0.3)")
    args = parser.parse_args(argv)
    if args.progress and not args.out:
        parser.error("--progress needs --out")
    if args.sets and not args.lr_scales:
        parser.error("--set needs --lr-scales")
    probe = args.lr_scales is not None
    if args.progress:
        rows = [json.loads(line) for line in Path(f"{args.out}.partial.jsonl").read_text().splitlines()]
        left = sorted(set(args.recipes) - {Path(r["recipe"]).stem for r in rows if _done(r)})
        print("\n".join([*(probe_table if probe else table)(sorted(rows, key=lambda r: r["recipe"])), "",
                         f"{len(left)} of {len(args.recipes)} left: {', '.join(left)}"]))
        return 0
    meta = {"command": "python benchmarks/all_recipes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(),
            "load_before": os.getloadavg()[0]}
    if probe:
        meta["start"] = start_metrics(args.recipes)
    start = time.perf_counter()
    checkpoint = Path(f"{args.out}.partial.jsonl") if args.out else None
    done = {}
    if checkpoint is not None and checkpoint.is_file():
        done = {_key(r): r for r in map(json.loads, checkpoint.read_text().splitlines()) if _done(r)}
    runs = [(name, None, ()) for name in args.recipes] if not probe else [
        (name, scale, tuple(args.sets)) for name in args.recipes for scale in args.lr_scales]
    rows = []
    for name, scale, sets in runs:
        row = done.get((f"recipes/{name}.yaml", scale, sets))
        if row is not None:
            rows.append({**row, "reused": True})
            continue
        if scale is None:
            rows.append(run_recipe(name))
        else:
            lr = float(f"{recipe_lr(name) * scale:.3g}")
            rows.append({**probe_recipe(name, [f"training.learning_rate={lr}", *sets]),
                         "lr_scale": scale, "learning_rate": lr, "sets": list(sets)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if checkpoint is not None:
            with checkpoint.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")

    reused = sum(1 for r in rows if r.get("reused"))
    cpu = [r["cpu_s"] for r in rows if not r.get("reused") and "cpu_s" in r]
    meta.update(load_after=os.getloadavg()[0], wall_s=round(time.perf_counter() - start), reused=reused,
                cpu_s=round(sum(cpu)))
    lines = [f"Command: `{meta['command'].strip()}` ({meta['date']}). Device: {meta['environment']}. Load average "
             f"(1 min) {meta['load_before']:.1f} before, {meta['load_after']:.1f} after; {meta['wall_s'] / 60:.1f} min "
             f"in all, {meta['cpu_s'] / 60:.1f} min of CPU time"
             + (f" ({reused} runs reused from an interrupted invocation, not in this time)" if reused else "")
             + ".", ""]
    if probe:
        starts = {json.dumps(v, sort_keys=True): v for v in meta["start"].values() if v}
        lines += [f"Start model ({', '.join(sorted({str(_recipe(n).get('model')) for n in args.recipes}))}): "
                  + "; ".join(", ".join(f"{k} {v:.3f}" for k, v in m.items()) for m in starts.values())
                  + ".", "", *probe_table(rows), "", *pivot_table(rows)]
    else:
        lines += table(rows)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        checkpoint.unlink(missing_ok=True)
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
