"""One Prefect server for the whole test session, shared by every test that only needs *a* server.

Starting a Prefect server costs 20-50 s on two busy cores (imports, then the database migrations),
so tests/conftest.py starts one, lazily, the first time a test asks for `prefect_server` (a
`flows.local_server.LocalStack`: `prefect server start` on 127.0.0.1, its own free port, SQLite
in a session temporary directory) and stops it when the session ends. Tests that run flows in this
process use the `prefect_api` fixture instead of `prefect_test_harness()`: their flows talk to the
shared server, and what they send (logs, events) is drained before the test ends.

Tests that must own their server (one that SIGKILLs it, say) still start a LocalStack of their own.
Tests that add state to the shared server (a work pool, deployments, workers, a concurrency limit)
remove what would change other tests' runs when they are done (see tests/test_e2e.py).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator
from pathlib import Path

from flows.local_server import LocalStack, free_port


def start_shared_server(home: Path, timeout: float = 300) -> tuple[LocalStack, float]:
    """A started server on 127.0.0.1 and a free port, and the seconds it took to become healthy."""
    stack = LocalStack(home=home, port=free_port("127.0.0.1"))
    started = time.monotonic()
    try:
        stack.start_server(timeout=timeout)
    except BaseException:
        stack.stop()
        raise
    return stack, time.monotonic() - started


def client_stack(server: LocalStack, home: Path) -> LocalStack:
    """A LocalStack for `server`'s API with its own PREFECT_HOME and logs: its workers and CLI calls
    go to the shared server, and its `stop()` stops only what it started (never the server)."""
    return LocalStack(home=home, host=server.host, port=server.port, logs=home)


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
