"""Numbers that must not mislead: the paper's scores beside another dataset's, and timings of reused stages."""

from __future__ import annotations

import json
import time

import pytest

from pcm.report import published_block, published_caveat, published_datasets, render
from storage.result import StageResult

CORPUS = {"Bleu_1": 0.5, "Bleu_2": 0.4, "Bleu_3": 0.3, "Bleu_4": 0.2, "METEOR": 0.2, "ROUGE_L": 0.4,
          "CIDEr": 0.9, "SPICE": "skipped: spice=off"}


def summary(eval_name: str | None, published: dict | None, split: str = "test") -> dict:
    return {"metrics": CORPUS, "split": split, "protocol": "in-domain",
            "datasets": {"train": eval_name, "eval": eval_name},
            "checkpoint": {"which": "best", "step": 5, "path": "/x/best"},
            "decoding": {"beam_size": 3, "max_len": 20, "length_penalty": 0.0},
            "counts": {"images": 4, "references": 8, "failed_encode": 0, "not_encoded": 0},
            "failed_images": [], "not_encoded": [], "published": published, "control": None}


def test_published_settings_name_their_datasets():
    assert published_datasets("coco-vitl14") == ("coco", "coco")
    assert published_datasets("coco-to-flickr30k-vitb32") == ("coco", "flickr30k")
    assert published_datasets("flickr30k-to-coco-vitl14") == ("flickr30k", "coco")
    assert published_caveat("coco-vitl14", train="coco", evaluated="coco", split="test") is None
    assert "different split" in published_caveat("coco-vitl14", train="coco", evaluated="coco", split="val")
    assert "different training dataset" in published_caveat("coco-to-flickr30k-vitl14", train="flickr30k",
                                                             evaluated="flickr30k", split="test")


@pytest.mark.parametrize("dataset", ["toyworld", "demo"])
def test_paper_numbers_on_another_dataset_are_labelled_not_comparable(dataset):
    block = published_block(CORPUS, "coco-vitl14", train=dataset, evaluated=dataset, split="test")
    assert block["comparable"] is False
    assert block["caveat"].startswith("not comparable: different dataset") and dataset in block["caveat"]
    assert "not comparable: different dataset" in block["title"]          # the dashboard table's description
    cider = next(r for r in block["rows"] if r["metric"] == "CIDEr")
    assert cider["published"] == 113.6 and cider["difference"] is None and "not comparable" in cider["note"]

    report = render(summary(dataset, block), [], None)
    section = report.split("## The paper's numbers, for reference only")[1]
    assert "Not comparable: different dataset" in section and "113.6" in section
    assert "| difference |" not in section and "Compared with the paper" not in report


def test_paper_numbers_on_the_papers_dataset_keep_the_comparison():
    block = published_block(CORPUS, "coco-vitl14", train="coco", evaluated="coco", split="test")
    assert block["comparable"] is True and block["caveat"] is None and block["title"] == "COCO in-domain, ViT-L/14"
    cider = next(r for r in block["rows"] if r["metric"] == "CIDEr")
    assert cider["difference"] == round(90.0 - 113.6, 1) and "note" not in cider
    report = render(summary("coco", block), [], None)
    assert "## Compared with the paper: COCO in-domain, ViT-L/14" in report and "| difference |" in report
    assert "not comparable" not in report.lower()


def test_demo_prints_the_paper_numbers_with_the_caveat(tmp_path, capsys):
    from flows.demo import print_results
    from storage.layout import RunLayout

    sd = RunLayout(tmp_path).stage("evaluate", "0123456789abcdef")
    sd.path.mkdir(parents=True)
    block = published_block(CORPUS, "coco-vitl14", train="toyworld", evaluated="toyworld", split="test")
    sd.metrics.write_text(json.dumps(summary("toyworld", block)))
    sd.predictions.write_text(json.dumps([{"image_id": 1, "caption": "a red circle"}]))
    print_results(sd)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "113.6" in x)
    assert "not comparable: different dataset" in line and "toyworld" in line

    # a metrics.json written before the label: the demo works it out itself
    old = {"setting": "coco-vitl14", "title": "COCO in-domain, ViT-L/14", "protocol": "in-domain",
           "rows": [{"metric": "CIDEr", "measured": 90.0, "published": 113.6, "difference": -23.6}]}
    sd.metrics.write_text(json.dumps(summary("toyworld", old)))
    print_results(sd)
    line = next(x for x in capsys.readouterr().out.splitlines() if "113.6" in x)
    assert "not comparable: different dataset" in line and "-23.6" not in line


@pytest.fixture
def captured(monkeypatch):
    import flows.artifacts as artifacts

    tables = []
    monkeypatch.setattr(artifacts, "create_table_artifact",
                        lambda **kw: tables.append(kw))
    return tables


def _synthesize_result(tmp_path, cached: bool) -> StageResult:
    sd = tmp_path / "runs" / "synthesize" / ("e" * 16)
    sd.mkdir(parents=True)
    r = StageResult("synthesize", "e" * 16, str(sd), {"captions": 201, "ok": 201},
                    {"total_s": 0.517, "generate_s": 321.0, "images_per_s": 0.626})
    r.save(sd / "stage.done.json")
    return StageResult(**{**r.to_dict(), "cached": cached})


def test_summary_table_says_what_each_timing_covers_and_marks_reused_results(tmp_path, captured):
    from flows.artifacts import summary_table

    summary_table("synthesize-x", _synthesize_result(tmp_path, cached=True), "synthesize: counts and timings")
    (art,) = captured
    rows = {r["name"]: r for r in art["table"]}
    assert rows["result"]["value"].startswith("reused: finished ") and "(reused result)" in art["description"]
    assert "the call that finished the stage" in rows["total_s"]["covers"]
    assert "summed over all shards" in rows["generate_s"]["covers"]
    for name in ("total_s", "generate_s", "images_per_s"):
        assert "NOT in this run" in rows[name]["covers"], name
    assert rows["captions"]["covers"] == "count" and rows["cached"]["value"] is True
    assert all(set(r) == {"name", "value", "covers"} for r in art["table"])


def test_summary_table_tells_a_result_of_this_flow_run_from_a_prefect_cache_hit(tmp_path, captured, monkeypatch):
    import flows.artifacts as artifacts

    result = _synthesize_result(tmp_path, cached=False)  # Prefect's cached task result says cached=False
    monkeypatch.setattr(artifacts, "_flow_run_started", lambda: time.time() + 60)   # the flow began after it
    artifacts.summary_table("k", result, "d")
    monkeypatch.setattr(artifacts, "_flow_run_started", lambda: time.time() - 60)   # it finished in this run
    artifacts.summary_table("k", result, "d")
    reused, fresh = ({r["name"]: r for r in a["table"]} for a in captured)
    assert reused["result"]["value"].startswith("reused") and "NOT in this run" in reused["total_s"]["covers"]
    assert fresh["result"]["value"].startswith("computed in this run")
    assert "NOT in this run" not in fresh["total_s"]["covers"] and fresh["cached"]["value"] is False
