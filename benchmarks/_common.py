"""Shared machinery for the ``*_vs_trl.py`` benchmarks: models, synthetic data, timing, peak memory, interleaving.

Every measurement runs in a fresh subprocess (one trainer per process), so peak memory is never shared between
trainers and import/compile caches do not favour the second one. Runs are interleaved (A B A B, then B A B A ...) so
that slow drifts of a shared machine hit both sides alike; the report gives the median and the min..max spread.

Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated()`` over ``trainer.train()`` (the counter is reset just before), reported
  both in total and as growth over what was allocated before training (model weights, reference model).
- CPU: the process's peak resident set size over ``trainer.train()``: the kernel's high-water mark (VmHWM) is reset
  through ``/proc/self/clear_refs`` just before training and read after it; growth = peak - RSS before training.
  Falls back to ``ru_maxrss`` (not resettable) where ``clear_refs`` is refused.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------------------------------
# model and tokenizer
# ----------------------------------------------------------------------------------------------------------------------


# --shape: named model shapes (random weights). 0.5b: Qwen2.5-0.5B's configuration (494M parameters with the tied
# head; the same as benchmarks/logprob_engine.py's qwen05b preset).
SHAPES = {"0.5b": {"vocab": 151936, "hidden": 896, "layers": 24, "intermediate": 4864, "heads": 14, "kv_heads": 2}}


def add_model_args(parser, seq_default: int = 256) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a named model shape (sets --vocab/--hidden/--layers)")
    parser.add_argument("--min-free-gib", type=float, default=4.0,
                        help="memory guard: no run starts, and a running one is stopped, while the machine's available "
                             "memory is under this")
    parser.add_argument("--model", default="random",
                        help="'random' (a random-init Qwen2 built offline from --vocab/--hidden/--layers) or a "
                             "posttrain model path such as builtin:tiny-qwen2")
    parser.add_argument("--vocab", type=int, default=65536, help="vocabulary of the random model")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random model")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the random model")
    parser.add_argument("--seq", type=int, default=seq_default, help="tokens per sequence (synthetic data)")
    parser.add_argument("--batch", type=int, default=4, help="per-device train batch size")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the steps/s timing")
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer (interleaved)")
    parser.add_argument("--out", default=None, help="write all runs and the summary as JSON here")


def apply_shape(args) -> None:
    """Set ``--vocab/--hidden/--layers`` from ``--shape`` (call after parsing)."""
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(args, key, value)


def model_argv(args) -> list[str]:
    return [*(["--shape", args.shape] if args.shape else []), "--model", args.model, "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--layers",
            str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup)]


def describe_model(args) -> str:
    if args.model != "random":
        return args.model
    shape = f" (shape {args.shape}: {SHAPES[args.shape]})" if getattr(args, "shape", None) else ""
    return f"random Qwen2 vocab={args.vocab} hidden={args.hidden} layers={args.layers}{shape}"


def build_model(args):
    """The benchmark model, same weights in every process (seed 0). Random-init needs no download."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if args.model != "random":
        from posttrain.models import load_model

        return load_model(args.model)
    heads = getattr(args, "heads", None) or max(1, args.hidden // 64)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=getattr(args, "intermediate", None) or 3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads,
                      num_key_value_heads=getattr(args, "kv_heads", None) or max(1, heads // 2),
                      max_position_embeddings=max(2 * args.seq, 512), tie_word_embeddings=True,
                      pad_token_id=1, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def tokenizer():
    """Any tokenizer with pad/eos tokens: the data below is already tokenized, so only pad/eos ids are read."""
    from posttrain.models import load_tokenizer

    return load_tokenizer("builtin:tiny-qwen2")


def vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def random_ids(gen, n: int, vocab: int) -> list[int]:
    import torch

    return torch.randint(4, vocab, (n,), generator=gen).tolist()  # ids 0..3 are the tokenizer's special tokens


# ----------------------------------------------------------------------------------------------------------------------
# measuring one trainer (inside its subprocess)
# ----------------------------------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def step_timer():
    """A TrainerCallback that timestamps step ends (after a CUDA sync), to time the steps after the warm-up."""
    from transformers import TrainerCallback

    class _Timer(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []
            self.cpu_stamps: list[float] = []  # CPU seconds of this process (all its threads)

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())

    return _Timer()


def measure(trainer, steps: int, warmup: int) -> dict:
    """Train, returning steps/s after the warm-up steps and the peak memory of ``train()``."""
    import torch

    timer = step_timer()
    trainer.add_callback(timer)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import gc

        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
            resettable = True
        except OSError:
            resettable = False
        base = _rss_kib("VmRSS") * 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    total = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = (_rss_kib("VmHWM") if resettable else __import__("resource").getrusage(0).ru_maxrss) * 1024
    stamps = timer.stamps
    assert len(stamps) == steps, (len(stamps), steps)
    timed = stamps[-1] - stamps[warmup - 1] if warmup > 0 else stamps[-1] - start
    cpu = timer.cpu_stamps
    cpu_timed = cpu[-1] - cpu[warmup - 1] if warmup > 0 else cpu[-1] - cpu_start
    return {
        "steps_per_s": (steps - warmup) / timed,
        "cpu_s_per_step": cpu_timed / (steps - warmup),
        "train_s": total,
        "peak_mib": peak / 2**20,
        "peak_growth_mib": (peak - base) / 2**20,
        "base_mib": base / 2**20,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "mem_kind": "cuda max_memory_allocated" if cuda else ("peak RSS (VmHWM reset)" if resettable else "ru_maxrss"),
    }


def train_kwargs(args, output_dir: str) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return dict(output_dir=output_dir, report_to="none", per_device_train_batch_size=args.batch, max_steps=args.steps,
                logging_steps=args.steps, save_strategy="no", gradient_checkpointing=False, disable_tqdm=True,
                bf16=cuda, use_cpu=not cuda, seed=0, dataloader_num_workers=0, learning_rate=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# driving the subprocesses
# ----------------------------------------------------------------------------------------------------------------------


def available_gib() -> float:
    """The machine's available memory (``MemAvailable``), GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("MemAvailable")


def run_guarded(cmd: list[str], min_free_gib: float = 4.0) -> dict:
    """Run one measurement process and return the JSON of its last stdout line. On a shared machine: it starts only
    while at least ``min_free_gib`` GiB are available, and is stopped (the benchmark ends) when that drops below it."""
    if available_gib() < min_free_gib:
        raise SystemExit(f"not started: {available_gib():.1f} GiB available < --min-free-gib {min_free_gib}")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while proc.poll() is None:
            time.sleep(0.5)
            if available_gib() < min_free_gib:
                proc.kill()
                proc.wait()
                raise SystemExit(f"stopped: {available_gib():.1f} GiB available < --min-free-gib {min_free_gib} "
                                 f"during {' '.join(cmd)}")
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            sys.stderr.write(err.read()[-4000:])
            raise SystemExit(f"run failed: {' '.join(cmd)}")
        return json.loads(out.read().strip().splitlines()[-1])


def run_interleaved(script: str, variants: list[list[str]], args, extra_argv: list[str] | None = None) -> list[dict]:
    """Run every variant ``args.repeats`` times, one fresh process each, alternating the order every repeat."""
    runs = []
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else list(reversed(variants))
        for variant in order:
            cmd = [sys.executable, script, "--_one", *variant, *model_argv(args), *(extra_argv or [])]
            res = run_guarded(cmd, args.min_free_gib)
            res["repeat"] = r
            runs.append(res)
            print(f"  [{r}] {res['label']:<22} {res['steps_per_s']:.3f} steps/s  {res['cpu_s_per_step']:.3f} CPU s/step  "
                  f"peak {res['peak_mib']:.0f} MiB (+{res['peak_growth_mib']:.0f})", flush=True)
    return runs


def summarise(runs: list[dict], pairs: list[tuple[str, str]]) -> dict:
    """Median and spread per label, and the posttrain/TRL ratios of the medians for each (posttrain, trl) pair."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["label"], []).append(r)
    stats = {}
    for label, rs in by.items():
        sps = [r["steps_per_s"] for r in rs]
        grow = [r["peak_growth_mib"] for r in rs]
        peak = [r["peak_mib"] for r in rs]
        cpu = [r.get("cpu_s_per_step", float("nan")) for r in rs]
        stats[label] = {"n": len(rs), "cpu_s_per_step_median": statistics.median(cpu), "cpu_s_per_step_min": min(cpu),
                        "cpu_s_per_step_max": max(cpu),
                        "steps_per_s_median": statistics.median(sps), "steps_per_s_min": min(sps),
                        "steps_per_s_max": max(sps), "peak_growth_mib_median": statistics.median(grow),
                        "peak_growth_mib_min": min(grow), "peak_growth_mib_max": max(grow),
                        "peak_mib_median": statistics.median(peak)}
    ratios = {}
    for ours, trl in pairs:
        if ours in stats and trl in stats:
            ratios[f"{ours}/{trl}"] = {
                "speed": stats[ours]["steps_per_s_median"] / stats[trl]["steps_per_s_median"],
                "cpu_speed": stats[trl]["cpu_s_per_step_median"] / stats[ours]["cpu_s_per_step_median"],
                "peak_growth": stats[ours]["peak_growth_mib_median"] / max(stats[trl]["peak_growth_mib_median"], 1e-9),
                "peak": stats[ours]["peak_mib_median"] / stats[trl]["peak_mib_median"],
            }
    return {"stats": stats, "ratios": ratios}


def report(title: str, args, runs: list[dict], summary: dict) -> None:
    import torch
    import transformers
    import trl

    print(f"\n{title}: {describe_model(args)}, seq {args.seq}, batch {args.batch}, {args.steps} steps "
          f"({args.warmup} warm-up), {args.repeats} runs each; {runs[0]['device']}, {runs[0]['mem_kind']}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'trainer':<22} {'steps/s median [min..max]':<30} {'peak growth MiB median [min..max]':<36} peak MiB")
    for label, s in summary["stats"].items():
        print(f"{label:<22} {s['steps_per_s_median']:8.3f} [{s['steps_per_s_min']:.3f}..{s['steps_per_s_max']:.3f}]"
              f"{'':6} {s['peak_growth_mib_median']:8.0f} [{s['peak_growth_mib_min']:.0f}..{s['peak_growth_mib_max']:.0f}]"
              f"{'':14} {s['peak_mib_median']:.0f}")
    for name, r in summary["ratios"].items():
        print(f"ratio {name}: speed {r['speed']:.3f}, peak growth {r['peak_growth']:.3f}, peak {r['peak']:.3f}")
    if args.out:
        meta = {"title": title, "model": describe_model(args), "seq": args.seq, "batch": args.batch,
                "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "torch": torch.__version__,
                "transformers": transformers.__version__, "trl": trl.__version__,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "argv": sys.argv}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs, **summary}, indent=1))


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (the machine may be shared: the report says how loaded it was)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def paired_ratios(runs: list[dict], ours: str, base: str) -> dict:
    """Per repeat: the baseline's CPU s/step over ours (speed-up) and ours' peak growth over the baseline's; median
    [min..max] over the repeats (CPU time, not wall time: nearly independent of other load)."""
    by = {(r["label"], r["repeat"]): r for r in runs}
    speed, memory = [], []
    for (label, repeat), r in by.items():
        if label == base and (ours, repeat) in by:
            o = by[(ours, repeat)]
            speed.append(r["cpu_s_per_step"] / o["cpu_s_per_step"])
            memory.append(o["peak_growth_mib"] / max(r["peak_growth_mib"], 1e-9))
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for name, v in (("cpu_speedup", speed), ("peak_growth_ratio", memory))}


