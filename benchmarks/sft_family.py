"""Learning table for the SFT family: SFT, DFT, Anchored SFT and PoFT on the built-in arithmetic task, several seeds.

    python benchmarks/sft_family.py --seeds 0 1 2 --out benchmarks/results/sft_family_cpu.json

Two settings, each run with every method on the same data, seed, batch and schedule:

* ``weak-start``: from ``builtin:tiny-qwen2-arith`` (the tiny model briefly SFT'd on arithmetic, ~65% test accuracy),
  the setting of ``recipes/dft.yaml`` / ``recipes/asft_anchored.yaml`` (100 steps, lr 1e-3): does each loss improve a
  model that already half-knows the task?
* ``from-scratch``: from the random-init ``builtin:tiny-qwen2``, the setting of ``recipes/poft.yaml`` (300 steps, lr
  3e-3; PoFT's aligned model is ``tiny-qwen2-arith``).

Records greedy accuracy on the 200 held-out test problems (``builtin:arithmetic-rl`` test split) before and after,
plus wall time. Runs are in-process and sequential; the model is tiny, so CPU is fine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "weak-start": {
        "model": "builtin:tiny-qwen2-arith",
        "sets": ["training.max_steps=100", "training.learning_rate=1e-3", "data.train.options.num_samples=6400"],
        "methods": {
            "sft": ["method={name: sft}"],
            "dft": ["method={name: dft}"],
            "asft_anchored": ["method={name: asft_anchored, asft_kl_coef: 0.05}"],
        },
    },
    "from-scratch": {
        "model": "builtin:tiny-qwen2",
        "sets": ["training.max_steps=300", "training.learning_rate=3e-3", "data.train.options.num_samples=19200"],
        "methods": {
            "sft": ["method={name: sft}"],
            "dft": ["method={name: dft}"],
            "poft": ["method={name: poft, poft_beta: 1.0, poft_gamma: 0.0, aligned_models: [builtin:tiny-qwen2-arith]}"],
        },
    },
}


def run_one(setting: str, method: str, seed: int, out_dir: str) -> dict:
    from posttrain.recipe import load_recipe
    from posttrain.train import run

    spec = SETTINGS[setting]
    sets = [f"model={spec['model']}", *spec["sets"], *spec["methods"][method], f"seed={seed}",
            "training.per_device_train_batch_size=64", "training.logging_steps=50", "training.save_strategy='no'",
            "training.disable_tqdm=true", "data.eval=null", "data.test.max_samples=null", f"output_dir={out_dir}"]
    recipe = load_recipe(ROOT / "recipes" / "dft.yaml", sets)
    start = time.perf_counter()
    summary = run(recipe, quiet=True)
    return {"setting": setting, "method": method, "seed": seed, "steps": summary["steps"],
            "test_acc_before": summary["accuracy_before"], "test_acc_after": summary["accuracy_after"],
            "time_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for setting in args.settings:
        for seed in args.seeds:
            for method in SETTINGS[setting]["methods"]:
                with tempfile.TemporaryDirectory() as tmp:
                    rows.append(run_one(setting, method, seed, tmp))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = ["| setting | method | test acc before | test acc after (per seed) | mean after | time/run (s) |",
             "|---|---|---|---|---|---|"]
    for setting in args.settings:
        for method in SETTINGS[setting]["methods"]:
            mine = [r for r in rows if r["setting"] == setting and r["method"] == method]
            after = [100 * r["test_acc_after"] for r in mine]
            lines.append(f"| {setting} | {method} | {100 * mine[0]['test_acc_before']:.1f}% | "
                         f"{' / '.join(f'{a:.1f}' for a in after)} | {statistics.mean(after):.1f}% | "
                         f"{statistics.mean(r['time_s'] for r in mine):.0f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
