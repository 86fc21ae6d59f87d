"""CLIP is built with the activation its pretrained tag was trained with (no weights are read)."""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from pcm.clip import ClipSpec, load_clip, quick_gelu
from storage.layout import RunLayout


def activations(model) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (torch.nn.GELU, QuickGELU))}


@pytest.fixture
def weightless(monkeypatch):
    """open_clip's factory with every argument load_clip passes, except that no weights are fetched."""
    calls = []
    real = open_clip.create_model_and_transforms

    def build(name, pretrained=None, **kwargs):
        calls.append({"name": name, "pretrained": pretrained, **kwargs})
        return real(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", build)
    return calls


@pytest.mark.parametrize(("model", "tag", "want"), [
    ("ViT-B-32", "openai", QuickGELU),               # OpenAI trained with QuickGELU: forced
    ("ViT-B-32", "metaclip_400m", QuickGELU),        # so did MetaCLIP
    ("ViT-B-32", "laion2b_s34b_b79k", torch.nn.GELU),
    ("ViT-B-32-quickgelu", "openai", QuickGELU),     # already the QuickGELU architecture
])
def test_load_clip_builds_the_activation_of_the_tag(weightless, caplog, model, tag, want):
    spec = ClipSpec(model=model, pretrained=tag, precision="fp32")
    with caplog.at_level(logging.WARNING):
        loaded = load_clip(spec)
    assert activations(loaded.model) == {want}
    assert weightless[-1]["force_quick_gelu"] == (want is QuickGELU and not model.endswith("-quickgelu"))
    assert "QuickGELU mismatch" not in caplog.text


def test_every_tag_of_the_vit_families_resolves_to_its_trained_activation():
    # The tag's own config decides, for every tag open_clip lists for these architectures.
    seen = set()
    for model in ("ViT-B-32", "ViT-B-16", "ViT-L-14"):
        tags = open_clip.list_pretrained_tags_by_model(model)
        assert "openai" in tags, (model, tags)  # the loop below is not vacuous: every family lists OpenAI's weights
        for tag in tags:
            trained = bool(open_clip.get_pretrained_cfg(model, tag).get("quick_gelu"))
            assert quick_gelu(ClipSpec(model=model, pretrained=tag)) == trained, (model, tag)
            seen.add(trained)
    assert seen == {True, False}  # both activations were checked, not only one


def test_quickgelu_architecture_with_gelu_weights_is_an_error():
    with pytest.raises(ValueError, match=r"trained with GELU; use clip.model='ViT-B-32'"):
        ClipSpec(model="ViT-B-32-quickgelu", pretrained="laion2b_s34b_b79k")


def test_presets_files_and_local_dirs_keep_their_own_architecture(tmp_path):
    assert not quick_gelu(ClipSpec(model="tiny"))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert not quick_gelu(ClipSpec(model="ViT-B-32", pretrained=str(weights)))
    assert not quick_gelu(ClipSpec(model="toyworld-clip", pretrained=f"local-dir:{tmp_path}"))


def test_encode_fingerprint_records_the_forced_activation(tmp_path):
    # Features made with GELU before the fix must not be served for a QuickGELU run: the flag enters the stage.
    from builders import encode_inputs

    from pcm.stages.contract import open_stage
    from pcm.stages.encode import EncodeConfig, plan
    from storage.atomic import read_json

    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1)
    # Planning writes nothing; config.json is written when the stage directory is opened (as a run does).
    openai = open_stage(plan(EncodeConfig(clip=ClipSpec(model="ViT-B-32", pretrained="openai")), cap, syn,
                             RunLayout(tmp_path / "runs")))
    laion = open_stage(plan(EncodeConfig(clip=ClipSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k")), cap, syn,
                            RunLayout(tmp_path / "runs")))
    assert read_json(openai.config_file)["config"]["clip_quick_gelu"] is True
    assert "clip_quick_gelu" not in read_json(laion.config_file)["config"]
