"""The log-prob engine against TRL's fused LM head and plain full logits: CPU-seconds per forward+backward and peak
memory growth, side by side in one run (docs/benchmarks.md, "Log-prob engine").

Three suites, each a set of variants measured on the same seeded random-init Qwen2 and the same seeded token batch:

* ``heads`` (an SFT batch: ``--batch`` rows, token-mean NLL over the completion): ``trl_fused`` (the model patched with
  TRL's ``add_fused_lm_head``, called with ``fused_lm_head=True``: what every posttrain trainer runs today),
  ``full_logits`` (``model(...).logits`` + ``log_softmax`` + gather), ``engine_chunked`` and ``engine_fused`` (the
  engine's completion-only rows through its chunked head, or through TRL's fused kernel);
* ``dpo`` (``--batch`` pairs, TRL's layout: chosen rows then rejected rows): one DPO step's model work, the policy
  forward+backward of the sigmoid loss plus the reference forward under ``no_grad`` (the same weights):
  ``trl_fused`` (every row whole, TRL's fused head, as DPOTrainer), ``engine_unshared``, ``engine_shared`` (one
  ``[prompt; chosen; rejected]`` row per pair, block attention mask);
* ``grpo`` (``--grpo-prompts`` prompts x ``--group`` completions): the training forward+backward of a token-mean
  policy-gradient loss with fixed random advantages (generation excluded): ``trl_fused``, ``engine_unshared``,
  ``engine_shared`` (one row per group).

Every measurement is a fresh subprocess (``--_one``); repeats alternate the variant order (A B C, then C B A, ...), so
drifts of a shared machine hit all variants alike. A run does ``--warmup`` untimed iterations, then ``--iters`` timed
ones: CPU-seconds (``time.process_time``; one thread by default, ``--threads``) and wall seconds per iteration, and
the peak RSS growth over the timed iterations (the kernel's high-water mark reset through ``/proc/self/clear_refs``
after the warm-up; gradient buffers already exist then, so the growth is activations and head intermediates; with
``--warmup 0`` it includes the gradient buffers, the same for every variant). The report gives medians with the
min..max over repeats, the ratios of medians, and checks that the variants of a suite computed the same loss and the
same summed completion log-probs (the DPO loss alone cannot tell: with the reference equal to the policy it is log 2
whatever they are).

    python benchmarks/logprob_engine.py --preset issue --ratio 4 --repeats 2 --iters 1 \\
        --out benchmarks/results/logprob_engine_cpu_issue.json
    python benchmarks/logprob_engine.py --preset qwen05b --ratio 4 --batch 1 --suites heads dpo \\
        --variants trl_fused engine_chunked engine_unshared engine_shared --repeats 1 --iters 1 --warmup 0 \\
        --out benchmarks/results/logprob_engine_cpu_05b_r4.json

Each step's model FLOPs (:func:`step_flops`) are reported next to its CPU-seconds, so a ratio can be read against the
work it saves. ``--summarise`` rewrites the summary of a finished or interrupted run without measuring anything.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, _rss_kib  # noqa: E402

PRESETS = {
    # the shape: random Qwen2, hidden 256, 2 layers, vocab 32k
    "issue": dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    # a 0.5B-class config (Qwen2.5-0.5B's shapes), random weights
    "qwen05b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0),
}
SUITES = {
    "heads": ("trl_fused", "full_logits", "engine_chunked", "engine_fused"),
    "dpo": ("trl_fused", "engine_unshared", "engine_shared"),
    "grpo": ("trl_fused", "engine_unshared", "engine_shared"),
}
# (variant, baseline) ratios reported per suite
RATIOS = {
    "heads": [("engine_chunked", "trl_fused"), ("engine_fused", "trl_fused"), ("full_logits", "trl_fused"),
              ("engine_chunked", "full_logits")],
    "dpo": [("engine_shared", "trl_fused"), ("engine_unshared", "trl_fused"), ("engine_shared", "engine_unshared")],
    "grpo": [("engine_shared", "trl_fused"), ("engine_unshared", "trl_fused"), ("engine_shared", "engine_unshared")],
}


def lengths(args) -> tuple[int, int]:
    """(prompt, completion) tokens of a ``--seq``-token row at ``--ratio`` prompt:completion."""
    prompt = round(args.seq * args.ratio / (args.ratio + 1))
    return prompt, args.seq - prompt


# ----------------------------------------------------------------------------------------------------------------------
# one measurement (inside its subprocess)
# ----------------------------------------------------------------------------------------------------------------------


def _model(args):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**PRESETS[args.preset], max_position_embeddings=4096, tie_word_embeddings=True,
                      pad_token_id=1, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().train()


def _rows(args, suite: str):
    """The batch of ``suite`` as (input_ids, attention_mask, completion_mask, groups), right-padded, seeded."""
    import torch

    gen = torch.Generator().manual_seed(1)
    vocab = PRESETS[args.preset]["vocab_size"]
    prompt_len, completion_len = lengths(args)

    def rnd(n):
        return torch.randint(4, vocab, (n,), generator=gen).tolist()

    if suite == "heads":
        prompts = [rnd(prompt_len) for _ in range(args.batch)]
        completions = [rnd(completion_len) for _ in range(args.batch)]
        groups = None
    elif suite == "dpo":
        base = [rnd(prompt_len) for _ in range(args.batch)]
        prompts = base + base
        completions = [rnd(completion_len) for _ in range(2 * args.batch)]  # chosen rows, then rejected rows
        groups = list(range(args.batch)) * 2
    else:
        prompts, completions, groups = [], [], []
        for g in range(args.grpo_prompts):
            prompt = rnd(prompt_len)
            for _ in range(args.group):
                prompts.append(prompt)
                completions.append(rnd(completion_len))
                groups.append(g)
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [1] * (width - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    comp = torch.tensor([[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c))
                         for p, c in zip(prompts, completions)])
    return ids, attn, comp, groups


def _step_fn(args, suite: str, variant: str, model):
    """A closure running one forward+backward of ``variant`` and returning (loss, real tokens the body ran)."""
    import torch

    from posttrain.logprobs import LogProbEngine
    from posttrain.losses.preference import dpo_loss

    ids, attn, comp, groups = _rows(args, suite)
    count = comp.sum()
    advantages = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))

    if variant in ("trl_fused",):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
        labels = ids.masked_fill(comp == 0, -100)

        def logps(net, no_grad=False):
            with torch.set_grad_enabled(not no_grad):
                out = net(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True, use_cache=False)
            lp = torch.cat([torch.zeros_like(out.log_probs[:, :1]), out.log_probs], 1)
            return lp, int(attn.sum())
    elif variant == "full_logits":
        def logps(net, no_grad=False):
            with torch.set_grad_enabled(not no_grad):
                logits = net(input_ids=ids, attention_mask=attn, use_cache=False).logits
                lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None]).squeeze(-1)
            return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1) * comp, int(attn.sum())
    else:
        head = "fused" if variant == "engine_fused" else "chunked"
        engine = LogProbEngine(head)
        share = groups if variant == "engine_shared" else None

        def logps(net, no_grad=False):
            with torch.set_grad_enabled(not no_grad):
                out = engine.forward(net, ids, attn, comp, groups=share)
            return out.logps, out.body_tokens

    def step():
        if suite == "heads":
            lp, tokens = logps(model)
            loss = -(lp * comp).sum() / count
        elif suite == "dpo":
            lp, tokens = logps(model)
            ref, ref_tokens = logps(model, no_grad=True)
            seq, ref_seq = (lp * comp).sum(-1), (ref * comp).sum(-1)
            b = args.batch
            loss = dpo_loss(seq[:b], seq[b:], ref_seq[:b], ref_seq[b:], beta=0.1).losses.mean()
            tokens += ref_tokens
        else:
            lp, tokens = logps(model)
            loss = -(lp * advantages * comp).sum() / count
        loss.backward()
        # the DPO loss of a policy equal to its reference is log 2 whatever the log-probs: the variants are compared
        # on the policy's summed completion log-probs too
        return float(loss), tokens, float((lp.detach() * comp).sum())

    return step


def one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = _model(args)
    step = _step_fn(args, args.suite, args.variant, model)
    for _ in range(args.warmup):
        step()
    model.zero_grad(set_to_none=False)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
        mem_kind = "peak RSS (VmHWM reset)"
    except OSError:
        mem_kind = "ru_maxrss (not resettable)"
    base = _rss_kib("VmRSS")
    cpu, wall, losses = [], [], []
    for _ in range(args.iters):
        c0, w0 = time.process_time(), time.perf_counter()
        loss, tokens, logp_sum = step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        losses.append(loss)
    peak = _rss_kib("VmHWM") if mem_kind.startswith("peak") else __import__("resource").getrusage(0).ru_maxrss
    return {"suite": args.suite, "variant": args.variant, "cpu_s": statistics.median(cpu),
            "wall_s": statistics.median(wall), "cpu_s_all": cpu, "peak_growth_mib": (peak - base) / 1024,
            "base_mib": base / 1024, "loss": losses[-1], "logp_sum": logp_sum, "body_tokens": tokens,
            "threads": torch.get_num_threads(), "mem_kind": mem_kind}


# ----------------------------------------------------------------------------------------------------------------------
# driving the subprocesses
# ----------------------------------------------------------------------------------------------------------------------


def step_flops(args, suite: str, variant: str) -> float:
    """Model FLOPs of one measured step of ``variant``: 2 x the multiply-adds of the linear layers over every position
    the body runs (padding of packed rows included), of dense attention (``QK^T`` and ``AV`` over each row's full
    width: SDPA with an explicit mask skips nothing), and of the LM head over the rows it scores (every position for
    ``trl_fused`` on CPU and ``full_logits``, the completion tokens for the engine); the backward counts twice the
    forward, the DPO reference forward once. Norms, rotary embeddings and the softmaxes are left out."""
    c = PRESETS[args.preset]
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    body_per_token = layers * (2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"])
    prompt, completion = lengths(args)
    rows, per_group = {"heads": (args.batch, 1), "dpo": (2 * args.batch, 2),
                       "grpo": (args.grpo_prompts * args.group, args.group)}[suite]
    if variant == "engine_shared":
        packed, width = rows // per_group, prompt + per_group * completion
    else:
        packed, width = rows, args.seq
    scored = rows * (completion if variant.startswith("engine") else args.seq)
    forward = packed * (width * body_per_token + layers * 2 * width * width * h) + scored * h * vocab
    return 2.0 * forward * (3 + (suite == "dpo"))


def _argv(args) -> list[str]:
    return ["--preset", args.preset, "--seq", str(args.seq), "--ratio", str(args.ratio), "--batch", str(args.batch),
            "--group", str(args.group), "--grpo-prompts", str(args.grpo_prompts), "--iters", str(args.iters),
            "--warmup", str(args.warmup), "--threads", str(args.threads)]


def run_all(args) -> list[dict]:
    runs = []
    for suite in args.suites:
        variants = [v for v in SUITES[suite] if not args.variants or v in args.variants]
        for r in range(args.repeats):
            for variant in (variants if r % 2 == 0 else variants[::-1]):
                cmd = [sys.executable, __file__, "--_one", "--suite", suite, "--variant", variant, *_argv(args)]
                env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                       "OMP_NUM_THREADS": str(args.threads)}
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"run failed: {' '.join(cmd)}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res["repeat"] = r
                runs.append(res)
                if args.out:  # what is measured so far survives an interrupted run (--summarise reads it)
                    Path(args.out + ".partial").write_text(json.dumps({"meta": {"argv": sys.argv}, "runs": runs}))
                print(f"  {suite:<5} [{r}] {variant:<16} cpu {res['cpu_s']:.3f} s  wall {res['wall_s']:.3f} s  "
                      f"peak growth {res['peak_growth_mib']:.0f} MiB  body tokens {res['body_tokens']}  "
                      f"loss {res['loss']:.6f}  sum log p {res['logp_sum']:.4f}", flush=True)
    return runs


def summarise(args, runs: list[dict]) -> dict:
    stats: dict = {}
    for r in runs:
        stats.setdefault(r["suite"], {}).setdefault(r["variant"], []).append(r)
    out: dict = {"stats": {}, "ratios": {}, "loss_agreement": {}}
    for suite, by in stats.items():
        out["stats"][suite] = {}
        for variant, rs in by.items():
            cpu, wall, grow = ([r[k] for r in rs] for k in ("cpu_s", "wall_s", "peak_growth_mib"))
            out["stats"][suite][variant] = {
                "n": len(rs), "cpu_s_median": statistics.median(cpu), "cpu_s_min": min(cpu), "cpu_s_max": max(cpu),
                "wall_s_median": statistics.median(wall), "peak_growth_mib_median": statistics.median(grow),
                "peak_growth_mib_min": min(grow), "peak_growth_mib_max": max(grow),
                "body_tokens": rs[0]["body_tokens"], "loss": rs[0]["loss"], "logp_sum": rs[0]["logp_sum"],
                "gflops": step_flops(args, suite, variant) / 1e9}
            out["stats"][suite][variant]["gflops_per_cpu_s"] = (
                out["stats"][suite][variant]["gflops"] / out["stats"][suite][variant]["cpu_s_median"])
        s = out["stats"][suite]
        for ours, base in RATIOS[suite]:
            if ours in s and base in s:
                out["ratios"][f"{suite}: {base} / {ours}"] = {
                    "cpu_speedup": s[base]["cpu_s_median"] / s[ours]["cpu_s_median"],
                    "cpu_speedup_range": [s[base]["cpu_s_min"] / s[ours]["cpu_s_max"],
                                          s[base]["cpu_s_max"] / s[ours]["cpu_s_min"]],
                    "peak_growth_ratio": s[ours]["peak_growth_mib_median"] / max(s[base]["peak_growth_mib_median"],
                                                                                 1e-9),
                    "flop_ratio": s[base]["gflops"] / s[ours]["gflops"]}
        for key in ("loss", "logp_sum"):
            values = [v[key] for v in s.values()]
            out["loss_agreement"].setdefault(suite, {})[key] = (
                max(abs(a - values[0]) for a in values) / max(abs(values[0]), 1e-12))
    return out


def report(args, runs: list[dict], summary: dict, argv: list[str] | None = None) -> None:
    import torch
    import transformers
    import trl

    prompt_len, completion_len = lengths(args)
    title = (f"log-prob engine, random Qwen2 ({args.preset}: " + ", ".join(f"{k}={v}" for k, v in
             PRESETS[args.preset].items()) + f"), rows of {args.seq} tokens (prompt {prompt_len} : completion "
             f"{completion_len}), batch {args.batch}, GRPO {args.grpo_prompts} x {args.group}")
    print(f"\n{title}\n{args.repeats} interleaved runs per variant, {args.warmup} warm-up + {args.iters} timed "
          f"iterations each; cpu, {runs[0]['threads']} threads, {runs[0]['mem_kind']}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}")
    for suite, by in summary["stats"].items():
        print(f"\n[{suite}] {'variant':<16} {'CPU s median [min..max]':<28} {'wall s':<8} "
              f"{'peak growth MiB median [min..max]':<34} {'body tokens':<12} GFLOP  GFLOP/CPU-s")
        for variant, s in by.items():
            print(f"        {variant:<16} {s['cpu_s_median']:8.3f} [{s['cpu_s_min']:.3f}..{s['cpu_s_max']:.3f}]"
                  f"{'':4} {s['wall_s_median']:7.3f}  {s['peak_growth_mib_median']:8.0f} "
                  f"[{s['peak_growth_mib_min']:.0f}..{s['peak_growth_mib_max']:.0f}]{'':14} {s['body_tokens']:<12} "
                  f"{s['gflops']:6.1f} {s['gflops_per_cpu_s']:6.1f}")
        agree = summary["loss_agreement"][suite]
        print(f"        variants agree (max relative difference): loss {agree['loss']:.1e}, summed completion "
              f"log-probs {agree['logp_sum']:.1e}")
    for name, r in summary["ratios"].items():
        lo, hi = r["cpu_speedup_range"]
        print(f"{name}: CPU speed-up {r['cpu_speedup']:.2f}x [{lo:.2f}..{hi:.2f}] (model FLOPs {r['flop_ratio']:.2f}x "
              f"fewer), peak growth x{r['peak_growth_ratio']:.2f}")
    if args.out:
        meta = {"title": title, "preset": args.preset, "config": PRESETS[args.preset], "seq": args.seq,
                "prompt": prompt_len, "completion": completion_len, "batch": args.batch, "group": args.group,
                "grpo_prompts": args.grpo_prompts, "repeats": args.repeats, "iters": args.iters,
                "warmup": args.warmup, "threads": runs[0]["threads"], "torch": torch.__version__,
                "transformers": transformers.__version__, "trl": trl.__version__,
                "argv": argv or sys.argv}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs, **summary}, indent=1))
        Path(args.out + ".partial").unlink(missing_ok=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="issue")
    p.add_argument("--seq", type=int, default=300, help="tokens per row (prompt + completion)")
    p.add_argument("--ratio", type=float, default=4.0, help="prompt:completion length ratio")
    p.add_argument("--batch", type=int, default=2, help="rows of the heads suite, pairs of the dpo suite")
    p.add_argument("--group", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--grpo-prompts", type=int, default=2, help="GRPO prompts per batch")
    p.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=["heads", "dpo", "grpo"])
    p.add_argument("--variants", nargs="+", default=None, choices=sorted({v for vs in SUITES.values() for v in vs}),
                   help="measure only these variants of each suite (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="fresh-process runs per variant (interleaved)")
    p.add_argument("--iters", type=int, default=3, help="timed forward+backward iterations per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (1: CPU-seconds are compute, not OpenMP spin-waits of a busy machine)")
    p.add_argument("--out", default=None, help="write all runs and the summary as JSON here")
    p.add_argument("--summarise", default=None, metavar="JSON",
                   help="re-summarise the runs of an earlier --out file, or of the .partial file an interrupted run "
                   "left, with that run's own arguments, and write its --out file; runs nothing")
    p.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--suite", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        print(json.dumps(one(args)))
        return
    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        args = p.parse_args(saved["meta"]["argv"][1:])
        report(args, saved["runs"], summarise(args, saved["runs"]), argv=saved["meta"]["argv"])
        return
    runs = run_all(args)
    report(args, runs, summarise(args, runs))


if __name__ == "__main__":
    main()
