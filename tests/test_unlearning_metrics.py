"""TOFU metrics against docs/methods/npo.md#how-it-is-tested, and the fictitious-facts generator."""

import numpy as np
import pytest
import torch

from posttrain.data.facts import ATTRIBUTES, SPLITS, corpus, facts_rows, facts_splits, forget_size
from posttrain.eval.unlearning_metrics import (
    MODEL_UTILITY_KEYS,
    aggregate_truth_ratio,
    answer_probability,
    avg_answer_loss,
    forget_quality,
    mean_answer_probability,
    mean_rouge_l_recall,
    model_utility,
    normalised_probability,
    rouge_l_recall,
    rouge_recall,
    truth_ratios,
)

# metrics --------------------------------------------------------------------------------------------------------------


def test_avg_answer_loss_and_probability():
    logps = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    avg = avg_answer_loss(logps, mask)
    assert torch.allclose(avg, torch.tensor([1.5, 0.5]))
    np.testing.assert_allclose(answer_probability(avg), [0.223130, 0.606531], atol=1e-6)
    assert mean_answer_probability(avg) == pytest.approx(0.414830, abs=1e-6)
    assert mean_answer_probability([0.0, 0.0]) == 1.0


def test_truth_ratio_worked_example():
    para = [0.8, 1.2, 0.5]
    pert = [[1.0, 1.5, 1.3], [1.1, 1.0, 1.4], [2.0, 1.8, 2.2]]
    tr = truth_ratios(para, pert)
    np.testing.assert_allclose(tr, [0.627089, 1.033895, 0.223130], atol=1e-6)
    assert aggregate_truth_ratio(tr, "closer_to_1_better") == pytest.approx(0.605812, abs=1e-6)
    assert aggregate_truth_ratio(tr, "forget") == pytest.approx(0.605812, abs=1e-6)
    assert aggregate_truth_ratio(tr, "true_better") == pytest.approx(0.383260, abs=1e-6)
    assert aggregate_truth_ratio(tr, "retain") == pytest.approx(0.383260, abs=1e-6)
    # tensors are accepted too
    tr_t = truth_ratios(torch.tensor(para), torch.tensor(pert))
    np.testing.assert_allclose(tr_t, tr, atol=1e-6)
    with pytest.raises(ValueError):
        aggregate_truth_ratio(tr, "mean")


def test_truth_ratio_is_one_when_indifferent_and_forget_aggregate_at_most_one():
    tr = truth_ratios([0.7, 2.0], [[0.7, 0.7], [1.5, 2.5]])  # equal mean perturbed and paraphrased loss
    np.testing.assert_allclose(tr, [1.0, 1.0], atol=1e-8)
    assert aggregate_truth_ratio(tr, "forget") == pytest.approx(1.0, abs=1e-8)
    assert aggregate_truth_ratio(tr, "retain") == pytest.approx(0.0, abs=1e-8)
    rng = np.random.default_rng(0)
    for _ in range(5):
        tr = truth_ratios(rng.uniform(0, 3, 8), rng.uniform(0, 3, (8, 4)))
        assert aggregate_truth_ratio(tr, "forget") < 1.0


def test_normalised_probability_worked_example():
    p = normalised_probability([0.3, 0.9], [[1.0, 1.2, 0.8], [0.7, 1.5, 1.1]])
    np.testing.assert_allclose(p, [0.398456, 0.278633], atol=1e-6)
    assert float(np.mean(p)) == pytest.approx(0.338545, abs=1e-6)
    # one wrong option: exp(-1) / (exp(-1) + exp(-1)) = 0.5
    np.testing.assert_allclose(normalised_probability([1.0], [1.0]), [0.5], atol=1e-9)


def test_forget_quality_ks():
    retain = [0.65, 0.75, 0.85, 0.95, 1.05]
    assert forget_quality([0.5, 0.6, 0.7, 0.8, 0.9], retain) == pytest.approx(0.873016, abs=1e-6)
    assert forget_quality([0.1, 0.15, 0.2, 0.25, 0.3], retain) == pytest.approx(0.007937, abs=1e-6)  # 2/252
    assert forget_quality(retain, retain) == 1.0
    assert forget_quality([0.5, 0.6], None) is None
    # invariant to the 1/x transform of older TOFU code
    a = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    assert forget_quality(1 / a, 1 / np.array(retain)) == pytest.approx(0.873016, abs=1e-6)


def test_model_utility_harmonic_mean():
    vals = [0.30, 0.52, 0.61, 0.25, 0.70, 0.55, 0.40, 0.82, 0.58]
    assert model_utility(vals) == pytest.approx(0.459508, abs=1e-6)
    assert model_utility(dict(zip(MODEL_UTILITY_KEYS, vals))) == pytest.approx(0.459508, abs=1e-6)
    assert model_utility([0.5, 0.25]) == pytest.approx(1 / 3)  # 2 / (2 + 4)
    assert model_utility([0.5, 0.0, 0.9]) == 0.0
    assert len(MODEL_UTILITY_KEYS) == 9
    with pytest.raises(ValueError):
        model_utility([])


