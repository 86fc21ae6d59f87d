"""Benchmark the refine stage's retrieval: blocked top-k (pcm.refine.topk_similar) vs one full matrix + torch.topk.

    python bench/refine.py                         # 100k x 100k blocked, 20k x 20k both ways; one CPU thread
    python bench/refine.py --n 20000 --baseline-n 5000 --threads 2

Random unit embeddings (dim 768), k = 15, float32, as the stage's text->image retrieval. Each measurement
runs in a fresh process so its peak RSS (ru_maxrss) is its own; `extra_mb` is the peak minus the RSS
right after the inputs were made (what the retrieval itself added). The baseline materialises the
n x n similarity matrix (4 n^2 bytes: 40 GB at 100k, 1.3 TB at COCO's 566k), so it runs at
--baseline-n and the blocked method runs there too for the ratio. Writes bench/results/refine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    """The current resident set size in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(method: str, n: int, dim: int, k: int, block: int, threads: int) -> dict:
    """One measurement in this process: seconds and memory of `method` (blocked | full) on n x n."""
    import numpy as np
    import torch

    from pcm import refine

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    q = refine.unit_rows(rng.standard_normal((n, dim), dtype=np.float32))
    keys = refine.unit_rows(rng.standard_normal((n, dim), dtype=np.float32))
    base = rss_mb()
    t0 = time.perf_counter()
    if method == "blocked":
        _, idx = refine.topk_similar(q, keys, k, block=block)
    else:
        with torch.inference_mode():
            sims = torch.from_numpy(q) @ torch.from_numpy(keys).T      # the n x n matrix
            idx = torch.topk(sims, k, dim=1).indices.numpy()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "n": n, "dim": dim, "k": k, "block": block if method == "blocked" else None,
            "threads": threads, "seconds": round(seconds, 2), "peak_rss_mb": round(peak), "inputs_rss_mb": round(base),
            "extra_mb": round(peak - base), "checksum": int(idx[:, 0].astype(np.int64).sum())}


def child(method: str, n: int, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, "--n", str(n), "--dim", str(args.dim),
                          "--k", str(args.k), "--block", str(args.block), "--threads", str(args.threads)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="captions = images of the blocked run")
    p.add_argument("--baseline-n", type=int, default=20_000, help="size where the full matrix is built")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=["blocked", "full"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "refine.json")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.n, args.dim, args.k, args.block, args.threads)))
        return

    full = child("full", args.baseline_n, args)
    small = child("blocked", args.baseline_n, args)
    if small["checksum"] != full["checksum"]:
        raise SystemExit("the blocked top-1 differs from the full matrix's")
    big = child("blocked", args.n, args)
    scale = (args.n / args.baseline_n) ** 2
    summary = {
        "time_ratio_blocked_over_full": round(small["seconds"] / full["seconds"], 3),
        "extra_memory_ratio_full_over_blocked": round(full["extra_mb"] / max(1, small["extra_mb"]), 1),
        "full_at_n_extrapolated_seconds": round(full["seconds"] * scale, 1),
        "full_at_n_matrix_gb": round(4 * args.n ** 2 / 1e9, 1),
        "coco_566k_blocked_extrapolated_hours_this_cpu": round(big["seconds"] * (566_000 / args.n) ** 2 / 3600, 2),
    }
    print(f"at n={args.baseline_n}: blocked {small['seconds']} s, +{small['extra_mb']} MB; full matrix "
          f"{full['seconds']} s, +{full['extra_mb']} MB (time ratio blocked/full "
          f"{summary['time_ratio_blocked_over_full']}, memory ratio full/blocked "
          f"{summary['extra_memory_ratio_full_over_blocked']})")
    print(f"at n={args.n}: blocked {big['seconds']} s, peak RSS {big['peak_rss_mb']} MB (+{big['extra_mb']} MB over "
          f"the inputs); the full matrix would be {summary['full_at_n_matrix_gb']} GB and ~"
          f"{summary['full_at_n_extrapolated_seconds']} s by n^2 scaling")
    record = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads_used": args.threads},
              "runs": [full, small, big], "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
