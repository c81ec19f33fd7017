"""The preference trainer on the log-prob engine (completion rows only, each pair's prompt once) against the path before
it (TRL's fused LM head on whole rows, ``trainer.use_engine = False``), on the same batch: every method's loss,
metrics and gradients, with right and left padding, prompt sharing on and off, LoRA, gradient accumulation; the
reference precomputed through the shared plan (cached on disk); the recipe keys ``training.logprob_head`` /
``training.share_prompts``.
(tests/families/preference/test_preference_trainer.py compares the engine path with stock TRL's trainers.)"""

from __future__ import annotations

import logging

import pytest
import torch

BATCH = 8
REL = 1e-5


def _dataset(n=16):
    from posttrain.data.sources import load_source
    from posttrain.recipe import DataSource

    return load_source(DataSource(source="builtin:arithmetic-pref", options={"num_samples": n}), "data.train",
                       "preference")


def _conversational(dataset):
    """The same pairs as chat messages (a user prompt, assistant chosen / rejected turns)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               **{side: [{"role": "assistant", "content": r[side]}] for side in ("chosen", "rejected")}}
                              for r in dataset])


def _trainer(policy_dir, ref_dir, tmp_path, method, params, peft=False, data=None, chat_template=None, **config):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.families.preference.config import PreferenceConfig
    from posttrain.families.preference.trainer import PosttrainPreferenceTrainer
    from posttrain.methods import METHODS

    torch.manual_seed(0)
    p = METHODS[method].params(**params)
    args = PreferenceConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                            per_device_train_batch_size=BATCH, max_length=64, seed=0, beta=p.beta,
                            use_weighting=p.fused_weighting, **config)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    uses_reference = METHODS[method].reference == "required"
    ref = AutoModelForCausalLM.from_pretrained(ref_dir) if uses_reference and not peft else None
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False) if peft else None
    trainer = PosttrainPreferenceTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir), ref_model=ref,
                                         train_dataset=_dataset() if data is None else data, processing_class=tok,
                                         args=args, peft_config=lora, method=method, params=p)
    trainer.model.train()
    return trainer, next(iter(trainer.get_train_dataloader()))


def _left_padded(batch):
    """The same rows with their padding moved to the left."""
    out = dict(batch)
    lengths = batch["attention_mask"].sum(-1)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        rows = [torch.roll(row, int(row.shape[0] - n)) for row, n in zip(batch[key], lengths)]
        out[key] = torch.stack(rows)
    assert bool((out["attention_mask"][:, -1] == 1).all()) and not bool((out["attention_mask"][:, 0] == 1).all())
    return out


def _run(trainer, batch, *, engine: bool, share: bool = True):
    """Loss, gradients (a copy per parameter) and last metrics of one compute_loss + backward."""
    trainer.use_engine = engine
    trainer.engine.share_prompts = share
    trainer.model.zero_grad()
    if trainer.mask_net is not None:
        trainer.mask_net.zero_grad()
    calls = []
    forward = trainer.engine.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(out.shared)
        return out

    trainer.engine.forward = spy
    try:
        loss = trainer.compute_loss(trainer.model, dict(batch))
    finally:
        trainer.engine.forward = forward
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, metrics, calls


def _assert_same(got, expected):
    loss, grads, metrics, _ = got
    loss_0, grads_0, metrics_0, _ = expected
    assert abs(loss.item() - loss_0.item()) <= REL * max(abs(loss_0.item()), 1e-6), (loss.item(), loss_0.item())
    assert grads.keys() == grads_0.keys() and grads
    diff = sum(float(((grads[n] - grads_0[n]).double() ** 2).sum()) for n in grads) ** 0.5
    norm = sum(float((g.double() ** 2).sum()) for g in grads_0.values()) ** 0.5
    assert diff <= REL * norm, f"gradient differs by {diff / norm:.3g} of its norm"
    for name in grads:
        worst = float((grads[name] - grads_0[name]).abs().max())
        assert worst <= 1e-3 * max(float(grads_0[name].abs().max()), 1e-30), name
    assert metrics.keys() == metrics_0.keys()
    for name, value in metrics_0.items():
        assert abs(metrics[name] - value) <= 1e-4 * max(1.0, abs(value)), (name, metrics[name], value)


METHOD_CASES = [
    ("dpo", dict(loss="sigmoid", beta=0.1)),
    ("dpo", dict(loss="ipo", beta=0.5)),
    ("dpo", dict(loss="robust", beta=0.2, label_smoothing=0.1)),
    ("wpo", dict(beta=0.1)),
    ("wpo", dict(beta=0.1, wpo_alignment="greedy")),
    ("sparsepo", dict(mask="reference")),
    ("sparsepo", dict(mask="learned", mask_dropout=0.0, rw_kl_independent=True)),
    ("asft_aligned", dict()),
    ("simpo", dict(sft_coef=0.5)),
    ("orpo", dict(beta=0.1)),
    ("orpo", dict(beta=0.1, nll_on_prompt=False)),
]


@pytest.mark.parametrize("method,params", METHOD_CASES,
                         ids=["dpo", "ipo", "robust", "wpo", "wpo-greedy", "sparsepo-mapo", "sparsepo-learned",
                              "asft_aligned", "simpo-sft", "orpo", "orpo-no-prompt-nll"])
def test_engine_equals_the_trl_head_path_for_every_method(arith_model_dir, tiny_model_dir, tmp_path, method, params):
    trainer, batch = _trainer(arith_model_dir, tiny_model_dir, tmp_path, method, params)
    before = _run(trainer, batch, engine=False)
    assert before[3] == []  # the TRL-head path never calls the engine
    shared = _run(trainer, batch, engine=True)
    # the policy and a live reference ran shared, except SparsePO's reference (run first, with the token KL tiled
    # inside the policy's forward against its rows): its MaPO / learned masks read per-row activations
    calls = shared[3][1:] if method == "sparsepo" else shared[3]
    assert calls and all(calls) and (method != "sparsepo" or shared[3] == [False, True]), shared[3]
    _assert_same(shared, before)
    unshared = _run(trainer, batch, engine=True, share=False)
    assert unshared[3] and not any(unshared[3])
    _assert_same(unshared, before)
    _assert_same(_run(trainer, _left_padded(batch), engine=True), before)


@pytest.mark.parametrize("method,params", [("dpo", dict(beta=0.1)), ("sparsepo", dict(mask="reference"))],
                         ids=["dpo", "sparsepo-mapo"])
def test_lora_with_the_adapter_disabled_reference(arith_model_dir, tmp_path, method, params):
    trainer, batch = _trainer(arith_model_dir, None, tmp_path, method, params, peft=True)
    before = _run(trainer, batch, engine=False)
    assert before[1] and all("lora" in n for n in before[1])
    _assert_same(_run(trainer, batch, engine=True), before)
    _assert_same(_run(trainer, _left_padded(batch), engine=True), before)


def test_sparsepo_off_the_engine_is_refused_on_sharded_backends(arith_model_dir, tiny_model_dir, tmp_path,
                                                                monkeypatch):
    """Off the engine (a MoE router aux loss) SparsePO's token KL projects the policy's head after the forward: refused
    under ZeRO-3 / FSDP2 with one line; on the engine (the KL inside the forward) and under ddp it runs."""
    from posttrain.errors import UserError
    from posttrain.families.preference import trainer as T

    trainer, batch = _trainer(arith_model_dir, tiny_model_dir, tmp_path, "sparsepo", dict(mask="reference"))
    for backend in ("zero3", "zero3_offload", "fsdp2"):
        monkeypatch.setattr(T, "backend_name", lambda accelerator, b=backend: b)
        with pytest.raises(UserError, match=rf"^method.name: sparsepo cannot run with --distributed {backend} here: "
                                            r"the log-prob engine is off \(the model's router aux loss"):
            _run(trainer, batch, engine=False)
        assert _run(trainer, batch, engine=True)[0].isfinite()
    monkeypatch.setattr(T, "backend_name", lambda accelerator: "ddp")
    assert _run(trainer, batch, engine=False)[0].isfinite()


def test_gradient_accumulation_two_micro_batches_equal_one(arith_model_dir, tiny_model_dir, tmp_path):
    trainer, batch = _trainer(arith_model_dir, tiny_model_dir, tmp_path, "dpo", dict(beta=0.1))
    whole = _run(trainer, batch, engine=False)
    half = BATCH // 2
    chosen, rejected = slice(0, BATCH), slice(BATCH, 2 * BATCH)
    losses, grads = [], None
    for part in (slice(0, half), slice(half, BATCH)):
        rows = torch.cat([torch.arange(2 * BATCH)[chosen][part], torch.arange(2 * BATCH)[rejected][part]])
        micro = {k: v[rows] for k, v in batch.items()}
        loss, g, _, _ = _run(trainer, micro, engine=True)
        losses.append(loss)
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
    accumulated = (sum(losses) / 2, {n: g / 2 for n, g in grads.items()}, whole[2], [])
    loss, grads_whole = whole[0], whole[1]
    assert abs(accumulated[0].item() - loss.item()) <= REL * abs(loss.item())
    diff = sum(float(((accumulated[1][n] - grads_whole[n]).double() ** 2).sum()) for n in grads_whole) ** 0.5
    norm = sum(float((g.double() ** 2).sum()) for g in grads_whole.values()) ** 0.5
    assert diff <= REL * norm


# ----------------------------------------------------------------------------------------------------------------------
# The reference precomputed through the shared plan (posttrain.logprobs.reference), cached on disk
# ----------------------------------------------------------------------------------------------------------------------


def _precomputed(policy_dir, ref_dir, tmp_path, method, params, **kwargs):
    return _trainer(policy_dir, ref_dir, tmp_path, method, {**params, "precompute_ref_log_probs": True},
                    precompute_ref_log_probs=True, **kwargs)


@pytest.fixture
def no_trl_reference_pass(monkeypatch):
    """TRL's own precomputation pass must not run (the shared plan replaces it)."""
    from trl import DPOTrainer

    def refused(*args, **kwargs):
        raise AssertionError("TRL's compute_ref_log_probs ran")

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", refused)


