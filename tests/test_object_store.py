"""Run roots on object storage: a real S3 API server (moto, on 127.0.0.1), lease locks, units published marker last,
and two workers that share no local directory fanning synthesize and encode out over one bucket, one of them
SIGKILLed mid-shard, ending with the bytes of a local run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage import publish
from storage.layout import RunLayout, StageDir
from storage.lock import LockHeld
from storage.locks import lock_at
from storage.shards import ShardWriter, is_done, iter_tar

REPO = Path(__file__).resolve().parents[1]
PCM = str(Path(sys.executable).with_name("pcm"))


def _mirror(monkeypatch, tmp_path: Path, name: str) -> Path:
    monkeypatch.setenv("PCM_MIRROR_DIR", str(tmp_path / name))
    return tmp_path / name


# ------------------------------------------------------------------------------ leases
def test_a_lease_is_exclusive_names_its_holder_and_is_released(bucket, store, tmp_path, monkeypatch):
    _mirror(monkeypatch, tmp_path, "a")
    sd = RunLayout(f"s3://{bucket}/run").stage("synthesize", "a" * 16)
    first = lock_at(sd.lock_file).acquire()
    assert store.exists(f"{bucket}/run/synthesize/{'a' * 16}/.lock")
    with pytest.raises(LockHeld) as e:
        lock_at(sd.lock_file, timeout=0).acquire()
    assert f"pid {os.getpid()}" in str(e.value) and f"s3://{bucket}/run/synthesize/" in str(e.value)
    first.release()
    assert not store.exists(f"{bucket}/run/synthesize/{'a' * 16}/.lock")
    lock_at(sd.lock_file, timeout=0).acquire().release()


def test_a_renewed_lease_outlives_its_ttl_and_an_expired_one_is_taken_over(bucket, store, tmp_path, monkeypatch):
    _mirror(monkeypatch, tmp_path, "a")
    monkeypatch.setenv("PCM_LEASE_SECONDS", "1.5")
    path = RunLayout(f"s3://{bucket}/run").stage("encode", "b" * 16).lock_file
    held = lock_at(path).acquire()
    time.sleep(3.5)                                   # over twice the ttl: only renewal keeps it
    with pytest.raises(LockHeld):
        lock_at(path, timeout=0).acquire()
    held._stop.set()                                  # the holder stops renewing, as a killed one does
    held._renewer.join()
    taker = lock_at(path, timeout=10).acquire()       # waits for the expiry, then takes it over
    assert json.loads(store.cat(f"{bucket}/run/encode/{'b' * 16}/.lock"))["pid"] == os.getpid()
    taker.release()
    held.release()                                    # the stale holder's release deletes nothing of the taker's


def test_a_killed_holders_lease_expires(bucket, store, tmp_path, monkeypatch, s3):
    """A holder SIGKILLed while holding a lease: a waiter gets it once the ttl has passed, not before."""
    _mirror(monkeypatch, tmp_path, "a")
    url = f"s3://{bucket}/run"
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from storage.layout import RunLayout; from storage.locks import lock_at;"
         f"lock_at(RunLayout({url!r}).stage('train', 'c' * 16).lock_file).acquire(); print('held', flush=True);"
         "time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PCM_MIRROR_DIR": str(tmp_path / "child"), "PCM_LEASE_SECONDS": "3"})
    try:
        assert child.stdout.readline().strip() == "held"
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed = time.time()
        path = RunLayout(url).stage("train", "c" * 16).lock_file
        with pytest.raises(LockHeld, match="lease expires in"):
            lock_at(path, timeout=0).acquire()
        lock_at(path, timeout=20).acquire().release()
        assert time.time() - killed > 1.0
    finally:
        child.kill()


def test_an_fsspec_store_without_conditional_writes_is_refused_for_locks(tmp_path, monkeypatch):
    _mirror(monkeypatch, tmp_path, "a")
    sd = RunLayout("memory://bucket/run").stage("ingest", "d" * 16)
    with pytest.raises(ValueError, match="conditional writes.*s3:// only"):
        lock_at(sd.lock_file)


def test_a_root_in_a_missing_bucket_is_refused_before_any_work(s3, tmp_path, monkeypatch):
    from pcm.cli.common import writable_dir

    _mirror(monkeypatch, tmp_path, "a")
    with pytest.raises(ValueError, match=r"cannot write to --root s3://no-such-bucket/run: .*bucket exists"):
        writable_dir("s3://no-such-bucket/run")


def test_a_writable_root_gives_the_working_copy_and_leaves_no_probe(bucket, store, tmp_path, monkeypatch):
    from pcm.cli.common import writable_dir

    _mirror(monkeypatch, tmp_path, "a")
    monkeypatch.chdir(tmp_path)
    local = writable_dir(f"s3://{bucket}/run")
    assert local == RunLayout(f"s3://{bucket}/run").root and local.is_relative_to(tmp_path / "a")
    assert store.find(bucket) == [] and not (tmp_path / "s3:").exists()   # no folder named after the URL


def test_a_root_on_a_store_without_conditional_writes_is_refused(bucket, tmp_path, monkeypatch):
    from pcm.cli.common import writable_dir

    _mirror(monkeypatch, tmp_path, "a")
    with pytest.raises(ValueError, match="must be s3://"):
        writable_dir("gcs://bucket/run")
    import s3fs

    real = s3fs.S3FileSystem.call_s3

    def ignoring_conditions(self, method, *args, **kwargs):
        kwargs.pop("IfNoneMatch", None)                 # an "S3 API" that ignores If-None-Match
        return real(self, method, *args, **kwargs)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", ignoring_conditions)
    with pytest.raises(ValueError, match="ignored a conditional write"):
        writable_dir(f"s3://{bucket}/run")


def test_a_worker_that_lost_its_lease_finishes_its_unit_and_the_store_keeps_one_copy(bucket, store, tmp_path,
                                                                                    monkeypatch, caplog):
    """A lease lost to another host (a store outage or a stall longer than the lease) is said, not fatal: the
    stalled worker publishes its finished shard by conditional creates, and the taker, writing the same shard,
    finds it committed and adopts it; nothing is written twice."""
    from storage import lease

    _mirror(monkeypatch, tmp_path, "a")
    monkeypatch.setenv("PCM_LEASE_SECONDS", "1")
    sd = RunLayout(f"s3://{bucket}/run").stage("synthesize", "6" * 16)
    stalled = lock_at(sd.shard_lock("shards", 0)).acquire()
    stalled._stop.set(), stalled._renewer.join()          # stalled past its expiry (a VM pause, SIGSTOP)
    taker = lock_at(sd.shard_lock("shards", 0), timeout=10).acquire()   # another worker (here: this process)
    lease._HELD[str(sd.shard_lock("shards", 0))] = stalled              # ...the stalled worker's own view
    with caplog.at_level("WARNING", logger="storage.publish"):
        with ShardWriter(sd.image_shard(0)) as w:          # the stalled worker finishes its shard late
            w.write({"__key__": "k1", "txt": "a cat"})
    assert "took it over" in caplog.text and "publishing this finished work anyway" in caplog.text
    base = f"{bucket}/run/synthesize/{'6' * 16}/shards"
    before = {k: v for k, v in _objects(store, base).items() if not k.endswith(".lock")}
    assert set(before) == {f"{base}/shard-000000.tar", f"{base}/shard-000000.done.json"}
    lease._HELD[str(sd.shard_lock("shards", 0))] = taker
    _mirror(monkeypatch, tmp_path, "b")                   # the taker, in its own working copy
    sd_b = RunLayout(f"s3://{bucket}/run").stage("synthesize", "6" * 16)
    with ShardWriter(sd_b.image_shard(0)) as w:
        w.write({"__key__": "k1", "txt": "a cat"})
    assert {k: v for k, v in _objects(store, base).items() if not k.endswith(".lock")} == before
    taker.release(), stalled.release()


def test_a_conflict_reply_counts_as_held_not_as_a_failure():
    import errno

    from storage.remote import refused_condition

    assert refused_condition(OSError(errno.EBUSY, "ConditionalRequestConflict"))
    assert refused_condition(FileExistsError("At least one of the pre-conditions you specified did not hold"))
    assert not refused_condition(OSError(errno.EACCES, "Access Denied"))


def _objects(store, prefix: str) -> dict[str, tuple[str, str]]:
    """Key -> (ETag, LastModified) of every object under `prefix`: what changes if anything is replaced."""
    store.invalidate_cache()
    return {k: (v["ETag"], str(v["LastModified"])) for k, v in store.find(prefix, detail=True).items()}


def test_a_late_writer_of_the_same_shard_replaces_and_deletes_nothing_and_adopts_the_commit(
        bucket, store, tmp_path, monkeypatch):
    """A stalled host that believes it still holds the shard (its lease check passes: a skewed clock, a paused VM)
    writes the shard after the new holder published it: not one object is deleted or replaced, its marker is the
    store's, and its shard is the same bytes."""
    from storage import lease

    url = f"s3://{bucket}/run"
    _mirror(monkeypatch, tmp_path, "new-holder")
    sd = RunLayout(url).stage("synthesize", "5" * 16)
    with ShardWriter(sd.image_shard(0)) as w:
        w.write({"__key__": "k1", "txt": "a cat"})
    before = _objects(store, f"{bucket}/run")

    _mirror(monkeypatch, tmp_path, "stalled")
    monkeypatch.setattr(lease, "confirm", lambda lock: None)    # correctness may not rest on this check
    sd_late = RunLayout(url).stage("synthesize", "5" * 16)
    time.sleep(1.1)                                              # a replaced object would get a later LastModified
    with ShardWriter(sd_late.image_shard(0)) as w:
        w.write({"__key__": "k1", "txt": "a cat"})
    assert _objects(store, f"{bucket}/run") == before
    assert sd_late.image_shard(0).with_name("shard-000000.done.json").read_bytes() == \
        sd.image_shard(0).with_name("shard-000000.done.json").read_bytes()      # the committed marker, adopted
    assert sd_late.image_shard(0).read_bytes() == sd.image_shard(0).read_bytes()


