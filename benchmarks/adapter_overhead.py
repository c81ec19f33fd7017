"""Per-step cost of the GOAT and GGPO trainer wiring over plain LoRA, for two checkouts of posttrain (before / after).

    OMP_NUM_THREADS=1 python benchmarks/adapter_overhead.py --code before=/path/to/main --code after=. \\
        --model builtin:tiny-qwen2-arith --seq 128 --batch 8 --out benchmarks/results/adapter_overhead_cpu.json

Each run is a fresh process that imports posttrain from the given checkout (``PYTHONPATH``) and trains a plain
``transformers.Trainer`` with the variant's trainer mixin (``GOATTrainerMixin`` / ``GGPOTrainerMixin``, what the
family trainers get from ``peft.type``) on a random Qwen2 (``--hidden``, ``--layers``, ``--vocab``), LoRA rank 8 on
every linear layer (GOAT: 4 experts, top 2), a causal-LM loss on ``--seq`` random tokens, ``--batch`` rows per step,
``logging_steps`` 10. Reported: CPU seconds per step after the warm-up (this process, all threads) and peak RSS growth,
median [min..max] over ``--repeats`` runs, interleaved over (checkout, variant), and each variant's ratio to LoRA of
the same checkout. The last train loss of every run is printed too: before and after must agree bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("lora", "goat", "ggpo")


def _one(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    import _common

    sys.path.insert(0, os.environ["BENCH_POSTTRAIN"])  # this run's checkout first (_common adds the script's own)
    net = _common.build_model(args)
    torch.manual_seed(0)  # the adapters' random initialisation (LoRA A, GOAT's router): the same in every run
    if args.variant == "goat":
        from posttrain.adapters.goat import GOATTrainerMixin, apply_goat

        model = apply_goat(net, "all-linear", rank=8, num_experts=4, top_k=2, lora_dropout=0.0)
        mixin, extra = GOATTrainerMixin, {}
    else:
        model = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        if args.variant == "ggpo":
            from posttrain.adapters.ggpo import GGPOTrainerMixin

            mixin, extra = GGPOTrainerMixin, {"ggpo_sigma": 0.05, "ggpo_beta": 0.01}
        else:
            mixin, extra = None, {}
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(4, _common.vocab_size(net), (args.steps * args.batch, args.seq), generator=gen)]
    kwargs = _common.train_kwargs(args, tempfile.mkdtemp(prefix="bench-adapter-"))
    kwargs.update(logging_steps=10, learning_rate=1e-3, remove_unused_columns=False)
    cls = Trainer if mixin is None else type("Bench", (mixin, Trainer), {})
    trainer = cls(model=model, args=TrainingArguments(**kwargs), train_dataset=rows, **extra)
    res = _common.measure(trainer, args.steps, args.warmup)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    import posttrain

    assert Path(posttrain.__file__).resolve().is_relative_to(Path(os.environ["BENCH_POSTTRAIN"])), posttrain.__file__
    return {"variant": args.variant, "last_logged_loss": losses[-1] if losses else None, **res}


def main() -> None:
    import _common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(parser, seq_default=128)
    parser.set_defaults(vocab=32768, steps=22, warmup=2, batch=4)
    parser.add_argument("--code", action="append", default=[], help="NAME=PATH of a posttrain checkout (repeatable)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_one(args)))
        return
    codes = [c.split("=", 1) for c in (args.code or ["current=" + str(Path(__file__).resolve().parents[1])])]
    load = Path("/proc/loadavg").read_text().split()[:3]
    runs = []
    cells = [(name, path, v) for name, path in codes for v in VARIANTS]
    for r in range(args.repeats):
        for name, path, variant in (cells if r % 2 == 0 else cells[::-1]):
            env = {**os.environ, "PYTHONPATH": str(Path(path).resolve()), "BENCH_POSTTRAIN": str(Path(path).resolve())}
            cmd = [sys.executable, __file__, "--variant", variant, *_common.model_argv(args)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"run failed: {name} {variant}")
            res = {**json.loads(out.stdout.strip().splitlines()[-1]), "code": name, "repeat": r}
            runs.append(res)
            print(f"  [{r}] {name:<8} {variant:<5} {res['cpu_s_per_step']:.4f} CPU s/step  peak growth "
                  f"{res['peak_growth_mib']:.0f} MiB  last loss {res['last_logged_loss']}", flush=True)
    summary = {}
    for name, _ in codes:
        for variant in VARIANTS:
            rs = [x for x in runs if x["code"] == name and x["variant"] == variant]
            cpu = [x["cpu_s_per_step"] for x in rs]
            lora = {x["repeat"]: x["cpu_s_per_step"] for x in runs if x["code"] == name and x["variant"] == "lora"}
            ratio = [x["cpu_s_per_step"] / lora[x["repeat"]] for x in rs]
            summary[f"{name}/{variant}"] = {
                "cpu_s_per_step": [statistics.median(cpu), min(cpu), max(cpu)],
                "ratio_to_lora": [statistics.median(ratio), min(ratio), max(ratio)],
                "peak_growth_mib": statistics.median(x["peak_growth_mib"] for x in rs),
                "last_logged_loss": sorted({x["last_logged_loss"] for x in rs}, key=str)}
    print(f"\n{_common.describe_model(args)}, seq {args.seq}, batch {args.batch}, {args.steps} steps ({args.warmup} "
          f"warm-up), {args.repeats} runs each, {runs[0]['device']}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average before {' '.join(load)}, after "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for key, s in summary.items():
        c, q = s["cpu_s_per_step"], s["ratio_to_lora"]
        print(f"{key:<16} CPU s/step {c[0]:.4f} [{c[1]:.4f}..{c[2]:.4f}]  / LoRA {q[0]:.3f} [{q[1]:.3f}..{q[2]:.3f}]"
              f"  peak growth {s['peak_growth_mib']:.0f} MiB  last loss {s['last_logged_loss']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"argv": sys.argv, "runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