@pytest.mark.parametrize("method,params", [("dpo", dict(beta=0.1)), ("dpo", dict(loss="ipo", beta=0.5)),
                                           ("wpo", dict(beta=0.1))], ids=["dpo", "ipo", "wpo"])
def test_precomputed_reference_equals_the_live_one_with_a_chat_template(arith_model_dir, tiny_model_dir, tmp_path,
                                                                        method, params, reference_cache,
                                                                        no_trl_reference_pass):
    data = _conversational(_dataset())
    live, batch = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "live", method, params, data=data)
    pre, pre_batch = _precomputed(arith_model_dir, tiny_model_dir, tmp_path / "pre", method, params, data=data)
    assert reference_cache == [1] and len(list((tmp_path / "reference-cache").iterdir())) == 1
    assert pre.ref_model is None and "ref_chosen_logps" in pre_batch  # no reference kept in memory
    assert "<|im_start|>" in pre.processing_class.decode(pre_batch["input_ids"][0])  # the chat template's rows
    torch.testing.assert_close(pre_batch["input_ids"], batch["input_ids"])
    got = _run(pre, pre_batch, engine=True)
    assert len(got[3]) == 1  # the policy's forward only (the live trainer also runs the reference's)
    _assert_same(got, _run(live, batch, engine=True))


