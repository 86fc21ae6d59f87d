"""The synthesize stage on the CPU with the tiny preset: shards, determinism, resume, workers, failures."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from builders import N_TRAIN, TINY_SYNTHESIZE, make_captions, train_ids

from pcm.diffusion import Synthesizer
from pcm.samples import sample_seed
from pcm.stages.contract import as_result
from pcm.stages.synthesize import SynthesizeConfig, generation_spec, plan, run_synthesize
from storage import tables
from storage.layout import RunLayout
from storage.locks import try_lock
from storage.result import StageResult
from storage.shards import is_done, iter_tar

REPO = Path(__file__).resolve().parents[1]
# The test machines' CPUs are shared: one thread per process avoids oversubscription stalls
# (10x slower tiny UNet calls with two threads on a loaded two-core machine).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
@pytest.fixture
def captions(layout: RunLayout) -> StageResult:
    return make_captions(layout)


def shard_keys(stage_path: str | Path) -> list[str]:
    return [s["__key__"] for p in sorted(Path(stage_path, "shards").glob("shard-*.tar")) for s in iter_tar(p)]


def test_one_image_and_metadata_per_caption(captions, layout):
    cfg = SynthesizeConfig(**TINY_SYNTHESIZE)
    r = run_synthesize(cfg, captions, layout)
    assert r.extra["complete"] and not r.cached
    assert r.counts == {"captions": N_TRAIN, "ok": N_TRAIN, "failed": 0, "shards": 3}
    samples = tables.read(Path(r.path) / "samples.parquet", tables.SAMPLES)
    assert samples["caption_id"].to_pylist() == train_ids()
    assert samples["shard"].to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert set(samples["status"].to_pylist()) == {"ok"}
    assert samples["seed"].to_pylist() == [sample_seed(0, c) for c in train_ids()]
    assert Path(r.extra["pictures"]["samples"]).stat().st_size > 0

    seen = []
    for sample in iter_tar(Path(r.path, "shards", "shard-000001.tar")):
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["text"] == f"a photo of a red thing number {int(sample['__key__'][1:])}"
        assert meta["seed"] == sample_seed(0, sample["__key__"])
        assert (meta["model"], meta["scheduler"], meta["steps"], meta["height"]) == ("tiny", "dpm++", 2, 32)
        assert set(meta["versions"]) == {"diffusers", "torch"}
        from PIL import Image

        assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
        seen.append(sample["__key__"])
    assert seen == ["c003", "c004", "c005"]

    # Readable by tar and by webdataset.
    names = subprocess.run(["tar", "-tf", str(Path(r.path, "shards", "shard-000000.tar"))], capture_output=True,
                           text=True, check=True).stdout.split()
    assert names == [f"c00{i}.{e}" for i in range(3) for e in ("jpg", "json", "txt")]
    import webdataset as wds

    ds = wds.WebDataset(str(Path(r.path, "shards", "shard-000002.tar")), shardshuffle=False).decode("pil")
    got = [(s["__key__"], s["jpg"].size, s["json"]["caption_id"]) for s in ds]
    assert got == [("c006", (32, 32), "c006"), ("c007", (32, 32), "c007")]

    # A second run is a cache hit and does no work.
    again = run_synthesize(cfg, captions, layout)
    assert again.cached and again.fingerprint == r.fingerprint


@pytest.mark.heavy  # renders shard 1 three times: alone, forced again, then in a full run
def test_same_shard_twice_is_byte_identical(captions, layout):
    cfg = SynthesizeConfig(**TINY_SYNTHESIZE)
    sd = plan(cfg, captions, layout)
    first = run_synthesize(cfg, captions, layout, shards=[1])
    assert first.extra["complete"] is False and first.counts["shards_pending"] == 2
    tar = sd.shard_file("shards", 1, "tar")
    before = hashlib.sha256(tar.read_bytes()).hexdigest()
    run_synthesize(cfg, captions, layout, shards=[1], force=True)
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == before
    # The shard made alone equals the same shard made in a full run under another root.
    other = RunLayout(layout.root.parent / "other")
    full = run_synthesize(cfg, make_captions(other), RunLayout(other.root))
    assert hashlib.sha256(Path(full.path, "shards", "shard-000001.tar").read_bytes()).hexdigest() == before


@pytest.mark.heavy
def test_killed_run_leaves_no_partial_shard_and_resumes(captions, layout):
    cfg = dict(TINY_SYNTHESIZE, shard_size=1, batch_size=1, steps=6)
    script = ("import sys; from pcm.stages.synthesize import SynthesizeConfig, run_synthesize; "
              "from pcm.stages.contract import load_result; from storage.layout import RunLayout; "
              f"run_synthesize(SynthesizeConfig(**{cfg!r}), load_result(sys.argv[1]), RunLayout(sys.argv[2]))")
    sd = plan(SynthesizeConfig(**cfg), captions, layout)
    proc = subprocess.Popen([sys.executable, "-c", script, captions.path, str(layout.root)], cwd=REPO,
                            env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not sd.shard_done("shards", 0).exists():
            assert proc.poll() is None, "the generation process ended before its first shard"
            assert time.monotonic() < deadline, "no shard finished within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not sd.done_marker.exists(), "killed too late: the whole stage finished"
    # Everything under a final name is a whole tar; pending shards have no marker.
    for tar in sd.shard_dir("shards").glob("shard-*.tar"):
        with tarfile.open(tar) as t:
            assert len(t.getmembers()) == 3
    done_before = [i for i in range(N_TRAIN) if is_done(sd.shard_file("shards", i, "tar"))]
    assert 1 <= len(done_before) < N_TRAIN

    r = run_synthesize(SynthesizeConfig(**cfg), captions, layout)
    assert r.extra["complete"] and r.counts["ok"] == N_TRAIN
    assert shard_keys(r.path) == train_ids()
    assert not list(sd.shard_dir("shards").glob(".tmp-*")), "temporary files left behind"
    samples = tables.read(Path(r.path) / "samples.parquet", tables.SAMPLES)
    assert samples["caption_id"].to_pylist() == train_ids()


@pytest.mark.heavy  # two worker processes, each starting its own pipeline
def test_two_workers_split_the_shards_without_duplicates(captions, layout):
    cfg = SynthesizeConfig(**dict(TINY_SYNTHESIZE, shard_size=2))
    a = run_synthesize(cfg, captions, layout, worker_index=0, num_workers=2)
    assert a.extra["complete"] is False and a.counts["shards_written"] == 2 and a.counts["shards_pending"] == 2
    b = run_synthesize(cfg, captions, layout, worker_index=1, num_workers=2)
    assert b.extra["complete"] and b.counts["shards"] == 4
    assert shard_keys(b.path) == train_ids()


@pytest.mark.heavy
def test_a_shard_held_by_another_process_is_skipped_then_waited_for(captions, layout):
    cfg = SynthesizeConfig(**TINY_SYNTHESIZE)
    sd = plan(cfg, captions, layout)
    held = try_lock(sd.shard_lock("shards", 0))
    assert held is not None
    threading.Timer(3.0, held.release).start()  # the "other process" dies without finishing shard 0
    r = run_synthesize(cfg, captions, layout)
    assert r.extra["complete"] and shard_keys(r.path) == train_ids()
    # Shard 0 was written last, after the lock was released.
    mtime = {i: sd.shard_done("shards", i).stat().st_mtime for i in range(3)}
    assert mtime[0] > mtime[1] and mtime[0] > mtime[2]


def test_a_failing_sample_is_a_status_row_and_the_shard_completes(captions, layout, monkeypatch):
    import torch

    bad = sample_seed(0, "c004")
    original = Synthesizer.denoise

    def nan_for_c004(self, prompts, seeds):
        latents = original(self, prompts, seeds).clone()  # inference tensors are read-only
        for i, s in enumerate(seeds):
            if s == bad:
                latents[i] = torch.nan
        return latents

    monkeypatch.setattr(Synthesizer, "denoise", nan_for_c004)
    r = run_synthesize(SynthesizeConfig(**TINY_SYNTHESIZE), captions, layout)
    assert r.extra["complete"] and r.counts["ok"] == N_TRAIN - 1 and r.counts["failed"] == 1
    rows = tables.read(Path(r.path) / "samples.parquet", tables.SAMPLES).to_pylist()
    failed = [row for row in rows if row["status"] == "failed"]
    assert [(f["caption_id"], f["shard"]) for f in failed] == [("c004", 1)]
    assert "non-finite" in failed[0]["error"]
    assert shard_keys(r.path) == [c for c in train_ids() if c != "c004"]


@pytest.mark.bad_input
def test_bad_configs_give_clear_errors(captions, layout):
    from pcm.config import validate

    with pytest.raises(ValueError, match=r"unknown scheduler 'heun'.*dpm\+\+, ddim, euler, euler-a, lcm"):
        SynthesizeConfig(scheduler="heun")
    with pytest.raises(ValueError, match=r"synthesize\.steps: .*greater than or equal to 1"):
        validate(SynthesizeConfig, {"steps": -3}, "synthesize")
    with pytest.raises(ValueError, match="multiple of 8"):
        SynthesizeConfig(height=100)
    with pytest.raises(ValueError, match="madebyollin/taesd"):
        SynthesizeConfig(model="org/model", tiny_vae="tiny")
    missing = layout.root.parent / "no-such-model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_synthesize(SynthesizeConfig(**dict(TINY_SYNTHESIZE, model=str(missing))), captions, layout)
    with pytest.raises(FileNotFoundError, match=r"huggingface-cli download some-org/some-model --local-dir"):
        run_synthesize(SynthesizeConfig(**dict(TINY_SYNTHESIZE, model="some-org/some-model")), captions,
                       layout)
    with pytest.raises(ValueError, match="out of range"):
        run_synthesize(SynthesizeConfig(**TINY_SYNTHESIZE), captions, layout, shards=[7])
    with pytest.raises(FileNotFoundError, match="not a finished stage directory"):
        run_synthesize(SynthesizeConfig(**TINY_SYNTHESIZE),
                       as_result(str(layout.root / "ingest" / "ffffffffffffffff")), layout)


def test_a_loaded_synthesizer_must_come_from_the_configs_generation_fields(captions, layout, tmp_path):
    from pcm.stages.synthesize import made_from

    synth = object.__new__(Synthesizer)  # not loaded: only its spec is looked at
    synth.spec = generation_spec(SynthesizeConfig(**TINY_SYNTHESIZE))
    assert made_from(synth, SynthesizeConfig(**dict(TINY_SYNTHESIZE, writer_threads=2, image_format="png")))  # not read by it
    assert not made_from(synth, SynthesizeConfig(**dict(TINY_SYNTHESIZE, steps=3)))
    assert not made_from(synth, SynthesizeConfig(**dict(TINY_SYNTHESIZE, paired_images=str(tmp_path))))  # no diffusion there
    # An image source is reused for the config that reads the same images the same way.
    from pcm.stages.synthesize import make_generator

    paired = SynthesizeConfig(**dict(TINY_SYNTHESIZE, paired_images=str(tmp_path)))
    assert made_from(make_generator(paired), paired.model_copy(update={"writer_threads": 2}))
    assert not made_from(make_generator(paired), SynthesizeConfig(**dict(TINY_SYNTHESIZE, paired_images=str(tmp_path),
                                                                       width=paired.width + 8)))
    assert not made_from(make_generator(paired), SynthesizeConfig(**TINY_SYNTHESIZE))
    with pytest.raises(ValueError, match="made from another config"):
        run_synthesize(SynthesizeConfig(**dict(TINY_SYNTHESIZE, steps=3)), captions, layout,
                       synthesizer=synth)


def test_sample_grid_draws_the_images_with_their_captions_the_same_each_time(tmp_path):
    from PIL import Image

    from pcm.image_sources import encode_image
    from pcm.pictures import sample_grid

    rng = np.random.default_rng(0)
    samples = [(encode_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "png", 95), f"caption {i}")
               for i in range(5)]
    out = sample_grid(samples, tmp_path / "pictures" / "samples.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (4 * 160, 2 * (160 + 48))  # four a row, text under each
    again = sample_grid(samples, tmp_path / "again.png")
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("scheduler", ["dpm++", "euler-a"])
def test_stage_images_equal_the_plain_pipeline(scheduler):
    import torch

    synth = Synthesizer(generation_spec(SynthesizeConfig(**dict(TINY_SYNTHESIZE, scheduler=scheduler))))
    prompts = ["a cat on a mat", "two dogs running on the beach", "a bowl of fruit"]
    seeds = [sample_seed(0, c) for c in ("a", "b", "c")]
    ours = np.stack(synth.generate(prompts, seeds))
    plain = synth.pipe(prompts, height=32, width=32, num_inference_steps=2, guidance_scale=7.5,
                       generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    assert ours.dtype == np.uint8 and ours.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ours, (plain * 255).round().astype(np.uint8))
    # Alone, a sample differs from its batched self by at most one level (float summation order).
    alone = np.concatenate([np.stack(synth.generate(prompts[i:i + 1], seeds[i:i + 1])) for i in range(3)])
    assert np.abs(alone.astype(int) - ours).max() <= 1
    assert len({ours[i].tobytes() for i in range(3)}) == 3  # different seeds, different images


def test_cli_runs_the_stage(captions, layout):
    import typer
    from typer.testing import CliRunner

    from pcm.cli.synthesize import parse_shards, register

    assert parse_shards("0,1,5-7") == [0, 1, 5, 6, 7]
    with pytest.raises(ValueError, match="not an index"):
        parse_shards("a-b")
    app = typer.Typer()
    register(app)
    app.command("noop", hidden=True)(lambda: None)  # a second command keeps `synthesize` as a sub-command
    sets = ["steps=2", "height=32", "width=32", "shard_size=4", "batch_size=4", "device=cpu", "progress_bar=false"]
    args = ["synthesize", "--captions", captions.path, "--root", str(layout.root),
            *[x for s in sets for x in ("--set", s)]]
    out = CliRunner().invoke(app, [*args, "--shards", "1"])
    assert out.exit_code == 0, out.output
    assert "1 of 2 shards still pending" in out.output
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "synthesize done: 8 ok, 0 failed, 2 shards" in out.output


def test_flow_retries_only_transient_errors():
    from flows.retries import is_transient

    assert is_transient(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_transient(OSError("Input/output error"))
    assert not is_transient(ValueError("unknown scheduler"))
    assert not is_transient(FileNotFoundError("model directory does not exist"))
    assert not is_transient(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_flow_renders_each_shard_as_a_task_and_reuses_the_finished_stage(captions, layout, prefect_api):
    from prefect.client.orchestration import get_client

    from flows.synthesize import synthesize_flow

    cfg = SynthesizeConfig(**TINY_SYNTHESIZE)
    part = synthesize_flow(cfg, captions.path, str(layout.root), shards=[2])  # a fan-out child's share
    assert part.extra["complete"] is False and part.counts["shards_pending"] == 2
    assert [d["index"] for d in part.extra["shard_reports"]] == [2]
    state = synthesize_flow(cfg, captions.path, str(layout.root), return_state=True)
    first, first_run = state.result(), state.state_details.flow_run_id
    sd = plan(cfg, captions, layout)
    markers = {i: sd.shard_done("shards", i).stat().st_mtime_ns for i in range(3)}
    again = synthesize_flow(cfg, captions.path, str(layout.root))
    assert first.extra["complete"] and first.counts["ok"] == N_TRAIN and shard_keys(first.path) == train_ids()
    assert again.fingerprint == first.fingerprint
    assert {i: sd.shard_done("shards", i).stat().st_mtime_ns for i in range(3)} == markers  # nothing redone
    with get_client(sync_client=True) as client:                  # each shard task is named after its shard
        names = {t.name for t in client.read_task_runs() if t.flow_run_id == first_run}
    assert {"shard-000000", "shard-000001"} <= names




@pytest.mark.bad_input
def test_a_stage_where_every_sample_failed_is_an_error_and_not_done(captions, layout, tmp_path):
    from pcm.stages.synthesize import WARN_FAILED_SHARE

    # Paired images with no image_path on any caption: every sample is a failed row.
    cfg = SynthesizeConfig(**TINY_SYNTHESIZE, paired_images=str(tmp_path))
    with pytest.raises(RuntimeError, match=rf"every one of the {N_TRAIN} samples failed \(no image_path"):
        run_synthesize(cfg, captions, layout)
    sd = plan(cfg, captions, layout)
    assert not sd.done_marker.exists() and not (sd.path / "samples.parquet").exists()
    assert not any(is_done(sd.image_shard(i)) for i in range(3))        # a rerun renders every shard again
    assert WARN_FAILED_SHARE == 0.1


def test_a_large_failed_share_is_a_warning_in_the_log_and_the_result(captions, layout, tmp_path, caplog):
    from PIL import Image

    cap = captions.stage_dir
    rows = tables.read(cap.file("captions.parquet"), tables.CAPTIONS).to_pylist()
    for i, r in enumerate(r for r in rows if r["split"] == "train" and r["status"] == "ok"):
        if i < 6:                                                         # 6 of 8 have an image, 2 fail
            r["image_path"] = f"img{i}.png"
            Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(tmp_path / f"img{i}.png")
    tables.write(cap.file("captions.parquet"), rows, tables.CAPTIONS)
    with caplog.at_level("WARNING", logger="pcm.stages.synthesize"):
        r = run_synthesize(SynthesizeConfig(**TINY_SYNTHESIZE, paired_images=str(tmp_path)), captions,
                           layout)
    assert r.counts["ok"] == 6 and r.counts["failed"] == 2
    assert "2 of 8 samples failed (25%)" in r.extra["warning"] and "2 of 8 samples failed" in caplog.text
