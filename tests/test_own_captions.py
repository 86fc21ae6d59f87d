"""Own text-only captions: refused before any stage without an evaluation source, scored cross-domain on the toy
world's drawn val/test scenes with one; the checkpoint is self-contained (moved, it finds its CLIP by content or
--clip) and the Python API captions as `pcm caption` does."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pcm.cli import app
from pcm.stages.pipeline import resolve, run_pipeline
from pcm.toyworld.dataset import SHIPPED_DIR, SHIPPED_MODELS
from storage.checkpoints import CLIP

CAPTIONS = ["a red circle above a blue square near a tree", "a green triangle left of a yellow circle by a house",
            "two blue squares and a star", "a small red triangle next to a large green square and a ball",
            "a yellow circle below a red square under a cloud", "a blue circle and a green triangle on a table",
            "a star and a tree beside a house", "a ball on a table under a cloud"]
# The demo (toy text-to-image, toy CLIP) cut to seconds: the mechanics, not the scores.
FAST = {"encode.min_count": 2, "synthesize.steps": 2, "synthesize.shard_size": 16, "train.max_steps": 12, "train.warmup": 4, "train.batch_size": 8,
        "train.val_every": 6, "train.checkpoint_every": 6, "train.val_max_images": 8, "evaluate.spice": "off",
        "evaluate.report_samples": 2}
EVAL_SOURCE = {"eval_source.source": "{toyworld}/dataset_toyworld.json", "eval_source.images_root": "{toyworld}"}


def _text_only_csv(path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["caption"])
        for i in range(4):
            for c in CAPTIONS:
                w.writerow([f"{c} {'again ' * i}".strip()])
    return path


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    source = _text_only_csv(tmp / "mine.csv")
    cfg = resolve("demo", {"ingest.source": str(source), "ingest.name": "mine", "ingest.subset": None,
                           **FAST, **EVAL_SOURCE})
    return tmp, run_pipeline(cfg, str(tmp / "runs"))


def test_text_only_captions_without_an_evaluation_source_stop_before_any_stage(tmp_path):
    source = _text_only_csv(tmp_path / "mine.csv")
    cfg = resolve("demo", {"ingest.source": str(source), "ingest.subset": None, **FAST})
    with pytest.raises(ValueError, match=r"no test captions.*eval_source\.source.*eval_source\.images_root"):
        run_pipeline(cfg, str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()    # nothing ran: no stage directory, not even ingest's
    # Up to train it runs (validation is skipped, as said at the start).
    out = run_pipeline(cfg, str(tmp_path / "runs"), stages=("ingest",))
    assert out["ingest"].counts["train_captions"] == 4 * len(CAPTIONS)


def test_text_only_captions_are_scored_cross_domain_on_the_toy_world(own_run):
    _, r = own_run
    assert r["ingest"].counts["test_captions"] == 0
    assert r["eval_ingest"].counts["train_captions"] == 0 and r["eval_ingest"].counts["test_images"] == 300
    assert r["eval_encode"].extra["real_only"] and r["eval_encode"].counts["real_ok"] == 400
    assert r["train"].counts["val_images"] == 8           # validated on the toy world's val scenes
    ev = r["evaluate"]
    assert ev.extra["protocol"] == "cross-domain" and ev.counts["images"] == 300
    assert isinstance(ev.extra["metrics"]["CIDEr"], float)
    metrics = json.loads((Path(ev.path) / "metrics.json").read_text())
    assert metrics["datasets"] == {"train": "mine", "eval": "toyworld"}
    assert "cross-domain" in (Path(ev.path) / "report.md").read_text()


def _images() -> list[str]:
    return [str(SHIPPED_DIR / "images" / f"test-{i:04d}.png") for i in range(3)]


def _cli_captions(*args: str) -> list[dict]:
    res = CliRunner().invoke(app, ["caption", *args, "--device", "cpu", *_images()])
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_the_python_api_captions_as_pcm_caption_does(own_run):
    from pcm import Captioner

    _, r = own_run
    api = Captioner.from_pretrained(r["train"].path, device="cpu").caption(_images())
    assert [x["image"] for x in api] == _images() and all(x["caption"] for x in api)  # words, not empty
    assert api == _cli_captions("--checkpoint", r["train"].path)


def _moved(own_run, tmp_path: Path, **clip: object) -> Path:
    """best/ copied to another place, its clip.json naming a CLIP path that does not exist there."""
    _, r = own_run
    moved = tmp_path / "elsewhere" / "best"
    shutil.copytree(Path(r["train"].path) / "best", moved)
    record = json.loads((moved / CLIP).read_text())
    record.update({"pretrained": "local-dir:/no/such/checkout/pcm/data/toymodels/clip", **clip})
    (moved / CLIP).write_text(json.dumps({k: v for k, v in record.items() if v is not None}))
    return moved


def test_a_moved_checkpoint_finds_the_shipped_clip_by_content(own_run, tmp_path):
    _, r = own_run
    want = _cli_captions("--checkpoint", r["train"].path)
    assert _cli_captions("--checkpoint", str(_moved(own_run, tmp_path))) == want


def test_a_moved_checkpoint_of_unknown_content_names_the_clip_option_and_takes_it(own_run, tmp_path):
    _, r = own_run
    moved = _moved(own_run, tmp_path, content_id=None)    # recorded before content identities: only a path
    res = CliRunner().invoke(app, ["caption", "--checkpoint", str(moved), "--device", "cpu", *_images()])
    message = str(res.exception)  # pcm.cli.run prints it as `error: ...`
    assert res.exit_code != 0 and "--clip PATH_OR_TAG" in message and "/no/such/checkout" in message
    want = _cli_captions("--checkpoint", r["train"].path)
    assert _cli_captions("--checkpoint", str(moved), "--clip", str(SHIPPED_MODELS / "clip")) == want


def test_a_clip_override_of_other_weights_is_refused(own_run, tmp_path):
    from pcm import Captioner

    other = tmp_path / "other-clip"
    shutil.copytree(SHIPPED_MODELS / "clip", other)
    (other / "training.json").write_text("{}")             # other files: another content identity
    with pytest.raises(ValueError, match="not the CLIP this"):
        Captioner.from_pretrained(_moved(own_run, tmp_path), clip=str(other), device="cpu")
