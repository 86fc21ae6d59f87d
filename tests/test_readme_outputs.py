"""README's "Reading the outputs" snippet runs as written on tiny stage directories (pyarrow, webdataset,
safetensors); only each `runs/<stage>/<fp>` is replaced by a built stage's fingerprint."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from builders import caption_row, feature_stage, ingest_stage, new_stage
from PIL import Image

from storage.shards import ShardWriter

REPO = Path(__file__).resolve().parent.parent


def snippet() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    after = text[text.index("Reading the outputs"):]
    return re.search(r"^```python\n(.*?)^```", after, flags=re.S | re.M).group(1)


def jpeg(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_the_readme_outputs_snippet_reads_captions_shards_and_features(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [caption_row("c1", "a red car"), caption_row("c2", "two dogs")]
    fps = {"ingest": ingest_stage("runs", rows).fingerprint}
    shards = new_stage("runs", "synthesize", "d" * 16)
    with ShardWriter(shards.shard_file("shards", 0, "tar")) as w:
        for row, colour in zip(rows, ("red", "blue"), strict=True):
            w.write({"__key__": row["caption_id"], "jpg": jpeg(colour), "txt": row["text"], "json": {"seed": 1}})
    fps["synthesize"] = shards.path.name
    fps["encode"] = feature_stage("runs", keys=("c1", "c2")).path.name
    code = re.sub(r"runs/(\w+)/<fp>", lambda m: f"runs/{m.group(1)}/{fps[m.group(1)]}", snippet())
    assert "<fp>" not in code and len(fps) == 3, code
    out, scope = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)
    assert [r["text"] for r in scope["captions"]] == ["a red car", "two dogs"]
    printed = out.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in printed] == ["c1 a red car", "c2 two dogs"], printed
    assert all(int(line.rsplit(" ", 1)[1]) > 0 for line in printed)
    assert scope["keys"] == ["c1", "c2"] and scope["patches"].shape[0] == 2
