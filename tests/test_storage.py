"""Storage layer: round trips, schema checks, fingerprints, atomic shards, locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from storage import arrays, atomic, checkpoints, shards, tables
from storage.fingerprint import fingerprint
from storage.layout import RunLayout, StageDir
from storage.lock import FileLock, LockHeld
from storage.result import StageResult

REPO = Path(__file__).resolve().parents[1]


# -- layout -------------------------------------------------------------------------------
def test_layout_names(tmp_path):
    sd = RunLayout(tmp_path).stage("synthesize", "0123456789abcdef")
    assert sd.path == tmp_path.resolve() / "synthesize" / "0123456789abcdef"
    assert sd.shard_file("shards", 7, "tar").name == "shard-000007.tar"
    assert sd.shard_done("features", 7).name == "shard-000007.done.json"
    assert sd.file("captions.parquet").name == "captions.parquet"
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError):
            sd.file(bad)
    with pytest.raises(ValueError, match="unknown stage"):
        RunLayout(tmp_path).stage("bogus", "0123456789abcdef")
    with pytest.raises(ValueError, match="fingerprint"):
        RunLayout(tmp_path).stage("train", "../../etc")


# -- fingerprints -------------------------------------------------------------------------
CONFIG = {"steps": 20, "guidance": 7.5, "scheduler": "dpm++", "size": [512, 512], "negative": None}


def test_fingerprint_stable_across_processes():
    here = fingerprint("synthesize", CONFIG, ["abc"], "1")
    code = textwrap.dedent(f"""
        from storage.fingerprint import fingerprint
        print(fingerprint("synthesize", {CONFIG!r}, ["abc"], "1"))
    """)
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                           check=True).stdout.strip()
    assert here == there
    # key order does not matter
    assert fingerprint("synthesize", dict(reversed(list(CONFIG.items()))), ["abc"], "1") == here


@pytest.mark.parametrize("field,value", [("steps", 21), ("guidance", 7.0), ("scheduler", "ddim"),
                                         ("size", [512, 768]), ("negative", "blurry")])
def test_fingerprint_sensitive_to_every_field(field, value):
    base = fingerprint("synthesize", CONFIG, ["abc"], "1")
    assert fingerprint("synthesize", {**CONFIG, field: value}, ["abc"], "1") != base


def test_fingerprint_sensitive_to_inputs_code_and_stage():
    base = fingerprint("synthesize", CONFIG, ["abc"], "1")
    assert fingerprint("synthesize", CONFIG, ["abd"], "1") != base
    assert fingerprint("synthesize", CONFIG, ["abc"], "2") != base
    assert fingerprint("encode", CONFIG, ["abc"], "1") != base
    with pytest.raises(ValueError, match="NaN"):
        fingerprint("synthesize", {"x": float("nan")})


# -- atomic writes ------------------------------------------------------------------------
def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as f:
            f.write("{partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    atomic.write_json(target, {"a": 1})
    assert atomic.read_json(target) == {"a": 1}


@pytest.mark.bad_input
def test_read_json_names_position(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at line 4, column 1"):
        atomic.read_json(p)


# -- tables -------------------------------------------------------------------------------
def _caption_row(i: int) -> dict:
    return {"caption_id": f"c{i}", "image_id": f"i{i}", "split": "train", "text": "a cat", "raw_text": "a  cat",
            "source": "txt:x.txt", "image_path": None, "references": [], "status": "ok", "error": None}


def test_table_round_trip_readable_by_arrow(tmp_path):
    p = tmp_path / "captions.parquet"
    tables.write(p, [_caption_row(i) for i in range(3)], tables.CAPTIONS)
    t = pq.read_table(p)  # any Arrow reader
    assert t.num_rows == 3 and t.schema.equals(tables.CAPTIONS)
    assert tables.read(p, tables.CAPTIONS).column("caption_id").to_pylist() == ["c0", "c1", "c2"]


@pytest.mark.bad_input
def test_schema_violations_rejected(tmp_path):
    p = tmp_path / "t.parquet"
    row = _caption_row(0)
    with pytest.raises(tables.SchemaError, match="unexpected columns"):
        tables.write(p, [{**row, "extra": 1}], tables.CAPTIONS)
    with pytest.raises(tables.SchemaError, match="'references'"):
        tables.write(p, [{**row, "references": "not a list"}], tables.CAPTIONS)
    bad = pa.table({"caption_id": [1, 2]})
    with pytest.raises(tables.SchemaError, match="missing columns"):
        tables.write(p, bad, tables.CAPTIONS)
    assert not p.exists()
    pq.write_table(pa.table({"caption_id": pa.array([1], pa.int64())}), p)
    with pytest.raises(tables.SchemaError, match=r"t.parquet.*caption_id: int64"):
        tables.read(p, tables.CAPTIONS)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(tables.SchemaError, match="junk.parquet"):
        tables.read(tmp_path / "junk.parquet", tables.CAPTIONS)


# -- arrays -------------------------------------------------------------------------------
def test_arrays_round_trip_memory_mapped(tmp_path):
    from safetensors.numpy import load_file

    p = tmp_path / "f.safetensors"
    g = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float16)
    patches = np.arange(5 * 4 * 3, dtype=np.float16).reshape(5, 4, 3)
    arrays.write_arrays(p, {"global": g, "patches": patches}, {"keys": json.dumps(list("abcde"))})
    got, meta = arrays.open_arrays(p)
    assert isinstance(got["patches"], np.memmap)
    np.testing.assert_array_equal(got["global"], g)
    np.testing.assert_array_equal(got["patches"][2], patches[2])
    assert json.loads(meta["keys"]) == list("abcde")
    np.testing.assert_array_equal(load_file(p)["global"], g)  # plain safetensors reader agrees
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="bad.safetensors"):
        arrays.open_arrays(tmp_path / "bad.safetensors")


# -- shards -------------------------------------------------------------------------------
def _samples(n: int) -> list[dict]:
    return [{"__key__": f"cap-{i:04d}", "txt": f"caption {i}", "json": {"i": i}, "jpg": bytes([i]) * 100}
            for i in range(n)]


def test_shard_round_trip_tar_and_webdataset(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with shards.ShardWriter(path) as w:
        for s in _samples(4):
            w.write(s)
        w.stats["failed"] = 0
    marker = shards.read_marker(path)
    assert marker["count"] == 4 and marker["failed"] == 0 and marker["bytes"] == path.stat().st_size
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["cap-0000.jpg", "cap-0000.json", "cap-0000.txt"]
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [g["__key__"] for g in got] == [f"cap-{i:04d}" for i in range(4)]
    assert [s["txt"] for s in shards.iter_tar(path)] == [f"caption {i}".encode() for i in range(4)]


def test_shards_are_byte_identical_to_webdataset_tarwriter(tmp_path):
    # storage writes tars with tarfile (webdataset imports torch); the bytes must be webdataset's own.
    samples = _samples(5) + [{"__key__": "big", "jpg": os.urandom(70_000), "txt": "ünïcode ✓", "_meta": "x"}]
    for mtime in (0.0, 1234.0):
        path = tmp_path / f"m{int(mtime)}" / "shard-000000.tar"
        with shards.ShardWriter(path, mtime=mtime) as w:
            for s in samples:
                w.write(s)
        with open(tmp_path / "wds.tar", "wb") as f, wds.TarWriter(f, mtime=mtime) as ref:
            for s in samples:
                ref.write(s)
        assert path.read_bytes() == (tmp_path / "wds.tar").read_bytes()


@pytest.mark.bad_input
def test_a_bad_sample_value_writes_nothing_of_that_sample(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with shards.ShardWriter(path) as w:
        w.write({"__key__": "ok", "txt": "a"})
        with pytest.raises(ValueError, match="'bad'.*'jpg' must be bytes"):
            w.write({"__key__": "bad", "aaa": b"first", "jpg": 3.5})
        w.write({"__key__": "bad", "txt": "retried under the same key"})
    assert [s["__key__"] for s in shards.iter_tar(path)] == ["ok", "bad"]


def test_same_samples_give_byte_identical_shards(tmp_path):
    for name in ("a", "b"):
        with shards.ShardWriter(tmp_path / name / "shard-000000.tar") as w:
            for s in _samples(3):
                w.write(s)
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()


def test_exception_inside_writer_leaves_no_shard(tmp_path):
    path = tmp_path / "shard-000001.tar"
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(path) as w:
            w.write(_samples(1)[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert shards.pending([path]) == [path]


@pytest.mark.bad_input
def test_image_member_finds_every_format_the_writers_use():
    # Every synthesize image_format's suffix, and `jpeg` as other WebDataset writers spell it; none -> None.
    for ext in [*shards.IMAGE_EXTENSIONS.values(), "jpeg"]:
        assert shards.image_member({"__key__": "k", "txt": b"a cat", "json": b"{}", ext: b"img"}) == ext
    assert shards.image_member({"__key__": "k", "txt": b"a cat"}) is None


def test_bad_keys_rejected(tmp_path):
    for key in ("a.b", "../x", "a/b", "", "x y", "/abs"):
        with pytest.raises(ValueError, match="invalid sample key"):
            shards.check_key(key)
    with pytest.raises(ValueError, match="duplicate"):
        with shards.ShardWriter(tmp_path / "shard-000000.tar") as w:
            w.write({"__key__": "k", "txt": "a"})
            w.write({"__key__": "k", "txt": "b"})


@pytest.mark.bad_input
def test_truncated_tar_is_a_clear_error(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with shards.ShardWriter(path) as w:
        for s in _samples(20):
            w.write(s)
    whole = path.read_bytes()
    path.write_bytes(whole[:3000])
    with pytest.raises(ValueError, match="truncated or altered shard"):  # checked against its marker
        list(shards.iter_tar(path))
    shards.done_path(path).unlink()  # without a marker, tarfile's own error is named
    with pytest.raises(ValueError, match="unreadable shard"):
        list(shards.iter_tar(path))
    # A cut exactly on a header boundary reads as a valid, shorter tar: only the marker tells.
    path.write_bytes(whole)
    shards.write_marker(path, {"count": 20, "bytes": len(whole)})
    path.write_bytes(whole[: 512 * 6])
    with pytest.raises(ValueError, match="truncated or altered"):
        list(shards.iter_tar(path))


WRITER = """
import sys, time
from storage.shards import ShardWriter
with ShardWriter(sys.argv[1]) as w:
    for i in range(1000):
        w.write({"__key__": f"k{i}", "txt": "x" * 10000})
        if i == 50:
            print("writing", flush=True)
        time.sleep(0.01)
