"""Which failures a task retries: transient ones (CUDA, out of memory, I/O), never bad configs or inputs."""

from __future__ import annotations

from typing import Any

# Errors a retry cannot fix: bad configs, missing inputs or models, permissions.
_PERMANENT = (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError, NotADirectoryError,
              IsADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """CUDA errors (out of memory, launch failures) and I/O errors are worth a retry; the rest are not."""
    if isinstance(exc, _PERMANENT):
        return False
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        if "device-side assert" in text or "illegal memory access" in text:
            return False  # the CUDA context is broken: only a new process recovers
        return "CUDA" in text or "out of memory" in text
    return isinstance(exc, OSError)


def retry_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """A `retry_condition_fn`: retry only when the failed state's exception is transient."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - the failed state re-raises its exception here
        return is_transient(e)
    return False
