"""The optimizer step alone: every optimizer ``training.optim`` can select (``posttrain.optim.OPTIMIZERS``) against
torch's AdamW (HF's ``adamw_torch``), on the parameters of one benchmark model with random gradients.

    OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py                      # random Qwen2 32k / 256 / 4 layers
    OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py --shape 0.5b --steps 3
    OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py --loop      # also the per-tensor loop (foreach=False)

CPU seconds (process time) per ``step()`` after ``--warmup`` steps, the arms interleaved over ``--rounds`` (A B, then
B A, ...) so that a shared machine's drift hits both; median [min..max] of each arm and of the per-round ratio.
``--loop`` adds a third arm per optimizer, its per-tensor reference loop (``foreach=False``, the step before the
foreach one), and its ratio to the foreach step. The
trainer-level cost of an optimizer is in ``benchmarks/variant_costs.py``; this isolates the optimizer's own work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SHAPES, build_model  # noqa: E402


def make_optimizer(name: str, params, lr: float, foreach: bool = True):
    """``adamw`` (torch's, as HF's ``adamw_torch``) or a ``posttrain.optim.OPTIMIZERS`` entry at its recipe defaults
    (``foreach=False``: its per-tensor reference loop)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    from posttrain.optim import check_optim_args
    from posttrain.optim.stable_spam import StableSPAM

    constructors = {"stable_spam": StableSPAM}  # one line per OPTIMIZERS entry (the test checks they agree)
    return constructors[name](params, lr=lr, foreach=foreach, **check_optim_args(name, {}))


def time_steps(arm: str, model, steps: int, warmup: int) -> float:
    """CPU seconds per ``step()`` of a fresh optimizer over ``model``'s parameters (same random gradients each run);
    ``arm`` is an optimizer name, ``NAME:loop`` for its per-tensor loop."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
    name, _, mode = arm.partition(":")
    optimizer = make_optimizer(name, params, lr=1e-6, foreach=mode != "loop")
    for _ in range(warmup):
        optimizer.step()
    start = time.process_time()
    for _ in range(steps):
        optimizer.step()
    return (time.process_time() - start) / steps


def main(argv: list[str] | None = None) -> int:
    from posttrain.optim import OPTIMIZERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=300)
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--optimizers", nargs="+", default=sorted(OPTIMIZERS), choices=sorted(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", action="store_true", help="also time each optimizer's per-tensor loop")
    args = parser.parse_args(argv)
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(args, key, value)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters in {len(list(model.parameters()))} tensors; "
          f"{args.steps} timed steps after {args.warmup}, {args.rounds} interleaved rounds")
    for name in args.optimizers:
        arms = ["adamw", name] + ([f"{name}:loop"] if args.loop else [])
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for r in range(args.rounds):
            for arm in arms[r % len(arms):] + arms[:r % len(arms)]:  # each arm first in turn
                times[arm].append(time_steps(arm, model, args.steps, args.warmup))

        def summary(xs: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
            return f"{statistics.median(xs) * scale:{fmt}} [{min(xs) * scale:{fmt}}..{max(xs) * scale:{fmt}}]"

        def ratio(arm: str, base: str = "adamw") -> str:
            return summary([b / a for a, b in zip(times[base], times[arm])], fmt=".2f")

        print(f"{name}: {summary(times[name], 1e3)} ms/step, adamw {summary(times['adamw'], 1e3)} ms/step, "
              f"ratio {ratio(name)}")
        if args.loop:
            print(f"  {name} per-tensor loop: {summary(times[name + ':loop'], 1e3)} ms/step, ratio to adamw "
                  f"{ratio(name + ':loop')}, foreach / loop {ratio(name, name + ':loop')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