"""


def test_sigkill_mid_shard_leaves_nothing_final_and_rerun_completes(tmp_path):
    path = tmp_path / "shard-000000.tar"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not path.exists() and not shards.done_path(path).exists()
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the partial file, hidden
    assert shards.pending([path]) == [path]
    with shards.ShardWriter(path) as w:  # the rerun clears the stale temporary
        for s in _samples(2):
            w.write(s)
    assert shards.is_done(path) and sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-000000.done.json", "shard-000000.tar"]
    with tarfile.open(path) as t:
        assert len(t.getnames()) == 6


# -- locks --------------------------------------------------------------------------------
HOLDER = """
import sys, time
from storage.lock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_second_process_fails_fast_naming_the_holder(tmp_path):
    lock = tmp_path / ".lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "30"], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=rf"locked by pid {proc.pid} on"):
            FileLock(lock, timeout=0).acquire()
    finally:
        proc.kill()
        proc.wait()
    with FileLock(lock, timeout=0):  # released when the holder died
        pass


def test_second_process_can_wait(tmp_path):
    lock = tmp_path / ".lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "1.5"], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    start = time.monotonic()
    with FileLock(lock, timeout=30):
        waited = time.monotonic() - start
    proc.wait()
    assert waited > 0.5


# -- checkpoints and results -------------------------------------------------------------
def test_checkpoint_directories(tmp_path):
    for step in (10, 20, 30):
        with checkpoints.atomic_directory(tmp_path / checkpoints.step_name(step)) as d:
            (d / "state.json").write_text(json.dumps({"step": step}))
    with pytest.raises(RuntimeError):
        with checkpoints.atomic_directory(tmp_path / checkpoints.step_name(40)) as d:
            (d / "state.json").write_text("{}")
            raise RuntimeError("killed")
    assert [s for s, _ in checkpoints.list_steps(tmp_path)] == [10, 20, 30]
    assert checkpoints.latest(tmp_path).name == "step-00000030"
    checkpoints.prune(tmp_path, keep=2)
    assert [s for s, _ in checkpoints.list_steps(tmp_path)] == [20, 30]
    checkpoints.check_safe(tmp_path / "step-00000030")
    (tmp_path / "step-00000030" / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickle"):
        checkpoints.check_safe(tmp_path / "step-00000030")


def test_stage_result_round_trip(tmp_path):
    r = StageResult("ingest", "0123456789abcdef", str(tmp_path), {"rows": 3}, {"total_s": 1.5}, {"k": "v"})
    r.save(tmp_path / "stage.done.json")
    assert StageResult.load(tmp_path / "stage.done.json") == r


def test_replacement_killed_between_renames_is_recovered(tmp_path):
    best = tmp_path / "best"
    with checkpoints.atomic_directory(best) as d:
        (d / "state.json").write_text('{"step": 1}')
    # Simulate a kill after the old directory was moved away and before the new one moved in.
    os.replace(best, tmp_path / f".old-best.{os.getpid()}")
    assert checkpoints.recover(best).exists()
    assert json.loads((best / "state.json").read_text()) == {"step": 1}
    with checkpoints.atomic_directory(best) as d:
        (d / "state.json").write_text('{"step": 2}')
    assert json.loads((best / "state.json").read_text()) == {"step": 2}
    assert not list(tmp_path.glob(".old-*"))


def test_arrays_are_byte_reproducible_and_standard(tmp_path):
    from safetensors import safe_open

    arrays_ = {"b": np.ones((2, 3), np.float32), "a": np.arange(4, dtype=np.int64), "m": np.zeros(0, np.float16)}
    meta = {"zeta": "1", "alpha": "2", "keys": json.dumps(["x", "y"])}
    arrays.write_arrays(tmp_path / "1.safetensors", arrays_, meta)
    arrays.write_arrays(tmp_path / "2.safetensors", dict(reversed(arrays_.items())), dict(reversed(meta.items())))
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()
    with safe_open(str(tmp_path / "1.safetensors"), framework="np") as f:  # the reference reader agrees
        assert f.metadata() == meta
        np.testing.assert_array_equal(f.get_tensor("a"), arrays_["a"])
        np.testing.assert_array_equal(f.get_tensor("b"), arrays_["b"])


def test_atomic_directory_commits_subfolders_and_can_keep_another_copy(tmp_path):
    """A diffusers directory has subfolders: every file at any depth is synced and given the umask's mode. With
    keep_existing (a cache of identical copies), a directory another process put there first is kept."""
    want = 0o666 & ~atomic.umask()
    final = tmp_path / "preset"
    with checkpoints.atomic_directory(final, keep_existing=True) as d:
        (d / "unet").mkdir()
        (d / "unet" / "weights.bin").write_bytes(b"first")
        os.chmod(d / "unet" / "weights.bin", 0o600)
        (d / "model_index.json").write_text("{}")
    assert (final / "unet" / "weights.bin").read_bytes() == b"first"
    assert (final / "unet" / "weights.bin").stat().st_mode & 0o777 == want
    with checkpoints.atomic_directory(final, keep_existing=True) as d:  # a second build: the first copy stays
        (d / "model_index.json").write_text('{"second": true}')
    assert (final / "model_index.json").read_text() == "{}"
    with checkpoints.atomic_directory(final) as d:  # without keep_existing it replaces
        (d / "model_index.json").write_text('{"third": true}')
    assert json.loads((final / "model_index.json").read_text()) == {"third": True}
    assert not (final / "unet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset"]  # no temporary or old directory left


def test_outputs_honour_the_umask(tmp_path):
    atomic.write_json(tmp_path / "a.json", {})
    with checkpoints.atomic_directory(tmp_path / "ckpt") as d:
        (d / "state.json").write_text("{}")
    want = 0o666 & ~atomic.umask()
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == want  # not mkstemp's 0600
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~atomic.umask()


def test_files_a_library_writes_private_still_honour_the_umask(tmp_path):
    """safetensors' save_file (and any writer replacing the temporary) makes 0600 files; final files must not be."""
    want = 0o666 & ~atomic.umask()

    def private(path):
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"{}")
        os.close(fd)

    with atomic.atomic_path(tmp_path / "a.safetensors") as tmp:
        private(tmp)
    with checkpoints.atomic_directory(tmp_path / "ckpt") as d:
        private(d / "model.safetensors")
    with shards.ShardWriter(tmp_path / "shard-000000.tar") as w:
        w.write({"__key__": "k", "txt": "a"})
    for p in (tmp_path / "a.safetensors", tmp_path / "ckpt" / "model.safetensors", tmp_path / "shard-000000.tar",
              tmp_path / "shard-000000.done.json"):
        assert p.stat().st_mode & 0o777 == want, p