def test_a_late_writer_of_other_bytes_is_refused_naming_both_digests(bucket, store, tmp_path, monkeypatch):
    import hashlib

    from storage import lease
    from storage.publish import PublishConflict

    url = f"s3://{bucket}/run"
    _mirror(monkeypatch, tmp_path, "a")
    sd = RunLayout(url).stage("synthesize", "5" * 16)
    with ShardWriter(sd.image_shard(0)) as w:
        w.write({"__key__": "old", "txt": "a cat"})
    before = _objects(store, f"{bucket}/run")
    theirs = hashlib.sha256(sd.image_shard(0).read_bytes()).hexdigest()
    _mirror(monkeypatch, tmp_path, "b")
    monkeypatch.setattr(lease, "confirm", lambda lock: None)
    sd_b = RunLayout(url).stage("synthesize", "5" * 16)
    with pytest.raises(PublishConflict, match=theirs) as e:
        with ShardWriter(sd_b.image_shard(0)) as w:
            w.write({"__key__": "new", "txt": "a dog"})
    assert hashlib.sha256(sd_b.image_shard(0).read_bytes()).hexdigest() in str(e.value)
    assert "--force" in str(e.value)
    assert _objects(store, f"{bucket}/run") == before
    assert not sd_b.image_shard(0).with_name("shard-000000.done.json").exists()   # not done here either


