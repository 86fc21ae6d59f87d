"""Concept vocabulary: nouns in context, singular lemmas, counts, stop-words, user vocabulary files."""

from __future__ import annotations

from collections import Counter

import pytest

from pcm.concepts import STOP_NOUNS, caption_nouns, count_nouns, extract_concepts, lemma, read_vocabulary, select

CAPTIONS = [
    "A man riding horses on the beach.",
    "Two dogs are playing in the grass",
    "a dog chasing a frisbee in a park",
    "Men with frisbees standing in front of a building",
    "A picture of a cat on top of a laptop",
    "a group of people on skis in the snow",
    "Two giraffes standing in a grassy field near trees",
    "the dog is sleeping next to two cats",
]


@pytest.mark.parametrize("caption, nouns", [
    ("a man riding horses", ["man", "horse"]),
    ("two dogs are playing", ["dog"]),
    ("Men with frisbees standing in front of a building", ["man", "frisbee", "building"]),
    ("A picture of a cat on top of a laptop", ["cat", "laptop"]),            # picture, top: stop-nouns
    ("Two giraffes standing in a grassy field near trees", ["giraffe", "field", "tree"]),  # grassy: adjective
    ("a group of people on skis in the snow", ["people", "ski", "snow"]),
    ("", []),
])
def test_caption_nouns_in_context(caption, nouns):
    assert caption_nouns(caption) == nouns


def test_lemmas_are_singular():
    assert [lemma(w) for w in ["horses", "men", "children", "buses", "giraffes", "frisbees", "sheep"]] == \
        ["horse", "man", "child", "bus", "giraffe", "frisbee", "sheep"]


def test_counts_over_a_corpus_skip_verbs_adjectives_and_stop_words():
    counts = count_nouns(CAPTIONS, progress=False)
    assert counts["dog"] == 3 and counts["man"] == 2 and counts["frisbee"] == 2 and counts["cat"] == 2
    for skipped in ["riding", "ride", "play", "playing", "standing", "grassy", "two", "a", "the", "picture",
                    "top", "front", "group"]:
        assert skipped not in counts, skipped
    assert not set(counts) & STOP_NOUNS


def test_selection_by_min_count_and_top_n_is_deterministic():
    counts = Counter({"dog": 5, "cat": 3, "zebra": 3, "bus": 1})
    assert select(counts) == [("dog", 5), ("cat", 3), ("zebra", 3), ("bus", 1)]   # ties alphabetical
    assert select(counts, min_count=2) == [("dog", 5), ("cat", 3), ("zebra", 3)]
    assert select(counts, min_count=2, top_n=2) == [("dog", 5), ("cat", 3)]
    assert extract_concepts(CAPTIONS, min_count=2, progress=False) == \
        [("dog", 3), ("cat", 2), ("frisbee", 2), ("man", 2)]


def test_vocabulary_file(tmp_path):
    f = tmp_path / "vocab.txt"
    f.write_text("# concepts for my domain\ndog\n\n  teddy   bear  \nzebra  # striped\n", encoding="utf-8")
    assert read_vocabulary(f) == ["dog", "teddy bear", "zebra"]
    f.write_text("dog\ncat\ndog\n")
    with pytest.raises(ValueError, match=r"vocab.txt:3: concept 'dog' repeats line 1"):
        read_vocabulary(f)
    f.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no concepts"):
        read_vocabulary(f)
    with pytest.raises(FileNotFoundError, match="one concept a line"):
        read_vocabulary(tmp_path / "missing.txt")
