"""`python -m flows.follow`: a line per subflow state and progress step of a live flow run, read from a real server.

A flow run in its own process (a parent flow with a subflow that feeds a `flows.artifacts.Progress`) stops after
its first progress step until the test, which follows it through the shared server, has printed that step; so the
lines are seen while the run is live, not read back after it ended.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from uuid import UUID

import pytest

from flows.follow import Snapshot, changes, parse_param

REPO = Path(__file__).resolve().parent.parent

FLOW = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from prefect import flow
    from prefect.runtime import flow_run
    from flows.artifacts import Progress

    GATE = Path(sys.argv[1])

    @flow(name="stage-one")
    def stage_one():
        progress = Progress("follow-test", "render shards", every=0)
        progress(1, 2, "shard-000000")
        deadline = time.monotonic() + 120
        while not (GATE / "go").exists() and time.monotonic() < deadline:  # the test has seen 1/2
            time.sleep(0.2)
        progress(2, 2, "shard-000001")

    @flow(name="follow-parent")
    def parent():
        (GATE / "run-id").write_text(str(flow_run.id))
        stage_one()

    parent()
''')


def test_changes_prints_new_states_and_moved_progress_only():
    run, child, art = UUID(int=1), UUID(int=2), UUID(int=3)
    a = Snapshot({run: (0, "synth-and-train", "Running")}, {}, None)
    b = Snapshot({run: (0, "synth-and-train", "Running"), child: (1, "synthesize", "Running")},
                 {art: (child, "synthesize shards: 1/4 (25%)")}, None)
    assert changes(None, a) == ["synth-and-train  Running"]
    assert changes(a, b) == ["  synthesize  Running", "  synthesize  synthesize shards: 1/4 (25%)"]
    assert changes(b, b) == []
    c = Snapshot({**b.states, child: (1, "synthesize", "Completed")}, {art: (child, "synthesize shards: 4/4 (100%)")},
                 None)
    assert changes(b, c) == ["  synthesize  synthesize shards: 4/4 (100%)", "  synthesize  Completed"]


def test_params_read_as_prefect_reads_them():
    assert parse_param('config={"preset": "tiny"}') == ("config", {"preset": "tiny"})
    assert parse_param("root=runs/x") == ("root", "runs/x")


@pytest.mark.heavy
def test_follow_streams_stage_states_and_progress_of_a_live_run(prefect_api, tmp_path, capsys):
    from prefect.client.orchestration import get_client

    from flows.follow import follow

    script = tmp_path / "flow.py"
    script.write_text(FLOW, encoding="utf-8")
    env = {**os.environ, "PREFECT_API_URL": prefect_api.api_url,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    result: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run-id").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        root = UUID((tmp_path / "run-id").read_text())

        def run() -> None:
            with get_client(sync_client=True) as client:
                result["final"] = follow(client, root, interval=0.5, out=lines.append, timeout=240)

        follower = threading.Thread(target=run, daemon=True)
        follower.start()
        deadline = time.monotonic() + 120
        while not any("1/2" in line for line in lines):  # the run waits here: this step is shown live
            assert follower.is_alive() and time.monotonic() < deadline, lines
            time.sleep(0.2)
        (tmp_path / "go").touch()
        follower.join(240)
        assert proc.wait(120) == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        (tmp_path / "go").touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "\n".join(lines)
    assert result.get("final") == "COMPLETED", text
    assert any(line.endswith("] follow-parent  Running") for line in lines), text
    assert any(line.endswith("]   stage-one  Running") for line in lines), text
    assert any("stage-one  render shards: 1/2 shard-000000 (50%)" in line for line in lines), text
    assert any("stage-one  render shards: 2/2 shard-000001 (100%)" in line for line in lines), text
    assert any(line.endswith("]   stage-one  Completed") for line in lines), text
    assert any(line.endswith("] follow-parent  Completed") for line in lines), text

    # The command line, on the finished run's id: its final picture, and exit status 0 for Completed.
    from flows.follow import main

    assert main([str(root), "--interval", "0.5"]) == 0
    shown = capsys.readouterr().out
    assert "follow-parent  Completed" in shown and "render shards: 2/2 shard-000001 (100%)" in shown, shown