def test_a_forced_rewrite_withdraws_the_marker_it_read_and_replaces_the_shard(bucket, store, tmp_path, monkeypatch):
    from storage.shards import drop_marker

    _mirror(monkeypatch, tmp_path, "a")
    sd = RunLayout(f"s3://{bucket}/run").stage("synthesize", "5" * 16)
    marker = f"{bucket}/run/synthesize/{'5' * 16}/shards/shard-000000.done.json"
    with ShardWriter(sd.image_shard(0)) as w:
        w.write({"__key__": "old", "txt": "a cat"})
    drop_marker(sd.image_shard(0), store=True)
    assert not store.exists(marker)          # withdrawn first: no worker fetches the old shard under a new marker
    with ShardWriter(sd.image_shard(0)) as w:
        w.write({"__key__": "new", "txt": "a dog"})
    assert store.exists(marker) and b"new.txt" in store.cat(marker.replace(".done.json", ".tar"))


def test_a_withdrawal_is_refused_when_the_marker_changed_since_it_was_read(bucket, store, tmp_path, monkeypatch):
    from storage.remote import Mirror
    from storage.shards import drop_marker

    _mirror(monkeypatch, tmp_path, "a")
    sd = RunLayout(f"s3://{bucket}/run").stage("synthesize", "5" * 16)
    with ShardWriter(sd.image_shard(0)) as w:
        w.write({"__key__": "old", "txt": "a cat"})
    key = f"{bucket}/run/synthesize/{'5' * 16}/shards/shard-000000.done.json"
    read = Mirror.head

    def head_then_another_host_commits(self, path):
        found = read(self, path)
        store.pipe(key, b'{"count": 2}')        # another host's commit lands between the read and the delete
        return found

    monkeypatch.setattr(Mirror, "head", head_then_another_host_commits)
    with pytest.raises(OSError, match="pre-condition"):
        drop_marker(sd.image_shard(0), store=True)
    assert store.cat(key) == b'{"count": 2}'


def test_a_stage_committed_by_another_host_first_is_adopted(bucket, store, tmp_path, monkeypatch):
    from pcm.stages.contract import finish, open_stage
    from storage import lease

    _mirror(monkeypatch, tmp_path, "a")
    sd = open_stage(_planned(f"s3://{bucket}/run"))
    sd.file("captions.parquet").write_bytes(b"PAR1")
    first = finish(sd, {"rows": 1}, time.monotonic())
    before = _objects(store, f"{bucket}/run")
    _mirror(monkeypatch, tmp_path, "b")
    monkeypatch.setattr(lease, "confirm", lambda lock: None)
    sd_b = open_stage(_planned(f"s3://{bucket}/run"))
    sd_b.file("captions.parquet").write_bytes(b"PAR1")
    late = finish(sd_b, {"rows": 1}, time.monotonic() - 100)   # other timings: another marker
    assert late.timings == first.timings and sd_b.done_marker.read_bytes() == sd.done_marker.read_bytes()
    assert _objects(store, f"{bucket}/run") == before


