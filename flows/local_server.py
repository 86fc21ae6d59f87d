"""A local Prefect stack for the demo and the end-to-end tests: server (127.0.0.1, SQLite), pool, worker.

Everything started here runs in its own process group and is stopped by `LocalStack.stop()`
(worker first, then server), also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL = "local-process"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prefect_bin() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else (shutil.which("prefect") or "prefect")


LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"

# Runs a command with SIGINT at its default. A worker stops gracefully by sending itself SIGINT on its first
# SIGTERM; started from a process that ignores SIGINT (`make demo &`, nohup, a script's `&` job) it would
# inherit the ignoring, and stop only on a second SIGTERM. (exec keeps an ignored signal ignored, so the reset
# must happen in the child before exec; preexec_fn is unsafe with threads, hence this tiny launcher.)
WITH_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
               "os.execv(sys.argv[1], sys.argv[1:])"]


@dataclass
class LocalStack:
    """A Prefect server, work pool and workers on this machine, with their own PREFECT_HOME."""

    home: Path
    host: str = "127.0.0.1"
    port: int = 4200
    logs: Path | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_UI_URL": self.dashboard_url,
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_SERVER_API_HOST": self.host,
            "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
            "PREFECT_LOGGING_EXTRA_LOGGERS": "pcm,storage,flows",   # the project's logs on the dashboard
            # Concurrency leases on disk, not in the server's memory: after a server restart a dead
            # holder's lease still exists, expires and is revoked, so the `gpu` slot it held comes back.
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "PWD": str(REPO),  # prefect.yaml pulls into {{ $PWD }}: the repository
        }

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log_dir = self.logs or self.home
        log_dir.mkdir(parents=True, exist_ok=True)
        out = open(log_dir / f"{name}.log", "ab")
        # A new session: the process and its children get our signals together, never the terminal's.
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**self.env(), **(env or {})}, cwd=REPO,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def prefect(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a prefect CLI command against this server."""
        return subprocess.run([prefect_bin(), *args], env=self.env(), cwd=REPO, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def start_server(self, timeout: float = 180) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._spawn("server", [prefect_bin(), "server", "start", "--host", self.host, "--port", str(self.port)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"prefect server exited early; see {(self.logs or self.home) / 'server.log'}")
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout:.0f}s at {self.api_url}")

    def create_pool(self, gpu_slots: int = 1) -> None:
        r = self.prefect("work-pool", "create", POOL, "--type", "process", check=False)
        if r.returncode != 0 and "already exists" not in (r.stdout + r.stderr):
            raise RuntimeError(f"could not create work pool {POOL}: {r.stdout}{r.stderr}")
        # GPU tasks carry the tag "gpu": at most `gpu_slots` run at once on this server.
        self.prefect("concurrency-limit", "create", "gpu", str(gpu_slots), check=False)

    def deploy(self) -> None:
        r = self.prefect("--no-prompt", "deploy", "--all", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"prefect deploy failed:\n{r.stdout}\n{r.stderr}")

    def start_worker(self, name: str = "worker", pool: str = POOL, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A process worker of `pool`; `env`: variables of its own (a host's working copy: PCM_MIRROR_DIR)."""
        # A worker beside its server looks for scheduled runs every 2 s, not Prefect's 10: a scheduled
        # run waits half the interval on average, 1 s instead of 5 (PREFECT_WORKER_QUERY_SECONDS overrides).
        query = os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2")
        return self._spawn(name, [*WITH_SIGINT, prefect_bin(), "worker", "start", "--pool", pool, "--name", name],
                           env={"PREFECT_WORKER_QUERY_SECONDS": query, **(env or {})})

    def run_deployment(self, name: str, params: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
        """`prefect deployment run NAME --watch`; returns the finished command."""
        args = ["deployment", "run", name, "--watch", "--watch-interval", "2", "--watch-timeout", str(int(timeout))]
        for k, v in (params or {}).items():
            args += ["--param", f"{k}={json.dumps(v)}"]
        return self.prefect(*args, check=False, timeout=timeout + 60)

    def stop(self, grace: float = 10) -> None:
        """Workers first (they may be running flows), then the server; SIGTERM, then SIGKILL.

        Each process gets `grace` seconds after the first SIGTERM (a worker's graceful stop); a second SIGTERM
        makes a worker SIGKILL itself."""
        for proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.procs.clear()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