def report_paired(title: str, args, runs: list[dict], pairs: list[tuple[str, str]], load_before: str) -> dict:
    """:func:`summarise` plus the per-repeat paired ratios and the load; prints both tables and writes ``args.out``
    (runs, stats, ratios, paired ratios, load)."""
    summary = summarise(runs, pairs)
    summary["paired"] = {f"{o}/{b}": paired_ratios(runs, o, b) for o, b in pairs}
    summary["load"] = {"before": load_before, "after": load_average()}
    args.out, out = None, args.out
    report(title, args, runs, summary)
    for label, st in summary["stats"].items():
        print(f"{label:<32} CPU s/step {st['cpu_s_per_step_median']:.3f} [{st['cpu_s_per_step_min']:.3f}.."
              f"{st['cpu_s_per_step_max']:.3f}], peak growth MiB {st['peak_growth_mib_median']:.0f} "
              f"[{st['peak_growth_mib_min']:.0f}..{st['peak_growth_mib_max']:.0f}]")
    for name, r in summary["paired"].items():
        c, m = r["cpu_speedup"], r["peak_growth_ratio"]
        print(f"paired {name}: CPU speed-up {c['median']:.2f} [{c['min']:.2f}..{c['max']:.2f}], peak growth ratio "
              f"{m['median']:.2f} [{m['min']:.2f}..{m['max']:.2f}]")
    print(f"load average before {summary['load']['before']}, after {summary['load']['after']}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"argv": sys.argv, "runs": runs, **summary}, indent=1))
    return summary


def markdown(paths: list[str]) -> str:
    """Markdown tables from the ``--out`` JSON files: ``python benchmarks/_common.py benchmarks/results/*.json``."""
    lines = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        m = d["meta"]
        lines += [f"**{m['title']}** — {m['model']}, seq {m['seq']}, batch {m['batch']}, {m['steps']} steps "
                  f"({m['warmup']} warm-up, not timed), {m['repeats']} interleaved runs each (`{Path(p).name}`)", "",
                  "| trainer | steps/s median [min..max] | peak RSS growth MiB median [min..max] | peak RSS MiB |",
                  "|---|---|---|---|"]
        for label, s in d["stats"].items():
            lines.append(f"| {label} | {s['steps_per_s_median']:.3f} [{s['steps_per_s_min']:.3f}..{s['steps_per_s_max']:.3f}]"
                         f" | {s['peak_growth_mib_median']:.0f} [{s['peak_growth_mib_min']:.0f}..{s['peak_growth_mib_max']:.0f}]"
                         f" | {s['peak_mib_median']:.0f} |")
        lines += ["", "| ratio (medians) | speed | peak growth | peak |", "|---|---|---|---|"]
        for name, r in d["ratios"].items():
            lines.append(f"| {name} | {r['speed']:.2f} | {r['peak_growth']:.2f} | {r['peak']:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(sys.argv[1:]))
