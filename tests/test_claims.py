"""Shard claiming (storage.claims): free shards taken, held ones skipped then waited for, a dead holder's shard redone."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage import claims
from storage.locks import try_lock
from storage.shards import ShardWriter, is_done, iter_tar

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.timeout(120)


def lock(d: Path, i: int) -> Path:
    return d / f".shard-{i:06d}.lock"


def shard(d: Path, i: int) -> Path:
    return d / f"shard-{i:06d}.tar"


def write(d: Path, i: int, key: str = "k") -> None:
    with ShardWriter(shard(d, i)) as w:
        w.write({"__key__": key, "txt": f"shard {i}"})


# A process that takes shard 0's lock, says so, then finishes it or not (`write`) and sleeps until killed.
HOLDER = """
import sys, time
from pathlib import Path
from storage.lock import FileLock
from storage.shards import ShardWriter
d, finish = Path(sys.argv[1]), sys.argv[2] == "write"
lock = FileLock(d / ".shard-000000.lock").acquire()
print("locked", flush=True)
if finish:
    with ShardWriter(d / "shard-000000.tar") as w:
        w.write({"__key__": "holder", "txt": "by the holder"})
    lock.release()
    print("written", flush=True)
time.sleep(600)
"""


def start_holder(d: Path, finish: bool) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(d), "write" if finish else "die"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    if finish:
        assert proc.stdout.readline().strip() == "written"
    return proc


def test_try_claim_takes_a_free_shard_and_says_why_not_otherwise(tmp_path):
    got = claims.try_claim(lock(tmp_path, 0), shard(tmp_path, 0))
    assert not isinstance(got, claims.Skip)
    assert claims.try_claim(lock(tmp_path, 0), shard(tmp_path, 0)) is claims.HELD  # another holder (own fd)
    write(tmp_path, 0)
    got.release()
    assert claims.try_claim(lock(tmp_path, 0), shard(tmp_path, 0)) is claims.DONE
    free = try_lock(lock(tmp_path, 0))
    assert free is not None, "a DONE claim must leave the lock free"
    free.release()
    forced = claims.try_claim(lock(tmp_path, 0), shard(tmp_path, 0), redo=True)  # a forced rerun takes it anyway
    assert not isinstance(forced, claims.Skip)
    forced.release()


def test_a_shard_without_its_marker_is_not_done(tmp_path):
    shard(tmp_path, 0).write_bytes(b"half a tar")  # e.g. left by a writer killed before its marker
    got = claims.try_claim(lock(tmp_path, 0), shard(tmp_path, 0))
    assert not isinstance(got, claims.Skip)
    got.release()


def test_wait_claim_redoes_a_dead_holders_shard(tmp_path):
    holder = start_holder(tmp_path, finish=False)
    try:
        assert claims.try_claim(lock(tmp_path, 0), shard(tmp_path, 0)) is claims.HELD
        threading.Timer(0.5, holder.kill).start()  # dies without finishing: the kernel drops its lock
        got = claims.wait_claim(lock(tmp_path, 0), shard(tmp_path, 0))
        assert got is not None
        got.release()
    finally:
        holder.kill()
        holder.wait()


def test_wait_claim_takes_a_finished_shard_as_done(tmp_path):
    holder = start_holder(tmp_path, finish=True)
    try:
        assert claims.wait_claim(lock(tmp_path, 0), shard(tmp_path, 0)) is None
        assert [s["__key__"] for s in iter_tar(shard(tmp_path, 0))] == ["holder"]
    finally:
        holder.kill()
        holder.wait()


def test_wait_released_blocks_until_the_holder_lets_go(tmp_path):
    held = try_lock(lock(tmp_path, 0))
    t0 = time.monotonic()
    threading.Timer(0.5, held.release).start()
    claims.wait_released(lock(tmp_path, 0))
    assert time.monotonic() - t0 >= 0.4
    free = try_lock(lock(tmp_path, 0))
    assert free is not None  # and leaves it free
    free.release()


def test_claim_each_skips_a_held_shard_then_waits_for_it(tmp_path):
    held = try_lock(lock(tmp_path, 1))
    events: list[str] = []

    def before_waiting() -> None:
        events.append("before waiting")
        threading.Timer(0.3, held.release).start()  # the holder dies without finishing shard 1

    for i, taken in claims.claim_each(range(4), lambda i: lock(tmp_path, i), lambda i: shard(tmp_path, i),
                                      on_held=lambda i: events.append(f"held {i}"), before_waiting=before_waiting):
        events.append(f"claimed {i}")
        write(tmp_path, i)
        taken.release()
    assert events == ["claimed 0", "held 1", "claimed 2", "claimed 3", "before waiting", "claimed 1"]
    assert all(is_done(shard(tmp_path, i)) for i in range(4))


def taken_in_turn(tmp_path: Path, n: int, **kw) -> list[int]:
    """The shards claim_each hands out (each released at once, unwritten)."""
    out = []
    for i, taken in claims.claim_each(range(n), lambda i: lock(tmp_path, i), lambda i: shard(tmp_path, i), **kw):
        taken.release()
        out.append(i)
    return out


def test_claim_each_leaves_out_done_shards_and_a_held_one_finished_meanwhile(tmp_path):
    write(tmp_path, 0)
    held = try_lock(lock(tmp_path, 1))
    calls: list[str] = []

    def before_waiting() -> None:
        calls.append("wait")
        write(tmp_path, 1, key="holder")  # the holder finishes shard 1, then lets go
        held.release()

    done: list[int] = []
    assert taken_in_turn(tmp_path, 3, before_waiting=before_waiting, on_done=done.append) == [2]
    assert calls == ["wait"] and done == [0, 1]  # the done one, then the held one its holder finished: all 3 told
    assert [s["__key__"] for s in iter_tar(shard(tmp_path, 1))] == ["holder"]
    # A forced rerun (`redo`) takes the done shards too, in order.
    assert taken_in_turn(tmp_path, 3, redo=True) == [0, 1, 2]


def test_no_wait_and_no_hook_when_nothing_is_held(tmp_path):
    called: list[int] = []
    assert taken_in_turn(tmp_path, 3, before_waiting=lambda: called.append(1)) == [0, 1, 2] and called == []


def test_claim_windows_hands_out_free_shards_a_window_at_a_time_then_waits_for_the_held(tmp_path):
    write(tmp_path, 0)                       # done before: never handed out, not reported
    held = try_lock(lock(tmp_path, 2))       # another process holds shard 2 and will die without finishing it
    done_elsewhere: list[int] = []

    def lock_of(i: int) -> Path:
        if i == 4 and not is_done(shard(tmp_path, 4)):
            write(tmp_path, 4, key="other")  # another process finishes shard 4 just before this one tries it
        return lock(tmp_path, i)

    windows = []
    for claimed in claims.claim_windows(range(6), lock_of, lambda i: shard(tmp_path, i), window=2,
                                        on_done=done_elsewhere.append):
        windows.append([i for i, _ in claimed])
        for i, taken in claimed:
            write(tmp_path, i)
            taken.release()
        if windows == [[1, 3], [5]]:
            threading.Timer(0.3, held.release).start()  # only shard 2 is left, held: it is waited for
    assert windows == [[1, 3], [5], [2]] and done_elsewhere == [4]
    assert [s["__key__"] for s in iter_tar(shard(tmp_path, 4))] == ["other"]
    assert all(is_done(shard(tmp_path, i)) for i in range(6))


def test_claim_windows_drops_a_held_shard_its_holder_finished_and_tells_on_done(tmp_path):
    held = try_lock(lock(tmp_path, 0))
    threading.Timer(0.3, lambda: (write(tmp_path, 0, key="holder"), held.release())).start()
    done_elsewhere: list[int] = []
    windows = [[i for i, _ in c] for c in claims.claim_windows([0], lambda i: lock(tmp_path, i),
                                                              lambda i: shard(tmp_path, i), window=4,
                                                              on_done=done_elsewhere.append)]
    assert windows == [] and [s["__key__"] for s in iter_tar(shard(tmp_path, 0))] == ["holder"]
    assert done_elsewhere == [0]  # a caller counting progress still reaches the total


def test_claim_windows_tells_on_done_of_a_held_shard_finished_while_a_window_is_written(tmp_path):
    # Shard 1 is held when the first window is made; its holder finishes it while this process writes
    # shards 0 and 2. It is never handed out, and told to on_done once; the written shards are not.
    held = try_lock(lock(tmp_path, 1))
    done_elsewhere: list[int] = []
    windows = []
    for claimed in claims.claim_windows(range(3), lambda i: lock(tmp_path, i), lambda i: shard(tmp_path, i),
                                        window=4, on_done=done_elsewhere.append):
        windows.append([i for i, _ in claimed])
        for i, taken in claimed:
            write(tmp_path, i)
            taken.release()
        write(tmp_path, 1, key="holder")
        held.release()
    assert windows == [[0, 2]] and done_elsewhere == [1]
    assert len(windows[0]) + len(done_elsewhere) == 3


# Each process claims the shards in turn and writes the ones it gets, slowly, noting each.
WORKER = """
import sys, time
from pathlib import Path
from storage.claims import claim_each
from storage.shards import ShardWriter
d, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
while not (d / "go").exists():
    time.sleep(0.01)
