"""The learning test: through the real stages, PCM-Net trained only on the toy diffusion model's images
captions drawn scenes it never saw far better than a language-only control, and loses that edge when
each caption is trained on another caption's image.

Small on purpose (a few hundred captions, a short training, greedy decoding): it shows that the
images carry the signal, not how good the method can get (that is bench/toyworld.py's job).
"""

from __future__ import annotations

import pytest

from pcm.pipeline import resolve, run_pipeline
from pcm.toyworld.dataset import shipped_paths
from pcm.toyworld.score import attribute_accuracy
from storage.atomic import read_json
from storage.layout import StageDir

SMALL = {"ingest.subset": 600, "synthesize.steps": 8, "train.epochs": 10, "train.warmup": 200,
         "train.val_every": 1000, "train.checkpoint_every": 1000, "train.progress_bar": False,
         "synthesize.progress_bar": False, "evaluate.beam_size": 1, "train.val_beam": 1}


def run(root, **extra) -> dict:
    r = run_pipeline(resolve("demo", SMALL | extra), str(root))
    summary = read_json(StageDir.at(r["evaluate"].path).file("metrics.json"))
    return {"cider": summary["metrics"]["CIDEr"], "control": summary["control"]["metrics"]["CIDEr"],
            "attributes": attribute_accuracy(r["evaluate"].path, r["ingest"].path, shipped_paths()[0])}


@pytest.fixture(scope="module")
def grounded(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    return root, run(root)


def test_captions_of_real_drawings_beat_the_language_only_control(grounded):
    _, m = grounded
    # The same captions scored against another image's references: what they are worth without looking.
    assert m["cider"] > 1.5 * m["control"], m
    # Sky and ground are each one of three: a captioner that looks gets most of them right.
    assert m["attributes"]["sky"] > 0.7 and m["attributes"]["ground"] > 0.7, m


def test_training_on_misaligned_images_loses_the_edge(grounded):
    root, m = grounded
    shuffled = run(root, **{"train.shuffle_images": True})
    assert shuffled["cider"] < 0.7 * m["cider"], (shuffled, m)
    assert shuffled["attributes"]["sky"] < 0.5 and shuffled["attributes"]["ground"] < 0.5, shuffled
