"""Train-stage recovery: best/ after a kill, stale temporaries, and checkpoint config errors that name the key."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from builders import child_env, tiny_train_config, train_inputs

from pcm import checkpoint
from pcm.stages.train import run_train, verify
from storage import atomic, checkpoints
from storage.layout import RunLayout, StageDir

# Runs the train stage, SIGKILLed the moment it starts writing best/ for `kill_step` (the step
# checkpoint of that step is already on disk): the moment a kill leaves best/ behind the checkpoint.
KILL_AT_BEST = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from pcm import checkpoint
from pcm.stages.train import TrainConfig, run_train
from pcm.stages.contract import load_result
from storage.layout import RunLayout

kill_step = int(sys.argv[5])
real_save = checkpoint.save

def save(path, **kw):
    if Path(path).name == "best" and kw["state"]["step"] == kill_step:
        step_dir = checkpoint.checkpoints_dir(Path(path).parent) / f"step-{kill_step:08d}"
        assert step_dir.is_dir(), step_dir
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(path, **kw)

checkpoint.save = save
run_train(TrainConfig.model_validate_json(sys.argv[1]), load_result(sys.argv[2]), load_result(sys.argv[3]),
          RunLayout(sys.argv[4]))
"""


def best_step_held(sd: Path) -> int:
    return atomic.read_json(checkpoint.best_dir(sd) / "state.json")["step"]


# ---------------------------------------------------------------------- 3: best/ after a kill
@pytest.mark.heavy
def test_kill_right_after_the_best_step_checkpoint_then_rerun_writes_best_from_it(tmp_path):
    config = tiny_train_config(epochs=8, val_every=4, checkpoint_every=4, keep_last=8)   # 16 steps, val at 4, 8, 12, 16
    cap, enc = train_inputs(tmp_path / "ref")
    ref = run_train(config, cap, enc, RunLayout(tmp_path / "ref"))
    assert ref.extra["best_step"] == 16, "the test needs the final validation to be the best"

    root = tmp_path / "killed"
    cap2, enc2 = train_inputs(root)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_BEST, config.model_dump_json(), cap2.path, enc2.path,
                           str(root), "16"],
                          env=child_env(), stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    sd = root / "train" / ref.fingerprint
    assert checkpoints.latest(checkpoint.checkpoints_dir(sd)).name == "step-00000016"
    assert best_step_held(sd) < 16, "the kill should leave best/ at an earlier validation"

    resumed = run_train(config, cap2, enc2, RunLayout(root))
    assert resumed.extra["best_step"] == 16
    assert best_step_held(sd) == 16, "stage.done.json names step 16 but best/ holds another step"
    assert verify(StageDir.at(sd)) is None
    for name in ("model.safetensors", "config.json", "state.json"):
        assert (checkpoint.best_dir(sd) / name).read_bytes() == (checkpoint.best_dir(ref.path) / name).read_bytes(), name
    _, _, meta = checkpoint.load(checkpoint.find(sd, "best"))
    assert meta["step"] == 16


def test_a_new_best_is_checkpointed_before_best_is_written(tmp_path, monkeypatch):
    writes: list[tuple[str, int]] = []
    real = checkpoint.save

    def save(path, **kw):
        writes.append((Path(path).name, kw["state"]["step"]))
        real(path, **kw)

    monkeypatch.setattr(checkpoint, "save", save)
    cap, enc = train_inputs(tmp_path / "runs")
    run_train(tiny_train_config(epochs=4, val_every=3, checkpoint_every=5, keep_last=8), cap, enc,
              RunLayout(tmp_path / "runs"))
    bests = [i for i, (name, _) in enumerate(writes) if name == "best"]
    assert bests, writes
    for i in bests:
        step = writes[i][1]
        assert (checkpoints.step_name(step), step) in writes[:i], f"best/ of step {step} written with no checkpoint " \
            f"recording it: {writes}"


