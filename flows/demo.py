"""The laptop demo: local Prefect server, work pool, deployments, a worker, then synth-and-train/demo.

    python -m flows.demo [--port 4200] [--keep-running]

Prints where the dashboard and the outputs are; stops what it started on exit (or leaves the
server and worker running with --keep-running, printing how to stop them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from flows.local_server import REPO, LocalStack
from storage.layout import RunLayout, StageDir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=4200, help="server port on 127.0.0.1 (default 4200)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ap.add_argument("--home", default=str(REPO / ".prefect"), help="PREFECT_HOME: SQLite database and logs")
    ap.add_argument("--deployment", default="synth-and-train/demo")
    ap.add_argument("--keep-running", action="store_true", help="leave the server and worker up to browse the dashboard")
    args = ap.parse_args(argv)

    stack = LocalStack(home=Path(args.home), host=args.host, port=args.port)
    t0 = time.monotonic()
    try:
        print(f"[demo] starting Prefect server on {stack.dashboard_url} (PREFECT_HOME={stack.home})", flush=True)
        stack.start_server()
        print("[demo] creating work pool, concurrency limit and deployments", flush=True)
        stack.create_pool()
        stack.deploy()
        stack.start_worker()
        print(f"[demo] running {args.deployment} (watch it at {stack.dashboard_url}/runs)", flush=True)
        # `python -m flows.follow`: a line per stage state and progress step while it runs (the README's command).
        follow = subprocess.run([sys.executable, "-m", "flows.follow", args.deployment], env=stack.env(), cwd=REPO)
        if follow.returncode != 0:
            print(f"[demo] the flow run failed; logs: {stack.home}/worker.log, {stack.home}/server.log", file=sys.stderr)
            return 1
        evaluated = [sd for sd in RunLayout(REPO / "runs").stage_dirs("evaluate") if sd.metrics.is_file()]
        evaluated.sort(key=lambda sd: sd.metrics.stat().st_mtime)
        print(f"[demo] finished in {time.monotonic() - t0:.0f}s", flush=True)
        print(f"[demo] outputs:   {REPO / 'runs'}  (one directory per stage and fingerprint)")
        if evaluated:
            print_results(evaluated[-1])
        print(f"[demo] dashboard: {stack.dashboard_url}")
        if args.keep_running:
            print("[demo] server and worker keep running; press Ctrl-C to stop them", flush=True)
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        print("[demo] stopping worker and server", flush=True)
        stack.stop()


def print_results(sd: StageDir, n: int = 5) -> None:
    """The metrics of an evaluate stage beside the language-only control, and a few of its captions."""
    metrics_file = sd.metrics
    summary = json.loads(metrics_file.read_text())
    m = summary["metrics"]
    shown = {k: (round(100 * v, 1) if isinstance(v, float) else str(v).split(":")[0]) for k, v in m.items()
             if k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")}
    print(f"[demo] metrics:   {metrics_file}\n[demo]            {shown}")
    control = (summary.get("control") or {}).get("metrics")
    if control:
        print(f"[demo] control:   CIDEr {100 * control['CIDEr']:.1f} when each caption is scored against another "
              f"image's references (the captions above score {100 * m['CIDEr']:.1f} against their own)")
    print_published(summary)
    predictions = json.loads(sd.predictions.read_text())
    for p in predictions[:: max(1, len(predictions) // n)][:n]:
        print(f"[demo] {str(p['image_id']):>10}: {p['caption']}")
    print(f"[demo] report:    {sd.report}")


def print_published(summary: dict) -> None:
    """The paper's numbers when metrics.json has them, labelled not comparable on another dataset or split.

    The demo evaluates on the toy world (or the bundled demo images), not on COCO: its CIDEr and the
    paper's 113.6 measure different things. An older metrics.json without the label gets it here.
    """
    from pcm.report import published_caveat

    pub = summary.get("published")
    if not pub:
        return
    datasets = summary.get("datasets") or {}
    try:
        caveat = pub.get("caveat") if "comparable" in pub else published_caveat(
            pub["setting"], train=datasets.get("train"), evaluated=datasets.get("eval"),
            split=summary.get("split", "test"))
    except ValueError as e:  # a setting no longer in published.toml
        caveat = f"not comparable: {e}"
    paper = ", ".join(f"{r['metric']} {r['published']}" for r in pub["rows"])
    title = pub.get("paper_title", pub["title"])
    if caveat:
        print(f"[demo] paper:     {title}: {paper} -- {caveat}; for reference only, no difference shown")
    else:
        diffs = ", ".join(f"{r['metric']} {r['difference']:+.1f}" for r in pub["rows"] if r["difference"] is not None)
        print(f"[demo] paper:     {title}: {paper} (measured minus paper: {diffs})")


if __name__ == "__main__":
    sys.exit(main())
