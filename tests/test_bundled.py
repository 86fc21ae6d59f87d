"""Bundled presets are found by bare name only: one lookup for CLIP, diffusion, model and pipeline presets."""

from __future__ import annotations

import pytest

from pcm import bundled


@pytest.mark.parametrize("kind,suffix,name", [("clip", ".json", "tiny"), ("diffusion", ".json", "tiny"),
                                              ("model", ".toml", "tiny"), ("pipeline", ".toml", "demo")])
def test_each_kind_finds_its_shipped_files(kind, suffix, name):
    assert name in bundled.names(kind, suffix)
    assert bundled.path(kind, suffix, name) == bundled.PRESETS / kind / f"{name}{suffix}"
    assert bundled.path(kind, suffix, name).is_file()


@pytest.mark.parametrize("name", ["../pipeline/demo", "/etc/passwd", "tiny.json", "", "TINY", "tiny/"])
def test_names_that_are_not_a_bundled_file_are_refused(name):
    assert name not in bundled.names("clip", ".json")
    with pytest.raises(ValueError, match=r"CLIP preset .* not found; known presets: .*tiny"):
        bundled.path("clip", ".json", name, "CLIP")


def test_the_model_and_clip_loaders_use_it():
    from pcm import clip, model

    assert clip.preset_names() == bundled.names("clip", ".json")
    with pytest.raises(ValueError, match="model preset '../x' not found"):
        model.load_preset("../x")
