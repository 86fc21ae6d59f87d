"""The run layout: the only place that knows directory and file names.

    <root>/<stage>/<fingerprint>/
        stage.done.json                 the stage's result, written last (the stage is complete)
        config.json                     the config and inputs that made the fingerprint
        .lock                           the stage lock (holder written inside)
        captions.parquet                ingest
        shards/shard-NNNNNN.tar         synthesize: WebDataset shards
        shards/shard-NNNNNN.status.parquet   one status row per sample of the shard
        shards/shard-NNNNNN.done.json   marker, written after the tar is in place
        samples.parquet                 synthesize: all status rows (written at the end)
        faithfulness.json               synthesize: toy-world images vs their captions (written after the stage)
        README.md                       synthesize: the dataset card (Hugging Face Hub YAML header), before the marker
        features/shard-NNNNNN.safetensors    encode: synthetic image features (+ .done.json)
        real/shard-NNNNNN.safetensors        encode: real val/test image features (+ .done.json)
        scores.parquet, real.parquet, concepts.parquet, clip_head.safetensors   encode
        pairs.parquet                   refine (optional): each training caption's image, score, kept/dropped
        checkpoints/step-NNNNNNNN/, best/, metrics.jsonl   train
        events/<run name>/events.out.tfevents.*   train, evaluate: TensorBoard's view of the metrics
        predictions.json, metrics.json, per_image.parquet, report.md   evaluate
        pictures/                       figures (grids, histograms, curves) viewable without Prefect

Parquet files are named with their schema in storage/manifests.py; the files inside a checkpoint
directory in storage/checkpoints.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage import atomic, remote

# The run order. refine is optional: the pipeline skips it unless its config enables it (pcm.stages.pipeline).
STAGES = ("ingest", "synthesize", "encode", "refine", "train", "evaluate")
SHARD_DIGITS = 6
_FINGERPRINT = re.compile(r"^[0-9a-f]{8,64}$")
STAGE_LOCK = ".lock"   # in a stage directory
DONE_MARKER = "stage.done.json"   # in a stage directory: its result, written last


def shard_lock_of(shard_file: Path) -> Path:
    """The lock of the shard a file belongs to: `shards/shard-000003.tar` -> `shards/.shard-000003.lock`."""
    return shard_file.parent / f".{shard_file.name.split('.', 1)[0]}.lock"


@dataclass(frozen=True)
class StageDir:
    """One stage output directory `<root>/<stage>/<fingerprint>` and the names inside it.

    `record` is what its config.json is to hold (stage, code version, config, inputs) when planning
    computed this StageDir (pcm.stages.contract.stage_dir; written by open_stage, never by planning);
    None for one found on disk (`at`, `stage_dirs`, `inputs`). It is not part of the identity.
    """

    path: Path
    stage: str
    fingerprint: str
    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    # -- whole-stage files ------------------------------------------------------------
    @property
    def done_marker(self) -> Path:
        return self.path / DONE_MARKER

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def lock_file(self) -> Path:
        return self.path / STAGE_LOCK

    @property
    def pictures(self) -> Path:
        return self.path / "pictures"

    @property
    def root(self) -> Path:
        """The run root this stage directory lies in (`<root>/<stage>/<fingerprint>`); `run_root_of` spells it as
        a path or URL names the directory."""
        return self.path.parent.parent

    # -- named outputs that are not Parquet manifests (those are in storage/manifests.py) ------
    @property
    def checkpoints(self) -> Path:
        """train: `checkpoints/step-NNNNNNNN/` directories."""
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        """train: the checkpoint of the best validation score."""
        return self.path / "best"

    @property
    def metrics_log(self) -> Path:
        """train: one JSON line per logged step and validation."""
        return self.path / "metrics.jsonl"

    @property
    def events(self) -> Path:
        """train, evaluate: TensorBoard event files, one run directory inside (`tensorboard --logdir <root>`)."""
        return self.path / "events"

    def events_run(self, name: str) -> Path:
        """The run directory under events/: the one already there (a resumed run keeps the name it started
        with), else `events/<name>`."""
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"invalid events run name {name!r}")
        found = sorted(p for p in self.events.iterdir() if p.is_dir()) if self.events.is_dir() else []
        return found[0] if found else self.events / name

    @property
    def faithfulness(self) -> Path:
        """synthesize (toy world): how faithful the images are to their captions, judged by the toy CLIP;
        written after the stage is done, on demand, and not part of it (pcm.toyworld.faithfulness)."""
        return self.path / "faithfulness.json"

    @property
    def card(self) -> Path:
        """synthesize: the dataset card (`README.md`, the Hub's YAML header then prose; pcm.cards), so the stage
        directory is what `hf upload --repo-type dataset` takes; train's model card is in best/ (storage.checkpoints)."""
        return self.path / "README.md"

    @property
    def clip_head(self) -> Path:
        """encode: the CLIP projection and logit scale the model needs at caption time."""
        return self.path / "clip_head.safetensors"

    @property
    def predictions(self) -> Path:
        """evaluate: image id -> generated caption."""
        return self.path / "predictions.json"

    @property
    def metrics(self) -> Path:
        """evaluate: corpus scores, protocol and caveats."""
        return self.path / "metrics.json"

    @property
    def report(self) -> Path:
        """evaluate: the human-readable report."""
        return self.path / "report.md"

    def picture(self, name: str) -> Path:
        """A figure under pictures/ (`samples.png`, `loss_curve.png`, ...)."""
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"invalid picture name {name!r}")
        return self.pictures / name

    @property
    def samples_picture(self) -> Path:
        """synthesize: a grid of generated images; evaluate: real images with their captions."""
        return self.picture("samples.png")

    @property
    def clip_scores_picture(self) -> Path:
        """encode: the histogram of the synthetic images' CLIP scores."""
        return self.picture("clip_scores.png")

    @property
    def pairs_picture(self) -> Path:
        """refine: captions with their original and their re-assigned synthetic image."""
        return self.picture("pairs.png")

    @property
    def loss_curve_picture(self) -> Path:
        """train: the training loss and validation curve."""
        return self.picture("loss_curve.png")

    def file(self, name: str) -> Path:
        """A named output of this stage (`captions.parquet`, `metrics.json`, ...)."""
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"invalid output file name {name!r}")
        return self.path / name

    # -- shards -----------------------------------------------------------------------
    def shard_dir(self, kind: str) -> Path:
        """`shards` (synthetic images), `features` (synthetic features), `real` (real features)."""
        if kind not in ("shards", "features", "real"):
            raise ValueError(f"unknown shard kind {kind!r}; expected shards, features or real")
        return self.path / kind

    def shard_name(self, index: int) -> str:
        return shard_name(index)

    def shard_file(self, kind: str, index: int, suffix: str) -> Path:
        """E.g. shard_file("shards", 3, "tar") -> shards/shard-000003.tar."""
        return self.shard_dir(kind) / f"{self.shard_name(index)}.{suffix}"

    def shard_done(self, kind: str, index: int) -> Path:
        return self.shard_file(kind, index, "done.json")

    def shard_lock(self, kind: str, index: int) -> Path:
        return shard_lock_of(self.shard_file(kind, index, "done.json"))

    def shard_glob(self, kind: str, suffix: str) -> str:
        """`<kind>/shard-*.<suffix>`: every shard file of a kind, as a glob pattern relative to the stage directory."""
        return f"{self.shard_dir(kind).name}/shard-*.{suffix}"

    def shard_count(self, kind: str, suffix: str) -> int:
        """How many `<kind>/shard-*.<suffix>` files are on disk (finished or not: the markers say which are done)."""
        return len(list(self.path.glob(self.shard_glob(kind, suffix))))

    def image_shard(self, index: int) -> Path:
        """synthesize: `shards/shard-NNNNNN.tar`."""
        return self.shard_file("shards", index, "tar")

    def feature_shard(self, kind: str, index: int) -> Path:
        """encode: `features/` or `real/` `shard-NNNNNN.safetensors`."""
        return self.shard_file(kind, index, "safetensors")

    def is_complete(self) -> bool:
        return self.done_marker.exists()

    def inputs(self) -> list[StageDir]:
        """The stage directories this one was made from, as its config.json records them (none without one)."""
        if not self.config_file.exists():
            return []
        recorded = atomic.read_json(self.config_file).get("inputs", {})
        return [StageDir(self.root / stage / fp, stage, fp) for stage, fp in recorded.items()
                if stage in STAGES and _FINGERPRINT.match(str(fp))]

    def lineage(self, stage: str) -> list[StageDir]:
        """Every directory of `stage` upstream of this one (through the config.json inputs), nearest first."""
        found, todo, seen = [], list(self.inputs()), set()
        while todo:
            sd = todo.pop(0)
            if sd.path in seen:
                continue
            seen.add(sd.path)
            if sd.stage == stage:
                found.append(sd)
            else:
                todo.extend(sd.inputs())
        return found

    @classmethod
    def at(cls, path: str | os.PathLike) -> StageDir:
        """The StageDir of an existing `<root>/<stage>/<fingerprint>` path, or of its URL on an object-store root.

        A URL names this worker's working copy (storage.remote), brought up to date from the store the first
        time this process names it, once its marker is there (image shards are fetched as they are read).
        """
        p = remote.local_path(path).resolve()
        sd = cls(p, p.parent.name, p.name)
        if remote.is_url(path):
            remote.fetch_stage_once(sd.path, sd.done_marker)
        return sd