def test_precomputed_columns_follow_their_pairs_through_the_shuffled_dataloader(arith_model_dir, tiny_model_dir,
                                                                                 tmp_path, reference_cache):
    """Each pair's values ride in its row: every batch of the shuffled sampler carries its own pairs' reference (so
    gradient accumulation and the per-process shards of a distributed sampler read the right values)."""
    from posttrain.families.preference.trainer import _Batch

    live, _ = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "live", "dpo", dict(beta=0.1))
    pre, _ = _precomputed(arith_model_dir, tiny_model_dir, tmp_path / "pre", "dpo", dict(beta=0.1))
    order = []
    for batch in pre.get_train_dataloader():
        expected = live._reference_pass(live.model, live._reference(), _Batch.of(batch, live.params, False))
        for got, want in zip((batch["ref_chosen_logps"], batch["ref_rejected_logps"]), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=REL, atol=REL)
        order += [pre.train_dataset["ref_chosen_logps"].index(v) for v in batch["ref_chosen_logps"].tolist()]
    assert sorted(order) == list(range(16)) and order != list(range(16))  # every pair once, shuffled


def test_a_rerun_reads_the_cache_and_model_data_or_template_changes_recompute(arith_model_dir, tiny_model_dir,
                                                                              tmp_path, reference_cache):
    dpo = ("dpo", dict(beta=0.1))
    first, _ = _precomputed(arith_model_dir, tiny_model_dir, tmp_path / "first", *dpo)
    again, _ = _precomputed(arith_model_dir, tiny_model_dir, tmp_path / "again", *dpo)
    assert reference_cache == [1]  # the rerun read the file: no reference forward
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert again.train_dataset[column] == first.train_dataset[column]
    _precomputed(arith_model_dir, arith_model_dir, tmp_path / "model", *dpo)  # another reference model
    assert reference_cache == [1, 1]
    _precomputed(arith_model_dir, tiny_model_dir, tmp_path / "data", *dpo, data=_dataset(15))  # other rows
    assert reference_cache == [1, 1, 1]
    template = first.processing_class.chat_template.replace("<|im_end|>'", "<|im_end|>\\n'")
    assert template != first.processing_class.chat_template
    _precomputed(arith_model_dir, tiny_model_dir, tmp_path / "template", *dpo, chat_template=template)
    assert reference_cache == [1, 1, 1, 1]
    assert len(list((tmp_path / "reference-cache").iterdir())) == 4


