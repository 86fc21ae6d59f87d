"""CLIP-weighted cross-entropy (CXE) and its release options (label smoothing, focal factor): pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_weights(clip_score: Tensor, w: float, enabled: bool = True) -> Tensor:
    """Per-caption weight c = min(1, w * cos(g_I, g_S)) [B]; ones when CXE is off.

    A negative cosine (unrelated image and caption) is clamped to weight 0 so that no caption is
    ever trained away from; real CLIP scores of matching pairs are positive, so this only guards.
    """
    if not enabled:
        return torch.ones_like(clip_score, dtype=torch.float32)
    return (w * clip_score.float()).clamp(min=0.0, max=1.0)


def caption_loss(logits: Tensor, targets: Tensor, weights: Tensor | None = None, *, pad: int,
                 label_smoothing: float = 0.0, focal_gamma: float = 0.0) -> Tensor:
    """Weighted caption loss: mean over the batch of c_i * (sum of token NLL of caption i).

    logits [B, L, V], targets [B, L] (pad = ignored), weights [B] (None = 1). The weights are not
    normalised across the batch (the paper's rule); the batch reduction is a plain mean so the
    loss does not grow with the batch size. `label_smoothing` is that of F.cross_entropy;
    `focal_gamma` > 0 multiplies the loss by the batch mean over real tokens of (1 - p_target)^gamma.
    """
    B, L, V = logits.shape
    logits = logits.float()
    nll = F.cross_entropy(logits.reshape(B * L, V), targets.reshape(B * L), ignore_index=pad,
                          reduction="none", label_smoothing=label_smoothing).view(B, L)   # [B, L], 0 at pad
    per_caption = nll.sum(dim=1)                                                          # [B]
    if weights is not None:
        per_caption = per_caption * weights.to(per_caption.dtype)
    loss = per_caption.mean()
    if focal_gamma > 0:
        real = (targets != pad).to(logits.dtype)                                          # [B, L]
        p = torch.softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]   # [B, L]
        # A masked mean, not boolean indexing: no host sync, so the step stays CUDA-graph capturable.
        loss = loss * (((1 - p) ** focal_gamma) * real).sum() / real.sum().clamp(min=1)
    return loss

