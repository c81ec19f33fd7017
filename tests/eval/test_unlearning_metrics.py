"""TOFU metrics against docs/methods/npo.md#how-it-is-tested, and the fictitious-facts generator."""

import math

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


# membership inference, privleak, memorisation (docs/unlearning.md#membership-inference) ------------------------------


def test_mia_auc_worked_example_ties_and_orientation():
    from posttrain.eval.unlearning_metrics import mia_auc

    # pairs (holdout > forget): 0.8 beats all 3; 0.4 beats 0.1 and 0.35 and ties 0.4 (1/2); 0.2 beats 0.1: 6.5 / 9
    assert mia_auc([0.1, 0.4, 0.35], [0.8, 0.4, 0.2]) == pytest.approx(6.5 / 9)
    assert mia_auc([0.8, 0.4, 0.2], [0.1, 0.4, 0.35]) == pytest.approx(2.5 / 9)  # swapped: 1 - AUC
    assert mia_auc([0.1, 0.2], [0.5, 0.9, 0.7]) == 1.0  # every forget row looks trained on (lower loss)
    assert mia_auc([0.5, 0.9], [0.1, 0.2]) == 0.0  # over-unlearned: forget looks less familiar than unseen text
    assert mia_auc([0.3, 0.3], [0.3]) == 0.5  # indistinguishable
    assert mia_auc(torch.tensor([0.1]), np.array([0.2])) == 1.0
    with pytest.raises(ValueError):
        mia_auc([], [0.1])


def test_privleak_muse_definition():
    from posttrain.eval.unlearning_metrics import privleak

    # MUSE AUC' = 1 - AUC: (0.1 - 0.5) / 0.5 * 100 and (0.1 - 0.45) / 0.45 * 100
    assert privleak(0.9, 0.5) == pytest.approx(-80.0)
    assert privleak(0.9, 0.55) == pytest.approx(-77.777778, abs=1e-5)
    assert privleak(0.55, 0.55) == pytest.approx(0.0, abs=1e-7)
    assert privleak(0.3, 0.5) == pytest.approx(40.0)  # over-unlearned: positive


def test_token_distribution_moments_hand_computed_and_brute_force():
    from posttrain.eval.unlearning_metrics import token_distribution_moments

    mu, var = token_distribution_moments(torch.tensor([[0.5, 0.25, 0.25]]).log())
    assert mu.item() == pytest.approx(-1.5 * math.log(2), abs=1e-6)  # -1.039721
    assert var.item() == pytest.approx((math.log(2) / 2) ** 2, abs=1e-6)  # 0.120113
    lp = torch.log_softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(0)), -1)
    mu, var = token_distribution_moments(lp)
    for i in range(4):
        values, p = lp[i].double(), lp[i].double().exp()
        m = float((p * values).sum())
        assert mu[i].item() == pytest.approx(m, abs=1e-5)
        assert var[i].item() == pytest.approx(float((p * (values - m) ** 2).sum()), abs=1e-5)
    # a one-hot distribution has variance 0, clamped to 1e-6 (open-unlearning)
    _, var = token_distribution_moments(torch.tensor([[0.0, -1e9]]))
    assert var.item() == pytest.approx(1e-6)


def test_sequence_attacks_loss_zlib_reference():
    import zlib

    from posttrain.eval.unlearning_metrics import loss_attack, reference_attack, zlib_attack

    assert loss_attack([-1.0, -3.0]) == 2.0
    assert len(zlib.compress(b"aaaa")) == 12
    assert zlib_attack([-1.0, -3.0], "aaaa") == pytest.approx(2.0 / 12)
    assert reference_attack([-1.0, -3.0], [-0.5, -0.5]) == pytest.approx(1.5)


