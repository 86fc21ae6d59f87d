"""PCM-Net checkpoint directories: safetensors + JSON only, written whole, loaded without unpickling.

    config.json          {"model": PCMNetConfig, "train": TrainConfig}
    vocab.json           the word list
    model.safetensors    trainable weights (no frozen buffers)
    concepts.safetensors concept bank [C, D] + CLIP head (ln_post.weight, ln_post.bias, proj); names in metadata
    clip.json            the CLIP spec that encoded the features (so new images can be encoded alike)
    state.json           step, epoch, data position, best validation score, Noam schedule, RNG states
    optimizer.safetensors  Adam state tensors named "<parameter>::<key>" (training checkpoints only)
    reference.json + reference.safetensors  the training distribution `pcm caption` judges images against
                         (pcm.confidence; absent from checkpoints made before it)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from pcm.confidence import Reference
from pcm.config import validation_problems
from pcm.model import PCMNet, PCMNetConfig
from pcm.vocab import Vocab
from storage import atomic, checkpoints, remote
from storage.arrays import read_header
from storage.checkpoints import (
    CLIP,
    CONCEPTS,
    CONFIG,
    FILES,
    MODEL,
    OPTIMIZER,
    OPTIONAL_FILES,
    REFERENCE,
    REFERENCE_ARRAYS,
    STATE,
    VOCAB,
)
from storage.layout import StageDir

CONFIG_KEYS = ("model", "train")
# Model fields every checkpoint has recorded since the first one and that shape the network or what
# it decodes; a checkpoint missing one is damaged (fields added later keep their defaults when absent).
REQUIRED_MODEL_KEYS = ("d_embed", "d_width", "n_patches", "d_model", "n_heads", "n_enc_layers", "n_dec_layers",
                       "d_ff", "max_len", "pcm", "top_k", "top_m", "tau", "clip_ln_eps")


# ---------------------------------------------------------------------- places
def checkpoints_dir(train_dir: str | os.PathLike) -> Path:
    """Where the step checkpoints of a train stage directory live."""
    return StageDir.at(train_dir).checkpoints


def best_dir(train_dir: str | os.PathLike) -> Path:
    """The best-by-validation checkpoint of a train stage directory."""
    return checkpoints.recover(StageDir.at(train_dir).best)


def find(train_dir: str | os.PathLike, which: str = "best") -> Path:
    """The `best` or `latest` checkpoint of a train stage directory (a checkpoint directory is itself); a stage
    directory's URL on an object-store root names this worker's working copy of it, fetched from the store."""
    train_dir = StageDir.at(train_dir).path if remote.is_url(train_dir) else Path(train_dir)
    if (train_dir / MODEL).exists():
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


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global RNGs: what `rng_state` captures is then a function
    of the seed, so a checkpoint's state.json is the same bytes on every run of the same inputs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
         concept_names: list[str], state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
         reference: Reference | None = None) -> None:
    """Write a checkpoint directory atomically (replacing `path` in one rename); `reference`: the training
    distribution for `pcm caption`'s confidence (pcm.confidence.build_reference)."""
    with checkpoints.atomic_directory(path) as tmp:
        atomic.write_json(tmp / CONFIG, {"model": model.cfg.model_dump(mode="json"), "train": config})
        vocab.save(tmp / VOCAB)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL))
        frozen = {"bank": model.concepts, "ln_post.weight": model.ln_post_weight, "ln_post.bias": model.ln_post_bias,
                  "proj": model.proj}
        save_file({k: v.detach().cpu().contiguous() for k, v in frozen.items()}, str(tmp / CONCEPTS),
                  metadata={"concepts": json.dumps(concept_names)})
        atomic.write_json(tmp / CLIP, clip)
        if optimizer is not None:
            tensors, groups = _flatten_optimizer(model, optimizer)
            save_file(tensors, str(tmp / OPTIMIZER))
            state = {**state, "optimizer_groups": groups}
        if reference is not None:
            atomic.write_json(tmp / REFERENCE, reference.to_record())
            save_file({k: torch.from_numpy(v).contiguous() for k, v in reference.arrays().items()},
                      str(tmp / REFERENCE_ARRAYS))
        atomic.write_json(tmp / STATE, state)


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


