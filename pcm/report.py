"""The evaluation report: metrics table, comparison with the paper, sample captions beside references, thumbnails."""

from __future__ import annotations

import math
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

PUBLISHED = Path(__file__).resolve().parent / "presets" / "published.toml"
LABELS = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4", "METEOR": "METEOR",
          "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
MAX_LISTED = 50  # ids of images that could not be evaluated, listed in the report (all are in metrics.json)
# The samples table's references column: the first few, each cut, and how many more (a page-wide column
# of five full references pushes the table off a narrow view such as the dashboard's).
REFS_SHOWN = 2
REF_CHARS = 80


@cache
def published() -> dict[str, dict[str, Any]]:
    """The paper's results by setting name (pcm/presets/published.toml), in percent."""
    with open(PUBLISHED, "rb") as f:
        return tomllib.load(f)


def published_setting(name: str) -> dict[str, Any]:
    """One published setting; an unknown name lists the known ones."""
    settings = published()
    if name not in settings:
        raise ValueError(f"unknown published setting {name!r}; known: {', '.join(settings)} ({PUBLISHED})")
    return settings[name]


def comparison(corpus: dict[str, float | str], name: str) -> list[dict[str, Any]]:
    """Rows (metric, measured, published, difference) in percent for the metrics the paper reports."""
    setting = published_setting(name)
    rows = []
    for key, label in LABELS.items():
        if key not in setting:
            continue
        value = corpus.get(key)
        measured = round(100 * value, 1) if isinstance(value, float) else None
        rows.append({"metric": label, "measured": measured, "published": setting[key],
                     "difference": round(measured - setting[key], 1) if measured is not None else None})
    return rows


def methods(name: str) -> list[dict[str, Any]]:
    """The published rows of a setting, PCM-Net's first, then other methods' in the same setting (same datasets
    and CLIP backbone: `[[NAME.others]]`): method, each metric any of them reports (None where one does not),
    source."""
    setting = published_setting(name)
    rows = [setting, *setting.get("others", [])]
    keys = [k for k in LABELS if any(k in r for r in rows)]
    return [{"method": r["method"], **{LABELS[k]: r.get(k) for k in keys}, "source": r["source"]} for r in rows]


def published_datasets(name: str) -> tuple[str, str]:
    """(training dataset, evaluated dataset) of a published setting, lowercase.

    A setting may name them (`train_dataset`, `dataset`); otherwise they come from its name:
    `coco-vitl14` is COCO on COCO, `coco-to-flickr30k-vitb32` COCO's model on Flickr30k.
    """
    setting = published_setting(name)
    stem = re.sub(r"-vit[a-z0-9]+$", "", name.lower())
    train, _, evaluated = stem.partition("-to-")
    return (str(setting.get("train_dataset", train)).lower(),
            str(setting.get("dataset", evaluated or train)).lower())


def published_caveat(name: str, *, train: str | None, evaluated: str | None, split: str) -> str | None:
    """None when the paper's numbers of setting `name` measure what this evaluation measures, else why not.

    The paper reports the Karpathy test split of its dataset: another dataset (the toy world, the
    bundled demo), another split or another training dataset gives numbers that are not comparable.
    """
    paper_train, paper_eval = published_datasets(name)
    if evaluated is None:
        return (f"not comparable unless this is {paper_eval}'s Karpathy test split: the evaluated dataset is not "
                "recorded")
    if evaluated.lower() != paper_eval:
        return f"not comparable: different dataset (the paper evaluated on {paper_eval}, this is {evaluated})"
    if split != "test":
        return f"not comparable: different split (the paper's numbers are on the test split, this is {split})"
    if train is not None and train.lower() != paper_train:
        return (f"not comparable: different training dataset (the paper trained on {paper_train}, this model on "
                f"{train})")
    return None


def published_block(corpus: dict[str, float | str], name: str, *, train: str | None, evaluated: str | None,
                    split: str) -> dict[str, Any]:
    """metrics.json's `published`: the setting, its rows and whether they can be compared with `corpus`.

    When they cannot, `caveat` says why, the title carries it (the dashboard's table shows the title),
    every row carries it as `note`, and no difference is computed.
    """
    setting = published_setting(name)
    caveat = published_caveat(name, train=train, evaluated=evaluated, split=split)
    rows = comparison(corpus, name)
    if caveat:
        rows = [{**r, "difference": None, "note": caveat} for r in rows]
    return {"setting": name, "title": setting["title"] + (f" -- {caveat}" if caveat else ""),
            "paper_title": setting["title"], "protocol": setting["protocol"], "comparable": caveat is None,
            "caveat": caveat, "rows": rows, "methods": methods(name)}


def spread(n_items: int, k: int) -> list[int]:
    """k indices spread evenly over range(n_items) (a deterministic sample for the report)."""
    if k <= 0 or n_items <= 0:
        return []
    if k >= n_items:
        return list(range(n_items))
    return sorted({math.floor(i * n_items / k) for i in range(k)})


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _refs(references: list[str]) -> str:
    """The references cell: the first REFS_SHOWN, each cut at REF_CHARS, then "+N more"."""
    shown = [_cell(r if len(r) <= REF_CHARS else r[:REF_CHARS - 3].rstrip() + "...") for r in references[:REFS_SHOWN]]
    more = len(references) - REFS_SHOWN
    return "<br>".join(shown + ([f"(+{more} more)"] if more > 0 else []))


def _shown_path(path: str, root: str | Path | None) -> str:
    """A path inside the run root as the report shows it: relative to the root (no machine path in the report)."""
    if root is not None:
        try:
            return Path(path).relative_to(Path(root)).as_posix()
        except ValueError:
            pass
    return path