def test_precomputed_reference_with_lora_is_the_adapter_disabled_policy(arith_model_dir, tmp_path, reference_cache,
                                                                        no_trl_reference_pass):
    live, batch = _trainer(arith_model_dir, None, tmp_path / "live", "dpo", dict(beta=0.1), peft=True)
    pre, pre_batch = _precomputed(arith_model_dir, None, tmp_path / "pre", "dpo", dict(beta=0.1), peft=True)
    got = _run(pre, pre_batch, engine=True)
    assert reference_cache == [1] and len(got[3]) == 1
    _assert_same(got, _run(live, batch, engine=True))


def test_precomputed_reference_on_the_fused_head_equals_the_path_before_the_engine(arith_model_dir, tiny_model_dir,
                                                                                  tmp_path, reference_cache):
    """``training.logprob_head: fused`` scores the precomputation with TRL's fused head (inside the engine); the live
    reference of the path before the engine (TRL's fused head on whole rows) gives the same step."""
    live, batch = _trainer(arith_model_dir, tiny_model_dir, tmp_path / "live", "dpo", dict(beta=0.1))
    pre, pre_batch = _precomputed(arith_model_dir, tiny_model_dir, tmp_path / "pre", "dpo", dict(beta=0.1),
                                  logprob_head="fused")
    assert reference_cache == [1]
    _assert_same(_run(pre, pre_batch, engine=False), _run(live, batch, engine=False))


