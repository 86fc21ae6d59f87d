"""Checkpoint directories: written whole or not at all, found by step, never unpickled."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from storage import atomic, remote

_STEP_DIR = re.compile(r"^step-(\d{8})$")

# The files of one checkpoint directory (train's checkpoints/step-NNNNNNNN/ and best/).
CONFIG = "config.json"                  # {"model": PCMNetConfig, "train": TrainConfig}
VOCAB = "vocab.json"
MODEL = "model.safetensors"             # trainable weights
CONCEPTS = "concepts.safetensors"       # the frozen concept embeddings (names in the header metadata)
CLIP = "clip.json"                      # the CLIP the features came from
STATE = "state.json"                    # step, best score, RNG states
OPTIMIZER = "optimizer.safetensors"     # step checkpoints only
FILES = (CONFIG, VOCAB, MODEL, CONCEPTS, CLIP, STATE)  # every checkpoint has these
# The training distribution that `pcm caption` judges new images against (pcm.confidence); checkpoints
# made before it have neither file, and captions of them say confidence is unavailable.
REFERENCE = "reference.json"                 # CLIP-score and distance percentiles, the threshold
REFERENCE_ARRAYS = "reference.safetensors"   # mean and precision of the training images' pooled patch tokens
OPTIONAL_FILES = (REFERENCE, REFERENCE_ARRAYS)
# best/'s model card (pcm.cards): the Hub's YAML header then prose, so best/ is what `hf upload` takes. Text, never
# loaded as a checkpoint file; written when train finishes and rewritten when an evaluation of best/ finishes.
CARD = "README.md"
ALLOWED_SUFFIXES = {".safetensors", ".json", ".jsonl", ".txt", ".md"}


def step_name(step: int) -> str:
    return f"step-{step:08d}"


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final` in one rename (`keep_existing`: a `final` that
    another process put there meanwhile is kept and this copy dropped, for caches whose copies are identical).

    Every file under it, at any depth (a diffusers directory has subfolders), is synced and given the mode of
    the umask before the rename, so a kill never leaves a partial directory under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))
    tmp.chmod(0o777 & ~atomic.umask())  # mkdtemp makes 0700; a shared run root must be readable
    try:
        yield tmp
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as f:
                    # Ordinary files' mode whatever wrote them (safetensors' save_file makes 0600 files).
                    os.fchmod(f.fileno(), atomic.file_mode())
                    os.fsync(f.fileno())
        if keep_existing:
            try:
                os.replace(tmp, final)  # refused when another process's copy is already there (not empty)
            except OSError:
                if not final.exists():
                    raise
        elif final.exists():
            old = final.with_name(f".old-{final.name}.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place


def recover(final: str | os.PathLike) -> Path:
    """Undo a replacement killed between its two renames: the previous `final` comes back.

    Replacing a directory is two renames (old away, new in); a kill between them leaves only
    `.old-<name>.<pid>`. Readers and writers call this first, so `final` is never lost.
    """
    final = Path(final)
    if not final.exists():
        olds = sorted(final.parent.glob(f".old-{final.name}.*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], final)
    return final


def remove_leftovers(final: str | os.PathLike) -> int:
    """Recover `final`, then delete what killed writers of it left: `.tmp-<name>.*` and landed `.old-<name>.*`.

    Call it only while holding the lock of the writer of `final`; returns the count removed.
    """
    final = recover(final)
    n = atomic.remove_temporaries_of(final)
    if final.exists():  # the replacement landed: the previous copies are garbage a kill kept
        for old in final.parent.glob(f".old-{final.name}.*"):
            if re.fullmatch(rf"\.old-{re.escape(final.name)}\.\d+", old.name):
                shutil.rmtree(old, ignore_errors=True)
                n += 1
    return n


def remove_step_leftovers(directory: str | os.PathLike) -> int:
    """`remove_leftovers` for every step checkpoint name that left temporaries in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    names = {m.group(1) for p in directory.iterdir()
             if (m := re.match(r"^\.(?:tmp|old)-(step-\d{8})\.", p.name))}
    return sum(remove_leftovers(directory / name) for name in sorted(names))


def list_steps(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the finished checkpoints under `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(directory: str | os.PathLike) -> Path | None:
    steps = list_steps(directory)
    return steps[-1][1] if steps else None


def fetch_published(directory: str | os.PathLike, run_log: str | os.PathLike | None = None) -> Path | None:
    """On an object-store root, bring the newest step checkpoint the store holds (its state.json published: see
    storage.publish.publish_checkpoint) into `directory` when none here is as new, with the step its state names
    as best and the run's log; returns it, or None (a local root, nothing newer). Each checkpoint lands whole
    (`atomic_directory`), so a kill mid-fetch leaves no partial one to resume from."""
    directory = Path(directory)
    m = remote.mirror_of(directory)
    if m is None:
        return None
    listing = m.listing(directory)
    steps = sorted({int(x.group(1)) for rel in listing if (x := re.fullmatch(r"step-(\d{8})/" + STATE, rel))})
    here = list_steps(directory)
    if not steps or (here and here[-1][0] >= steps[-1]):
        return None
    newest = _fetch_step(m, directory, steps[-1], listing)
    best = (atomic.read_json(newest / STATE).get("best") or {}).get("step")
    if best in steps and best not in dict(list_steps(directory)):
        _fetch_step(m, directory, best, listing)
    if run_log is not None and m.exists(run_log):
        m.fetch([Path(run_log)])
    return newest


def _fetch_step(m: remote.Mirror, directory: Path, step: int, listing: dict[str, int]) -> Path:
    name = step_name(step)
    files = sorted(rel.split("/", 1)[1] for rel in listing if rel.startswith(name + "/"))
    with atomic_directory(directory / name) as tmp:
        for f in [*(f for f in files if f != STATE), STATE]:
            m.fs.get_file(m.key(directory / name / f), str(tmp / f))
    return directory / name


def prune(directory: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` step checkpoints; remove stale temporaries."""
    directory = Path(directory)
    for _, p in list_steps(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in directory.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def check_safe(directory: str | os.PathLike) -> None:
    """Refuse a checkpoint directory holding anything but safetensors, JSON and text files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory not found")
    # A killed card writer's temporary (.tmp-README.md.<x>) is text no loader opens: not a reason to refuse.
    bad = [p.name for p in directory.iterdir()
           if p.suffix not in ALLOWED_SUFFIXES and not p.name.startswith(f".tmp-{CARD}.")]
    if bad:
        raise ValueError(f"{directory}: refusing to load a checkpoint holding {bad}: only safetensors and JSON "
                         "files are loaded (pickled files can execute code)")
