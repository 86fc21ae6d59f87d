"""PCM-Net: salient concepts, patch-wise cross-modal mix-up, a visual-semantic encoder and a sentence decoder.

Read top to bottom: the config, the frozen concept machinery (salient concepts, textual patches,
the top-M marked patches), the token embedding (replace at training, append at inference), the
encoder with its inter-layer global feature, the decoder. Shapes use B batch, N patches, W the
CLIP patch width, D the CLIP joint width, C concepts, K salient concepts, d the model width,
T memory tokens, L caption tokens, V the vocabulary.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from pcm import bundled
from pcm.config import strict_scalars

PRESETS = bundled.PRESETS / "model"


class PCMNetConfig(BaseModel):
    """Architecture and PCM hyper-parameters; presets live in pcm/presets/model/*.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    _scalars = field_validator("*", mode="before")(strict_scalars)  # top_k=true is no count, pcm=1 no switch

    # CLIP feature shapes; None = taken from the encode outputs (a set value must match them).
    d_embed: int | None = Field(None, gt=0, description="CLIP joint width D (global feature, concepts)")
    d_width: int | None = Field(None, gt=0, description="CLIP patch width W (before ln_post/proj)")
    n_patches: int | None = Field(None, gt=0, description="patches per image N")
    # Transformer sizes.
    d_model: int = Field(512, gt=0, description="width of the encoder and decoder")
    n_heads: int = Field(8, gt=0, description="attention heads (d_model must divide by it)")
    n_enc_layers: int = Field(3, gt=0, description="visual encoder layers over the CLIP patch tokens")
    n_dec_layers: int = Field(3, gt=0, description="caption decoder layers")
    d_ff: int = Field(2048, gt=0, description="feed-forward width of each layer")
    # Dropout (release values).
    embed_dropout: float = Field(0.5, ge=0, lt=1, description="after ReLU -> LayerNorm of the input tokens")
    dropout: float = Field(0.2, ge=0, lt=1, description="encoder layers (0.25 for COCO ViT-L/14)")
    attn_dropout: float = Field(0.3, ge=0, lt=1, description="encoder attention weights")
    decoder_dropout: float | None = Field(
        None, ge=0, lt=1, description="decoder layers and word embeddings; None = `dropout` (the release shares one "
        "BERT config between encoder and decoder, attention dropout included)")
    output_dropout: float = Field(0.5, ge=0, lt=1, description="before the vocabulary projection")
    max_len: int = Field(20, gt=0, description="maximum caption length in words")
    # Initialisation and word embedding: this project's choice by default, the release's on request.
    word_embedding: Literal["scaled", "release"] = Field(
        "scaled", description="scaled: N(0, 1/d) words times sqrt(d) + sinusoid; release: N(0, 1) words + sinusoid, "
        "then LayerNorm")
    word_dropout: float | None = Field(None, ge=0, lt=1, description="after the word embedding; None = the decoder "
                                       "dropout (the release: 0.1)")
    position_init_std: float | None = Field(None, gt=0, description="visual position embeddings ~ N(0, std^2) "
                                            "truncated at +-2; None = N(0, 1), torch's default (the release: 0.02)")
    # PCM.
    pcm: bool = Field(True, description="patch-wise cross-modal mix-up on/off (off = plain visual tokens)")
    top_k: int = Field(5, gt=0, description="K salient concepts per image")
    top_m: int = Field(5, gt=0, description="M (patch, concept) pairs whose patches are mixed up")
    tau: float = Field(0.01, gt=0, description="softmax temperature of every concept similarity")
    # Noise injection on the global feature (training only).
    noise: bool = Field(True, description="inject Gaussian noise into the global feature at training")
    noise_variance: float = Field(0.016, ge=0, description="variance of each noise coordinate (std = sqrt)")
    clip_ln_eps: float = Field(1e-5, gt=0, description="epsilon of CLIP's ln_post")

    def with_data_shapes(self, d_embed: int, d_width: int, n_patches: int, where: str) -> PCMNetConfig:
        """Fill the CLIP shapes from the data; a preset value that disagrees is an error naming both."""
        got = {"d_embed": d_embed, "d_width": d_width, "n_patches": n_patches}
        bad = [f"{k}={getattr(self, k)} but the data has {v}" for k, v in got.items()
               if getattr(self, k) is not None and getattr(self, k) != v]
        if bad:
            raise ValueError(f"{where}: model config does not fit the features ({'; '.join(bad)}); "
                             "choose the preset of the CLIP model that encoded them (vitb32, vitl14) or override "
                             "model.d_embed / model.d_width / model.n_patches")
        return self.model_copy(update=got)


def load_preset(name: str, overrides: dict[str, Any] | None = None) -> PCMNetConfig:
    """A preset by name (or a .toml path), with field overrides applied and validated."""
    # A bare name picks a bundled preset (never a path built from it); a .toml path is explicit.
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"model preset file {name!r} not found; known presets: "
                             f"{', '.join(bundled.names('model', '.toml'))}")
    else:
        path = bundled.path("model", ".toml", name, "model")
    with open(path, "rb") as f:
        values = tomllib.load(f)
    return PCMNetConfig.model_validate({**values, **(overrides or {})})


@dataclass
class MixupPlan:
    """What PCM decides for a batch (all without gradients)."""

    salient: Tensor   # [B, K] concept indices, most similar first
    textual: Tensor   # [B, N, D] textual patch of every patch
    marked: Tensor    # [B, N] bool, patches appearing in the top-M (patch, concept) pairs


def sinusoid(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The Transformer's fixed sinusoidal positions [length, dim]."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


class PCMNet(nn.Module):
    """Zero-shot captioner over frozen CLIP features; `encode` then `decode`, or `forward` for training."""

    def __init__(self, cfg: PCMNetConfig, vocab_size: int, concept_bank: Tensor, clip_head: dict[str, Tensor]) -> None:
        super().__init__()
        if cfg.d_embed is None or cfg.d_width is None or cfg.n_patches is None:
            raise ValueError("PCMNetConfig needs d_embed, d_width and n_patches (see with_data_shapes)")
        if concept_bank.ndim != 2 or concept_bank.shape[1] != cfg.d_embed:
            raise ValueError(f"concept bank has shape {tuple(concept_bank.shape)}; expected [C, {cfg.d_embed}]")
        if cfg.pcm and concept_bank.shape[0] < cfg.top_k:
            raise ValueError(f"top_k={cfg.top_k} exceeds the {concept_bank.shape[0]} concepts of the bank")
        if cfg.pcm and cfg.top_m > cfg.n_patches * cfg.top_k:
            raise ValueError(f"top_m={cfg.top_m} exceeds the {cfg.n_patches}x{cfg.top_k} (patch, concept) pairs")
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        self.cfg, self.vocab_size = cfg, vocab_size
        d, n = cfg.d_model, cfg.n_patches

        # Frozen inputs of PCM: buffers (moved with .to(), never trained, saved apart in concepts.safetensors).
        self.register_buffer("concepts", F.normalize(concept_bank.float(), dim=-1), persistent=False)   # [C, D]
        self.register_buffer("ln_post_weight", clip_head["ln_post.weight"].float(), persistent=False)   # [W]
        self.register_buffer("ln_post_bias", clip_head["ln_post.bias"].float(), persistent=False)       # [W]
        self.register_buffer("proj", clip_head["proj"].float(), persistent=False)                       # [W, D]

        # Token embedding: W_g (global), W_v (visual patches), W_t (textual patches, only with PCM).
        self.w_global = nn.Linear(cfg.d_embed, d)
        self.w_visual = nn.Linear(cfg.d_width, d)
        self.w_textual = nn.Linear(cfg.d_embed, d) if cfg.pcm else None
        self.position = nn.Embedding(1 + n, d)   # token 0 = global, 1..N = patches (textual tokens reuse theirs)
        if cfg.position_init_std is not None:
            nn.init.trunc_normal_(self.position.weight, std=cfg.position_init_std)
        self.token_type = nn.Embedding(2, d)     # 0 = global / visual, 1 = textual
        self.embed_norm = nn.LayerNorm(d)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)

        # Visual-semantic encoder: post-LN layers; attention dropout set apart from the layer dropout.
        self.encoder = nn.ModuleList()
        for _ in range(cfg.n_enc_layers):
            layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="relu",
                                               batch_first=True, norm_first=False)
            layer.self_attn.dropout = cfg.attn_dropout  # MultiheadAttention reads this float at every call
            self.encoder.append(layer)
        # Inter-layer global feature: LN(W [g0; g1; ...; gL]) replaces token 0 of the final output.
        self.global_fuse = nn.Linear((cfg.n_enc_layers + 1) * d, d)
        self.global_norm = nn.LayerNorm(d)

        # Sentence decoder, trained from scratch.
        dec_dropout = cfg.dropout if cfg.decoder_dropout is None else cfg.decoder_dropout
        self.word_embed = nn.Embedding(vocab_size, d)
        if cfg.word_embedding == "scaled":
            # Scaled by sqrt(d) in `decode`, so initialised at std d^-0.5: words and the +-1 sinusoidal
            # positions start at the same scale (N(0, 1) would drown the positions 22x at d = 512).
            nn.init.normal_(self.word_embed.weight, std=d ** -0.5)
            self.word_norm = None
        else:
            # The release (X-modaler TokenBaseEmbedding): N(0, 1) words + positions, then LayerNorm.
            self.word_norm = nn.LayerNorm(d)
        self.dec_drop = nn.Dropout(dec_dropout if cfg.word_dropout is None else cfg.word_dropout)
        self.decoder = nn.ModuleList(
            nn.TransformerDecoderLayer(d, cfg.n_heads, cfg.d_ff, dec_dropout, activation="relu",
                                       batch_first=True, norm_first=False)
            for _ in range(cfg.n_dec_layers))
        for layer in self.decoder:  # attention dropout as in the encoder (the release shares the setting)
            layer.self_attn.dropout = layer.multihead_attn.dropout = cfg.attn_dropout
        self.out_drop = nn.Dropout(cfg.output_dropout)
        self.lm_head = nn.Linear(d, vocab_size)
        self.register_buffer("word_positions", sinusoid(cfg.max_len + 2, d), persistent=False)  # BOS + words + EOS

    # ------------------------------------------------------------------ PCM (frozen, no gradients)
    @torch.no_grad()
    def salient_concepts(self, global_feat: Tensor) -> Tensor:
        """Top-K concepts of softmax(cos(g, c) / tau) over the whole bank, on the clean g: [B, K]."""
        g = F.normalize(global_feat.float(), dim=-1)                                # [B, D]
        s = torch.softmax(g @ self.concepts.T / self.cfg.tau, dim=-1)             # [B, C]
        return s.topk(self.cfg.top_k, dim=-1).indices                              # [B, K]

    @torch.no_grad()
    def patch_to_joint(self, patches: Tensor) -> Tensor:
        """v' = proj(ln_post(v)) with CLIP's frozen head, L2-normalised: [B, N, W] -> [B, N, D]."""
        v = F.layer_norm(patches.float(), (patches.shape[-1],), self.ln_post_weight, self.ln_post_bias,
                         self.cfg.clip_ln_eps)
        return F.normalize(v @ self.proj, dim=-1)

    @torch.no_grad()
    def mixup_plan(self, global_feat: Tensor, patches: Tensor) -> MixupPlan:
        """Salient concepts, the textual patch of every patch and the patches of the top-M pairs.

        Always in fp32: under bf16 autocast, cosines divided by tau = 0.01 move by ~0.2 in logits and
        pick other concepts than the fp32 evaluation would (training and test must decide alike).
        """
        with torch.autocast(patches.device.type, enabled=False):
            return self._mixup_plan(global_feat.float(), patches.float())

    def _mixup_plan(self, global_feat: Tensor, patches: Tensor) -> MixupPlan:
        cfg = self.cfg
        salient = self.salient_concepts(global_feat)                               # [B, K]
        c = self.concepts[salient]                                                 # [B, K, D]
        affinity = self.patch_to_joint(patches) @ c.transpose(1, 2)                # [B, N, K] cosines
        textual = torch.softmax(affinity / cfg.tau, dim=-1) @ c                    # [B, N, D]
        # Top-M pairs of the softmax over all N*K pairs; softmax is monotone, it names the same pairs.
        pairs = torch.softmax(affinity.flatten(1) / cfg.tau, dim=-1)               # [B, N*K]
        top = pairs.topk(cfg.top_m, dim=-1).indices // cfg.top_k                   # [B, M] patch indices
        marked = torch.zeros(patches.shape[:2], dtype=torch.bool, device=patches.device)
        marked.scatter_(1, top, True)                                              # [B, N], <= M True
        return MixupPlan(salient=salient, textual=textual, marked=marked)

    # ------------------------------------------------------------------ encoder
    def noisy_global(self, global_feat: Tensor) -> Tensor:
        """CapDec noise: normalize(normalize(g) + N(0, noise_variance I)); identity in eval mode or when off."""
        g = F.normalize(global_feat.float(), dim=-1)
        if self.training and self.cfg.noise and self.cfg.noise_variance > 0:
            g = F.normalize(g + torch.randn_like(g) * math.sqrt(self.cfg.noise_variance), dim=-1)
        return g

    def embed(self, global_feat: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Input tokens [B, T, d] and their pad mask [B, T] (True = ignored), before the encoder.

        Training: T = 1 + N, marked patches replaced by their textual patch (token type 1).
        Eval: T = 1 + 2N, visual tokens untouched, textual tokens of all N positions appended
        with their patch's position and type 1; the unmarked ones are masked out.
        """
        cfg = self.cfg
        B, N, _ = patches.shape
        pos = self.position.weight                                                 # [1 + N, d]
        g = self.w_global(self.noisy_global(global_feat))[:, None] + pos[0]        # [B, 1, d]
        v = self.w_visual(patches.float())                                         # [B, N, d]
        type_v, type_t = self.token_type.weight[0], self.token_type.weight[1]      # [d]
        pad = torch.zeros(B, 1 + N, dtype=torch.bool, device=patches.device)      # [B, 1 + N]
        if not cfg.pcm:
            x = torch.cat([g, v + pos[1:]], dim=1) + type_v                        # [B, 1 + N, d]
        else:
            plan = self.mixup_plan(global_feat, patches)
            t = self.w_textual(plan.textual)                                       # [B, N, d]
            m = plan.marked[..., None].to(v.dtype)                                 # [B, N, 1]
            if self.training:
                mixed = (1 - m) * (v + type_v) + m * (t + type_t)                  # E_j, with its token type
                x = torch.cat([g + type_v, mixed + pos[1:]], dim=1)                # [B, 1 + N, d]
            else:
                x = torch.cat([g + type_v, v + pos[1:] + type_v, t + pos[1:] + type_t], dim=1)  # [B, 1 + 2N, d]
                pad = torch.cat([pad, ~plan.marked], dim=1)                        # [B, 1 + 2N]
        x = self.embed_drop(self.embed_norm(F.relu(x)))
        return x, pad

    def encode(self, global_feat: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Memory [B, T, d] and its pad mask [B, T] (True = ignored) from g [B, D] and patches [B, N, W]."""
        x, pad = self.embed(global_feat, patches)
        key_pad = None if self.training else pad  # nothing is padded in training: keep the fast SDPA path
        globals_ = [x[:, 0]]                                                       # g^(0)
        for layer in self.encoder:
            x = layer(x, src_key_padding_mask=key_pad)
            globals_.append(x[:, 0])                                               # g^(l)
        g = self.global_norm(self.global_fuse(torch.cat(globals_, dim=-1)))       # [B, d]
        return torch.cat([g[:, None], x[:, 1:]], dim=1), pad

    # ------------------------------------------------------------------ decoder
    def decode(self, tokens: Tensor, memory: Tensor, memory_pad: Tensor | None) -> Tensor:
        """Next-word logits [B, L, V] for tokens [B, L] (BOS first) attending causally and to the memory."""
        L = tokens.shape[1]
        if L > self.word_positions.shape[0]:
            raise ValueError(f"{L} tokens exceed max_len + 2 = {self.word_positions.shape[0]}")
        if self.word_norm is None:
            x = self.word_embed(tokens) * math.sqrt(self.cfg.d_model) + self.word_positions[:L]   # [B, L, d]
        else:
            x = self.word_norm(self.word_embed(tokens) + self.word_positions[:L])              # [B, L, d]
        x = self.dec_drop(x)
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).triu(1)  # True = may not attend
        for layer in self.decoder:
            x = layer(x, memory, tgt_mask=causal, memory_key_padding_mask=memory_pad, tgt_is_causal=True)
        return self.lm_head(self.out_drop(x))                                      # [B, L, V]

    def forward(self, global_feat: Tensor, patches: Tensor, tokens: Tensor) -> Tensor:
        memory, memory_pad = self.encode(global_feat, patches)
        return self.decode(tokens, memory, None if self.training else memory_pad)
