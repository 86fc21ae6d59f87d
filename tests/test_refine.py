"""The refine stage: blocked retrieval vs brute force, SynC's rules vs plain loops, the stage, resume, train on it."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from builders import REPO, child_env, finished_stage, tiny_train_config, train_inputs
from pydantic import ValidationError
from typer.testing import CliRunner

from pcm.dataset import FeatureStore, load_pairs
from pcm.refine import assign, cycle_scores, keep_count, keep_top, sync, topk_similar
from pcm.stages import train
from pcm.stages.refine import RefineConfig, plan, run_refine, verify
from storage import manifests
from storage.arrays import open_arrays
from storage.layout import RunLayout, StageDir
from storage.result import StageResult


# ---------------------------------------------------------------------- the rules, against plain computations
def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(("n", "m", "k", "block"), [(50, 40, 5, 7), (33, 64, 1, 64), (20, 9, 15, 4), (8, 8, 3, 1000)])
def test_blocked_topk_equals_the_full_matrix(n, m, k, block):
    rng = np.random.default_rng(n + m + k)
    q, keys = unit(rng, n, 12), unit(rng, m, 12)
    values, indices = topk_similar(q, keys, k, block=block)
    full = q.astype(np.float64) @ keys.T.astype(np.float64)      # the n x m matrix the blocks never build
    want = np.argsort(-full, axis=1, kind="stable")[:, :min(k, m)]
    assert indices.shape == (n, min(k, m))
    np.testing.assert_array_equal(indices, want)
    np.testing.assert_allclose(values, np.take_along_axis(full, want, 1), atol=1e-5)


def straightforward_sync(text: np.ndarray, images: np.ndarray, k: int, i2t_k: int) -> tuple[list[int], list[float]]:
    """SynC's rule written as loops over the full similarity matrices (SYNC.md steps 1-3)."""
    t2i, t2t = text @ images.T, text @ text.T
    image, score = [], []
    for q in range(len(text)):
        candidates = sorted(range(len(images)), key=lambda j: -t2i[q, j])[:k]
        best_j, best_s = None, -math.inf
        for j in candidates:                                   # in order: a tie keeps the earlier candidate
            returned = sorted(range(len(text)), key=lambda c: -t2i[c, j])[:i2t_k]
            s = max(t2t[q, c] for c in returned)
            if s > best_s + 1e-6:
                best_j, best_s = j, s
        image.append(best_j)
        score.append(best_s)
    return image, score


def test_sync_matches_the_straightforward_rule():
    rng = np.random.default_rng(3)
    images = unit(rng, 30, 10)
    # Captions near some other caption's image, and near each other in pairs: the cycle has something to find.
    text = unit(rng, 30, 10) * 0.4 + images[rng.permutation(30)]
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image, score = sync(text, images, k=6, i2t_k=2, block=7)
    want_image, want_score = straightforward_sync(text.astype(np.float64), images.astype(np.float64), 6, 2)
    np.testing.assert_array_equal(image, want_image)
    np.testing.assert_allclose(score, want_score, atol=1e-5)
    assert (image != np.arange(30)).any()  # some captions moved


def test_cycle_score_is_the_best_cosine_to_the_captions_the_candidate_returns():
    text = np.eye(3, dtype=np.float32)
    text[2] = [np.sqrt(0.5), np.sqrt(0.5), 0]
    candidates = np.array([[0, 1], [1, 0], [2, 0]])
    back = np.array([[1, 2], [0, 0], [2, 1]])  # image 0 returns captions 1 and 2, ...
    got = cycle_scores(text, candidates, back, block=2)
    want = [[max(text[q] @ text[c] for c in back[j]) for j in candidates[q]] for q in range(3)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    image, score = assign(candidates, np.array([[0.5, 0.5], [0.1, 0.9], [0.3, 0.2]]))
    np.testing.assert_array_equal(image, [0, 0, 2])           # a tie keeps the first candidate
    np.testing.assert_allclose(score, [0.5, 0.9, 0.3])


def test_keep_top_keeps_floor_tau_n_best_with_ties_in_input_order():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.6])
    rank, kept = keep_top(scores, 0.7)
    order = sorted(range(10), key=lambda i: (-scores[i], i))  # the release's stable sort, descending
    assert [int(rank[i]) for i in order] == list(range(1, 11))
    assert kept.sum() == 7 and set(np.nonzero(kept)[0]) == set(order[:7])
    assert keep_count(100, 0.29) == 29 and keep_count(8, 0.9) == 7 and keep_count(5, 1.0) == 5
    with pytest.raises(ValueError, match="keep_fraction"):
        keep_count(5, 0.0)
    with pytest.raises(ValueError, match="k=0"):
        topk_similar(scores[:, None], scores[:, None], 0)


