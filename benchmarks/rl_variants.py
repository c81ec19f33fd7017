"""Learning table for the RL family: baseline GRPO and each variant, from the arithmetic-SFT tiny model.

    python benchmarks/rl_variants.py --steps 60 --out docs/rl_variants.json

Runs each recipe (``recipes/grpo*.yaml``) for ``--steps`` optimizer steps with the same seed, batch and learning
rate, and records: mean training reward over the first and last ``--window`` generation batches, greedy test accuracy
before and after (held-out ``builtin:arithmetic-rl`` test split), steps and wall time. Prints a markdown table and
writes the rows as JSON. Each run is in-process and sequential (CPU is fine: the model is tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "grpo (baseline)": "grpo",
    "stratified": "grpo_stratified",
    "delta_l": "grpo_delta_l",
    "nsr": "grpo_nsr",
    "w_reinforce": "grpo_w_reinforce",
    "gppo": "grpo_gppo",
    "combined": "grpo_combined",
    "rloo": "grpo_rloo",
    "reinforce_pp": "grpo_reinforce_pp",
    "gspo": "grpo_gspo",
    "cispo": "grpo_cispo",
}


def run_variant(recipe_name: str, steps: int, window: int, overrides: list[str], out_dir: str) -> dict:
    from posttrain.recipe import load_recipe
    from posttrain.train import run

    sets = [f"training.max_steps={steps}", "training.logging_steps=1", "training.save_strategy='no'",
            "training.disable_tqdm=true", f"output_dir={out_dir}", *overrides]
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", sets)
    start = time.perf_counter()
    summary = run(recipe, quiet=True)
    elapsed = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    k = min(window, max(len(rewards) // 2, 1))
    return {
        "recipe": f"recipes/{recipe_name}.yaml",
        "steps": summary["steps"],
        "generation_batches": len(rewards),
        "start_reward": sum(rewards[:k]) / k,
        "end_reward": sum(rewards[-k:]) / k,
        "test_acc_before": summary["accuracy_before"],
        "test_acc_after": summary["accuracy_after"],
        "time_s": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10, help="generation batches averaged for start/end reward")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    for name in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = run_variant(VARIANTS[name], args.steps, args.window, args.set, tmp)
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    header = ("| variant | recipe | steps | start reward | end reward | test acc before | test acc after | time (s) |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [header]
    for name, r in results.items():
        lines.append(f"| {name} | `{r['recipe']}` | {r['steps']} | {r['start_reward']:.3f} | {r['end_reward']:.3f} | "
                     f"{100 * r['test_acc_before']:.1f}% | {100 * r['test_acc_after']:.1f}% | {r['time_s']:.0f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": args.steps, "window": args.window, "overrides": args.set,
                                              "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
