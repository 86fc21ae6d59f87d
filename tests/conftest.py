"""Test setup: offline hubs, quiet Prefect, a shared cache for tiny models, a run-root fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Offline before any model library is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run faster on one thread than on two contended ones (and tests may run side by side).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tiny models are built once per machine and reused by every test (and by subprocesses).
os.environ.setdefault("PCM_CACHE_DIR", str(REPO / ".pytest_cache" / "pcm-models"))


@pytest.fixture
def layout(tmp_path: Path):
    from storage.layout import RunLayout

    return RunLayout(tmp_path / "runs")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread in every test: tiny models run faster so on a shared machine, and runs that
    are compared bitwise (in this process and in subprocesses, via OMP_NUM_THREADS) use the same count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - torch missing means no GPU
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
