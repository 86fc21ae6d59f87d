"""Shard claiming: which of the processes sharing a stage directory writes each shard.

Nothing but a shard's lock file (storage.lock) and its done marker (storage.shards) decide, so
workers need no coordinator: a worker takes a shard by try-locking it, never waiting while free
work remains; a shard with its marker is finished, whoever wrote it; once its free shards are
through, a worker waits for the ones others hold and redoes each whose holder died without
finishing (the lock goes with the process, the marker never came).

`claim_each` hands out one shard at a time (synthesize writes each as it comes); `claim_windows`
a few at a time (encode reads a window of shards in one DataLoader pass), so several processes
on one stage share the shards instead of the first one claiming them all.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from storage.lock import FileLock
from storage.locks import lock_at, try_lock
from storage.shards import is_done

K = TypeVar("K")


class Skip(enum.Enum):
    """Why `try_claim` gave no lock."""

    HELD = "held"   # another process holds the shard's lock: come back later
    DONE = "done"   # finished (by another process since the caller listed it)


HELD, DONE = Skip.HELD, Skip.DONE


def try_claim(lock: Path, shard: Path, *, redo: bool = False) -> FileLock | Skip:
    """The shard's lock, taken now, or why not: HELD by another process, or DONE (its marker exists).

    `shard` is the file whose done marker says the shard is finished; `redo` claims it even then
    (a forced rerun). The caller releases the lock once the shard is written (or abandoned).
    """
    taken = try_lock(lock)
    if taken is None:
        return HELD
    if not redo and is_done(shard):
        taken.release()  # checked under the lock: a holder that just finished has written its marker
        return DONE
    return taken


def wait_released(lock: Path) -> None:
    """Block until no process holds `lock` (its holder finished, or died)."""
    lock_at(lock, timeout=None).acquire().release()


def wait_claim(lock: Path, shard: Path) -> FileLock | None:
    """Wait for the holder of `lock` to let go; its lock if the shard is still not done (the holder died), else None."""
    taken = lock_at(lock, timeout=None).acquire()
    if is_done(shard):
        taken.release()
        return None
    return taken


def claim_each(keys: Iterable[K], lock: Callable[[K], Path], shard: Callable[[K], Path], *, redo: bool = False,
               on_held: Callable[[K], None] | None = None,
               before_waiting: Callable[[], None] | None = None,
               on_done: Callable[[K], None] | None = None) -> Iterator[tuple[K, FileLock]]:
    """Yield (key, its taken lock) for each shard of `keys` this process is to write, the caller releasing each lock.

    First the free shards in order, those another process holds skipped (`on_held(key)` is told);
    then, after `before_waiting()` (e.g. to finish what is in flight, so it is not held up by the
    wait), each skipped shard is waited for and yielded only if its holder died before finishing.
    `redo` (a forced rerun) claims free shards even when done; a shard another process held and
    finished is still taken as done. Each shard of `keys` not yielded because it is done is told to
    `on_done(key)`, so a caller counting the yielded shards and these reaches every key.
    """
    held: list[K] = []
    for key in keys:
        got = try_claim(lock(key), shard(key), redo=redo)
        if got is HELD:
            if on_held is not None:
                on_held(key)
            held.append(key)
        elif got is DONE:
            if on_done is not None:
                on_done(key)
        else:
            yield key, got
    if held and before_waiting is not None:
        before_waiting()
    for key in held:
        taken = wait_claim(lock(key), shard(key))
        if taken is not None:
            yield key, taken
        elif on_done is not None:
            on_done(key)



def claim_windows(keys: Sequence[K], lock: Callable[[K], Path], shard: Callable[[K], Path], *, window: int,
                  on_done: Callable[[K], None] | None = None) -> Iterator[list[tuple[K, FileLock]]]:
    """Yield windows of at most `window` (key, its taken lock) pairs until every shard of `keys` is done; the caller
    writes each window's shards and releases their locks before asking for the next.

    Each window is the first free shards in order, those another process holds skipped and those
    found done meanwhile left out. When every shard left is held, the first is waited for, then all
    are tried again: a dead holder's shard is claimed then, a finished one dropped. A shard of `keys`
    not done at the start that another process finishes is told to `on_done(key)` once, when it is
    found done, so a caller counting the yielded shards and these reaches len(keys); shards done at
    the start are not told, and those yielded are the caller's to count.
    """
    todo = [k for k in keys if not is_done(shard(k))]
    while todo:
        mine: list[tuple[K, FileLock]] = []
        handed: set[int] = set()   # positions in `todo` of the shards yielded this round
        for pos, key in enumerate(todo):
            if len(mine) >= window:
                break
            got = try_claim(lock(key), shard(key))
            if not isinstance(got, Skip):
                mine.append((key, got))
                handed.add(pos)
        if mine:
            yield mine
        else:
            wait_released(lock(todo[0]))
        left = []
        for pos, key in enumerate(todo):
            if not is_done(shard(key)):
                left.append(key)
            elif pos not in handed and on_done is not None:  # finished by another process
                on_done(key)
        todo = left