def export(src: str | os.PathLike, dest: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write checkpoint `src` (a step checkpoint) as the weights-only checkpoint `dest` with `state`, atomically.

    The files are copied byte for byte (the optimizer state is left out), so `dest` is what `save`
    would have written from the same model.
    """
    src = Path(src)
    checkpoints.check_safe(src)
    with checkpoints.atomic_directory(dest) as tmp:
        for name in FILES + OPTIONAL_FILES:
            if name != STATE and (name in FILES or (src / name).exists()):
                shutil.copyfile(src / name, tmp / name)
        atomic.write_json(tmp / STATE, state)


# ---------------------------------------------------------------------- read
def _got(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def read_config(ckpt_dir: str | os.PathLike) -> tuple[dict[str, Any], PCMNetConfig]:
    """(config.json as read, its validated model config); anything wrong is one error naming the file and keys."""
    path = Path(ckpt_dir) / CONFIG
    config = atomic.read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {list(CONFIG_KEYS)} "
                         f"(got {_json_type(config)}: {_got(config)})")
    problems = [f"{k}: unknown key (known: {', '.join(CONFIG_KEYS)})" for k in sorted(set(config) - set(CONFIG_KEYS))]
    for key in CONFIG_KEYS:
        if key not in config:
            problems.append(f"{key}: missing")
        elif not isinstance(config[key], dict):
            problems.append(f"{key}: expected an object (got {_json_type(config[key])}: {_got(config[key])})")
    if not problems:
        problems += [f"model.{k}: missing (every checkpoint records it)" for k in REQUIRED_MODEL_KEYS
                     if config["model"].get(k) is None]
    if not problems:
        try:
            return config, PCMNetConfig.model_validate(config["model"])
        except ValidationError as e:
            problems += validation_problems(e, "model", show=_got)
    raise ValueError(f"{path}: " + "; ".join(problems))


def read_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """state.json of a checkpoint (refusing pickled payloads); it must be an object with an integer step."""
    checkpoints.check_safe(ckpt_dir)
    path = Path(ckpt_dir) / STATE
    state = atomic.read_json(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object (got {_json_type(state)}: {_got(state)})")
    if not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool):
        raise ValueError(f"{path}: step: " + ("missing" if "step" not in state
                                              else f"expected an integer (got {_got(state['step'])})"))
    return state


def _load_model_weights(model: nn.Module, path: Path) -> None:
    """load_state_dict, a mismatch with the model config named as such."""
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[1:4] or lines[:1])
        raise ValueError(f"{path}: the weights do not fit the model in {path.parent / 'config.json'} ({detail})") from None


def load(ckpt_dir: str | os.PathLike, device: str = "cpu") -> tuple[PCMNet, Vocab, dict[str, Any]]:
    """(model in eval mode, vocab, meta) from a checkpoint directory; refuses anything pickled.

    meta: "clip" (CLIP spec dict), "config" ({"model", "train"}), "step", "concepts" (names), "state".
    """
    ckpt_dir = Path(ckpt_dir)
    checkpoints.check_safe(ckpt_dir)
    missing = [f for f in FILES if not (ckpt_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{ckpt_dir}: incomplete checkpoint, missing {missing}")
    config, cfg = read_config(ckpt_dir)
    state = read_state(ckpt_dir)
    vocab = Vocab.load(ckpt_dir / VOCAB)
    frozen = load_file(str(ckpt_dir / CONCEPTS))
    absent = [k for k in ("bank", "ln_post.weight", "ln_post.bias", "proj") if k not in frozen]
    if absent:
        raise ValueError(f"{ckpt_dir / 'concepts.safetensors'}: missing tensors {absent}")
    head = {k: frozen[k] for k in ("ln_post.weight", "ln_post.bias", "proj")}
    model = PCMNet(cfg, len(vocab), frozen["bank"], head)
    _load_model_weights(model, ckpt_dir / MODEL)
    model.to(device).eval()
    names = json.loads(read_header(ckpt_dir / CONCEPTS)[1].get("concepts", "[]"))
    meta = {"clip": atomic.read_json(ckpt_dir / CLIP), "config": config, "step": state["step"],
            "concepts": names, "state": state}
    return model, vocab, meta


def load_reference(ckpt_dir: str | os.PathLike) -> Reference | None:
    """The checkpoint's training distribution for confidence, or None for a checkpoint made before it."""
    ckpt_dir = Path(ckpt_dir)
    checkpoints.check_safe(ckpt_dir)
    if not (ckpt_dir / REFERENCE).exists() or not (ckpt_dir / REFERENCE_ARRAYS).exists():
        return None
    record = atomic.read_json(ckpt_dir / REFERENCE)
    arrays = {k: v.double().numpy() for k, v in load_file(str(ckpt_dir / REFERENCE_ARRAYS)).items()}
    return Reference.from_parts(record if isinstance(record, dict) else {}, arrays, str(ckpt_dir / REFERENCE))


def load_weights(ckpt_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore a training checkpoint into an existing model (and optimizer); returns its state."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    _load_model_weights(model, ckpt_dir / MODEL)
    if optimizer is not None:
        tensors = load_file(str(ckpt_dir / OPTIMIZER))
        names = _param_names(model)
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for full, t in tensors.items():
            name, key = full.split("::")
            per_param.setdefault(names.index(name), {})[key] = t
        optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_groups"]})
    return state
