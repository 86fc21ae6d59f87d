"""PCM-Net checkpoint directories: safetensors + JSON only, written whole, loaded without unpickling.

    config.json          {"model": PCMNetConfig, "train": TrainConfig}
    vocab.json           the word list
    model.safetensors    trainable weights (no frozen buffers)
    concepts.safetensors concept bank [C, D] + CLIP head (ln_post.weight, ln_post.bias, proj); names in metadata
    clip.json            the CLIP spec that encoded the features (so new images can be encoded alike)
    state.json           step, epoch, data position, best validation score, Noam schedule, RNG states
    optimizer.safetensors  Adam state tensors named "<parameter>::<key>" (training checkpoints only)
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pcm.model import PCMNet, PCMNetConfig
from pcm.vocab import Vocab
from storage import atomic, checkpoints
from storage.arrays import read_header
from storage.layout import StageDir

FILES = ("config.json", "vocab.json", "model.safetensors", "concepts.safetensors", "clip.json", "state.json")


# ---------------------------------------------------------------------- places
def checkpoints_dir(train_dir: str | os.PathLike) -> Path:
    """Where the step checkpoints of a train stage directory live."""
    return StageDir.at(train_dir).file("checkpoints")


def best_dir(train_dir: str | os.PathLike) -> Path:
    """The best-by-validation checkpoint of a train stage directory."""
    return checkpoints.recover(StageDir.at(train_dir).file("best"))


def find(train_dir: str | os.PathLike, which: str = "best") -> Path:
    """The `best` or `latest` checkpoint of a train stage directory (a checkpoint directory is itself)."""
    train_dir = Path(train_dir)
    if (train_dir / "model.safetensors").exists():
        return train_dir
    if which == "best":
        found = best_dir(train_dir)
        found = found if found.is_dir() else None
    elif which == "latest":
        found = checkpoints.latest(checkpoints_dir(train_dir))
    else:
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    if found is None:
        raise FileNotFoundError(f"{train_dir}: no {which} checkpoint; run `pcm train` (it writes checkpoints/ and best/)")
    return found


# ---------------------------------------------------------------------- RNG states as JSON
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as JSON lists."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------- write
def save(path: str | os.PathLike, *, model: PCMNet, vocab: Vocab, config: dict[str, Any], clip: dict[str, Any],
         concept_names: list[str], state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write a checkpoint directory atomically (replacing `path` in one rename)."""
    with checkpoints.atomic_directory(path) as tmp:
        atomic.write_json(tmp / "config.json", {"model": model.cfg.model_dump(mode="json"), "train": config})
        vocab.save(tmp / "vocab.json")
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        frozen = {"bank": model.concepts, "ln_post.weight": model.ln_post_weight, "ln_post.bias": model.ln_post_bias,
                  "proj": model.proj}
        save_file({k: v.detach().cpu().contiguous() for k, v in frozen.items()}, str(tmp / "concepts.safetensors"),
                  metadata={"concepts": json.dumps(concept_names)})
        atomic.write_json(tmp / "clip.json", clip)
        if optimizer is not None:
            tensors, groups = _flatten_optimizer(model, optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state = {**state, "optimizer_groups": groups}
        atomic.write_json(tmp / "state.json", state)


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _flatten_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Optimizer state tensors keyed "<parameter name>::<key>", and the JSON-able param groups."""
    sd = optimizer.state_dict()
    names = _param_names(model)
    tensors = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{names[idx]}::{key}"] = t.detach().cpu().contiguous()
    # A CUDA-graph optimizer keeps its learning rate in a tensor; JSON holds its value.
    groups = [{k: float(v) if torch.is_tensor(v) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


# ---------------------------------------------------------------------- read
def read_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    checkpoints.check_safe(ckpt_dir)
    return atomic.read_json(Path(ckpt_dir) / "state.json")


def load(ckpt_dir: str | os.PathLike, device: str = "cpu") -> tuple[PCMNet, Vocab, dict[str, Any]]:
    """(model in eval mode, vocab, meta) from a checkpoint directory; refuses anything pickled.

    meta: "clip" (CLIP spec dict), "config" ({"model", "train"}), "step", "concepts" (names), "state".
    """
    ckpt_dir = Path(ckpt_dir)
    checkpoints.check_safe(ckpt_dir)
    missing = [f for f in FILES if not (ckpt_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{ckpt_dir}: incomplete checkpoint, missing {missing}")
    config = atomic.read_json(ckpt_dir / "config.json")
    cfg = PCMNetConfig.model_validate(config["model"])
    vocab = Vocab.load(ckpt_dir / "vocab.json")
    frozen = load_file(str(ckpt_dir / "concepts.safetensors"))
    head = {k: frozen[k] for k in ("ln_post.weight", "ln_post.bias", "proj")}
    model = PCMNet(cfg, len(vocab), frozen["bank"], head)
    model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")))
    model.to(device).eval()
    names = json.loads(read_header(ckpt_dir / "concepts.safetensors")[1].get("concepts", "[]"))
    state = atomic.read_json(ckpt_dir / "state.json")
    meta = {"clip": atomic.read_json(ckpt_dir / "clip.json"), "config": config, "step": state["step"],
            "concepts": names, "state": state}
    return model, vocab, meta


def load_weights(ckpt_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore a training checkpoint into an existing model (and optimizer); returns its state."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")))
    if optimizer is not None:
        tensors = load_file(str(ckpt_dir / "optimizer.safetensors"))
        names = _param_names(model)
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for full, t in tensors.items():
            name, key = full.split("::")
            per_param.setdefault(names.index(name), {})[key] = t
        optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_groups"]})
    return state
