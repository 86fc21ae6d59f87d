"""Experiment tracking: TensorBoard event files beside metrics.jsonl and metrics.json.

A stage writes its scalars under `<stage dir>/events/<run name>/` (storage.layout names it), so
`tensorboard --logdir runs/` lists every run as `train/<fingerprint>/events/<run name>`: the
fingerprint keeps it unique, the run name (the pipeline preset and the overrides that differ from it)
makes it readable. The files are a view: metrics.jsonl and metrics.json stay the record.

torch.utils.tensorboard (the `tensorboard` package) is imported inside the functions: `pcm --help` must
not pay for it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# What a run name may hold: it is a directory name, and TensorBoard's run selector shows it.
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
MAX_NAME = 120


def run_name(preset: str, overrides: dict[str, Any] | None = None) -> str:
    """`<preset>[,key=value...]`: the preset's name and the dotted overrides (those that change it), sorted, made
    safe as one directory name (other characters become `_`) and cut at MAX_NAME characters."""
    parts = [preset] + [f"{k}={_short(v)}" for k, v in sorted((overrides or {}).items())]
    name = _UNSAFE.sub("_", ",".join(parts)).strip("._") or "run"
    return name[:MAX_NAME]


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


class EventLog:
    """One run's TensorBoard event file, for rank 0 of one stage.

    `purge_step`: a resumed run's first step not covered by its checkpoint; TensorBoard then drops the
    points of earlier files at that step and beyond, so the redone steps are not shown twice.
    """

    def __init__(self, directory: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        directory.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(directory), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Write `tag -> value` at `step` (None, a value absent, is left out)."""
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, step: int, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        """Hand the buffered points to the file (before a checkpoint: what it covers must be on disk)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

