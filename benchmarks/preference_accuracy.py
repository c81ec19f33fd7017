"""Does each preference method raise held-out preference accuracy over its starting model? (issue 3, "Learning works")

    OMP_NUM_THREADS=1 python benchmarks/preference_accuracy.py                       # all methods, defaults below
    OMP_NUM_THREADS=1 python benchmarks/preference_accuracy.py --methods dpo ipo --json /tmp/pref.json

For every method the same starting model (default ``builtin:tiny-qwen2``, random init), the same 256 built-in
arithmetic preference pairs (``max_operand: 30``), the same steps, batch size, schedule and seed are used; each run
goes through ``posttrain.train.run`` (the code path of ``posttrain train``), so the reference model is the default
frozen copy of the starting model (none for the reference-free ``asft_aligned``, ``simpo``, ``orpo``). Preference
accuracy is the share of pairs whose chosen completion (+EOS) has a higher summed log-prob than the rejected one,
measured before and after training on

* held-out pairs: prompts that were trained on, each with a wrong answer never paired with it in training (so the
  model must prefer the right answer over an unseen wrong one), up to 300 pairs;
* test-split pairs: 200 problems never seen in training (the built-in ``test`` split, disjoint problems).

Prints one markdown table row per method (before/after on both sets, last logged training loss, steps, wall time) and,
with ``--json``, writes the rows. Wall time is the ``run()`` call (model load, training, final save, no evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# name -> method block; beta etc. as in recipes/*.yaml (cdpo: dpo.yaml with label_smoothing 0.1).
METHODS: dict[str, dict] = {
    "dpo": {"name": "dpo", "loss": "sigmoid", "beta": 0.1},
    "cdpo": {"name": "dpo", "loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.1},
    "ipo": {"name": "dpo", "loss": "ipo", "beta": 0.5},
    "wpo": {"name": "wpo", "beta": 0.1},
    "sparsepo-reference": {"name": "sparsepo", "mask": "reference", "beta": 0.1},
    "sparsepo-learned": {"name": "sparsepo", "mask": "learned", "beta": 0.1},
    "asft_aligned": {"name": "asft_aligned", "beta": 1.0},
    "simpo": {"name": "simpo", "beta": 2.0, "gamma_beta_ratio": 0.25},
    "orpo": {"name": "orpo", "beta": 0.1, "nll_on_prompt": False},
}


def build_sets(n_train: int, max_operand: int):
    """(train pairs, held-out pairs, test-split pairs) from the built-in arithmetic task."""
    from posttrain.data.arithmetic import arithmetic_rows

    pool = (max_operand + 1) ** 2 - 200  # train problems ("+" only; 200 held out as the test split)
    rows = arithmetic_rows("preference", split="train", max_operand=max_operand, num_samples=4 * pool)
    train = rows[:n_train]
    seen = {(r["prompt"], r["rejected"]) for r in train}
    prompts = {r["prompt"] for r in train}
    held, held_seen = [], set()
    for r in rows[pool:]:  # later passes over the same problems draw new wrong answers
        key = (r["prompt"], r["rejected"])
        if r["prompt"] in prompts and key not in seen and key not in held_seen:
            held.append(r)
            held_seen.add(key)
        if len(held) == 300:
            break
    test = arithmetic_rows("preference", split="test", max_operand=max_operand, num_samples=200)
    return train, held, test


def pair_logps(model, tok, rows, batch: int = 128) -> tuple[list[float], list[float]]:
    """Summed log p(chosen + EOS | prompt) and log p(rejected + EOS | prompt) of every pair, under ``model`` alone."""
    import torch

    model.eval()
    seqs, starts = [], []
    for r in rows:
        n_prompt = len(tok(r["prompt"])["input_ids"])
        for side in ("chosen", "rejected"):
            ids = tok(r["prompt"] + r[side] + tok.eos_token)["input_ids"]
            seqs.append(ids)
            starts.append(n_prompt)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i : i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
            attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            lp = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float().log_softmax(-1)
            lp = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            for j, s in enumerate(chunk):
                scores.append(lp[j, starts[i + j] - 1 : len(s) - 1].sum().item())
    return scores[0::2], scores[1::2]


def preference_accuracy(model, tok, rows, batch: int = 128) -> float:
    """Share of pairs with sum log p(chosen + EOS | prompt) > sum log p(rejected + EOS | prompt) (strict)."""
    chosen, rejected = pair_logps(model, tok, rows, batch)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


def sft_warm_start(base: str, steps: int, out: Path, seed: int) -> str:
    """A weaker start than ``builtin:tiny-qwen2-arith``: ``base`` SFT-trained for only ``steps`` steps with the recipe
    that builds ``tiny-qwen2-arith`` (800 steps there; batch 64, lr 3e-3, cosine, 20 warmup) on the train split."""
    from posttrain.recipe import parse_recipe
    from posttrain.train import run

    recipe = parse_recipe({
        "model": base,
        "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 64 * steps}}},
        "method": {"name": "sft"},
        "training": {"max_steps": steps, "per_device_train_batch_size": 64, "learning_rate": 3e-3,
                     "lr_scheduler_type": "cosine", "warmup_steps": min(20, steps // 5), "logging_steps": steps,
                     "save_strategy": "no", "disable_tqdm": True},
        "output_dir": str(out),
        "seed": seed,
    })
    run(recipe, quiet=True)
    return str(out)


def run_one(key: str, method: dict, args, data_path: Path, held, test, tok, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from posttrain.recipe import parse_recipe
    from posttrain.train import run

    lr = args.lr_override.get(key, args.lr)
    out = workdir / key
    recipe = parse_recipe({
        "model": args.start,
        "data": {"train": str(data_path)},
        "method": dict(method),
        "training": {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": lr,
                     "logging_steps": max(1, args.steps // 8), "save_strategy": "no", "disable_tqdm": True},
        "output_dir": str(out),
        "seed": args.seed,
    })
    start = time.perf_counter()
    run(recipe, quiet=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [r for r in rows if "loss" in r]
    last = logged[-1]
    trained = AutoModelForCausalLM.from_pretrained(out)
    return {
        "method": key,
        "method_block": method,
        "learning_rate": lr,
        "held_after": preference_accuracy(trained, tok, held),
        "test_after": preference_accuracy(trained, tok, test),
        "final_loss": last["loss"],
        "final_train_reward_accuracy": last.get("rewards/accuracies"),
        "steps": last["step"],
        "wall_s": wall,
    }


def table_row(res: dict) -> str:
    block = ", ".join(f"{k}: {v}" for k, v in res["method_block"].items())
    train_acc = res["final_train_reward_accuracy"]
    return (f"| {res['method']} | `{block}` | {res['learning_rate']:g} | {res['held_before']:.3f} → "
            f"{res['held_after']:.3f} | {res['test_before']:.3f} → {res['test_after']:.3f} | {res['final_loss']:.4f} | "
            f"{'n/a' if train_acc is None else f'{train_acc:.3f}'} | {res['steps']} | {res['wall_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-qwen2", help="starting model (and frozen reference)")
    parser.add_argument("--sft-warmup-steps", type=int, default=0,
                        help="first SFT --model for this many steps and start every method from that (0: start from "
                        "--model itself)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n-train", type=int, default=256, help="training pairs")
    parser.add_argument("--max-operand", type=int, default=30)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-for", action="append", default=[], metavar="METHOD=LR",
                        help="per-method learning-rate override (repeatable); the table shows the lr used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    args.lr_override = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr_for)}

    import torch

    from posttrain.models import load_model, load_tokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train, held, test = build_sets(args.n_train, args.max_operand)
    tok = load_tokenizer(args.model)
    tmp = tempfile.TemporaryDirectory(prefix="pref_acc_")
    start_name = args.model
    args.start = args.model
    if args.sft_warmup_steps > 0:
        t0 = time.perf_counter()
        args.start = sft_warm_start(args.model, args.sft_warmup_steps, Path(tmp.name) / "start", args.seed)
        start_name = f"{args.model} + {args.sft_warmup_steps} SFT steps"
        print(f"warm start: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    start_model = load_model(args.start)
    held_before, test_before = preference_accuracy(start_model, tok, held), preference_accuracy(start_model, tok, test)
    del start_model
    print(f"start {start_name}: held-out pairs ({len(held)}) {held_before:.3f}, test-split pairs ({len(test)}) "
          f"{test_before:.3f}; {len(train)} train pairs, {args.steps} steps x batch {args.batch}", file=sys.stderr)

    results = []
    header = ("| method | method block | lr | held-out acc before → after | test-split acc before → after | "
              "final loss | train `rewards/accuracies` (last log) | steps | wall (s) |")
    lines = [header, "|" + "---|" * 9]
    with tmp:
        data_path = Path(tmp.name) / "train.jsonl"
        data_path.write_text("".join(json.dumps(r) + "\n" for r in train))
        for key in args.methods:
            res = run_one(key, METHODS[key], args, data_path, held, test, tok, Path(tmp.name))
            res.update(held_before=held_before, test_before=test_before, start=start_name)
            results.append(res)
            line = table_row(res)
            lines.append(line)
            print(line, file=sys.stderr, flush=True)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
