"""The authors' X-modaler checkpoints as PCMNet weights: every parameter name mapped, or a refusal listing them.

Module names are those of the release (jianjieluo/PCM-Net on X-modaler, read for this mapping):
`TransformerEncoderDecoder` holds `token_embed` (TokenBaseEmbedding: `embeddings`, `embeddings_norm`,
`embeddings_pos.pe` = fixed sinusoid), `visual_embed` (VisualGridClipTagLREmbedding: `embeddings`
W_v, `g_embeddings` W_g, `t_embeddings` W_t, `embeddings_pos` [1, 1+N, d], `embeddings_token_type`,
`embeddings_norm`, and CLIP's frozen `ln_post` and `proj`), `encoder` (GTransformerEncoder: `layers.i`
BertLayer, `gvfeat_embed` = Linear + LayerNorm), `decoder` (TransformerDecoder: `g_layers.i`
BertGenerationLayer) and `predictor` (BasePredictor: `logits`). A BERT layer's separate query / key /
value projections become one `in_proj` of torch's MultiheadAttention, in that order.

Vocabulary: X-modaler's id 0 is '.', both BOS and EOS; word i of vocabulary.txt has id i + 1. This
project's ids 0..3 are PAD, BOS, EOS, UNK, then the words in the release's order: BOS and EOS read
row 0 as input, EOS predicts with row 0, and PAD, BOS, UNK are never predicted (zero weights, bias
-1e4), so the softmax over this project's vocabulary equals the release's.

Not in a checkpoint, so given or assumed: the vocabulary file, the concept bank (non-persistent in
the release: the concept pickle), the number of attention heads (8 in all four release configs) and
top_k / top_m / tau (5 / 5 / 0.01 in all four). One numeric difference remains: the release's BERT
layers use LayerNorm eps 1e-12, torch's Transformer layers here 1e-5 (a relative change of ~1e-5 in
the logits; tests/test_release_checkpoint.py measures it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcm.model import PCMNet, PCMNetConfig, sinusoid
from pcm.vocab import SPECIALS, Vocab

RELEASE_PREFIXES = ("module.",)   # a DistributedDataParallel save
NEVER_PREDICTED_BIAS = -1e4       # logit bias of the rows the release has no word for (PAD, BOS, UNK)
RELEASE_HEADS = 8                 # MODEL.BERT.NUM_ATTENTION_HEADS in all four release training configs

_EMBED = {  # release visual/token embedding parameter -> PCMNet parameter
    "visual_embed.embeddings": "w_visual",
    "visual_embed.g_embeddings": "w_global",
    "visual_embed.t_embeddings": "w_textual",
    "visual_embed.embeddings_token_type": "token_type",
    "visual_embed.embeddings_norm": "embed_norm",
    "encoder.gvfeat_embed.0": "global_fuse",
    "encoder.gvfeat_embed.1": "global_norm",
    "token_embed.embeddings_norm": "word_norm",
}
_ENCODER_LAYER = {  # BertLayer -> nn.TransformerEncoderLayer (post-LN)
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "output.LayerNorm": "norm2",
}
_DECODER_LAYER = {  # BertGenerationLayer -> nn.TransformerDecoderLayer (post-LN)
    "self_attn.output.dense": "self_attn.out_proj",
    "self_attn.output.LayerNorm": "norm1",
    "x_att.output.dense": "multihead_attn.out_proj",
    "x_att.output.LayerNorm": "norm2",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "output.LayerNorm": "norm3",
}
_QKV = {"encoder.layers.{i}.attention.self": "encoder.{i}.self_attn",
        "decoder.g_layers.{i}.self_attn.self": "decoder.{i}.self_attn",
        "decoder.g_layers.{i}.x_att.self": "decoder.{i}.multihead_attn"}
CLIP_HEAD = {"visual_embed.ln_post.weight": "ln_post.weight", "visual_embed.ln_post.bias": "ln_post.bias",
             "visual_embed.proj": "proj"}
SINUSOID = "token_embed.embeddings_pos.pe"
CONCEPT_BUFFER = "visual_embed.tag_vocab_embed"   # non-persistent in the release; checked when a file has it


class CheckpointMismatch(ValueError):
    """A release checkpoint whose parameters do not all map onto PCMNet (or the reverse)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model tensors of an X-modaler .pth, loaded with torch.load(weights_only=True) (nothing executes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for a refused or bad file
        raise CheckpointMismatch(
            f"{path}: not loadable as weights only ({type(e).__name__}: {str(e).splitlines()[0][:300]}); a checkpoint "
            "holding other objects (an optimizer's or trainer's state with classes) is refused rather than unpickled: "
            "on a machine you trust, save its 'model' state dict alone (torch.save(ckpt['model'], 'model.pth'))") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointMismatch(f"{path}: expected a state dict of tensors (or a dict with one under 'model'), "
                                 f"got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        for p in RELEASE_PREFIXES:
            k = k.removeprefix(p)
        out[k] = v
    return out


def read_release_vocabulary(path: str | os.PathLike) -> list[str]:
    """The words of an X-modaler vocabulary.txt (one a line; id = line number + 1, id 0 being '.')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; give the release's vocabulary.txt (INFERENCE.VOCAB)")
    words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    seen: dict[str, int] = {}
    for n, w in enumerate(words, 1):
        if not w or w in SPECIALS:
            raise CheckpointMismatch(f"{path}: line {n}: {'an empty word' if not w else repr(w)} cannot be a word "
                                     f"of this project's vocabulary ({', '.join(SPECIALS)} are reserved)")
        if w in seen:
            raise CheckpointMismatch(f"{path}: line {n}: {w!r} repeats line {seen[w]}")
        seen[w] = n
    return words


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def release_shapes(sd: dict[str, Tensor]) -> dict[str, int]:
    """The architecture a release state dict implies (PCMNetConfig field names), read from its tensor shapes."""
    need = ["visual_embed.embeddings.weight", "visual_embed.g_embeddings.weight", "visual_embed.embeddings_pos",
            "encoder.layers.0.intermediate.dense.weight", "predictor.logits.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointMismatch(f"not a PCM-Net release state dict: missing {missing} (found e.g. {sorted(sd)[:8]})")
    d, width = sd["visual_embed.embeddings.weight"].shape
    return {"d_model": int(d), "d_width": int(width), "d_embed": int(sd["visual_embed.g_embeddings.weight"].shape[1]),
            "n_patches": int(sd["visual_embed.embeddings_pos"].shape[-2]) - 1,
            "d_ff": int(sd["encoder.layers.0.intermediate.dense.weight"].shape[0]),
            "n_enc_layers": _count(sd, r"encoder\.layers\.(\d+)\."),
            "n_dec_layers": _count(sd, r"decoder\.g_layers\.(\d+)\."),
            "vocab_size": int(sd["predictor.logits.weight"].shape[0])}


def _vocab_rows(t: Tensor, n_words: int, fill: float, output: bool) -> Tensor:
    """Rows of a [1 + words, ...] release tensor in this project's order: PAD, BOS, EOS, UNK, words.

    Row 0 ('.') is BOS and EOS in the release: as input (`output` False) PAD, BOS and EOS read it (UNK never
    occurs in a caption decoded here); as output only EOS predicts it, and PAD, BOS, UNK are `fill`.
    """
    row0, words = t[:1], t[1:1 + n_words]
    filler = torch.full_like(row0, fill)
    if output:
        return torch.cat([filler, filler, row0, filler, words])
    return torch.cat([row0, row0, row0, filler, words])


def map_state_dict(sd: dict[str, Tensor], n_enc: int, n_dec: int, n_words: int) -> dict[str, Tensor]:
    """PCMNet's state dict from the release's; a name that maps to nothing, or a missing one, is an error."""
    ours: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        used.add(name)
        return sd[name]

    def linear_like(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                ours[f"{dst}.{p}"] = take(f"{src}.{p}")

    for src, dst in _EMBED.items():
        linear_like(src, dst)
    if "visual_embed.embeddings_pos" in sd:
        ours["position.weight"] = take("visual_embed.embeddings_pos").reshape(-1, sd["visual_embed.embeddings_pos"].shape[-1])
    for i in range(n_enc):
        for src, dst in _ENCODER_LAYER.items():
            linear_like(f"encoder.layers.{i}.{src}", f"encoder.{i}.{dst}")
    for i in range(n_dec):
        for src, dst in _DECODER_LAYER.items():
            linear_like(f"decoder.g_layers.{i}.{src}", f"decoder.{i}.{dst}")
    for src_t, dst_t in _QKV.items():
        for i in range(n_enc if src_t.startswith("encoder") else n_dec):
            src, dst = src_t.format(i=i), dst_t.format(i=i)
            for p, q in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
                parts = [f"{src}.{x}.{p}" for x in ("query", "key", "value")]
                if all(k in sd for k in parts):
                    ours[f"{dst}.{q}"] = torch.cat([take(k) for k in parts])
    if "token_embed.embeddings.weight" in sd:
        ours["word_embed.weight"] = _vocab_rows(take("token_embed.embeddings.weight"), n_words, 0.0, False)
    if "predictor.logits.weight" in sd:
        ours["lm_head.weight"] = _vocab_rows(take("predictor.logits.weight"), n_words, 0.0, True)
    if "predictor.logits.bias" in sd:
        ours["lm_head.bias"] = _vocab_rows(take("predictor.logits.bias"), n_words, NEVER_PREDICTED_BIAS, True)
    used.update(k for k in (*CLIP_HEAD, SINUSOID, CONCEPT_BUFFER) if k in sd)  # checked by `convert`
    unmapped = sorted(set(sd) - used)
    if unmapped:
        raise CheckpointMismatch(f"{len(unmapped)} release parameter(s) do not map onto PCMNet: {unmapped[:20]}"
                                 f"{' ...' if len(unmapped) > 20 else ''}")
    return ours


def model_config(sd: dict[str, Tensor], base: PCMNetConfig, n_heads: int = RELEASE_HEADS) -> PCMNetConfig:
    """`base` (a preset: dropouts, top_k, ...) with the architecture of the checkpoint and the release's word
    embedding (N(0, 1) + sinusoid, then LayerNorm)."""
    shapes = {k: v for k, v in release_shapes(sd).items() if k != "vocab_size"}
    return base.model_copy(update={**shapes, "n_heads": n_heads, "word_embedding": "release"})


def convert(sd: dict[str, Tensor], words: list[str], bank: Tensor, cfg: PCMNetConfig,
            clip_head: dict[str, Tensor] | None = None) -> tuple[PCMNet, Vocab]:
    """A PCMNet (eval mode) and its Vocab holding the release checkpoint's weights; refuses any mismatch.

    `clip_head`: CLIP's ln_post and proj, by default the copy the release checkpoint holds.
    """
    shapes = release_shapes(sd)
    if shapes["vocab_size"] != len(words) + 1:
        raise CheckpointMismatch(f"the checkpoint predicts {shapes['vocab_size']} tokens but the vocabulary file has "
                                 f"{len(words)} words (+ '.' = {len(words) + 1}): give the vocabulary.txt it was "
                                 "trained with")
    if clip_head is None:
        missing = [k for k in CLIP_HEAD if k not in sd]
        if missing:
            raise CheckpointMismatch(f"the checkpoint has no CLIP head ({missing}); give the CLIP's ln_post and proj")
        clip_head = {dst: sd[src] for src, dst in CLIP_HEAD.items()}
    if SINUSOID in sd:
        pe = sd[SINUSOID].reshape(-1, sd[SINUSOID].shape[-1])
        L = cfg.max_len + 2
        if pe.shape[0] < L or not torch.allclose(pe[:L].float(), sinusoid(L, pe.shape[-1]), atol=1e-5):
            raise CheckpointMismatch(f"{SINUSOID}: the word positions are not the sinusoid PCMNet uses "
                                     "(X-modaler's SinusoidEncoding with POSITION_MAX_LEN 5000 is)")
    if CONCEPT_BUFFER in sd:
        saved = torch.nn.functional.normalize(sd[CONCEPT_BUFFER].float(), dim=-1)
        if saved.shape != bank.shape or not torch.allclose(saved, torch.nn.functional.normalize(bank.float(), dim=-1),
                                                           atol=1e-4):
            raise CheckpointMismatch(f"{CONCEPT_BUFFER} in the checkpoint ({tuple(saved.shape)}) differs from the "
                                     f"concept bank given ({tuple(bank.shape)})")
    vocab = Vocab([*SPECIALS, *words])
    ours = map_state_dict(sd, shapes["n_enc_layers"], shapes["n_dec_layers"], len(words))
    model = PCMNet(cfg, len(vocab), bank, clip_head)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(ours)), sorted(set(ours) - expected)
    if missing or extra:
        raise CheckpointMismatch(f"PCMNet parameters without a release counterpart: {missing}; mapped names PCMNet "
                                 f"lacks: {extra}")
    try:
        model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointMismatch(f"release tensors do not fit PCMNet's shapes: {e}") from None
    return model.eval(), vocab


def describe(sd: dict[str, Tensor]) -> dict[str, Any]:
    """What the import records about the source checkpoint (shapes, parameter count)."""
    return {**release_shapes(sd), "tensors": len(sd), "parameters": int(sum(v.numel() for v in sd.values()))}
