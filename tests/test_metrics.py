"""The stage's metrics equal COCOEvalCap's on the same files; hand-checked BLEU and CIDEr; SPICE absent offline."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import os

import pytest

from pcm import metrics
from pcm.metrics import score_captions, spice_missing

REFERENCES = {
    "1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
          "Man on a surfboard riding an ocean wave."],
    "2": ["Two dogs play with a frisbee in the park.", "A pair of dogs running on the grass.",
          "Dogs chasing a flying disc on a lawn.", "Two brown dogs playing outside."],
    "3": ["A plate of food with broccoli and rice.", "Rice, chicken and broccoli on a white plate."],
    "4": ["A red bus parked on the side of the street.", "A double decker bus on a city road.",
          "The bus is stopped near the curb."],
    "5": ["A cat sleeping on a laptop keyboard.", "A kitten lying on a computer."],
}
PREDICTIONS = {
    "1": "a man riding a wave on a surfboard",
    "2": "Two dogs playing with a frisbee!",
    "3": "a plate of food with broccoli",
    "4": "a bus parked on the street",
    "5": "a dog sitting on a couch",
}


@pytest.fixture
def meteor():
    """This process's kept METEOR (`shared_meteor`: a fresh one loads its tables, 6-15 CPU-s here, and the
    evaluate and learning tests on this xdist worker reuse it); test_one_meteor_process_scores_like_a_fresh_one_each_time
    shows that a kept process scores like a fresh one."""
    return metrics.shared_meteor()


class FakeSpice:
    """Stands in for SPICE inside COCOEvalCap when its jars are absent (it would try to download them)."""

    def compute_score(self, gts, res):
        return 0.0, [{"All": {"f": 0.0}} for _ in gts]

    def method(self):
        return "SPICE"


def coco_eval_direct(tmp_path, predictions, references, monkeypatch):
    """COCOEvalCap run the standard way: annotation JSON + results JSON loaded with pycocotools."""
    import pycocoevalcap.eval
    from pycocotools.coco import COCO

    ann = {"images": [{"id": int(k)} for k in references], "annotations": [], "type": "captions",
           "info": {}, "licenses": []}
    for k, refs in references.items():
        for r in refs:
            ann["annotations"].append({"id": len(ann["annotations"]) + 1, "image_id": int(k), "caption": r})
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": int(k), "caption": c} for k, c in predictions.items()]))
    if spice_missing():
        monkeypatch.setattr(pycocoevalcap.eval, "Spice", FakeSpice)
    # COCOEvalCap's own pipeline (its tokenisation, its scorers, its averaging) on this process's kept METEOR
    # rather than a process of its own, which would load METEOR's tables once more.
    monkeypatch.setattr(pycocoevalcap.eval, "Meteor", metrics.shared_meteor)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "ann.json"))
        ev = pycocoevalcap.eval.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
        ev.evaluate()
    return ev


@pytest.mark.heavy  # the Java scorers (METEOR, the PTB tokenizer, SPICE when installed), twice
def test_equals_coco_eval_cap_on_the_same_files(tmp_path, monkeypatch, meteor):
    corpus, per_image = score_captions(PREDICTIONS, REFERENCES, spice="auto", meteor=meteor)
    ev = coco_eval_direct(tmp_path, PREDICTIONS, REFERENCES, monkeypatch)
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert corpus[key] == pytest.approx(ev.eval[key], abs=1e-12), key
    for k in REFERENCES:
        theirs = ev.imgToEval[int(k)]
        assert per_image[k]["bleu4"] == pytest.approx(theirs["Bleu_4"], abs=1e-12)
        assert per_image[k]["meteor"] == pytest.approx(theirs["METEOR"], abs=1e-12)
        assert per_image[k]["rouge_l"] == pytest.approx(theirs["ROUGE_L"], abs=1e-12)
        assert per_image[k]["cider"] == pytest.approx(theirs["CIDEr"], abs=1e-12)
    # Sanity: the fixture is neither perfect nor empty, so equality above means something.
    assert 0.2 < corpus["CIDEr"] < 5 and 0.1 < corpus["Bleu_4"] < 0.9
    if spice_missing():
        assert str(corpus["SPICE"]).startswith("unavailable: ") and "stanford-corenlp-3.6.0" in corpus["SPICE"]
        assert all("spice" not in s for s in per_image.values())
    else:
        assert corpus["SPICE"] == pytest.approx(ev.eval["SPICE"], abs=1e-9)


@pytest.mark.heavy  # the Java scorers (the PTB tokenizer, METEOR)
def test_hand_checked_bleu_and_cider(meteor):
    # Identical candidate and reference: every BLEU is 1. With two images of disjoint words each
    # n-gram has document frequency 1 of 2, so idf = log 2 for all; the TF-IDF vectors are equal,
    # each n-gram cosine is 1 with no length penalty, and CIDEr-D = 10 * mean(1, 1, 1, 1) = 10.
    preds = {"a": "the quick brown fox jumps", "b": "seven red apples lie here"}
    refs = {k: [v] for k, v in preds.items()}
    corpus, per_image = score_captions(preds, refs, spice="off", meteor=meteor)
    for n in range(1, 5):
        assert corpus[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert corpus["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    assert per_image["a"]["cider"] == pytest.approx(10.0, abs=1e-9)
    assert corpus["ROUGE_L"] == pytest.approx(1.0)
    assert corpus["SPICE"] == "skipped: spice=off"

    # "dog runs on grass" vs "dog runs on sand", same length (brevity penalty 1):
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1.
    corpus, _ = score_captions({"x": "Dog runs on grass."}, {"x": ["dog runs on sand"]}, spice="off", meteor=meteor)
    assert corpus["Bleu_1"] == pytest.approx(0.75, abs=1e-6)
    assert corpus["Bleu_2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-6)
    assert corpus["Bleu_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-6)
    assert corpus["Bleu_4"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.heavy  # the Java scorers (the PTB tokenizer, METEOR)
def test_spice_unavailable_is_reported_and_on_is_an_error(monkeypatch, tmp_path, meteor):
    monkeypatch.setattr(metrics, "spice_lib_dir", lambda: tmp_path)  # a lib directory without the jars
    corpus, per_image = score_captions({"x": "a dog"}, {"x": ["a dog runs"]}, spice="auto", meteor=meteor)
    # The folder by its place in the package, never this machine's path (the message is shown and shared).
    assert corpus["SPICE"].startswith("unavailable: ") and f"{tmp_path.parent.name}/{tmp_path.name}" in corpus["SPICE"]
    assert str(tmp_path) not in corpus["SPICE"]
    assert corpus["CIDEr"] == pytest.approx(0.0) and corpus["Bleu_1"] > 0  # the others still computed
    with pytest.raises(RuntimeError, match="spice=on.*stanford-corenlp-3.6.0"):
        score_captions({"x": "a dog"}, {"x": ["a dog runs"]}, spice="on", meteor=meteor)


def test_missing_java_and_bad_inputs_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="no references"):
        score_captions({"x": "a dog", "y": "a cat"}, {"x": ["a dog"]})
    with pytest.raises(ValueError, match="no prediction"):
        score_captions({"x": "a dog"}, {"x": ["a dog"], "z": ["a cat"]})
    with pytest.raises(ValueError, match="non-empty reference"):
        score_captions({"x": "a dog"}, {"x": [""]})
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="openjdk-17-jre-headless"):
        score_captions({"x": "a dog"}, {"x": ["a dog"]})


@pytest.mark.heavy  # the full scorer runs on Java (the PTB tokenizer, METEOR)
def test_cider_alone_equals_the_full_scorer(meteor):
    from pcm.metrics import score_cider

    preds = {"1": "a man riding a horse", "2": "two dogs on the grass", "3": "a red bus"}
    refs = {"1": ["a man rides a horse", "a person on a horse"], "2": ["two dogs play on grass", "dogs on a lawn"],
            "3": ["a red double-decker bus", "a bus on the street"]}
    corpus, _ = score_captions(preds, refs, spice="off", meteor=meteor)
    assert score_cider(preds, refs) == pytest.approx(corpus["CIDEr"], abs=1e-12)


@pytest.mark.heavy  # the Java scorers
def test_one_meteor_process_scores_like_a_fresh_one_each_time(meteor):
    other = dict(zip(REFERENCES, list(REFERENCES.values())[1:] + list(REFERENCES.values())[:1], strict=True))
    fresh, processes = [], []
    for refs in (REFERENCES, other):  # a process each
        with metrics.meteor_process() as own:
            fresh.append(score_captions(PREDICTIONS, refs, spice="off", meteor=own))
            processes.append(own.meteor_p)
            assert own.meteor_p.poll() is None
        assert processes[-1].poll() is not None  # stopped on leaving the block
    # This process's kept METEOR has scored the other tests' captions before (when they ran first) and these twice.
    shared = [score_captions(PREDICTIONS, refs, spice="off", meteor=meteor) for refs in (REFERENCES, other, REFERENCES)]
    assert shared == [fresh[0], fresh[1], fresh[0]]  # equal floats, per image too
    assert fresh[0][0]["METEOR"] != fresh[1][0]["METEOR"]  # the two reference sets do score differently


@pytest.mark.heavy  # the Java scorer
def test_the_shared_meteor_is_kept_per_process_replaced_when_dead_and_never_a_parents():
    first = metrics.shared_meteor()
    assert metrics.shared_meteor() is first and first.meteor_p.poll() is None
    score_captions(PREDICTIONS, REFERENCES, spice="off")          # the default scorer: still the same process
    assert metrics.shared_meteor() is first
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child holds no scorer: its first score starts its own, never uses its parent's pipes
        try:
            os.close(read)
            os.write(write, b"own" if metrics._SHARED.get(os.getpid()) is None else b"parent's")
            atexit._run_exitfuncs()  # a child that exits normally runs the exit handlers it inherited
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"own"
    os.close(read)
    assert first.meteor_p.poll() is None                          # the child left the parent's process alone
    score_captions(PREDICTIONS, REFERENCES, spice="off")          # and its pipes work
    metrics._stop(first)                                          # died: the next score starts another
    again = metrics.shared_meteor()
    assert again is not first and again.meteor_p.poll() is None


def test_the_spice_message_names_the_jars_folder_without_this_machines_path(tmp_path, monkeypatch):
    lib = tmp_path / "site-packages" / "pycocoevalcap" / "spice" / "lib"
    lib.mkdir(parents=True)
    monkeypatch.setattr(metrics, "spice_lib_dir", lambda: lib)
    message = spice_missing()
    assert message.startswith("Stanford CoreNLP 3.6.0 jars missing from pycocoevalcap/spice/lib ")
    assert "stanford-corenlp-3.6.0.jar" in message and str(tmp_path) not in message
