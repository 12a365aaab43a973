"""Vocabulary cleaning of kept descriptors: safe words stay as written, nothing else survives."""

from __future__ import annotations

import random
import string

import pytest

from anonymize.vocabulary import PLACEHOLDER, Vocabulary, load_vocabulary
from common.errors import ConfigError


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return load_vocabulary()


@pytest.mark.parametrize(("text", "cleaned", "removed"), [
    ("L CC", "L CC", 0),
    ("ROI mask images", "ROI mask images", 0),
    ("BI-RADS 4, left breast", "BI-RADS [removed] left breast", 1),
    ("Screening mammogram - Dr. John Smith, 555-1234", "Screening mammogram [removed]", 5),
    ("R MLO 2019-05-06 07:08", "R MLO [removed]", 5),
    ("Frau Müller", "[removed]", 2),
    ("spot compression@MRN#8842913", "spot compression [removed]", 2),
    ("", "", 0),
])
def test_only_vocabulary_words_survive_and_every_other_run_is_one_placeholder(vocabulary, text, cleaned, removed):
    result = vocabulary.clean(text)

    assert (result.text, result.removed_words) == (cleaned, removed)


def test_no_token_with_a_digit_ever_survives(vocabulary):
    rng = random.Random(18)
    words = sorted(vocabulary.words)
    for _ in range(500):
        tokens = [rng.choice(words) if rng.random() < 0.5 else
                  "".join(rng.choice(string.ascii_letters + string.digits + "-/:.") for _ in range(rng.randint(1, 9)))
                  for _ in range(rng.randint(1, 8))]
        text = rng.choice([" ", ", ", "-", "/"]).join(tokens)

        cleaned = vocabulary.clean(text).text

        assert not any(character.isdigit() for character in cleaned), (text, cleaned)
        assert all(word == PLACEHOLDER or word.upper() in vocabulary.words
                   for word in cleaned.replace(PLACEHOLDER, " [removed] ").replace("-", " ").replace("/", " ")
                   .replace(",", " ").replace(".", " ").split()), (text, cleaned)


def test_a_cleaned_value_fits_its_vr(vocabulary):
    text = " ".join(["MAMMOGRAPHY"] * 20)

    assert len(vocabulary.clean(text, max_length=64).text) <= 64
    assert len(vocabulary.clean("L CC SPOT COMPRESSION MAGNIFICATION", max_length=16).text) <= 16


def test_a_user_list_in_json_extends_and_a_malformed_one_is_refused(tmp_path):
    extra = tmp_path / "extra.json"
    extra.write_text('{"format": "mammofl-descriptor-vocabulary/1", "terms": {"site": ["Tomosynthese"]}}')
    assert "TOMOSYNTHESE" in load_vocabulary(extra).words

    extra.write_text('{"terms": {}}')
    with pytest.raises(ConfigError, match="lacks \"format\""):
        load_vocabulary(extra)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_vocabulary(tmp_path / "absent.txt")
