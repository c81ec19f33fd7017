"""Time to the first training step: where the seconds of a one-step ``posttrain train`` go, phase by phase.

    python benchmarks/startup.py                                   # sft, dpo, grpo; 3 repeats; this checkout
    python benchmarks/startup.py --repo before=/tmp/main --repo after=. --repeats 5 --out /tmp/startup.json

Each run is one fresh process running ``posttrain train recipes/NAME.yaml --set training.max_steps=1`` (no
checkpoint, a temporary ``output_dir``) through ``posttrain.cli.main`` as the program, after importing the recipe
schema and parsing the recipe once on its own to time them. The process wraps the pipeline's phase functions (looked
up by name in ``posttrain.run.pipeline``, so any checkout whose ``run()`` calls them works) and gives the trainer a
callback; it prints every phase's seconds when it exits:

``interpreter`` (Python start-up until the first line), ``import recipe`` (the torch-free schema), ``recipe`` (parse and
validate the YAML: this imports torch, transformers and TRL for the ``training:`` keys), ``import pipeline``,
``preflight`` (TRL config, data, checks), ``tokenizer`` (from preflight to the model load: the output folder, the
tokenizer, the chat format and the checks that need them), ``model load``, ``eval before`` (test accuracy),
``trainer`` (building the trainer: TRL tokenises the training rows), ``train setup`` (``train()`` until the first step
begins), ``first step``, ``save`` (the final model), ``eval after``, ``report`` (report.html) and ``other`` (summary,
model card, run marker, and the end of the process).

``--repo LABEL=PATH`` (repeatable) runs the same phases on several checkouts (e.g. a worktree of ``main`` and this
branch), interleaved run by run so that the drifts of a shared machine hit each alike; the table gives the median and
min..max over the repeats, and how many runs imported DeepSpeed. The load average before each run is recorded. Not a
unit test: the figures are in docs/benchmarks.md.
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
RECIPES = ("sft", "dpo", "grpo")
PHASES = ("interpreter", "import recipe", "recipe", "import pipeline", "preflight", "tokenizer", "model load",
          "eval before", "trainer", "train setup", "first step", "save", "eval after", "report", "other")


def child(recipe_path: str, out: str) -> None:
    """One ``posttrain train RECIPE`` (``posttrain.cli.main`` as the program) in this process; prints each phase's
    seconds as one JSON line on stdout when the process ends (and when it started, on ``time.monotonic``: the
    parent's clock too)."""
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    spans: dict[str, list[tuple[float, float]]] = {}

    def span(name, fn):
        def timed(*args, **kwargs):
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.setdefault(name, []).append((start, time.monotonic()))
        return timed

    from posttrain.recipe import load_recipe_stages
    marks["import recipe"] = time.monotonic()
    sets = ["training.max_steps=1", "training.logging_steps=1", "training.save_strategy=no", f"output_dir={out}"]
    load_recipe_stages(recipe_path, sets)  # timed here; the command parses it again (a few ms once imported)
    marks["recipe"] = time.monotonic()
    from posttrain import cli, recipe
    from posttrain.run import pipeline
    marks["import pipeline"] = time.monotonic()
    recipe.load_recipe_stages = span("reparse", recipe.load_recipe_stages)  # the command's own parse

    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):
            marks["trainer"] = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            marks["train setup"] = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("first step", time.monotonic())

        def on_train_end(self, args, state, control, **kwargs):
            marks["train end"] = time.monotonic()

    def load_builder(spec, _load=pipeline.load):  # the family's build_trainer(ctx), given the callback
        fn = _load(spec)
        if not str(spec).rsplit(":", 1)[-1].endswith("_trainer"):
            return fn

        def build(ctx):
            ctx.callbacks.append(Marks())
            return fn(ctx)
        return build

    pipeline.load = load_builder
    modules = [pipeline] + [m for m in (sys.modules.get("posttrain.run.outputs"),) if m is not None]
    for name, attr in (("preflight", "preflight"), ("model load", "load_models"), ("eval", "test_accuracy"),
                       ("report", "write_report")):
        for module in modules:
            if hasattr(module, attr):
                setattr(module, attr, span(name, getattr(module, attr)))

    def report() -> None:  # at exit: after main() returns, or inside posttrain's own end of the process
        end = time.monotonic()
        evals = spans.get("eval", [])
        before, after = (evals + [(0.0, 0.0), (0.0, 0.0)])[:2]
        pre, load = spans["preflight"][0], spans["model load"][0]
        written = spans.get("report", [(end, end)])[0]
        row = {
            "import recipe": marks["import recipe"] - t0,
            "recipe": marks["recipe"] - marks["import recipe"],
            "import pipeline": marks["import pipeline"] - marks["recipe"],
            "preflight": pre[1] - marks["import pipeline"] - sum(b - a for a, b in spans.get("reparse", [])),
            "tokenizer": load[0] - pre[1],
            "model load": load[1] - load[0],
            "eval before": before[1] - before[0],
            "trainer": marks["trainer"] - max(before[1], load[1]),
            "train setup": marks["train setup"] - marks["trainer"],
            "first step": marks["first step"] - marks["train setup"],
            "save": (after[0] if after[1] else written[0]) - marks["train end"],
            "eval after": after[1] - after[0],
            "report": written[1] - written[0],
            "t0": t0, "deepspeed imported": "deepspeed" in sys.modules,
        }
        print(json.dumps(row), flush=True)

    import atexit

    atexit.register(report)
    sys.argv = ["posttrain", "train", recipe_path, *[x for s in sets for x in ("--set", s)]]
    sys.exit(cli.main())  # as the program: the way the posttrain script ends the process


