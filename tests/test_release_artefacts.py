"""`pcm import-checkpoint` end to end (their model, our evaluator) and the release's concept file in encode."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import encode_inputs, evaluate_inputs, tiny_encode_config, tiny_evaluate_config
from release_layout import HEADS, OUT_PERM, WORDS, inputs, ours_ids, release_model, set_dims
from typer.testing import CliRunner

from pcm import release_concepts
from pcm.clip import ClipSpec, load_clip
from storage.layout import RunLayout

TINY = ClipSpec(model="tiny", precision="fp32")


def release_files(folder, clip, seed=0):
    """A release-layout checkpoint with the tiny CLIP's shapes, its vocabulary.txt and concept pickle."""
    old = set_dims(clip.width, clip.embed_dim, clip.patches)
    try:
        m, bank = release_model(seed)
        g, feats, ids = inputs()
        with torch.no_grad():
            want = m(g, feats, ids)
    finally:
        set_dims(*old)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": m.state_dict(), "iteration": 120}, folder / "model_final.pth")
    (folder / "vocabulary.txt").write_text("\n".join(WORDS) + "\n")
    words = [f"thing{i}" for i in range(bank.shape[0])]
    with open(folder / "concepts_with_ensemble.pickle", "wb") as f:
        pickle.dump((words, bank), f)                       # as the release: (words, torch tensor)
    return {"ckpt": folder / "model_final.pth", "vocab": folder / "vocabulary.txt",
            "concepts": folder / "concepts_with_ensemble.pickle", "inputs": (g, feats, ids), "logits": want,
            "words": words, "bank": bank}


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(TINY)


def test_import_checkpoint_writes_a_train_stage_that_reproduces_the_release_logits(tmp_path, tiny_clip):
    from pcm import checkpoint
    from pcm.stages.import_checkpoint import ImportCheckpointConfig, run_import_checkpoint

    files = release_files(tmp_path / "release", tiny_clip)
    config = ImportCheckpointConfig(clip=TINY, model_preset="tiny", n_heads=HEADS)
    root = str(tmp_path / "runs")
    result = run_import_checkpoint(config, str(files["ckpt"]), str(files["vocab"]), str(files["concepts"]),
                                   RunLayout(root))
    assert result.stage == "train" and result.counts["vocabulary"] == len(WORDS) + 4
    model, vocab, meta = checkpoint.load(checkpoint.find(result.path))
    assert meta["clip"]["model"] == "tiny" and meta["concepts"] == files["words"]
    g, feats, ids = files["inputs"]
    with torch.no_grad():
        got = model(g, feats, ours_ids(ids))[..., OUT_PERM]
    torch.testing.assert_close(got, files["logits"], atol=1e-3, rtol=1e-3)   # release eps 1e-12 vs 1e-5 here
    # Cached the second time; the same files elsewhere are the same stage (content, not paths).
    again = run_import_checkpoint(config, str(files["ckpt"]), str(files["vocab"]), str(files["concepts"]),
                                  RunLayout(root))
    assert again.cached and again.path == result.path
    moved = shutil.copytree(tmp_path / "release", tmp_path / "moved")
    third = run_import_checkpoint(config, str(moved / "model_final.pth"), str(moved / "vocabulary.txt"),
                                  str(moved / "concepts_with_ensemble.pickle"), RunLayout(root))
    assert third.path == result.path


def test_import_checkpoint_command_refuses_unknown_shapes_without_a_clip(tmp_path, tiny_clip):
    from pcm.cli import app

    files = release_files(tmp_path / "release", tiny_clip)
    out = CliRunner().invoke(app, ["import-checkpoint", str(files["ckpt"]), "--vocab", str(files["vocab"]),
                                   "--concepts", str(files["concepts"]), "--root", str(tmp_path / "runs")])
    assert out.exit_code != 0
    assert "not the release's ViT-B/32 or ViT-L/14" in (out.output + str(out.exception))
    ok = CliRunner().invoke(app, ["import-checkpoint", str(files["ckpt"]), "--vocab", str(files["vocab"]),
                                  "--concepts", str(files["concepts"]), "--clip-model", "tiny",
                                  "--model-preset", "tiny", "--heads", "4", "--root", str(tmp_path / "runs")])
    assert ok.exit_code == 0, ok.output
    assert "import-checkpoint done" in ok.output and "pcm evaluate --train" in ok.output


