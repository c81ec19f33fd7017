"""Speed and peak memory of posttrain's online-DPO training step against the path before the log-prob engine and
stock TRL ``OnlineDPOTrainer`` (``trl.experimental.online_dpo``), generation excluded.

    OMP_NUM_THREADS=1 python benchmarks/online_dpo_vs_trl.py --vocab 32768 --hidden 256 --layers 2 --seq 300 \\
        --prompt-fraction 0.8 --batch 2 --steps 6 --warmup 2 --repeats 3

One fixed synthetic batch (issue #25's shape: ``--batch`` prompts of ``seq * prompt_fraction`` random ids, each with
two completions of the rest, no padding, random Qwen2, fp32), the same in every process; the rewards prefer the first
completion of every pair. A step is what a training step costs once the pairs are sampled and scored:

* ``trl``: stock ``OnlineDPOTrainer.training_step`` with its ``_generate`` replaced by the fixed batch: the policy's
  and the reference's full logits on whole rows, the loss, ``backward`` (it also decodes the completions for the
  reward call, as it does in training);
* ``before``: posttrain's trainer on the path before the engine (TRL's fused LM head on whole rows at temperature 1,
  for the reference's log-probs under ``no_grad`` and the policy's in ``compute_loss``), then ``backward``;
* ``posttrain``: the same on the log-prob engine (completion rows only, each pair's prompt computed once for both
  completions, policy and reference); ``posttrain_unshared``: the engine with ``share_prompts: false``.

CPU seconds of this process per step (``--steps`` after ``--warmup``), peak RSS growth over the timed loop; every run
a fresh process, interleaved, ratios per repeat (median and min..max), and the load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

VARIANTS = ("trl", "before", "posttrain", "posttrain_unshared")
BETA = 0.1


def _pairs(args, vocab: int):
    """``--batch`` prompts with two completions each, as ``[P, 2, L]`` tensors (no padding)."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    prompt_len = round(args.seq * args.prompt_fraction)
    prompts = torch.randint(4, vocab, (args.batch, 1, prompt_len), generator=gen).expand(-1, 2, -1).contiguous()
    completions = torch.randint(4, vocab, (args.batch, 2, args.seq - prompt_len), generator=gen)
    return prompts, completions


def _posttrain(args, net, tok, which: str):
    """posttrain's online-DPO trainer and a step function (reference log-probs, loss, backward)."""
    import torch
    from datasets import Dataset

    from posttrain.families.online.trainer import (FIRST_CHOSEN, LOSS_MASK, NUM_PAIRS, PAIR_KEEP,
                                                   PosttrainOnlineDPOTrainer, _by_pair, _by_row)
    from posttrain.families.rl.config import RLConfig
    from posttrain.methods import OnlineDPOParams
    from posttrain.rl.rewards import exact_match

    prompts, completions = _pairs(args, _common.vocab_size(net))
    kwargs = {**_common.train_kwargs(args, tempfile.mkdtemp(prefix="bench-online-")),
              "per_device_train_batch_size": 2 * args.batch}
    config = RLConfig(**kwargs, num_generations=2, max_completion_length=completions.size(-1), temperature=1.0,
                      beta=BETA, share_prompts=which != "posttrain_unshared")
    trainer = PosttrainOnlineDPOTrainer(model=net, ref_model=copy.deepcopy(net), reward_funcs=[exact_match],
                                        args=config, processing_class=tok, params=OnlineDPOParams(beta=BETA),
                                        train_dataset=Dataset.from_list([{"prompt": "1+1=", "answer": "2"}] * 8))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    if which == "before":  # TRL's fused head (temperature 1: config.temperature) on whole rows, policy and reference
        from trl import GRPOTrainer

        trainer.use_engine = False

        def trl_head(model, input_ids, attention_mask, keep, *, entropy_grad, entropy_statistic):
            return GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, input_ids, attention_mask, keep,
                                                                  compute_entropy=True)[:2]

        trainer._engine_logps = trl_head
    batch = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
             "completion_mask": torch.ones_like(completions), LOSS_MASK: torch.ones_like(completions),
             FIRST_CHOSEN: torch.ones(args.batch, dtype=torch.bool), PAIR_KEEP: torch.ones(args.batch),
             NUM_PAIRS: torch.tensor(float(args.batch))}
    ids = torch.cat([_by_row(prompts), _by_row(completions)], dim=1)
    keep = completions.size(-1)

    def step():
        with torch.no_grad():  # what generation computes once per batch: the reference's log-probs
            ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, torch.ones_like(ids), keep)
        loss = trainer.compute_loss(trainer.model, {**batch, "ref_per_token_logps": _by_pair(ref)})
        loss.backward()
        return loss

    return trainer.model, step


