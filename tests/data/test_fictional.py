import random

from posttrain.data.fictional import ADJECTIVES, FIRST_ENDS, LAST_ENDS, NOUNS, SYLLABLES, fictional_name, titles


def test_fictional_name_is_two_capitalised_words_from_six_choices():
    rng = random.Random(0)
    first, last = fictional_name(rng)
    assert first[0].isupper() and last[0].isupper() and " " not in first + last
    replay = random.Random(0)
    for pool in (SYLLABLES, SYLLABLES, FIRST_ENDS, SYLLABLES, SYLLABLES, LAST_ENDS):
        replay.choice(pool)
    # six choices and nothing else, in this order: the built-in corpora (and the shipped models' data) depend on it
    assert rng.random() == replay.random()


def test_titles_are_adjective_major_and_take_extra_nouns():
    assert titles()[:2] == [f"The {ADJECTIVES[0]} {NOUNS[0]}", f"The {ADJECTIVES[0]} {NOUNS[1]}"]
    assert len(titles((*NOUNS, "Hall"))) == len(ADJECTIVES) * (len(NOUNS) + 1)
