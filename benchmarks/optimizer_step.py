"""The optimizer step alone: every optimizer ``training.optim`` can select (``posttrain.optim.OPTIMIZERS``) against
torch's AdamW (HF's ``adamw_torch``), on the parameters of one benchmark model with random gradients.

    OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py                      # random Qwen2 32k / 256 / 4 layers
    OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py --shape 0.5b --steps 3

CPU seconds (process time) per ``step()`` after ``--warmup`` steps, the arms interleaved over ``--rounds`` (A B, then
B A, ...) so that a shared machine's drift hits both; median [min..max] of each arm and of the per-round ratio. The
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


def make_optimizer(name: str, params, lr: float):
    """``adamw`` (torch's, as HF's ``adamw_torch``) or a ``posttrain.optim.OPTIMIZERS`` entry at its recipe defaults."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    from posttrain.optim import check_optim_args
    from posttrain.optim.stable_spam import StableSPAM

    constructors = {"stable_spam": StableSPAM}  # one line per OPTIMIZERS entry (the test checks they agree)
    return constructors[name](params, lr=lr, **check_optim_args(name, {}))


def time_steps(name: str, model, steps: int, warmup: int) -> float:
    """CPU seconds per ``step()`` of a fresh optimizer over ``model``'s parameters (same random gradients each run)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
    optimizer = make_optimizer(name, params, lr=1e-6)
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
    args = parser.parse_args(argv)
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(args, key, value)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters in {len(list(model.parameters()))} tensors; "
          f"{args.steps} timed steps after {args.warmup}, {args.rounds} interleaved rounds")
    for name in args.optimizers:
        times: dict[str, list[float]] = {"adamw": [], name: []}
        for r in range(args.rounds):
            for arm in (["adamw", name] if r % 2 == 0 else [name, "adamw"]):
                times[arm].append(time_steps(arm, model, args.steps, args.warmup))
        ratios = [b / a for a, b in zip(times["adamw"], times[name])]

        def summary(xs: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
            return f"{statistics.median(xs) * scale:{fmt}} [{min(xs) * scale:{fmt}}..{max(xs) * scale:{fmt}}]"

        print(f"{name}: {summary(times[name], 1e3)} ms/step, adamw {summary(times['adamw'], 1e3)} ms/step, "
              f"ratio {summary(ratios, fmt='.2f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
