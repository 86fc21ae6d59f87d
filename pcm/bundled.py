"""What the package ships: presets under pcm/presets/<kind>/, looked up by bare name only, and the data folders.

A preset name is matched against the files that exist, never joined into a path first, so a name from
user input (`../../etc/x`, an absolute path) cannot reach a file outside the preset folder. The data
folders are named here once, so the pipeline finds them without importing what builds them.
"""

from __future__ import annotations

from pathlib import Path

PRESETS = Path(__file__).resolve().parent / "presets"
DATA = Path(__file__).resolve().parent / "data"
DEMO = DATA / "demo"              # the demo captions (pcm.demo_data builds them)
TOYWORLD = DATA / "toyworld"      # the toy world's data set (pcm.toyworld.dataset builds it)
TOYMODELS = DATA / "toymodels"    # the toy world's trained models: clip/ (open_clip local-dir), t2i/ (diffusers)


def names(kind: str, suffix: str) -> list[str]:
    """The bundled preset names of `kind` (`clip`, `diffusion`, `model`, `pipeline`)."""
    return sorted(p.stem for p in (PRESETS / kind).glob(f"*{suffix}"))


def path(kind: str, suffix: str, name: str, label: str | None = None) -> Path:
    """The data file of a bundled preset, or a ValueError naming the known ones."""
    known = names(kind, suffix)
    if name not in known:
        raise ValueError(f"{label or kind} preset {name!r} not found; known presets: {', '.join(known)}")
    return PRESETS / kind / f"{name}{suffix}"
