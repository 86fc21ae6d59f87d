"""Test setup: offline hubs, quiet Prefect, a shared cache for tiny models, a run-root fixture, and one
Prefect server for the whole session (`prefect_server`, `prefect_api`: see tests/prefect_server.py)."""

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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The session's Prefect server (a LocalStack on 127.0.0.1, its own free port), started on first use.

    `startup_s` holds the seconds it took to become healthy. Tests that need a server of their own
    (one they kill, say) start a LocalStack themselves."""
    from prefect_server import start_shared_server

    stack, seconds = start_shared_server(tmp_path_factory.mktemp("prefect-server"))
    stack.startup_s = seconds
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def prefect_api(prefect_server):
    """Flows this test runs in its own process use the session's Prefect server (what prefect_test_harness()
    does, without starting a server of its own each time); yields the server's LocalStack."""
    from prefect_server import pointed_at

    with pointed_at(prefect_server):
        yield prefect_server


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


# Tests of other files that take several seconds or more on two cores (a Prefect server of their own, stage
# runs in subprocesses, DDP, the Java scorers, benchmarks, real trainings): `heavy`, so that `make test-fast`
# leaves them out. A file may carry @pytest.mark.heavy itself instead; a name here that no longer exists
# only makes `make test-fast` slower. {file: test function names, or "*" for the whole file}
HEAVY = {
    "test_concurrency.py": "*",
    "test_gpu_suite.py": ("test_gpu_suite_cpu_tiny",),
    "test_stage_dirs.py": "*",
    "test_evaluate.py": ("test_flow_caches_on_the_fingerprint_and_publishes_artifacts",
                         "test_evaluate_end_to_end_then_cached_and_resumed", "test_evaluate_command_prints_the_metrics"),
    "test_synthesize.py": ("test_flow_renders_each_shard_as_a_task_and_reuses_the_finished_stage",
                           "test_bench_prints_both_figures_and_the_ratio",
                           "test_killed_run_leaves_no_partial_shard_and_resumes", "test_same_shard_twice_is_byte_identical",
                           "test_a_shard_held_by_another_process_is_skipped_then_waited_for",
                           "test_two_workers_split_the_shards_without_duplicates"),
    "test_train.py": ("test_ddp_two_gloo_processes_match_one_process", "test_flow_caches_on_the_fingerprint_and_publishes_artifacts",
                      "test_sigkill_at_a_random_step_then_resume_gives_bitwise_equal_weights",
                      "test_tiny_model_memorises_eight_captions"),
    "test_layering.py": ("test_the_import_probe_sees_torch",),
    "test_encode.py": ("test_bench_runs_on_cpu_and_prints_the_ratio", "test_sigkill_resume_redoes_only_pending_shards"),
    "test_ingest.py": ("test_flow_second_run_is_cached",),
    "test_import_images.py": ("test_encode_train_and_evaluate_run_unchanged_on_an_imported_stage",),
    "test_storage.py": ("test_a_moved_run_root_names_its_new_place_never_the_old_one",),
    "test_metrics.py": ("test_equals_coco_eval_cap_on_the_same_files", "test_spice_unavailable_is_reported_and_on_is_an_error",
                        "test_hand_checked_bleu_and_cider", "test_cider_alone_equals_the_full_scorer"),
    "test_train_recovery.py": ("test_kill_right_after_the_best_step_checkpoint_then_rerun_writes_best_from_it",),
}


def _heavy(item) -> bool:
    names = HEAVY.get(Path(str(item.fspath)).name, ())
    return names == "*" or getattr(item, "originalname", item.name) in names


@pytest.hookimpl(tryfirst=True)  # before -m deselects: `heavy` added here counts
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
        # Whatever uses a Prefect server is left out of `make test-fast`, and so is HEAVY.
        if "prefect_server" in getattr(item, "fixturenames", ()) or _heavy(item):
            item.add_marker(pytest.mark.heavy)
