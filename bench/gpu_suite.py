"""Every GPU benchmark and a short correctness pass of each GPU path, in one go, within a time budget.

    python bench/gpu_suite.py                       # on one H100/H200: real presets, 480 s budget
    python bench/gpu_suite.py --cpu-tiny            # tiny presets on the CPU (what the test runs), ~1-2 min
    python bench/gpu_suite.py --out /tmp/x.json --budget-s 600

Steps (each a subprocess with its own timeout, so a hung step costs its timeout, not the budget):

    synth              bench/synth.py --preset sd15-arch: plain pipeline vs the stage, and the best opt-in
    encode             bench/encode.py --preset vit-l-14, one decode worker per core (at most 16)
    train-eager        bench/train.py --preset vitl14 --batch-size 32 (bf16 autocast)
    train-compile      ... --compile
    train-cuda-graphs  ... --cuda-graphs
    check-synthesize   8 fp16 sd15-arch images through the synthesize stage: every shard's marker, the stage's
    check-encode       a few encode shards (ViT-L/14 fp16): markers, finite features
    check-train        300 training steps eager and with CUDA graphs: finite losses, close to each other

With --cpu-tiny (or without a GPU) every step runs with the tiny presets and tiny sizes on the CPU, fp32,
torch.compile and CUDA graphs skipped (with the reason), so the suite is known to work before GPU time
is spent (tests/test_gpu_suite.py runs it so).

A step's timeout is min(CAP x its expected seconds (CPU_CAP on the CPU), what is left of the budget minus
RESERVE x the expected seconds of the steps after it), so later steps keep a share if an earlier one hangs.
A timed-out step is recorded as such (its process group is killed) and the suite goes on.

Figures come from each bench's own output: bench/train.py --json prints one JSON line; bench/synth.py
and bench/encode.py print text, parsed with SYNTH_PATTERNS and ENCODE_PATTERNS below (a bench whose
lines no longer match fails its step with "could not parse", so a format change is noticed). The
checks run this file again with --internal NAME and print one line `GPU_SUITE_RESULT {json}`.

It prints one table (step | status | key figure | ratio vs baseline | seconds) and writes one JSON
(card, versions, budget, every step's command, status, seconds and figures) to --out, by default
bench/results/gpu_suite-<card>.json (bench/results/gpu_suite-cpu-tiny.json for a CPU run).
The exit status is 0 when no step failed, timed out or was skipped for want of budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the repository is put on sys.path in main()
    from storage.layout import StageDir

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
RESULT_PREFIX = "GPU_SUITE_RESULT "
CAP = 2.0  # a step may run CAP x its expected seconds (CPU_CAP on a shared CPU, whose speed varies more) ...
CPU_CAP = 4.0
RESERVE = 0.6  # ... but leaves RESERVE x the expected seconds of every later step
MIN_STEP_S = 15.0  # a step gets at least this long (or what is left), else it is skipped: "budget spent"

# bench/synth.py prints (see its main()):
#   plain pipeline:                 7.403 images/s
#   this stage:                     5.792 images/s   ratio 0.782 (stage / plain; ...)
#   opt-in (tiny-vae):              6.694 images/s   ratio 0.904 (tiny VAE changes the images)
NUM = r"([0-9][0-9,]*(?:\.[0-9]+)?)"
SYNTH_PATTERNS = {
    "device": re.compile(r"^device: (.+)$", re.M),
    "plain_images_per_s": re.compile(rf"^plain pipeline:\s+{NUM} images/s", re.M),
    "stage_images_per_s": re.compile(rf"^this stage:\s+{NUM} images/s\s+ratio {NUM}", re.M),
    "opt_in_images_per_s": re.compile(rf"^opt-in \(([^)]+)\):\s+{NUM} images/s\s+ratio {NUM}", re.M),
    # --breakdown: the generator alone and both arms with channels-last flipped, one line each
    "breakdown": re.compile(rf"^breakdown: (.+?):\s+{NUM} images/s\s+ratio {NUM}", re.M),
}
# bench/encode.py prints:
#   model-only: 6,685.8 images/s (open_clip encode_image on random tensors)
#   end-to-end: 274.8 images/s (run_encode from JPEG shards: ...)
#   ratio: 0.04 (end-to-end / model-only)
ENCODE_PATTERNS = {
    "device": re.compile(r"^device: (.+)$", re.M),
    "model_only_images_per_s": re.compile(rf"^model-only: {NUM} images/s", re.M),
    "end_to_end_images_per_s": re.compile(rf"^end-to-end: {NUM} images/s", re.M),
    "ratio": re.compile(rf"^ratio: {NUM}", re.M),
}


def _num(s: str) -> float:
    return float(s.replace(",", ""))


class ParseError(ValueError):
    pass


def _need(pattern: re.Pattern, text: str, what: str) -> re.Match:
    matches = list(pattern.finditer(text))
    if not matches:
        raise ParseError(f"could not parse {what!r} (pattern {pattern.pattern!r}) from the output")
    return matches[-1]  # the last one (a bench prints each line once)


def parse_synth(out: str) -> dict[str, Any]:
    plain = _num(_need(SYNTH_PATTERNS["plain_images_per_s"], out, "plain pipeline").group(1))
    st = _need(SYNTH_PATTERNS["stage_images_per_s"], out, "this stage")
    opt = _need(SYNTH_PATTERNS["opt_in_images_per_s"], out, "opt-in")
    dev = SYNTH_PATTERNS["device"].search(out)
    return {"setup": dev.group(1) if dev else None, "plain_images_per_s": plain,
            "stage_images_per_s": _num(st.group(1)), "stage_ratio": _num(st.group(2)),
            "opt_in": opt.group(1), "opt_in_images_per_s": _num(opt.group(2)), "opt_in_ratio": _num(opt.group(3)),
            "breakdown": {m.group(1): {"images_per_s": _num(m.group(2)), "ratio": _num(m.group(3))}
                          for m in SYNTH_PATTERNS["breakdown"].finditer(out)}}


def parse_encode(out: str) -> dict[str, Any]:
    dev = ENCODE_PATTERNS["device"].search(out)
    return {"setup": dev.group(1) if dev else None,
            "model_only_images_per_s": _num(_need(ENCODE_PATTERNS["model_only_images_per_s"], out, "model-only").group(1)),
            "end_to_end_images_per_s": _num(_need(ENCODE_PATTERNS["end_to_end_images_per_s"], out, "end-to-end").group(1)),
            "ratio": _num(_need(ENCODE_PATTERNS["ratio"], out, "ratio").group(1))}


def parse_json_line(out: str) -> dict[str, Any]:
    """The last stdout line that is a JSON object (bench/train.py --json)."""
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ParseError("no JSON line in the output")


def parse_result_line(out: str) -> dict[str, Any]:
    """The `GPU_SUITE_RESULT {json}` line of an --internal check."""
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ParseError(f"no {RESULT_PREFIX.strip()} line in the output")


# ================================================================== the steps
@dataclass
class Step:
    name: str
    argv: list[str]
    expect_s: float  # seconds it should take on the target machine (the timeout is derived from it)
    parse: Callable[[str], dict[str, Any]]
    skip: str | None = None  # a reason to skip it
    cap: float = CAP
    result: dict[str, Any] = field(default_factory=dict)


def plan(gpu: bool, work: Path) -> list[Step]:
    py = sys.executable
    me = str(Path(__file__).resolve())
    dev = "cuda" if gpu else "cpu"
    if gpu:
        workers = min(16, os.cpu_count() or 1)
        # batch 32, 20 steps, fp16, 512 px; opt-in compile+tiny-vae; the breakdown: where the stage's time goes
        synth = ["--preset", "sd15-arch", "--n-images", "128", "--breakdown"]
        encode = ["--preset", "vit-l-14", "--batch-size", "256", "--n-images", "8192", "--workers", str(workers)]
        train = ["--preset", "vitl14", "--batch-size", "32", "--steps", "200", "--warmup", "20"]
        expect = {"synth": 230, "encode": 50, "train-eager": 25, "train-compile": 70, "train-cuda-graphs": 30,
                  "check-synthesize": 35, "check-encode": 40, "check-train": 60}
    else:
        synth = ["--preset", "tiny", "--steps", "2", "--n-images", "4", "--batch-size", "2",  # opt-in: tiny-vae
                 "--breakdown"]
        encode = ["--preset", "tiny", "--batch-size", "16", "--n-images", "64", "--shard-size", "32", "--workers", "1"]
        train = ["--preset", "tiny", "--batch-size", "8", "--steps", "5", "--warmup", "2"]
        expect = {"synth": 25, "encode": 20, "train-eager": 15, "train-compile": 15, "train-cuda-graphs": 15,
                  "check-synthesize": 20, "check-encode": 25, "check-train": 20}
    no_gpu = "no GPU (CUDA graphs need a CUDA device)"
    no_compile = "cpu-tiny (torch.compile is measured on the GPU run; inductor's CPU build takes minutes)"
    internal = [py, me, "--internal"]
    tail = ["--device", dev, "--work", str(work)]
    steps = [
        Step("synth", [py, str(BENCH / "synth.py"), "--device", dev, *synth], expect["synth"], parse_synth),
        Step("encode", [py, str(BENCH / "encode.py"), "--device", dev, *encode], expect["encode"], parse_encode),
        Step("train-eager", [py, str(BENCH / "train.py"), "--device", dev, *train, "--json"], expect["train-eager"],
             parse_json_line),
        Step("train-compile", [py, str(BENCH / "train.py"), "--device", dev, *train, "--compile", "--json"],
             expect["train-compile"], parse_json_line, skip=None if gpu else no_compile),
        Step("train-cuda-graphs", [py, str(BENCH / "train.py"), "--device", dev, *train, "--cuda-graphs", "--json"],
             expect["train-cuda-graphs"], parse_json_line, skip=None if gpu else no_gpu),
        Step("check-synthesize", [*internal, "check-synthesize", *tail], expect["check-synthesize"], parse_result_line),
        Step("check-encode", [*internal, "check-encode", *tail], expect["check-encode"], parse_result_line),
        Step("check-train", [*internal, "check-train", *tail], expect["check-train"], parse_result_line),
    ]
    for s in steps:
        s.cap = CAP if gpu else CPU_CAP
    return steps


def step_timeout(steps: list[Step], i: int, remaining: float) -> float:
    later = sum(s.expect_s for s in steps[i + 1:] if s.skip is None)
    t = min(steps[i].cap * steps[i].expect_s, remaining - RESERVE * later)
    return min(max(t, MIN_STEP_S), remaining)


PROGRESS_BAR = re.compile(r"\d+%\|.*\|")  # tqdm lines say nothing about a failure


def _tail(path: Path, n: int) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
    return [ln for ln in lines if ln.strip() and not PROGRESS_BAR.search(ln)][-n:]


def run_step(step: Step, timeout: float, env: dict[str, str], logs: Path) -> dict[str, Any]:
    """Run one step as a subprocess in its own process group (killed whole on a timeout)."""
    out_p, err_p = logs / f"{step.name}.stdout", logs / f"{step.name}.stderr"
    t0 = time.monotonic()
    with open(out_p, "wb") as out, open(err_p, "wb") as err:
        proc = subprocess.Popen(step.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)  # the step's own group: its DataLoader / compile workers too
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
    seconds = round(time.monotonic() - t0, 1)
    stdout = out_p.read_text(encoding="utf-8", errors="replace")
    res: dict[str, Any] = {"name": step.name, "command": step.argv, "timeout_s": round(timeout, 1),
                           "seconds": seconds, "returncode": rc, "figures": {}}
    figures, parse_error = None, None
    try:
        figures = step.parse(stdout)
    except (ParseError, json.JSONDecodeError) as e:
        parse_error = str(e)
    if figures is not None:
        res["figures"] = figures
    if rc is None:
        res.update(status="timeout", reason=f"killed after {timeout:.0f} s (its share of the budget)")
    elif rc != 0:
        res.update(status="failed", reason=f"exit status {rc}")
    elif parse_error:
        res.update(status="failed", reason=parse_error)
    else:
        res.update(status="ok", reason=None)
    if res["status"] != "ok":
        res["stderr_tail"] = _tail(err_p, 25)
        res["stdout_tail"] = _tail(out_p, 10)
    return res


# ================================================================== the table
def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}{unit}" if abs(v) >= 100 else f"{v:.3g}{unit}"


def table_rows(results: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """(step, status, key figure, ratio vs baseline, seconds); a step may add sub-rows (status, seconds blank)."""
    by_name = {r["name"]: r for r in results}
    eager = (by_name.get("train-eager", {}).get("figures") or {}).get("samples_per_s")
    rows = []
    for r in results:
        f, status = r.get("figures") or {}, r["status"]
        label = status if status == "ok" else f"{status}: {r.get('reason') or ''}".rstrip(": ")
        sec = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        main, ratio, sub = "-", "-", []
        name = r["name"]
        if name == "synth" and f:
            main = f"stage {_fmt(f['stage_images_per_s'])} img/s (plain {_fmt(f['plain_images_per_s'])})"
            ratio = f"{f['stage_ratio']:.3f} stage/plain"
            sub.append(("  synth opt-in", f"{f['opt_in']}: {_fmt(f['opt_in_images_per_s'])} img/s",
                        f"{f['opt_in_ratio']:.3f} opt-in/plain"))
            sub += [(f"  synth: {k}", f"{_fmt(v['images_per_s'])} img/s", f"{v['ratio']:.3f} vs plain")
                    for k, v in f.get("breakdown", {}).items()]
        elif name == "encode" and f:
            main = (f"e2e {_fmt(f['end_to_end_images_per_s'])} img/s "
                    f"(model-only {_fmt(f['model_only_images_per_s'])})")
            ratio = f"{f['ratio']:.2f} e2e/model-only"
        elif name.startswith("train-") and f:
            mfu = f", MFU {100 * f['mfu']:.1f}%" if f.get("mfu") else ""
            main = f"{_fmt(f['samples_per_s'])} samples/s, {f['step_ms']} ms/step{mfu}"
            ratio = "baseline" if name == "train-eager" else (
                f"{f['samples_per_s'] / eager:.2f} vs eager" if eager else "-")
        elif name.startswith("check-") and f:
            main = f.get("summary", "-")
            ratio = f.get("ratio", "-")
            for c in f.get("checks", []):
                if c["status"] != "ok":
                    sub.append((f"  {name}: {c['name']}", f"{c['status']}: {c.get('detail', '')}", "-"))
        rows.append((name, label if len(label) <= 40 else label[:37] + "...", main, ratio, sec))
        rows += [(a, "", b, c, "") for a, b, c in sub]
    return rows


def print_table(rows: list[tuple[str, ...]]) -> None:
    head = ("step", "status", "key figure", "ratio vs baseline", "seconds")
    w = [max(len(str(x[i])) for x in [head, *rows]) for i in range(5)]
    line = " | ".join(h.ljust(w[i]) for i, h in enumerate(head))
    print(line)
    print("-+-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(str(c).ljust(w[i]) if i < 4 else str(c).rjust(w[i]) for i, c in enumerate(r)))


# ================================================================== environment
def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(gpu: bool) -> tuple[str, dict[str, Any], dict[str, Any]]:
    import platform

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                "diffusers": _version("diffusers"), "open_clip": _version("open_clip_torch"),
                "transformers": _version("transformers")}
    device: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        card = torch.cuda.get_device_name(0)
        device.update(cuda_devices=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                      capability=f"{props.major}.{props.minor}")
    else:
        card = "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device["commit"] = commit
    return card, device, versions


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ================================================================== the correctness checks (--internal)
class Checks:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append({"name": name, "status": "ok" if ok else "failed", "detail": detail})
        return ok

    def skip(self, name: str, reason: str) -> None:
        self.items.append({"name": name, "status": "skipped", "detail": reason})

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.items if c["status"] == "failed"]


def _quiet() -> dict[str, Any]:
    return {"synthesize.progress_bar": False, "encode.progress_bar": False, "train.progress_bar": False}


def synth_overrides(gpu: bool) -> dict[str, Any]:
    """A few images of the real architecture in fp16 (GPU), or of the tiny model in fp32 (CPU)."""
    ov = _quiet() | {"synthesize.limit": 8, "synthesize.batch_size": 4, "synthesize.shard_size": 4,
                     "synthesize.steps": 4}
    if gpu:
        ov |= {"synthesize.model": "sd15-arch", "synthesize.dtype": "fp16", "synthesize.device": "cuda",
               "synthesize.height": 512, "synthesize.width": 512, "synthesize.channels_last": True}
    return ov


def chain_overrides(gpu: bool) -> dict[str, Any]:
    """ingest -> synthesize (tiny SD, a few shards) -> encode (ViT-L/14 fp16 on the GPU, tiny CLIP on the CPU),
    the inputs of the training check."""
    if gpu:
        return _quiet() | {
            "synthesize.device": "cuda", "synthesize.shard_size": 64,  # the 201 demo captions: 4 shards
            "encode.device": "cuda", "encode.batch_size": 64, "encode.num_workers": min(4, os.cpu_count() or 1),
            "encode.clip": {"model": "ViT-L-14", "pretrained": None, "precision": "fp16", "pool": 8}}
    return synth_overrides(False) | {"encode.batch_size": 8}  # the synthesize stage of check-synthesize, reused


def train_overrides(gpu: bool) -> dict[str, Any]:
    steps = 300 if gpu else 30
    return {"train.preset": "vitl14" if gpu else "tiny", "train.batch_size": 32 if gpu else 8,
            "train.max_steps": steps, "train.epochs": 100_000, "train.log_every": 10 if gpu else 5,
            "train.val_every": steps, "train.checkpoint_every": steps, "train.val_metric": "loss",
            "train.num_workers": 0, "train.device": "cuda" if gpu else "cpu", "train.seed": 0}


def check_synthesize(work: Path, gpu: bool) -> tuple[dict[str, Any], Checks]:
    import io

    from PIL import Image

    from pcm.stages import synthesize
    from pcm.stages.pipeline import resolve, run_pipeline
    from storage.shards import iter_tar

    ov = synth_overrides(gpu)
    cfg = resolve("tiny", ov)
    t0 = time.perf_counter()
    r = run_pipeline(cfg, str(work / "runs"), stages=("synthesize",))["synthesize"]
    seconds = time.perf_counter() - t0
    sd = r.stage_dir
    c = Checks()
    n, limit = r.counts.get("shards", 0), ov["synthesize.limit"]
    c.add("all images ok", r.counts.get("ok") == limit and r.counts.get("failed") == 0, str(r.counts))
    c.add("shards written", n >= 2, f"{n} shards")
    missing = [i for i in range(n) if not (sd.shard_file("shards", i, "tar").exists() and sd.shard_done("shards", i).exists())]
    c.add("every shard has its done marker", not missing, f"missing: {missing}" if missing else f"{n}/{n}")
    c.add("stage marker", sd.done_marker.exists(), str(sd.done_marker.name))
    c.add("stage verifies", (v := synthesize.verify(sd)) is None, v or "")
    samples, dtypes = 0, set()
    for i in range(n):
        for s in iter_tar(sd.shard_file("shards", i, "tar")):
            Image.open(io.BytesIO(s["jpg"])).verify()
            dtypes.add(json.loads(s["json"])["dtype"])
            samples += 1
    want = "fp16" if gpu else "fp32"
    c.add("shards read back (JPEG decodes)", samples == limit, f"{samples} samples")
    c.add(f"images made in {want}", dtypes == {want}, str(sorted(dtypes)))
    figures = {"model": cfg.synthesize.model, "dtype": cfg.synthesize.dtype, "images": samples, "shards": n,
               "size": cfg.synthesize.height, "steps": cfg.synthesize.steps, "seconds": round(seconds, 2),
               "summary": f"{samples} {want} images ({cfg.synthesize.model}), {n} shards, markers "
                          f"{'ok' if not missing and sd.done_marker.exists() else 'MISSING'}"}
    return figures, c


def check_encode(work: Path, gpu: bool) -> tuple[dict[str, Any], Checks]:
    import torch
    from safetensors.torch import load_file

    from pcm.stages import encode
    from pcm.stages.pipeline import resolve, run_pipeline

    cfg = resolve("tiny", chain_overrides(gpu))
    t0 = time.perf_counter()
    r = run_pipeline(cfg, str(work / "runs"), stages=("encode",))["encode"]
    seconds = time.perf_counter() - t0
    sd = r.stage_dir
    c = Checks()
    units = r.extra.get("units", {})
    n_feat, n_real = len(units.get("features", [])), len(units.get("real", []))
    c.add("images encoded", r.counts.get("images_failed") == 0 and r.counts.get("images", 0) > 0, str(r.counts))
    c.add("real images encoded", r.counts.get("real_failed") == 0 and r.counts.get("real", 0) > 0, "")
    c.add("feature shards", n_feat >= 2, f"{n_feat} feature + {n_real} real shards")
    missing, bad, shapes = [], [], {}
    for kind, indices in units.items():
        for i in indices:
            f = sd.shard_file(kind, i, "safetensors")
            if not (f.exists() and sd.shard_done(kind, i).exists()):
                missing.append(f"{kind}/{i}")
                continue
            for k, t in load_file(str(f)).items():
                shapes.setdefault(f"{kind}.{k}", list(t.shape[1:]))
                if t.is_floating_point() and not torch.isfinite(t.float()).all():
                    bad.append(f"{kind}/{i}:{k}")
    c.add("every shard has its done marker", not missing, f"missing: {missing}" if missing else "")
    c.add("features finite", not bad, f"non-finite: {bad[:5]}" if bad else "")
    c.add("stage marker", sd.done_marker.exists(), "")
    c.add("stage verifies", (v := encode.verify(sd)) is None, v or "")
    spec = cfg.encode.clip
    figures = {"clip": spec.model, "precision": spec.precision, "pool": spec.pool, "feature_shards": n_feat,
               "real_shards": n_real, "images": r.counts.get("images"), "real": r.counts.get("real"),
               "shapes": shapes, "seconds": round(seconds, 2), "images_per_s": r.timings.get("images_per_s"),
               "summary": f"{n_feat}+{n_real} shards of {spec.model} {spec.precision} features, markers "
                          f"{'ok' if not missing else 'MISSING'}, {'finite' if not bad else 'NON-FINITE'}"}
    return figures, c


def _losses(train: StageDir) -> list[tuple[int, float]]:
    from storage import jsonl

    return [(r["step"], float(r["loss"])) for r in jsonl.read(train.metrics_log) if "loss" in r]


def compare_losses(eager: list[tuple[int, float]], other: list[tuple[int, float]], rtol: float, c: Checks) -> float:
    """Both curves finite, logged at the same steps, each logged loss (a mean over log_every steps) within
    `rtol` of eager's, relatively: dropout masks differ under a CUDA graph, so the curves are close, not equal.
    Returns the largest relative difference (inf when the curves cannot be compared)."""
    finite = bool(other) and all(math.isfinite(v) for _, v in other)
    same_steps = bool(eager) and [s for s, _ in eager] == [s for s, _ in other]
    c.add("cuda graphs: same logged steps as eager", same_steps,
          "" if same_steps else f"{[s for s, _ in eager]} vs {[s for s, _ in other]}")
    rel = [abs(a - b) / max(abs(a), 1e-6) for (_, a), (_, b) in zip(eager, other, strict=True)] \
        if same_steps and finite else []
    worst = max(rel) if rel else math.inf
    c.add(f"cuda graphs vs eager: losses within {rtol:g} (relative)", worst <= rtol,
          f"max relative difference {worst:.4f}")
    return worst


def check_train(work: Path, gpu: bool, rtol: float) -> tuple[dict[str, Any], Checks]:
    from pcm.stages.pipeline import resolve, run_pipeline
    from pcm.stages.train import run_train
    from storage.layout import RunLayout

    c = Checks()
    chain = chain_overrides(gpu)
    r = run_pipeline(resolve("tiny", chain), str(work / "runs"), stages=("encode",))  # reused from check-encode
    ov = chain | train_overrides(gpu)
    runs: dict[str, dict[str, Any]] = {}
    for name, extra in [("eager", {}), ("cuda_graphs", {"train.cuda_graphs": True})]:
        if name == "cuda_graphs" and not gpu:
            c.skip("cuda graphs vs eager", "no GPU")
            continue
        cfg = resolve("tiny", ov | extra)
        t0 = time.perf_counter()
        res = run_train(cfg.train, r["ingest"], r["encode"], RunLayout(work / f"train-{name}"))
        seconds = time.perf_counter() - t0
        losses = _losses(res.stage_dir)
        runs[name] = {"seconds": round(seconds, 2), "steps": res.counts.get("steps"), "losses": losses}
        want = ov["train.max_steps"] // ov["train.log_every"]
        c.add(f"{name}: {ov['train.max_steps']} steps", res.counts.get("steps") == ov["train.max_steps"],
              str(res.counts.get("steps")))
        c.add(f"{name}: losses logged", len(losses) == want, f"{len(losses)} of {want}")
        c.add(f"{name}: losses finite", bool(losses) and all(math.isfinite(v) for _, v in losses),
              "" if all(math.isfinite(v) for _, v in losses) else str(losses))
    figures: dict[str, Any] = {"preset": ov["train.preset"], "batch_size": ov["train.batch_size"],
                               "steps": ov["train.max_steps"], "rtol": rtol,
                               "runs": {k: {"seconds": v["seconds"], "first_loss": v["losses"][0][1] if v["losses"] else None,
                                            "last_loss": v["losses"][-1][1] if v["losses"] else None,
                                            "losses": v["losses"]} for k, v in runs.items()}}
    e = runs.get("eager", {}).get("losses", [])
    if "cuda_graphs" in runs:
        g = runs["cuda_graphs"]["losses"]
        worst = compare_losses(e, g, rtol, c)
        figures["max_rel_diff"] = round(worst, 5)
        figures["final_loss_ratio"] = round(g[-1][1] / e[-1][1], 5) if e and g else None
        figures["ratio"] = f"{figures['final_loss_ratio']} graphs/eager loss" if figures["final_loss_ratio"] else "-"
        figures["summary"] = (f"{ov['train.max_steps']} steps: loss {e[-1][1]:.3f} eager, {g[-1][1]:.3f} graphs, "
                              f"max rel diff {worst:.2%}") if e and g else "no losses"
    else:
        figures["summary"] = (f"{ov['train.max_steps']} eager steps: loss {e[0][1]:.3f} -> {e[-1][1]:.3f}"
                              if e else "no losses")
    return figures, c


def internal(name: str, device: str, work: Path, rtol: float) -> int:
    """Run one check in this process; print `GPU_SUITE_RESULT {json}`; exit 1 if a check failed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    gpu = device.startswith("cuda")
    work.mkdir(parents=True, exist_ok=True)
    fn = {"check-synthesize": check_synthesize, "check-encode": check_encode,
          "check-train": lambda w, g: check_train(w, g, rtol)}[name]
    figures, checks = fn(work, gpu)
    figures["checks"] = checks.items
    print(RESULT_PREFIX + json.dumps(figures), flush=True)
    if checks.failed:
        print(f"{name}: failed checks: {', '.join(checks.failed)}", file=sys.stderr)
        return 1
    return 0


