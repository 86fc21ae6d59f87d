"""What the toy text-to-image model understands: the world's vocabulary, and the warning for other wording."""

from __future__ import annotations

import random

from typer.testing import CliRunner

from pcm.cli import app
from pcm.toyworld.wording import WARN_CAPTION_SHARE, unfamiliar, warning
from pcm.toyworld.world import caption, caption_vocabulary, random_scene, references


def test_the_vocabulary_is_exactly_the_words_of_the_worlds_captions():
    rng = random.Random(0)
    seen: set[str] = set()
    for _ in range(3000):
        scene = random_scene(rng)
        for text in [caption(scene, rng), *references(scene, rng)]:
            seen.update(text.lower().replace(",", " ").split())
    assert seen == set(caption_vocabulary())      # every caption word is in it, and every word of it is used


def test_unfamiliar_words_are_counted_and_warned_above_the_threshold():
    own = unfamiliar(["two red cars on the grass at night", "A dog, a ball and a tree in the snow"])
    assert own["unfamiliar_words"] == 0 and warning(own) is None
    user = unfamiliar(["a cottage painted red on a snowfield", "a red house on the sand", "in daylight, a car"])
    assert user["examples"][:3] == ["cottage", "painted", "snowfield"] and user["unfamiliar_words"] == 4
    assert user["caption_share"] == 2 / 3 and user["word_share"] == 4 / 17
    assert "66.7% of the 3 training captions" in warning(user) and "cottage" in warning(user)
    few = unfamiliar(["a red car"] * 99 + ["a crimson car"])      # 1% of captions: below the threshold
    assert few["caption_share"] < WARN_CAPTION_SHARE and warning(few) is None


def test_pcm_run_warns_before_rendering_captions_in_other_words(tmp_path):
    captions = tmp_path / "mine.csv"
    captions.write_text("caption\na cottage painted red on a snowfield\na crimson automobile in daylight\n"
                        "a red house on the grass\n")
    res = CliRunner().invoke(app, ["run", "ingest", "synthesize", "--root", str(tmp_path / "runs"),
                                   "--set", f"ingest.source={captions}", "--set", "ingest.subset=none",
                                   "--set", "synthesize.steps=1"])
    assert res.exit_code == 0, res.output
    assert "66.7% of the 3 training captions hold words the toy text-to-image model never saw" in res.output
    assert res.output.index("never saw") < res.output.index("synthesize ")   # said before the stage's line
