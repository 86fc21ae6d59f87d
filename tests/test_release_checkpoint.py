"""X-modaler checkpoints of the release converted to PCMNet, checked against a module in the release's layout.

`ReleaseLike` below is written for this test from the release's module names and forward passes
(jianjieluo/PCM-Net: VisualGridClipTagLREmbedding, GTransformerEncoder; X-modaler: TokenBaseEmbedding,
SinusoidEncoding, BertLayer, BertGenerationLayer, TransformerDecoder, BasePredictor), evaluation
path only. Its state dict has the release's parameter names; the converted PCMNet must give its
logits on the same inputs.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcm import release_checkpoint
from pcm.model import load_preset

W, D, N, DM, HEADS, FF, N_ENC, N_DEC, K, M, TAU = 24, 16, 4, 32, 4, 64, 2, 2, 3, 2, 0.01
WORDS = ["a", "dog", "cat", "on", "the", "grass", "man", "riding", "horse", "beach", "two", "sofa"]


# ---------------------------------------------------------------- the release's layout (evaluation forward)
class SelfAttention(nn.Module):                       # BertSelfAttention / BertXAttention
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(DM, DM), nn.Linear(DM, DM), nn.Linear(DM, DM)

    def forward(self, q, kv, mask):                   # mask: additive, broadcast to [B, H, Lq, Lk]
        B, Lq, _ = q.shape
        split = lambda x: x.view(B, x.shape[1], HEADS, DM // HEADS).transpose(1, 2)  # noqa: E731
        scores = split(self.query(q)) @ split(self.key(kv)).transpose(-1, -2) / math.sqrt(DM // HEADS) + mask
        return (scores.softmax(-1) @ split(self.value(kv))).transpose(1, 2).reshape(B, Lq, DM)


class AddNorm(nn.Module):                             # BertSelfOutput / BertOutput
    def __init__(self, d_in, eps):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, DM), nn.LayerNorm(DM, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):                           # BertAttention / BertCrossAttention
    def __init__(self, eps):
        super().__init__()
        self.self, self.output = SelfAttention(), AddNorm(DM, eps)

    def forward(self, q, kv, mask):
        return self.output(self.self(q, kv, mask), q)


class Intermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(DM, FF)

    def forward(self, x):
        return F.relu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.attention, self.intermediate, self.output = Attention(eps), Intermediate(), AddNorm(FF, eps)

    def forward(self, x, mask):
        a = self.attention(x, x, mask)
        return self.output(self.intermediate(a), a)


class BertGenerationLayer(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.self_attn, self.x_att = Attention(eps), Attention(eps)
        self.intermediate, self.output = Intermediate(), AddNorm(FF, eps)

    def forward(self, x, v, tmask, vmask):
        x = self.self_attn(x, x, tmask)
        x = self.x_att(x, v, vmask)
        return self.output(self.intermediate(x), x)


class Sinusoid(nn.Module):                            # SinusoidEncoding(dim, max_len=5000): log(2 * max_len)
    def __init__(self, max_len=5000):
        super().__init__()
        pe = torch.zeros(max_len, DM)
        pos = torch.arange(0, max_len).unsqueeze(1).float()
        div = torch.exp(torch.arange(0, DM, 2).float() * -(math.log(max_len * 2.0) / DM))
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe.unsqueeze(0))


class VisualEmbed(nn.Module):                         # VisualGridClipTagLREmbedding, replace_type 'top'
    def __init__(self, bank):
        super().__init__()
        self.embeddings, self.g_embeddings, self.t_embeddings = nn.Linear(W, DM), nn.Linear(D, DM), nn.Linear(D, DM)
        self.embeddings_pos = nn.Parameter(torch.zeros(1, N + 1, DM))
        self.embeddings_token_type = nn.Embedding(2, DM)
        self.embeddings_norm = nn.LayerNorm(DM)
        self.ln_post, self.proj = nn.LayerNorm(W), nn.Parameter(torch.randn(W, D))
        self.register_buffer("tag_vocab_embed", bank, persistent=False)

    def forward(self, g, feats):
        tags = self.tag_vocab_embed / self.tag_vocab_embed.norm(dim=-1, keepdim=True)
        probs = torch.softmax(g / g.norm(dim=-1, keepdim=True) @ tags.T / TAU, dim=-1)
        top_p, top_i = probs.topk(K, dim=-1)
        tag_embed = tags[top_i] * (top_p > 0).float().unsqueeze(-1)
        local = self.ln_post(feats) @ self.proj
        local = local / (local.norm(dim=-1, keepdim=True) + 1e-9)
        sim = torch.einsum("bid,btd->bit", local, tag_embed / (tag_embed.norm(dim=-1, keepdim=True) + 1e-9))
        aware = (torch.softmax(sim / TAU, dim=-1).unsqueeze(-1) * tag_embed.unsqueeze(1)).sum(-2)
        B = feats.shape[0]
        sim2 = torch.softmax(sim.reshape(B, -1) / TAU, dim=-1)
        sel = sim2.topk(M, dim=-1).indices
        replace = torch.zeros(B, N * K).scatter(1, sel, 1).view(B, N, K).sum(-1) > 0     # [B, N]
        x = torch.cat([self.embeddings(feats), self.t_embeddings(aware)], dim=1)
        x = torch.cat([self.g_embeddings(g).unsqueeze(1), x], dim=1)
        x = x + torch.cat([self.embeddings_pos, self.embeddings_pos[:, 1:]], dim=1)
        types = torch.cat([torch.zeros(B, N + 1, dtype=torch.long), replace.long()], dim=1)
        x = self.embeddings_norm(F.relu(x + self.embeddings_token_type(types)))
        keep = torch.cat([torch.ones(B, N + 1), replace.float()], dim=1)
        return x, ((1.0 - keep) * -10000.0)[:, None, None, :]


class Encoder(nn.Module):                             # GTransformerEncoder
    def __init__(self, eps):
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(eps) for _ in range(N_ENC))
        self.gvfeat_embed = nn.Sequential(nn.Linear(DM * (N_ENC + 1), DM), nn.LayerNorm(DM))

    def forward(self, x, mask):
        gs = [x[:, 0]]
        for layer in self.layers:
            x = layer(x, mask)
            gs.append(x[:, 0])
        return torch.cat([self.gvfeat_embed(torch.cat(gs, dim=-1)).unsqueeze(1), x[:, 1:]], dim=1)


class TokenEmbed(nn.Module):                          # TokenBaseEmbedding: USE_NORM, SinusoidEncoding
    def __init__(self, vocab):
        super().__init__()
        self.embeddings, self.embeddings_norm, self.embeddings_pos = nn.Embedding(vocab, DM), nn.LayerNorm(DM), Sinusoid()

    def forward(self, ids):
        return self.embeddings_norm(self.embeddings(ids) + self.embeddings_pos.pe[:, :ids.shape[1]])


class Decoder(nn.Module):                             # TransformerDecoder: copy.copy of one layer, as the release
    def __init__(self, eps, shared=True):
        super().__init__()
        layer = BertGenerationLayer(eps)
        self.g_layers = nn.ModuleList(copy.copy(layer) if shared else BertGenerationLayer(eps) for _ in range(N_DEC))


class Predictor(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.logits = nn.Linear(DM, vocab)


class ReleaseLike(nn.Module):                         # TransformerEncoderDecoder
    def __init__(self, bank, eps=1e-12, shared=True):
        super().__init__()
        V = len(WORDS) + 1
        self.token_embed, self.visual_embed = TokenEmbed(V), VisualEmbed(bank)
        self.encoder, self.decoder, self.predictor = Encoder(eps), Decoder(eps, shared), Predictor(V)

    def forward(self, g, feats, ids):
        v, vmask = self.visual_embed(g, feats)
        v = self.encoder(v, vmask)
        L = ids.shape[1]
        tmask = torch.triu(torch.full((L, L), -10000.0), 1)[None, None]
        x = self.token_embed(ids)
        for layer in self.decoder.g_layers:
            x = layer(x, v, tmask, vmask)
        return self.predictor.logits(x)


def release_model(seed=0, eps=1e-12, shared=True):
    torch.manual_seed(seed)
    bank = F.normalize(torch.randn(7, D), dim=-1)
    m = ReleaseLike(bank, eps, shared)
    with torch.no_grad():  # every parameter away from its init, so a swapped pair cannot pass
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "LayerNorm" in name or "norm" in name else 0.3 * torch.randn_like(p))
    return m.eval(), bank


def inputs(seed=1, B=3, L=6):
    torch.manual_seed(seed)
    g = F.normalize(torch.randn(B, D), dim=-1)
    feats = 2 * torch.randn(B, N, W)
    ids = torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.randint(1, len(WORDS) + 1, (B, L - 1))], dim=1)
    return g, feats, ids


def ours_ids(ids):
    """Release ids -> this project's: 0 ('.', here as BOS) -> 1, word i -> i + 3."""
    return torch.where(ids == 0, torch.ones_like(ids), ids + 3)


OUT_PERM = [2] + [i + 3 for i in range(1, len(WORDS) + 1)]   # release output id -> this project's (0 -> EOS)


def convert(m, bank, **kw):
    cfg = release_checkpoint.model_config(m.state_dict(), load_preset("tiny", {"top_k": K, "top_m": M, "tau": TAU}), HEADS)
    return release_checkpoint.convert(m.state_dict(), WORDS, bank, cfg, **kw)


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
