"""Against the peer: our SFT-family trainer vs stock TRL on the same model and batch, and TRL's pinned internals."""

import copy
import inspect

import pytest
import torch


def _trainers(model_dir, tmp_path, method, params=None, loss_type="nll", **overrides):
    from trl import SFTConfig, SFTTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.sources import load_source
    from posttrain.methods import METHODS
    from posttrain.recipe import DataSource
    from posttrain.families.sft.trainer import PosttrainSFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = load_source(DataSource(source="builtin:arithmetic-sft", options={"num_samples": 16}), "data.train", "sft")
    kw = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=8,
              gradient_checkpointing=False, max_length=64, **overrides)
    stock = SFTTrainer(model=copy.deepcopy(model), args=SFTConfig(loss_type=loss_type, **kw), train_dataset=ds,
                       processing_class=tok)
    ours = PosttrainSFTTrainer(model=copy.deepcopy(model), args=SFTConfig(**kw), train_dataset=ds,
                               processing_class=tok, method=method,
                               params=params or METHODS[method].params())
    batch = next(iter(stock.get_train_dataloader()))
    stock.model.train()
    ours.model.train()
    return stock, ours, batch


@pytest.mark.parametrize("method,loss_type", [("dft", "dft"), ("sft", "nll")])
def test_loss_and_grads_match_stock_trl(tiny_model_dir, tmp_path, method, loss_type):
    stock, ours, batch = _trainers(tiny_model_dir, tmp_path, method, loss_type=loss_type)
    for num_items in (None, 37):
        l_stock = stock.compute_loss(stock.model, dict(batch), num_items_in_batch=num_items)
        l_ours = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=num_items)
        torch.testing.assert_close(l_ours, l_stock, atol=1e-6, rtol=1e-6)
    stock.model.zero_grad()
    ours.model.zero_grad()
    stock.compute_loss(stock.model, dict(batch)).backward()
    ours.compute_loss(ours.model, dict(batch)).backward()
    for (name, p_stock), p_ours in zip(stock.model.named_parameters(), ours.model.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_stock.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_asft_anchored_at_init_equals_dft_and_kl_is_zero(tiny_model_dir, tmp_path):
    """With the anchor equal to the policy, KL is 0 and the ASFT loss equals TRL's DFT loss docs/methods/asft_anchored.md#objective."""
    from transformers import AutoModelForCausalLM

    from posttrain.methods import ASFTAnchoredParams

    stock, ours, batch = _trainers(tiny_model_dir, tmp_path, "asft_anchored", ASFTAnchoredParams(asft_kl_coef=0.1),
                                   loss_type="dft")
    ours.anchor_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    l_stock = stock.compute_loss(stock.model, dict(batch))
    l_ours = ours.compute_loss(ours.model, dict(batch))
    torch.testing.assert_close(l_ours, l_stock, atol=1e-6, rtol=1e-6)
    assert abs(ours._metrics["train"]["kl"][-1]) < 1e-6


def test_trl_internals_we_subclass_are_where_we_expect():
    """Fails loudly when the pinned TRL moves the internals posttrain's trainers rely on."""
    import trl
    from trl import SFTTrainer
    from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

    major_minor = tuple(int(x) for x in trl.__version__.split(".")[:2])
    assert major_minor == (1, 16), f"posttrain is pinned to TRL 1.16.x, found {trl.__version__}"
    sig = inspect.signature(SFTTrainer.compute_loss)
    assert list(sig.parameters)[:5] == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    assert "outputs" in inspect.signature(add_fused_lm_head).parameters
    for field in ("log_probs", "entropy", "is_top1", "label_mask"):
        assert field in FusedCausalLMOutput.__dataclass_fields__
    assert hasattr(SFTTrainer, "_set_signature_columns_if_needed")
    src = inspect.getsource(SFTTrainer.__init__)
    assert "self._metrics" in src and "add_fused_lm_head" in src