# ---------------------------------------------------------------------- the stage on hand-built inputs
N = 8
MOVED = {0: 3, 1: 5, 4: 6}  # caption i described what image j shows


def refine_inputs(root: Path) -> tuple[StageResult, StageResult]:
    """train_inputs (8 encoded captions) with caption embeddings that make sense of the images: caption i lies
    near its own image, except the MOVED ones, near another image; one caption failed encoding, one was never
    synthesized."""
    cap, enc = train_inputs(root, n_train=N)
    enc_sd, cap_sd = enc.stage_dir, cap.stage_dir
    g = np.concatenate([open_arrays(enc_sd.feature_shard("features", s))[0]["global"] for s in (0, 1)])
    g = g.astype(np.float32)
    rng = np.random.default_rng(1)
    rows = manifests.SCORES.read(enc_sd).to_pylist()
    for i, r in enumerate(rows[:N]):
        t = g[MOVED.get(i, i)] + 0.05 * rng.standard_normal(g.shape[1])
        r["text_embedding"] = (t / np.linalg.norm(t)).tolist()
        r["clip_score"] = float(r["text_embedding"] @ (g[i] / np.linalg.norm(g[i])))
    manifests.SCORES.write(enc_sd, rows)
    captions = manifests.CAPTIONS.read(cap_sd).to_pylist()
    extra = [dict(captions[0], caption_id=cid, image_id=cid, text=f"a caption {cid}") for cid in ("c9999", "c0100")]
    manifests.CAPTIONS.write(cap_sd, captions + extra)
    return cap, enc


def small(**kw) -> RefineConfig:
    return RefineConfig(**{"k": 4, "block": 3, "device": "cpu", **kw})


def test_sync_stage_writes_every_caption_with_its_image_score_and_reason(tmp_path):
    root = str(tmp_path / "runs")
    cap, enc = refine_inputs(tmp_path / "runs")
    result = run_refine(small(), cap, enc, RunLayout(root))
    rows = {r["caption_id"]: r for r in manifests.PAIRS.read(result.stage_dir).to_pylist()}
    assert set(rows) == {f"c{i:04d}" for i in range(N)} | {"c9999", "c0100"}   # every training caption
    assert rows["c9999"]["status"] == "dropped" and rows["c9999"]["reason"] == "not encoded: decode error"
    assert rows["c0100"]["status"] == "dropped" and "no synthetic image" in rows["c0100"]["reason"]
    for i in range(N):  # each caption is paired with the image it describes
        assert rows[f"c{i:04d}"]["image_caption_id"] == f"c{MOVED.get(i, i):04d}", i
    scored = [r for r in rows.values() if r["rank"] is not None]
    assert sorted(r["rank"] for r in scored) == list(range(1, N + 1))
    kept = [r for r in scored if r["status"] == "kept"]
    assert len(kept) == math.floor(0.9 * N) and min(r["score"] for r in kept) >= max(
        r["score"] for r in scored if r["status"] == "dropped")
    assert result.counts == {"captions": N + 2, "scored": N, "kept": 7, "dropped": 3,
                             "reassigned": sum(rows[f"c{i:04d}"]["status"] == "kept" for i in MOVED),
                             "images_used": len({r["image_caption_id"] for r in kept})}
    # The pair's CLIP score is the cosine of the caption and its new image (encode's own score if unmoved).
    store = FeatureStore(enc.stage_dir, "features")
    scores = {r["caption_id"]: r for r in manifests.SCORES.read(enc.stage_dir).to_pylist()}
    for cid, r in rows.items():
        if r["rank"] is None:
            continue
        g = store.shard(r["shard"])["global"][r["row"]].astype(np.float32)
        assert store.keys(r["shard"])[r["row"]] == r["image_caption_id"]
        t = np.array(scores[cid]["text_embedding"])
        want = scores[cid]["clip_score"] if r["image_caption_id"] == cid else t @ g / np.linalg.norm(g)
        assert r["clip_score"] == pytest.approx(want, abs=1e-5)
    # A second call is the cached stage.
    again = run_refine(small(), cap, enc, RunLayout(root))
    assert again.cached and again.path == result.path and verify(result.stage_dir) is None


def test_clip_filter_keeps_the_original_pairs_with_the_best_clip_scores(tmp_path):
    root = str(tmp_path / "runs")
    cap, enc = refine_inputs(tmp_path / "runs")
    result = run_refine(small(method="clip-filter", keep_fraction=0.5), cap, enc, RunLayout(root))
    rows = [r for r in manifests.PAIRS.read(result.stage_dir).to_pylist() if r["rank"] is not None]
    assert all(r["image_caption_id"] == r["caption_id"] and r["score"] == r["clip_score"] for r in rows)
    by_score = sorted(rows, key=lambda r: -r["score"])
    assert [r["status"] for r in by_score] == ["kept"] * 4 + ["dropped"] * 4
    # k and i2t_k mean nothing to clip-filter: not in its fingerprint.
    assert plan(small(method="clip-filter", keep_fraction=0.5, k=9), cap, enc,
                RunLayout(root)).fingerprint == result.fingerprint


