"""The synthetic images a run plans: one per ok training caption, each with its own seed (independent of
order, batch, shard and worker), some rendered from another caption's prompt with `wrong_image_fraction`."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from storage import tables
from storage.shards import check_key


@dataclass(frozen=True)
class Sample:
    """One planned image: its caption and its own seed.

    With `wrong_image_fraction`, a swapped sample keeps its caption (`text`, what it is trained on) but
    is rendered from another caption's prompt, seed and image_path (`rendered_from` names that caption),
    so it gets exactly the image that caption would have had.
    """

    caption_id: str
    text: str
    seed: int
    image_path: str | None = None   # the caption's own image (read only for paired-image runs)
    rendered_from: str | None = None
    rendered_text: str | None = None

    @property
    def prompt(self) -> str:
        """What the generator renders: the caption, or for a swapped sample the other caption."""
        return self.text if self.rendered_text is None else self.rendered_text


def sample_seed(run_seed: int, caption_id: str) -> int:
    """A 63-bit seed from the run seed and the caption id: independent of order, batch and shard."""
    digest = hashlib.sha256(f"{run_seed}:{caption_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@functools.lru_cache(maxsize=4)
def train_samples(seed: int, limit: int | None, captions_file: str, paired: bool = False) -> tuple[Sample, ...]:
    """The ok train-split captions of `captions_file` (a captions.parquet) in file order, the first `limit`, each
    with its seed from the run's `seed`; `paired`: with the caption's own image_path."""
    # Cached per process: a finished ingest stage's captions.parquet never changes (its directory is
    # content-addressed), and one-task-per-shard flows would otherwise re-plan 600k captions per shard.
    path = Path(captions_file)
    columns = ["caption_id", "split", "text", "status"] + (["image_path"] if paired else [])
    table = tables.read(path, tables.CAPTIONS, columns=columns)
    out: list[Sample] = []
    seen: set[str] = set()
    values = [table[c].to_pylist() for c in columns]
    if not paired:
        values.append([None] * table.num_rows)
    for row, (cid, split, text, status, image_path) in enumerate(zip(*values, strict=True)):
        if split != "train" or status != tables.STATUS_OK:
            continue
        try:
            check_key(cid)
        except ValueError as e:
            raise ValueError(f"{path}: row {row}: {e}") from None
        if cid in seen:
            raise ValueError(f"{path}: row {row}: duplicate caption_id {cid!r}; caption ids must be unique")
        seen.add(cid)
        out.append(Sample(cid, text, sample_seed(seed, cid), image_path))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no ok train captions to synthesize; check the ingest stage's splits and statuses")
    return tuple(out)


@functools.lru_cache(maxsize=4)
def swapped_samples(seed: int, limit: int | None, captions_file: str, paired: bool, fraction: float) -> tuple[Sample, ...]:
    """The plan with round(fraction * n) samples, chosen by the seed, each given another chosen one's image.

    A cyclic shift over a seeded random order of the chosen samples is a derangement: no chosen sample keeps
    its own image, and the set of images is unchanged (only the pairing is wrong).
    """
    import numpy as np

    samples = train_samples(seed, limit, captions_file, paired)
    n = len(samples)
    m = round(fraction * n)
    if m < 2:
        raise ValueError(f"synthesize.wrong_image_fraction={fraction} of {n} captions swaps {m}; a swap needs at "
                         "least 2 captions: raise the fraction or use more captions")
    # Its own random stream (the "wrong" tag), so the choice does not move with anything else seeded by `seed`.
    chosen = np.random.default_rng([seed, 0x77726F6E67]).permutation(n)[:m]
    out = list(samples)
    for k, i in enumerate(chosen):
        src = samples[chosen[k - 1]]   # k = 0 takes the last chosen one's image
        out[i] = replace(samples[i], seed=src.seed, image_path=src.image_path,
                                     rendered_from=src.caption_id, rendered_text=src.text)
    return tuple(out)
