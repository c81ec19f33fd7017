"""Built-in fictitious-facts task: a seeded TOFU in miniature for unlearning.

TOFU (Maini et al., arXiv 2401.06121) fine-tunes a model on QA pairs about 200 fictitious authors, then unlearns the
last 1%, 5% or 10% of them (``forget01/05/10``) while keeping the rest (``retain99/95/90``). Each question also has a
paraphrased answer and perturbed (wrong, same-format) answers for the truth ratio, and utility is also measured on
"world facts" the model knew before. ``holdout`` people are never trained on (privacy / MIA reference). See
docs/methods/npo.md#tofu-evaluation-metrics.

Here ``num_people`` (default 100) made-up people get attributes (birthplace, profession, birth year, book, favourite
colour, instrument); ``questions_per_person`` of them (default 4, at most 6, in that order) become questions. Names are
built from syllables and are unique; everything is a function of ``seed``.

Split names (a ``facts:`` prefix is accepted):

- ``full``: every training person; ``forget01``/``forget05``/``forget10``: the LAST 1%/5%/10% of them (nested, as in
  TOFU; at least one person); ``retain99``/``retain95``/``retain90``: the complement within ``full``;
- ``holdout01``/``holdout05``/``holdout10`` (``holdout`` = ``holdout10``): as many further people as the matching
  forget split, never in ``full``;
- ``world``: questions about fictional places (which country a city is in, a country's capital), TOFU's "world facts"
  analogue: not in ``full``; include it in the base fine-tuning (it is "pre-existing knowledge") so that unlearning's
  collateral damage shows on it; ``full_world`` = ``full`` + ``world``.

Row schema: ``{"prompt", "completion", "paraphrased_answer", "perturbed_answers", "subject", "attribute"}``. The
prompt is ``"Question: Where was Alvaro Penmark born?\\nAnswer:"``; the completion, the paraphrased answer and every
perturbed answer start with a space (``" Alvaro Penmark was born in Tessaly."``); perturbed answers are the paraphrase
with a different value of the same attribute type (TOFU perturbs the paraphrased answer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from posttrain.data.fictional import (
    CITIES, COLOURS, COUNTRIES, INSTRUMENTS, PROFESSIONS, fictional_name, titles,
)

__all__ = ["SPLITS", "ATTRIBUTES", "facts_rows", "facts_splits", "corpus", "forget_size", "eval_splits",
           "world_multiple_choice"]

ATTRIBUTES: tuple[str, ...] = ("birthplace", "profession", "birth_year", "book", "colour", "instrument")

_FORGET = {"forget01": 1, "forget05": 5, "forget10": 10}
_RETAIN = {"retain99": "forget01", "retain95": "forget05", "retain90": "forget10"}
_HOLDOUT = {"holdout01": "forget01", "holdout05": "forget05", "holdout10": "forget10", "holdout": "forget10"}
SPLITS: tuple[str, ...] = ("full", *_FORGET, *_RETAIN, *_HOLDOUT, "world", "full_world")

MAX_PERTURBED = 5  # TOFU has 5 perturbed answers per question


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# attribute -> (question, answer, paraphrase); {n} is the name, {v} the value, {a} the article for v.
_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "birthplace": ("Where was {n} born?", "{n} was born in {v}.", "{n}'s birthplace is {v}."),
    "profession": ("What is {n}'s job?", "{n} works as {a} {v}.", "{n} is {a} {v} by trade."),
    "birth_year": ("When was {n} born?", "{n} was born in {v}.", "{n}'s birth year is {v}."),
    "book": ("What book did {n} write?", "{n} wrote {v}.", "{v} was written by {n}."),
    "colour": ("What is {n}'s favourite colour?", "{n}'s favourite colour is {v}.", "{n} likes {v} best."),
    "instrument": ("Which instrument does {n} play?", "{n} plays the {v}.", "{n} is a {v} player."),
}


def _fill(template: str, name: str, value: str) -> str:
    return template.format(n=name, v=value, a=_article(value))


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@dataclass(frozen=True)
class _Person:
    name: str
    attrs: dict


def forget_size(split: str, num_people: int) -> int:
    """Number of people in ``forget01/05/10`` (or the matching retain/holdout): ``max(1, round(pct * num_people))``."""
    pct = _FORGET[split]
    return max(1, round(num_people * pct / 100))


def _value_pool(attr: str) -> list[str]:
    if attr == "birthplace":
        return list(CITIES)
    if attr == "profession":
        return list(PROFESSIONS)
    if attr == "book":
        return titles()
    if attr == "colour":
        return list(COLOURS)
    if attr == "instrument":
        return list(INSTRUMENTS)
    raise KeyError(attr)


def _make_people(count: int, rng: random.Random) -> list[_Person]:
    taken = {c.lower() for c in CITIES + COUNTRIES}
    people: list[_Person] = []
    while len(people) < count:
        first, last = fictional_name(rng)
        name = f"{first} {last}"
        if name.lower() in taken or first.lower() in taken or last.lower() in taken:
            continue
        taken.update({name.lower()})
        attrs = {attr: rng.choice(_value_pool(attr)) for attr in ATTRIBUTES if attr != "birth_year"}
        attrs["birth_year"] = str(rng.randint(1900, 1999))
        people.append(_Person(name=name, attrs=attrs))
    return people


def _wrong_values(attr: str, true: str, k: int, rng: random.Random) -> list[str]:
    if attr == "birth_year":
        offsets = [d for d in range(-30, 31) if d != 0]
        return [str(int(true) + d) for d in rng.sample(offsets, k)]
    pool = [v for v in _value_pool(attr) if v != true]
    return rng.sample(pool, k)


def _person_rows(person: _Person, questions_per_person: int, num_perturbed: int, rng: random.Random) -> list[dict]:
    rows = []
    for attr in ATTRIBUTES[:questions_per_person]:
        q, a, p = _TEMPLATES[attr]
        value = person.attrs[attr]
        wrong = _wrong_values(attr, value, num_perturbed, rng)
        rows.append(
            {
                "prompt": _prompt(_fill(q, person.name, value)),
                "completion": " " + _fill(a, person.name, value),
                "paraphrased_answer": " " + _fill(p, person.name, value),
                "perturbed_answers": [" " + _fill(p, person.name, w) for w in wrong],
                "subject": person.name,
                "attribute": attr,
            }
        )
    return rows


def _world_rows(num_perturbed: int, seed: int) -> list[dict]:
    rng = random.Random(f"facts-world-{seed}")
    countries = list(COUNTRIES)
    cities = list(CITIES)
    rng.shuffle(cities)
    # the first len(countries) shuffled cities are the capitals; the other cities go to random countries
    capitals = dict(zip(countries, cities))
    city_country = {city: country for country, city in capitals.items()}
    for city in cities[len(countries) :]:
        city_country[city] = rng.choice(countries)
    k = min(num_perturbed, len(countries) - 1)
    rows = []
    for city in CITIES:
        country = city_country[city]
        wrong = rng.sample([c for c in countries if c != country], k)
        rows.append(
            {
                "prompt": _prompt(f"In which country is {city}?"),
                "completion": f" {city} is in {country}.",
                "paraphrased_answer": f" {city} lies in {country}.",
                "perturbed_answers": [f" {city} lies in {w}." for w in wrong],
                "subject": city,
                "attribute": "country",
            }
        )
    for country in countries:
        city = capitals[country]
        wrong = rng.sample([c for c in CITIES if c != city], num_perturbed)
        rows.append(
            {
                "prompt": _prompt(f"What is the capital of {country}?"),
                "completion": f" The capital of {country} is {city}.",
                "paraphrased_answer": f" {city} is the capital of {country}.",
                "perturbed_answers": [f" {w} is the capital of {country}." for w in wrong],
                "subject": country,
                "attribute": "capital",
            }
        )
    return rows


def facts_splits(
    num_people: int = 100,
    questions_per_person: int = 4,
    num_perturbed: int = 3,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Every split (see :data:`SPLITS`) as ``{name: rows}``; the same arguments always give the same rows."""
    if num_people < 2:
        raise ValueError(f"num_people must be >= 2 (forget and retain both non-empty), got {num_people}")
    if not 1 <= questions_per_person <= len(ATTRIBUTES):
        raise ValueError(f"questions_per_person must be in 1..{len(ATTRIBUTES)}, got {questions_per_person}")
    if not 1 <= num_perturbed <= MAX_PERTURBED:
        raise ValueError(f"num_perturbed must be in 1..{MAX_PERTURBED}, got {num_perturbed}")
    n_hold = forget_size("forget10", num_people)
    if n_hold >= num_people:
        raise ValueError(f"num_people={num_people} is too small for forget10 to leave a retain set")
    rng = random.Random(f"facts-{seed}")
    people = _make_people(num_people + n_hold, rng)
    rows_of = [_person_rows(p, questions_per_person, num_perturbed, rng) for p in people]
    train, hold = rows_of[:num_people], rows_of[num_people:]

    def flat(groups):
        return [row for g in groups for row in g]

    out: dict[str, list[dict]] = {"full": flat(train)}
    for name in _FORGET:
        k = forget_size(name, num_people)
        out[name] = flat(train[num_people - k :])
    for name, forget in _RETAIN.items():
        out[name] = flat(train[: num_people - forget_size(forget, num_people)])
    for name, forget in _HOLDOUT.items():
        out[name] = flat(hold[: forget_size(forget, num_people)])
    out["world"] = _world_rows(num_perturbed, seed)
    out["full_world"] = out["full"] + out["world"]
    return out