@pytest.mark.heavy  # decoding plus the Java METEOR scorer
def test_their_model_our_evaluator(tmp_path, tiny_clip):
    from pcm.stages.evaluate import run_evaluate
    from pcm.stages.import_checkpoint import ImportCheckpointConfig, run_import_checkpoint

    run = evaluate_inputs(tmp_path / "eval")
    files = release_files(tmp_path / "release", tiny_clip)
    root = str(run["layout"].root)
    imported = run_import_checkpoint(ImportCheckpointConfig(clip=TINY, model_preset="tiny", n_heads=HEADS),
                                     str(files["ckpt"]), str(files["vocab"]), str(files["concepts"]), RunLayout(root))
    result = run_evaluate(tiny_evaluate_config(spice="off", control=False), imported, run["encode"],
                          run["captions"], RunLayout(root))
    summary = json.loads((run["layout"].stage_from_path(result.path)).metrics.read_text())
    assert summary["counts"]["images"] == 4 and summary["protocol"] == "unknown"
    assert isinstance(summary["metrics"]["CIDEr"], float)
    preds = json.loads(run["layout"].stage_from_path(result.path).predictions.read_text())
    assert all(set(p["caption"].split()) <= set(WORDS) for p in preds)   # words of the release's vocabulary


# ---------------------------------------------------------------- the concept file
def test_release_concept_file_reads_torch_numpy_and_python2_bytes(tmp_path):
    bank = torch.randn(4, 8)
    p = tmp_path / "coco400_embeddings_ViT-B32_with_ensemble.pickle"
    p.write_bytes(pickle.dumps((["dog", "cat", "man", "tennis racket"], bank)))
    words, emb = release_concepts.read(p)
    assert words == ["dog", "cat", "man", "tennis racket"]
    np.testing.assert_allclose(emb, F.normalize(bank, dim=-1).numpy(), atol=1e-6)
    p.write_bytes(pickle.dumps(([b"dog", b"cat"], np.ones((2, 8), np.float32)), protocol=2))
    assert release_concepts.read(p)[0] == ["dog", "cat"]
    p.write_bytes(pickle.dumps((["dog", "cat"], np.ones((3, 8)))))
    with pytest.raises(ValueError, match=r"shape \(3, 8\); expected \[2, D\]"):
        release_concepts.read(p)
    p.write_bytes(pickle.dumps({"dog": 1}))
    with pytest.raises(ValueError, match="expected the release's \\(words, embeddings\\) pair"):
        release_concepts.read(p)
    assert release_concepts.is_release_file(p) and not release_concepts.is_release_file(tmp_path / "words.txt")


def test_encode_takes_the_release_concepts_with_their_embeddings(tmp_path, tiny_clip):
    from pcm.stages.encode import run_encode
    from storage import manifests

    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1)
    words = ["dog", "man", "horse", "ball", "grass"]
    bank = torch.randn(len(words), tiny_clip.embed_dim)
    path = tmp_path / "coco400_embeddings_tiny_with_ensemble.pickle"
    path.write_bytes(pickle.dumps((words, bank)))
    result = run_encode(tiny_encode_config(vocabulary_file=str(path)), cap, syn,
                        RunLayout(tmp_path / "runs"))
    rows = manifests.CONCEPTS.read(result.stage_dir).to_pylist()
    assert [r["concept"] for r in rows] == words
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), F.normalize(bank, dim=-1).numpy(), atol=1e-6)
    assert dict((r["concept"], r["count"]) for r in rows)["dog"] >= 1      # counted in the captions, as a text list is
    wrong = tmp_path / "wrong_width.pickle"
    wrong.write_bytes(pickle.dumps((words, torch.randn(len(words), tiny_clip.embed_dim + 1))))
    with pytest.raises(ValueError, match="wrong_width.pickle: embeddings are"):
        run_encode(tiny_encode_config(vocabulary_file=str(wrong)), cap, syn,
                   RunLayout(tmp_path / "runs2"))
