"""Content identities of models: what fingerprints, compatibility checks and checkpoints record instead of paths.

A local model directory is identified by `storage.fingerprint.dir_digest` (its files' sizes and
sha256), so two checkouts at different paths, and two hosts on one object-store root, agree. The
shipped toy models' MANIFEST.json already holds those digests and is used instead of rereading
the files. A CLIP is identified by an open_clip tag (a name open_clip resolves to fixed weights),
a preset's data file, or the digest of its weights (a file or a `local-dir:` directory).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from storage import atomic
from storage.fingerprint import dir_digest, input_digest

log = logging.getLogger(__name__)

MANIFEST_FILE = "MANIFEST.json"   # pcm.toyworld.manifest writes it: {files: {relative path: {bytes, sha256}}}


def _known_digests(path: Path) -> dict[str, dict[str, Any]]:
    """The digests a MANIFEST.json in `path` or its parent lists for the files under `path` (relative to it)."""
    for base in (path, path.parent):
        manifest = base / MANIFEST_FILE
        if not manifest.is_file():
            continue
        try:
            files = atomic.read_json(manifest).get("files", {})
        except (ValueError, OSError, AttributeError):
            return {}
        prefix = "" if base == path else path.name + "/"
        # Only files no newer than the manifest: a file edited since (same size, other bytes) is hashed again.
        written = manifest.stat().st_mtime_ns
        return {rel[len(prefix):]: v for rel, v in files.items() if rel.startswith(prefix) and isinstance(v, dict)
                and _mtime(path / rel[len(prefix):]) <= written}
    return {}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 1 << 62


def model_dir_id(path: str | os.PathLike) -> str:
    """`sha256:<hex>` of a local model directory's files, wherever it is and however its path is spelled."""
    p = Path(path).expanduser()
    return dir_digest(p, _known_digests(p))


def local_model_dir(model: str | None) -> Path | None:
    """`model` as a local directory when it is one (a diffusers pipeline, a TAESD), else None (a hub id, a preset)."""
    if not model:
        return None
    p = Path(model).expanduser()
    return p if p.is_dir() else None


def clip_content_id(spec: Any) -> str:
    """What a CLIP spec's weights are, independent of paths: `tag:<name>`, `preset:<sha>` or `sha256:<hex>`.

    `spec` is a pcm.clip.ClipSpec (or its dict). Architecture and pooling are compared separately.
    """
    from pcm.clip import LOCAL_DIR, ClipSpec, preset_path

    spec = spec if isinstance(spec, ClipSpec) else ClipSpec.model_validate(
        {k: v for k, v in spec.items() if k in ClipSpec.model_fields})
    pretrained = spec.pretrained
    if pretrained and pretrained.startswith(LOCAL_DIR):
        path = pretrained[len(LOCAL_DIR):]
        if not Path(path).expanduser().is_dir():
            raise FileNotFoundError(f"clip.pretrained={pretrained!r}: no such directory here (its files identify the "
                                    "CLIP); give the folder holding open_clip_config.json and the weights")
        return model_dir_id(path)
    if pretrained and os.path.isfile(os.path.expanduser(pretrained)):
        return "sha256:" + input_digest(os.path.expanduser(pretrained))
    if spec.is_preset:
        return "preset:" + input_digest(preset_path(spec.model))[:16]
    return f"tag:{pretrained}" if pretrained else "random"


def shipped_clip_dirs() -> list[Path]:
    """The shipped CLIP directories a checkpoint may name by content (the toy world's)."""
    from pcm import bundled

    return [p for p in (bundled.TOYMODELS / "clip",) if p.is_dir()]


def find_shipped_clip(content_id: str) -> Path | None:
    """The shipped CLIP directory whose content is `content_id`, or None."""
    for d in shipped_clip_dirs():
        if model_dir_id(d) == content_id:
            return d
    return None


CLIP_OPTION = "--clip PATH_OR_TAG"   # the CLI option (and `clip=` argument) that points a checkpoint at its CLIP


def checkpoint_clip(recorded: dict[str, Any], override: str | None = None, where: str = "checkpoint") -> Any:
    """The pcm.clip.ClipSpec to encode new images with for a checkpoint whose clip.json is `recorded`.

    `override` (a local directory, a weights file, `local-dir:PATH` or an open_clip tag) replaces the
    recorded weights; a local one must have the recorded content identity. Without it, the recorded
    spec is used when its weights are here; a recorded path that is gone (a checkpoint moved to
    another checkout or machine) resolves to the shipped toy CLIP when that is the same content, else
    the error names `--clip`.
    """
    from pcm.clip import LOCAL_DIR, ClipSpec

    want = recorded.get("content_id")
    fields = {k: v for k, v in recorded.items() if k in ClipSpec.model_fields}
    if override is not None:
        p = Path(override.removeprefix(LOCAL_DIR)).expanduser()
        pretrained = (LOCAL_DIR + str(p)) if p.is_dir() else str(p) if p.is_file() else override
        spec = ClipSpec.model_validate(fields | {"pretrained": pretrained})
        got = clip_content_id(spec)
        if want and got != want and (want.startswith("sha256:") or got.startswith("sha256:")):
            raise ValueError(f"{CLIP_OPTION.split()[0]} {override}: its weights ({got}) are not the CLIP this "
                             f"{where} was trained with ({want}, recorded as {recorded.get('pretrained')!r})")
        return spec
    pretrained = recorded.get("pretrained") or ""
    path = pretrained.removeprefix(LOCAL_DIR)
    local = pretrained.startswith(LOCAL_DIR) or os.path.isabs(path) or os.sep in path
    if not pretrained or not local or Path(path).expanduser().exists():
        return ClipSpec.model_validate(fields)
    shipped = find_shipped_clip(want) if want else None
    if shipped is not None:
        log.info("%s: its CLIP %s is not here; using the shipped toy CLIP %s (same content, %s)", where,
                 pretrained, shipped, want)
        return ClipSpec.model_validate(fields | {"pretrained": LOCAL_DIR + str(shipped)})
    raise FileNotFoundError(
        f"{where}: its CLIP weights {pretrained!r} are not here (the {where} was moved, or made on another machine); "
        f"give them with {CLIP_OPTION} (the directory, weights file or open_clip tag it was trained with"
        + (f", content {want}" if want else "") + ")")
