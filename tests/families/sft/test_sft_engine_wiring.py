"""The SFT-family trainer on the log-prob engine (the label positions only through the chunked head) against the path
before it (TRL's fused LM head on every position, ``trainer.use_engine = False``), on the same batch: every method's
loss, metrics and gradients, on plain and conversational (assistant-only) rows, with LoRA (and its disabled adapter
as ASFT's anchor), GOAT, gradient accumulation and padding-free rows; TRL's logged metrics against stock
``SFTTrainer``; the recipe key ``training.logprob_head`` and the fallback (tests/test_trl_parity.py compares the
losses and gradients with stock TRL)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

BATCH = 8
REL = 1e-5


def _plain(n=16, scores=False):
    from posttrain.data.sources import load_source
    from posttrain.recipe import DataSource

    ds = load_source(DataSource(source="builtin:arithmetic-sft", options={"num_samples": n}), "data.train", "sft")
    if scores:  # PoFT's aligned-model scores (mean response log-probs), one per row
        ds = ds.add_column("poft_ref_score", [-0.5 - 0.25 * (i % 5) for i in range(len(ds))])
    return ds


def _chat(tok, n=16):
    """``messages`` rows, masked to their assistant turns as the run does (posttrain.run.preflight)."""
    from datasets import Dataset

    from posttrain.data.formatting import mask_conversational_rows

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}+3="},
                          {"role": "assistant", "content": str(i + 3)}, {"role": "user", "content": "and 4+4="},
                          {"role": "assistant", "content": "8"}]} for i in range(n)]
    return mask_conversational_rows(Dataset.from_list(rows), tok, "data.train")


def _trainer(policy_dir, tmp_path, method, params=None, *, anchor_dir=None, data="plain", lora=False, **config):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.families.sft.config import SFTFamilyConfig
    from posttrain.families.sft.trainer import PosttrainSFTTrainer
    from posttrain.methods import METHODS

    torch.manual_seed(0)
    p = METHODS[method].params(**(params or {}))
    tok = AutoTokenizer.from_pretrained(policy_dir)
    args = SFTFamilyConfig(**{"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "bf16": False,
                              "per_device_train_batch_size": BATCH, "max_length": 64, "seed": 0,
                              "assistant_only_loss": False, "completion_only_loss": p.completion_only, **config})
    ds = _chat(tok) if data == "chat" else _plain(scores=method == "poft")
    anchor = AutoModelForCausalLM.from_pretrained(anchor_dir).eval() if anchor_dir else None
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False) if lora else None
    trainer = PosttrainSFTTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir), args=args, train_dataset=ds,
                                  processing_class=tok, peft_config=peft, method=method, params=p,
                                  ref_model=anchor)
    trainer.model.train()
    return trainer, next(iter(trainer.get_train_dataloader()))


def _run(trainer, batch, *, engine: bool, num_items=None):
    """Loss, gradients (a copy per parameter), last metrics and the engine calls of one compute_loss + backward."""
    trainer.use_engine = engine
    trainer.model.zero_grad()
    calls = []
    forward = trainer.engine.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(int(out.mask.sum()))
        return out

    trainer.engine.forward = spy
    try:
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    finally:
        trainer.engine.forward = forward
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, metrics, calls


def _assert_same(got, expected, rel=REL):
    loss, grads, metrics, _ = got
    loss_0, grads_0, metrics_0, _ = expected
    assert abs(loss.item() - loss_0.item()) <= rel * max(abs(loss_0.item()), 1e-6), (loss.item(), loss_0.item())
    assert grads.keys() == grads_0.keys() and grads
    diff = sum(float(((grads[n] - grads_0[n]).double() ** 2).sum()) for n in grads) ** 0.5
    norm = sum(float((g.double() ** 2).sum()) for g in grads_0.values()) ** 0.5
    assert diff <= rel * norm, f"gradient differs by {diff / norm:.3g} of its norm"
    for name in grads:
        worst = float((grads[name] - grads_0[name]).abs().max())
        assert worst <= 1e-3 * max(float(grads_0[name].abs().max()), 1e-30), name
    assert metrics.keys() == metrics_0.keys()
    for name, value in metrics_0.items():
        assert abs(metrics[name] - value) <= 1e-4 * max(1.0, abs(value)), (name, metrics[name], value)


def _engine_vs_trl_head(trainer, batch, num_items=None):
    """The engine path equals the TRL-head path; returns the engine's calls (scored tokens per call)."""
    before = _run(trainer, batch, engine=False, num_items=num_items)
    assert before[3] == []  # the TRL-head path never calls the engine
    after = _run(trainer, batch, engine=True, num_items=num_items)
    _assert_same(after, before)
    return after[3]


