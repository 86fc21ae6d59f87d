"""Lease expiry on the store's clock (storage.lease): a lease object's age is the store's Date minus its Last-Modified,
so malformed bodies and hosts with wrong clocks neither block waiters forever nor take over live leases."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from storage import lease, publish
from storage.layout import RunLayout
from storage.lock import LockHeld
from storage.locks import lock_at

TTL = 2.0   # PCM_LEASE_SECONDS in these tests: a lease expires once unrenewed for over 3 s on the store's clock


class _HostClock:
    """storage.lease's view of the `time` module with this host's wall clock `offset` seconds off (the store's not)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch, tmp_path) -> _HostClock:
    monkeypatch.setenv("PCM_MIRROR_DIR", str(tmp_path / "mirrors"))
    monkeypatch.setenv("PCM_LEASE_SECONDS", str(TTL))
    monkeypatch.setattr(lease, "_CLOCK_CHECKED", set())   # each test's first reply is compared afresh
    host = _HostClock()
    monkeypatch.setattr(lease, "time", host)
    return host


def _lock(bucket: str, name: str) -> Path:
    return RunLayout(f"s3://{bucket}/run").stage(name, "e" * 16).lock_file


def _key(bucket: str, name: str) -> str:
    return f"{bucket}/run/{name}/{'e' * 16}/.lock"


def _stop_renewing(held) -> None:
    """What a killed or lost holder does: nothing more."""
    held._stop.set()
    held._renewer.join()


@pytest.mark.bad_input
@pytest.mark.parametrize("body", [b'{"expires": 1e308, "ttl": 1e308, "pid": "x"}', b'{"expires": "soon"}',
                                  b'[1, 2, 3]', b'not json \xff', b'',
                                  b'null', b'{"expires": NaN, "ttl": -Infinity, "nonce": [1]}',
                                  b'{"pid": 1e400, "host": {"a": 1}, "command": 7, "started": -1e308}',
                                  b'[' * 100_000 + b']' * 100_000, b'{"nonce": "' + b'x' * 1_000_000 + b'"}'],
                         ids=["expires-1e308", "expires-soon", "json-list", "not-json", "empty", "json-null",
                              "nan-expiry-list-nonce", "holder-fields-of-wrong-kinds", "nested-too-deeply",
                              "a-1-mb-nonce"])
def test_a_malformed_lease_is_held_while_young_and_taken_over_by_its_age(bucket, store, clock, body):
    store.pipe(_key(bucket, "ingest"), body)
    with pytest.raises(LockHeld, match=r"locked by an unknown holder \(lease expires in"):
        lock_at(_lock(bucket, "ingest"), timeout=0).acquire()
    taker = lock_at(_lock(bucket, "ingest"), timeout=20).acquire()     # no crash, no endless wait
    assert lease._read_holder(store.cat(_key(bucket, "ingest")))["nonce"] == taker._nonce
    taker.release()


def test_a_host_clock_300_s_off_neither_takes_over_a_live_lease_nor_keeps_a_dead_one(bucket, store, clock, caplog):
    caplog.set_level(logging.WARNING, logger="storage.lease")
    clock.offset = 300.0                      # the holder's clock runs 300 s ahead (the old rule: its lease outlived it)
    held = lock_at(_lock(bucket, "train")).acquire()
    # The store's Date has whole seconds, so the measured skew is the shift to within 1 s.
    assert re.search(r"\+(299|300|301) s off the clock of the store", caplog.text)
    time.sleep(TTL + 2.5)                     # past its ttl: only its renewals keep it
    for offset in (300.0, -300.0):            # a waiter ahead or behind (the old rule: +300 took it over at once)
        clock.offset = offset
        with pytest.raises(LockHeld, match="lease expires in"):
            lock_at(_lock(bucket, "train"), timeout=0).acquire()
    _stop_renewing(held)                      # the holder dies
    clock.offset = -300.0                     # a waiter 300 s behind still takes it over once unrenewed past its ttl
    taker = lock_at(_lock(bucket, "train"), timeout=20).acquire()
    assert lease._read_holder(store.cat(_key(bucket, "train")))["nonce"] == taker._nonce
    taker.release()
    held.release()


def test_a_host_in_step_with_the_store_is_not_warned_and_one_off_is_warned_at_the_root_check(
        bucket, store, clock, caplog):
    caplog.set_level(logging.WARNING, logger="storage.lease")
    publish.check_writable(f"s3://{bucket}/run")
    assert "off the clock of the store" not in caplog.text
    lease._CLOCK_CHECKED.clear()
    clock.offset = -120.0
    publish.check_writable(f"s3://{bucket}/run")
    assert re.search(rf"-(119|120|121) s off the clock of the store holding {bucket}", caplog.text)


def test_a_holder_names_a_sane_longer_ttl_and_it_is_honoured_an_absurd_one_is_not():
    young = lease.Lease(holder={"ttl": 20.0}, etag="e", age=10.0)
    assert young.ttl(2.0) == 20.0 and not young.expired(2.0)
    for absurd in (1e308, float("inf"), float("nan"), -5, "20", True, 21.0):
        stale = lease.Lease(holder={"ttl": absurd}, etag="e", age=10.0)
        assert stale.ttl(2.0) == 2.0 and stale.expired(2.0), absurd
