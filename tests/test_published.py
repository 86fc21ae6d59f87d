"""Published numbers beside an evaluation: PCM-Net's chosen setting and other methods' rows of the same setting."""

from __future__ import annotations

import re
import tomllib

import pytest

from pcm.report import LABELS, PUBLISHED, methods, published, published_block, render

CORPUS = {"Bleu_1": 0.5, "Bleu_2": 0.4, "Bleu_3": 0.3, "Bleu_4": 0.2, "METEOR": 0.2, "ROUGE_L": 0.4,
          "CIDEr": 0.9, "SPICE": "skipped: spice=off"}


def summary(dataset: str, block: dict) -> dict:
    return {"metrics": CORPUS, "split": "test", "protocol": "in-domain", "datasets": {"train": dataset, "eval": dataset},
            "checkpoint": {"which": "best", "step": 5, "path": "/x/best"},
            "decoding": {"beam_size": 3, "max_len": 20, "length_penalty": 0.0},
            "counts": {"images": 4, "references": 8, "failed_encode": 0, "not_encoded": 0},
            "failed_images": [], "not_encoded": [], "published": block, "control": None}


def test_the_toml_loads_and_every_row_names_its_method_and_source():
    with open(PUBLISHED, "rb") as f:
        data = tomllib.load(f)
    rows = [r for s in data.values() for r in [s, *s.get("others", [])]]
    assert len(data) == 8 and len(rows) == 8 + 8 + 4   # PCM-Net, SynC + PCM-Net each, IFCap for ViT-B/32
    for r in rows:
        assert r["method"].strip() and r["source"].strip(), r
        assert set(r) - {"method", "source", "title", "protocol", "others"} <= set(LABELS), r
        assert all(isinstance(r[k], float) and 0 < r[k] < 200 for k in LABELS if k in r), r
    assert all(s["method"] == "PCM-Net" for s in data.values())
    # IFCap is a ViT-B/32 (text-only) method: never beside a ViT-L/14 setting
    for name, s in data.items():
        assert ("IFCap" in {o["method"] for o in s.get("others", [])}) == name.endswith("vitb32"), name


@pytest.mark.parametrize(("name", "cider"), [
    ("coco-vitl14", {"PCM-Net": 113.6, "SynC + PCM-Net": 119.8}),
    ("flickr30k-vitl14", {"PCM-Net": 69.5, "SynC + PCM-Net": 75.6}),
    ("coco-to-flickr30k-vitl14", {"PCM-Net": 55.9, "SynC + PCM-Net": 60.3}),
    ("flickr30k-to-coco-vitl14", {"PCM-Net": 61.3, "SynC + PCM-Net": 66.8}),
    ("coco-vitb32", {"PCM-Net": 103.8, "SynC + PCM-Net": 112.0, "IFCap": 108.0}),
    ("flickr30k-vitb32", {"PCM-Net": 61.3, "SynC + PCM-Net": 65.8, "IFCap": 64.4}),
    ("coco-to-flickr30k-vitb32", {"PCM-Net": 45.5, "SynC + PCM-Net": 49.5, "IFCap": 47.5}),
    ("flickr30k-to-coco-vitb32", {"PCM-Net": 54.9, "SynC + PCM-Net": 58.4, "IFCap": 60.7}),
])
def test_each_setting_lists_the_methods_published_for_it(name, cider):
    assert {r["method"]: r["CIDEr"] for r in methods(name)} == cider
    assert methods(name)[0]["method"] == "PCM-Net"


def _methods_section(report: str) -> str:
    return report.split("### Published methods in this setting")[1].split("\n\n", 2)[1]


def test_a_coco_vitl14_report_shows_syncs_row_beside_pcm_nets_and_no_ifcap():
    block = published_block(CORPUS, "coco-vitl14", train="coco", evaluated="coco", split="test")
    report = render(summary("coco", block), [], None)
    rows = {r.split("|")[1].strip(): r for r in _methods_section(report).splitlines()[2:]}
    assert set(rows) == {"PCM-Net", "SynC + PCM-Net"}
    assert re.search(r"\| 113\.6 \|", rows["PCM-Net"]) and "33.6" in rows["PCM-Net"]
    assert re.search(r"\| 119\.8 \|", rows["SynC + PCM-Net"]) and "arXiv 2507.18616" in rows["SynC + PCM-Net"]
    assert "Luo et al." in rows["PCM-Net"]
    assert "IFCap" not in report


def test_a_coco_vitb32_report_shows_ifcap_and_the_methods_stay_for_reference_on_another_dataset():
    block = published_block(CORPUS, "coco-vitb32", train="coco", evaluated="coco", split="test")
    section = _methods_section(render(summary("coco", block), [], None))
    assert re.search(r"\| IFCap \| - \| - \| - \| 108\.0 \| - \|", section), section
    assert re.search(r"\| SynC \+ PCM-Net \|.*\| 112\.0 \|", section)
    # on the toy world the paper's numbers are not comparable: the methods are still shown, for reference
    toy = render(summary("toyworld", published_block(CORPUS, "coco-vitb32", train="toyworld",
                                                       evaluated="toyworld", split="test")), [], None)
    assert "Not comparable" in toy and "| IFCap |" in toy
    assert len(published()) == 8


def test_the_samples_table_shows_two_references_cut_short_and_how_many_more():
    long = "a " + "very " * 30 + "long reference"
    sample = {"image_id": "img1", "cider": 0.5, "caption": "a dog", "references": [long, "a dog | a cat", "r3", "r4", "r5"]}
    table = render(summary("coco", None), [sample], None).split("## Samples")[1]
    (row,) = [line for line in table.splitlines() if line.startswith("| 1 |")]
    refs = row.rsplit(" | ", 1)[1]
    first, second, more = refs.rstrip(" |").split("<br>")
    assert first.endswith("...") and len(first) <= 80 and long.startswith(first[:-3])
    assert second == "a dog \\| a cat" and more == "(+3 more)" and "r3" not in row
    two = {**sample, "references": ["r1", "r2"]}
    assert render(summary("coco", None), [two], None).split("## Samples")[1].count("more)") == 0


def test_the_checkpoint_path_is_shown_relative_to_the_run_root():
    s = summary("coco", None) | {"checkpoint": {"which": "best", "step": 5, "path": "/data/runs/train/ab12/best"}}
    report = render(s, [], None, root="/data/runs")
    assert "`train/ab12/best`" in report and "/data/runs" not in report
    assert "`/elsewhere/best`" in render(s | {"checkpoint": {**s["checkpoint"], "path": "/elsewhere/best"}}, [], None,
                                         root="/data/runs")   # outside the root: as it is