def test_rouge_recall():
    assert rouge_l_recall("the cat sat on the mat", "the cat is on a mat") == pytest.approx(4 / 6)
    # order matters for ROUGE-L (LCS 1 of 4), not for ROUGE-1
    assert rouge_recall("alpha beta gamma delta", "delta gamma beta alpha") == {
        "rouge1_recall": 1.0,
        "rougeL_recall": 0.25,
    }
    # Porter stemming: cats -> cat, running -> run; LCS 2 of 4 gold tokens
    assert rouge_l_recall("the cats were running", "cat run") == pytest.approx(0.5)
    assert rouge_l_recall("Tessaly", "Tessaly") == 1.0
    golds = ["the cat sat on the mat", "the cats were running"]
    assert mean_rouge_l_recall(golds, ["the cat is on a mat", "cat run"]) == pytest.approx((4 / 6 + 0.5) / 2)
    with pytest.raises(ValueError):
        mean_rouge_l_recall(golds, ["x"])


# facts generator ------------------------------------------------------------------------------------------------------


def subjects(rows):
    return {r["subject"] for r in rows}


def test_facts_default_sizes_and_schema():
    s = facts_splits()
    assert set(s) == set(SPLITS)
    sizes = {name: len(rows) for name, rows in s.items()}
    assert sizes == {
        "full": 400, "forget01": 4, "forget05": 20, "forget10": 40,
        "retain99": 396, "retain95": 380, "retain90": 360,
        "holdout01": 4, "holdout05": 20, "holdout10": 40, "holdout": 40,
        "world": 24, "full_world": 424,
    }  # fmt: skip
    assert len(subjects(s["full"])) == 100
    for row in s["full"] + s["holdout"] + s["world"]:
        assert set(row) == {"prompt", "completion", "paraphrased_answer", "perturbed_answers", "subject", "attribute"}
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("?\nAnswer:")
        assert row["completion"].startswith(" ") and row["completion"].endswith(".")
        assert len(row["completion"].split()) <= 8
        assert len(row["perturbed_answers"]) == 3
    assert {r["attribute"] for r in s["full"]} == set(ATTRIBUTES[:4])


def test_facts_example_row_format():
    row = facts_rows("facts:forget01")[0]
    name = row["subject"]
    assert row["attribute"] == "birthplace"
    assert row["prompt"] == f"Question: Where was {name} born?\nAnswer:"
    place = row["completion"].removeprefix(f" {name} was born in ").removesuffix(".")
    assert row["completion"] == f" {name} was born in {place}."
    assert row["paraphrased_answer"] == f" {name}'s birthplace is {place}."


def test_facts_splits_disjoint_nested_and_complementary():
    s = facts_splits()
    full = subjects(s["full"])
    for forget, retain in [("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")]:
        f, r = subjects(s[forget]), subjects(s[retain])
        assert not f & r and f | r == full
        assert len(f) == forget_size(forget, 100)
        assert sorted(s[forget] + s[retain], key=repr) == sorted(s["full"], key=repr)
    assert subjects(s["forget01"]) < subjects(s["forget05"]) < subjects(s["forget10"])
    # forget sets are the last people of full, as in TOFU
    assert s["forget10"] == s["full"][-40:]
    hold = subjects(s["holdout"])
    assert len(hold) == 10 and not hold & full
    assert subjects(s["holdout01"]) < subjects(s["holdout05"]) < subjects(s["holdout10"])
    assert not subjects(s["world"]) & (full | hold)
    assert s["full_world"] == s["full"] + s["world"]
    # every name is unique and prompts are unique
    prompts = [r["prompt"] for r in s["full"] + s["holdout"] + s["world"]]
    assert len(prompts) == len(set(prompts))


def test_facts_perturbed_answers_are_wrong_and_distinct():
    s = facts_splits(num_perturbed=5, questions_per_person=6)
    for row in s["full"] + s["holdout"] + s["world"]:
        perts = row["perturbed_answers"]
        assert len(perts) == 5 and len(set(perts)) == 5
        assert row["paraphrased_answer"] not in perts and row["completion"] not in perts
        assert row["paraphrased_answer"] != row["completion"]


def test_facts_deterministic_under_seed_and_configurable():
    assert facts_splits(seed=3) == facts_splits(seed=3)
    assert facts_rows("full", seed=3) != facts_rows("full", seed=4)
    assert facts_rows("forget05", seed=1) == facts_splits(seed=1)["forget05"]
    small = facts_splits(num_people=20, questions_per_person=6, num_perturbed=2)
    assert len(small["full"]) == 120
    # 1% and 5% of 20 people round to 0 and 1: at least one person; 10% = 2 people
    assert [len(subjects(small[k])) for k in ("forget01", "forget05", "forget10")] == [1, 1, 2]
    assert len(subjects(small["holdout"])) == 2
    assert {r["attribute"] for r in small["full"]} == set(ATTRIBUTES)
    with pytest.raises(ValueError, match="unknown facts split"):
        facts_rows("facts:forget20")
    with pytest.raises(ValueError):
        facts_splits(questions_per_person=7)
    with pytest.raises(ValueError):
        facts_splits(num_perturbed=0)


def test_facts_corpus_covers_every_text():
    texts = corpus()
    assert texts == corpus()
    s = facts_splits()
    text_set = set(texts)
    for row in s["full"] + s["holdout"] + s["world"]:
        assert row["prompt"] + row["completion"] in text_set
        assert row["prompt"] + row["paraphrased_answer"] in text_set
    # 100 + 10 people x 6 questions + 24 world questions, each with 1 + 1 + 5 answers
    assert len(texts) == (110 * 6 + 24) * 7