def test_a_reference_free_method_precomputes_nothing(arith_model_dir, tmp_path, reference_cache):
    """``precompute_ref_log_probs`` on a method without a reference (a recipe cannot set it: test_preference_trainer) is
    ignored by the trainer: no pass, no columns, the same step."""
    plain, batch = _trainer(arith_model_dir, None, tmp_path / "plain", "simpo", dict(sft_coef=0.5))
    asked, asked_batch = _trainer(arith_model_dir, None, tmp_path / "asked", "simpo", dict(sft_coef=0.5),
                                  precompute_ref_log_probs=True)
    assert reference_cache == [] and "ref_chosen_logps" not in asked.train_dataset.column_names
    _assert_same(_run(asked, asked_batch, engine=True), _run(plain, batch, engine=True))


def test_recipe_keys_are_checked():
    from posttrain.errors import UserError
    from posttrain.recipe.training_args import check_training

    assert check_training({"logprob_head": "chunked", "share_prompts": False}, "preference") == {
        "logprob_head": "chunked", "share_prompts": False}
    with pytest.raises(UserError, match=r"^training.logprob_head: expected one of 'auto', 'chunked', 'fused', "
                                        r"'liger', got 'triton'$"):
        check_training({"logprob_head": "triton"}, "preference")
    with pytest.raises(UserError, match=r"^training.share_prompts: expected true or false, got 'no'$"):
        check_training({"share_prompts": "no"}, "preference")
    with pytest.raises(UserError, match="training.logprob_head: unknown training argument"):
        check_training({"logprob_head": "auto"}, "reward")


def test_liger_on_cpu_is_refused_before_the_model_loads(tmp_path):
    import yaml

    from posttrain.errors import UserError
    from posttrain.families.base import FAMILIES
    from posttrain.methods import METHODS
    from posttrain.recipe import load_recipe
    from posttrain.registry import load

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": "builtin:tiny-qwen2", "method": {"name": "dpo"}, "output_dir": str(tmp_path / "out"),
        "data": {"train": {"source": "builtin:arithmetic-pref"}}, "training": {"logprob_head": "liger"}}))
    recipe = load_recipe(path)
    with pytest.raises(UserError, match="^training.logprob_head: liger cannot run here: liger-kernel runs on CUDA"):
        load(FAMILIES["preference"].build_config)(recipe, METHODS["dpo"])


def test_share_prompts_off_is_logged_once(arith_model_dir, tiny_model_dir, tmp_path, caplog):
    from posttrain.logprobs import engine as E

    E._LOGGED.discard("shared prompts off (training.share_prompts: false): chosen and rejected rows run whole")
    head_line = "log-prob head: chunked (auto: plain matmul + logsumexp over completion rows on cpu)"
    E._LOGGED.discard(head_line)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        trainer, batch = _trainer(arith_model_dir, tiny_model_dir, tmp_path, "dpo", dict(beta=0.1),
                                  share_prompts=False)
        _, _, _, calls = _run(trainer, batch, engine=True, share=trainer.engine.share_prompts)
    assert calls == [False, False]
    lines = [r.getMessage() for r in caplog.records if "shared prompts off" in r.getMessage()]
    assert lines == ["shared prompts off (training.share_prompts: false): chosen and rejected rows run whole"]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("log-prob head:")] == [head_line]


def test_goat_rows_run_whole(arith_model_dir, tiny_model_dir, tmp_path, monkeypatch):
    """GOAT's balance loss counts the tokens of every row, so its trainer never shares a prompt between rows."""
    from posttrain.adapters.goat import GOATTrainerMixin
    from posttrain.families.preference import trainer as T

    monkeypatch.setattr(T, "PosttrainPreferenceTrainer",
                        type("GoatPreference", (GOATTrainerMixin, T.PosttrainPreferenceTrainer), {}))
    trainer, _ = _trainer(arith_model_dir, tiny_model_dir, tmp_path, "dpo", dict(beta=0.1))
    assert trainer.engine.share_prompts is False