def test_train_on_a_refined_pairing_uses_its_images_and_scores(tmp_path):
    root = str(tmp_path / "runs")
    cap, enc = refine_inputs(tmp_path / "runs")
    ref = run_refine(small(), cap, enc, RunLayout(root))
    kept = {r["caption_id"]: r for r in manifests.PAIRS.read(ref.stage_dir).to_pylist() if r["status"] == "kept"}
    pairs = load_pairs(cap.stage_dir, enc.stage_dir, refine=ref.stage_dir)
    assert pairs.caption_ids == sorted(kept)
    assert pairs.image_keys == [kept[c]["image_caption_id"] for c in pairs.caption_ids]
    np.testing.assert_array_equal(pairs.shard, [kept[c]["shard"] for c in pairs.caption_ids])
    np.testing.assert_array_equal(pairs.row, [kept[c]["row"] for c in pairs.caption_ids])
    np.testing.assert_allclose(pairs.clip_score, [kept[c]["clip_score"] for c in pairs.caption_ids])
    FeatureStore(enc.stage_dir, "features").check_rows(pairs.shard, pairs.row, pairs.image_keys)

    trained = train.run_train(tiny_train_config(epochs=1, val_metric="loss"), cap, enc,
                        RunLayout(root), refine=ref)
    assert trained.counts["train_pairs"] == len(kept)
    assert json.loads((Path(trained.path) / "config.json").read_text())["inputs"]["refine"] == ref.fingerprint
    # The same train config without the refine stage is another directory, on every caption.
    assert train.plan(tiny_train_config(epochs=1, val_metric="loss"), cap, enc,
                      RunLayout(root)).fingerprint != trained.fingerprint


def test_a_refine_stage_of_other_inputs_is_refused(tmp_path):
    import shutil

    cap, enc = refine_inputs(tmp_path / "runs")
    ref = run_refine(small(), cap, enc, RunLayout(tmp_path / "runs"))
    other = tmp_path / "other" / "encode" / ("d" * 16)   # the same files under another encode's fingerprint
    shutil.copytree(enc.dir, other)
    with pytest.raises(ValueError, match=f"made from encode {'b' * 16}, not {other}"):
        load_pairs(cap.stage_dir, StageDir.at(other), refine=ref.stage_dir)


# ---------------------------------------------------------------------- the train fingerprint
def test_without_refine_the_train_fingerprint_is_the_one_before_the_stage_existed(tmp_path):
    root = str(tmp_path / "runs")
    cap, enc = train_inputs(tmp_path / "runs")
    # Computed with the code before the refine stage (commit e81f87e) for the same inputs and config.
    assert train.plan(tiny_train_config(), cap, enc, RunLayout(root)).fingerprint == "81b7a648633c5907"
    assert train.plan(tiny_train_config(), cap, enc, RunLayout(root),
                      refine=None).fingerprint == "81b7a648633c5907"
    from pcm.stages.pipeline import resolve

    assert resolve("demo").refine.enabled is False
    assert train.plan(resolve("demo").train, cap, enc, RunLayout(root)).fingerprint == "a7811b227f0865d9"
    # `enabled` is not content: the stage's directory is the same either way.
    assert plan(RefineConfig(enabled=True), cap, enc, RunLayout(root)) == plan(RefineConfig(), cap, enc, RunLayout(root))


