"""A restricted unpickler for the release's annotation and concept pickles: data only, never code.

`pickle.load` calls whatever the file names (`os.system`, `builtins.eval`, ...): a downloaded
pickle is a program. The X-modaler release ships its captions, token ids, CLIP scores and concept
embeddings as pickles, so this module reads them with an unpickler whose `find_class` admits
only the names that rebuild plain data: builtin containers and scalars, numpy arrays, dtypes and
scalars, and (on request, for the concept file) torch tensors rebuilt through
`torch.load(weights_only=True)`. Anything else is refused with an error naming the class, before
it is looked up, so it never runs.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Builtins that rebuild data. Not `getattr`, `eval`, `exec`, `__import__`, `open`, `apply`, ...
_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                       "complex", "bool"})
_PY2_MODULES = {"__builtin__": "builtins"}  # protocol 0-2 pickles written by (or for) Python 2
# numpy's pickling entry points for arrays, dtypes and scalars (numpy 1 `numpy.core`, numpy 2 `numpy._core`).
_NUMPY = {
    "numpy": frozenset({"ndarray", "dtype"}),
    "numpy.core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy._core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy.core.numeric": frozenset({"_frombuffer"}),
    "numpy._core.numeric": frozenset({"_frombuffer"}),
}
# Protocol-2 pickles store bytes as `_codecs.encode(text, "latin1")`; encoding text runs no user code.
_CODECS = frozenset({"encode"})
# torch.save'd tensors inside a plain pickle (the concept file): rebuilt from their storage bytes.
_TORCH = {"torch._utils": frozenset({"_rebuild_tensor_v2"}),
          "torch.storage": frozenset({"_load_from_bytes"}),
          "collections": frozenset({"OrderedDict"})}


class UnsafePickleError(ValueError):
    """The pickle names a class or function outside the data-only allow-list."""


def _storage_from_bytes(data: bytes) -> Any:
    """torch's `_load_from_bytes`, but through the weights-only loader (torch's own calls full `torch.load`)."""
    import torch

    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, f: Any, where: str, allow_torch: bool) -> None:
        super().__init__(f, encoding="bytes")  # as the release reads them (Python 2 era str fields come as bytes)
        self.where, self.allow_torch = where, allow_torch

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)  # what the base class maps them to (fix_imports)
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        if name in _NUMPY.get(module, ()):
            return super().find_class(module, name)
        if module == "_codecs" and name in _CODECS:
            return super().find_class(module, name)
        if self.allow_torch and name in _TORCH.get(module, ()):
            if (module, name) == ("torch.storage", "_load_from_bytes"):
                return _storage_from_bytes
            return super().find_class(module, name)
        what = "builtin containers, str, bytes, numbers and numpy arrays"
        if self.allow_torch:
            what += " (and torch tensors)"
        raise UnsafePickleError(f"{self.where}: refuses to load {module}.{name}: only {what} are read from a pickle "
                                "(loading it could run code)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.where}: refuses a persistent id ({type(pid).__name__}): not plain data")


def loads(data: bytes, where: str = "pickle", *, allow_torch: bool = False) -> Any:
    """Unpickle `data` admitting only plain data (see the module doc); `where` names the source in errors."""
    try:
        return _DataUnpickler(io.BytesIO(data), where, allow_torch).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{where}: not a readable pickle of plain data ({type(e).__name__}: {e})") from None


def load(path: str | os.PathLike, *, allow_torch: bool = False) -> Any:
    """Unpickle the file at `path` admitting only plain data; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    return loads(path.read_bytes(), str(path), allow_torch=allow_torch)


def text(value: Any) -> Any:
    """A `bytes` field of a Python-2-era pickle (read with encoding='bytes') as str; anything else unchanged."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def decode_keys(obj: Any, convert: Callable[[Any], Any] = text) -> Any:
    """Dict keys (recursively through lists and tuples) decoded from bytes, so `item['image_id']` works."""
    if isinstance(obj, dict):
        return {convert(k): decode_keys(v, convert) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(decode_keys(v, convert) for v in obj)
    return obj
