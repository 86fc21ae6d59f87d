"""The suite's own machinery: the files tests/conftest.py hands out first exist, and every test process of
a run shares the one Prefect server, which the process that ran pytest stops at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import LONGEST, REPO
from prefect_server import FOLDER_ENV, stop_run_server


def test_the_files_handed_out_first_exist_once_each():
    # A renamed file would silently lose its place and could start last, keeping one worker busy alone.
    files = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    assert sorted(set(LONGEST) - files) == []
    assert len(set(LONGEST)) == len(LONGEST)


def test_another_test_process_of_the_run_finds_the_same_server(prefect_server):
    # As an xdist worker would: the run's folder inherited through the environment, the record read under the lock.
    code = "from prefect_server import run_server; s = run_server(); print(s.port, len(s.procs))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", env={**os.environ}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert os.environ[FOLDER_ENV] and out == [str(prefect_server.port), "0"]  # found, not started: holds no process


def test_the_server_a_worker_started_is_stopped_by_its_process_group(tmp_path):
    # A stand-in server, in its own process group as LocalStack starts one, recorded as run_server records it.
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        (tmp_path / "server.json").write_text(json.dumps({"port": 1, "pid": server.pid}))
        stop_run_server(tmp_path, grace=5)
        assert server.wait(timeout=5) == -signal.SIGTERM
    finally:
        server.kill()
        server.wait()