@pytest.mark.heavy  # the whole tiny pipeline, in two run roots
def test_a_moved_run_root_names_its_new_place_never_the_old_one(tmp_path):
    import shutil

    from pcm.stages.pipeline import resolve, run_pipeline
    from storage.atomic import read_json

    cfg = resolve("tiny", {"synthesize.limit": 8, "synthesize.shard_size": 4, "synthesize.steps": 2,
                           "train.batch_size": 4, "train.max_steps": 4, "train.val_every": 4,
                           "train.checkpoint_every": 4})
    old, new = tmp_path / "old", tmp_path / "new"
    first = run_pipeline(cfg, str(old), stages=("ingest", "synthesize", "encode"))
    marker = read_json(Path(first["encode"].path) / "stage.done.json")
    assert str(old) not in json.dumps(marker), "the marker holds an absolute path into its root"
    shutil.copytree(old, new)
    # The old root still exists and its encode stage is damaged: the new root must not read it.
    shutil.rmtree(Path(first["encode"].path) / "features")
    moved = run_pipeline(cfg, str(new))
    for stage, result in moved.items():
        assert Path(result.path).is_relative_to(new), (stage, result.path)
    assert moved["encode"].cached and moved["synthesize"].cached
    assert Path(moved["encode"].extra["pictures"]["clip_scores"]).is_relative_to(new)
    assert Path(moved["train"].extra["latest"]).is_relative_to(new) and moved["evaluate"].counts


