"""Speed and peak memory of posttrain's SFT-family trainer against stock TRL ``SFTTrainer``: same model, data, settings.

    OMP_NUM_THREADS=1 python benchmarks/sft_vs_trl.py                       # random Qwen2, vocab 65536, seq 256
    OMP_NUM_THREADS=1 python benchmarks/sft_vs_trl.py --model builtin:tiny-qwen2 --seq 128 --batch 16
    python benchmarks/sft_vs_trl.py --methods sft dft --full-logits --out benchmarks/results/sft_vs_trl.json
    # the issue-25 shape: ~300-token rows, prompt:completion 4:1, batch 2
    OMP_NUM_THREADS=1 python benchmarks/sft_vs_trl.py --vocab 32768 --hidden 256 --layers 2 --seq 300 \
        --prompt-fraction 0.8 --batch 2 --steps 8 --warmup 2 --repeats 5
    # a 0.5B-class shape (Qwen2-0.5B's vocabulary, width and depth, random weights): a few steps
    OMP_NUM_THREADS=1 python benchmarks/sft_vs_trl.py --shape 0.5b --seq 300 --prompt-fraction 0.5 --batch 2 \
        --steps 3 --warmup 1 --repeats 2 --methods sft

Pairs: posttrain ``sft`` vs TRL ``loss_type="nll"``, posttrain ``dft`` vs TRL ``loss_type="dft"``. posttrain's
trainer runs the log-prob engine (docs/logprob_engine.md): the LM head of ``--logprob-head`` over the completion
positions only; TRL's fused head scores every position on CPU (its kernel compacts to the labelled rows only where it
runs as Triton). ``--full-logits`` adds a reference row that is neither: plain ``transformers.Trainer`` with the
model's own loss (full ``[B, T, V]`` logits), to show what the fused LM head saves. The data is synthetic and already
tokenized (random ids, ``--prompt-fraction`` of each sequence is prompt, the rest completion), so the model can be a
random-init Qwen2 built offline with a large vocabulary: the logits path (``B x T x V``) dominates only when the
vocabulary is realistic; the built-in ``tiny-qwen2`` (vocab 1024) hides it. Each run is a fresh subprocess; runs are
interleaved; see ``_common.py``. Reported per trainer: CPU seconds per step (this process, all threads; robust on a
shared machine), wall steps/s, peak memory growth over ``train()``; ratios to TRL as the median of the per-repeat
ratios (each repeat runs every trainer back to back, the order alternating) with their min..max.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

TRL_LOSS = {"sft": "nll", "dft": "dft"}


def _dataset(args, vocab: int, with_labels: bool = False):
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(1234)
    prompt = round(args.seq * args.prompt_fraction)
    rows = []
    for _ in range(args.steps * args.batch):
        ids = _common.random_ids(gen, args.seq, vocab)
        row = {"input_ids": ids, "completion_mask": [0] * prompt + [1] * (args.seq - prompt)}
        if with_labels:
            row = {"input_ids": ids, "attention_mask": [1] * args.seq, "labels": [-100] * prompt + ids[prompt:]}
        rows.append(row)
    return Dataset.from_list(rows)


def _one(args) -> dict:
    from trl import SFTConfig, SFTTrainer

    from posttrain.families.sft.config import SFTFamilyConfig
    from posttrain.families.sft.trainer import PosttrainSFTTrainer
    from posttrain.methods import METHODS

    which, method = args._one
    tok = _common.tokenizer()
    net = _common.build_model(args)
    vocab = _common.vocab_size(net)
    out_dir = tempfile.mkdtemp(prefix="bench-sft-")
    cfg = dict(**_common.train_kwargs(args, out_dir), max_length=args.seq, completion_only_loss=True)
    if which == "trl":
        trainer = SFTTrainer(model=net, args=SFTConfig(loss_type=TRL_LOSS[method], **cfg),
                             train_dataset=_dataset(args, vocab), processing_class=tok)
        label = f"trl-{TRL_LOSS[method]}"
    elif which == "posttrain":
        trainer = PosttrainSFTTrainer(model=net, args=SFTFamilyConfig(**cfg, logprob_head=args.logprob_head),
                                      train_dataset=_dataset(args, vocab),
                                      processing_class=tok, method=method, params=METHODS[method].params())
        label = f"posttrain-{method}"
    else:  # full-logits reference: the model's own loss, no fused head
        from transformers import Trainer, TrainingArguments, default_data_collator

        trainer = Trainer(model=net, args=TrainingArguments(**_common.train_kwargs(args, out_dir)),
                          train_dataset=_dataset(args, vocab, with_labels=True), data_collator=default_data_collator)
        label = "hf-full-logits-nll"
    res = _common.measure(trainer, args.steps, args.warmup)
    return {"label": label, "trainer": which, "method": method, **res}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(parser)
    parser.add_argument("--methods", nargs="+", default=["sft", "dft"], choices=["sft", "dft"])
    parser.add_argument("--prompt-fraction", type=float, default=0.25,
                        help="share of each row that is prompt (0.8: prompt:completion 4:1)")
    parser.add_argument("--logprob-head", default="auto", help="posttrain's training.logprob_head")
    parser.add_argument("--full-logits", action="store_true", help="add the plain transformers.Trainer reference row")
    parser.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _common.apply_shape(args)
    if args._one:
        print(json.dumps(_one(args)))
        return
    load_before = _common.load_average()
    variants = []
    for m in args.methods:
        variants += [["trl", m], ["posttrain", m]]
    if args.full_logits:
        variants.append(["hf", "sft"])
    extra = ["--prompt-fraction", str(args.prompt_fraction), "--logprob-head", args.logprob_head]
    runs = _common.run_interleaved(__file__, variants, args, extra)
    pairs = [(f"posttrain-{m}", f"trl-{TRL_LOSS[m]}") for m in args.methods]
    pairs += [(f"posttrain-{m}", "hf-full-logits-nll") for m in args.methods if m == "sft" and args.full_logits]
    _common.report_paired(f"SFT-family vs stock TRL SFTTrainer, prompt fraction {args.prompt_fraction}, head "
                          f"{args.logprob_head}", args, runs, pairs, load_before)


if __name__ == "__main__":
    main()
