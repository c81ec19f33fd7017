"""Per-process memory of the weights, reference model and optimizer state under ZeRO-3 and FSDP2, by process count.

    OMP_NUM_THREADS=1 python benchmarks/distributed_memory.py --out benchmarks/results/distributed_memory_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/distributed_memory.py --backends zero3 --processes 1 2 --hidden 256

Each configuration runs ``recipes/dpo.yaml`` (a policy and its frozen-copy reference, AdamW) for two optimizer steps
on a random-init Qwen2 (built offline, saved with the built-in tokenizer) through ``posttrain train`` itself, on one
process or under ``accelerate launch`` with posttrain's flags for the backend (gloo on CPU). After the first optimizer
step every process counts the bytes it holds, from the tensors themselves (not the allocator):

* ``policy``: the policy's parameters (its ZeRO-3 partition or FSDP2 shard; everything with one process);
* ``reference``: the frozen reference model's parameters, likewise;
* ``optimizer_state``: the optimizer's state tensors (AdamW moments; their shards);
* ``master``: DeepSpeed's fp32 master copy of the trained weights (its partition; 0 for FSDP2 and one process);
* ``peak_rss``: the process's peak resident set size (framework and data included, so not the sum of the above).

One process is the baseline for both backends (nothing is sharded). The point is the ratio: with N processes each holds
about 1/N of ``policy``, ``reference`` and ``optimizer_state`` (tests/test_distributed.py checks the direction on the
built-in model).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIELDS = ("policy", "reference", "optimizer_state", "master")


def _bytes(tensors) -> int:
    from posttrain.distributed import local_shard

    seen, total = set(), 0
    for t in tensors:  # each tensor once (tied weights are one parameter)
        if id(t) not in seen:
            seen.add(id(t))
            shard = local_shard(t)
            total += shard.numel() * shard.element_size()
    return total


def _state_tensors(optimizer):
    import torch

    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                yield value


def held_bytes(trainer) -> dict[str, int]:
    """What this process holds of the policy, the reference and the optimizer (see the module docstring)."""
    import torch

    policy = _bytes(trainer.model.parameters())
    ref = getattr(trainer, "ref_model", None)
    reference = _bytes(ref.parameters()) if ref is not None else 0
    opt = trainer.optimizer
    while not isinstance(opt, torch.optim.Optimizer) or type(opt).__module__.startswith("accelerate"):
        opt = opt.optimizer  # accelerate's wrapper, then DeepSpeed's ZeRO optimizer around a torch optimizer
    zero = trainer.optimizer.optimizer  # DeepSpeed's ZeRO optimizer keeps fp32 master partitions of its own
    master = sum(_bytes(getattr(zero, name, None) or ())
                 for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"))
    return {"policy": policy, "reference": reference, "optimizer_state": _bytes(_state_tensors(opt)),
            "master": master}


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _worker(args) -> None:
    """One process of a configuration: train, and write what it holds after the first optimizer step."""
    from transformers import Trainer, TrainerCallback

    from posttrain.recipe import load_recipe
    from posttrain.train import run

    out = Path(args.out_dir)

    class _Probe(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step != 1:
                return
            trainer = next(o for o in gc.get_objects() if isinstance(o, Trainer))
            row = {"rank": int(os.environ.get("RANK", "0")), **held_bytes(trainer), "peak_rss": _peak_rss_bytes()}
            (out / f"rank{row['rank']}.json").write_text(json.dumps(row))

    recipe = load_recipe(ROOT / "recipes" / "dpo.yaml", [
        f"model={args.model_dir}", "data.eval=null", "data.test=null", "training.max_steps=2",
        "training.per_device_train_batch_size=2", "training.save_strategy=no", "report=false",
        "training.disable_tqdm=true", f"output_dir={out / 'run'}"])
    run(recipe, quiet=True, callbacks=[_Probe()])


def _build_model(args, folder: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from posttrain.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny-qwen2")
    heads = max(1, args.hidden // 64)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _configuration(args, model_dir: Path, backend: str, processes: int) -> dict:
    from posttrain.launch import BACKENDS, free_port

    with tempfile.TemporaryDirectory(prefix="posttrain-mem-") as tmp:
        worker = [str(Path(__file__).resolve()), "--worker", "--model-dir", str(model_dir), "--out-dir", tmp]
        if processes == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", *BACKENDS[backend], "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--main_process_port",
                   str(free_port()), *worker]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{backend} x{processes} failed:\n{proc.stderr[-3000:]}")
        ranks = sorted((json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")), key=lambda r: r["rank"])
    for row in ranks:
        row["total"] = sum(row[k] for k in FIELDS)
    return {"backend": backend if processes > 1 else "single", "processes": processes, "seconds": time.time() - start,
            "ranks": ranks}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["zero3", "fsdp2"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random Qwen2")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the random Qwen2")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="posttrain-mem-model-") as model_dir:
        n_params = _build_model(args, Path(model_dir))
        runs = []
        if 1 in args.processes:
            runs.append(_configuration(args, Path(model_dir), "single", 1))
        for backend in args.backends:
            runs += [_configuration(args, Path(model_dir), backend, n) for n in args.processes if n > 1]
    result = {
        "what": "bytes held per process after the first optimizer step of recipes/dpo.yaml (policy + frozen-copy "
                "reference, AdamW, fp32) on CPU (gloo)",
        "model": f"random Qwen2 hidden={args.hidden} layers={args.layers} ({n_params} parameters)",
        "command": "python benchmarks/distributed_memory.py " + " ".join(sys.argv[1:]),
        "runs": runs,
    }
    mib = 2 ** 20
    print(f"{'backend':8} {'N':>2} {'rank':>4} " + " ".join(f"{f:>16}" for f in (*FIELDS, "total", "peak_rss"))
          + "   (MiB)")
    for r in runs:
        for row in r["ranks"]:
            print(f"{r['backend']:8} {r['processes']:>2} {row['rank']:>4} "
                  + " ".join(f"{row[f] / mib:16.2f}" for f in (*FIELDS, "total", "peak_rss")))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
