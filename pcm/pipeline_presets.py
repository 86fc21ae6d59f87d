"""Pipeline presets: the raw tables of a bundled preset, a TOML file or the JSON `pcm run --show-config` prints.

Presets live in pcm/presets/pipeline/<name>.toml; a path to a TOML file works too. A preset may start
from another (`base = "demo"`): its tables are merged key by key onto the base's. In a preset,
"{demo}" expands to the bundled demo data directory, "{toyworld}" to the bundled toy-world data
and "{toymodels}" to the shipped toy models (pcm/data/toymodels). Validating the tables is the
pipeline's (pcm/stages/pipeline.py, PipelineConfig).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pcm import bundled, strict_json
from pcm.config import merge_tables

PRESETS = bundled.PRESETS / "pipeline"


def preset_names() -> list[str]:
    return bundled.names("pipeline", ".toml")


def load_preset(preset: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw dict of a preset name, a TOML path or the JSON `pcm run --show-config` prints (which may hold
    nulls TOML cannot say), with "{demo}", "{toyworld}" and "{toymodels}" expanded."""
    path = Path(preset).expanduser()
    if not (path.suffix in (".toml", ".json") and path.is_file()):
        # A bare name picks a bundled preset, never a path built from it.
        path = bundled.path("pipeline", ".toml", preset) if preset in preset_names() else None
    if path is None or not path.exists():
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(preset_names())}, a .toml file or the "
                         ".json that `pcm run --show-config` prints")
    if path.suffix == ".json":
        try:
            raw = strict_json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a repeated key
            raise ValueError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object (the output of `pcm run --show-config`)")
        return raw
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # a file not in UTF-8 named no file
            raise ValueError(f"{path}: invalid TOML: {e}") from None
    base = raw.pop("base", None)
    if base is not None:  # a variant of another preset: only what differs is written down
        if not isinstance(base, str) or base not in preset_names() or base in (*_seen, path.stem):
            raise ValueError(f"{path}: base = {base!r} must name another bundled preset, without a cycle "
                             f"({', '.join(preset_names())})")
        raw = merge_tables(load_preset(base, (*_seen, path.stem)), raw)
    return expand(raw, placeholders())


def placeholders() -> dict[str, str]:
    """What "{demo}", "{toyworld}" and "{toymodels}" stand for, in presets and in `--set` values."""
    return {"{demo}": str(bundled.DEMO), "{toyworld}": str(bundled.TOYWORLD), "{toymodels}": str(bundled.TOYMODELS)}


def expand(value: Any, table: dict[str, str]) -> Any:
    """`value` (nested tables and lists) with every placeholder of `table` in its strings replaced."""
    if isinstance(value, dict):
        return {k: expand(v, table) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, table) for v in value]
    if isinstance(value, str):
        for k, v in table.items():
            value = value.replace(k, v)
    return value