def test_a_card_is_replaced_only_over_the_copy_read(bucket, store, tmp_path, monkeypatch):
    from storage import publish

    _mirror(monkeypatch, tmp_path, "a")
    sd = open_stage_of(f"s3://{bucket}/run")
    card = sd.path / "best" / "README.md"
    card.parent.mkdir(parents=True)
    card.write_text("first")
    publish.publish_files(card)
    card.write_text("with scores")
    publish.publish_files(card)
    assert store.cat(f"{bucket}/run/ingest/{sd.fingerprint}/best/README.md") == b"with scores"


def open_stage_of(url: str) -> StageDir:
    from pcm.stages.contract import open_stage

    return open_stage(_planned(url))


def test_a_forced_stage_rerun_replaces_same_sized_files_in_the_store(bucket, store, tmp_path, monkeypatch):
    from pcm.stages.contract import drop_marker, finish, open_stage

    _mirror(monkeypatch, tmp_path, "a")
    sd = open_stage(_planned(f"s3://{bucket}/run"))
    sd.file("captions.parquet").write_bytes(b"OLD1")
    finish(sd, {"rows": 1}, time.monotonic())
    drop_marker(sd, store=True)      # a forced rerun
    key = f"{bucket}/run/ingest/{sd.fingerprint}"
    assert not store.exists(f"{key}/stage.done.json")
    sd.file("captions.parquet").write_bytes(b"NEW1")     # the same size: weights of the same shapes
    finish(sd, {"rows": 1}, time.monotonic())
    assert store.cat(f"{key}/captions.parquet") == b"NEW1"
    _mirror(monkeypatch, tmp_path, "b")
    assert StageDir.at(f"s3://{bucket}/run/ingest/{sd.fingerprint}").file("captions.parquet").read_bytes() == b"NEW1"


# ------------------------------------------------------------------------------ units
def test_a_shard_is_published_marker_last_and_fetched_by_another_worker(bucket, store, tmp_path, monkeypatch):
    url = f"s3://{bucket}/run"
    _mirror(monkeypatch, tmp_path, "a")
    sd = RunLayout(url).stage("synthesize", "e" * 16)
    with ShardWriter(sd.image_shard(0)) as w:
        w.write({"__key__": "k1", "txt": "a cat"})
    keys = sorted(store.find(f"{bucket}/run"))
    base = f"{bucket}/run/synthesize/{'e' * 16}/shards"
    assert keys == [f"{base}/shard-000000.done.json", f"{base}/shard-000000.tar"]   # no temporary key left
    local_a = sd.image_shard(0).read_bytes()

    _mirror(monkeypatch, tmp_path, "b")             # another worker, its own working copy
    sd_b = RunLayout(url).stage("synthesize", "e" * 16)
    assert sd_b.path != sd.path and not sd_b.image_shard(0).exists()
    assert is_done(sd_b.image_shard(0))             # published: done, and not downloaded to say so
    assert not sd_b.image_shard(0).exists()
    assert [x["__key__"] for x in iter_tar(sd_b.image_shard(0))] == ["k1"]   # read: fetched, tar then marker
    assert sd_b.image_shard(0).read_bytes() == local_a


def test_publication_leaves_no_temporary_key_and_deletes_nothing_it_did_not_write(bucket, store, tmp_path, monkeypatch):
    """One conditional PUT per final key: nothing temporary to clean, so a key another writer left (here an old
    version's `.tmp-` upload) stays."""
    from pcm.stages.contract import finish, open_stage

    _mirror(monkeypatch, tmp_path, "a")
    sd = open_stage(_planned(f"s3://{bucket}/run"))
    base = f"{bucket}/run/ingest/{sd.fingerprint}"
    other = f"{base}/shards/.tmp-shard-000001.tar.0badf00d"
    store.pipe(other, b"someone else's")
    with ShardWriter(sd.path / "shards" / "shard-000000.tar") as w:
        w.write({"__key__": "k1", "txt": "a cat"})
    sd.file("captions.parquet").write_bytes(b"rows")
    finish(sd, {"rows": 1}, time.monotonic())
    store.invalidate_cache()
    assert [k for k in store.find(base) if "/.tmp-" in k] == [other]
    assert store.exists(f"{base}/stage.done.json") and store.cat(f"{base}/captions.parquet") == b"rows"


def test_a_shard_without_its_published_marker_is_not_done_elsewhere(bucket, store, tmp_path, monkeypatch):
    url = f"s3://{bucket}/run"
    _mirror(monkeypatch, tmp_path, "a")
    sd = RunLayout(url).stage("synthesize", "f" * 16)
    sd.image_shard(0).parent.mkdir(parents=True)
    sd.image_shard(0).write_bytes(b"half a tar")
    publish.publish_files(sd.image_shard(0))         # the tar went up, the writer died before its marker
    _mirror(monkeypatch, tmp_path, "b")
    sd_b = RunLayout(url).stage("synthesize", "f" * 16)
    assert not is_done(sd_b.image_shard(0)) and not sd_b.image_shard(0).exists()


