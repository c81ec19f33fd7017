"""Built-in fictitious-news task: a seeded MUSE-News in miniature for unlearning.

MUSE (Shi et al., arXiv 2407.06460) fine-tunes a model on a news corpus, then unlearns part of it (the forget
articles) and measures verbatim memorisation (how well the model continues the opening of a forget article),
knowledge memorisation (answers to questions about the forget articles vs the retain articles) and privacy leakage (a
membership-inference AUC between forget and holdout articles, compared with a model never trained on the forget set).
See docs/unlearning.md#the-muse-style-built-in-task-builtinnews.

Here ``num_articles`` (default 100) made-up concert reports each name a unique venue (``The Golden Harbor``) in a
city, a musician with a profession and a home town, the instrument played, the year, the size of the crowd, a witness
and a colour. The built-in tokenizer knows most of these words, so an article is about 60 tokens. Everything is a
function of ``seed``.

Article rows are ``{"prompt": "News: The Golden Harbor, Brisca\\n", "completion": " In 1957, Alvaro Penmark, a baker
from Tessaly, played the harp at The Golden Harbor in Brisca. About 412 people came. Mira Lodell wrote that the night
was blue."}``: the headline names the venue, the body is what the model memorises. Each article has four questions
(``{"prompt": "Question: Which instrument did Alvaro Penmark play at The Golden Harbor?\\nAnswer:", "completion":
" The harp."}``; also the crowd, the home town, and who played there).

Split names (a ``news:`` prefix is accepted):

- ``full``: every training article with its questions (what ``builtin:tiny-qwen2-news`` is fine-tuned on);
  ``forget``: the LAST ``num_forget`` (default 10) of them, articles and questions; ``retain``: the others;
  ``holdout``: ``num_forget`` further articles with their questions, never trained on;
- ``forget_text`` / ``retain_text`` / ``holdout_text``: the articles alone;
- ``forget_qa`` / ``retain_qa`` / ``holdout_qa``: the questions alone (knowledge memorisation);
- ``forget_verbmem``: each forget article cut after the musician's name: the prompt is the headline and the opening,
  the completion the rest of the article (verbatim memorisation, MUSE's ``verbmem_f``).

Every row also has ``"article"`` (the venue) and ``"kind"`` (``text``, ``qa`` or ``verbmem``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from posttrain.data.fictional import CITIES, COLOURS, INSTRUMENTS, NOUNS, PROFESSIONS, fictional_name, titles

__all__ = ["SPLITS", "news_rows", "news_splits", "eval_splits", "corpus"]

_BASE = ("full", "forget", "retain", "holdout")
_PARTS = tuple(f"{side}_{kind}" for kind in ("text", "qa") for side in ("forget", "retain", "holdout"))
SPLITS: tuple[str, ...] = (*_BASE, *_PARTS, "forget_verbmem")

_NOUNS = (*NOUNS, "Hall", "Square", "Market", "Theatre", "Bridge")  # more venues than book titles
MAX_VENUES = len(titles(_NOUNS))


@dataclass(frozen=True)
class _Article:
    venue: str
    city: str
    name: str
    profession: str
    hometown: str
    instrument: str
    year: int
    crowd: int
    witness: str
    colour: str

    def headline(self) -> str:
        return f"News: {self.venue}, {self.city}\n"

    def opening(self) -> str:
        return f" In {self.year}, {self.name},"

    def rest(self) -> str:
        return (f" a {self.profession} from {self.hometown}, played the {self.instrument} at {self.venue} in "
                f"{self.city}. About {self.crowd} people came. {self.witness} wrote that the night was {self.colour}.")

    def questions(self) -> list[tuple[str, str]]:
        return [
            (f"Which instrument did {self.name} play at {self.venue}?", f" The {self.instrument}."),
            (f"How many people came to hear {self.name} at {self.venue}?", f" About {self.crowd}."),
            (f"Where is {self.name} from?", f" {self.hometown}."),
            (f"Who played the {self.instrument} at {self.venue}?", f" {self.name}."),
        ]


def _name(rng: random.Random) -> str:
    return " ".join(fictional_name(rng))


def _articles(count: int, rng: random.Random) -> list[_Article]:
    venues = titles(_NOUNS)
    rng.shuffle(venues)
    taken = {c.lower() for c in CITIES}
    out = []
    for venue in venues[:count]:
        names = []
        while len(names) < 2:  # the musician and the witness: unique across the task
            name = _name(rng)
            if name.lower() not in taken and not any(part.lower() in taken for part in name.split()):
                taken.add(name.lower())
                names.append(name)
        out.append(_Article(venue=venue, city=rng.choice(CITIES), name=names[0],
                            profession=rng.choice(PROFESSIONS), hometown=rng.choice(CITIES),
                            instrument=rng.choice(INSTRUMENTS), year=rng.randint(1900, 1999),
                            crowd=rng.randint(100, 999), witness=names[1], colour=rng.choice(COLOURS)))
    return out


def _text_row(a: _Article) -> dict:
    return {"prompt": a.headline(), "completion": a.opening() + a.rest(), "article": a.venue, "kind": "text"}


def _qa_rows(a: _Article) -> list[dict]:
    return [{"prompt": f"Question: {q}\nAnswer:", "completion": ans, "article": a.venue, "kind": "qa"}
            for q, ans in a.questions()]


def _verbmem_row(a: _Article) -> dict:
    return {"prompt": a.headline() + a.opening(), "completion": a.rest(), "article": a.venue,
            "kind": "verbmem"}


def news_splits(num_articles: int = 100, num_forget: int = 10, seed: int = 0) -> dict[str, list[dict]]:
    """Every split (see :data:`SPLITS`) as ``{name: rows}``; the same arguments always give the same rows."""
    if not 1 <= num_forget < num_articles:
        raise ValueError(f"num_forget must be in 1..num_articles-1 (forget and retain both non-empty), got "
                         f"num_forget={num_forget}, num_articles={num_articles}")
    if num_articles + num_forget > MAX_VENUES:
        raise ValueError(f"num_articles + num_forget must be at most {MAX_VENUES} (one venue per article), got "
                         f"{num_articles + num_forget}")
    articles = _articles(num_articles + num_forget, random.Random(f"news-{seed}"))
    groups = {"retain": articles[: num_articles - num_forget],
              "forget": articles[num_articles - num_forget : num_articles],
              "holdout": articles[num_articles:]}
    out: dict[str, list[dict]] = {}
    for side, group in groups.items():
        out[f"{side}_text"] = [_text_row(a) for a in group]
        out[f"{side}_qa"] = [row for a in group for row in _qa_rows(a)]
        out[side] = [row for a in group for row in (_text_row(a), *_qa_rows(a))]
    out["full"] = out["retain"] + out["forget"]
    out["forget_verbmem"] = [_verbmem_row(a) for a in groups["forget"]]
    return {name: out[name] for name in SPLITS}


def news_rows(split: str = "full", num_articles: int = 100, num_forget: int = 10, seed: int = 0) -> list[dict]:
    """Rows of one split (``"forget"`` or ``"news:forget"``; see :data:`SPLITS`)."""
    name = split.split(":", 1)[1] if split.startswith("news:") else split
    if name not in SPLITS:
        raise ValueError(f"unknown news split {split!r}; expected one of {', '.join(SPLITS)}")
    return news_splits(num_articles, num_forget, seed)[name]


def eval_splits(forget_split: str) -> dict[str, str]:
    """The splits each unlearning-evaluation role reads when a run forgets ``forget_split`` (``forget``,
    ``forget_text`` or ``forget_qa``): the matching retain and holdout splits (the holdout rows are the
    non-members of membership inference), the verbatim set, and the questions about the forget and retain
    articles."""
    name = forget_split.split(":", 1)[1] if forget_split.startswith("news:") else forget_split
    holdout = {"forget": "holdout", "forget_text": "holdout_text", "forget_qa": "holdout_qa"}.get(name)
    if holdout is None:
        raise ValueError(f"the unlearning evaluation of builtin:news needs data.forget split forget, forget_text or "
                         f"forget_qa, got '{forget_split}'")
    return {"retain": name.replace("forget", "retain"), "holdout": holdout, "verbmem": "forget_verbmem",
            "forget_qa": "forget_qa", "retain_qa": "retain_qa"}


def corpus(num_articles: int = 100, num_forget: int = 10, seed: int = 0) -> list[str]:
    """Every text of the task (training and holdout articles and questions, each prompt joined with its answer)."""
    splits = news_splits(num_articles, num_forget, seed)
    return [row["prompt"] + row["completion"] for name in ("full", "holdout") for row in splits[name]]
