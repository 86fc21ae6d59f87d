"""What the dashboard shows: inline thumbnails in the report, no re-upload of unchanged pictures, a parent-run summary."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from PIL import Image

from flows import artifacts
from storage.layout import RunLayout
from storage.result import StageResult


def png(path: Path, size: int = 1200) -> Path:
    Image.new("RGB", (size, size // 2), (30, 120, 200)).save(path)
    return path


def test_embedded_image_is_a_small_inline_jpeg_thumbnail(tmp_path):
    md = artifacts.embedded_image(png(tmp_path / "grid.png"), "samples")
    data = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)\)", md).group(1))
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and max(img.size) == 960


def test_report_artifact_shows_its_thumbnails_and_is_not_reuploaded_when_unchanged(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda **kw: made.append(kw))
    published: set[str] = set()
    monkeypatch.setattr(artifacts, "_already_published", lambda key, digest: f"{key}:{digest}" in published)
    (tmp_path / "pictures").mkdir()
    grid = png(tmp_path / "pictures" / "samples.png")
    report = tmp_path / "report.md"
    report.write_text("# Evaluation\n\n![numbered thumbnails of the samples](pictures/samples.png)\n\n"
                      "| # | image | CIDEr | prediction | references |\n")
    artifacts.report("evaluate-test-abc-report", report, {"samples": str(grid)}, "Evaluation report")
    (body,) = [m["markdown"] for m in made]
    assert "data:image/jpeg;base64," in body and "](pictures/samples.png)" not in body
    digest = re.search(r"sha256 (\w+)", made[0]["description"]).group(1)
    published.add(f"evaluate-test-abc-report:{digest}")
    artifacts.report("evaluate-test-abc-report", report, {"samples": str(grid)}, "Evaluation report")
    assert len(made) == 1  # the same report again: nothing re-uploaded


def test_picture_skips_an_unchanged_file_and_publishes_a_changed_one(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda **kw: made.append(kw))
    seen: set[str] = set()
    monkeypatch.setattr(artifacts, "_already_published", lambda key, digest: digest in seen)
    path = png(tmp_path / "curve.png")
    artifacts.picture("train-x-loss", path, "loss")
    seen.add(re.search(r"sha256 (\w+)", made[-1]["description"]).group(1))
    artifacts.picture("train-x-loss", path, "loss")
    png(path, size=600)
    artifacts.picture("train-x-loss", path, "loss")
    assert len(made) == 2


def test_the_parent_run_summary_lists_every_stage_and_the_metrics(tmp_path):
    ev = tmp_path / "evaluate" / "ab"
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text('{"metrics": {"CIDEr": 2.676, "SPICE": "unavailable"}, "published": '
                                     '{"paper_title": "COCO", "caveat": "not comparable: different dataset"}}')
    results = {"ingest": StageResult("ingest", "aa", str(tmp_path / "ingest" / "aa"), counts={"rows": 5}, cached=True),
               "evaluate": StageResult("evaluate", "ab", str(ev), counts={"images": 3})}
    md = artifacts.pipeline_summary(results)
    assert "| ingest | reused |" in md and "| evaluate |" in md and "| CIDEr | 267.6 |" in md
    assert "not comparable: different dataset" in md and "SPICE" not in md.split("| metric")[1]


def test_the_parent_run_summary_shows_the_control_and_where_each_stage_is_with_no_machine_path(tmp_path):
    root = tmp_path / "runs"
    ev = root / "evaluate" / "ab12"
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({
        "metrics": {"CIDEr": 0.8125, "SPICE": "skipped"},
        "control": {"metrics": {"CIDEr": 0.0625}, "how": "each caption scored against another image's references"}}))
    results = {"encode": StageResult("encode", "cd34", str(root / "encode" / "cd34"), counts={"images": 2}),
               "evaluate": StageResult("evaluate", "ab12", str(ev), counts={"images": 3})}
    md = artifacts.pipeline_summary(results)
    assert "| CIDEr | 81.2 | 6.2 |" in md and "another image's references" in md
    assert "`encode/cd34/`" in md and "`evaluate/ab12/`, `evaluate/ab12/report.md`" in md
    assert str(tmp_path) not in md


def test_stage_artifacts_show_paths_relative_to_the_run_root(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda **kw: made.append(kw))
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda **kw: made.append(kw))
    monkeypatch.setattr(artifacts, "_already_published", lambda key, digest: False)
    sd = tmp_path / "runs" / "encode" / "cd34"
    (sd / "pictures").mkdir(parents=True)
    result = StageResult("encode", "cd34", str(sd), counts={"images": 2},
                         extra={"pictures": {"clip_scores": str(png(sd / "pictures" / "clip_scores.png"))}})
    artifacts.picture("encode-cd34-clip-scores", result.extra["pictures"]["clip_scores"], "histogram",
                      result.root)
    artifacts.summary_table("encode-cd34-summary", result, "counts")
    picture, table = made
    assert "`encode/cd34/pictures/clip_scores.png`" in picture["markdown"]
    assert {"name": "path", "value": "encode/cd34", "covers": "stage directory, relative to the run root"} in table["table"]
    assert str(tmp_path) not in json.dumps(made)
    assert artifacts.in_root("/elsewhere/x.png", str(tmp_path)) == "x.png"   # outside the root: the name only
    assert artifacts.in_root("s3://b/run/encode/cd34", "s3://b/run") == "encode/cd34"


def test_stage_artifact_keys_are_the_stage_and_a_short_fingerprint():
    assert artifacts.stage_key("synthesize", "0123456789abcdef", "samples") == "synthesize-01234567-samples"
    assert artifacts.stage_key("evaluate", "fedcba9876543210", "test") == "evaluate-fedcba98-test"


def test_a_stage_subflow_run_is_named_after_its_stage_directory(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client

    from flows.ingest import ingest_flow
    from pcm.stages.ingest import IngestConfig, plan

    src = tmp_path / "caps.txt"
    src.write_text("a dog on the grass\na cat on a sofa\na red car in the street\n")
    config = IngestConfig(source=str(src))
    state = ingest_flow({"source": str(src)}, root=str(tmp_path / "runs"), return_state=True)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name == f"ingest-{plan(config, RunLayout(tmp_path / 'runs')).fingerprint[:8]}"
