"""X-modaler checkpoints of the release converted to PCMNet, checked against a module in the release's layout.

`ReleaseLike` below is written for this test from the release's module names and forward passes
(jianjieluo/PCM-Net: VisualGridClipTagLREmbedding, GTransformerEncoder; X-modaler: TokenBaseEmbedding,
SinusoidEncoding, BertLayer, BertGenerationLayer, TransformerDecoder, BasePredictor), evaluation
path only. Its state dict has the release's parameter names; the converted PCMNet must give its
logits on the same inputs.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from release_layout import HEADS, OUT_PERM, WORDS, K, M, Sinusoid, convert, inputs, ours_ids, release_model

from pcm import release_checkpoint
from pcm.model import load_preset


# ---------------------------------------------------------------- the round trip
@pytest.mark.parametrize("shared", [True, False])
def test_converted_model_gives_the_release_layouts_logits(shared):
    m, bank = release_model(shared=shared, eps=1e-5)   # the layout's LayerNorm eps set to torch's: exact
    ours, vocab = convert(m, bank)
    g, feats, ids = inputs()
    with torch.no_grad():
        want = m(g, feats, ids)
        got = ours(g, feats, ours_ids(ids))
    assert vocab.words[4:] == WORDS and len(vocab) == len(WORDS) + 4
    torch.testing.assert_close(got[..., OUT_PERM], want, atol=1e-4, rtol=1e-4)
    # The softmax over this project's vocabulary is the release's: PAD, BOS and UNK take no probability.
    torch.testing.assert_close(got.log_softmax(-1)[..., OUT_PERM], want.log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_the_release_eps_differs_by_a_measured_small_amount():
    m, bank = release_model(eps=1e-12)                 # as the release: BERT LayerNorms at 1e-12
    ours, _ = convert(m, bank)
    g, feats, ids = inputs()
    with torch.no_grad():
        want, got = m(g, feats, ids), ours(g, feats, ours_ids(ids))[..., OUT_PERM]
    diff = (got - want).abs().max().item()
    assert diff < 1e-3 * want.abs().max().item()       # eps 1e-5 vs 1e-12: far below a beam decision's scale
    assert got.argmax(-1).equal(want.argmax(-1))


def test_the_decoder_layers_of_the_release_share_one_set_of_weights():
    """X-modaler's TransformerDecoder copies one layer with copy.copy: a shallow copy, so the layers are one."""
    m, _ = release_model(shared=True)
    sd = m.state_dict()
    assert torch.equal(sd["decoder.g_layers.0.x_att.self.query.weight"], sd["decoder.g_layers.1.x_att.self.query.weight"])


# ---------------------------------------------------------------- refusals
def test_a_parameter_that_maps_to_nothing_is_named():
    m, bank = release_model()
    sd = dict(m.state_dict())
    sd["visual_embed.extra_gate.weight"] = torch.ones(2)
    cfg = release_checkpoint.model_config(sd, load_preset("tiny", {"top_k": K, "top_m": M}), HEADS)
    with pytest.raises(release_checkpoint.CheckpointMismatch, match=r"do not map onto PCMNet: \['visual_embed.extra_gate.weight'\]"):
        release_checkpoint.convert(sd, WORDS, bank, cfg)


def test_a_missing_parameter_is_named():
    m, bank = release_model()
    sd = {k: v for k, v in m.state_dict().items() if k != "encoder.gvfeat_embed.1.weight"}
    cfg = release_checkpoint.model_config(sd, load_preset("tiny", {"top_k": K, "top_m": M}), HEADS)
    with pytest.raises(release_checkpoint.CheckpointMismatch, match=r"without a release counterpart: \['global_norm.weight'\]"):
        release_checkpoint.convert(sd, WORDS, bank, cfg)


def test_a_vocabulary_of_another_size_is_refused():
    m, bank = release_model()
    cfg = release_checkpoint.model_config(m.state_dict(), load_preset("tiny", {"top_k": K, "top_m": M}), HEADS)
    with pytest.raises(release_checkpoint.CheckpointMismatch, match="predicts 13 tokens but the vocabulary file has 11"):
        release_checkpoint.convert(m.state_dict(), WORDS[:-1], bank, cfg)


def test_other_word_positions_are_refused():
    m, bank = release_model()
    sd = dict(m.state_dict())
    sd["token_embed.embeddings_pos.pe"] = Sinusoid(max_len=100).pe        # log(200) instead of log(10000)
    cfg = release_checkpoint.model_config(sd, load_preset("tiny", {"top_k": K, "top_m": M}), HEADS)
    with pytest.raises(release_checkpoint.CheckpointMismatch, match="not the sinusoid"):
        release_checkpoint.convert(sd, WORDS, bank, cfg)


class Trainer:
    """Stands for a trainer object pickled into a checkpoint: torch.load(weights_only=True) refuses it."""


def test_files_load_weights_only_and_refuse_objects(tmp_path):
    m, _ = release_model()
    wrapped = tmp_path / "model_Epoch_00012_Iter_0203400.pth"
    torch.save({"model": m.state_dict(), "iteration": 203400,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, wrapped)
    sd = release_checkpoint.read_state_dict(wrapped)
    assert set(sd) == set(m.state_dict())
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, ddp)
    assert set(release_checkpoint.read_state_dict(ddp)) == set(m.state_dict())
    evil = tmp_path / "evil.pth"
    torch.save({"model": m.state_dict(), "trainer": Trainer()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(release_checkpoint.CheckpointMismatch, match="evil.pth: not loadable as weights only"):
        release_checkpoint.read_state_dict(evil)


def test_release_vocabulary_file(tmp_path):
    p = tmp_path / "vocabulary.txt"
    p.write_text("\n".join(WORDS) + "\n")
    assert release_checkpoint.read_release_vocabulary(p) == WORDS
    p.write_text("a\ndog\na\n")
    with pytest.raises(release_checkpoint.CheckpointMismatch, match="line 3: 'a' repeats line 1"):
        release_checkpoint.read_release_vocabulary(p)