def _fmt(value: float | str | None) -> str:
    return f"{100 * value:.1f}" if isinstance(value, float) else "n/a"


def _methods_table(pub: dict[str, Any]) -> list[str]:
    """Markdown lines: the setting's published methods side by side (PCM-Net's row first), each with its source."""
    rows = pub["methods"]
    metrics = [k for k in rows[0] if k not in ("method", "source")]
    lines = [f"### Published methods in this setting ({pub.get('paper_title', pub['title'])}), for reference", "",
             "| method | " + " | ".join(metrics) + " | source |", "|---|" + "---:|" * len(metrics) + "---|"]
    for r in rows:
        cells = [str(r[m]) if r[m] is not None else "-" for m in metrics]
        lines.append(f"| {_cell(r['method'])} | " + " | ".join(cells) + f" | {_cell(r['source'])} |")
    return lines + ["", "Published numbers (see each source), not measured here; for the other methods CIDEr only, "
                    "as their other metrics were not checked.", ""]


def render(summary: dict[str, Any], samples: list[dict[str, Any]], grid: str | None,
           root: str | Path | None = None) -> str:
    """report.md from metrics.json's content, the sampled rows and the grid's path relative to the report;
    paths inside the run root `root` are shown relative to it."""
    corpus = summary["metrics"]
    counts = summary["counts"]
    ck, dec = summary["checkpoint"], summary["decoding"]
    lines = [
        f"# Evaluation: {summary['split']} split, {summary['protocol']}",
        "",
        f"- Trained on: `{summary['datasets']['train'] or '?'}`; evaluated on: `{summary['datasets']['eval'] or '?'}`",
        f"- Checkpoint: {ck['which']} (step {ck['step']}), `{_shown_path(ck['path'], root)}`",
        f"- Decoding: beam {dec['beam_size']}, max length {dec['max_len']}, length penalty {dec['length_penalty']}",
        f"- Images evaluated: {counts['images']} ({counts['references']} references); failed to encode: "
        f"{counts['failed_encode']}; not encoded: {counts['not_encoded']}",
        "",
        "## Metrics (x100, COCO caption evaluation)",
        "",
        "| " + " | ".join(LABELS.values()) + " |",
        "|" + "---:|" * len(LABELS),
        "| " + " | ".join(_fmt(corpus.get(k)) for k in LABELS) + " |",
        "",
    ]
    if summary.get("control"):
        ctrl = summary["control"]["metrics"]
        lines[-1:] = ["| " + " | ".join(_fmt(ctrl.get(k)) if k != "SPICE" else "-" for k in LABELS) + " |", "",
                      f"Second row, the control: {summary['control']['how']}. A captioner that uses its image "
                      "scores above it; one that ignores it scores about the same.", ""]
    if not isinstance(corpus.get("SPICE"), float):
        lines += [f"SPICE: {corpus.get('SPICE')}", ""]
    if summary.get("published") and summary["published"].get("caveat"):
        pub = summary["published"]
        lines += [f"## The paper's numbers, for reference only: {pub.get('paper_title', pub['title'])}", "",
                  f"**{pub['caveat'][:1].upper() + pub['caveat'][1:]}.** The paper's numbers are shown beside this "
                  "evaluation's without a difference: they measure something else.", "",
                  "| metric | measured here | paper (not comparable) |", "|---|---:|---:|"]
        for r in pub["rows"]:
            lines.append(f"| {r['metric']} | {r['measured'] if r['measured'] is not None else 'n/a'} | "
                         f"{r['published']} |")
        lines.append("")
    elif summary.get("published"):
        pub = summary["published"]
        lines += [f"## Compared with the paper: {pub['title']}", "",
                  "| metric | measured | published | difference |", "|---|---:|---:|---:|"]
        for r in pub["rows"]:
            lines.append(f"| {r['metric']} | {r['measured'] if r['measured'] is not None else 'n/a'} | "
                         f"{r['published']} | {r['difference'] if r['difference'] is not None else 'n/a'} |")
        if pub["protocol"] != summary["protocol"]:
            lines += ["", f"Note: the paper's setting is {pub['protocol']}, this evaluation is {summary['protocol']}."]
        lines.append("")
    if summary.get("published") and len(summary["published"].get("methods") or []) > 1:
        lines += _methods_table(summary["published"])
    if samples:
        lines += ["## Samples", ""]
        if grid:
            lines += [f"![numbered thumbnails of the samples]({grid})", ""]
        # CIDEr before the long references column, so a narrow view (the dashboard) never cuts it off.
        lines += ["| # | image | CIDEr | prediction | references |", "|---:|---|---:|---|---|"]
        for i, s in enumerate(samples, 1):
            lines.append(f"| {i} | `{_cell(s['image_id'])}` | {_fmt(s['cider'])} | {_cell(s['caption'])} | "
                         f"{_refs(s['references'])} |")
        lines.append("")
    failed, missing = summary.get("failed_images", []), summary.get("not_encoded", [])
    if failed or missing:
        lines += ["## Images not evaluated", ""]
        for f in failed[:MAX_LISTED]:
            lines.append(f"- `{_cell(f['image_id'])}` failed to encode: {_cell(f['error'])}")
        if missing:
            shown = ", ".join(f"`{_cell(m)}`" for m in missing[:MAX_LISTED])
            lines.append(f"- not in the encode stage's real images: {shown}")
        if len(failed) > MAX_LISTED or len(missing) > MAX_LISTED:
            lines.append(f"- (lists cut at {MAX_LISTED}; metrics.json has every id)")
        lines.append("")
    return "\n".join(lines)
