"""The caption tokenizer against pycocoevalcap's PTB tokenizer (Java) on captions that trip tokenizers."""

from __future__ import annotations

import pytest

from pcm.vocab import tokenize

TRICKY = [
    "A sign that says 'STOP' on a pole.",
    "A dog 'running' fast",
    "A man doesn't look at the camera.",
    "They can't see the dog's ball.",
    "It won't fit; she's holding two dogs' leashes.",
    'A "happy" cat, isn\'t it?',
    "Kids aren't gonna eat 3.5 pizzas for $5.",
    "A t-shirt with 1,000 dots & stripes.",
    "I cannot believe it's 10:30 a.m.",
    "We'll go, you'd see, I'm here, they've left, we're done.",
    "A man's hat and a 'cool' red car...",
    "The 90's style room",
    "people's choice -- a 50/50 split!",
    "an 8-year-old boy in O'Neill's pub",
    "ya'll come back",
    "'Tis the season",
    "Two women wouldn't wanna leave the U.S. flag",
    "A child\u2019s toy \u2018bear\u2019 on a bed",
    "A HOT-DOG stand: 100% beef #1",
    "Shouldn't the couldn't-be-happier man have gotta go?",
    # Other languages: letters, digits and combining marks of every script stay inside words.
    "Un café près de la gare.",
    "Ein Hund läuft über die Straße.",
    "Le chien d'Émile court.",
    "El niño's toy: co-operación, señal",
    "Mañana a las 10:30 a.m.",
    "ÉCOLE française, naïve façade",
    "Пес бежит по траве, 3,5 км.",
    "Κύων τρέχει στο πάρκο",
    "قطة على الأريكة.",
    "the \u0663\u0664 dogs",                     # Arabic-Indic digits
    "हिन्दी में एक कुत्ता",                        # Devanagari vowel signs are combining marks
    "犬が公園で走っている",
    "A cafe\u0301 sign",                         # decomposed accent (NFD), kept as written
    "Ünal's çay",
]


def ptb(captions: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0] for i in range(len(captions))]


@pytest.fixture(scope="module")
def reference() -> list[str]:
    return ptb(TRICKY)


@pytest.mark.parametrize("i", range(len(TRICKY)))
def test_tokens_equal_the_evaluation_tokenizer(reference, i):
    assert " ".join(tokenize(TRICKY[i])) == reference[i], TRICKY[i]


def test_a_decoded_caption_keeps_its_tokens_through_the_evaluation_tokenizer():
    # The model writes tokens joined by spaces ("does n't"); the scorer must see the same tokens.
    # ("'t is" alone comes back as "t is": PTB reads a leading quote as an opening quote; rare enough.)
    written = [" ".join(tokenize(c)) for c in TRICKY if not c.startswith("'Tis")]
    assert ptb(written) == written


def test_brackets_are_dropped_where_pycocoevalcap_keeps_lrb_tokens():
    assert tokenize("a (red) car") == ["a", "red", "car"]
    assert ptb(["a (red) car"]) == ["a -lrb- red -rrb- car"]


def test_words_of_other_scripts_stay_whole():
    assert tokenize("Un CAFÉ près de la gare") == ["un", "café", "près", "de", "la", "gare"]
    assert tokenize("قطة على الأريكة") == ["قطة", "على", "الأريكة"]
    assert tokenize("一只狗在草地上跑") == ["一只狗在草地上跑"]        # no spaces: one token, as in PTB
    assert tokenize("Ein Hund läuft, naïve") == ["ein", "hund", "läuft", "naïve"]
    assert tokenize("a dog_cat") == ["a", "dog", "cat"]                 # the underscore still splits words


def test_non_ascii_captions_cut_ascii_words_as_before():
    # Non-ASCII text takes the Unicode patterns; on the ASCII words they must cut exactly as the ASCII ones.
    for caption in TRICKY:
        if caption.isascii():
            assert tokenize(caption + " \u00e9t\u00e9") == [*tokenize(caption), "\u00e9t\u00e9"], caption


def test_non_latin_sentence_punctuation_is_dropped_where_pycocoevalcap_keeps_it():
    # PTB keeps the ideographic full stop, the Arabic comma and question mark and the Devanagari danda
    # as tokens (pycocoevalcap drops only ASCII punctuation); we drop them like their ASCII twins.
    captions = ["一只狗在草地上跑。", "قطة، على الأريكة؟", "कुत्ता दौड़ रहा है।"]
    assert [tokenize(c) for c in captions] == [["一只狗在草地上跑"], ["قطة", "على", "الأريكة"],
                                               ["कुत्ता", "दौड़", "रहा", "है"]]
    assert ptb(captions) == ["一只狗在草地上跑 。", "قطة ، على الأريكة ؟", "कुत्ता दौड़ रहा है ।"]
