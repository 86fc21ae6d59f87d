"""bench/gpu_suite.py runs end to end on the CPU with the tiny presets (what the GPU run will do, in small)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["synth", "encode", "train-eager", "train-compile", "train-cuda-graphs", "check-synthesize",
         "check-encode", "check-train"]


@pytest.mark.heavy  # every step of the suite in a subprocess (a minute or more)
@pytest.mark.timeout(900)
def test_gpu_suite_cpu_tiny(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--cpu-tiny", "--out", str(out),
                        "--budget-s", "600"], cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]

    report = json.loads(out.read_text())
    for key in ("suite", "mode", "card", "device", "versions", "budget_s", "wall_s", "summary", "table", "steps"):
        assert key in report, key
    assert report["mode"] == "cpu-tiny" and report["card"] == "cpu"
    for lib in ("torch", "diffusers", "open_clip"):
        assert report["versions"][lib], lib
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    for s in report["steps"]:
        assert s["status"] in ("ok", "skipped"), s
        if s["status"] == "skipped":
            assert s["reason"], s
    assert steps["train-cuda-graphs"]["status"] == "skipped" and "no GPU" in steps["train-cuda-graphs"]["reason"]

    # Every figure the table shows came from the bench's own output (bench/synth.py and bench/encode.py have no
    # test of their own: these steps run them), and each printed ratio is the quotient of its two figures.
    synth = steps["synth"]["figures"]
    assert synth["plain_images_per_s"] > 0 and synth["stage_images_per_s"] > 0 and synth["opt_in"] == "tiny-vae"
    assert synth["opt_in_images_per_s"] > 0
    for figure, ratio in (("stage_images_per_s", "stage_ratio"), ("opt_in_images_per_s", "opt_in_ratio")):
        assert abs(synth[ratio] - synth[figure] / synth["plain_images_per_s"]) < 0.01 + 0.01 * synth[ratio], synth
    # --breakdown: the generator alone (channels-last off on the CPU, then on) and the stage with it on
    assert list(synth["breakdown"]) == ["generator alone", "generator alone, channels_last=True",
                                        "this stage, channels_last=True"], synth
    for line in synth["breakdown"].values():
        assert line["images_per_s"] > 0
        assert abs(line["ratio"] - line["images_per_s"] / synth["plain_images_per_s"]) < 0.01 + 0.01 * line["ratio"]
    encode = steps["encode"]["figures"]
    assert encode["end_to_end_images_per_s"] > 0 and encode["model_only_images_per_s"] > 0
    assert abs(encode["ratio"] - encode["end_to_end_images_per_s"] / encode["model_only_images_per_s"]) < 0.01, encode
    assert steps["train-eager"]["figures"]["samples_per_s"] > 0
    for name in ("check-synthesize", "check-encode", "check-train"):
        checks = steps[name]["figures"]["checks"]
        assert checks and all(c["status"] in ("ok", "skipped") for c in checks), checks
    train = steps["check-train"]["figures"]
    assert [c for c in train["checks"] if c["status"] == "skipped"][0]["detail"] == "no GPU"
    assert len(train["runs"]["eager"]["losses"]) == 6

    # One table: its header, then one row per step.
    lines = p.stdout.splitlines()
    header = [i for i, ln in enumerate(lines) if ln.startswith("step ") and "ratio vs baseline" in ln]
    assert len(header) == 1, p.stdout
    rows = [ln.split(" | ")[0].strip() for ln in lines[header[0] + 2:] if " | " in ln]
    assert [r for r in rows if r in STEPS] == STEPS
    assert f"wrote {out}" in p.stdout


def test_compare_losses() -> None:
    """The CUDA-graph check of the GPU run: close curves pass; a drifting, non-finite or shorter one fails."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_suite

    eager = [(10, 5.0), (20, 4.0), (30, 3.0)]
    for other, ok in [([(10, 5.1), (20, 3.9), (30, 3.05)], True), ([(10, 5.0), (20, 4.0), (30, 4.0)], False),
                      ([(10, 5.0), (20, float("nan")), (30, 3.0)], False), ([(10, 5.0), (20, 4.0)], False)]:
        c = gpu_suite.Checks()
        worst = gpu_suite.compare_losses(eager, other, 0.1, c)
        assert (not c.failed) == ok, (other, c.items)
        assert (worst <= 0.1) == ok
