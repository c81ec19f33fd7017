"""The unlearning family's registered objectives: each is a forget term plus a retain term (``terms/``, one file each),
and whether it reads the retain set or a frozen reference follows from those terms (docs/methods/npo.md#objectives,
docs/methods/rmu.md#objective)."""

import pytest

from posttrain.families.unlearning.objective import (
    FORGET_ACTIVATIONS,
    FORGET_LOGPS,
    FORGET_REF_LOGPS,
    FORGET_TERMS,
    REFERENCE_NEEDS,
    RETAIN_ACTIVATIONS,
    RETAIN_KL,
    RETAIN_TERMS,
    UNLEARNING_NEEDS,
    UNLEARNING_OBJECTIVES,
    ObjectiveWeights,
    uses_reference,
    uses_retain,
)
from posttrain.methods import METHODS


def test_every_objective_names_registered_terms():
    assert set(FORGET_TERMS.names()) == {"ga", "npo", "simnpo", "rmu"}
    assert set(RETAIN_TERMS.names()) == {"nll", "kl", "activations"}
    for entry in UNLEARNING_OBJECTIVES:
        assert entry.forget in FORGET_TERMS
        assert entry.retain is None or entry.retain in RETAIN_TERMS
    assert {n for n, i in METHODS.items() if i.family == "unlearning"} == {
        e.name for e in UNLEARNING_OBJECTIVES if e.recipe_method}


def _params(name, **overrides):
    """The params of objective ``name`` (``ga_kl``, not a recipe method, takes GradDiff's: gamma and alpha)."""
    return METHODS["grad_diff" if name == "ga_kl" else name].params(**overrides)


@pytest.mark.parametrize("name, retain, reference", [
    ("ga", False, False), ("grad_diff", True, False), ("ga_kl", True, True), ("npo", False, True),
    ("npo_rt", True, True), ("npo_kl", True, True), ("simnpo", True, False), ("rmu", True, True),
])
def test_retain_set_and_reference_follow_from_the_declared_needs(name, retain, reference):
    params = _params(name)
    assert uses_retain(name, params) is retain
    assert uses_reference(name, params) is reference
    if "alpha" in type(params).model_fields:
        # alpha 0 drops the retain term, and with it the reference a retain term alone needed (KL, activations)
        params = _params(name, alpha=0.0)
        forget_needs = FORGET_TERMS[UNLEARNING_OBJECTIVES[name].forget].needs
        assert uses_retain(name, params) is False
        assert uses_reference(name, params) is bool(forget_needs & REFERENCE_NEEDS)


def test_every_objective_declares_the_needs_of_its_terms():
    for entry in UNLEARNING_OBJECTIVES:
        forget = FORGET_TERMS[entry.forget].needs
        retain = RETAIN_TERMS[entry.retain].needs if entry.retain is not None else frozenset()
        assert forget and (forget | retain) <= UNLEARNING_NEEDS, entry.name
        assert entry.needs(_params(entry.name)) == forget | retain, entry.name
        if retain:
            assert entry.needs(_params(entry.name, alpha=0.0)) == forget, entry.name
    assert UNLEARNING_OBJECTIVES["npo_kl"].needs(_params("npo_kl")) == {FORGET_LOGPS, FORGET_REF_LOGPS, RETAIN_KL}
    assert UNLEARNING_OBJECTIVES["rmu"].needs(_params("rmu")) == {FORGET_ACTIVATIONS, RETAIN_ACTIVATIONS}


def test_the_params_give_the_objective_weights():
    assert METHODS["ga"].params(gamma=2.0).objective_weights() == ObjectiveWeights(gamma=2.0)
    assert METHODS["npo"].params().objective_weights() == ObjectiveWeights(gamma=1.0, beta=0.1)
    assert METHODS["npo_kl"].params(alpha=0.5).objective_weights() == ObjectiveWeights(gamma=1.0, alpha=0.5, beta=0.1)
    assert METHODS["simnpo"].params(delta=0.5).objective_weights() == ObjectiveWeights(0.125, 1.0, 4.5, 0.5)
    assert METHODS["rmu"].params(alpha=3.0).objective_weights() == ObjectiveWeights(gamma=1.0, alpha=3.0)


def test_the_params_ask_what_the_trainer_reads():
    ga, npo_kl = METHODS["ga"].params(), METHODS["npo_kl"].params(alpha=0.5, retain_kl_mask="none")
    assert ga.retain_weight == 0.0 and not ga.uses_weight_mask and not ga.retain_kl_every_position
    assert npo_kl.retain_weight == 0.5 and npo_kl.retain_kl_every_position
    assert METHODS["npo"].params(mask="wagle", mask_sparsity=0.5).uses_weight_mask


def test_objectives_are_pure_functions_of_params_and_forward():
    import torch

    from posttrain.families.unlearning.objective import UnlearningForward

    # forget rows [-1, -2] and [-0.5] (docs/methods/ga.md#how-it-is-tested: token-mean log-prob -1.166667); retain rows
    # with token-mean NLL 0.4
    fwd = UnlearningForward(forget_logps=torch.tensor([[-1.0, -2.0], [-0.5, -7.0]]),
                            forget_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
                            retain_logps=torch.tensor([[-0.2, -0.4, -0.6]]), retain_mask=torch.ones(1, 3))
    ga = UNLEARNING_OBJECTIVES["ga"].fn(METHODS["ga"].params(gamma=2.0), fwd)
    assert ga.loss.item() == pytest.approx(2 * -3.5 / 3, abs=1e-6) and ga.retain_loss is None
    gd = UNLEARNING_OBJECTIVES["grad_diff"].fn(METHODS["grad_diff"].params(alpha=0.5), fwd)
    assert gd.loss.item() == pytest.approx(-3.5 / 3 + 0.5 * 0.4, abs=1e-6)
    assert gd.metrics["retain_nll"] == pytest.approx(0.4)
