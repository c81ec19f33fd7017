"""Support for the multi-process tests (tests/test_distributed.py): the same recipe run on one process and on N
processes under each backend, on the same global batch, with its logged losses and saved model read back.

``seeded_rollout`` is a GRPO ``method.rollout_func`` for those tests: it samples each prompt group with TRL's own
generation (``GRPOTrainer._generate_single_turn``: the weights gathered under ZeRO-3, FSDP2 kept in step) seeded by
the group's prompt and the step, so the rollouts do not depend on how the groups are split over processes; sampling
in one call would draw each process's completions from its own random stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seeded_rollout(prompts, trainer):
    """TRL ``rollout_func``: each group of ``num_generations`` identical prompts sampled with its own seed."""
    import torch

    n = trainer.num_generations
    prompt_ids, completion_ids = [], []
    for start in range(0, len(prompts), n):
        group = prompts[start : start + n]
        torch.manual_seed(zlib.crc32(f"{trainer.state.global_step}|{group[0]}".encode()))
        ids, _, _ = trainer._tokenize_prompts(group)
        completions, _ = trainer._generate_single_turn(ids, None, {}, n)
        prompt_ids += ids
        completion_ids += completions
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def train(recipe: str, out: Path, overrides: list[str], *, processes: int = 1, backend: str = "ddp",
          timeout: int = 600, env: dict | None = None, extra_args: list[str] = ()) -> subprocess.CompletedProcess:
    """``posttrain train RECIPE`` on ``processes`` processes (``--distributed backend``); output in ``out``."""
    cmd = [sys.executable, "-m", "posttrain.cli", "train", recipe, *extra_args, "--set", f"output_dir={out}"]
    for item in overrides:
        cmd += ["--set", item]
    if processes > 1:
        cmd += ["--num-processes", str(processes), "--distributed", backend]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=run_env)


def logged(out: Path, key: str = "loss") -> list[float]:
    """The values of ``key`` in ``metrics.jsonl``, in step order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row[key] for row in rows if key in row]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def max_relative_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


