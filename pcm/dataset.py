"""Training and validation data of PCM-Net: memory-mapped feature shards joined with scores and captions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pcm.vocab import Vocab
from storage import manifests, tables
from storage.arrays import open_arrays, read_header
from storage.layout import StageDir


def open_features(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The `global` [n, D] and `patches` [n, P, W] arrays of one encode feature shard and its n keys.

    The safetensors header is checked against the file (`open_arrays`); the arrays must be
    floating point, of those ranks, and agree on n with each other and with the `keys` metadata.
    Anything else is a ValueError naming the file.
    """
    redo = "delete it and its .done.json and rerun the encode stage (or `pcm encode --force`)"
    arrays, meta = open_arrays(path)
    for name, rank in (("global", 2), ("patches", 3)):
        a = arrays.get(name)
        if a is None:
            raise ValueError(f"{path}: no {name!r} array; expected encode's feature shard format; {redo}")
        if a.ndim != rank or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{path}: {name!r} is a {a.dtype} array of shape {list(a.shape)}; encode writes "
                             f"{rank}-d floating point features; {redo}")
    try:
        keys = json.loads(meta.get("keys", "[]"))
    except ValueError as e:
        raise ValueError(f"{path}: the 'keys' metadata is not JSON ({e}); {redo}") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{path}: the 'keys' metadata must be a JSON list of strings; {redo}")
    g, v = arrays["global"], arrays["patches"]
    if not g.shape[0] == v.shape[0] == len(keys):
        raise ValueError(f"{path}: the arrays disagree on the number of rows (global {list(g.shape)}, patches "
                         f"{list(v.shape)}, {len(keys)} keys); {redo}")
    return arrays, keys