def _stock(args, net, tok):
    """Stock TRL ``OnlineDPOTrainer`` and a step function (its ``training_step`` on the fixed pairs)."""
    import torch
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    prompts, completions = _pairs(args, _common.vocab_size(net))

    def trl_layout(t):  # [first completions of every prompt; second completions]
        return torch.cat([t[:, 0], t[:, 1]])

    recorded = (trl_layout(prompts), torch.ones_like(trl_layout(prompts)), trl_layout(completions),
                torch.ones_like(trl_layout(completions)), None)

    def reward(prompts, completions, **kwargs):  # the first completion of every pair wins
        half = len(completions) // 2
        return [1.0] * half + [0.0] * half

    kwargs = _common.train_kwargs(args, tempfile.mkdtemp(prefix="bench-online-trl-"))
    trainer = OnlineDPOTrainer(model=net, ref_model=copy.deepcopy(net), reward_funcs=[reward],
                               args=OnlineDPOConfig(**kwargs, beta=BETA, max_length=args.seq + 8),
                               train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8), processing_class=tok)
    trainer._generate = lambda model, prompts, images=None: recorded
    inputs = {"prompt": ["1+1="] * args.batch}

    def step():
        return trainer.training_step(trainer.model, dict(inputs))

    return trainer.model, step


def _one(args) -> dict:
    import gc

    import torch

    which = args._one[0]
    net = _common.build_model(args)
    tok = _common.tokenizer()
    model, step = _stock(args, net, tok) if which == "trl" else _posttrain(args, net, tok, which)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    base = _common._rss_kib("VmRSS") * 1024
    cpu, wall = [], []
    for _ in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=False)
        start, start_wall = time.process_time(), time.perf_counter()
        loss = step()
        cpu.append(time.process_time() - start)
        wall.append(time.perf_counter() - start_wall)
    peak = _common._rss_kib("VmHWM") * 1024
    timed, timed_wall = cpu[args.warmup:], wall[args.warmup:]
    return {"label": which, "loss": float(loss), "cpu_s_per_step": sum(timed) / len(timed),
            "steps_per_s": len(timed_wall) / sum(timed_wall), "peak_mib": peak / 2**20,
            "peak_growth_mib": (peak - base) / 2**20, "device": "cpu", "mem_kind": "peak RSS (VmHWM reset)",
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(parser, seq_default=300)
    parser.set_defaults(vocab=32768, batch=2, steps=6, warmup=2)
    parser.add_argument("--prompt-fraction", type=float, default=0.8, help="share of a row that is prompt")
    parser.add_argument("--_one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(_one(args)))
        return
    load_before = _common.load_average()
    runs = _common.run_interleaved(__file__, [[v] for v in VARIANTS], args,
                                   ["--prompt-fraction", str(args.prompt_fraction)])
    _common.report_paired(f"online DPO training step (generation excluded), {args.batch} prompts x 2 completions, "
                          f"prompt fraction {args.prompt_fraction}", args, runs,
                          [("posttrain", "trl"), ("posttrain", "before"), ("before", "trl"),
                           ("posttrain_unshared", "trl")], load_before)
    losses = {r["label"]: r["loss"] for r in runs if r["repeat"] == 0}
    print("loss of the last step (the same batch and weights, so equal up to float rounding): "
          + ", ".join(f"{label} {loss:.6f}" for label, loss in losses.items()))


if __name__ == "__main__":
    main()
