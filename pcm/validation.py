"""The validation score the train stage keeps its best checkpoint by: CIDEr of the captions decoded from the val
images' stored features, or the caption loss per reference (no decoding, no Java)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pcm.dataset import caption_tokens
from pcm.decode import decode_features
from pcm.loss import caption_loss
from pcm.split_images import SplitImages, feature_batches


def evaluate_val(model: Any, vocab: Any, val: SplitImages, store: Any, device: Any, autocast: Any, *, metric: str,
                 beam: int, batch_size: int) -> float:
    """Validation score on the real val images `val` (features from `store`, a pcm.dataset.FeatureStore): `metric`
    "cider" (captions decoded greedily, or with a beam of `beam`) or "loss" (the caption loss per reference),
    `batch_size` images at a time on `device` under `autocast`."""
    if metric == "cider":
        from pcm.metrics import score_cider  # the COCO scorers, loaded only when used

        with torch.no_grad(), autocast:
            batches = (([val.image_ids[i] for i in at], g, v)
                       for at, g, v in feature_batches(val, store, device, batch_size))
            predictions = decode_features(model, vocab, batches, beam_size=beam, max_len=model.cfg.max_len,
                                          length_penalty=0.0)
        return score_cider(predictions, dict(zip(val.image_ids, val.references, strict=True)))
    losses: list[float] = []
    with torch.no_grad(), autocast:
        for at, g, v in feature_batches(val, store, device, batch_size):
            refs = [val.references[i] for i in at]
            which = np.repeat(np.arange(len(refs)), [len(r) for r in refs])
            inp, out = caption_tokens([t for r in refs for t in r], vocab, model.cfg.max_len)
            memory, pad = model.encode(g, v)
            logits = model.decode(torch.from_numpy(inp).to(device), memory[which], pad[which])
            n = len(which)
            losses.append(float(caption_loss(logits, torch.from_numpy(out).to(device), pad=vocab.pad)) * n)
    return sum(losses) / sum(len(r) for r in val.references)

