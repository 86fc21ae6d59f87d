"""The authors' released CLIP features: one `<id>.npz` per image (jianjieluo/OpenAI-CLIP-Feature).

Each file is `np.savez_compressed(path, features=[N, W] float32, g_feature=[1, D] float32)`:
`features` are the last transformer block's tokens without CLS, before ln_post/proj (the release's
ViT-B/32: 49 x 768), `g_feature` the CLIP image embedding proj(ln_post(CLS)), not normalised (the
release's data loader normalises it). Files are named by the image's integer id (the digits after
the last `_` of the image file's name) and, for the synthetic images, kept in one folder per split
(`<FEATS_FOLDER>_sp<k>/`). Read with `allow_pickle=False`: an object array in a file is refused,
never unpickled.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PATCHES_KEY = "features"    # [N, W] pre-ln_post patch tokens
GLOBAL_KEY = "g_feature"    # [1, D] (or [D]) CLIP image embedding
SUFFIX = ".npz"
_TRAILING_ID = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class NpzIndex:
    """The .npz files under a folder (any depth), by file stem."""

    root: Path
    files: dict[str, Path]

    def find(self, *names: str | None) -> Path | None:
        """The file of the first name that has one: the name itself, else its trailing integer (the release's id)."""
        for name in names:
            if not name:
                continue
            base = Path(name).name
            for candidate in (base, Path(base).stem, release_id(Path(base).stem)):
                if candidate is not None and candidate in self.files:
                    return self.files[candidate]
        return None


def release_id(name: str) -> str | None:
    """The release's file id of an image name: its trailing digits as an integer (COCO_val2014_000000391895 -> 391895)."""
    m = _TRAILING_ID.search(name)
    return str(int(m.group(1))) if m else None


def index(root: str | os.PathLike) -> NpzIndex:
    """Every .npz under `root` by stem; one stem in two places is an error naming both (which one is meant?)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"imported features {root} {what}; give the folder of the release's per-image .npz files")
    files: dict[str, Path] = {}
    for path in sorted(root.rglob(f"*{SUFFIX}")):
        stem = path.name[: -len(SUFFIX)]
        if stem in files:
            raise ValueError(f"imported features: {files[stem]} and {path} have the same name; the import matches "
                             "files by name, so give the folder of one feature set")
        files[stem] = path
    if not files:
        raise FileNotFoundError(f"imported features {root}: no {SUFFIX} files found")
    return NpzIndex(root, files)


def read(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(patches [N, W], global [D]) of one file as stored (float dtype kept); errors name the file."""
    path = Path(path)
    if not zipfile.is_zipfile(path):  # np.load would try a plain .npy or a pickle next
        raise ValueError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = sorted(z.files)
            if PATCHES_KEY not in keys or GLOBAL_KEY not in keys:
                raise ValueError(f"{path}: expected arrays {PATCHES_KEY!r} and {GLOBAL_KEY!r} (the release's "
                                 f"OpenAI-CLIP-Feature format), found {keys}")
            patches, g = z[PATCHES_KEY], z[GLOBAL_KEY]
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: {e} (object arrays are refused: they would be unpickled)") from None
    for name, a in ((PATCHES_KEY, patches), (GLOBAL_KEY, g)):
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{path}: {name!r} has dtype {a.dtype}; the release's features are floating point")
    if g.ndim == 2 and g.shape[0] == 1:
        g = g[0]
    if patches.ndim != 2 or g.ndim != 1:
        raise ValueError(f"{path}: {PATCHES_KEY!r} has shape {patches.shape} and {GLOBAL_KEY!r} {g.shape}; "
                         f"expected [N, W] patch tokens and a [1, D] global feature")
    if not (np.isfinite(patches).all() and np.isfinite(g).all()):
        raise ValueError(f"{path}: non-finite values (NaN or inf) in the features")
    return patches, g