# -- named manifests and stage lineage ----------------------------------------------------
def test_manifests_pair_each_file_with_its_schema(tmp_path):
    from storage import manifests

    sd = RunLayout(tmp_path).stage("encode", "0123456789abcdef")
    rows = [{"concept": "dog", "count": 3, "embedding": [1.0, 0.0], "model": "m"}]
    manifests.CONCEPTS.write(sd, rows)
    assert manifests.CONCEPTS.path(sd) == sd.path / "concepts.parquet" and manifests.CONCEPTS.exists(sd)
    assert pq.read_table(sd.path / "concepts.parquet").to_pylist() == rows  # any Arrow reader
    with pytest.raises(tables.SchemaError, match="concepts.parquet"):
        manifests.CONCEPTS.write(sd, [{**rows[0], "count": "three"}])
    pq.write_table(pa.table({"concept": ["x"]}), sd.path / "concepts.parquet")
    with pytest.raises(tables.SchemaError, match="concepts.parquet: does not match the schema"):
        manifests.CONCEPTS.read(sd)
    # every manifest name is unique, and the per-shard tables land in their kind's folder
    names = [m.name for m in vars(manifests).values() if isinstance(m, manifests.Manifest)]
    assert len(names) == len(set(names)) == 7  # captions, samples, scores, real, concepts, pairs, per_image
    assert manifests.SHARD_SCORES.path(sd, 2) == sd.path / "features" / "shard-000002.scores.parquet"
    assert manifests.SHARD_REAL.path(sd, 0) == sd.path / "real" / "shard-000000.status.parquet"


