"""Speed and peak memory of posttrain's GRPO trainer against stock TRL ``GRPOTrainer``: same model, prompts, rewards.

    python benchmarks/grpo_vs_trl.py                                        # builtin:tiny-qwen2-arith, CPU
    python benchmarks/grpo_vs_trl.py --batch 64 --seq 8 --steps 12 --out benchmarks/results/grpo_vs_trl_cpu.json

Three trainers, each a fresh subprocess (see ``_common.py``): stock TRL (``loss_type="dapo"``, ``beta=0``), posttrain
with the same parts (``group`` advantages + ``dapo`` + ``ppo``), and posttrain with every composable part that keeps
the schedule (``stratified`` advantages keyed on completion length + ``delta_l`` aggregation + ``gppo`` clipping with
its SFT term). ``--batch`` completions per step (``num_generations`` 8 each prompt), ``--seq`` the maximum completion
length; prompts are the built-in arithmetic task, the reward is exact match. Generation (TRL's, shared by all three)
is part of every step, so the ratio shows what posttrain's advantage / loss code adds to a whole GRPO step.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(parser, seq_default=8)
    parser.set_defaults(model="builtin:tiny-qwen2-arith", batch=64, steps=10, warmup=2)
    parser.add_argument("--_one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(_one(args)))
        return
    runs = _common.run_interleaved(__file__, [["trl-grpo"], ["posttrain-grpo"], ["posttrain-combined"]], args)
    summary = _common.summarise(runs, [("posttrain-grpo", "trl-grpo"), ("posttrain-combined", "trl-grpo")])
    _common.report("GRPO vs stock TRL GRPOTrainer", args, runs, summary)


if __name__ == "__main__":
    main()
