"""Speed and memory of posttrain's SFT-family trainer against stock TRL SFTTrainer, same model, data and settings.

    python benchmarks/sft_vs_trl.py --model builtin:tiny-qwen2 --steps 100 --method dft

Prints steps/s for each trainer, their ratio, and peak memory (CUDA peak allocated on GPU; peak RSS growth on CPU).
Each trainer runs in its own subprocess so peak memory is not shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _one(which: str, model: str, method: str, steps: int, batch: int) -> dict:
    import torch
    from trl import SFTConfig, SFTTrainer

    from posttrain.data.sources import load_source
    from posttrain.methods import METHODS
    from posttrain.models import load_model, load_tokenizer
    from posttrain.recipe import DataSource
    from posttrain.trainers.sft import PosttrainSFTTrainer

    tok = load_tokenizer(model)
    net = load_model(model)
    ds = load_source(DataSource(source="builtin:arithmetic-sft", options={"num_samples": steps * batch}), "data", "sft")
    cfg = dict(output_dir="/tmp/bench", report_to="none", per_device_train_batch_size=batch, max_steps=steps,
               logging_steps=steps, save_strategy="no", gradient_checkpointing=False, disable_tqdm=True,
               bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available())
    if which == "trl":
        trainer = SFTTrainer(model=net, args=SFTConfig(loss_type="dft" if method == "dft" else "nll", **cfg),
                             train_dataset=ds, processing_class=tok)
    else:
        trainer = PosttrainSFTTrainer(model=net, args=SFTConfig(**cfg), train_dataset=ds, processing_class=tok,
                                      method=method, params=METHODS[method].params())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    return {"trainer": which, "steps_per_s": steps / elapsed, "peak_mem_mib": peak,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-qwen2")
    parser.add_argument("--method", default="dft", choices=["sft", "dft"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--_one", choices=["trl", "posttrain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(_one(args._one, args.model, args.method, args.steps, args.batch)))
        return
    results = {}
    for which in ("trl", "posttrain"):
        out = subprocess.run([sys.executable, __file__, "--_one", which, "--model", args.model, "--method",
                              args.method, "--steps", str(args.steps), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results.values():
        print(f"{r['trainer']:<10} {r['steps_per_s']:.2f} steps/s  peak {r['peak_mem_mib']:.0f} MiB  ({r['device']})")
    ratio = results["posttrain"]["steps_per_s"] / results["trl"]["steps_per_s"]
    print(f"speed ratio posttrain/trl: {ratio:.3f}")


if __name__ == "__main__":
    main()