# ================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny presets on the CPU (the default without a GPU)")
    ap.add_argument("--out", default=None, help="the JSON (default bench/results/gpu_suite-<card>.json)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole suite's wall-clock budget")
    ap.add_argument("--train-rtol", type=float, default=0.1,
                    help="largest relative difference of a logged loss, CUDA graphs vs eager")
    ap.add_argument("--internal", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.internal:
        return internal(a.internal, a.device, Path(a.work), a.train_rtol)

    started = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if a.cpu_tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU run never touches a GPU, even on a GPU machine
    import torch

    gpu = not a.cpu_tiny and torch.cuda.is_available()
    if not gpu and not a.cpu_tiny:
        print("no CUDA device: running the tiny presets on the CPU (as --cpu-tiny)", flush=True)
        env["CUDA_VISIBLE_DEVICES"] = ""
    mode = "gpu" if gpu else "cpu-tiny"
    card, device, versions = environment(gpu)
    out = Path(a.out) if a.out else RESULTS / (f"gpu_suite-{slug(card)}.json" if gpu else "gpu_suite-cpu-tiny.json")
    print(f"gpu_suite: {mode} on {card}; torch {versions['torch']}, diffusers {versions['diffusers']}, "
          f"open_clip {versions['open_clip']}; budget {a.budget_s:.0f} s", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="pcm-gpu-suite-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        steps = plan(gpu, Path(tmp) / "work")
        for i, step in enumerate(steps):
            remaining = a.budget_s - (time.monotonic() - started)
            if step.skip:
                res = {"name": step.name, "command": step.argv, "status": "skipped", "reason": step.skip,
                       "seconds": None, "timeout_s": None, "figures": {}}
            elif remaining < MIN_STEP_S:
                res = {"name": step.name, "command": step.argv, "status": "skipped",
                       "reason": f"budget spent ({max(remaining, 0):.1f} s left)", "seconds": None,
                       "timeout_s": None, "figures": {}, "budget_spent": True}
            else:
                timeout = step_timeout(steps, i, remaining)
                print(f"[{time.monotonic() - started:6.1f} s] {step.name} (timeout {timeout:.0f} s) ...", flush=True)
                res = run_step(step, timeout, env, logs)
                if res["status"] != "ok":
                    print(f"    {res['status']}: {res['reason']}", flush=True)
                    for ln in res.get("stderr_tail", [])[-8:]:
                        print(f"    | {ln}", flush=True)
            results.append(res)

    wall = round(time.monotonic() - started, 1)
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "failed", "timeout", "skipped")}
    report = {"suite": "bench/gpu_suite.py", "schema": 1, "mode": mode, "card": card, "device": device,
              "versions": versions, "budget_s": a.budget_s, "wall_s": wall, "within_budget": wall <= a.budget_s,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "summary": counts, "table": [list(r) for r in table_rows(results)], "steps": results}
    print()
    print_table(table_rows(results))
    print(f"\n{mode} on {card}: {counts['ok']} ok, {counts['failed']} failed, {counts['timeout']} timed out, "
          f"{counts['skipped']} skipped; {wall:.0f} s of a {a.budget_s:.0f} s budget")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    complete = not any(r.get("budget_spent") for r in results)
    return 0 if counts["failed"] == 0 and counts["timeout"] == 0 and complete else 1


if __name__ == "__main__":
    sys.exit(main())
