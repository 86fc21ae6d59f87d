"""Where a stage runs: `auto` picks the GPU when one is visible."""

from __future__ import annotations

from typing import Any

# Precision names accepted in configs (diffusion dtype, CLIP precision) -> torch dtype attribute names.
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def resolve_device(spec: str, local_rank: int | None = None) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; any other value is passed through.

    A training process passes its `local_rank`: a bare `cuda` then names that process's own GPU
    (`cuda:<local_rank>`), so the DDP ranks of one machine do not all share GPU 0.
    """
    if spec == "auto":
        import torch

        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if local_rank is not None and spec == "cuda":
        return f"cuda:{local_rank}"
    return spec


def torch_dtype(name: str) -> Any:
    """The torch dtype of a precision name (`fp16`, `bf16`, `fp32`); torch is imported only here."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])