def shard_name(index: int) -> str:
    """A shard's name (`shard-000003`), the stem of its files in every stage's shard folder."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"shard-{index:0{SHARD_DIGITS}d}"


def run_root_of(path: str | os.PathLike) -> str:
    """The run root of a stage directory `<root>/<stage>/<fingerprint>`, spelt as `path` is: a URL's is a URL (where
    `StageDir.root` is this worker's working copy), a local one the resolved path."""
    if remote.is_url(path):
        return str(path).rstrip("/").rsplit("/", 2)[0]
    return str(Path(path).resolve().parent.parent)


@dataclass(frozen=True)
class RunLayout:
    """All runs under one root: a local or mounted path, or an fsspec URL (`s3://bucket/prefix`).

    `root` is always local: for a URL, this worker's working copy of it (storage.remote).
    """

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        if str(root).startswith("file:"):  # Path("file:///x") is the relative folder ./file:/x
            raise ValueError(f"run root {str(root)!r}: give a local root as a path (/{str(root)[5:].lstrip('/')}), "
                             "not a file: URL")
        local = remote.local_root(str(root)) if remote.is_url(root) else Path(root).expanduser().resolve()
        object.__setattr__(self, "root", local)

    def stage(self, stage: str, fingerprint: str) -> StageDir:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        if not _FINGERPRINT.match(fingerprint):
            raise ValueError(f"invalid fingerprint {fingerprint!r}: expected lowercase hex")
        return StageDir(self.root / stage / fingerprint, stage, fingerprint)

    def stage_dirs(self, stage: str) -> list[StageDir]:
        """The directories of `stage` under this root (finished or not), by fingerprint."""
        parent = self.root / stage
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        found = sorted(p for p in parent.iterdir() if p.is_dir() and _FINGERPRINT.match(p.name)) if parent.is_dir() else []
        return [StageDir(p, stage, p.name) for p in found]

    def stage_from_path(self, path: str | os.PathLike) -> StageDir:
        """The StageDir for an existing `<root>/<stage>/<fingerprint>` path."""
        sd = StageDir.at(path)
        return self.stage(sd.stage, sd.fingerprint)  # validated: a known stage, a hex fingerprint


def experiment_record(records: str | os.PathLike, level: str, arm: str, seed: int) -> Path:
    """An experiment's record of one finished arm and seed: `<records>/<level>/<arm>/seed-<n>.json`
    (`+` in an arm's name is spelt `plus-`, so `+PCM` is `plus-PCM`)."""
    parts = [level, arm.replace("+", "plus-")]
    if any(not re.fullmatch(r"[A-Za-z0-9_.-]+", p) or p.startswith(".") for p in parts) or seed < 0:
        raise ValueError(f"invalid experiment record name {level!r} / {arm!r} / seed {seed}")
    return Path(records, *parts, f"seed-{seed}.json")


def experiment_records(records: str | os.PathLike) -> list[Path]:
    """Every record under `records` that `experiment_record` names, sorted."""
    return sorted(Path(records).glob("*/*/seed-*.json"))
