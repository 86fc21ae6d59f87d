"""Release-parity mode: each piece of the authors' numerics against an independent re-derivation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from builders import tiny_train_config, train_inputs

from pcm import checkpoint
from pcm.model import PCMNet, PCMNetConfig, sinusoid
from pcm.stages.train import RELEASE_MODEL, RELEASE_TRAIN, TrainConfig, run_train
from storage.layout import RunLayout

D, N = 8, 4


def small_model(**overrides) -> PCMNet:
    values = dict(d_embed=D, d_width=D, n_patches=N, d_model=32, n_heads=4, n_enc_layers=1, n_dec_layers=1,
                  d_ff=64, top_k=2, top_m=2)
    torch.manual_seed(0)
    head = {"ln_post.weight": torch.ones(D), "ln_post.bias": torch.zeros(D), "proj": torch.eye(D)}
    return PCMNet(PCMNetConfig(**{**values, **overrides}), vocab_size=50, concept_bank=torch.eye(D)[:4],
                  clip_head=head)


def release_sinusoid(max_len: int, dim: int) -> torch.Tensor:
    """X-modaler's SinusoidEncoding: div_term = exp(2i * -log(2 * max_len) / dim), max_len 5000 by default."""
    pe = torch.zeros(max_len, dim)
    position = torch.arange(0, max_len).unsqueeze(1).float()
    div_term = torch.exp(torch.arange(0, dim, 2).float() * -(math.log(max_len * 2.0) / dim))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def test_word_positions_equal_the_release_sinusoid():
    assert torch.allclose(sinusoid(22, 512), release_sinusoid(5000, 512)[:22], atol=1e-5)


def decoder_input(model: PCMNet, tokens: torch.Tensor) -> torch.Tensor:
    """What the first decoder layer receives (dropout off in eval mode)."""
    seen = []
    hook = model.decoder[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    memory, pad = model.eval().encode(torch.randn(2, D), torch.randn(2, N, D))
    model.decode(tokens, memory, pad)
    hook.remove()
    return seen[0]


def test_release_word_embedding_is_layernorm_of_unit_normal_words_plus_positions():
    model = small_model(word_embedding="release", word_dropout=0.1)
    w = model.word_embed.weight.detach()
    assert abs(float(w.std()) - 1.0) < 0.05                      # nn.Embedding's N(0, 1), no sqrt(d) scale
    assert model.dec_drop.p == 0.1
    tokens = torch.tensor([[1, 5, 7], [1, 2, 3]])
    want = F.layer_norm(w[tokens] + release_sinusoid(5000, 32)[:3], (32,), eps=1e-5)
    assert torch.allclose(decoder_input(model, tokens), want, atol=1e-5)


def test_default_word_embedding_is_the_scaled_one():
    model = small_model(decoder_dropout=0.2)
    assert model.word_norm is None and model.dec_drop.p == 0.2
    assert abs(float(model.word_embed.weight.detach().std()) - 32 ** -0.5) < 0.02
    tokens = torch.tensor([[1, 5, 7], [1, 9, 4]])
    want = model.word_embed.weight.detach()[tokens] * math.sqrt(32) + sinusoid(3, 32)
    assert torch.allclose(decoder_input(model, tokens), want, atol=1e-5)


def test_release_position_init_is_std_002():
    default, release = small_model(), small_model(position_init_std=0.02)
    assert abs(float(default.position.weight.detach().std()) - 1.0) < 0.2
    std = float(release.position.weight.detach().std())
    assert 0.015 < std < 0.025 and float(release.position.weight.detach().abs().max()) < 0.02 * 6


def test_parity_release_fills_every_unset_piece_and_explicit_values_win():
    paper = TrainConfig(preset="tiny")
    release = TrainConfig(preset="tiny", parity="release")
    for key, value in RELEASE_TRAIN.items():
        assert getattr(release, key) == value and getattr(paper, key) != value
    cfg = release.model_preset()
    for key, value in RELEASE_MODEL.items():
        assert getattr(cfg, key) == value and getattr(paper.model_preset(), key) != value
    mixed = TrainConfig(preset="tiny", parity="release", focal_gamma=0.0, model={"word_embedding": "scaled"})
    assert mixed.focal_gamma == 0.0 and mixed.label_smoothing == 0.1
    assert mixed.model_preset().word_embedding == "scaled" and mixed.model_preset().position_init_std == 0.02
    # The paper default keeps the fingerprint content it had before the switch existed.
    assert "parity" not in paper.content() and "loss_reduction" not in paper.content()
    assert release.content()["parity"] == "release"
    with pytest.raises(ValueError, match="parity"):
        TrainConfig(preset="tiny", parity="authors")


def test_release_mode_trains_and_its_checkpoint_round_trips(tmp_path):
    cap, enc = train_inputs(tmp_path / "runs")
    result = run_train(tiny_train_config(parity="release", epochs=2, val_every=1000), cap, enc,
                       RunLayout(tmp_path / "runs"))
    model, _, meta = checkpoint.load(checkpoint.find(result.path, "best"))
    assert model.word_norm is not None and model.cfg.position_init_std == 0.02
    assert meta["step"] == result.counts["steps"] > 0
