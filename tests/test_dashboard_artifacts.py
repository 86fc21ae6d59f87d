"""What the dashboard shows: inline thumbnails in the report, no re-upload of unchanged pictures, a parent-run summary."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

from flows import artifacts
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