METHOD_CASES = [
    ("sft", {}),
    ("sft", {"completion_only_loss": False}),
    ("dft", {}),
    ("asft_anchored", {"asft_kl_coef": 0.5}),
    ("asft_anchored", {"asft_kl_coef": 0.5, "kl_direction": "policy_to_base"}),
    ("poft", {"poft_beta": 2.0, "poft_gamma": 0.1}),
    ("poft", {"poft_target_tokens": "all"}),
]


def test_every_registered_method_is_covered():
    import posttrain.families.sft.methods  # noqa: F401  (registers every objective)
    from posttrain.families.sft.forward import SFT_LOSSES

    assert {m for m, _ in METHOD_CASES} == set(SFT_LOSSES.names())


@pytest.mark.parametrize("method,params", METHOD_CASES,
                         ids=["sft", "sft-all-tokens", "dft", "asft", "asft-policy-to-base", "poft", "poft-all"])
def test_engine_equals_the_trl_head_path_for_every_method(arith_model_dir, tiny_model_dir, tmp_path, method, params):
    anchor = tiny_model_dir if method == "asft_anchored" else None  # another model: the KL is not zero
    trainer, batch = _trainer(arith_model_dir, tmp_path, method, params, anchor_dir=anchor)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    for num_items in (None, 2 * labelled):
        calls = _engine_vs_trl_head(trainer, batch, num_items)
        # the policy (and the anchor) scored the label positions only
        assert calls == [labelled] * (2 if anchor else 1)
    if not params.get("completion_only_loss", True) or params.get("poft_target_tokens") == "all":
        assert labelled > (batch["attention_mask"].sum() - 2 * BATCH)  # the prompt tokens are scored too


@pytest.mark.parametrize("method", ["sft", "dft", "asft_anchored"])
def test_conversational_rows_assistant_turns_only(arith_model_dir, tiny_model_dir, tmp_path, method):
    anchor = tiny_model_dir if method == "asft_anchored" else None
    trainer, batch = _trainer(arith_model_dir, tmp_path, method, anchor_dir=anchor, data="chat")
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < int(batch["attention_mask"].sum()) // 4  # two short assistant turns per row
    assert _engine_vs_trl_head(trainer, batch)[-1] == labelled


@pytest.mark.parametrize("method", ["sft", "asft_anchored"])
def test_lora_and_the_adapter_disabled_anchor(arith_model_dir, tmp_path, method):
    trainer, batch = _trainer(arith_model_dir, tmp_path, method, {"asft_kl_coef": 0.5} if method != "sft" else {},
                              lora=True)
    before = _run(trainer, batch, engine=False)
    assert before[1] and all("lora" in n for n in before[1])
    if method == "asft_anchored":  # init_lora_weights=False: the adapter moves the policy off its base
        assert before[2]["kl"] > 1e-6
    _assert_same(_run(trainer, batch, engine=True), before)


