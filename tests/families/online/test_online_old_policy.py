"""Online DPO skips TRL's old-policy forward (``PosttrainOnlineDPOTrainer._without_old_policy_logps``;
docs/methods/online_dpo.md#generation-and-the-old-policy): with ``num_iterations: 2``, or ``steps_per_generation`` out
of step with gradient accumulation, stock TRL 1.16 scores every rollout once more with the policy under ``no_grad``
(GRPO's "old" log-probs), which the DPO loss never reads. Counted per generation batch before (TRL's path,
``skip_old_policy_logps = False``) and after, with the same losses at every step, with and without PEFT; and the TRL
code the skip relies on, checked so that a TRL change fails here."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

STEPS = 4


def text_parity(prompts, completions, **kwargs):
    """A reward that ranks about half the pairs: the parity of the completion's character codes."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


def _trainer(tmp_path, *, peft: bool, skip: bool, **config):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.families.online.trainer import PosttrainOnlineDPOTrainer
    from posttrain.families.rl.config import RLConfig
    from posttrain.methods import METHODS
    from posttrain.models import builtin_model_dir

    path = builtin_model_dir("tiny-qwen2-arith")
    torch.manual_seed(0)
    cfg = RLConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, num_generations=2,
                   per_device_train_batch_size=8, max_completion_length=8, max_steps=STEPS, logging_steps=1,
                   beta=0.1, learning_rate=1e-3, temperature=1.0, disable_tqdm=True, save_strategy="no", seed=0,
                   vllm_importance_sampling_correction=False, **config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False) if peft else None
    trainer = PosttrainOnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=[text_parity], args=cfg,
        train_dataset=Dataset.from_list(arithmetic_rows("rl", num_samples=64, seed=5)),
        processing_class=AutoTokenizer.from_pretrained(path), peft_config=lora, params=METHODS["online_dpo"].params(),
        ref_model=None if peft else AutoModelForCausalLM.from_pretrained(path))
    trainer.skip_old_policy_logps = skip
    return trainer


def _adapter_disabled(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


def _counted_run(trainer):
    """Train; return the scoring calls of each generation batch (``old_policy`` or ``reference``), the number of
    training forwards and the logged loss of every step."""
    generations: list[list[str]] = []
    training = []
    generate, score, compute = (trainer._generate_and_score_completions, trainer._get_per_token_logps_and_entropies,
                                trainer._compute_loss)

    def counted_generate(inputs):
        generations.append([])
        return generate(inputs)

    def counted_score(model, *args, **kwargs):
        reference = model is trainer.ref_model or _adapter_disabled(model)
        generations[-1].append("reference" if reference else "old_policy")
        return score(model, *args, **kwargs)

    def counted_loss(model, inputs):
        training.append(1)
        return compute(model, inputs)

    trainer._generate_and_score_completions = counted_generate
    trainer._get_per_token_logps_and_entropies = counted_score
    trainer._compute_loss = counted_loss
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return generations, len(training), losses


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("config", [{"num_iterations": 2}, {"steps_per_generation": 2}],
                         ids=["num_iterations_2", "steps_per_generation_2"])
def test_no_old_policy_forward_and_the_same_losses(config, peft, tmp_path):
    before = _counted_run(_trainer(tmp_path / "before", peft=peft, skip=False, **config))
    after = _counted_run(_trainer(tmp_path / "after", peft=peft, skip=True, **config))
    print(config, "lora" if peft else "full", "scoring calls per generation batch, before:", before[0], "after:",
          after[0], "training forwards:", before[1], after[1], "losses:", before[2], after[2])
    # 4 optimizer steps, GA 1: one generation batch per 2 steps
    assert before[0] == [["old_policy", "reference"]] * 2, before[0]
    assert after[0] == [["reference"]] * 2, after[0]
    assert before[1] == after[1] == STEPS
    assert len(before[2]) == len(after[2]) == STEPS
    assert any(loss != 0.0 for loss in after[2])
    assert after[2] == pytest.approx(before[2], rel=1e-6, abs=1e-9)
    # what the skip changes is restored after each generation
    trainer = _trainer(tmp_path / "restored", peft=peft, skip=True, **config)
    with trainer._without_old_policy_logps():
        assert trainer.num_iterations == trainer.args.steps_per_generation == 1
    assert (trainer.num_iterations, trainer.args.steps_per_generation) == (config.get("num_iterations", 1),
                                                                           config.get("steps_per_generation", 1))


def test_aligned_steps_score_once_either_way(tmp_path):
    """Generation aligned with the optimizer step (the defaults): TRL makes no old-policy call, with or without the
    skip; the skip changes nothing there."""
    before = _counted_run(_trainer(tmp_path / "before", peft=False, skip=False))
    after = _counted_run(_trainer(tmp_path / "after", peft=False, skip=True))
    assert before[0] == after[0] == [["reference"]] * STEPS
    assert after[2] == before[2]


def test_trl_reads_the_skipped_factors_only_in_the_old_policy_condition():
    """The skip sets ``num_iterations`` and ``args.steps_per_generation`` to 1 while TRL's
    ``_generate_and_score_completions`` runs: TRL 1.16 must read them there exactly once, in the condition that guards
    the old-policy call, and nowhere else in the trainer's module except the sampler, the dataloader and
    ``_prepare_inputs`` (outside generation). A TRL that moves any of this fails here."""
    from trl.trainer import grpo_trainer

    source = inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions)
    condition = re.search(
        r"generate_every = self\.args\.steps_per_generation \* self\.num_iterations.*\n"
        r"\s*if self\.args\.gradient_accumulation_steps % generate_every != 0 or \(\n"
        r"\s*self\.use_vllm and self\.vllm_importance_sampling_correction\n"
        r"\s*\):\n"
        r"\s*old_per_token_logps, _, _ = self\._get_per_token_logps_and_entropies\(\n"
        r"\s*self\.model,", source)
    assert condition, "TRL's old-policy condition moved: update PosttrainOnlineDPOTrainer._without_old_policy_logps"
    assert source.count("steps_per_generation") == 1 and source.count("num_iterations") == 1
    readers = {name for name, fn in inspect.getmembers(grpo_trainer.GRPOTrainer, inspect.isfunction)
               if fn.__module__ == grpo_trainer.__name__
               and re.search(r"steps_per_generation|self\.num_iterations", inspect.getsource(fn))}
    assert readers == {"__init__", "_get_train_sampler", "get_train_dataloader", "_prepare_inputs",
                       "_generate_and_score_completions", "_compute_loss"}, readers
