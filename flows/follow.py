"""Follow a flow run in the terminal: a line whenever a stage (subflow) changes state or a progress bar moves.

    python -m flows.follow synth-and-train/demo [--param config='{"preset": "tiny"}']   # start a run, follow it
    python -m flows.follow 0f3c...-flow-run-id                                          # follow an existing run

`prefect deployment run NAME --watch` shows only the parent run's state; this polls the Prefect API
(PREFECT_API_URL) every `--interval` seconds for the run, its subflow runs (recursively: fan-out
children too) and their progress artifacts, and prints what changed:

    [14:02:11] synth-and-train  RUNNING
    [14:02:15]   synthesize  RUNNING
    [14:02:40]   synthesize  synthesize shards: 3/12 shard-000002 (25%)

Exits 0 when the run completes, 1 when it ends in any other state (the final state's message printed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass(frozen=True)
class Snapshot:
    """What the follower shows of a run at one moment: each run's line of state, each progress bar's text."""

    states: dict[UUID, tuple[int, str, str]]     # flow run id -> (depth, flow name, state name)
    progress: dict[UUID, tuple[UUID, str]]       # artifact id -> (its flow run id, "description (pct%)")
    final: str | None                            # the root run's state type once final, else None
    message: str = ""                            # the root run's state message


def changes(before: Snapshot | None, now: Snapshot) -> list[str]:
    """The lines to print going from `before` to `now`: runs new or in a new state, progress bars that moved."""
    out = []
    old_states = before.states if before else {}
    old_progress = before.progress if before else {}
    for run_id, (depth, name, state) in now.states.items():
        moved = [f"{'  ' * depth}{name}  {text}" for art_id, (owner, text) in now.progress.items()
                 if owner == run_id and old_progress.get(art_id, (None, None))[1] != text]
        state_line = [f"{'  ' * depth}{name}  {state}"] if old_states.get(run_id) != (depth, name, state) else []
        # A new run's state comes before its progress; a known run's new state (say Completed) after its last step.
        out += state_line + moved if run_id not in old_states else moved + state_line
    return out


def progress_text(artifact: Any) -> str:
    pct = artifact.data if isinstance(artifact.data, (int, float)) else 0.0
    return f"{artifact.description or artifact.key or 'progress'} ({pct:.0f}%)"


def snapshot(client: Any, root: UUID, flow_names: dict[UUID, str]) -> Snapshot:
    """Read the run `root`, its subflow runs at any depth and their progress artifacts (one request per level)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    root_run = client.read_flow_run(root)
    runs = [(0, root_run)]
    level, depth = [root_run.id], 0
    while level:  # breadth first: the subflows of this level's runs
        depth += 1
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=level)),
            sort=FlowRunSort.START_TIME_ASC)
        children = [c for c in children if c.id not in {r.id for _, r in runs}]
        runs += [(depth, c) for c in children]
        level = [c.id for c in children]
    for _, r in runs:
        if r.flow_id not in flow_names:
            flow_names[r.flow_id] = client.read_flow(r.flow_id).name
    states = {r.id: (d, flow_names[r.flow_id], r.state.name if r.state else "PENDING") for d, r in runs}
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=list(states)), type=ArtifactFilterType(any_=["progress"])))
    progress = {a.id: (a.flow_run_id, progress_text(a)) for a in artifacts}
    state_type = root_run.state.type.value if root_run.state else None
    final = state_type if state_type in FINAL else None
    return Snapshot(states, progress, final, (root_run.state.message or "") if root_run.state else "")


def follow(client: Any, root: UUID, interval: float = 3.0, out: Callable[[str], None] = print,
           timeout: float | None = None) -> str:
    """Print changes of run `root` until it is final (or `timeout` seconds pass); returns its final state type."""
    flow_names: dict[UUID, str] = {}
    before: Snapshot | None = None
    started = time.monotonic()
    while True:
        try:
            now = snapshot(client, root, flow_names)
        except Exception as e:  # noqa: BLE001 - a server hiccup (restart, timeout) is retried, not fatal
            out(f"[{clock()}] (API not answering: {type(e).__name__}: {e}; retrying)")
            time.sleep(interval)
            continue
        for line in changes(before, now):
            out(f"[{clock()}] {line}")
        before = now
        if now.final:
            if now.final != "COMPLETED" and now.message:
                out(f"[{clock()}] {now.message}")
            return now.final
        if timeout is not None and time.monotonic() - started > timeout:
            return "TIMED_OUT"
        time.sleep(interval)


def clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


def parse_param(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` as `prefect deployment run --param` reads it: VALUE is JSON when it parses, else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def start_run(client: Any, deployment: str, params: dict[str, Any]) -> UUID:
    deployment_obj = client.read_deployment_by_name(deployment)
    run = client.create_flow_run_from_deployment(deployment_obj.id, parameters=params)
    return run.id


UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a flow run id to follow, or a deployment FLOW/NAME to start a run of and follow")
    ap.add_argument("--param", action="append", default=[], type=parse_param,
                    help="KEY=VALUE parameter of a new run (VALUE as JSON when it parses), repeatable")
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between polls (default 3)")
    args = ap.parse_args(argv)

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        if UUID_RE.match(args.run):
            if args.param:
                ap.error("--param starts a new run: give a deployment name, not a flow run id")
            root = UUID(args.run)
        else:
            root = start_run(client, args.run, dict(args.param))
            ui = (PREFECT_API_URL.value() or "").removesuffix("/api")
            print(f"[{clock()}] started {args.run}: flow run {root}" + (f" ({ui}/runs/flow-run/{root})" if ui else ""),
                  flush=True)
        final = follow(client, root, args.interval, out=lambda line: print(line, flush=True))
    return 0 if final == "COMPLETED" else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # stop following; the run itself goes on
        sys.exit(130)