def test_verify_flags_a_best_that_holds_another_step_and_the_rerun_repairs_it(tmp_path):
    cap, enc = train_inputs(tmp_path / "runs")
    config = tiny_train_config(epochs=8, val_every=4, checkpoint_every=4, keep_last=8)
    result = run_train(config, cap, enc, RunLayout(tmp_path / "runs"))
    sd, best = result.stage_dir, checkpoint.best_dir(result.path)
    good = (best / "model.safetensors").read_bytes()
    step = result.extra["best_step"]
    other = 4 if step != 4 else 8
    old = checkpoints.list_steps(checkpoint.checkpoints_dir(sd.path))
    shutil.rmtree(best)
    shutil.copytree(dict(old)[other], best)             # best/ as an earlier step's weights
    (best / "optimizer.safetensors").unlink()
    atomic.write_json(best / "state.json", {"step": other, "epoch": 0, "best": {"step": other}})
    assert verify(sd) == f"best/ holds step {other}, not the best step {step}"

    again = run_train(config, cap, enc, RunLayout(tmp_path / "runs"))   # verify fails, so the stage resumes and repairs
    assert not again.cached and again.extra["best_step"] == step
    assert best_step_held(sd.path) == step and (best / "model.safetensors").read_bytes() == good
    assert verify(sd) is None

    marker = atomic.read_json(sd.done_marker)
    marker["extra"]["best_step"] = other
    atomic.write_json(sd.done_marker, marker)
    assert verify(sd) == f"stage.done.json says best step {other} but {checkpoints.step_name(16)} says {step}"


# ---------------------------------------------------------------------- 13a: stale temporaries
def _plant(sd: Path) -> tuple[list[Path], list[Path]]:
    """Temporaries killed writers leave (to be removed) and entries that must survive."""
    old = time.time() - 3600
    stale_files = [sd / ".tmp-config.json.k1ll3d00", sd / ".tmp-metrics.jsonl.abcdefgh",
                   sd / ".tmp-stage.done.json.zz_zz_zz", sd / "pictures" / ".tmp-loss_curve.png.q1w2e3r4"]
    stale_dirs = [sd / ".tmp-best.x8y7z6w5", sd / "checkpoints" / ".tmp-step-00000016.a1b2c3d4",
                  sd / "checkpoints" / ".tmp-step-00000020.zzzzzzzz", sd / ".old-best.4242"]
    for d in stale_dirs:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half written")
        (d / ".tmp-config.json.inside00").write_text("{")
    for f in stale_files:
        f.write_text("{half")
    for p in stale_files + stale_dirs:
        os.utime(p, (old, old))
    keep = [sd / ".tmp-config.json.fresh000",     # a concurrent plan() writing config.json right now
            sd / ".tmp-config.json.bak.abcdefgh",  # another file's temporary
            sd / "notes.txt"]
    for f in keep:
        f.write_text("keep")
    return stale_files + stale_dirs, keep


def _outputs(sd: Path) -> dict[str, bytes]:
    best = checkpoint.best_dir(sd)
    return {"config": (sd / "config.json").read_bytes(), "best": (best / "model.safetensors").read_bytes(),
            "latest": (checkpoints.latest(sd / "checkpoints") / "model.safetensors").read_bytes()}


@pytest.mark.parametrize("finished", [False, True], ids=["killed-before-finish", "finished"])
def test_train_removes_its_stale_temporaries_when_it_starts(tmp_path, finished):
    cap, enc = train_inputs(tmp_path / "runs")
    config = tiny_train_config(epochs=8, val_every=4, checkpoint_every=4)
    result = run_train(config, cap, enc, RunLayout(tmp_path / "runs"))
    sd = Path(result.path)
    before = _outputs(sd)
    if not finished:
        (sd / "stage.done.json").unlink()   # a kill after the last checkpoint, before the marker
    stale, keep = _plant(sd)

    again = run_train(config, cap, enc, RunLayout(tmp_path / "runs"))
    assert again.cached is finished
    assert [p for p in stale if p.exists() or p.is_symlink()] == []
    assert all(p.exists() for p in keep)
    assert _outputs(sd) == before and verify(StageDir.at(sd)) is None
    assert sorted(p.name for p in (sd / "checkpoints").iterdir()) == ["step-00000012", "step-00000016"]
    assert checkpoint.load(checkpoint.find(sd, "best"))[2]["step"] == result.extra["best_step"]


def test_caption_out_removes_stale_temporaries_of_its_file_only(tmp_path):
    from pcm.caption import write_captions

    out = tmp_path / "captions.jsonl"
    stale = [tmp_path / ".tmp-captions.jsonl.a1b2c3d4", tmp_path / ".tmp-captions.jsonl.zz__zz99"]
    other = [tmp_path / ".tmp-captions.jsonl.bak.a1b2c3d4", tmp_path / ".tmp-other.jsonl.a1b2c3d4"]
    for p in stale + other:
        p.write_text('{"half')
    rows = [{"image": "a.jpg", "caption": "a dog"}, {"image": "b.jpg", "error": "OSError: bad"}]
    assert write_captions(out, iter(rows)) == (2, 1)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert not [p for p in stale if p.exists()] and all(p.exists() for p in other)


