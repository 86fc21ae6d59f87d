"""Experiment tracking: the TensorBoard events of train and evaluate hold metrics.jsonl's and metrics.json's
numbers, a resumed run does not show a step twice, and the run name is the preset and what the overrides change."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from builders import tiny_train_config, train_inputs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from pcm import checkpoint, tracking
from pcm.stages.evaluate import write_events
from pcm.stages.pipeline import resolve
from pcm.stages.train import run_train
from storage import checkpoints, jsonl
from storage.layout import RunLayout, StageDir


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (older files' purged steps dropped)."""
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def from_jsonl(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The same tags, computed from metrics.jsonl's lines."""
    want: dict[str, list[tuple[int, float]]] = {}
    for rec in jsonl.read(path):
        if "cxe" in rec:
            for k, v in rec["cxe"].items():
                want.setdefault(f"cxe/{k}", []).append((0, v))
        elif "val" in rec:
            want.setdefault(f"val/{rec['val_metric']}", []).append((rec["step"], rec["val"]))
        else:
            for k in ("epoch", "loss", "lr", "samples_per_s", "grad_clip_share"):
                if k in rec:
                    want.setdefault(f"train/{k}", []).append((rec["step"], rec[k]))
    return want


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        for (_, a), (_, b) in zip(got[tag], want[tag], strict=True):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (tag, a, b)  # float32 in the events


@pytest.mark.heavy  # two tiny trainings (8 steps, then 4 redone)
def test_train_events_hold_metrics_jsonl_and_a_resume_purges_the_redone_steps(tmp_path):
    root = tmp_path / "runs"
    cap, enc = train_inputs(root)
    config = tiny_train_config(epochs=4, checkpoint_every=2, keep_last=100, val_every=3, run_name="tiny,train.seed=3")
    result = run_train(config, cap, enc, RunLayout(root))
    sd = result.stage_dir
    run_dir = sd.events / "tiny,train.seed=3"
    got, want = scalars(run_dir), from_jsonl(sd.metrics_log)
    assert want["train/grad_clip_share"] and all(0 < v < 1 for _, v in want["train/grad_clip_share"])
    assert [s for s, _ in want["val/loss"]] == [3, 6, 8]
    assert_same(got, want)

    # A kill after step 4's checkpoint: the later checkpoints and the marker gone, then the run resumed.
    for step, path in checkpoints.list_steps(checkpoint.checkpoints_dir(sd.path)):
        if step > 4:
            shutil.rmtree(path)
    sd.done_marker.unlink()
    resumed = run_train(config, cap, enc, RunLayout(root))
    assert resumed.counts["steps"] == 8 and resumed.fingerprint == result.fingerprint
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    assert len(files) == 2 and [p.name for p in sd.events.iterdir()] == ["tiny,train.seed=3"]
    # The second file starts by purging step 5 on (TensorBoard drops the first file's points from there) and
    # redoes only steps 5..8.
    # (Which file is the resumed run's is told by its content: two files made in one second sort by a per-process
    # counter, and "10" sorts before "9".)
    def starts(events: list) -> list[int]:
        return [e.step for e in events if e.HasField("session_log") and e.session_log.status == e.session_log.START]

    loaded = [list(EventFileLoader(str(f)).Load()) for f in files]
    resumed_files = [events for events in loaded if starts(events)]
    assert len(resumed_files) == 1 and starts(resumed_files[0]) == [5]
    assert {e.step for e in resumed_files[0] if e.HasField("summary")} == {5, 6, 7, 8}
    assert_same(scalars(run_dir), from_jsonl(sd.metrics_log))


def test_evaluate_events_hold_metrics_json_at_the_checkpoint_step_under_the_train_run_name(tmp_path):
    train = StageDir(tmp_path / "train" / ("a" * 16), "train", "a" * 16)
    (train.events / "demo,train.cxe=false").mkdir(parents=True)
    ev = StageDir(tmp_path / "evaluate" / ("b" * 16), "evaluate", "b" * 16)
    ev.path.mkdir(parents=True)
    (ev.events / "stale").mkdir(parents=True)  # a killed earlier attempt's: rewritten whole
    summary = {"split": "test", "checkpoint": {"step": 40, "which": "best"},
               "metrics": {"Bleu_4": 0.25, "CIDEr": 1.5, "SPICE": None},
               "control": {"metrics": {"CIDEr": 0.125}, "how": "x"}}
    ev.metrics.write_text(json.dumps(summary))
    write_events(ev, train, json.loads(ev.metrics.read_text()))
    assert [p.name for p in ev.events.iterdir()] == ["demo,train.cxe=false"]
    got = scalars(ev.events / "demo,train.cxe=false")
    assert got == {"test/Bleu_4": [(40, 0.25)], "test/CIDEr": [(40, 1.5)], "test_control/CIDEr": [(40, 0.125)]}


def test_run_name_is_the_preset_and_the_overrides_that_change_it():
    base = resolve("tiny")
    assert base.train.run_name == "tiny"
    same = base.train.seed
    cfg = resolve("tiny", {"train.seed": same + 3, "train.batch_size": base.train.batch_size,
                           "train.model": {"pcm": False}})
    assert cfg.train.run_name == f"tiny,train.model=_pcm_false_,train.seed={same + 3}"
    # A runtime field: the name never moves the fingerprint.
    assert cfg.train.content() == resolve("tiny", {"train.seed": same + 3, "train.model": {"pcm": False},
                                                   "train.run_name": "other"}).train.content()
    assert tracking.run_name("../x y", {"a": "b/c"}) == "x_y,a=b_c"
    assert len(tracking.run_name("p", {f"k{i}": i for i in range(100)})) == tracking.MAX_NAME
