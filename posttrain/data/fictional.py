"""Word lists and names of the fictional world shared by the built-in unlearning corpora (``builtin:facts``,
``builtin:news``): people, cities, books / venues, professions, colours and instruments that no pretrained model has
seen together, so what a model knows of them it learned from the corpus."""

from __future__ import annotations

import random

SYLLABLES = (
    "al", "va", "ro", "mi", "ka", "te", "lo", "ri", "sa", "ne",
    "do", "be", "fe", "gi", "zu", "pe", "ta", "mo", "li", "ve",
)  # fmt: skip
FIRST_ENDS = ("", "n", "s", "l", "r")
LAST_ENDS = ("mark", "dell", "wick", "ton", "ley", "ford", "holm", "by", "quist", "more")
CITIES = (
    "Tessaly", "Varnholm", "Quenmoor", "Brisca", "Oldenfeld", "Marrowick", "Celandor", "Pellith",
    "Drovia", "Sunmere", "Ostrabel", "Kettering Vale", "Luminar", "Haskith", "Nolvary", "Ebbensford",
)  # fmt: skip
COUNTRIES = ("Vornland", "Estrary", "Kalimar", "Dunreth", "Polvania", "Serath", "Ulmeria", "Tavoria")
PROFESSIONS = (
    "baker", "sailor", "painter", "doctor", "farmer", "teacher", "engineer", "poet",
    "tailor", "pilot", "chemist", "gardener",
)  # fmt: skip
ADJECTIVES = ("Silent", "Golden", "Broken", "Hidden", "Last", "Crimson", "Distant", "Quiet", "Burning", "Frozen")
NOUNS = ("River", "Lantern", "Harbor", "Garden", "Mirror", "Orchard", "Tower", "Winter", "Compass", "Meadow")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown")
INSTRUMENTS = ("violin", "piano", "flute", "drum", "harp", "guitar", "cello", "trumpet")


def fictional_name(rng: random.Random) -> tuple[str, str]:
    """A (first, last) name of two syllables and an ending each, drawn from ``rng`` (four draws)."""
    first = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(FIRST_ENDS)).capitalize()
    last = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(LAST_ENDS)).capitalize()
    return first, last


def titles(nouns: tuple[str, ...] = NOUNS) -> list[str]:
    """Every "The <adjective> <noun>" title (book titles, venue names), adjective-major."""
    return [f"The {a} {n}" for a in ADJECTIVES for n in nouns]
