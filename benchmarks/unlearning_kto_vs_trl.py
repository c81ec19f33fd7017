"""CPU-seconds per step and peak memory of the unlearning family's ``npo_kl`` and of ``kto`` on the log-prob engine,
against the path before it and against stock TRL (docs/benchmarks.md, "Unlearning and KTO on the log-prob
engine").

    OMP_NUM_THREADS=1 python benchmarks/unlearning_kto_vs_trl.py --vocab 32768 --hidden 256 --layers 2 --seq 300 \\
        --prompt-fraction 0.8 --batch 2 --steps 6 --warmup 2 --repeats 3 --out benchmarks/results/unlearning_kto_cpu.json

Two suites (``--suites``), every trainer on the same seeded random-init Qwen2, a frozen copy of it as the reference,
and the same synthetic, already-tokenised rows (``--seq`` tokens, the first ``--prompt-fraction`` of them prompt):

* ``npo_kl``: posttrain's unlearning trainer, NPO + retain KL (``retain_kl_mask: completion``), one forget and one
  retain row per item: ``npo_kl-engine`` (completion rows through the engine, the retain KL as its tiled KL: no
  ``[B, T, V]`` tensor) against ``npo_kl-before`` (``use_engine = False``: TRL's fused head for the forget rows, full
  policy and reference logits plus their log-softmax copies for the retain KL, as before the engine). TRL has no
  unlearning trainer.
* ``kto``: posttrain's KTO (``kto-posttrain``: the engine's completion rows for the target rows, the mismatched KL rows
  and the reference) against stock ``trl.KTOTrainer`` (``kto-trl``), same ``beta`` and KL rows (each row's
  completion rotated by one within its micro-batch, TRL's own pairing).

Every run is a fresh subprocess (``--_one``), the variants interleaved and the order alternating per repeat
(benchmarks/_common.py); CPU-seconds per step (process time, after ``--warmup`` steps) and the peak RSS growth over
``train()`` (high-water mark reset before it: activations, head intermediates, and the gradient and AdamW buffers the
first step allocates, the same for both variants of a suite). The ratios are medians of the per-repeat ratios with
their min..max, and the load average before and after is recorded (a shared machine).
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

SUITES = {"npo_kl": ["engine", "before"], "kto": ["posttrain", "trl"]}


def _split(args) -> tuple[int, int]:
    prompt = round(args.seq * args.prompt_fraction)
    return prompt, args.seq - prompt


def _unlearning_trainer(args, which, net, ref, tok, out_dir):
    from posttrain.families.unlearning.trainer import (
        ForgetRetainCollator,
        ForgetRetainDataset,
        PosttrainUnlearningTrainer,
        UnlearningConfig,
    )
    from posttrain.methods import METHODS

    import torch

    gen = torch.Generator().manual_seed(1234)
    prompt, completion = _split(args)
    vocab = _common.vocab_size(net)

    def rows(n):
        out = []
        for _ in range(n):
            ids = _common.random_ids(gen, prompt + completion, vocab)
            out.append((ids, [-100] * prompt + ids[prompt:]))
        return out

    n = args.steps * args.batch
    dataset = ForgetRetainDataset(rows(n), rows(n), seed=0)
    config = UnlearningConfig(**_common.train_kwargs(args, out_dir), max_length=args.seq, remove_unused_columns=False)
    trainer = PosttrainUnlearningTrainer(
        model=net, ref_model=ref, args=config, train_dataset=dataset,
        data_collator=ForgetRetainCollator(tok.pad_token_id), processing_class=tok, method="npo_kl", params=METHODS["npo_kl"].params(retain_kl_mask="completion"))
    trainer.use_engine = which == "engine"
    return trainer


def _kto_dataset(args, vocab):
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(1234)
    prompt, completion = _split(args)
    rows = [{"prompt_ids": _common.random_ids(gen, prompt, vocab),
             "completion_ids": _common.random_ids(gen, completion, vocab), "label": i % 2 == 0}
            for i in range(args.steps * args.batch)]
    for start in range(0, len(rows), args.batch):  # TRL's KL pairing: the completion rotated by one per micro-batch
        block = rows[start:start + args.batch]
        for i, row in enumerate(block):
            row["KL_completion_ids"] = block[i - 1]["completion_ids"]
    return Dataset.from_list(rows)


def _kto_trainer(args, which, net, ref, tok, out_dir):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from posttrain.families.unpaired.trainer import PosttrainKTOTrainer
    from posttrain.methods import KTOParams

    params = KTOParams(beta=0.1)
    config = KTOConfig(**_common.train_kwargs(args, out_dir), beta=params.beta, max_length=args.seq)
    text = Dataset.from_list([{"prompt": "1+1=", "completion": "2", "label": True},
                              {"prompt": "2+2=", "completion": "5", "label": False}] * args.batch)
    if which == "trl":
        trainer = KTOTrainer(model=net, ref_model=ref, args=config, train_dataset=text, processing_class=tok)
    else:
        trainer = PosttrainKTOTrainer(model=net, ref_model=ref, args=config, train_dataset=text, processing_class=tok,
                                      params=params)
    trainer.train_dataset = _kto_dataset(args, _common.vocab_size(net))
    return trainer


def _one(args) -> dict:
    suite, which = args._one
    tok = _common.tokenizer()
    net = _common.build_model(args)
    ref = copy.deepcopy(net)
    out_dir = tempfile.mkdtemp(prefix=f"bench-{suite}-")
    build = _unlearning_trainer if suite == "npo_kl" else _kto_trainer
    trainer = build(args, which, net, ref, tok, out_dir)
    res = _common.measure(trainer, args.steps, args.warmup)
    return {"label": f"{suite}-{which}", "suite": suite, "variant": which, **res}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(parser, seq_default=300)
    parser.add_argument("--prompt-fraction", type=float, default=0.8, help="share of each row that is prompt")
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = ["--prompt-fraction", str(args.prompt_fraction)]
    if args._one:
        print(json.dumps(_one(args)))
        return
    load_before = _common.load_average()
    variants = [[suite, which] for suite in args.suites for which in SUITES[suite]]
    runs = _common.run_interleaved(__file__, variants, args, extra)
    pairs = [(f"{suite}-{SUITES[suite][0]}", f"{suite}-{SUITES[suite][1]}") for suite in args.suites]
    _common.report_paired(f"npo_kl (engine vs before) and kto (posttrain vs stock TRL), prompt fraction "
                          f"{args.prompt_fraction}", args, runs, pairs, load_before)


if __name__ == "__main__":
    main()