class FeatureStore:
    """The `global` / `patches` arrays of a stage's feature shards, memory-mapped, opened on first use."""

    def __init__(self, sd: StageDir, kind: str) -> None:
        self.sd, self.kind = sd, kind
        self._open: dict[int, dict[str, np.ndarray]] = {}
        self._keys: dict[int, list[str]] = {}

    def shard(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._open:
            path = self.sd.feature_shard(self.kind, index)
            if not path.exists():
                raise FileNotFoundError(f"{path}: feature shard missing; rerun `pcm encode` to finish it")
            arrays, keys = open_features(path)
            if self._open:  # every shard of a store has the same feature shapes and dtypes
                first, ref = next(iter(self._open.items()))
                for name in ("global", "patches"):
                    if arrays[name].shape[1:] != ref[name].shape[1:] or arrays[name].dtype != ref[name].dtype:
                        raise ValueError(
                            f"{path}: {name!r} rows are {arrays[name].dtype} {list(arrays[name].shape[1:])} but "
                            f"{self.sd.feature_shard(self.kind, first)} has "
                            f"{ref[name].dtype} {list(ref[name].shape[1:])}; the feature shards come from "
                            "different encodes, rerun `pcm encode --force`")
            self._open[index] = arrays
            self._keys[index] = keys
        return self._open[index]

    def keys(self, index: int) -> list[str]:
        self.shard(index)
        return self._keys[index]

    def check_rows(self, shard: np.ndarray, row: np.ndarray, keys: list[str]) -> None:
        """Each (shard, row) must hold the feature of its key (the shard's metadata `keys`)."""
        for s, r, k in zip(shard.tolist(), row.tolist(), keys, strict=True):
            got = self.keys(s)
            if not 0 <= r < len(got) or got[r] != k:
                where = self.sd.feature_shard(self.kind, s)
                raise ValueError(f"{where}: row {r} should hold {k!r} but holds "
                                 f"{got[r] if 0 <= r < len(got) else 'nothing'}; the encode outputs are inconsistent, "
                                 "rerun `pcm encode --force`")

    def gather(self, shard: np.ndarray, row: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Global [B, D] and patches [B, N, W] of the given (shard, row) pairs, in order.

        Kept in the stored dtype (fp16): half the pinned memory and host-to-GPU bytes; the model
        widens them to float32 on the device.
        """
        first = self.shard(int(shard[0]))
        g = np.empty((len(row), *first["global"].shape[1:]), dtype=first["global"].dtype)
        v = np.empty((len(row), *first["patches"].shape[1:]), dtype=first["patches"].dtype)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            arrays = self.shard(int(s))
            n = arrays["global"].shape[0]
            if sel.size and not (0 <= int(row[sel].min()) and int(row[sel].max()) < n):
                bad = int(row[sel][(row[sel] < 0) | (row[sel] >= n)][0])
                raise ValueError(f"{self.sd.feature_shard(self.kind, int(s))}: row {bad} asked for but "
                                 f"the shard holds {n} rows; the encode outputs are inconsistent, rerun "
                                 "`pcm encode --force`")
            g[sel] = arrays["global"][row[sel]]
            v[sel] = arrays["patches"][row[sel]]
        return torch.from_numpy(g), torch.from_numpy(v)

    def shapes(self, index: int) -> tuple[int, int, int]:
        """(D_embed, D_width, N patches) of a shard."""
        a = self.shard(index)
        return int(a["global"].shape[1]), int(a["patches"].shape[2]), int(a["patches"].shape[1])


@dataclass
class Pairs:
    """Training (synthetic image, caption) pairs that encoded fine."""

    caption_ids: list[str]
    texts: list[str]
    shard: np.ndarray       # [n] int64
    row: np.ndarray         # [n] int64
    clip_score: np.ndarray  # [n] float32
    image_keys: list[str] | None = None  # whose synthetic image each (shard, row) holds; None: the caption's own

    def __post_init__(self) -> None:
        if self.image_keys is None:
            self.image_keys = list(self.caption_ids)

    def __len__(self) -> int:
        return len(self.caption_ids)

    def with_scores(self, clip_score: np.ndarray) -> Pairs:
        """The same pairs with other CLIP scores (what CXE weighs them by)."""
        return Pairs(self.caption_ids, self.texts, self.shard, self.row, np.asarray(clip_score, dtype=np.float32),
                     self.image_keys)

    def with_images_shuffled(self, seed: int) -> Pairs:
        """A CONTROL, not the method: every caption gets another caption's image (a seeded derangement),
        so a model trained on it can learn the captions' language but nothing about images."""
        n = len(self)
        if n < 2:
            raise ValueError("shuffling images across captions needs at least two training pairs")
        order = np.random.default_rng(seed).permutation(n)
        target = np.empty(n, dtype=np.int64)
        target[order] = np.roll(order, 1)          # image of order[k-1] -> caption order[k]: never its own
        return Pairs(self.caption_ids, self.texts, self.shard[target], self.row[target], self.clip_score,
                     [self.image_keys[t] for t in target])


def load_pairs(cap: StageDir, enc: StageDir, data_fraction: float = 1.0, seed: int = 0,
               refine: StageDir | None = None) -> Pairs:
    """Ok rows of scores.parquet joined with their caption text; a seeded `data_fraction` subset.

    With a refine stage: its kept pairs instead (each caption's re-assigned image and that pair's CLIP score).
    """
    if refine is not None:
        return _subset(refined_pairs(cap, enc, refine), data_fraction, seed)
    scores = manifests.SCORES.read(enc, columns=["caption_id", "shard", "row", "clip_score", "status"]).to_pylist()
    texts = {r["caption_id"]: r["text"] for r in tables.ok_rows(manifests.CAPTIONS.read(cap).to_pylist(), "train")}
    ok = sorted(tables.ok_rows(scores), key=lambda r: r["caption_id"])
    unknown = [r["caption_id"] for r in ok if r["caption_id"] not in texts]
    if unknown:
        raise ValueError(f"{manifests.SCORES.path(enc)}: {len(unknown)} caption ids (first {unknown[0]!r}) are not ok "
                         f"training captions of {manifests.CAPTIONS.path(cap)}; were both stages run on the same data?")
    if not ok:
        raise ValueError(f"{manifests.SCORES.path(enc)}: no rows with status ok; nothing to train on")
    return _subset(Pairs(caption_ids=[r["caption_id"] for r in ok], texts=[texts[r["caption_id"]] for r in ok],
                         shard=np.array([r["shard"] for r in ok], dtype=np.int64),
                         row=np.array([r["row"] for r in ok], dtype=np.int64),
                         clip_score=np.array([r["clip_score"] for r in ok], dtype=np.float32)),
                   data_fraction, seed)


def _subset(pairs: Pairs, data_fraction: float, seed: int) -> Pairs:
    """A seeded random `data_fraction` of the pairs, in their order (all of them at 1)."""
    if data_fraction >= 1.0:
        return pairs
    keep = max(1, round(data_fraction * len(pairs)))
    chosen = np.sort(np.random.default_rng(seed).permutation(len(pairs))[:keep])
    return Pairs([pairs.caption_ids[i] for i in chosen], [pairs.texts[i] for i in chosen], pairs.shard[chosen],
                 pairs.row[chosen], pairs.clip_score[chosen], [pairs.image_keys[i] for i in chosen])


def refined_pairs(cap: StageDir, enc: StageDir, ref: StageDir) -> Pairs:
    """The kept rows of a refine stage's pairs.parquet (by caption id): each caption with the image it was
    paired with (shard, row of the encode stage's features) and that pair's CLIP score."""
    made_from = {sd.stage: sd.fingerprint for sd in ref.inputs()}
    for sd in (cap, enc):
        if made_from.get(sd.stage, sd.fingerprint) != sd.fingerprint:
            raise ValueError(f"{ref.path}: this refine stage was made from {sd.stage} {made_from[sd.stage]}, not "
                             f"{sd.path}; pass the refine stage of these inputs")
    texts = {r["caption_id"]: r["text"] for r in tables.ok_rows(manifests.CAPTIONS.read(cap).to_pylist(), "train")}
    kept = sorted((r for r in manifests.PAIRS.read(ref).to_pylist() if r["status"] == tables.STATUS_KEPT),
                  key=lambda r: r["caption_id"])
    if not kept:
        raise ValueError(f"{manifests.PAIRS.path(ref)}: no kept pairs; nothing to train on")
    unknown = [r["caption_id"] for r in kept if r["caption_id"] not in texts]
    if unknown:
        raise ValueError(f"{manifests.PAIRS.path(ref)}: {len(unknown)} caption ids (first {unknown[0]!r}) are not ok "
                         f"training captions of {manifests.CAPTIONS.path(cap)}; pass the refine stage of these inputs")
    return Pairs(caption_ids=[r["caption_id"] for r in kept], texts=[texts[r["caption_id"]] for r in kept],
                 shard=np.array([r["shard"] for r in kept], dtype=np.int64),
                 row=np.array([r["row"] for r in kept], dtype=np.int64),
                 clip_score=np.array([r["clip_score"] for r in kept], dtype=np.float32),
                 image_keys=[r["image_caption_id"] for r in kept])


def load_concepts(enc: StageDir) -> tuple[list[str], torch.Tensor]:
    """Concept names and the L2-normalised concept bank [C, D] from an encode stage's concepts.parquet."""
    path, rows = manifests.CONCEPTS.path(enc), manifests.CONCEPTS.read(enc).to_pylist()
    if not rows:
        raise ValueError(f"{path}: the concept vocabulary is empty; encode needs training captions with nouns")
    bank = torch.tensor([r["embedding"] for r in rows], dtype=torch.float32)
    return [r["concept"] for r in rows], torch.nn.functional.normalize(bank, dim=-1)


def load_clip_head(enc: StageDir) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CLIP's frozen ln_post + proj and the file's metadata (clip spec JSON, ln_eps), of an encode stage."""
    path = enc.clip_head
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; rerun `pcm encode` (it writes the CLIP head)")
    head = load_file(str(path))
    missing = {"ln_post.weight", "ln_post.bias", "proj"} - set(head)
    if missing:
        raise ValueError(f"{path}: missing tensors {sorted(missing)}")
    return head, read_header(path)[1]


def caption_tokens(texts: list[str], vocab: Vocab, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoder inputs [n, max_len + 1] (BOS + words) and targets (words + EOS), padded with PAD."""
    inp = np.full((len(texts), max_len + 1), vocab.pad, dtype=np.int64)
    out = np.full((len(texts), max_len + 1), vocab.pad, dtype=np.int64)
    for i, t in enumerate(texts):
        ids = vocab.encode(t, max_len)
        inp[i, : len(ids) + 1] = [vocab.bos, *ids]
        out[i, : len(ids) + 1] = [*ids, vocab.eos]
    return inp, out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of an epoch: a permutation fixed by (seed, epoch), so any position resumes exactly."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochBatches(torch.utils.data.Dataset):
    """Batch i of the current epoch: the i-th global batch of the epoch's permutation, this rank's share.

    Global batches hold `batch_size` pairs (the last partial one is dropped so every step has the
    same batch); with `world` processes rank r takes every world-th pair of the global batch.
    """

    def __init__(self, pairs: Pairs, store: FeatureStore, inputs: np.ndarray, targets: np.ndarray, batch_size: int,
                 seed: int, rank: int = 0, world: int = 1) -> None:
        if batch_size > len(pairs):
            raise ValueError(f"batch_size={batch_size} exceeds the {len(pairs)} training pairs; lower batch_size")
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {world} processes")
        self.pairs, self.store, self.inputs, self.targets = pairs, store, inputs, targets
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.order = epoch, epoch_order(len(self.pairs), self.seed, epoch)

    def __len__(self) -> int:
        return len(self.pairs) // self.batch_size

    def indices(self, i: int) -> np.ndarray:
        return self.order[i * self.batch_size:(i + 1) * self.batch_size][self.rank::self.world]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        idx = self.indices(i)
        g, v = self.store.gather(self.pairs.shard[idx], self.pairs.row[idx])
        return {"global": g, "patches": v, "inputs": torch.from_numpy(self.inputs[idx]),
                "targets": torch.from_numpy(self.targets[idx]), "clip_score": torch.from_numpy(self.pairs.clip_score[idx])}
