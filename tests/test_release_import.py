"""The authors' released per-image .npz CLIP features as an encode stage (encode.imported_features).

The files are written here in the release's format (np.savez_compressed(features=[N, W] float32,
g_feature=[1, D] float32), named by id) from the features this project's encode made with the tiny
CLIP; importing them must give the same feature shards, scores and real rows, and a file that differs
in shape or definition must be refused with an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import encode_inputs, tiny_encode_config

from pcm import release_features
from pcm.stages.encode import plan, run_encode
from storage import release_npz
from storage.arrays import open_arrays
from storage.layout import RunLayout, StageDir


def _shard(sd: StageDir, kind: str, i: int) -> tuple[dict, list[str]]:
    arrays, meta = open_arrays(sd.feature_shard(kind, i))
    return {k: np.array(v) for k, v in arrays.items()}, json.loads(meta["keys"])


def write_release_files(encoded: StageDir, folder: Path, n_shards: int, scale: float = 3.7) -> None:
    """The encoded features in the release's files: synthetic under img_sp0/<key>.npz, real as <int id>.npz."""
    for kind, shards, sub in (("features", range(n_shards), "img_sp0"), ("real", [0], "img")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i in shards:
            arrays, keys = _shard(encoded, kind, i)
            for r, key in enumerate(keys):
                name = key if kind == "features" else release_npz.release_id(key)
                # The release stores g unnormalised (proj(ln_post(CLS))): scale it so the import must normalise.
                np.savez_compressed(folder / sub / f"{name}.npz", features=arrays["patches"][r].astype(np.float32),
                                    g_feature=(scale * arrays["global"][r:r + 1]).astype(np.float32))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    base = tmp_path_factory.mktemp("release")
    cap, syn = encode_inputs(base / "runs", n_shards=2, per_shard=3, images_dir=base / "coco")
    own = run_encode(tiny_encode_config(images_root=str(base / "coco")), cap, syn,
                     RunLayout(base / "runs"))
    folder = base / "release_features"
    write_release_files(own.stage_dir, folder, n_shards=2)
    return {"base": base, "cap": cap, "syn": syn, "own": own, "folder": folder}


def test_imported_features_give_the_same_stage_outputs(encoded):
    e = encoded
    got = run_encode(tiny_encode_config(imported_features=str(e["folder"])), e["cap"], e["syn"],
                     RunLayout(e["base"] / "runs"))
    own, imp = e["own"].stage_dir, got.stage_dir
    assert got.path != e["own"].path                                   # another fingerprint: other inputs
    for kind, n in (("features", 2), ("real", 1)):
        for i in range(n):
            (a, ka), (b, kb) = _shard(own, kind, i), _shard(imp, kind, i)
            assert ka == kb
            np.testing.assert_allclose(b["patches"].astype(np.float32), a["patches"].astype(np.float32), atol=1e-3)
            np.testing.assert_allclose(b["global"].astype(np.float32), a["global"].astype(np.float32), atol=2e-3)
            norms = np.linalg.norm(b["global"].astype(np.float32), axis=1)
            np.testing.assert_allclose(norms, 1.0, atol=2e-3)           # normalised on import, as CLIP's g here
    from storage import manifests
    s_own = manifests.SCORES.read(own).to_pylist()
    s_imp = manifests.SCORES.read(imp).to_pylist()
    assert [r["caption_id"] for r in s_own] == [r["caption_id"] for r in s_imp]
    np.testing.assert_allclose([r["clip_score"] for r in s_imp], [r["clip_score"] for r in s_own], atol=2e-3)
    real_own = manifests.REAL.read(own).to_pylist()
    real_imp = manifests.REAL.read(imp).to_pylist()
    # The encode without the image img3 failed it; the release's files have no img3 either: failed alike.
    assert [(r["image_id"], r["status"]) for r in real_imp] == [(r["image_id"], r["status"]) for r in real_own]
    assert "no released feature file" in next(r["error"] for r in real_imp if r["status"] != "ok")
    assert got.counts["images_ok"] == e["own"].counts["images_ok"]


def test_training_runs_on_the_imported_features(encoded):
    from builders import tiny_train_config

    from pcm.stages.train import run_train

    e = encoded
    root = str(e["base"] / "runs")
    imported = run_encode(tiny_encode_config(imported_features=str(e["folder"])), e["cap"],
                          e["syn"], RunLayout(root))
    result = run_train(tiny_train_config(max_steps=3, val_every=3), e["cap"], imported, RunLayout(root))
    assert result.stage == "train" and (result.stage_dir.best / "model.safetensors").exists()


def test_the_fingerprint_sees_the_files_not_the_folder_path(encoded, tmp_path):
    e = encoded
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(e["folder"], moved)
    root = str(e["base"] / "runs")
    a = plan(tiny_encode_config(imported_features=str(e["folder"])), e["cap"], e["syn"],
             RunLayout(root))
    b = plan(tiny_encode_config(imported_features=str(moved)), e["cap"], e["syn"],
             RunLayout(root))
    assert a.fingerprint == b.fingerprint
    victim = next((moved / "img_sp0").glob("*.npz"))
    np.savez_compressed(victim, features=np.zeros((1, 1), np.float32), g_feature=np.ones((1, 1), np.float32))
    release_features._cached_index.cache_clear()
    c = plan(tiny_encode_config(imported_features=str(moved)), e["cap"], e["syn"],
             RunLayout(root))
    assert c.fingerprint != a.fingerprint
    # Unset, the option leaves the fingerprinted content as it was before it existed.
    assert "imported_features" not in tiny_encode_config().content()


def test_a_file_of_another_width_stops_the_stage_naming_it(encoded, tmp_path):
    e = encoded
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(e["folder"], bad)
    victim = sorted((bad / "img_sp0").glob("*.npz"))[1]
    with np.load(victim) as z:
        patches, g = z["features"], z["g_feature"]
    np.savez_compressed(victim, features=np.concatenate([patches, patches], axis=1), g_feature=g)
    with pytest.raises(release_features.FeatureMismatch, match=str(victim)):
        run_encode(tiny_encode_config(imported_features=str(bad)), e["cap"], e["syn"],
                   RunLayout(tmp_path / "runs"))


# -- the checks one by one, against the tiny CLIP's real patch tokens --------------------------------------
@pytest.fixture(scope="module")
def tiny_tokens(encoded):
    arrays, _ = _shard(encoded["own"].stage_dir, "features", 0)
    head, _ = open_arrays(encoded["own"].stage_dir.clip_head)
    head = {k: np.array(v, dtype=np.float32) for k, v in head.items()}
    patches = arrays["patches"][0].astype(np.float32)
    g = arrays["global"][0].astype(np.float32)
    return patches, g, head


def _dims(patches, g):
    return (g.shape[0], patches.shape[0], patches.shape[1])


def test_pre_ln_post_tokens_pass_and_ln_post_outputs_are_refused(tiny_tokens):
    patches, g, head = tiny_tokens
    dims, grid = _dims(patches, g), int(round(patches.shape[0] ** 0.5))
    release_features.check_features(Path("ok.npz"), patches, g, dims, grid, head)   # the definition: passes
    mu, sd = patches.mean(1, keepdims=True), patches.std(1, keepdims=True)
    normed = (patches - mu) / np.sqrt(sd ** 2 + 1e-5) * head["ln_post.weight"] + head["ln_post.bias"]
    with pytest.raises(release_features.FeatureMismatch, match="x.npz: .*already layer-normalised by ln_post"):
        release_features.check_features(Path("x.npz"), normed, g, dims, grid, head)
    # float16 files (half the size) are judged with float16's rounding in mind
    with pytest.raises(release_features.FeatureMismatch, match="ln_post"):
        release_features.check_features(Path("x.npz"), normed.astype(np.float16), g, dims, grid, head)


def test_projected_unpooled_and_foreign_shapes_are_refused(tiny_tokens):
    patches, g, head = tiny_tokens
    D, P, W = _dims(patches, g)
    grid = int(round(P ** 0.5))
    # The tiny CLIP's D equals its W; a head projecting to 48 stands for ViT-B/32's 768 -> 512.
    projected = patches @ head["proj"][:, :48]                                      # [P, 48]
    with pytest.raises(release_features.FeatureMismatch, match="p.npz: .*projected"):
        release_features.check_features(Path("p.npz"), projected, g[:48], (48, P, W), grid, head)
    # A spec pooling the grid to 1x1 meets a file with the whole grid: named as unpooled.
    with pytest.raises(release_features.FeatureMismatch, match=rf"u.npz: {P} patches = the unpooled {grid}x{grid}"):
        release_features.check_features(Path("u.npz"), patches, g, (D, 1, W), grid, head)
    with pytest.raises(release_features.FeatureMismatch, match="g.npz: global feature has shape"):
        release_features.check_features(Path("g.npz"), patches, g[:-1], (D, P, W), grid, head)


def test_release_npz_reader_refuses_malformed_files(tmp_path):
    good = tmp_path / "1.npz"
    np.savez_compressed(good, features=np.ones((4, 3), np.float32), g_feature=np.ones((1, 2), np.float32))
    patches, g = release_npz.read(good)
    assert patches.shape == (4, 3) and g.shape == (2,)
    wrong_keys = tmp_path / "2.npz"
    np.savez_compressed(wrong_keys, att=np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"2.npz: expected arrays 'features' and 'g_feature'.*\['att'\]"):
        release_npz.read(wrong_keys)
    ints = tmp_path / "3.npz"
    np.savez_compressed(ints, features=np.ones((4, 3), np.int64), g_feature=np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="3.npz: 'features' has dtype int64"):
        release_npz.read(ints)
    objects = tmp_path / "4.npz"
    np.savez_compressed(objects, features=np.array([{"a": 1}], dtype=object), g_feature=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="4.npz"):
        release_npz.read(objects)
    nan = tmp_path / "5.npz"
    np.savez_compressed(nan, features=np.full((4, 3), np.nan, np.float32), g_feature=np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="5.npz: non-finite"):
        release_npz.read(nan)
    (tmp_path / "6.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="6.npz: not a readable .npz"):
        release_npz.read(tmp_path / "6.npz")


def test_the_index_matches_release_ids_and_refuses_duplicates(tmp_path):
    (tmp_path / "a_sp0").mkdir()
    (tmp_path / "a_sp1").mkdir()
    np.savez_compressed(tmp_path / "a_sp0" / "391895.npz", features=np.ones((1, 1)), g_feature=np.ones(1))
    idx = release_npz.index(tmp_path)
    assert idx.find("COCO_val2014_000000391895") == tmp_path / "a_sp0" / "391895.npz"
    assert idx.find("val2014/COCO_val2014_000000391895.jpg") == tmp_path / "a_sp0" / "391895.npz"
    assert idx.find("nothing", None) is None
    np.savez_compressed(tmp_path / "a_sp1" / "391895.npz", features=np.ones((1, 1)), g_feature=np.ones(1))
    with pytest.raises(ValueError, match="same name"):
        release_npz.index(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        release_npz.index(tmp_path / "missing")
