"""Speed and peak memory of posttrain's ``dpo`` (sigmoid) against stock TRL ``DPOTrainer``: same model, reference, data.

    OMP_NUM_THREADS=1 python benchmarks/dpo_vs_trl.py                       # random Qwen2, vocab 65536, seq 256
    OMP_NUM_THREADS=1 python benchmarks/dpo_vs_trl.py --model builtin:tiny-qwen2 --seq 128 --batch 8
    # the issue-25 shape: ~300-token rows, prompt:completion 4:1, batch 2, with prompt sharing on and off
    OMP_NUM_THREADS=1 python benchmarks/dpo_vs_trl.py --vocab 32768 --hidden 256 --layers 2 --seq 300 \
        --prompt-fraction 0.8 --batch 2 --steps 8 --warmup 2 --repeats 5 --unshared
    # a 0.5B-class shape (Qwen2-0.5B's vocabulary, width and depth, random weights): a few steps, one pair each
    OMP_NUM_THREADS=1 python benchmarks/dpo_vs_trl.py --shape 0.5b --seq 300 --prompt-fraction 0.8 --batch 1 \
        --steps 2 --warmup 1 --repeats 2

posttrain's trainer runs the log-prob engine (docs/logprob_engine.md): completion rows only, each pair's prompt once
for chosen and rejected (``--unshared`` adds a run with ``training.share_prompts: false``), the head of
``--logprob-head``. Reported per trainer: CPU seconds per step (this process, all threads; robust on a shared machine),
wall steps/s, peak memory growth over ``train()``; ratios to TRL as the median of the per-repeat ratios (each repeat
runs every trainer back to back, the order alternating) with their min..max.

Both trainers get the same policy and a frozen copy of it as ``ref_model`` (live reference forward every step, as
TRL's default ``precompute_ref_log_probs=False``), ``beta=0.1``, ``loss_type=["sigmoid"]``. The data is synthetic and
already tokenized: ``--batch`` pairs per step, each a prompt of ``seq/4`` random ids and chosen / rejected completions
of ``3*seq/4`` random ids (so every row of the ``[chosen; rejected]`` batch is ``seq`` tokens). DPOTrainer always
tokenizes text, so each trainer is built on a few text rows and its ``train_dataset`` is then replaced by the
synthetic ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` columns, which is what its tokenization produces.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def _dataset(args, vocab: int):
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(1234)
    prompt = round(args.seq * args.prompt_fraction)
    rows = [{"prompt_ids": _common.random_ids(gen, prompt, vocab),
             "chosen_ids": _common.random_ids(gen, args.seq - prompt, vocab),
             "rejected_ids": _common.random_ids(gen, args.seq - prompt, vocab)}
            for _ in range(args.steps * args.batch)]
    return Dataset.from_list(rows)


def _one(args) -> dict:
    from trl import DPOConfig, DPOTrainer

    from posttrain.data.sources import load_source
    from posttrain.families.preference.config import PreferenceConfig
    from posttrain.methods import METHODS
    from posttrain.recipe import DataSource
    from posttrain.families.preference.trainer import PosttrainPreferenceTrainer

    which = args._one[0]
    tok = _common.tokenizer()
    net = _common.build_model(args)
    ref = copy.deepcopy(net)
    vocab = _common.vocab_size(net)
    text = load_source(DataSource(source="builtin:arithmetic-pref", options={"num_samples": 4}), "data", "preference")
    common = dict(**_common.train_kwargs(args, tempfile.mkdtemp(prefix="bench-dpo-")), beta=0.1,
                  loss_type=["sigmoid"], max_length=args.seq)
    if which == "trl":
        trainer = DPOTrainer(model=net, ref_model=ref, args=DPOConfig(**common), train_dataset=text,
                             processing_class=tok)
    else:
        params = METHODS["dpo"].params(loss="sigmoid", beta=0.1)
        cfg = PreferenceConfig(**common, logprob_head=args.logprob_head, share_prompts=which == "posttrain")
        trainer = PosttrainPreferenceTrainer(model=net, ref_model=ref, args=cfg, train_dataset=text,
                                             processing_class=tok, method="dpo", params=params)
    trainer.train_dataset = _dataset(args, vocab)
    res = _common.measure(trainer, args.steps, args.warmup)
    return {"label": f"{which}-dpo-sigmoid", "trainer": which, "method": "dpo", **res}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(parser)
    parser.add_argument("--prompt-fraction", type=float, default=0.25,
                        help="share of each row that is prompt (0.8: prompt:completion 4:1)")
    parser.add_argument("--logprob-head", default="auto", help="posttrain's training.logprob_head")
    parser.add_argument("--unshared", action="store_true", help="also run posttrain with share_prompts: false")
    parser.add_argument("--_one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _common.apply_shape(args)
    extra = ["--prompt-fraction", str(args.prompt_fraction), "--logprob-head", args.logprob_head]
    if args._one:
        print(json.dumps(_one(args)))
        return
    load_before = _common.load_average()
    variants = [["trl"], ["posttrain"], *([["posttrain_unshared"]] if args.unshared else [])]
    runs = _common.run_interleaved(__file__, variants, args, extra)
    pairs = [(f"{v[0]}-dpo-sigmoid", "trl-dpo-sigmoid") for v in variants[1:]]
    _common.report_paired(f"dpo (sigmoid) vs stock TRL DPOTrainer, prompt fraction {args.prompt_fraction}, head "
                          f"{args.logprob_head}", args, runs, pairs, load_before)


if __name__ == "__main__":
    main()
