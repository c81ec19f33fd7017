"""CPU cost of the RL family's own math per variant: the advantage estimator, then the policy loss (clipping,
aggregation, the surrogate's terms and metrics) forward and backward, without the model (``--model``: with the model's
training forward and backward, the trainer's step without the optimizer).

    OMP_NUM_THREADS=1 python benchmarks/rl_parts.py                       # the variant-cost table's shape: 16 x 8
    OMP_NUM_THREADS=1 python benchmarks/rl_parts.py --rows 64 --tokens 1024 --out benchmarks/results/rl_parts_cpu.json

The arms are :func:`variant_costs.rl_cells` (every ``ADVANTAGES`` / ``AGGREGATIONS`` / ``CLIPPINGS`` /
``POLICY_LOSSES`` entry against ``recipes/grpo.yaml``, one axis changed at a time), so a part registered later joins
without an edit. Each arm's recipe is parsed as ``posttrain train`` would (its params, the parts' defaults), then one
call is what the trainer does per generation batch and micro-batch on its ``[B]`` rewards and ``[B, T]`` completion
log-probs: ``ADVANTAGES[advantage].fn`` (with the strata, lengths and ΔL row weights the entries declare) and
``POLICY_LOSSES[loss].fn`` on an :class:`~posttrain.families.rl.forward.RLForward`, then ``backward()`` to the
log-probs. Rewards are 0/1 at random (so the advantages are not all 0), the old log-probs the new ones plus noise (the
clip rules' masks are mixed). A forward need that the model computes (the entropy with gradient, the reference's
log-probs) is handed in as a tensor: its cost is the log-prob engine's, not a part's, and is listed as declared.

Reported: microseconds per call, median [min..max] over ``--rounds`` interleaved rounds of ``--calls`` calls each, the
ratio to the baseline arm's (median [min..max] over the rounds, geometric mean and its 90 % confidence interval), and
the ratio of the two arms' fastest single calls (as ``timeit`` reads a timing: on a shared machine interference only
adds time, so the fastest of many calls is the least disturbed estimate of a constant per-call cost; it is the reading
for same work plus a small constant difference, which is what an RL part swap is). Compare with the step's CPU seconds
in benchmarks/variant_costs.py's table to see what share of a training step a part can explain.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/rl_parts.py --model --calls 5 --rounds 10 \\
        --out benchmarks/results/rl_parts_model_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import variant_costs as V  # noqa: E402


class ModelStep:
    """``--model``: the log-prob engine's training forward of a random Qwen2 over one fixed batch (``rows`` rows of a
    ``prompt``-token prompt shared by each group of ``group`` rows, then ``tokens`` completion tokens), as the RL
    trainer runs it (``PosttrainGRPOTrainer._engine_logps``: completion rows only, each prompt once per group, the
    entropy with gradient when the loss declares it, else as a detached statistic for the metric)."""

    def __init__(self, args, rows: int, tokens: int, group: int, seed: int = 0):
        import torch

        from posttrain.families.rl.common import prompt_groups
        from posttrain.logprobs.engine import LogProbEngine

        self.model = V._common.build_model(argparse.Namespace(model="random", vocab=args.vocab, hidden=args.hidden,
                                                              layers=args.layers, seq=args.prompt + tokens))
        self.model.train()
        gen = torch.Generator().manual_seed(seed)
        prompts = torch.randint(4, args.vocab, (rows // group, args.prompt), generator=gen).repeat_interleave(group, 0)
        self.ids = torch.cat([prompts, torch.randint(4, args.vocab, (rows, tokens), generator=gen)], dim=1)
        self.attention = torch.ones_like(self.ids)
        self.tokens = tokens
        self.groups = prompt_groups(self.ids[:, :-tokens], self.attention[:, :-tokens])
        self.engine = LogProbEngine("auto", share_prompts=True)

    def __call__(self, mask, entropy: bool):
        """Per-token log-probs ``[B, T]`` with gradient (and the entropy with gradient when ``entropy``)."""
        import torch

        from posttrain.logprobs.engine import Needs

        self.model.zero_grad(set_to_none=False)
        completion = torch.zeros_like(self.attention)
        completion[:, -self.tokens:] = mask.to(completion.dtype)
        needs = Needs(entropy=entropy, statistics=() if entropy else ("entropy",))
        out = self.engine.forward(self.model, self.ids, self.attention, completion, groups=self.groups, needs=needs)
        t = self.tokens
        return out.logps[:, -t:], (out.entropy[:, -t:] if entropy else None)


def make_call(recipe: str, sets: tuple[str, ...], rows: int, tokens: int, seed: int = 0,
              model: ModelStep | None = None):
    """``call()``: one generation batch's advantages and one micro-batch's policy loss and backward for the arm (with
    ``model``: the model's training forward and backward too, the step of the trainer without the optimizer)."""
    import torch

    from posttrain.families.rl.aggregations.delta_l import delta_l_weights
    from posttrain.families.rl.common import Groups, Normalizer, RowTargets
    from posttrain.families.rl.forward import CORRECT, ENTROPY, REF_LOGPS, ROWS, RLForward
    from posttrain.families.rl.parts import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES

    p = V.load_arm(recipe, [*V.COMMON_SETS, *sets]).params
    size = V._yaml(recipe)["training"]["num_generations"]
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (rows,), generator=gen).float()
    mask = (torch.arange(tokens).expand(rows, tokens) < torch.randint(1, tokens + 1, (rows, 1), generator=gen)).float()
    logps0 = -torch.rand(rows, tokens, generator=gen) * 3
    if model is not None:
        with torch.no_grad():
            logps0 = model(mask, entropy=False)[0].detach()
    old = logps0 + 0.3 * torch.randn(rows, tokens, generator=gen)
    estimator, loss = ADVANTAGES[p.advantage], POLICY_LOSSES[p.loss]
    needs = loss.needs(p)
    measured = {}
    if estimator.needs_strata:
        measured["strata"] = torch.randint(0, 2, (rows,), generator=gen)
    if estimator.needs_lengths:
        measured["lengths"] = mask.sum(-1)
    extra = {}
    if REF_LOGPS in needs:
        extra["ref_logps"] = logps0 + 0.1 * torch.randn(rows, tokens, generator=gen)
    if ENTROPY in needs:
        extra["entropy"] = torch.rand(rows, tokens, generator=gen).requires_grad_()
    if CORRECT in needs:
        extra["correct"] = rewards
        extra["num_correct_tokens"] = (mask * rewards[:, None]).sum()
    if ROWS in needs:
        extra["rows"] = RowTargets(rewards, torch.arange(rows) // size)
    row_weights = AGGREGATIONS[p.aggregation].row_weights

    def call():
        out = estimator.fn(rewards, Groups(size, **measured), p)
        kept = mask * out.keep[:, None].to(mask.dtype)
        weights = delta_l_weights(kept.sum(-1), p.delta_l_alpha, p.delta_l_scope, size) if row_weights else None
        normalizer = Normalizer(num_items_in_batch=kept.sum(), num_rows=out.keep.sum().float(),
                                max_completion_length=tokens, row_weights=weights)
        if model is None:
            logps = logps0.clone().requires_grad_()
            own = extra
        else:
            logps, entropy = model(mask, entropy=ENTROPY in needs)
            own = {**extra, **({"entropy": entropy} if entropy is not None else {})}
        fwd = RLForward(logps=logps, old_logps=old, mask=kept, advantages=out.advantages.float(),
                        normalizer=normalizer, accumulation_steps=1, gather=lambda t: t, **own)
        value, _ = loss.fn(fwd, p)
        value.backward()

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="rows of the generation batch (prompts x num_generations)")
    parser.add_argument("--tokens", type=int, default=8, help="completion tokens per row (max_completion_length)")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", action="store_true",
                        help="with the model's training forward and backward (a random Qwen2 of --vocab/--hidden/"
                             "--layers, --prompt prompt tokens per group of num_generations rows): the trainer's step "
                             "without the optimizer, in one process, so the variants' ratios are free of the "
                             "process-to-process spread of benchmarks/variant_costs.py")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=24, help="--model: prompt tokens")
    parser.add_argument("--only", nargs="+", default=None, help="variant labels to run (default: all)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    import torch

    cells = [c for c in V.rl_cells() if not c.not_measured and (not args.only or c.variant in args.only)]
    arms = list(dict.fromkeys(a for c in cells for a in (c.base_arm, c.arm)))
    group = V._yaml(V.RL_BASE)["training"]["num_generations"]
    model = ModelStep(args, args.rows, args.tokens, group) if args.model else None
    calls = {arm: make_call(*arm, args.rows, args.tokens, model=model) for arm in arms}
    times: dict[tuple, list[float]] = {arm: [] for arm in arms}
    fastest: dict[tuple, float] = {arm: float("inf") for arm in arms}  # the least disturbed single call
    for arm in arms:  # warm-up
        calls[arm]()
    for rnd in range(args.rounds):
        for arm in arms if rnd % 2 == 0 else arms[::-1]:
            total = 0.0
            for _ in range(args.calls):
                start = time.process_time()
                calls[arm]()
                took = time.process_time() - start
                total += took
                fastest[arm] = min(fastest[arm], took * 1e6)
            times[arm].append(total / args.calls * 1e6)
    rows = []
    what = (f"the model's training forward (random Qwen2 vocab {args.vocab}, hidden {args.hidden}, {args.layers} "
            f"layers, {args.prompt}-token prompts) + advantages + policy loss + backward" if args.model
            else "advantages + policy loss forward and backward")
    print(f"RL parts, {args.rows} rows x {args.tokens} tokens, CPU microseconds per call ({what}), median [min..max] "
          f"over {args.rounds} rounds of {args.calls} calls; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load average {V._common.load_average()}\n")
    print("| variant | baseline | us / call variant | us / call baseline | ratio: median [min..max]; geometric mean "
          "(90 % CI) | fastest call variant / baseline |\n|---|---|---|---|---|---|")
    for c in cells:
        var, base = times[c.arm], times[c.base_arm]
        ratio = [v / b for v, b in zip(var, base, strict=True)]
        rows.append({"variant": c.variant, "baseline": c.baseline, "us": V._spread(var), "base_us": V._spread(base),
                     "ratio": V._ratio_spread(ratio), "fastest_us": fastest[c.arm], "base_fastest_us": fastest[c.base_arm],
                     "fastest_ratio": fastest[c.arm] / fastest[c.base_arm]})
        print(f"| {c.variant} | {c.baseline} | {V._fmt(rows[-1]['us'], 0)} | {V._fmt(rows[-1]['base_us'], 0)} | "
              f"{V._fmt_ratio(rows[-1]['ratio'])} | {rows[-1]['fastest_ratio']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv, "rows_x_tokens": [args.rows, args.tokens],
                                              "median_us": {" ".join(a[1]) or a[0]: statistics.median(t)
                                                            for a, t in times.items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