def test_caption_out_spares_a_live_writers_temporary(tmp_path):
    from pcm.caption import _output_lock, remove_stale_temporaries

    out = tmp_path / "captions.jsonl"
    live = tmp_path / ".tmp-captions.jsonl.l1vel1ve"
    live.write_text("being written")
    with _output_lock(out):                    # a writer holds the output's lock while its temporary exists
        t = threading.Thread(target=remove_stale_temporaries, args=(out,))
        t.start()
        time.sleep(0.5)
        assert live.exists()
    t.join(timeout=10)
    assert not t.is_alive() and not live.exists()   # once that writer is gone, its leftover goes


# ---------------------------------------------------------------------- 12a: checkpoint config errors
@pytest.fixture(scope="module")
def trained_best(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    cap, enc = train_inputs(root)
    result = run_train(tiny_train_config(epochs=2), cap, enc, RunLayout(root))
    return checkpoint.find(result.path, "best")


def _edit_model(key, value):
    def edit(cfg):
        cfg["model"][key] = value
        return cfg
    return edit


def _drop_model(key):
    def edit(cfg):
        del cfg["model"][key]
        return cfg
    return edit


CONFIG_CASES = {
    "extra-model-key": (_edit_model("topk", 3), r"model\.topk: Extra inputs are not permitted \(got 3\)"),
    "extra-top-key": (lambda c: {**c, "trian": {}}, r"trian: unknown key \(known: model, train\)"),
    "wrong-type": (_edit_model("top_k", "five"), r"model\.top_k: Input should be a valid integer.*\(got \"five\"\)"),
    "out-of-range": (_edit_model("top_k", -1), r"model\.top_k: Input should be greater than 0 \(got -1\)"),
    "list-not-object": (lambda c: [c["model"], c["train"]], r"expected a JSON object with keys \['model', 'train'\] "
                        r"\(got a list"),
    "model-is-a-list": (lambda c: {**c, "model": list(c["model"])}, r"model: expected an object \(got a list"),
    "missing-model": (lambda c: {"train": c["train"]}, r"config\.json: model: missing$"),
    "missing-model-key": (_drop_model("d_model"), r"model\.d_model: missing"),
    "null-shape": (_edit_model("d_embed", None), r"model\.d_embed: missing"),
    "weights-do-not-fit": (_edit_model("d_model", 32), r"model\.safetensors: the weights do not fit the model in "
                           r".*config\.json"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_bad_checkpoint_config_is_one_error_naming_the_file_and_key(trained_best, tmp_path, case):
    edit, pattern = CONFIG_CASES[case]
    ckpt = tmp_path / "best"
    shutil.copytree(trained_best, ckpt)
    atomic.write_json(ckpt / "config.json", edit(atomic.read_json(ckpt / "config.json")))
    with pytest.raises(ValueError) as e:
        checkpoint.load(ckpt)
    assert e.type is ValueError, f"not a plain error: {e.type.__name__}"   # pydantic's ValidationError is a ValueError
    message = str(e.value)
    assert str(ckpt) in message and "\n" not in message, message
    assert e.value.__cause__ is None and (e.value.__suppress_context__ or e.value.__context__ is None), "chained"
    assert re.search(pattern, message), message


@pytest.mark.bad_input
def test_a_bad_checkpoint_state_names_the_file(trained_best, tmp_path):
    ckpt = tmp_path / "best"
    shutil.copytree(trained_best, ckpt)
    for bad, pattern in (([1, 2], r"state\.json: expected a JSON object \(got a list"),
                         ({"epoch": 0}, r"state\.json: step: missing"),
                         ({"step": "7"}, r"state\.json: step: expected an integer \(got \"7\"\)")):
        atomic.write_json(ckpt / "state.json", bad)
        with pytest.raises(ValueError, match=pattern):
            checkpoint.load(ckpt)


def test_checkpoints_record_the_same_rng_states_on_every_run(tmp_path):
    """A fresh run seeds Python's and NumPy's global RNGs with torch's, so the states a checkpoint records (and a
    resume restores) are a function of the seed, not of whatever the process held: state.json is the same bytes."""
    import random

    import numpy as np

    cap, enc = train_inputs(tmp_path / "runs")
    states = []
    for i, root in enumerate(("a", "b")):
        random.seed(100 + i)      # the process's global RNGs differ before each run
        np.random.seed(100 + i)
        result = run_train(tiny_train_config(epochs=1, val_metric="loss"), cap, enc, RunLayout(tmp_path / root))
        latest = checkpoints.latest(result.stage_dir.checkpoints)
        states.append(json.loads((latest / "state.json").read_text()))
    assert states[0]["rng"] == states[1]["rng"]  # though the two runs began from different global states
