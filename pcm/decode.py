"""Caption decoding for PCM-Net: batched beam search and greedy search over `model.encode` / `model.decode`.

Both searches encode each image once, then call `model.decode` on the growing token prefixes
(the model has no incremental state, so every step re-reads the whole prefix; captions are at
most ~20 tokens, so this costs little next to the memory it saves in code). Token ids are
returned without BOS and EOS. Tokens in `banned` (callers pass PAD, BOS and UNK) are never
generated: an `<unk>` in a caption only costs BLEU and CIDEr.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _check_inputs(model: Any, global_feat: torch.Tensor, patches: torch.Tensor, max_len: int) -> None:
    if getattr(model, "training", False):
        # Training mode would replace patches instead of appending textual tokens and keep dropout on.
        raise ValueError("decoding needs the model in eval mode: call model.eval() first")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if global_feat.ndim != 2 or patches.ndim != 3 or global_feat.shape[0] != patches.shape[0]:
        raise ValueError(f"expected global_feat [B, D] and patches [B, P, W] with the same B; got "
                         f"{tuple(global_feat.shape)} and {tuple(patches.shape)}")


def _strip(rows: torch.Tensor, eos: int) -> list[list[int]]:
    """Token rows without BOS ([N, L], BOS already removed) -> lists cut before the first EOS."""
    out = []
    for row in rows.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


@torch.no_grad()
def greedy_decode(model: Any, global_feat: torch.Tensor, patches: torch.Tensor, *, bos: int, eos: int,
                  max_len: int = 20, banned: Sequence[int] = ()) -> list[list[int]]:
    """The most likely next token at every step, for a batch; at most `max_len` tokens per caption."""
    _check_inputs(model, global_feat, patches, max_len)
    memory, memory_pad = model.encode(global_feat, patches)               # [B, T, D], [B, T]
    B = global_feat.shape[0]
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=global_feat.device)  # [B, 1]
    finished = torch.zeros(B, dtype=torch.bool, device=global_feat.device)
    for _ in range(max_len):
        logits = model.decode(tokens, memory, memory_pad)[:, -1]          # [B, V]
        if banned:
            logits[:, list(banned)] = float("-inf")
        nxt = logits.argmax(dim=-1)                                       # [B]
        nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)       # finished rows only pad with EOS
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)                 # [B, L + 1]
        finished |= nxt == eos
        if bool(finished.all()):
            break
    return _strip(tokens[:, 1:], eos)


def _expand(x: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """[B, ...] -> [B * k, ...], each row repeated k times in place (beams of one image are adjacent)."""
    return None if x is None else x.repeat_interleave(k, dim=0)


@torch.no_grad()
def beam_search(model: Any, global_feat: torch.Tensor, patches: torch.Tensor, *, bos: int, eos: int,
                beam_size: int = 3, max_len: int = 20, length_penalty: float = 0.0,
                banned: Sequence[int] = ()) -> list[list[int]]:
    """Batched beam search; returns the highest-scoring caption of each image.

    A hypothesis' score is the sum of its token log-probabilities (EOS included). A hypothesis
    that emits EOS is finished: it keeps its beam slot with its score frozen, so it competes
    with the live ones until the end. Hypotheses still live after `max_len` tokens are cut
    there. With `length_penalty` a > 0 the final choice ranks score / length**a (length counts
    the generated tokens, EOS included); the beams are still pruned by their raw score.
    The search stops early once no live hypothesis of any image can beat its best finished one.
    """
    _check_inputs(model, global_feat, patches, max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    device = global_feat.device
    B, K = global_feat.shape[0], beam_size
    memory, memory_pad = model.encode(global_feat, patches)               # [B, T, D], [B, T]
    memory, memory_pad = _expand(memory, K), _expand(memory_pad, K)       # [B*K, T, D], [B*K, T]

    tokens = torch.full((B * K, 1), bos, dtype=torch.long, device=device)  # [B*K, 1]
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0                        # all beams start identical: expand only the first one
    finished = torch.zeros((B, K), dtype=torch.bool, device=device)
    lengths = torch.zeros((B, K), dtype=torch.long, device=device)
    batch_base = torch.arange(B, device=device)[:, None] * K              # [B, 1] row offset of each image

    def ranked(s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return s / n.clamp(min=1).float() ** length_penalty if length_penalty else s

    for _ in range(max_len):
        logits = model.decode(tokens, memory, memory_pad)[:, -1]          # [B*K, V]
        if banned:
            logits[:, list(banned)] = float("-inf")
        logp = F.log_softmax(logits.float(), dim=-1).view(B, K, -1)       # [B, K, V]
        V = logp.shape[-1]
        # A finished beam may only "emit" EOS again, at no cost: one candidate, same score.
        frozen = torch.full((V,), float("-inf"), device=device)
        frozen[eos] = 0.0
        logp = torch.where(finished[..., None], frozen, logp)
        cand = scores[..., None] + logp                                   # [B, K, V]
        scores, flat = cand.view(B, K * V).topk(K, dim=-1)                # [B, K]
        src, tok = flat // V, flat % V                                    # source beam, new token
        was_finished = finished.gather(1, src)
        finished = was_finished | (tok == eos)
        lengths = lengths.gather(1, src) + (~was_finished).long()
        tokens = torch.cat([tokens[(batch_base + src).view(-1)], tok.view(-1, 1)], dim=1)  # [B*K, L + 1]

        # Scores only decrease, so a live beam's best possible final rank is its score now at the
        # longest length; once that cannot beat the best finished hypothesis the image is done.
        best_done = ranked(scores, lengths).masked_fill(~finished, float("-inf")).amax(dim=1)
        limit = torch.full_like(lengths, max_len)
        best_live = ranked(scores, limit).masked_fill(finished, float("-inf")).amax(dim=1)
        if bool((best_done >= best_live).all()):
            break

    best = ranked(scores, lengths).argmax(dim=1)                          # [B]
    chosen = tokens[(batch_base[:, 0] + best)]                            # [B, L]
    return _strip(chosen[:, 1:], eos)


def decode_features(model: Any, vocab: Any, batches: Iterable[tuple[Sequence[str], torch.Tensor, torch.Tensor]], *,
                    beam_size: int, max_len: int, length_penalty: float) -> dict[str, str]:
    """Captions of stored image features, image id -> caption text, in the order the batches give them.

    `batches` yields (image ids, global features [b, D], patches [b, P, W]) already on the model's
    device. `beam_size` 1 is greedy search (the argmax path, which a beam of one equals), else beam
    search ranking finished captions by score / length**`length_penalty`; at most `max_len` words.
    """
    captions: dict[str, str] = {}
    for image_ids, global_feat, patches in batches:
        if beam_size == 1:
            ids = greedy_decode(model, global_feat, patches, bos=vocab.bos, eos=vocab.eos, banned=vocab.banned,
                                max_len=max_len)
        else:
            ids = beam_search(model, global_feat, patches, bos=vocab.bos, eos=vocab.eos, banned=vocab.banned,
                              beam_size=beam_size, max_len=max_len, length_penalty=length_penalty)
        captions.update(zip(image_ids, (vocab.decode(s) for s in ids), strict=True))
    return captions
