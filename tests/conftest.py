"""Test setup: offline hubs, quiet Prefect, a shared cache for tiny models, a run-root fixture, one Prefect
server for the whole run (`prefect_server`, `prefect_api`: see tests/prefect_server.py), the S3 test store
(`s3`: a moto server on 127.0.0.1 per session, `bucket`: one per test, `store`: an s3fs view) and the order
the test files are handed out in."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
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
# Under pytest-xdist (`make test` runs three workers) each worker keeps its Prefect state apart: flows run
# without a server use Prefect's ephemeral one, whose SQLite database lives in PREFECT_HOME.
if os.environ.get("PYTEST_XDIST_WORKER") and "PREFECT_HOME" not in os.environ:
    _home = REPO / ".pytest_cache" / f"prefect-home-{os.environ['PYTEST_XDIST_WORKER']}"
    _home.mkdir(parents=True, exist_ok=True)  # Prefect makes only the last level (a fresh clone has no .pytest_cache)
    os.environ["PREFECT_HOME"] = str(_home)


SERVER_FOLDER = pytest.StashKey[Path]()  # in the process that runs pytest: the run's server folder


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the process that runs pytest, not an xdist worker
        from prefect_server import run_folder

        config.stash[SERVER_FOLDER] = run_folder()


@pytest.hookimpl(trylast=True)  # after every worker is done, and after this process's own session teardown
def pytest_sessionfinish(session, exitstatus):
    folder = session.config.stash.get(SERVER_FOLDER, None)
    if folder is not None:
        from prefect_server import stop_run_server

        stop_run_server(folder)
        if exitstatus == 0:  # a failed run keeps the server's log (prefect/server.log)
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server():
    """The run's Prefect server (a LocalStack on 127.0.0.1, its own free port), started on first use and
    shared by every xdist worker (tests/prefect_server.py). Tests that need a server of their own (one
    they kill, say) start a LocalStack themselves."""
    from prefect_server import run_server

    return run_server()


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


# Tests that take several seconds or more on two cores (stage runs in subprocesses, DDP, the Java scorers,
# benchmarks, real trainings) carry @pytest.mark.heavy themselves, so that `make test-fast` leaves them out;
# whatever uses the session's Prefect server gets it here.


# ------------------------------------------------------------------------------ the S3 test store
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the environment that points boto/s3fs at it: one for the session, since
    fsspec keeps one s3fs instance (and its endpoint) per process."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def bucket(s3, request):
    import boto3

    name = "b-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def store(bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return fs


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
        # Whatever uses a Prefect server is left out of `make test-fast`.
        if "prefect_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.heavy)
    # The longest files first, the order within a file kept: `make test` runs pytest-xdist with --dist
    # loadfile --no-loadscope-reorder, which hands out files in this order (its default would sort them
    # by their number of tests, leaving the few long ones for the end). The files measured longest come
    # first, longest first (LONGEST); then end-to-end files, files heavy as a whole (their pytestmark),
    # files with some heavy tests, the rest.
    def rank(item) -> int:
        if "e2e" in item.keywords:
            return 0
        module = item.getparent(pytest.Module)
        if module is not None and module.get_closest_marker("heavy"):  # the file's pytestmark
            return 1
        return 2 if "heavy" in item.keywords else 3

    file_rank: dict[str, tuple[int, int]] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        name = path.rsplit("/", 1)[-1]
        known = (LONGEST.index(name), 0) if name in LONGEST else (len(LONGEST), rank(item))
        file_rank[path] = min(known, file_rank.get(path, known))
    items.sort(key=lambda item: file_rank[item.nodeid.split("::")[0]])


# The test files that take longest in `make test`, longest first (seconds of one worker, measured on this
# project's 2-core machine with three workers, session 11): handed out first, so that no long file starts
# last and keeps one worker busy while the others have finished.
LONGEST = (
    "test_e2e.py",              # 174 s: its own server, three deployment runs, seven flow-run processes
    "test_learning.py",         # 158 s: two trainings and evaluations on the toy world
    "test_prefect_recovery.py", # 122 s, a minute of it waiting for a killed run's lease
    "test_object_store.py",     # 102 s: moto's S3 server, eight `pcm` processes
    "test_toyworld.py",         # 72 s
    "test_crash_resume.py",     # 66 s
    "test_metrics.py",          # 52 s: the Java scorers
    "test_gpu_suite.py",        # 40 s
    "test_train.py",            # 36 s
    "test_synthesize.py",       # 36 s
    "test_concurrency.py",      # 34 s
    "test_evaluate.py",         # 11 s
    "test_encode.py",           # 10 s
)