def test_ok_rows_keeps_ok_rows_of_a_split_in_order():
    rows = [{"status": "ok", "split": "val", "i": 0}, {"status": "rejected", "split": "val", "i": 1},
            {"status": "ok", "split": "train", "i": 2}, {"status": "ok", "split": "val", "i": 3}]
    assert [r["i"] for r in tables.ok_rows(rows, "val")] == [0, 3]
    assert [r["i"] for r in tables.ok_rows(rows)] == [0, 2, 3]


def test_stage_dir_root_inputs_and_lineage(tmp_path):
    layout = RunLayout(tmp_path)
    ingest = layout.stage("ingest", "1" * 16)
    other_ingest = layout.stage("ingest", "2" * 16)
    synth = layout.stage("synthesize", "3" * 16)
    encode = layout.stage("encode", "4" * 16)
    train = layout.stage("train", "5" * 16)
    for sd, inputs in ((ingest, {}), (other_ingest, {}), (synth, {"ingest": ingest.fingerprint}),
                       (encode, {"ingest": other_ingest.fingerprint, "synthesize": synth.fingerprint}),
                       (train, {"ingest": ingest.fingerprint, "encode": encode.fingerprint})):
        sd.path.mkdir(parents=True)
        atomic.write_json(sd.config_file, {"stage": sd.stage, "inputs": inputs})
    assert train.root == tmp_path.resolve() and StageDir.at(train.path).root == train.root
    assert [s.stage for s in train.inputs()] == ["encode", "ingest"]  # config.json order (keys sorted)
    assert train.lineage("ingest") == [ingest, other_ingest]  # nearest first, each once
    assert train.lineage("synthesize") == [synth] and ingest.lineage("ingest") == []
    assert [sd.fingerprint for sd in layout.stage_dirs("ingest")] == ["1" * 16, "2" * 16]
    assert layout.stage_dirs("evaluate") == []
    assert train.metrics_log.name == "metrics.jsonl" and train.best.name == "best"
    with pytest.raises(ValueError, match="invalid picture name"):
        train.picture("../x.png")


def test_input_digest_hashes_an_unchanged_file_once(tmp_path, monkeypatch):
    from storage.fingerprint import file_digest, input_digest

    path = tmp_path / "captions.json"
    path.write_text("one")
    calls = []
    monkeypatch.setattr("storage.fingerprint.file_digest", lambda p: calls.append(p) or file_digest(p))
    first = input_digest(path)
    assert input_digest(path) == first == file_digest(path) and len(calls) == 1
    path.write_text("two")  # rewritten: new size and mtime, hashed again
    assert input_digest(path) == file_digest(path) != first and len(calls) == 2
    os.utime(path, ns=(1, 1))  # same size, another mtime: hashed again too
    input_digest(path)
    assert len(calls) == 3
