"""Named arrays in safetensors files, read back memory-mapped without pickle.

The files are ordinary safetensors (any safetensors loader reads them). They are serialised here,
with sorted names and metadata, so the same arrays always give the same bytes (the safetensors
library orders metadata differently from one process to the next). `open_arrays` parses the header
itself and returns `numpy.memmap` views, so a training loader touches only the rows it uses.
"""

from __future__ import annotations

import json
import math
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
# Bytes per element of every safetensors dtype a header may name (BF16 and F8 read only via torch).
_ITEMSIZE = {**{code: np.dtype(t).itemsize for code, t in _DTYPES.items()},
             "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


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


MAX_HEADER = 100_000_000  # bytes of header JSON; the safetensors library refuses larger ones too
_REDO = "delete it (and its .done.json, if any) and rerun the stage that wrote it"


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: corrupt safetensors header: {what}; {_REDO}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, data offset) of a safetensors file, checked against the file.

    Every entry must have a known dtype, a shape of non-negative integers and data_offsets
    [start, end] inside the data section with end - start = prod(shape) * itemsize; sorted by
    offset the tensors must tile the data section exactly (no overlap, no gap, no trailing
    bytes), as the safetensors library requires. Errors are ValueErrors naming the file.
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{len(head)} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} is implausible for a file of {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_size = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _bad(path, f"entry {name!r} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise _bad(path, f"array {name!r} has dtype {dtype!r}; known dtypes are {', '.join(_ITEMSIZE)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _bad(path, f"array {name!r} has shape {shape!r}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _bad(path, f"array {name!r} has data_offsets {offsets!r}; expected [start, end] integers")
        start, end = offsets
        if not 0 <= start <= end <= data_size:
            raise _bad(path, f"array {name!r} has data_offsets [{start}, {end}] outside the data section "
                             f"[0, {data_size}] (truncated file or offsets into the header)")
        want = math.prod(shape) * _ITEMSIZE[dtype]
        if end - start != want:
            raise _bad(path, f"array {name!r} of shape {shape} and dtype {dtype} needs {want} bytes but its "
                             f"data_offsets [{start}, {end}] hold {end - start}")
        spans.append((start, end, name))
    at, last = 0, None
    for start, end, name in sorted(spans):
        if start < at:
            raise _bad(path, f"array {name!r} at bytes [{start}, {end}] overlaps array {last!r}")
        if start > at:
            raise _bad(path, f"bytes [{at}, {start}] of the data section belong to no array")
        at, last = end, name
    if at != data_size:
        raise _bad(path, f"bytes [{at}, {data_size}] at the end of the data section belong to no array")
    return header, metadata, 8 + n


def open_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every array of a safetensors file (header checked first); returns (arrays, metadata)."""
    header, metadata, offset = read_header(path)
    arrays: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: array {name!r} has dtype {info['dtype']} that cannot be memory-mapped")
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            arrays[name] = np.zeros(shape, dtype=dtype)
            continue
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset + start, shape=shape)
    return arrays, metadata
