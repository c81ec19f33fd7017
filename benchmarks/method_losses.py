"""Step-1 loss and gradient norm of every recipe at learning rate 0: a fingerprint of every method's math and wiring.

    python benchmarks/method_losses.py --out before.json      # on one commit
    python benchmarks/method_losses.py --out after.json       # on another, same machine and threads
    python benchmarks/method_losses.py --compare before.json after.json

Each recipe in ``recipes/`` runs one optimizer step at learning rate 0 on a small fixed slice of its data (same seed,
same batch), so nothing but the loss computation decides the logged ``loss`` and ``grad_norm``. A refactor that keeps
behaviour gives bit-identical numbers on the same machine; ``--compare`` prints every difference (floats are stored
with ``repr``, i.e. exactly).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("loss", "grad_norm")
STAGE_TWO_MODEL = "builtin:tiny-qwen2-arith"  # replaces a recipe's `model: runs/...` (the model of an earlier stage)


def fingerprint(recipe_path: Path) -> dict[str, dict[str, float]]:
    """``{name: {loss, grad_norm}}``: one entry for a recipe, one per stage (``file.yaml:stage``) for a multi-stage
    recipe, each stage fingerprinted on its own (a ``stage:NAME`` model or reference becomes ``STAGE_TWO_MODEL``)."""
    from posttrain.recipe import load_recipe, read_recipe_file
    from posttrain.stages import load_stages

    with tempfile.TemporaryDirectory() as out:
        sets = [f"output_dir={out}", "training.max_steps=1", "training.learning_rate=0.0", "training.logging_steps=1",
                "training.save_strategy='no'", "training.disable_tqdm=true", "training.warmup_steps=0"]
        _, data = read_recipe_file(recipe_path)
        if "stages" not in data:
            recipe = load_recipe(recipe_path, sets)
            if str(recipe.model.path).startswith("runs/"):  # a second stage (grpo_tools after sft_tools): no such run
                recipe = load_recipe(recipe_path, [*sets, f"model={STAGE_TWO_MODEL}"])
            return {recipe_path.name: _first_step(recipe)}
        results = {}
        for i, stage in enumerate(data["stages"]):
            earlier = [k for k in ("model", "ref_model") if str(stage.get(k, "")).startswith("stage:")]
            stages = load_stages(recipe_path, [*sets, *(f"{k}={STAGE_TWO_MODEL}" for k in earlier)])
            name, recipe = stages[i]
            results[f"{recipe_path.name}:{name}"] = _first_step(recipe)
        return results


def _first_step(recipe) -> dict[str, float]:
    from posttrain.train import run

    data = recipe.data
    for side in ("train", "forget", "retain"):
        src = getattr(data, side)
        if src is not None and (src.max_samples is None or src.max_samples > 64):
            src.max_samples = 64
    data.test = None
    data.eval = None
    run(recipe, quiet=True)
    rows = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss" in r)
    return {k: first[k] for k in KEYS if k in first}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", help="recipe files (default: recipes/*.yaml)")
    parser.add_argument("--out", help="write the fingerprints as JSON here")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two --out files")
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        differ = 0
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                differ += 1
                print(f"{name}: {a.get(name)} -> {b.get(name)}")
        print(f"{len(set(a) | set(b)) - differ} identical, {differ} different")
        return 1 if differ else 0
    paths = [Path(p) for p in args.recipes] or sorted((ROOT / "recipes").glob("*.yaml"))
    results = {}
    for path in paths:
        for name, values in fingerprint(path).items():
            results[name] = values
            print(f"{name}: {json.dumps(values)}", file=sys.stderr, flush=True)
    text = json.dumps(results, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
