"""Resumable training state for the toy-model trainers: one file, written atomically, read without pickle.

The RNG states are pcm.checkpoint's (the train stage's), the logs storage.jsonl's: one way to save and
restore a position in training for every trainer of the project.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pcm import checkpoint
from storage import atomic, jsonl


def seed_everything(seed: int, threads: int) -> None:
    """torch, numpy and Python RNGs from one seed, and torch's intra-op thread count."""
    torch.set_num_threads(threads)
    checkpoint.seed_all(seed)


def save_state(path: Path, step: int, modules: dict[str, Any]) -> None:
    """Model/optimiser state dicts, the step and every RNG, as one file that replaces the last one whole."""
    state = {name: m.state_dict() for name, m in modules.items()}
    state["step"] = torch.tensor(step)
    # The RNG states as JSON bytes: a tensor is what torch.load(weights_only=True) reads back.
    state["rng"] = torch.frombuffer(bytearray(json.dumps(checkpoint.rng_state()).encode()), dtype=torch.uint8)
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, modules: dict[str, Any], log: Path | None = None) -> int:
    """Restore what `save_state` wrote (weights_only: nothing read back can run code) and cut `log` back to its
    step, so the steps redone are not logged twice; returns the step."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "rng" not in state:
        raise ValueError(f"{path}: a training state of an earlier format; delete it to train from the start")
    for name, m in modules.items():
        m.load_state_dict(state[name])
    checkpoint.set_rng_state(json.loads(bytes(state["rng"].numpy()).decode()))
    step = int(state["step"])
    if log is not None:
        jsonl.truncate(log, step)
    return step
