"""Encode stage UX: a missing images_root or a stage whose every real image failed is an error, not success;
the CLIP-score / CXE-weight distribution is reported."""

from __future__ import annotations

import numpy as np
import pytest
from builders import encode_inputs, tiny_encode_config

from pcm.score_summary import clip_score_stats, cxe_weight_stats
from pcm.stages.encode import plan, run_encode
from storage import atomic
from storage.layout import RunLayout


def test_missing_images_root_is_an_error_at_plan_time(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1)
    missing = tmp_path / "does" / "not" / "exist"
    cfg = tiny_encode_config(images_root=str(missing))
    with pytest.raises(FileNotFoundError, match=r"encode\.images_root=.*does not exist") as e:
        plan(cfg, cap, syn, RunLayout(tmp_path / "runs"))
    assert str(missing) in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"encode\.images_root"):
        run_encode(cfg, cap, syn, RunLayout(tmp_path / "runs"))
    assert not list((tmp_path / "runs").glob("encode/*/stage.done.json"))  # nothing marked done
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(FileNotFoundError, match=r"encode\.images_root=.*is not a folder"):
        plan(tiny_encode_config(images_root=str(a_file)), cap, syn, RunLayout(tmp_path / "runs"))


def test_every_real_image_failing_is_an_error_and_not_marked_done(tmp_path):
    root = str(tmp_path / "runs")
    images = tmp_path / "empty"
    images.mkdir()  # exists, but holds none of the 4 val/test images
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1)
    cfg = tiny_encode_config(images_root=str(images), real_shard_size=3)
    with pytest.raises(FileNotFoundError) as e:
        run_encode(cfg, cap, syn, RunLayout(root))
    msg = str(e.value)
    assert "none of the 4 real val/test images" in msg and str(images) in msg
    assert "image not found" in msg and "img0.jpg" in msg and "relative to" in msg
    sd = plan(cfg, cap, syn, RunLayout(root))
    assert not sd.done_marker.exists()

    # The images put in place afterwards: the rerun encodes the real units again and succeeds.
    encode_inputs(tmp_path / "again", n_shards=1, images_dir=images)  # writes img0..img2 into `images`
    result = run_encode(cfg, cap, syn, RunLayout(root))
    assert (result.counts["real_ok"], result.counts["real_failed"]) == (3, 1)
    assert result.stage_dir.done_marker.exists()


def test_some_failed_and_no_real_rows_still_succeed(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1, images_dir=tmp_path / "coco")  # img3 missing
    result = run_encode(tiny_encode_config(images_root=str(tmp_path / "coco")), cap, syn,
                        RunLayout(tmp_path / "runs"))
    assert (result.counts["real_ok"], result.counts["real_failed"]) == (3, 1)
    plain = run_encode(tiny_encode_config(), cap, syn, RunLayout(tmp_path / "runs"))  # no images_root: nothing changes
    assert plain.counts["real"] == 0 and "images_root" in plain.extra["real_note"]


def test_a_finished_stage_is_reused_when_its_real_images_are_gone(tmp_path):
    """Its fingerprint hashed the images' manifest, which cannot be listed any more: plan finds the stage by its
    config.json instead; another config that never ran is still an error."""
    import shutil

    images = tmp_path / "coco"
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1, images_dir=images)
    cfg = tiny_encode_config(images_root=str(images), real_shard_size=3)
    done = run_encode(cfg, cap, syn, RunLayout(tmp_path / "runs"))
    shutil.rmtree(images)
    again = plan(cfg, cap, syn, RunLayout(tmp_path / "runs"))
    assert again.fingerprint == done.fingerprint and again.record == atomic.read_json(again.config_file)
    assert run_encode(cfg, cap, syn, RunLayout(tmp_path / "runs")).cached
    with pytest.raises(FileNotFoundError, match=r"encode\.images_root=.*does not exist"):
        plan(tiny_encode_config(images_root=str(images), real_shard_size=4), cap, syn,
             RunLayout(tmp_path / "runs"))


def test_encode_reports_the_clip_score_and_cxe_weight_distribution(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=2)
    result = run_encode(tiny_encode_config(), cap, syn, RunLayout(tmp_path / "runs"))
    stats = result.extra["clip_score_stats"]
    assert stats["n"] == result.counts["images_ok"] == 8
    assert stats["min"] <= stats["q05"] <= stats["q25"] <= stats["median"] <= stats["q75"] <= stats["q95"] <= stats["max"]
    assert stats["mean"] == result.extra["clip_score_mean"] and 0 <= stats["fraction_le_0"] <= 1
    by_w = {c["w"]: c for c in result.extra["cxe_weights"]}
    assert set(by_w) == {1.8, 2.5, 4.0}
    assert by_w[4.0]["fraction_zero"] == stats["fraction_le_0"]  # cos <= 0 -> weight 0 at any w


def test_cxe_weight_stats_follow_min_1_w_cos():
    from pcm.loss import clip_weights

    scores = np.array([-0.3, 0.0, 0.01, 0.1, 0.2, 0.3, 0.5], dtype=np.float32)
    s = clip_score_stats(scores)
    assert s["n"] == 7 and s["fraction_le_0"] == round(2 / 7, 4) and s["median"] == pytest.approx(0.1)
    c = cxe_weight_stats(scores, 4.0)
    import torch

    expect = clip_weights(torch.from_numpy(scores), 4.0).numpy()
    assert c["mean"] == pytest.approx(float(expect.mean()), abs=1e-4)
    assert c["fraction_zero"] == round(2 / 7, 4) and c["fraction_cap"] == round(2 / 7, 4)  # 0.3 and 0.5 -> 1
    assert clip_score_stats(np.array([], dtype=np.float32)) == {"n": 0}