def run_once(label: str, repo: Path, recipe: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo))
    with tempfile.TemporaryDirectory() as out:
        load = os.getloadavg()[0]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", f"recipes/{recipe}.yaml", out],
                              cwd=repo, env=env, capture_output=True, text=True)
        wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{label} {recipe}: run failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["interpreter"] = row.pop("t0") - start
    row["total"] = wall
    # after run() returns, the rest of run() after report.html and the interpreter's exit
    row["other"] = wall - sum(row[p] for p in PHASES if p != "other")
    return {"label": label, "recipe": recipe, "load_before": load, "deepspeed_imported": row.pop("deepspeed imported"),
            "phases": row}


def table(rows: list[dict], labels: list[str], recipes: list[str]) -> str:
    def cell(values):
        return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"

    lines = []
    for recipe in recipes:
        head = f"| {recipe} phase (s) | " + " | ".join(labels) + " |"
        lines += [head, "|---" * (len(labels) + 1) + "|"]
        for phase in (*PHASES, "total"):
            cells = [cell([r["phases"][phase] for r in rows if r["label"] == lab and r["recipe"] == recipe])
                     for lab in labels]
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        ds = [str(sum(r["deepspeed_imported"] for r in rows if r["label"] == lab and r["recipe"] == recipe))
              for lab in labels]
        lines.append("| runs that imported DeepSpeed | " + " | ".join(ds) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repo", action="append", default=[], metavar="LABEL=PATH",
                        help="a checkout to time (repeatable; default: this one)")
    parser.add_argument("--out", type=Path, help="write every run's phases as JSON")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    repos = [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1]).resolve()) for spec in args.repo] or [("this", ROOT)]
    rows = []
    for i in range(args.repeats):
        for recipe in args.recipes:
            for label, repo in repos:
                rows.append(run_once(label, repo, recipe))
                p = rows[-1]["phases"]
                print(f"[{i + 1}/{args.repeats}] {label} {recipe}: total {p['total']:.2f} s, first step "
                      f"{p['first step']:.2f} s (load {rows[-1]['load_before']:.2f})", file=sys.stderr)
    labels = [label for label, _ in repos]
    print(table(rows, labels, args.recipes))
    loads = [r["load_before"] for r in rows]
    print(f"load average before the runs: {min(loads):.2f}..{max(loads):.2f} on {os.cpu_count()} cores")
    if args.out:
        args.out.write_text(json.dumps({"repos": {k: str(v) for k, v in repos}, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
