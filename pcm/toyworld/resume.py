"""Resumable training state for the toy-model trainers: one file, written atomically, read without pickle."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage import atomic


def seed_everything(seed: int, threads: int) -> None:
    """torch, numpy and Python RNGs from one seed, and torch's intra-op thread count."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def save_state(path: Path, step: int, modules: dict[str, Any]) -> None:
    """Model/optimiser state dicts, the step and every RNG, as one file that replaces the last one whole."""
    state = {name: m.state_dict() for name, m in modules.items()}
    state["step"] = torch.tensor(step)
    state["rng_torch"] = torch.get_rng_state()
    state["rng_numpy"] = torch.from_numpy(np.frombuffer(json.dumps(_numpy_state()).encode(), dtype=np.uint8).copy())
    state["rng_python"] = torch.from_numpy(np.frombuffer(json.dumps(random.getstate()[1]).encode(), dtype=np.uint8).copy())
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, modules: dict[str, Any]) -> int:
    """Restore what `save_state` wrote (weights_only: nothing read back can run code); returns the step."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, m in modules.items():
        m.load_state_dict(state[name])
    torch.set_rng_state(state["rng_torch"])
    np_state = json.loads(bytes(state["rng_numpy"].numpy()).decode())
    np.random.set_state(("MT19937", np.array(np_state[0], dtype=np.uint32), *np_state[1:]))
    random.setstate((3, tuple(json.loads(bytes(state["rng_python"].numpy()).decode())), None))
    return int(state["step"])


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [keys.tolist(), int(pos), int(has_gauss), float(cached)]


def log_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to a training log (a torn last line is skipped by readers)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