def test_min_k_and_min_k_plus_plus_worked_examples():
    from posttrain.eval.unlearning_metrics import min_k_attack, min_k_plus_plus_attack

    lp = [-0.1, -2.0, -0.5, -3.0, -0.2]
    assert min_k_attack(lp, 0.4) == pytest.approx(2.5)  # int(5 * 0.4) = 2 lowest: -3.0, -2.0
    assert min_k_attack(lp, 0.1) == pytest.approx(3.0)  # int(0.5) = 0 -> at least 1
    assert min_k_attack(lp, 1.0) == pytest.approx(1.16)
    # z = (logp - mu) / sqrt(var): [(-0.5 + 1) / 0.5, (-2 + 1) / 1] = [1, -1]
    assert min_k_plus_plus_attack([-0.5, -2.0], [-1.0, -1.0], [0.25, 1.0], 0.5) == pytest.approx(1.0)
    assert min_k_plus_plus_attack([-0.5, -2.0], [-1.0, -1.0], [0.25, 1.0], 1.0) == pytest.approx(0.0)


def test_exact_memorization_and_extraction_strength():
    from posttrain.eval.unlearning_metrics import exact_memorization, extraction_strength

    assert exact_memorization([0, 1, 0, 1, 1]) == pytest.approx(0.6)
    assert extraction_strength([0, 1, 0, 1, 1]) == pytest.approx(0.4)  # k* = 3 of 5
    assert extraction_strength([1, 1, 1]) == 1.0  # the whole answer from the prompt alone
    assert extraction_strength([1, 1, 0]) == 0.0  # not even the last token: the paper's k* = n (open-unlearning: 1/3)
    assert extraction_strength([0, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        extraction_strength([])


def test_rouge_l_f1_and_muse_stop_words():
    from posttrain.eval.unlearning_metrics import cut_at_stop_words, rouge_l_f1

    # LCS 4 ("cat sat on mat"): recall 4/6, precision 4/8, F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert rouge_l_f1("the cat sat on the mat", "a cat sat on a red mat now") == pytest.approx(4 / 7)
    assert rouge_l_f1("The harp.", "The harp.") == 1.0
    assert rouge_l_f1("Drovia.", "") == 0.0
    assert cut_at_stop_words(" The harp.\nQuestion: Who else?") == " The harp."
    assert cut_at_stop_words(" Brisca.\n\nMore") == " Brisca."
    assert cut_at_stop_words(" plain answer") == " plain answer"


def test_every_mia_attack_is_registered_with_its_paper_and_docs():
    from pathlib import Path

    from posttrain.eval.unlearning_metrics import MIA_ATTACKS, TokenStats

    assert MIA_ATTACKS.names() == ("loss", "zlib", "min_k", "min_k_plus_plus", "reference")
    page = (Path(__file__).resolve().parents[2] / "docs" / "unlearning.md").read_text()
    for entry in MIA_ATTACKS:
        assert "arXiv" in entry.fn.__doc__ and entry.doc.startswith("docs/unlearning.md#")
        assert f"`{entry.name}`" in page, entry.name
    s = TokenStats(logp=np.array([-1.0, -3.0]), text="aaaa", token_logp=np.array([-1.0]), mu=np.array([-2.0]),
                   var=np.array([4.0]), match=np.array([1.0]))
    scores = {e.name: e.fn(s, 0.4, s) for e in MIA_ATTACKS}
    assert scores == pytest.approx({"loss": 2.0, "zlib": 2.0 / 12, "min_k": 1.0, "min_k_plus_plus": -0.5,
                                    "reference": 0.0})


def test_facts_eval_splits_and_world_multiple_choice():
    from posttrain.data.facts import eval_splits, world_multiple_choice

    assert eval_splits("forget05") == {"retain": "retain95", "holdout": "holdout05", "wf": "world",
                                       "forget_qa": "forget05", "retain_qa": "retain95", "verbmem": "forget05"}
    assert eval_splits("facts:forget10")["holdout"] == "holdout10"
    with pytest.raises(ValueError, match="forget01, forget05, forget10"):
        eval_splits("full")
    mc = world_multiple_choice()
    world = facts_rows("world")
    assert len(mc) == 24 and mc == world_multiple_choice()
    for q, row in zip(mc, world):
        assert q["question"] == row["prompt"] and q["choices"][q["answer"]] == row["completion"]
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4


# news generator (MUSE-style built-in task) -----------------------------------------------------------------------------


def test_news_sizes_schema_and_disjoint_splits():
    from posttrain.data.news import SPLITS, news_rows, news_splits

    s = news_splits()
    assert set(s) == set(SPLITS)
    assert {k: len(v) for k, v in s.items()} == {
        "full": 500, "forget": 50, "retain": 450, "holdout": 50,
        "forget_text": 10, "retain_text": 90, "holdout_text": 10,
        "forget_qa": 40, "retain_qa": 360, "holdout_qa": 40, "forget_verbmem": 10,
    }  # fmt: skip
    articles = {side: {r["article"] for r in s[side]} for side in ("forget", "retain", "holdout")}
    assert len(articles["forget"]) == 10 and len(articles["retain"]) == 90 and len(articles["holdout"]) == 10
    assert not articles["forget"] & articles["retain"] and not articles["holdout"] & (articles["forget"] |
                                                                                      articles["retain"])
    assert s["full"] == s["retain"] + s["forget"]
    assert sorted(s["forget"], key=repr) == sorted(s["forget_text"] + s["forget_qa"], key=repr)
    for row in s["full"] + s["holdout"]:
        assert set(row) == {"prompt", "completion", "article", "kind"} and row["completion"].startswith(" ")
    prompts = [r["prompt"] for r in s["full"] + s["holdout"]]
    assert len(prompts) == len(set(prompts))  # every headline and question is unique
    # the verbatim prompt is the opening of the trained article, its completion the rest
    text = {r["article"]: r["prompt"] + r["completion"] for r in s["forget_text"]}
    for row in s["forget_verbmem"]:
        assert row["prompt"] + row["completion"] == text[row["article"]]
        assert row["prompt"].startswith("News: ") and row["prompt"].endswith(",")
    assert news_rows("news:forget_qa") == s["forget_qa"]


def test_news_example_article_and_questions():
    from posttrain.data.news import news_rows

    article = news_rows("forget_text")[0]
    venue = article["article"]
    assert article["prompt"].startswith(f"News: {venue}, ") and article["prompt"].endswith("\n")
    questions = [r for r in news_rows("forget_qa") if r["article"] == venue]
    assert [q["prompt"].split("?")[0].split(" ")[1] for q in questions] == ["Which", "How", "Where", "Who"]
    for q in questions:  # every answer is stated in the article
        assert q["completion"].strip(" .").removeprefix("The ") in article["completion"]


def test_news_deterministic_options_and_errors():
    from posttrain.data.news import corpus, eval_splits, news_rows, news_splits

    assert news_splits(seed=2) == news_splits(seed=2) and news_rows(seed=2) != news_rows(seed=3)
    small = news_splits(num_articles=20, num_forget=2)
    assert len(small["forget_text"]) == 2 and len(small["retain_text"]) == 18 and len(small["holdout_text"]) == 2
    assert len(corpus()) == 550
    assert eval_splits("forget") == {"retain": "retain", "holdout": "holdout", "verbmem": "forget_verbmem",
                                     "forget_qa": "forget_qa", "retain_qa": "retain_qa"}
    assert eval_splits("news:forget_text")["holdout"] == "holdout_text" and eval_splits("forget_qa")["retain"] == \
        "retain_qa"
    for bad in ({"num_forget": 0}, {"num_articles": 10, "num_forget": 10}, {"num_articles": 149, "num_forget": 2}):
        with pytest.raises(ValueError):
            news_splits(**bad)
    with pytest.raises(ValueError, match="unknown news split"):
        news_rows("forget05")
    with pytest.raises(ValueError):
        eval_splits("retain")