def test_goat_balance_loss(arith_model_dir, tmp_path):
    """GOAT's balance loss counts the routed tokens of the body, which runs the same rows on both paths."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.adapters.trainer import make_trainer
    from posttrain.families.sft.config import SFTFamilyConfig
    from posttrain.families.sft.trainer import PosttrainSFTTrainer
    from posttrain.methods import METHODS
    from posttrain.recipe import load_recipe
    from posttrain.trainers.common import peft_config

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": "builtin:tiny-qwen2-arith", "method": {"name": "sft"}, "output_dir": str(tmp_path / "out"),
        "data": {"train": {"source": "builtin:arithmetic-sft"}},
        "peft": {"type": "goat", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                 "goat": {"num_experts": 4, "top_k": 2, "aux_coef": 0.1}}}))
    recipe = load_recipe(path)
    torch.manual_seed(0)
    args = SFTFamilyConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                           per_device_train_batch_size=BATCH, max_length=64, seed=0)
    trainer = make_trainer(PosttrainSFTTrainer, recipe, model=AutoModelForCausalLM.from_pretrained(arith_model_dir),
                           args=args, train_dataset=_plain(), processing_class=AutoTokenizer.from_pretrained(
                               arith_model_dir), peft_config=peft_config(recipe), method="sft",
                           params=METHODS["sft"].params())
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert _engine_vs_trl_head(trainer, batch)
    with_aux = _run(trainer, batch, engine=True)[0]
    trainer.goat_aux_coef = 0.0
    assert abs(with_aux - _run(trainer, batch, engine=True)[0]) > 1e-6  # the balance loss was in the loss compared


@pytest.mark.parametrize("method", ["dft", "poft"])
def test_gradient_accumulation_two_micro_batches_equal_one(arith_model_dir, tmp_path, method):
    trainer, batch = _trainer(arith_model_dir, tmp_path, method)
    token_sum = trainer.objective.token_sum_loss
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    whole = _run(trainer, batch, engine=False, num_items=labelled if token_sum else None)
    losses, grads = [], None
    for part in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
        micro = {k: v[part] for k, v in batch.items()}
        # as HF: a token sum over the accumulated step's label count, or a per-micro-batch mean HF divides by the steps
        loss, g, _, _ = _run(trainer, micro, engine=True, num_items=labelled if token_sum else None)
        losses.append(loss if token_sum else loss / 2)
        g = g if token_sum else {n: v / 2 for n, v in g.items()}
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
    assert abs(sum(losses).item() - whole[0].item()) <= REL * abs(whole[0].item())
    diff = sum(float(((grads[n] - whole[1][n]).double() ** 2).sum()) for n in grads) ** 0.5
    norm = sum(float((g.double() ** 2).sum()) for g in whole[1].values()) ** 0.5
    assert diff <= REL * norm


@pytest.mark.parametrize("method", ["sft", "asft_anchored"])
def test_padding_free_rows(arith_model_dir, tiny_model_dir, tmp_path, method):
    """TRL's padding-free collation (one packed row, positions restarting at each sequence): the engine equals the
    TRL-head path and the padded batch."""
    anchor = tiny_model_dir if method == "asft_anchored" else None
    padded, padded_batch = _trainer(arith_model_dir, tmp_path / "padded", method, anchor_dir=anchor)
    free, batch = _trainer(arith_model_dir, tmp_path / "free", method, anchor_dir=anchor, padding_free=True,
                           max_length=None)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    calls = _engine_vs_trl_head(free, batch)
    assert calls[-1] == int((padded_batch["labels"][:, 1:] != -100).sum())
    _assert_same(_run(free, batch, engine=True), _run(padded, padded_batch, engine=True))


def test_trl_metrics_equal_stock_trl(tiny_model_dir, tmp_path):
    """loss, entropy, mean_token_accuracy and num_tokens as stock ``SFTTrainer`` logs them."""
    from trl import SFTConfig, SFTTrainer

    ours, batch = _trainer(tiny_model_dir, tmp_path / "ours", "sft")
    args = SFTConfig(output_dir=str(tmp_path / "stock"), report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=BATCH, max_length=64, seed=0)
    stock = SFTTrainer(model=copy.deepcopy(ours.model), args=args, train_dataset=_plain(),
                       processing_class=ours.processing_class)
    stock.model.train()
    for _ in range(2):  # num_tokens accumulates over steps
        loss_stock = stock.compute_loss(stock.model, dict(batch))
        loss_ours = ours.compute_loss(ours.model, dict(batch))
    torch.testing.assert_close(loss_ours, loss_stock, rtol=REL, atol=0)
    m_stock, m_ours = stock._metrics["train"], ours._metrics["train"]
    assert m_ours["num_tokens"] == m_stock["num_tokens"] == [2 * int(batch["attention_mask"].sum())]
    for name in ("entropy", "mean_token_accuracy"):
        assert m_ours[name] == pytest.approx(m_stock[name], rel=1e-5), name


def test_recipe_key_is_checked_and_liger_refused_before_the_model_loads(tmp_path):
    import yaml

    from posttrain.errors import UserError
    from posttrain.families.base import FAMILIES
    from posttrain.methods import METHODS
    from posttrain.recipe import load_recipe
    from posttrain.recipe.training_args import check_training
    from posttrain.registry import load

    assert check_training({"logprob_head": "chunked"}, "sft") == {"logprob_head": "chunked"}
    with pytest.raises(UserError, match=r"^training.logprob_head: expected one of 'auto', 'chunked', 'fused', "
                                        r"'liger', got 'triton'$"):
        check_training({"logprob_head": "triton"}, "sft")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": "builtin:tiny-qwen2", "method": {"name": "dft"}, "output_dir": str(tmp_path / "out"),
        "data": {"train": {"source": "builtin:arithmetic-sft"}}, "training": {"logprob_head": "liger"}}))
    with pytest.raises(UserError, match="^training.logprob_head: liger cannot run here: liger-kernel runs on CUDA"):
        load(FAMILIES["sft"].build_config)(load_recipe(path), METHODS["dft"])


def test_fallback_to_the_trl_head_is_logged_once(arith_model_dir, tmp_path, caplog):
    from posttrain.logprobs import engine as E

    trainer, batch = _trainer(arith_model_dir, tmp_path, "sft")
    assert trainer._uses_engine(batch)
    line = ("log-prob engine off: the batch carries pixel_values; TRL's fused head scores every position (same "
            "losses, no saving)")
    E._LOGGED.discard(line)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        for _ in range(2):
            assert not trainer._uses_engine({**batch, "pixel_values": torch.zeros(1)})
    assert [r.getMessage() for r in caplog.records if "engine off" in r.getMessage()] == [line]
    trainer.aux_loss_enabled = True  # a MoE router aux loss needs the causal LM's own forward
    assert not trainer._uses_engine(batch)


def test_anchor_kl_off_the_engine_is_refused_on_sharded_backends(arith_model_dir, tmp_path, monkeypatch):
    """Off the engine (router aux loss, extra model inputs) the anchor KL projects the head after the forward: refused
    under ZeRO-3 / FSDP2 with one line, kept under ddp and for methods without the KL."""
    from posttrain.errors import UserError
    from posttrain.families.sft import trainer as T

    trainer, batch = _trainer(arith_model_dir, tmp_path, "asft_anchored", anchor_dir=arith_model_dir)
    extra = {**batch, "pixel_values": torch.zeros(1)}
    for backend in ("zero3", "fsdp2"):
        monkeypatch.setattr(T, "backend_name", lambda accelerator, b=backend: b)
        with pytest.raises(UserError, match=rf"^method: the anchor KL cannot run with --distributed {backend} here: "
                                            "the batch carries pixel_values"):
            trainer._uses_engine(extra)
        assert trainer._uses_engine(batch)  # on the engine the KL runs inside the forward: no refusal
    monkeypatch.setattr(T, "backend_name", lambda accelerator: "ddp")
    assert not trainer._uses_engine(extra)
    dft, _ = _trainer(arith_model_dir, tmp_path / "dft", "dft")
    monkeypatch.setattr(T, "backend_name", lambda accelerator: "zero3")
    dft.aux_loss_enabled = True
    assert not dft._uses_engine(batch)


def test_packed_rows(arith_model_dir, tmp_path):
    """``training.packing`` (best-fit decreasing into rows of ``max_length``, padding-free): engine = TRL head."""
    trainer, batch = _trainer(arith_model_dir, tmp_path, "dft", packing=True, packing_strategy="bfd", max_length=48)
    starts = int((batch["position_ids"] == 0).sum())
    assert "attention_mask" not in batch and starts > batch["input_ids"].shape[0]  # several sequences per row
    assert _engine_vs_trl_head(trainer, batch) == [int((batch["labels"][:, 1:] != -100).sum())]