for i, lock in claim_each(range(n), lambda i: d / f".shard-{i:06d}.lock", lambda i: d / f"shard-{i:06d}.tar"):
    try:
        time.sleep(0.05)
        with ShardWriter(d / f"shard-{i:06d}.tar") as w:
            w.write({"__key__": f"{me}-{i}", "txt": me})
        with open(d / f"claimed-{me}.txt", "a") as f:
            f.write(f"{i}\\n")
    finally:
        lock.release()
"""


def test_two_processes_contending_write_every_shard_once(tmp_path):
    n = 12
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), me, str(n)], cwd=REPO, env=ENV,
                              stderr=subprocess.PIPE, text=True) for me in ("a", "b")]
    (tmp_path / "go").touch()  # both start at once
    for p in procs:
        _, err = p.communicate(timeout=100)
        assert p.returncode == 0, err[-3000:]
    claimed = {me: [int(x) for x in (tmp_path / f"claimed-{me}.txt").read_text().split()]
               if (tmp_path / f"claimed-{me}.txt").exists() else [] for me in ("a", "b")}
    assert sorted(claimed["a"] + claimed["b"]) == list(range(n))  # every shard once: none twice, none lost
    for i in range(n):
        (sample,) = iter_tar(shard(tmp_path, i))
        assert sample["__key__"] in (f"a-{i}", f"b-{i}")
