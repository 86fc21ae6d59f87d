"""JSON read strictly: a key repeated in one object is an error, where json would silently keep its last value.

One rule for every JSON file a user hands the pipeline: caption files (pcm/caption_files.py) and the
pipeline config that `pcm run --show-config` prints (pcm/pipeline_presets.py).
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKey(ValueError):
    """A key given twice in one JSON object; the message names it and the object's keys."""

    def __init__(self, key: str, keys: list[str]) -> None:
        shown = keys if len(keys) <= 8 else [*keys[:8], "..."]
        super().__init__(f"duplicate key {key!r} in a JSON object (keys {shown}); a key may appear once "
                         "per object (a JSON reader would silently keep only its last value)")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: the object, or DuplicateKey naming the first key repeated."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key, [k for k, _ in pairs])
            seen.add(key)
    return obj


def loads(text: str) -> Any:
    """json.loads refusing repeated keys in an object (DuplicateKey, a ValueError)."""
    return json.loads(text, object_pairs_hook=unique_keys)
