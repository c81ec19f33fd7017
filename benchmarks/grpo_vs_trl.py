"""Speed and peak memory of posttrain's GRPO trainer against stock TRL ``GRPOTrainer``: same model, prompts, rewards.

    python benchmarks/grpo_vs_trl.py                                        # builtin:tiny-qwen2-arith, CPU
    python benchmarks/grpo_vs_trl.py --batch 64 --seq 8 --steps 12 --out benchmarks/results/grpo_vs_trl_cpu.json

Three trainers, each a fresh subprocess (see ``_common.py``): stock TRL (``loss_type="dapo"``, ``beta=0``), posttrain
with the same parts (``group`` advantages + ``dapo`` + ``ppo``), and posttrain with every composable part that keeps
the schedule (``stratified`` advantages keyed on completion length + ``delta_l`` aggregation + ``gppo`` clipping with
its SFT term). ``--batch`` completions per step (``num_generations`` 8 each prompt), ``--seq`` the maximum completion
length; prompts are the built-in arithmetic task, the reward is exact match. Generation (TRL's, shared by all three)
is part of every step, so the ratio shows what posttrain's advantage / loss code adds to a whole GRPO step.

``--loss-step``: the GRPO training step with generation excluded (issue #25's shape: ``--prompts`` prompts of
``--seq`` tokens, prompt 4x the completion with ``--prompt-fraction 0.8``, G = 8 completions each, random Qwen2, fp32):
one fixed synthetic batch as ``_generate_and_score_completions`` returns it (random advantages, on-policy, beta 0,
dapo), and ``compute_loss`` + ``backward`` timed in CPU seconds of this process (``--steps`` after ``--warmup``) for
stock TRL ``GRPOTrainer``, posttrain (the log-prob engine, each prompt once per group) and posttrain with
``share_prompts: false``; peak RSS growth over the timed loop; ratios per repeat (median and min..max)::

    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_trl.py --loss-step --vocab 32768 --hidden 256 --layers 2 \
        --seq 300 --prompt-fraction 0.8 --prompts 2 --steps 6 --warmup 2 --repeats 3
    # a 0.5B-class shape (Qwen2-0.5B's vocabulary, width and depth, random weights): one prompt x 8, a few steps
    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_trl.py --loss-step --model random --shape 0.5b --seq 300 \
        --prompt-fraction 0.8 --prompts 1 --steps 1 --warmup 0 --repeats 1 --loss-variants trl posttrain
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

VARIANTS = {
    "posttrain-grpo": {},
    "posttrain-combined": {"advantage": "stratified", "aggregation": "delta_l", "clipping": "gppo"},
}


def _one(args) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data.sources import load_source
    from posttrain.methods import GRPOParams
    from posttrain.models import load_tokenizer
    from posttrain.recipe import DataSource
    from posttrain.rl.rewards import exact_match
    from posttrain.rl.strata import completion_length
    from posttrain.families.rl.trainer import PosttrainGRPOTrainer

    label = args._one[0]
    tok = _common.tokenizer() if args.model == "random" else load_tokenizer(args.model)
    net = _common.build_model(args)
    prompts = load_source(DataSource(source="builtin:arithmetic-rl",
                                     options={"num_samples": args.steps * args.batch, "max_operand": 30}),
                          "data", "rl")
    kwargs = dict(_common.train_kwargs(args, tempfile.mkdtemp(prefix="bench-grpo-")), num_generations=8,
                  max_completion_length=args.seq, temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=0.2,
                  loss_type="dapo")
    common = dict(model=net, reward_funcs=[exact_match], train_dataset=prompts, processing_class=tok)
    if label == "trl-grpo":
        trainer = GRPOTrainer(args=GRPOConfig(**kwargs), **common)
    else:
        params = GRPOParams(**VARIANTS[label])
        if label == "posttrain-combined":
            kwargs["loss_type"] = "dr_grpo"  # what posttrain's builder hands TRL for delta_l (see build_rl_trainer)
            kwargs["epsilon_high"] = params.epsilon_high
        trainer = PosttrainGRPOTrainer(args=GRPOConfig(**kwargs), params=params,
                                       stratum_fn=lambda row, prompt, completion: completion_length(
                                           completion=completion), **common)
    res = _common.measure(trainer, args.steps, args.warmup)
    return {"label": label, "trainer": label.split("-")[0], "method": "grpo", **res}


NUM_GEN = 8
LOSS_VARIANTS = ("trl", "posttrain", "posttrain_unshared")


def _loss_batch(args, vocab: int, with_posttrain_keys: bool) -> dict:
    """One generation batch as TRL's ``_generate_and_score_completions`` returns it: ``--prompts`` prompts of
    ``seq * prompt_fraction`` random ids, each with G completions of the rest (no padding), random advantages."""
    import torch

    from posttrain.families.rl.trainer import KEEP, NUM_ROWS

    gen = torch.Generator().manual_seed(1234)
    prompt_len = round(args.seq * args.prompt_fraction)
    completion_len = args.seq - prompt_len
    rows = args.prompts * NUM_GEN
    prompts = torch.randint(4, vocab, (args.prompts, prompt_len), generator=gen).repeat_interleave(NUM_GEN, dim=0)
    completions = torch.randint(4, vocab, (rows, completion_len), generator=gen)
    batch = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
             "completion_mask": torch.ones_like(completions), "advantages": torch.randn(rows, generator=gen),
             "num_items_in_batch": torch.tensor(float(rows * completion_len))}
    if with_posttrain_keys:
        batch[KEEP] = torch.ones(rows)
        batch[NUM_ROWS] = torch.tensor(float(rows))
    return batch


def _one_loss_step(args) -> dict:
    """compute_loss + backward on a fixed batch, CPU seconds per step and peak RSS growth (one trainer)."""
    import gc
    import time

    import torch
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.families.rl.config import RLConfig
    from posttrain.families.rl.trainer import PosttrainGRPOTrainer
    from posttrain.methods import GRPOParams
    from posttrain.rl.rewards import exact_match
    from datasets import Dataset

    which = args._one[0]
    net = _common.build_model(args)
    tok = _common.tokenizer()
    kwargs = dict(_common.train_kwargs(args, tempfile.mkdtemp(prefix="bench-grpo-loss-")),
                  per_device_train_batch_size=args.prompts * NUM_GEN, num_generations=NUM_GEN,
                  max_completion_length=args.seq - round(args.seq * args.prompt_fraction), temperature=1.0, beta=0.0,
                  epsilon=0.2, epsilon_high=0.2, loss_type="dapo")
    common = dict(model=net, reward_funcs=[exact_match], processing_class=tok,
                  train_dataset=Dataset.from_list([{"prompt": "1+1=", "answer": "2"}] * 8))
    if which == "trl":
        trainer = GRPOTrainer(args=GRPOConfig(**kwargs), **common)
    else:
        trainer = PosttrainGRPOTrainer(args=RLConfig(**kwargs, share_prompts=which == "posttrain"),
                                       params=GRPOParams(aggregation="dapo"), **common)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = _loss_batch(args, _common.vocab_size(net), which != "trl")
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    base = _common._rss_kib("VmRSS") * 1024
    cpu = []
    for _ in range(args.warmup + args.steps):
        trainer.model.zero_grad(set_to_none=False)
        start = time.process_time()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        cpu.append(time.process_time() - start)
    peak = _common._rss_kib("VmHWM") * 1024
    timed = cpu[args.warmup:]
    return {"label": f"{which}-loss-step", "trainer": which, "method": "grpo", "loss": float(loss),
            "cpu_s_per_step": sum(timed) / len(timed), "steps_per_s": float("nan"),
            "peak_mib": peak / 2**20, "peak_growth_mib": (peak - base) / 2**20, "device": "cpu",
            "threads": torch.get_num_threads()}


def _loss_step_main(args) -> None:
    import statistics

    load_before = Path("/proc/loadavg").read_text().split()[:3]
    extra = ["--loss-step", "--prompt-fraction", str(args.prompt_fraction), "--prompts", str(args.prompts)]
    runs = []
    variants = tuple(v for v in LOSS_VARIANTS if v in args.loss_variants)
    for r in range(args.repeats):
        for which in (variants if r % 2 == 0 else variants[::-1]):
            cmd = [sys.executable, __file__, "--_one", which, *_common.model_argv(args), *extra]
            res = {**_common.run_guarded(cmd, args.min_free_gib), "repeat": r}
            runs.append(res)
            print(f"  [{r}] {res['label']:<28} {res['cpu_s_per_step']:.3f} CPU s/step  peak {res['peak_mib']:.0f} MiB "
                  f"(+{res['peak_growth_mib']:.0f})  loss {res['loss']:.6f}", flush=True)
    by = {(x["trainer"], x["repeat"]): x for x in runs}
    summary = {}
    for ours in variants[1:]:
        speed = [by[("trl", r)]["cpu_s_per_step"] / by[(ours, r)]["cpu_s_per_step"] for r in range(args.repeats)]
        memory = [by[(ours, r)]["peak_growth_mib"] / max(by[("trl", r)]["peak_growth_mib"], 1e-9)
                  for r in range(args.repeats)]
        summary[f"{ours}/trl"] = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                  for name, v in (("cpu_speedup", speed), ("peak_growth_ratio", memory))}
    for label in variants:
        cpu = [by[(label, r)]["cpu_s_per_step"] for r in range(args.repeats)]
        grow = [by[(label, r)]["peak_growth_mib"] for r in range(args.repeats)]
        print(f"{label:<20} CPU s/step {statistics.median(cpu):.3f} [{min(cpu):.3f}..{max(cpu):.3f}]  peak growth "
              f"{statistics.median(grow):.0f} MiB [{min(grow):.0f}..{max(grow):.0f}]")
    for name, ratio in summary.items():
        c, m = ratio["cpu_speedup"], ratio["peak_growth_ratio"]
        print(f"{name}: CPU speed-up {c['median']:.2f} [{c['min']:.2f}..{c['max']:.2f}], peak growth ratio "
              f"{m['median']:.2f} [{m['min']:.2f}..{m['max']:.2f}]")
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"argv": sys.argv, "model": _common.describe_model(args), "runs": runs,
                                              "paired": summary, "load": [load_before, load_after]}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(parser, seq_default=8)
    parser.set_defaults(model="builtin:tiny-qwen2-arith", batch=64, steps=10, warmup=2)
    parser.add_argument("--loss-step", action="store_true",
                        help="time compute_loss + backward on a fixed batch (generation excluded)")
    parser.add_argument("--prompt-fraction", type=float, default=0.8, help="--loss-step: share of a row that is prompt")
    parser.add_argument("--prompts", type=int, default=2, help="--loss-step: prompts per batch (G = 8 rows each)")
    parser.add_argument("--loss-variants", nargs="+", choices=LOSS_VARIANTS, default=list(LOSS_VARIANTS),
                        help="--loss-step: the trainers to run (trl first: the ratios are to it)")
    parser.add_argument("--_one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _common.apply_shape(args)
    if args.loss_step:
        if args._one:
            print(json.dumps(_one_loss_step(args)))
        else:
            _loss_step_main(args)
        return
    if args._one:
        print(json.dumps(_one(args)))
        return
    runs = _common.run_interleaved(__file__, [["trl-grpo"], ["posttrain-grpo"], ["posttrain-combined"]], args)
    summary = _common.summarise(runs, [("posttrain-grpo", "trl-grpo"), ("posttrain-combined", "trl-grpo")])
    _common.report("GRPO vs stock TRL GRPOTrainer", args, runs, summary)


if __name__ == "__main__":
    main()
