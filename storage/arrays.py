"""Named arrays in safetensors files, read back memory-mapped without pickle.

The files are ordinary safetensors (any safetensors loader reads them). `open_arrays` parses the
header itself and returns `numpy.memmap` views, so a training loader touches only the rows it uses.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from storage import atomic

_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write arrays atomically as safetensors; `metadata` values must be strings."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic.atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, data offset) of a safetensors file; errors name the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    metadata = header.pop("__metadata__", {}) or {}
    return header, metadata, 8 + n


def open_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every array of a safetensors file; returns (arrays, metadata)."""
    header, metadata, offset = read_header(path)
    arrays: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: array {name!r} has dtype {info['dtype']} that cannot be memory-mapped")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            arrays[name] = np.zeros(shape, dtype=dtype)
            continue
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset + start, shape=shape)
    return arrays, metadata
