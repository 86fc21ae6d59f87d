"""Named arrays in safetensors files, read back memory-mapped without pickle.

The files are ordinary safetensors (any safetensors loader reads them). They are serialised here,
with sorted names and metadata, so the same arrays always give the same bytes (the safetensors
library orders metadata differently from one process to the next). `open_arrays` parses the header
itself and returns `numpy.memmap` views, so a training loader touches only the rows it uses.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from storage import atomic

_CODES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
          np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write arrays atomically as safetensors, byte-for-byte reproducible; `metadata` values must be strings."""
    header: dict[str, object] = {}
    blobs: list[np.ndarray] = []
    offset = 0
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))  # safetensors is little-endian
        code = _CODES.get(a.dtype)
        if code is None:
            raise ValueError(f"{path}: array {name!r} has unsupported dtype {a.dtype}")
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a)
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic.atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for a in blobs:
            f.write(a.tobytes())


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
    size = os.path.getsize(path)
    arrays: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: array {name!r} has dtype {info['dtype']} that cannot be memory-mapped")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if offset + end > size or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: array {name!r} does not fit the file (truncated or corrupt); "
                             "delete it and its .done.json and rerun the stage that wrote it")
        if end == start:
            arrays[name] = np.zeros(shape, dtype=dtype)
            continue
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset + start, shape=shape)
    return arrays, metadata
