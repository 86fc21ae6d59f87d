"""Several GPUs: launch, process group setup, DDP wrapping and cross-rank means (rank 0 writes).

By default nothing listens beyond this host: the processes meet through a file store (no TCP
rendezvous; torch's TCPStore binds every interface whatever host it is given) and gloo / NCCL
bind their sockets to the loopback interface. `bind = "all"` launches under torchrun instead
(`--standalone`: its elastic agent's stores listen on all interfaces), for setups that need it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the training processes (one process = world 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


STORE_ENV = "PCM_DIST_STORE"   # the file store of a loopback launch


def from_env() -> DistInfo:
    """The rank and world size the launcher sets (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(info: DistInfo, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPU (tests)."""
    if info.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = os.environ.get(STORE_ENV)
        if store:
            dist.init_process_group(backend, init_method=f"file://{store}", rank=info.rank, world_size=info.world)
        else:  # under torchrun (bind = "all")
            dist.init_process_group(backend)


def teardown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP over the processes (gradients averaged, so each rank's loss is a mean over its share)."""
    if info.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over all ranks (identity for one process)."""
    if info.world == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def loopback_interface() -> str | None:
    """The name of the loopback network interface (`lo` on Linux, `lo0` on macOS), if one is found."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n in ("lo", "lo0")), None)


def _wait(procs: list[subprocess.Popen], poll: Callable[[], None] | None, poll_every: float) -> list[int]:
    """Wait for every process; the first failure stops the others (a rank alone would hang on a collective)."""
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(poll_every)
            if poll is not None:
                poll()
    except BaseException:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    return [p.returncode for p in procs]


def launch(module_args: list[str], devices: int, poll: Callable[[], None] | None = None,
           poll_every: float = 2.0, bind: str = "loopback") -> None:
    """Run `python -m <module_args>` as `devices` ranks and wait; a failed rank raises with its exit code.

    `bind = "loopback"`: the ranks are this launcher's own children meeting through a file store,
    their sockets on the loopback interface. `bind = "all"`: torchrun --standalone. `poll` is called
    every `poll_every` seconds while they run (to report progress from the files rank 0 writes).
    """
    if bind == "all":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               "-m", *module_args]
        codes = _wait([subprocess.Popen(cmd)], poll, poll_every)
    elif bind == "loopback":
        cmd = [sys.executable, "-m", *module_args]
        with tempfile.TemporaryDirectory(prefix="pcm-dist-") as tmp:
            env = {**os.environ, STORE_ENV: os.path.join(tmp, "store"), "WORLD_SIZE": str(devices),
                   "MASTER_ADDR": "127.0.0.1"}
            if (lo := loopback_interface()) is not None:
                env |= {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}
            procs = [subprocess.Popen(cmd, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(devices)]
            codes = _wait(procs, poll, poll_every)
    else:
        raise ValueError(f"bind={bind!r}: choose 'loopback' (default) or 'all' (torchrun)")
    failed = [(r, c) for r, c in enumerate(codes) if c != 0]
    if failed:
        raise RuntimeError(f"distributed training failed (rank {failed[0][0]} exit code {failed[0][1]}): "
                           f"{' '.join(cmd[:8])} ...; see the log above; rerun resumes from the latest checkpoint")
