"""The paper's ablation on the toy world as an experiment: arms x defect levels x seeds, with intervals.

    python bench/ablation.py run                      # every arm-seed still missing, in priority order
    python bench/ablation.py run --levels defective --seeds 5 --processes 2
    python bench/ablation.py report                   # tables, bench/results/ablation.json, docs/ablation.png
    python bench/ablation.py plan                     # what is done and what would run

What runs is defined in pcm/toyworld/ablation.py (levels, arms, controls); each arm at demo size
(1,500 captions, 300 drawn test scenes) takes about 4 CPU-minutes to train and evaluate on one core
once its level's shared stages exist. Resumable in pieces: a finished arm is a cached stage under
`--work` and a record under `--records` (committed, so the sweep goes on in a later session or on
another machine); kill it at any moment. As a Prefect flow with dashboard artifacts:
`python -m flows.ablation` (or the deployment `toyworld-ablation/default`).

Statistics (report): per arm the mean and sd of CIDEr over seeds and a 95% interval from a two-level
bootstrap (seeds, then test images, resampled together); per comparison with base the mean difference
paired by seed and image, its interval, and the smallest effect the comparison could have detected
(80% power at alpha 0.05: 2.8 x the bootstrap standard error). See pcm/stats.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pcm.toyworld import ablation  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _run_one(job: tuple[str, str, int, str, str]) -> None:
    import torch

    torch.set_num_threads(1)  # one core per arm: --processes arms side by side
    rec = ablation.run_arm(*job)
    print(f"[ablation] {rec['level']} {rec['arm']} seed {rec['seed']}: CIDEr {rec['cider']:.1f} "
          f"({rec['seconds']:.0f} s)", flush=True)


def text_table(rows: list[dict]) -> str:
    headers = list(rows[0])
    cells = [headers] + [[str(r[h]) for h in headers] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if h == "arm" else "---:" for h in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(r[h]) for h in headers) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "report", "plan"])
    ap.add_argument("--levels", default=",".join(ablation.LEVELS), help="comma-separated levels (default: all)")
    ap.add_argument("--seeds", type=int, default=5, help="training seeds per arm (default 5)")
    ap.add_argument("--processes", type=int, default=1, help="arms trained side by side, one core each")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation", help="run root (stages reused)")
    ap.add_argument("--records", type=Path, default=RESULTS / "ablation", help="one JSON per finished arm-seed")
    ap.add_argument("--out", type=Path, default=RESULTS / "ablation.json", help="the summary JSON")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "ablation.png", help="the figure")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for the README)")
    args = ap.parse_args(argv)
    try:
        jobs = ablation.planned([lv for lv in args.levels.split(",") if lv], args.seeds)
    except ValueError as e:
        ap.error(str(e))

    done = ablation.load_records(args.records)
    todo = [j for j in jobs if j not in done]
    if args.command == "plan":
        print(f"{len(done)} arm-seeds done, {len(todo)} to run:")
        for lv, arm, s in todo:
            print(f"  {lv:10s} {arm:8s} seed {s}")
        return 0
    if args.command == "run":
        work, records = str(args.work.resolve()), str(args.records.resolve())
        print(f"[ablation] {len(todo)} arm-seeds to run under {work} ({len(done)} done)", flush=True)
        with ProcessPoolExecutor(args.processes) as pool:
            list(pool.map(_run_one, [(lv, arm, s, work, records) for lv, arm, s in todo]))
        done = ablation.load_records(args.records)

    import torch

    from pcm.toyworld.faithfulness import summary_line

    summary = ablation.summarise(done)
    for level, lv in summary.items():
        lv["faithfulness"] = ablation.level_faithfulness(level, args.work)
        show = markdown_table if args.markdown else text_table
        print(f"\n## {level} ({lv['preset']}): CIDEr x100 on {lv['images']} drawn test scenes\n"
              + show(ablation.table_rows(lv)))
        if lv["faithfulness"]:
            print(f"generator faithfulness: {summary_line(lv['faithfulness'])}")
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version()},
              "settings": {"captions": 1500, "bootstrap": ablation.BOOTSTRAP, "arms": ablation.ARMS,
                           "arms_of": ablation.ARMS_OF,
                           "levels": {k: {"preset": p, "overrides": o} for k, (p, o) in ablation.LEVELS.items()}},
              "paper_coco_vitl14": ablation.PAPER, "levels": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if summary:
        print(f"\nwrote {args.out} and {ablation.plot(summary, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
