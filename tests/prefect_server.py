"""One Prefect server for the whole test run, shared by every test that only needs *a* server.

Starting a Prefect server costs 10-50 s of CPU on two cores (imports, then the database migrations),
so the run starts one, lazily, the first time a test asks for `prefect_server` (a
`flows.local_server.LocalStack`: `prefect server start` on 127.0.0.1, its own free port, SQLite).
Under pytest-xdist every worker uses the same one: the process that ran pytest makes a folder for it
before the workers start (`run_folder`, named in $PCM_TEST_SERVER_DIR, which the workers inherit); the
first worker to ask starts the server there under a file lock and records its port, the others find
the record; the process that ran pytest stops it once every worker is done (`stop_run_server`).
Tests that run flows in their own process use the `prefect_api` fixture instead of
`prefect_test_harness()`: their flows talk to the shared server, and what they send (logs, events)
is drained before the test ends.

Tests that must own their server (one that SIGKILLs it, say) or that add state which would change other
tests' runs (a work pool, workers, the `gpu` concurrency limit: tests/test_e2e.py) start a LocalStack
of their own (`start_server`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from flows.local_server import LocalStack, free_port
from storage.atomic import read_json, write_json
from storage.lock import FileLock

FOLDER_ENV = "PCM_TEST_SERVER_DIR"
_STARTED: dict[str, LocalStack] = {}  # run folder -> its server, in the process that started it


def start_server(home: Path, timeout: float = 300) -> LocalStack:
    """A started server of the caller's own on 127.0.0.1 and a free port, PREFECT_HOME `home`."""
    stack = LocalStack(home=home, port=free_port("127.0.0.1"))
    try:
        stack.start_server(timeout=timeout)
    except BaseException:
        stack.stop()
        raise
    return stack


def run_folder() -> Path:
    """The folder of the run's shared server, made by the process that runs pytest (before xdist starts its
    workers, which inherit $PCM_TEST_SERVER_DIR)."""
    folder = Path(tempfile.mkdtemp(prefix="pcm-test-prefect-"))
    os.environ[FOLDER_ENV] = str(folder)
    return folder


def run_server() -> LocalStack:
    """The run's shared server: started by the first test process that asks (under the folder's lock), found
    through its record by the others. Only the process that started it holds its process (`procs`)."""
    folder = Path(os.environ[FOLDER_ENV])
    with FileLock(folder / "server.lock", timeout=None):  # released on leaving, also if this process dies
        record = folder / "server.json"
        if record.exists():
            return LocalStack(home=folder / "prefect", port=read_json(record)["port"])
        stack = start_server(folder / "prefect")
        _STARTED[str(folder)] = stack
        write_json(record, {"port": stack.port, "pid": stack.procs[0].pid})  # atomic: never read half written
        return stack


def stop_run_server(folder: Path, grace: float = 10) -> None:
    """Stop the run's shared server, if a test started one: as its LocalStack where this process started it
    (no xdist), else by its process group (an xdist worker started it and has exited since)."""
    record = folder / "server.json"
    if str(folder) in _STARTED:
        _STARTED.pop(str(folder)).stop()
    elif record.exists():
        group = read_json(record)["pid"]  # the server leads its own process group
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
            deadline = time.monotonic() + wait
            while _group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _group_alive(group):
                return


def _group_alive(group: int) -> bool:
    """Whether a process of `group` still runs; on Linux a zombie (waiting to be reaped) does not count."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    if not Path("/proc").is_dir():
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                return True
    return False


def _drain() -> None:
    """Send what this process still holds for the server (logs, events), as prefect_test_harness does on exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # the log worker was never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


@contextlib.contextmanager
def pointed_at(server: LocalStack) -> Iterator[str]:
    """Flows run in this process use `server` (prefect_test_harness without starting a server); yields its API URL."""
    import prefect.context
    import prefect.settings

    with contextlib.ExitStack() as stack:
        stack.enter_context(prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: server.api_url}))
        # Also the process-global settings, for code holding a context copied before this one (as the harness does).
        stack.enter_context(prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()))
        try:
            yield server.api_url
        finally:
            _drain()
