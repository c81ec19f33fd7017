"""Does KTO raise preference accuracy on the built-in arithmetic pairs? posttrain's KTO against stock TRL and DPO.

    OMP_NUM_THREADS=1 python benchmarks/kto_learning.py --trainers posttrain trl --order shuffled --batch 32
    OMP_NUM_THREADS=1 python benchmarks/kto_learning.py --trainers posttrain dpo --batch 64 --seed 1

The setup of ``tests/families/preference/test_preference_trainer.py::test_each_method_raises_held_out_preference_accuracy`` (the same sets
as ``benchmarks/preference_accuracy.py``: 256 training pairs, held-out pairs of trained prompts with unseen wrong
answers, test-split pairs): from ``builtin:tiny-qwen2`` (random init; the frozen reference is a copy), the pairs are
unpaired into one desirable and one undesirable row each, in the order ``--order`` names (``unpaired_rows``).

* ``posttrain``: ``posttrain.train.run`` on a ``method.name: kto`` recipe (the code path of ``posttrain train``) with
  the pairs (``--order pairs``: the trainer unpairs them) or the unpaired rows in the ``--order`` given;
* ``trl``: stock ``trl.KTOTrainer`` on the very same unpaired rows in the same order, same model, steps, batch,
  learning rate, schedule and seed.
* ``dpo``: posttrain's DPO on the pairs (the yardstick).

``--batch`` counts rows for KTO (two per pair) and pairs for DPO: KTO at ``--batch 64`` sees the pairs DPO sees at
``--batch 32``. The measured table is in docs/methods/kto.md#learning-check.

Prints, per trainer, preference accuracy (chosen + EOS scored above rejected + EOS by the policy's summed log-prob)
before -> after on the training pairs, the held-out pairs and the test split, plus the last logged KTO metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preference_accuracy import build_sets, preference_accuracy  # noqa: E402


def unpaired_rows(train, seed, order, batch):
    """The unpaired rows in the order a trainer reads them: ``pairs``
    (``posttrain.families.unpaired.trainer.unpair``: pairs shuffled, each pair's two rows side by side), ``shuffled``
    (rows shuffled after unpairing: posttrain before this benchmark), ``balanced`` (each micro-batch half desirable,
    half undesirable, from different pairs)."""
    import random

    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    from posttrain.families.unpaired.trainer import unpair

    if order == "pairs":
        return unpair(Dataset.from_list(train), seed).to_list()
    if order == "shuffled":
        return unpair_preference_dataset(Dataset.from_list(train), batch_size=1).shuffle(seed=seed).to_list()
    rng = random.Random(seed)
    good = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in train]
    bad = [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in train]
    rng.shuffle(good)
    rng.shuffle(bad)
    rows = []
    for start in range(0, len(good), batch // 2):
        block = good[start:start + batch // 2] + bad[start:start + batch // 2]
        rng.shuffle(block)
        rows += block
    return rows


def run_posttrain(method, args, data_path, out):
    """``posttrain.train.run`` on ``data_path`` (pairs, or unpaired rows read in file order)."""
    from posttrain.recipe import parse_recipe
    from posttrain.train import run

    recipe = parse_recipe({
        "model": args.model, "data": {"train": str(data_path)}, "method": method,
        "training": {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": args.lr,
                     "lr_scheduler_type": args.scheduler, "logging_steps": max(1, args.steps // 8),
                     "save_strategy": "no", "disable_tqdm": True},
        "output_dir": str(out), "seed": args.seed})
    run(recipe, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def run_trl(args, rows, out):
    import copy

    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from posttrain.models import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model)
    config = KTOConfig(output_dir=str(out), report_to="none", use_cpu=True, bf16=False, max_steps=args.steps,
                       per_device_train_batch_size=args.batch, learning_rate=args.lr,
                       lr_scheduler_type=args.scheduler, logging_steps=max(1, args.steps // 8), save_strategy="no",
                       disable_tqdm=True, seed=args.seed, beta=args.beta, desirable_weight=args.desirable_weight,
                       undesirable_weight=args.undesirable_weight, max_length=512)
    trainer = KTOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=config,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    trainer.save_model(str(out))
    return [r for r in trainer.state.log_history if "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=["posttrain", "trl"], choices=["posttrain", "trl", "dpo"])
    parser.add_argument("--model", default="builtin:tiny-qwen2")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--scheduler", default="linear")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--desirable-weight", type=float, default=1.0)
    parser.add_argument("--undesirable-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", default="pairs", choices=["shuffled", "balanced", "pairs"],
                        help="order of the unpaired rows (see unpaired_rows)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_model, load_tokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train, held, test = build_sets(args.n_train, 30)
    tok = load_tokenizer(args.model)
    start = load_model(args.model)
    sets = {"train": train, "held": held, "test": test}
    before = {k: preference_accuracy(start, tok, v) for k, v in sets.items()}
    tmp = Path(tempfile.mkdtemp(prefix="kto_learning_"))
    pairs, rows = tmp / "pairs.jsonl", tmp / "unpaired.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in train))
    unpaired = unpaired_rows(train, args.seed, args.order, args.batch)
    rows.write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    kto = {"name": "kto", "beta": args.beta, "desirable_weight": args.desirable_weight,
           "undesirable_weight": args.undesirable_weight}
    for trainer in args.trainers:
        out = tmp / trainer
        t0 = time.perf_counter()
        if trainer == "posttrain":
            logged = run_posttrain(kto, args, pairs if args.order == "pairs" else rows, out)
        elif trainer == "dpo":
            logged = run_posttrain({"name": "dpo", "beta": 0.1}, args, pairs, out)
        else:
            logged = run_trl(args, unpaired, out)
        wall = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(out)
        after = {k: preference_accuracy(model, tok, v) for k, v in sets.items()}
        accs = "; ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in sets)
        last = {k: round(v, 4) for k, v in logged[-1].items() if k in (
            "loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")}
        print(f"[{trainer} {args.order} seed {args.seed} beta {args.beta} lr {args.lr:g} steps {args.steps} "
              f"batch {args.batch} w {args.desirable_weight}/{args.undesirable_weight}] {accs}; {wall:.0f}s; last log {last}", flush=True)


if __name__ == "__main__":
    main()
