"""The reference computed once (``method.precompute_ref_log_probs: true``, the shared plan of
:mod:`posttrain.logprobs.reference`): CPU-seconds of the precomputation phase when it computes (an empty cache) and
when a rerun reads the cached file, on a recipe (docs/logprob_engine.md, "The reference computed once").

    python benchmarks/reference_precompute.py --recipe recipes/dpo.yaml --repeats 3 \\
        --out benchmarks/results/reference_precompute_dpo.json

Each run is one fresh process running ``posttrain train RECIPE --set method.precompute_ref_log_probs=true --set
training.max_steps=1`` (no test-set evaluation, no checkpoint, a temporary ``output_dir``) through
``posttrain.cli.main``, with ``$POSTTRAIN_REFERENCE_CACHE`` a new empty folder (``computed``) or a folder an untimed
first run filled (``cached``). The process wraps the trainer's ``_precompute_ref_logps`` (the phase: collating the
rows, the model fingerprint, then the reference forward or the file read, and joining the columns; once per data set,
train and eval) and, inside it, :func:`~posttrain.logprobs.reference.weights_fingerprint` and the reference forward
(``posttrain.logprobs.reference._compute``), and prints their CPU-seconds (``time.process_time``) and the sums of the
columns it joined. Runs alternate ``computed`` / ``cached`` (then the other way round), so drifts of a shared machine
hit both alike; the report gives medians and min..max over the repeats, checks that the cached runs ran no reference
forward and joined the same values, and records the load average before each run. Not a unit test.
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
MODES = ("computed", "cached")


def _one(recipe: str, overrides: list[str]) -> None:
    """One run in this process; prints a JSON line ``{"phase": s, "fingerprint": s, "forward": s, "forwards": n,
    "sums": [...]}``."""
    sys.path.insert(0, str(ROOT))
    from posttrain import cli
    from posttrain.families.preference.trainer import PosttrainPreferenceTrainer
    from posttrain.logprobs import reference as R

    seconds = {"phase": 0.0, "fingerprint": 0.0, "forward": 0.0}
    counts = {"forwards": 0}
    sums: list[float] = []

    def timed(name, fn, after=None):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            out = fn(*args, **kwargs)
            seconds[name] += time.process_time() - start
            if after is not None:
                after(out)
            return out

        return wrapper

    def joined(dataset):
        if "ref_chosen_logps" in dataset.column_names:
            sums.extend([sum(dataset["ref_chosen_logps"]), sum(dataset["ref_rejected_logps"])])

    def forward_counted(*args, **kwargs):
        counts["forwards"] += 1
        return compute(*args, **kwargs)

    compute = R._compute
    PosttrainPreferenceTrainer._precompute_ref_logps = timed(
        "phase", PosttrainPreferenceTrainer._precompute_ref_logps, joined)
    R.weights_fingerprint = timed("fingerprint", R.weights_fingerprint)
    R._compute = timed("forward", forward_counted)
    with tempfile.TemporaryDirectory() as out:
        argv = ["train", recipe, "--output-dir", out, "--set", "method.precompute_ref_log_probs=true",
                "--set", "training.max_steps=1", "--set", "training.save_strategy=no", "--set", "data.test=null",
                *[a for o in overrides for a in ("--set", o)]]
        code = cli.main(argv)
    if code:
        raise SystemExit(f"posttrain train exited {code}")
    print(json.dumps({**seconds, **counts, "sums": sums}))


def _run(args, mode: str, cache: Path) -> dict:
    env = {**os.environ, "POSTTRAIN_REFERENCE_CACHE": str(cache), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--_one", "--recipe", args.recipe,
                           *[a for o in args.set for a in ("--set", o)]], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"mode": mode, "load_before": load, **result}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/dpo.yaml", help="a preference recipe whose method has a reference")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default=None, help="write every run and the summary as JSON here")
    parser.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        _one(args.recipe, args.set)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        first = _run(args, "computed", warm)  # untimed: fills the cache the cached runs read
        assert first["forwards"] > 0
        for repeat in range(args.repeats):
            for mode in (MODES if repeat % 2 == 0 else MODES[::-1]):
                cache = warm if mode == "cached" else Path(tmp) / f"cold{repeat}"
                runs.append(_run(args, mode, cache))
                print(json.dumps(runs[-1]), flush=True)
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in MODES}
    assert all(r["forwards"] == 0 for r in by_mode["cached"]), "a cached run ran the reference forward"
    assert all(r["sums"] == first["sums"] for r in by_mode["cached"]), "a cached run joined other values"
    summary = {m: {key: _spread([r[key] for r in rs]) for key in ("phase", "fingerprint", "forward")}
               for m, rs in by_mode.items()}
    summary["phase_ratio_computed_over_cached"] = (summary["computed"]["phase"]["median"]
                                                   / summary["cached"]["phase"]["median"])
    report = {"recipe": args.recipe, "overrides": args.set, "threads": args.threads, "repeats": args.repeats,
              "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
