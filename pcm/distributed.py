"""Several GPUs: torchrun launch, process group setup, DDP wrapping and cross-rank means (rank 0 writes)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def from_env() -> DistInfo:
    """The rank and world size torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(info: DistInfo, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPU (tests)."""
    if info.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


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


def launch(module_args: list[str], devices: int, poll: Callable[[], None] | None = None,
           poll_every: float = 2.0) -> None:
    """Run `python -m torch.distributed.run --nproc_per_node devices -m <module_args>` and wait.

    `poll` is called every `poll_every` seconds while it runs (to report progress from the files
    rank 0 writes). A failed launch raises with the exit code.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
           "-m", *module_args]
    proc = subprocess.Popen(cmd)
    try:
        while proc.poll() is None:
            time.sleep(poll_every)
            if poll is not None:
                poll()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit code {proc.returncode}): {' '.join(cmd[:8])} ...; "
                           "see the log above; rerun resumes from the latest checkpoint")