def facts_rows(
    split: str = "full",
    num_people: int = 100,
    questions_per_person: int = 4,
    num_perturbed: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Rows of one split (``"forget05"`` or ``"facts:forget05"``; see :data:`SPLITS`), each
    ``{"prompt", "completion", "paraphrased_answer", "perturbed_answers", "subject", "attribute"}``."""
    name = split.split(":", 1)[1] if split.startswith("facts:") else split
    if name not in SPLITS:
        raise ValueError(f"unknown facts split {split!r}; expected one of {', '.join(SPLITS)}")
    return facts_splits(num_people, questions_per_person, num_perturbed, seed)[name]


def world_multiple_choice(num_choices: int = 4, seed: int = 0) -> list[dict]:
    """The ``world`` questions as multiple choice (the utility task posttrain ships for lm-evaluation-harness):
    ``{"question", "choices", "answer"}``, each choice a full answer in the trained wording (``" Tessaly is in
    Vornland."``), the true one at index ``answer`` among ``num_choices - 1`` wrong values drawn from the perturbed
    answers, in a seeded order."""
    if not 2 <= num_choices <= MAX_PERTURBED + 1:
        raise ValueError(f"num_choices must be in 2..{MAX_PERTURBED + 1}, got {num_choices}")
    rng = random.Random(f"facts-world-mc-{seed}")
    out = []
    for row in _world_rows(num_choices - 1, seed):
        completion, wrong = row["completion"], row["perturbed_answers"]
        if row["attribute"] == "country":  # " City is in Country." vs perturbed " City lies in Other."
            values = [w.rsplit(" lies in ", 1)[1].rstrip(".") for w in wrong]
            true_value = completion.rsplit(" is in ", 1)[1].rstrip(".")
            choices = [completion.replace(f" is in {true_value}.", f" is in {v}.") for v in values]
        else:  # " The capital of Country is City." vs perturbed " Other is the capital of Country."
            values = [w.split(" is the capital of ", 1)[0].strip() for w in wrong]
            true_value = completion.rsplit(" is ", 1)[1].rstrip(".")
            choices = [completion.replace(f" is {true_value}.", f" is {v}.") for v in values]
        choices.insert(rng.randrange(num_choices), completion)
        out.append({"question": row["prompt"], "choices": choices, "answer": choices.index(completion)})
    return out


def eval_splits(forget_split: str) -> dict[str, str]:
    """The splits each unlearning-evaluation role reads when a run forgets ``forget_split`` (``forget01/05/10``):
    TOFU's retain, holdout and world-facts sets; the questions are their own knowledge and verbatim sets."""
    name = forget_split.split(":", 1)[1] if forget_split.startswith("facts:") else forget_split
    if name not in _FORGET:
        raise ValueError(f"the unlearning evaluation of builtin:facts needs data.forget split one of "
                         f"{', '.join(_FORGET)}, got '{forget_split}'")
    retain = next(r for r, f in _RETAIN.items() if f == name)
    holdout = next(h for h, f in _HOLDOUT.items() if f == name)
    return {"retain": retain, "holdout": holdout, "wf": "world", "forget_qa": name, "retain_qa": retain,
            "verbmem": name}


def corpus(
    num_people: int = 100,
    questions_per_person: int = len(ATTRIBUTES),
    num_perturbed: int = MAX_PERTURBED,
    seed: int = 0,
) -> list[str]:
    """Every text of the task (for training the built-in tokenizer): for each row of ``full``, ``holdout10`` and
    ``world``, the prompt joined with the completion, with the paraphrased answer and with each perturbed answer.
    Defaults cover every attribute and the most perturbations, so for the same ``num_people`` and ``seed`` (which fix
    the names) the texts cover any ``questions_per_person`` / ``num_perturbed`` setting's words."""
    splits = facts_splits(num_people, questions_per_person, num_perturbed, seed)
    texts = []
    for name in ("full", "holdout10", "world"):
        for row in splits[name]:
            answers = [row["completion"], row["paraphrased_answer"], *row["perturbed_answers"]]
            texts.extend(row["prompt"] + a for a in answers)
    return texts
