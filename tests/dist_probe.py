"""A rank launched by pcm.distributed.launch: joins the group, and rank 0 lists every listening socket of the ranks and
their launcher.

    python -m tests.dist_probe OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from pcm import distributed


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def listening(pids: list[int]) -> list[str]:
    """host:port (hex, as /proc/net shows it) of every TCP socket in LISTEN state owned by `pids`."""
    inodes = set().union(*(socket_inodes(p) for p in pids))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:   # 0A = LISTEN
                found.append(cols[1])
    return found


def main(out: Path) -> None:
    info = distributed.from_env()
    distributed.setup(info, torch.device("cpu"))
    (out / f"pid-{info.rank}").write_text(str(os.getpid()))
    (out / f"ppid-{info.rank}").write_text(str(os.getppid()))   # the launcher (torchrun's agent holds its stores)
    t = torch.ones(1)
    torch.distributed.all_reduce(t)          # the ranks have connected
    distributed.barrier(info)
    if info.is_main:
        pids = sorted({int((out / f"{k}-{r}").read_text()) for r in range(info.world) for k in ("pid", "ppid")})
        (out / "listening.json").write_text(json.dumps({"sum": t.item(), "listening": listening(pids)}))
    distributed.barrier(info)
    distributed.teardown(info)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