def test_a_shard_published_after_a_listing_is_seen(bucket, store, tmp_path, monkeypatch):
    """No listings cache: a worker that listed a shard directory still sees units published after it."""
    import boto3

    url = f"s3://{bucket}/run"
    _mirror(monkeypatch, tmp_path, "a")
    sd = RunLayout(url).stage("synthesize", "7" * 16)
    for i in (0, 1):
        with ShardWriter(sd.image_shard(i)) as w:
            w.write({"__key__": f"k{i}", "txt": "a cat"})
    _mirror(monkeypatch, tmp_path, "b")
    sd_b = RunLayout(url).stage("synthesize", "7" * 16)
    assert list(iter_tar(sd_b.image_shard(0)))                # lists shard 0's keys to fetch it
    prefix = f"run/synthesize/{'7' * 16}/shards"
    s3 = boto3.client("s3")                                   # another worker publishes shard 2, not through s3fs
    s3.put_object(Bucket=bucket, Key=f"{prefix}/shard-000002.tar", Body=sd.image_shard(1).read_bytes())
    assert not is_done(sd_b.image_shard(2))                   # the tar alone: not done
    s3.put_object(Bucket=bucket, Key=f"{prefix}/shard-000002.done.json", Body=b'{"count": 1}')
    assert is_done(sd_b.image_shard(2))


def test_a_stage_whose_publishing_was_cut_short_is_published_when_found_cached(bucket, store, tmp_path, monkeypatch):
    from pcm.stages.contract import cached, finish, open_stage

    _mirror(monkeypatch, tmp_path, "a")
    sd = open_stage(_planned(f"s3://{bucket}/run"))
    sd.file("captions.parquet").write_bytes(b"PAR1")
    finish(sd, {"rows": 1}, time.monotonic())
    key = f"{bucket}/run/ingest/{sd.fingerprint}"
    store.rm_file(f"{key}/stage.done.json"), store.rm_file(f"{key}/captions.parquet")   # killed while publishing
    assert cached(sd) is not None
    assert store.cat(f"{key}/captions.parquet") == b"PAR1" and store.exists(f"{key}/stage.done.json")


def test_a_stage_named_by_url_is_fetched_with_its_marker_and_results_name_the_url(bucket, tmp_path, monkeypatch):
    from pcm.stages.contract import finish, load_result, open_stage

    url = f"s3://{bucket}/run"
    _mirror(monkeypatch, tmp_path, "a")
    sd = open_stage(_planned(url))
    sd.file("captions.parquet").write_bytes(b"PAR1")
    result = finish(sd, {"rows": 1}, time.monotonic(), extra={"table": str(sd.file("captions.parquet"))})
    assert result.path == f"{url}/ingest/{sd.fingerprint}"
    marker = json.loads(sd.done_marker.read_text())
    assert marker["path"] == f"@root/ingest/{sd.fingerprint}" and marker["extra"]["table"].startswith("@root/")

    _mirror(monkeypatch, tmp_path, "b")
    got = load_result(result.path)
    assert got.path == result.path and got.counts == {"rows": 1}
    assert result.stage_dir.file("captions.parquet").read_bytes() == b"PAR1"
    assert got.dir == result.stage_dir.path and got.dir.is_relative_to(tmp_path / "b")


def _planned(url: str) -> StageDir:
    import dataclasses

    sd = RunLayout(url).stage("ingest", "9" * 16)
    return dataclasses.replace(sd, record={"stage": "ingest", "code_version": "t", "config": {}, "inputs": {}})


# ------------------------------------------------------------------------------ two workers, one bucket
SMALL = ["ingest.subset=40", "synthesize.shard_size=8", "synthesize.height=32", "synthesize.width=32",
         "synthesize.steps=2"]


# The `pcm` command with each shard's write held back 2 s (its lease held meanwhile), for the worker to
# be killed: the tiny shards take a few hundred ms otherwise, and a victim that finished them all
# before the test caught it holding a lease made the test flaky.
SLOW_PCM = """
import sys, time
from pcm import feature_shards, rendering
from pcm.cli import run

def held_back(write):
    def slow(*args, **kwargs):
        time.sleep(2.0)
        return write(*args, **kwargs)
    return slow

feature_shards.write_unit = held_back(feature_shards.write_unit)
rendering.write_shard = held_back(rendering.write_shard)
sys.argv[0] = "pcm"
sys.exit(run())
"""


