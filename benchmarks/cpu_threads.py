"""Training speed on a CPU by thread setting, on the machine as it is and with extra load (README "CPU threads").

    python benchmarks/cpu_threads.py                          # quickstart, 30 steps, settings default / 1 / auto
    python benchmarks/cpu_threads.py --load 0 2 --repeats 3 --out benchmarks/results/cpu_threads.json

Each run is ``posttrain train recipes/quickstart.yaml`` for ``--steps`` optimizer steps (no test set, no saving) in a
fresh process; steps/s is the run's steps over its ``train_runtime``. Thread settings:

* ``default``: torch's default, one thread per core (``POSTTRAIN_NUM_THREADS`` = the cores; what posttrain did before);
* ``1``: one thread (``POSTTRAIN_NUM_THREADS=1``);
* ``auto``: posttrain's choice (posttrain/threads.py: the cores minus the other processes' load average).

``--load K`` starts K busy-looping processes for the measurement (``0``: the machine as it is; the load average
before each run is recorded, since other people's jobs count too). Runs are interleaved (default, 1, auto, default,
...) so that drifts of a shared machine hit every setting alike; the report gives the median and min..max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "1", "auto")


def run_once(setting: str, steps: int, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "POSTTRAIN_NUM_THREADS", "MKL_NUM_THREADS")}
    cores = len(os.sched_getaffinity(0))
    if setting == "default":
        env["POSTTRAIN_NUM_THREADS"] = str(cores)
    elif setting != "auto":
        env["POSTTRAIN_NUM_THREADS"] = setting
    out = workdir / f"run-{time.time_ns()}"
    sets = [f"training.max_steps={steps}", f"training.logging_steps={steps}", "training.save_strategy=no",
            "training.disable_tqdm=true", "data.test=null", "report=false", f"output_dir={out}"]
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", "recipes/quickstart.yaml",
                           *[x for s in sets for x in ("--set", s)]], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({setting}):\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in rows if "train_runtime" in r)
    chosen = next((line for line in proc.stderr.splitlines() if "CPU threads:" in line), "")
    return {"setting": setting, "steps": steps, "train_runtime_s": runtime, "steps_per_s": steps / runtime,
            "load_before": load, "threads_line": chosen.removeprefix("[posttrain] ")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--load", type=int, nargs="+", default=[0, 2], help="busy processes added (one list entry "
                        "per condition)")
    parser.add_argument("--out", help="write every run and the summary as JSON here")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for extra in args.load:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(extra)]
            try:
                time.sleep(5 if extra else 0)
                for r in range(args.repeats):
                    order = SETTINGS if r % 2 == 0 else tuple(reversed(SETTINGS))
                    for setting in order:
                        result = run_once(setting, args.steps, Path(tmp))
                        result["extra_load"] = extra
                        runs.append(result)
                        print(json.dumps(result), flush=True)
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    summary = []
    for extra in args.load:
        for setting in SETTINGS:
            values = [r["steps_per_s"] for r in runs if r["extra_load"] == extra and r["setting"] == setting]
            loads = [r["load_before"] for r in runs if r["extra_load"] == extra and r["setting"] == setting]
            summary.append({"extra_load": extra, "setting": setting, "median_steps_per_s": statistics.median(values),
                            "min": min(values), "max": max(values), "load_before": [round(x, 2) for x in loads]})
    print(f"\ncores: {len(os.sched_getaffinity(0))}, steps per run: {args.steps}, repeats: {args.repeats}")
    print("| busy processes added | threads | steps/s median (min..max) | load average before each run |")
    print("|---|---|---|---|")
    for s in summary:
        print(f"| {s['extra_load']} | {s['setting']} | {s['median_steps_per_s']:.2f} ({s['min']:.2f}..{s['max']:.2f}) "
              f"| {', '.join(map(str, s['load_before']))} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
