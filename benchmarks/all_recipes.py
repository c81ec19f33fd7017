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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")))
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--progress", action="store_true",
                        help="run nothing: print the table of <out>.partial.jsonl's recipes and name those left")
    args = parser.parse_args(argv)
    if args.progress and not args.out:
        parser.error("--progress needs --out")
    if args.progress:
        rows = [json.loads(line) for line in Path(f"{args.out}.partial.jsonl").read_text().splitlines()]
        left = sorted(set(args.recipes) - {Path(r["recipe"]).stem for r in rows if _done(r)})
        print("\n".join([*table(sorted(rows, key=lambda r: r["recipe"])), "",
                         f"{len(left)} of {len(args.recipes)} left: {', '.join(left)}"]))
        return 0
    meta = {"command": "python benchmarks/all_recipes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(),
            "load_before": os.getloadavg()[0]}
    start = time.perf_counter()
    checkpoint = Path(f"{args.out}.partial.jsonl") if args.out else None
    done = {}
    if checkpoint is not None and checkpoint.is_file():
        done = {r["recipe"]: r for r in map(json.loads, checkpoint.read_text().splitlines()) if _done(r)}
    rows = []
    for name in args.recipes:
        row = done.get(f"recipes/{name}.yaml")
        if row is not None:
            rows.append({**row, "reused": True})
            continue
        rows.append(run_recipe(name))
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
             + (f" ({reused} recipes reused from an interrupted invocation, not in this time)" if reused else "")
             + ".", "",
             *table(rows)]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        checkpoint.unlink(missing_ok=True)
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
