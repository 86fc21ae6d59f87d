"""Where a stage runs: `auto` picks the GPU when one is visible."""

from __future__ import annotations


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
