"""Bundled presets: data files shipped under pcm/presets/<kind>/, looked up by bare name only.

A name is matched against the files that exist, never joined into a path first, so a name from
user input (`../../etc/x`, an absolute path) cannot reach a file outside the preset folder.
"""

from __future__ import annotations

from pathlib import Path

PRESETS = Path(__file__).resolve().parent / "presets"


def names(kind: str, suffix: str) -> list[str]:
    """The bundled preset names of `kind` (`clip`, `diffusion`, `model`, `pipeline`)."""
    return sorted(p.stem for p in (PRESETS / kind).glob(f"*{suffix}"))


def path(kind: str, suffix: str, name: str, label: str | None = None) -> Path:
    """The data file of a bundled preset, or a ValueError naming the known ones."""
    known = names(kind, suffix)
    if name not in known:
        raise ValueError(f"{label or kind} preset {name!r} not found; known presets: {', '.join(known)}")
    return PRESETS / kind / f"{name}{suffix}"
