"""Rows of the ``posttrain_news_retain`` lm-evaluation-harness task (``custom_dataset`` of its YAML next to this
file): the questions about the retain articles of ``builtin:news`` as 4-way multiple choice, a utility benchmark for
unlearning on news that needs no download."""

from __future__ import annotations

import random


def multiple_choice(split: str = "retain_qa", num_choices: int = 4, seed: int = 0) -> list[dict]:
    """The questions of ``builtin:news`` split ``split`` as ``{"question", "choices", "answer"}``: each choice a full
    answer in the trained wording (``" The harp."``), the true one at index ``answer`` among ``num_choices - 1``
    different answers to the same kind of question about other articles of the task, in a seeded order."""
    from posttrain.data.news import news_splits

    splits = news_splits()
    pool: dict[str, list[str]] = {}  # question kind (its first two words) -> every distinct answer of the task
    for row in splits["retain_qa"] + splits["forget_qa"] + splits["holdout_qa"]:
        answers = pool.setdefault(_kind(row["prompt"]), [])
        if row["completion"] not in answers:
            answers.append(row["completion"])
    if any(len(answers) < num_choices for answers in pool.values()):
        raise ValueError(f"num_choices must be at most {min(len(a) for a in pool.values())}, got {num_choices}")
    rng = random.Random(f"news-mc-{split}-{seed}")
    out = []
    for row in splits[split]:
        wrong = rng.sample([a for a in pool[_kind(row["prompt"])] if a != row["completion"]], num_choices - 1)
        wrong.insert(rng.randrange(num_choices), row["completion"])
        out.append({"question": row["prompt"], "choices": wrong, "answer": wrong.index(row["completion"])})
    return out


def _kind(prompt: str) -> str:
    """``"Question: Which instrument did ...?\\nAnswer:"`` -> ``"Which instrument"``."""
    return " ".join(prompt.removeprefix("Question: ").split()[:2])


def load(**kwargs):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(multiple_choice())})