# ---------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_clear_errors(tmp_path):
    root = str(tmp_path / "runs")
    cap, enc = refine_inputs(tmp_path / "runs")
    empty = finished_stage(tmp_path / "other", "encode", "f" * 16)
    with pytest.raises(FileNotFoundError, match="scores.parquet"):
        run_refine(small(), cap, empty, RunLayout(root))
    with pytest.raises(ValueError, match="encode=.* is a ingest stage directory"):
        run_refine(small(), cap, cap, RunLayout(root))
    for bad in ({"keep_fraction": 0}, {"keep_fraction": 1.5}, {"k": 0}, {"i2t_k": 0}, {"method": "magic"}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            RefineConfig(**bad)
    with pytest.raises(ValueError, match="keeps none of the 8 pairs"):
        run_refine(small(keep_fraction=0.1), cap, enc, RunLayout(root))


# ---------------------------------------------------------------------- a kill mid-stage
KILLED_WRITE = """
import sys, time
import pyarrow.parquet as pq
from pcm.stages.refine import RefineConfig, run_refine
from pcm.stages.contract import load_result
from storage.layout import RunLayout
write = pq.write_table
def slow(table, where, **kw):
    write(table, where, **kw)        # the temporary is complete, not yet renamed to pairs.parquet
    print("written", flush=True)
    time.sleep(120)
pq.write_table = slow
run_refine(RefineConfig(k=4, block=3, device="cpu"), load_result(sys.argv[1]), load_result(sys.argv[2]),
           RunLayout(sys.argv[3]))
"""


def test_a_kill_while_writing_leaves_no_manifest_and_the_rerun_completes(tmp_path):
    root = str(tmp_path / "runs")
    cap, enc = refine_inputs(tmp_path / "runs")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, cap.path, enc.path, root], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sd = plan(small(), cap, enc, RunLayout(root))
    assert not manifests.PAIRS.path(sd).exists() and not sd.done_marker.exists()
    assert [p.name for p in sd.path.iterdir() if "pairs" in p.name]  # the killed writer's temporary
    result = run_refine(small(), cap, enc, RunLayout(root))
    assert not result.cached and verify(sd) is None
    assert [p.name for p in sd.path.iterdir() if "pairs" in p.name] == ["pairs.parquet"]


# ---------------------------------------------------------------------- the CLI
def test_cli_refine_and_train_refine(tmp_path, monkeypatch):
    from pcm.cli import app

    root = str(tmp_path / "runs")
    cap, enc = refine_inputs(tmp_path / "runs")
    res = CliRunner().invoke(app, ["refine", "--captions", cap.path, "--encode", enc.path, "--root", root,
                                   "--set", "method=clip-filter", "--set", "device=cpu"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "refine done (clip-filter): 7 of 10 captions kept" in res.output
    shown = CliRunner().invoke(app, ["run", "--preset", "tiny", "--show-config", "--set", "refine.enabled=true",
                                     "--set", "refine.keep_fraction=0.8"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["refine"] == RefineConfig(enabled=True, keep_fraction=0.8).model_dump(mode="json")
    bad = CliRunner().invoke(app, ["refine", "--captions", cap.path, "--encode", enc.path, "--root", root,
                                   "--set", "k=0"])
    assert bad.exit_code != 0 and "k" in str(bad.exception)


# ---------------------------------------------------------------------- in the pipeline
TINY = {"synthesize.limit": 4, "synthesize.steps": 2, "synthesize.height": 32, "synthesize.width": 32,
        "synthesize.shard_size": 2, "train.max_steps": 2, "train.val_every": 2, "train.checkpoint_every": 2,
        "train.val_metric": "loss", "train.batch_size": 2}


def test_the_pipeline_runs_refine_only_when_enabled_and_trains_on_it(tmp_path):
    from pcm.stages.pipeline import resolve, run_pipeline

    root = str(tmp_path / "runs")
    off = run_pipeline(resolve("tiny", TINY), root, stages=("train",))
    assert "refine" not in off and json.loads((Path(off["train"].path) / "config.json").read_text())["inputs"] == {
        "ingest": off["ingest"].fingerprint, "encode": off["encode"].fingerprint}
    on = run_pipeline(resolve("tiny", {**TINY, "refine.enabled": True, "refine.k": 3, "refine.device": "cpu"}), root,
                      stages=("train",))
    assert on["encode"].path == off["encode"].path and on["train"].path != off["train"].path
    assert on["train"].counts["train_pairs"] == on["refine"].counts["kept"] == 3   # floor(0.9 * 4)
    rows = manifests.PAIRS.read(on["refine"].stage_dir).to_pylist()
    scored = [r for r in rows if r["rank"] is not None]   # synthesize.limit: 4 of the training captions have images
    assert len(scored) == 4 and sorted(r["status"] for r in scored) == ["dropped"] + ["kept"] * 3
    assert all("no synthetic image" in r["reason"] for r in rows if r["rank"] is None)
    if on["refine"].counts["reassigned"]:  # random-weight CLIP: whether a caption moves is up to chance
        assert Path(on["refine"].extra["pictures"]["pairs"]).is_file()


def test_flow_caches_on_the_fingerprint_and_publishes_artifacts(tmp_path, monkeypatch, prefect_api):
    import flows.refine

    root = str(tmp_path / "runs")
    cap, enc = refine_inputs(tmp_path / "runs")
    first = flows.refine.refine_flow(small(), cap.path, enc.path, root=root)
    assert not first.cached and Path(first.extra["pictures"]["pairs"]).is_file()
    monkeypatch.setattr(flows.refine, "run_refine", lambda *a, **k: pytest.fail("stage ran again"))
    second = flows.refine.refine_flow({"preset": "tiny", "overrides": {"k": 4, "block": 3, "device": "cpu"}}, cap.path, enc.path,
                            root=root)
    assert second.path == first.path and second.counts == first.counts
