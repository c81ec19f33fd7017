"""Speed and peak memory of posttrain's ``dpo`` (sigmoid) against stock TRL ``DPOTrainer``: same model, reference, data.

    OMP_NUM_THREADS=1 python benchmarks/dpo_vs_trl.py                       # random Qwen2, vocab 65536, seq 256
    OMP_NUM_THREADS=1 python benchmarks/dpo_vs_trl.py --model builtin:tiny-qwen2 --seq 128 --batch 8

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
    prompt = args.seq // 4
    rows = [{"prompt_ids": _common.random_ids(gen, prompt, vocab),
             "chosen_ids": _common.random_ids(gen, args.seq - prompt, vocab),
             "rejected_ids": _common.random_ids(gen, args.seq - prompt, vocab)}
            for _ in range(args.steps * args.batch)]
    return Dataset.from_list(rows)


def _one(args) -> dict:
    from trl import DPOConfig, DPOTrainer

    from posttrain.data.sources import load_source
    from posttrain.methods import METHODS
    from posttrain.recipe import DataSource
    from posttrain.families.preference.trainer import PosttrainPreferenceTrainer

    which = args._one[0]
    tok = _common.tokenizer()
    net = _common.build_model(args)
    ref = copy.deepcopy(net)
    vocab = _common.vocab_size(net)
    text = load_source(DataSource(source="builtin:arithmetic-pref", options={"num_samples": 4}), "data", "preference")
    cfg = DPOConfig(**_common.train_kwargs(args, tempfile.mkdtemp(prefix="bench-dpo-")), beta=0.1,
                    loss_type=["sigmoid"], max_length=args.seq)
    if which == "trl":
        trainer = DPOTrainer(model=net, ref_model=ref, args=cfg, train_dataset=text, processing_class=tok)
    else:
        params = METHODS["dpo"].params(loss="sigmoid", beta=0.1)
        trainer = PosttrainPreferenceTrainer(model=net, ref_model=ref, args=cfg, train_dataset=text,
                                             processing_class=tok, method="dpo", params=params)
    trainer.train_dataset = _dataset(args, vocab)
    res = _common.measure(trainer, args.steps, args.warmup)
    return {"label": f"{which}-dpo-sigmoid", "trainer": which, "method": "dpo", **res}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(parser)
    parser.add_argument("--_one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(_one(args)))
        return
    runs = _common.run_interleaved(__file__, [["trl"], ["posttrain"]], args)
    summary = _common.summarise(runs, [("posttrain-dpo-sigmoid", "trl-dpo-sigmoid")])
    _common.report("dpo (sigmoid) vs stock TRL DPOTrainer", args, runs, summary)


if __name__ == "__main__":
    main()