def _pcm(args: list[str], env: dict[str, str], log: Path, *, slow: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-c", SLOW_PCM] if slow else [PCM]
    return subprocess.Popen([*command, "run", "--preset", "tiny", *sum((["--set", s] for s in SMALL), []), *args],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _lease_holders(store, prefix: str) -> dict[str, int]:
    """Shard lease key -> holder pid, of the leases in the store under `prefix`."""
    store.invalidate_cache()
    out = {}
    for key in store.find(prefix):
        if key.endswith(".lock") and "/." in key and "shard-" in key:
            try:
                out[key] = json.loads(store.cat(key))["pid"]
            except (FileNotFoundError, ValueError, KeyError):
                pass
    return out


def _tails(folder: Path, *logs: str) -> str:
    return "\n".join(f"--- {name}\n" + (folder / name).read_text()[-3000:] for name in logs)


def _kill_mid_shard(store, prefix: str, workers: list[subprocess.Popen], min_done: int) -> tuple[str, subprocess.Popen]:
    """SIGKILL the first of `workers` seen holding a shard lease under `prefix`, once `min_done` shards there are
    published; returns the lease it held and the worker left."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert all(w.poll() is None for w in workers), "a worker ended before one could be killed mid-shard"
        store.invalidate_cache()
        done = [k for k in store.find(prefix) if k.endswith(".done.json") and "/shard-" in k]
        holders = _lease_holders(store, prefix)
        for victim in workers:
            held = [k for k, pid in holders.items() if pid == victim.pid]
            if len(done) >= min_done and held:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                return held[0], next(w for w in workers if w is not victim)
        time.sleep(0.2)
    raise AssertionError("no moment with a worker holding a shard lease")


@pytest.mark.heavy
@pytest.mark.timeout(1500)
def test_two_workers_share_a_bucket_survive_a_sigkill_and_match_a_local_run(bucket, store, tmp_path, request):
    url = f"s3://{bucket}/run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PCM_LEASE_SECONDS": "4", "OMP_NUM_THREADS": "1"}
    env_a = {**env, "PCM_MIRROR_DIR": str(tmp_path / "host-a")}
    env_b = {**env, "PCM_MIRROR_DIR": str(tmp_path / "host-b")}

    # The local reference run, beside everything below until its bytes are compared (the bucket's workers spend
    # much of their time waiting: held-back writes, expiring leases); ingest into the bucket meanwhile.
    local = _pcm(["--root", str(tmp_path / "local"), "ingest", "synthesize", "encode"], env_a, tmp_path / "local.log")
    request.addfinalizer(local.kill)  # stopped if the test fails before it is waited for (a no-op once it has ended)
    assert _pcm(["--root", url, "ingest"], env_a, tmp_path / "ingest.log").wait() == 0

    # synthesize: both hosts claim shards; A (or B, if A had none) is killed while it writes one; the other
    # redoes it once its lease expires.
    a = _pcm(["--root", url, "synthesize"], env_a, tmp_path / "synth-a.log", slow=True)
    b = _pcm(["--root", url, "synthesize"], env_b, tmp_path / "synth-b.log")
    try:
        killed, left = _kill_mid_shard(store, f"{bucket}/run/synthesize", [a, b], min_done=1)
        assert left.wait(timeout=900) == 0, _tails(tmp_path, "synth-a.log", "synth-b.log")
    finally:
        a.kill(), b.kill()
    assert "shard-" in killed

    # encode: `pcm run` holds the stage lock while it encodes, so one host encodes and the other waits for it;
    # whichever won the lock is killed mid-shard, and the other takes the stage and the shard over once the leases
    # expire.
    a = _pcm(["--root", url, "encode"], env_a, tmp_path / "enc-a.log", slow=True)
    b = _pcm(["--root", url, "encode"], env_b, tmp_path / "enc-b.log", slow=True)
    try:
        killed, left = _kill_mid_shard(store, f"{bucket}/run/encode", [a, b], min_done=1)
        assert left.wait(timeout=900) == 0, _tails(tmp_path, "enc-a.log", "enc-b.log")
    finally:
        a.kill(), b.kill()

    # A rerun on a third host finds everything finished in the bucket, and downloads no image to know it.
    env_c = {**env, "PCM_MIRROR_DIR": str(tmp_path / "host-c")}
    rerun = _pcm(["--root", url, "ingest", "synthesize", "encode"], env_c, tmp_path / "rerun.log")
    assert rerun.wait() == 0
    out = (tmp_path / "rerun.log").read_text()
    assert all(f"{s:<11} cached  {url}/{s}/" in out for s in ("ingest", "synthesize", "encode")), out[-2000:]
    assert list((tmp_path / "host-c").rglob("*.tar")) == []

    # Nothing lost, nothing duplicated, no partial object under a final key: the bucket holds the local run's bytes.
    assert local.wait(timeout=900) == 0, (tmp_path / "local.log").read_text()[-3000:]
    store.invalidate_cache()
    objects = {k[len(f"{bucket}/run/"):]: k for k in store.find(f"{bucket}/run")}
    published = {rel for rel in objects if not any(p.startswith(".") for p in rel.split("/"))}
    local_root = tmp_path / "local"
    local_files = {p.relative_to(local_root).as_posix() for p in local_root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local_root).parts)}
    assert published == local_files
    differ = []
    for rel in sorted(published):
        if rel.endswith((".tar", ".parquet", ".safetensors")) and store.cat(objects[rel]) != (local_root / rel).read_bytes():
            differ.append(rel)
    assert differ == []
    samples = next(r for r in published if r.startswith("synthesize/") and r.endswith("/samples.parquet"))
    keys = pq.read_table(local_root / samples).column("caption_id").to_pylist()
    assert len(keys) == len(set(keys)) == 40
    assert not any(k.endswith(".lock") for k in objects)     # every lease was released or taken over and released
    assert sum(r.endswith(".tar") for r in published) == 5
    assert not (REPO / "s3:").exists()    # no local folder named after the URL


@pytest.mark.heavy
def test_the_whole_pipeline_evaluate_included_finishes_on_an_s3_root_and_is_reused_by_another_host(
        bucket, tmp_path, monkeypatch):
    """Before: evaluate always failed there (`s3:/bucket/run/train/<fp>: no best checkpoint`), reading the train
    stage's URL as a local path."""
    from pcm.config import parse_assignments
    from pcm.stages.pipeline import resolve, run_pipeline

    url = f"s3://{bucket}/run"
    cfg = resolve("tiny", parse_assignments([*SMALL, "train.epochs=2", "train.val_every=4", "train.checkpoint_every=4",
                                             "evaluate.control=false"]))
    _mirror(monkeypatch, tmp_path, "host-a")
    upstream = run_pipeline(cfg, url, stages=("ingest", "synthesize", "encode", "train"))
    # Host A's evaluate is SIGKILLed once it has decoded (its predictions on its disk, nothing published) ...
    env = {**os.environ, "PCM_MIRROR_DIR": str(tmp_path / "host-a"), "PCM_LEASE_SECONDS": "2",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SCORING, cfg.model_dump_json(), url], env=env,
                            cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # ... and host B finishes it once the lease has expired.
    _mirror(monkeypatch, tmp_path, "host-b")
    monkeypatch.setenv("PCM_LEASE_SECONDS", "2")
    time.sleep(4)
    first = run_pipeline(cfg, url)
    assert all(first[s].cached for s in upstream) and not first["evaluate"].cached
    assert first["evaluate"].path.startswith(url) and "CIDEr" in json.loads(
        first["evaluate"].stage_dir.metrics.read_text())["metrics"]
    # The same evaluation on a local root (its inputs read from the bucket) gives the same captions and scores.
    from pcm.stages.evaluate import run_evaluate

    local = run_evaluate(cfg.evaluate, first["train"], first["encode"], first["ingest"], RunLayout(tmp_path / "local"))
    assert local.fingerprint == first["evaluate"].fingerprint
    assert local.stage_dir.predictions.read_bytes() == first["evaluate"].stage_dir.predictions.read_bytes()
    _mirror(monkeypatch, tmp_path, "host-c")            # another host, an empty working copy: all reused
    second = run_pipeline(cfg, url)
    assert all(r.cached for r in second.values()) and second["evaluate"].path == first["evaluate"].path


# Host A runs the whole pipeline's last stage on the bucket and is SIGKILLed once its captions are decoded.
KILLED_WHILE_SCORING = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from pcm import metrics
from pcm.stages.pipeline import PipelineConfig, run_pipeline

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

metrics.score_captions = die
run_pipeline(PipelineConfig.model_validate_json(sys.argv[1]), sys.argv[2])
"""


# ------------------------------------------------------------------------------ train across hosts
# Host A trains on the bucket and is SIGKILLed right after it published its step-8 checkpoint.
KILLED_AFTER_PUBLISHING = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from storage import publish
from pcm.stages.train import TrainConfig, run_train
from pcm.stages.contract import load_result
from storage.layout import RunLayout

real = publish.publish_checkpoint

def publish_then_die(step_dir, *args, **kwargs):
    real(step_dir, *args, **kwargs)
    if Path(step_dir).name == "step-00000008":
        os.kill(os.getpid(), signal.SIGKILL)

publish.publish_checkpoint = publish_then_die
run_train(TrainConfig.model_validate_json(sys.argv[1]), load_result(sys.argv[2]), load_result(sys.argv[3]),
          RunLayout(sys.argv[4]))
"""


@pytest.mark.heavy
def test_a_train_killed_on_one_host_resumes_on_another_from_the_published_checkpoint(
        bucket, store, tmp_path, monkeypatch):
    from builders import child_env, tiny_train_config, train_inputs

    from pcm.stages.train import run_train

    config = tiny_train_config(epochs=8, val_every=4, checkpoint_every=4, keep_last=1)   # 16 steps
    cap, enc = train_inputs(tmp_path / "inputs")
    ref = run_train(config, cap, enc, RunLayout(tmp_path / "ref"))          # uninterrupted, on a local root

    url = f"s3://{bucket}/run"
    env = {**child_env(), "PCM_MIRROR_DIR": str(tmp_path / "host-a"), "PCM_LEASE_SECONDS": "2"}
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_PUBLISHING, config.model_dump_json(), cap.path, enc.path,
                           url],
                          env=env, cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    base = f"{bucket}/run/train/{ref.fingerprint}"
    store.invalidate_cache()
    assert store.exists(f"{base}/checkpoints/step-00000008/state.json")
    assert not store.exists(f"{base}/stage.done.json")

    _mirror(monkeypatch, tmp_path, "host-b")
    monkeypatch.setenv("PCM_LEASE_SECONDS", "2")
    time.sleep(4)                                  # the killed host's stage lease expires
    fetched = []
    from storage import checkpoints
    real_fetch = checkpoints.fetch_published
    monkeypatch.setattr(checkpoints, "fetch_published", lambda *a: fetched.append(real_fetch(*a)) or fetched[-1])
    resumed = run_train(config, cap, enc, RunLayout(url))
    assert fetched and fetched[0] is not None and fetched[0].name == "step-00000008"   # resumed there, not at 0
    b_dir = Path(resumed.dir)
    mine, theirs = b_dir / "checkpoints" / "step-00000016", Path(ref.path) / "checkpoints" / "step-00000016"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (mine / name).read_bytes() == (theirs / name).read_bytes(), name
    # The process-wide Python and NumPy generators, which training never draws from, are each process's own.
    state, ref_state = json.loads((mine / "state.json").read_text()), json.loads((theirs / "state.json").read_text())
    assert state["rng"]["torch"] == ref_state["rng"]["torch"]
    assert {k: v for k, v in state.items() if k != "rng"} == {k: v for k, v in ref_state.items() if k != "rng"}
    assert (b_dir / "best" / "model.safetensors").read_bytes() == (Path(ref.path) / "best" / "model.safetensors").read_bytes()
    store.invalidate_cache()
    assert store.cat(f"{base}/best/model.safetensors") == (Path(ref.path) / "best" / "model.safetensors").read_bytes()
    assert store.exists(f"{base}/stage.done.json")


# ------------------------------------------------------------------------------ a stalled host, a skewed clock
# A host that holds shard 0's lease, is stalled (the parent SIGSTOPs it) past the lease, and then, with its clock
# `skew` seconds off, writes the shard and publishes it (its lease lost: said, and left to the conditional creates).
STALLED_HOST = """
import sys, time
skew = float(sys.argv[3])
real_time = time.time
time.time = lambda: real_time() + skew
from storage import lease, shards
from storage.layout import RunLayout
from storage.locks import lock_at

sd = RunLayout(sys.argv[1]).stage("synthesize", "5" * 16)
lock = lock_at(sd.shard_lock("shards", 0)).acquire()
print("holding", flush=True)
sys.stdin.readline()
with shards.ShardWriter(sd.image_shard(0)) as w:
    w.write({"__key__": "k1", "txt": sys.argv[2]})
print("published", flush=True)
"""


@pytest.mark.heavy
@pytest.mark.parametrize("skew", [300.0, -300.0])
def test_a_stalled_host_with_a_skewed_clock_deletes_and_replaces_nothing(bucket, store, tmp_path, monkeypatch, skew):
    url = f"s3://{bucket}/run"
    env = {**os.environ, "PCM_MIRROR_DIR": str(tmp_path / "stalled"), "PCM_LEASE_SECONDS": "2",
           "PYTHONPATH": str(REPO)}
    host = subprocess.Popen([sys.executable, "-c", STALLED_HOST, url, "a cat", str(skew)], env=env, cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "holding", host.stderr.read()
        host.send_signal(signal.SIGSTOP)
        _mirror(monkeypatch, tmp_path, "taker")
        monkeypatch.setenv("PCM_LEASE_SECONDS", "2")
        sd = RunLayout(url).stage("synthesize", "5" * 16)
        with lock_at(sd.shard_lock("shards", 0), timeout=30):     # taken over once the stalled lease expired
            with ShardWriter(sd.image_shard(0)) as w:
                w.write({"__key__": "k1", "txt": "a cat"})
        before = _objects(store, f"{bucket}/run")
        time.sleep(1.1)                                            # a replaced object would get a later LastModified
        host.send_signal(signal.SIGCONT)
        out, err = host.communicate("go\n", timeout=120)
        assert host.returncode == 0 and "published" in out, err[-3000:]
    finally:
        host.kill()
    after = _objects(store, f"{bucket}/run")
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == \
        {k: v for k, v in before.items() if not k.endswith(".lock")}
    stalled = RunLayout(url).stage("synthesize", "5" * 16)   # the taker's copy; the stalled host's below
    theirs = next((tmp_path / "stalled").rglob("shard-000000.tar"))
    assert theirs.read_bytes() == stalled.image_shard(0).read_bytes() == store.cat(f"{bucket}/run/synthesize/{'5' * 16}/shards/shard-000000.tar")
    assert theirs.with_name("shard-000000.done.json").read_bytes() == stalled.image_shard(0).with_name(
        "shard-000000.done.json").read_bytes()                 # the commit it found, adopted
    import re

    said = re.search(r"is ([+-]\d+) s off the clock of the store", err)   # the store's Date has whole seconds
    assert said and abs(int(said.group(1)) - skew) <= 1, err[-2000:]
    assert "publishing this finished work anyway" in err, err[-2000:]
