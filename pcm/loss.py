"""CLIP-weighted cross-entropy (CXE) and the release's numerics (label smoothing, focal factor, token mean).

The paper's rule is the default: c_i * (sum of token NLL of caption i), averaged over captions.
The authors' release (X-modaler's `WeightedLabelSmoothing`, gamma_type "batch") differs in three
ways, each its own argument here: the NLL is a KL divergence to a smoothed target (1 - eps on the
target word, eps / (V - 1) on every other word), the loss is multiplied by the batch mean of the
focal factor (1 - p_target)^gamma, and the weighted token losses are averaged over the real
tokens of the batch instead of summed per caption (about 11x smaller at COCO's ~11 words, which
changes what clipping gradients by value 0.1 does).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["caption-sum", "token-mean"]


def clip_weights(clip_score: Tensor, w: float, enabled: bool = True) -> Tensor:
    """Per-caption weight c = min(1, w * cos(g_I, g_S)) [B]; ones when CXE is off.

    A negative cosine (unrelated image and caption) is clamped to weight 0 so that no caption is
    ever trained away from; real CLIP scores of matching pairs are positive, so this only guards.
    """
    if not enabled:
        return torch.ones_like(clip_score, dtype=torch.float32)
    return (w * clip_score.float()).clamp(min=0.0, max=1.0)


def auto_cxe_w(clip_scores: np.ndarray) -> float:
    """CXE's w calibrated to the data: 1 / the median CLIP score of the training pairs, so the median pair
    sits at the cap (weight 1) and worse pairs weigh less. The paper's w = 4 does the same by hand for
    OpenAI CLIP, whose matched cosines sit near 0.25."""
    median = float(np.median(np.asarray(clip_scores, dtype=np.float64))) if len(clip_scores) else 0.0
    if not median > 0:
        raise ValueError(f"train.cxe_w = 'auto': the median CLIP score of the {len(clip_scores)} training pairs is "
                         f"{median:.4f}; w = 1 / median needs it positive: give cxe_w a number or turn cxe off")
    return 1.0 / median


def cxe_weights_np(clip_scores: np.ndarray, w: float) -> np.ndarray:
    """`clip_weights` on a numpy array (float64): min(1, w * cos), clamped at 0."""
    return np.clip(w * np.asarray(clip_scores, dtype=np.float64), 0.0, 1.0)


def token_losses(logp: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-token loss [...] from log-probabilities [..., V] and target ids [...] (any id; masking is the caller's).

    0 smoothing: the NLL -log p_t. Otherwise the release's KL(q || p) with q = 1 - eps on the target and
    eps / (V - 1) elsewhere, written out so that no [N, V] target distribution is materialised:
    KL = sum_v q_v log q_v - (1 - eps) log p_t - eps / (V - 1) * (sum_v log p_v - log p_t).
    """
    logp_t = logp.gather(-1, targets[..., None])[..., 0]
    if label_smoothing == 0:
        return -logp_t
    eps, V = label_smoothing, logp.shape[-1]
    off = eps / (V - 1)
    entropy = (1 - eps) * math.log(1 - eps) + eps * math.log(off)   # sum_v q_v log q_v, a constant
    return entropy - (1 - eps) * logp_t - off * (logp.sum(-1) - logp_t)


def caption_loss(logits: Tensor, targets: Tensor, weights: Tensor | None = None, *, pad: int,
                 label_smoothing: float = 0.0, focal_gamma: float = 0.0,
                 reduction: Reduction = "caption-sum") -> Tensor:
    """Weighted caption loss of logits [B, L, V] for targets [B, L] (pad = ignored) and weights [B] (None = 1).

    `reduction`: "caption-sum" (paper) = mean over captions of c_i * sum of its token losses, the
    weights not normalised across the batch; "token-mean" (release) = mean over the batch's real
    tokens of c_i * token loss. `label_smoothing` > 0 uses the release's KL (see `token_losses`);
    `focal_gamma` > 0 multiplies the loss by the batch mean over real tokens of (1 - p_target)^gamma,
    gradients flowing through it as in the release.
    """
    logp = F.log_softmax(logits.float(), dim=-1)                                   # [B, L, V]
    real = (targets != pad).to(logp.dtype)                                         # [B, L]
    safe = torch.where(targets == pad, torch.zeros_like(targets), targets)         # pad rows gather id 0
    tok = token_losses(logp, safe, label_smoothing) * real                         # [B, L], 0 at pad
    if weights is not None:
        tok = tok * weights.to(tok.dtype)[:, None]
    # Masked sums, not boolean indexing: no host sync, so the step stays CUDA-graph capturable.
    n_real = real.sum().clamp(min=1)
    if reduction == "caption-sum":
        loss = tok.sum(dim=1).mean()
    elif reduction == "token-mean":
        loss = tok.sum() / n_real
    else:
        raise ValueError(f"reduction={reduction!r}: choose 'caption-sum' (paper) or 'token-mean' (release)")
    if focal_gamma > 0:
        p = logp.gather(-1, safe[..., None])[..., 0].exp()                         # [B, L]
        loss = loss * (((1 - p) ** focal_gamma) * real).sum() / n_real
    return loss
