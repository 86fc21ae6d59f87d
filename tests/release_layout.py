"""A module in the release's layout (evaluation path) for the release-checkpoint tests.

Written for the tests from the release's module names and forward passes (jianjieluo/PCM-Net:
VisualGridClipTagLREmbedding, GTransformerEncoder; X-modaler: TokenBaseEmbedding, SinusoidEncoding,
BertLayer, BertGenerationLayer, TransformerDecoder, BasePredictor). Its state dict has the release's
parameter names. The CLIP shapes W, D, N are module globals that `release_model(dims=...)` sets.
"""

from __future__ import annotations

import copy
import math

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


def set_dims(w: int, d: int, n: int) -> tuple[int, int, int]:
    """Set the CLIP shapes (patch width, joint width, patches) the layout is built with; returns the old ones."""
    global W, D, N
    old = (W, D, N)
    W, D, N = w, d, n
    return old
