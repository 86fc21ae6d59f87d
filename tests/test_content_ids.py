"""Fingerprints by content, not spelling: two copies of the demo's data and models, reached by absolute and
relative paths, plan every stage to the same directory; a changed model file changes it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pcm.stages import encode, evaluate, ingest, synthesize, train
from pcm.stages.pipeline import resolve
from pcm.toyworld.dataset import SHIPPED_DIR, SHIPPED_MODELS
from storage.fingerprint import dir_digest, files_manifest_digest
from storage.layout import RunLayout
from storage.result import StageResult


def _clone(where: Path) -> Path:
    """A copy of the demo's inputs (toy-world captions and images, toy models) as a second checkout would hold it."""
    shutil.copytree(SHIPPED_DIR, where / "data" / "toyworld")
    shutil.copytree(SHIPPED_MODELS, where / "data" / "toymodels")
    return where / "data"


def _demo(data: str) -> object:
    return resolve("demo", {"ingest.source": f"{data}/toyworld/dataset_toyworld.json",
                            "synthesize.model": f"{data}/toymodels/t2i",
                            "encode.clip.pretrained": f"local-dir:{data}/toymodels/clip",
                            "encode.images_root": f"{data}/toyworld"})


def _stand_in(stage: str, fp: str, root: Path) -> StageResult:
    return StageResult(stage=stage, fingerprint=fp, path=str(root / stage / fp))


def _plan_all(cfg, root: Path) -> dict[str, str]:
    """Every stage's planned fingerprint (ingest is run: encode's plan reads the image paths it lists)."""
    cap = ingest.run_ingest(cfg.ingest, RunLayout(root))
    syn = synthesize.plan(cfg.synthesize, cap, RunLayout(root))
    enc = encode.plan(cfg.encode, cap, _stand_in("synthesize", syn.fingerprint, root), RunLayout(root))
    enc_r = _stand_in("encode", enc.fingerprint, root)
    tr = train.plan(cfg.train, cap, enc_r, RunLayout(root))
    ev = evaluate.plan(cfg.evaluate, _stand_in("train", tr.fingerprint, root), enc_r, cap, RunLayout(root))
    return {"ingest": cap.fingerprint, "synthesize": syn.fingerprint, "encode": enc.fingerprint,
            "train": tr.fingerprint, "evaluate": ev.fingerprint}


def test_two_clones_and_both_spellings_give_the_same_fingerprints(tmp_path, monkeypatch):
    a, b = _clone(tmp_path / "clone-a"), _clone(tmp_path / "somewhere" / "clone-b")
    shipped = _plan_all(_demo(str(SHIPPED_DIR.parent)), tmp_path / "runs-shipped")
    from_a = _plan_all(_demo(str(a)), tmp_path / "runs-a")
    monkeypatch.chdir(tmp_path / "somewhere")
    from_b_relative = _plan_all(_demo(os.path.relpath(b)), tmp_path / "runs-b")   # clone-b/data
    assert from_a == shipped == from_b_relative


def test_a_changed_model_file_changes_the_fingerprint(tmp_path):
    data = _clone(tmp_path)
    before = _plan_all(_demo(str(data)), tmp_path / "runs")
    weights = data / "toymodels" / "clip" / "open_clip_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1                      # same size, other bytes: not what the manifest lists
    weights.write_bytes(bytes(blob))
    after = _plan_all(_demo(str(data)), tmp_path / "runs")
    assert after["synthesize"] == before["synthesize"] and after["encode"] != before["encode"]


def test_dir_digest_is_an_independent_hash_of_names_sizes_and_bytes(tmp_path):
    import hashlib

    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "a.bin").write_bytes(b"abc")
    (tmp_path / "m" / "sub" / "b.json").write_bytes(b"{}")
    (tmp_path / "m" / ".hidden").write_bytes(b"x")          # not part of the model
    lines = "".join(f"{rel}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n"
                    for rel, data in (("a.bin", b"abc"), ("sub/b.json", b"{}")))
    assert dir_digest(tmp_path / "m") == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    shutil.copytree(tmp_path / "m", tmp_path / "copy")
    assert dir_digest(tmp_path / "copy") == dir_digest(tmp_path / "m")


def test_an_image_root_is_identified_by_the_names_and_sizes_of_the_files_read(tmp_path):
    for root in ("r1", "r2"):
        (tmp_path / root).mkdir()
        (tmp_path / root / "x.jpg").write_bytes(b"12345")
    (tmp_path / "r1" / "unread.jpg").write_bytes(b"1")     # not named: not read, not part of the identity
    assert files_manifest_digest(tmp_path / "r1", ["x.jpg"]) == files_manifest_digest(tmp_path / "r2", ["x.jpg"])
    (tmp_path / "r2" / "x.jpg").write_bytes(b"123456")
    assert files_manifest_digest(tmp_path / "r1", ["x.jpg"]) != files_manifest_digest(tmp_path / "r2", ["x.jpg"])


def test_evaluate_compares_clips_by_content_not_spelling(tmp_path, monkeypatch):
    from pcm.stages.evaluate import check_clip

    monkeypatch.chdir(SHIPPED_MODELS.parent.parent.parent)               # the checkout: pcm/data/toymodels/clip
    spec = {"model": "toyworld-clip", "precision": "fp32", "pool": None}
    absolute = spec | {"pretrained": f"local-dir:{SHIPPED_MODELS / 'clip'}"}
    relative = spec | {"pretrained": "local-dir:pcm/data/toymodels/clip"}
    features = StageResult(stage="encode", fingerprint="e" * 16, path=str(tmp_path), extra={"clip": relative})
    check_clip(absolute, features)                                        # one directory, two spellings: accepted
    other = tmp_path / "other"
    shutil.copytree(SHIPPED_MODELS / "clip", other)
    (other / "training.json").write_text("{}")
    with pytest.raises(ValueError, match="--clip PATH_OR_TAG"):
        check_clip(spec | {"pretrained": f"local-dir:{other}"}, features)
