"""The train stage: PCM-Net on synthetic-image features with CLIP-weighted cross-entropy, resumable to the bit.

One process (CPU or one GPU) trains in-process; `devices > 1` relaunches this module under
torchrun (DDP, rank 0 writes). Checkpoints hold model, Adam state, data position and RNG
states, so a run killed at any moment resumes where its last checkpoint was; with one process and
`deterministic=True` it ends with bitwise the same weights as an uninterrupted run (DDP reseeds
per rank and step, so it resumes exactly in data order but not to the bit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pcm import checkpoint
from pcm.config import StageConfig
from pcm.model import PCMNetConfig, load_preset
from pcm.stages.stage import ProgressFn, cached, finish, load_result, locked, stage_dir
from storage import atomic, checkpoints
from storage.layout import RunLayout, StageDir
from storage.lock import try_lock
from storage.result import StageResult

log = logging.getLogger(__name__)

CODE_VERSION = "2"  # 2: captions tokenised as the PTB tokenizer cuts them

# `parity = "release"`: the authors' training numerics (X-modaler configs and losses), each a plain
# field or model override that an explicit value still beats. docs/train.md tabulates them.
RELEASE_TRAIN = {"label_smoothing": 0.1, "focal_gamma": 2.0, "loss_reduction": "token-mean"}
RELEASE_MODEL = {"word_embedding": "release", "word_dropout": 0.1, "position_init_std": 0.02}


class TrainConfig(StageConfig):
    """PCM-Net training: model preset + overrides, loss, optimiser, schedule, data, validation, runtime."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset({
        "device", "precision", "num_workers", "compile", "cuda_graphs", "devices", "dist_bind", "deterministic",
        "checkpoint_every", "keep_last", "progress_bar"})

    # Model.
    preset: str = Field("vitl14", description="model preset: vitl14, vitb32, tiny or a .toml path")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of preset fields (e.g. pcm=false)")
    parity: Literal["paper", "release"] = Field(
        "paper", description="paper = the paper's equation and this project's init; release = the authors' "
        "numerics (label smoothing 0.1, focal 2, token mean, their word/position embeddings) where not set")
    # Loss.
    cxe: bool = Field(True, description="CLIP-weighted cross-entropy (off = every caption weighs 1)")
    cxe_w: float = Field(4.0, gt=0, description="w of min(1, w * cos): 4 for ViT-L/14, 2.5 release ViT-B/32")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="0 = paper; 0.1 = release (KL to 1-eps / "
                                   "eps/(V-1))")
    focal_gamma: float = Field(0.0, ge=0, description="0 = off (paper); 2 = release (batch mean of (1-p)^2)")
    loss_reduction: Literal["caption-sum", "token-mean"] = Field(
        "caption-sum", description="caption-sum = paper (sum per caption, mean over captions); token-mean = release")
    min_word_count: int = Field(5, ge=1, description="words seen fewer times become <unk>")
    # Optimiser and schedule.
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    noam_d_model: int = Field(512, gt=0, description="model size of the Noam schedule")
    warmup: int = Field(10_000, gt=0, description="Noam warm-up steps (peak lr ~4.4e-4 for 512 / 10,000)")
    lr_factor: float = Field(1.0, gt=0, le=1000, description="multiplies the Noam learning rate (at most 1000)")
    grad_clip: float | None = Field(0.1, gt=0, description="clip gradients by value; None = off")
    # Data.
    batch_size: int = Field(32, gt=0, description="global batch (split over devices)")
    epochs: int = Field(12, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many steps (demos, tests)")
    data_fraction: float = Field(1.0, gt=0, le=1, description="train on a seeded random fraction of the pairs")
    shuffle_images: bool = Field(False, description="CONTROL, NOT THE METHOD: train each caption on another "
                                 "caption's image (seeded), to measure what the captions alone teach")
    seed: int = Field(0, ge=0, description="seeds the model init, data order and noise")
    # Validation (val split only; test is never touched here) and bookkeeping.
    log_every: int = Field(50, gt=0, description="steps between metrics.jsonl lines")
    val_every: int = Field(2000, gt=0, description="steps between validations (and at the end)")
    val_metric: Literal["cider", "loss"] = Field("cider", description="picks best/: val CIDEr or val loss")
    val_beam: int = Field(1, ge=1, description="1 = greedy decoding for validation, else beam size")
    val_max_images: int | None = Field(1000, gt=0, description="validate on the first N val images; None = all")
    val_batch_size: int = Field(128, gt=0)
    # Runtime (not fingerprinted).
    checkpoint_every: int = Field(1000, gt=0, description="steps between resumable checkpoints")
    keep_last: int = Field(2, ge=1, description="step checkpoints kept")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    num_workers: int = Field(2, ge=0, description="feature loading processes (0 = in the training process)")
    compile: bool = Field(False, description="torch.compile the model")
    devices: int = Field(1, ge=1, description="processes / GPUs; > 1 runs DDP")
    dist_bind: Literal["loopback", "all"] = Field(
        "loopback", description="loopback: the DDP processes meet through a file store on 127.0.0.1 only; all: "
        "torchrun --standalone (its stores listen on every interface)")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (bitwise resumable)")
    cuda_graphs: bool = Field(False, description="capture the whole training step as a CUDA graph (one GPU)")
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _parity_defaults(cls, data: Any) -> Any:
        """Release parity fills the release's value of every piece the config leaves unset."""
        if not isinstance(data, dict) or data.get("parity") != "release":
            return data
        model = data.get("model") or {}
        if not isinstance(model, dict):
            return data
        return {**RELEASE_TRAIN, **data, "model": {**RELEASE_MODEL, **model}}

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each of Adam's betas must be in [0, 1), got {list(v)}")
        return v

    @field_validator("model")
    @classmethod
    def _known_preset_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = set(v) - set(PCMNetConfig.model_fields)
        if unknown:
            raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(PCMNetConfig.model_fields)}")
        return v

    @model_validator(mode="after")
    def _preset_resolves(self) -> TrainConfig:
        try:  # a bad preset name or override fails here, once, at the edge
            self.model_preset()
        except ValidationError as e:
            bad = "; ".join(f"model.{'.'.join(map(str, x['loc']))}: {x['msg']} (got {x.get('input')!r})"
                            for x in e.errors())
            raise ValueError(f"preset {self.preset!r} with overrides is invalid: {bad}") from None
        return self

    def model_preset(self) -> PCMNetConfig:
        return load_preset(self.preset, self.model)

    def content(self) -> dict[str, Any]:
        # Switches added later are left out at their defaults, so ordinary runs keep the fingerprints they had.
        out = super().content()
        for key, default in (("shuffle_images", False), ("parity", "paper"), ("loss_reduction", "caption-sum")):
            if out.get(key) == default:
                out.pop(key, None)
        return out


# ---------------------------------------------------------------------- stage API
def plan(config: TrainConfig, captions: str, encode: str, root: str) -> StageDir:
    """The train stage directory of these inputs (no work)."""
    return stage_dir(RunLayout(root), "train", config, [load_result(captions), load_result(encode)], CODE_VERSION)


def verify(sd: StageDir) -> str | None:
    """None when the final checkpoint, best/ (holding the best step) and metrics.jsonl exist, else what is wrong."""
    latest = checkpoints.latest(checkpoint.checkpoints_dir(sd.path))
    if latest is None:
        return "no checkpoint"
    state = atomic.read_json(latest / "state.json")
    if not state.get("finished"):
        return f"training unfinished ({latest.name})"
    best = checkpoint.best_dir(sd.path)
    if not (best / "model.safetensors").exists() or not (best / "state.json").exists():
        return "no best/ checkpoint"
    want = (state.get("best") or {}).get("step")
    if sd.done_marker.exists():
        marked = (atomic.read_json(sd.done_marker).get("extra") or {}).get("best_step", want)
        if marked != want:
            return f"stage.done.json says best step {marked} but {latest.name} says {want}"
    got = atomic.read_json(best / "state.json").get("step")
    if got != want:
        return f"best/ holds step {got}, not the best step {want}"
    if not sd.file("metrics.jsonl").exists():
        return "no metrics.jsonl"
    return None


def noam_lr(step: int, d_model: int = 512, warmup: int = 10_000, factor: float = 1.0) -> float:
    """Noam schedule: factor * d^-0.5 * min(step^-0.5, step * warmup^-1.5), steps counted from 1."""
    step = max(step, 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def run_train(config: TrainConfig, captions: str, encode: str, root: str, *, force: bool = False,
              progress: ProgressFn | None = None) -> StageResult:
    """Train (or resume) under the stage lock; write stage.done.json last and return the result."""
    sd = plan(config, captions, encode, root)
    if not force and (done := cached(sd, verify)) is not None:
        if (lock := try_lock(sd.lock_file)) is not None:  # a finished stage is tidied too (if nobody works in it)
            try:
                remove_stale_temporaries(sd)
            finally:
                lock.release()
        return done
    with locked(sd):
        started = time.monotonic()
        sd.done_marker.unlink(missing_ok=True)
        remove_stale_temporaries(sd)
        if force:
            for p in (checkpoint.checkpoints_dir(sd.path), checkpoint.best_dir(sd.path)):
                shutil.rmtree(p, ignore_errors=True)
            sd.file("metrics.jsonl").unlink(missing_ok=True)
        if config.devices > 1 and "WORLD_SIZE" not in os.environ:
            from pcm import distributed

            total = total_steps_hint(sd)
            poll = (lambda: _report_from_metrics(sd, total, progress)) if progress else None
            distributed.launch(["pcm.stages.train", "--config", config.model_dump_json(), "--captions", str(captions),
                                "--encode", str(encode), "--root", str(root)], config.devices, poll,
                               bind=config.dist_bind)
        else:
            train_worker(config, captions, encode, sd, progress=progress)
        return _finish(sd, started)


# A plan() of another process writes config.json without the stage lock (in milliseconds): its
# temporaries go only once this old.
CONFIG_TMP_MIN_AGE_S = 60.0


def remove_stale_temporaries(sd: StageDir) -> int:
    """Delete what killed writers of this stage left: temporaries of config.json, metrics.jsonl,
    stage.done.json, pictures/loss_curve.png, best/ and the step checkpoints (call it holding the stage lock)."""
    n = atomic.remove_temporaries_of(sd.config_file, min_age=CONFIG_TMP_MIN_AGE_S)
    for path in (sd.file("metrics.jsonl"), sd.done_marker, sd.pictures / "loss_curve.png"):
        n += atomic.remove_temporaries_of(path)
    n += checkpoints.remove_leftovers(sd.file("best"))
    n += checkpoints.remove_step_leftovers(checkpoint.checkpoints_dir(sd.path))
    if n:
        log.info("%s: removed %d temporaries left by killed writers", sd.path, n)
    return n


def total_steps_hint(sd: StageDir) -> int:
    """Steps planned, as the workers record them in metrics.jsonl's first line (0 before it exists)."""
    for rec in read_metrics(sd.file("metrics.jsonl")):
        if "total_steps" in rec:
            return int(rec["total_steps"])
    return 0


def _report_from_metrics(sd: StageDir, total: int, progress: ProgressFn) -> None:
    recs = [r for r in read_metrics(sd.file("metrics.jsonl")) if "loss" in r]
    total = total or total_steps_hint(sd)
    if recs and total:
        progress(recs[-1]["step"], total, f"loss {recs[-1]['loss']:.3f}")


def _finish(sd: StageDir, started: float) -> StageResult:
    latest = checkpoints.latest(checkpoint.checkpoints_dir(sd.path))
    state = atomic.read_json(latest / "state.json")
    pictures = {"loss_curve": str(plot_metrics(sd))}
    extra = {"best": str(checkpoint.best_dir(sd.path)), "latest": str(latest),
             "clip": atomic.read_json(latest / "clip.json"), "val_metric": state["best"]["metric"],
             "best_value": state["best"]["value"], "best_step": state["best"]["step"], "pictures": pictures}
    counts = {"steps": state["step"], "train_pairs": state["train_pairs"], "val_images": state["val_images"],
              "vocab": state["vocab"]}
    return finish(sd, counts, started, extra)


# ---------------------------------------------------------------------- metrics file
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The whole lines of metrics.jsonl (a torn last line from a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the lines up to `step` (the checkpoint being resumed); later ones are redone."""
    if path.exists():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def plot_metrics(sd: StageDir) -> Path:
    """pictures/loss_curve.png: training loss per step and the validation metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(sd.file("metrics.jsonl"))
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val"]) for r in recs if "val" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (CXE)", color="tab:blue")
    if val:
        ax2 = ax.twinx()
        metric = next((r["val_metric"] for r in recs if "val" in r), "")
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange")
        ax2.set_ylabel(f"validation {metric}", color="tab:orange")
    ax.set_title("PCM-Net training")
    fig.tight_layout()
    out = sd.pictures / "loss_curve.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


# ---------------------------------------------------------------------- the training loop
def resolve_device(spec: str, local_rank: int = 0):
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def train_worker(config: TrainConfig, captions: str, encode: str, sd: StageDir, progress: ProgressFn | None = None) -> None:
    """The training loop of one process (rank 0 writes checkpoints, best/ and metrics.jsonl)."""
    import torch
    from tqdm import tqdm

    from pcm import dataset, distributed
    from pcm.model import PCMNet
    from pcm.vocab import Vocab

    info = distributed.from_env()
    device = resolve_device(config.device, info.local_rank)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    distributed.setup(info, device)
    try:
        # Data, vocabulary, concepts and the model config fitted to the feature shapes.
        pairs = dataset.load_pairs(captions, encode, config.data_fraction, config.seed)
        enc = StageDir.at(encode)
        store = dataset.FeatureStore(enc, "features")
        store.check_rows(pairs.shard, pairs.row, pairs.caption_ids)
        if config.shuffle_images:
            log.warning("train.shuffle_images: a control run; every caption is paired with another caption's image")
            pairs = pairs.with_images_shuffled(config.seed)
        d_embed, d_width, n_patches = store.shapes(int(pairs.shard[0]))
        names, bank = dataset.load_concepts(encode)
        head, head_meta = dataset.load_clip_head(encode)
        cfg = config.model_preset().with_data_shapes(d_embed, d_width, n_patches, str(enc.path))
        if "ln_eps" in head_meta:
            cfg = cfg.model_copy(update={"clip_ln_eps": float(head_meta["ln_eps"])})
        clip_spec = load_result(encode).extra.get("clip") or json.loads(head_meta.get("clip", "{}"))
        vocab = Vocab.build(pairs.texts, config.min_word_count)
        inputs, targets = dataset.caption_tokens(pairs.texts, vocab, cfg.max_len)
        val = dataset.load_val(captions, encode, config.val_max_images)
        val_store = dataset.FeatureStore(enc, "real")
        if len(val):
            val_store.check_rows(val.shard, val.row, val.image_ids)
            if config.val_metric == "cider":
                from pcm.metrics import require_java

                require_java()  # fail now, not at the first validation
        if len(val) == 0:
            log.warning("%s: no encoded val images (encode ran without real images or ingest has no val split); "
                        "validation is skipped and best/ holds the final model", enc.path)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = PCMNet(cfg, len(vocab), bank, head).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if config.cuda_graphs and (device.type != "cuda" or info.world > 1):
            raise ValueError("cuda_graphs needs one CUDA device (devices=1, device=cuda)")
        opt = make_optimizer(params, config, device, capturable=config.cuda_graphs)
        batches = dataset.EpochBatches(pairs, store, inputs, targets, config.batch_size, config.seed, info.rank,
                                       info.world)
        total = len(batches) * config.epochs
        total = min(total, config.max_steps) if config.max_steps else total
        higher_better = config.val_metric == "cider"

        # Fresh start or resume from the latest checkpoint (model, Adam, position, best, RNG).
        ckpt_root = checkpoint.checkpoints_dir(sd.path)
        metrics_path = sd.file("metrics.jsonl")
        latest = checkpoints.latest(ckpt_root)
        state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "finished": False,
                                 "best": {"metric": config.val_metric, "value": None, "step": None}}
        if latest is not None:
            state = checkpoint.load_weights(latest, model, opt)
            saved_vocab = Vocab.load(latest / "vocab.json")
            if saved_vocab.words != vocab.words:
                raise ValueError(f"{latest}: its vocabulary differs from the one built from the data; "
                                 "the inputs changed under this stage directory; rerun with --force")
            if info.world == 1:
                checkpoint.set_rng_state(state["rng"])
            else:  # ranks draw different dropout masks; resume reseeds them from (seed, rank, step)
                torch.manual_seed(hash((config.seed, info.rank, state["step"])) % 2**63)
            log.info("resuming %s at step %d (epoch %d, batch %d)", sd.path, state["step"], state["epoch"],
                     state["position"])
            if info.is_main:
                repair_best(sd, latest, state)
        else:
            torch.manual_seed(config.seed + 1 + info.rank)
        if info.is_main:
            if latest is not None:
                truncate_metrics(metrics_path, state["step"])
            else:  # lines of a run killed before its first checkpoint are redone
                metrics_path.unlink(missing_ok=True)
                append_metrics(metrics_path, {"step": 0, "total_steps": total, "train_pairs": len(pairs),
                                              "val_images": len(val), "vocab": len(vocab), "val_metric": config.val_metric})

        net = distributed.wrap(model, info, device)
        if config.compile:
            net = torch.compile(net)
        amp = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        train_step = TrainStep(net, opt, params, config, vocab.pad, device, amp, config.cuda_graphs)

        def save(step: int, epoch: int, position: int, finished: bool) -> None:
            common = {"train_pairs": len(pairs), "val_images": len(val), "vocab": len(vocab),
                      "scheduler": {"kind": "noam", "d_model": config.noam_d_model, "warmup": config.warmup,
                                    "factor": config.lr_factor}}
            record = {**common, "step": step, "epoch": epoch, "position": position, "finished": finished,
                      "best": state["best"], "rng": checkpoint.rng_state()}
            checkpoint.save(ckpt_root / checkpoints.step_name(step), model=model, vocab=vocab,
                            config=config.model_dump(mode="json"), clip=clip_spec, concept_names=names,
                            state=record, optimizer=opt)
            checkpoints.prune(ckpt_root, config.keep_last)

        def validate(step: int, last: bool) -> bool:
            """Score the val split; True when this step is the best so far (then best/ is written)."""
            if len(val) == 0:  # nothing to select on: best/ is the final model
                better = last
                state["best"] = {"metric": "none", "value": None, "step": step} if last else state["best"]
            else:
                value = evaluate_val(model, vocab, val, val_store, config, device, autocast)
                best = state["best"]
                better = best["value"] is None or (value > best["value"] if higher_better else value < best["value"])
                append_metrics(metrics_path, {"step": step, "val": value, "val_metric": config.val_metric})
                if better:
                    state["best"] = {"metric": config.val_metric, "value": value, "step": step}
            return better

        def save_best(step: int) -> None:
            checkpoint.save(checkpoint.best_dir(sd.path), model=model, vocab=vocab,
                            config=config.model_dump(mode="json"), clip=clip_spec, concept_names=names,
                            state={"step": step, "epoch": state["epoch"], "best": state["best"]})

        step, epoch, position = state["step"], state["epoch"], state["position"]
        bar = tqdm(total=total, initial=step, desc="train", unit="step",
                   disable=not (config.progress_bar and info.is_main))
        loss_sum, loss_n, t_log = torch.zeros((), device=device), 0, time.monotonic()
        model.train()
        while step < total:
            batches.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                batches, batch_size=None, sampler=range(position, len(batches)), num_workers=config.num_workers,
                pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(config.seed),
                persistent_workers=False)
            for batch in loader:
                b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                step, position = step + 1, position + 1
                loss = train_step(b, noam_lr(step, config.noam_d_model, config.warmup, config.lr_factor))
                loss_sum += loss
                loss_n += 1
                bar.update(1)

                if position == len(batches):  # the epoch is done: the next position is the next epoch's start
                    epoch, position = epoch + 1, 0
                state.update(step=step, epoch=epoch, position=position)
                last = step >= total
                if step % config.log_every == 0 or last:
                    mean_loss = float(distributed.mean(loss_sum / loss_n, info))
                    now = time.monotonic()
                    if info.is_main:
                        lr = noam_lr(step, config.noam_d_model, config.warmup, config.lr_factor)
                        append_metrics(metrics_path, {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                                                      "samples_per_s": loss_n * config.batch_size / (now - t_log)})
                        bar.set_postfix(loss=f"{mean_loss:.3f}")
                        if progress:
                            progress(step, total, f"loss {mean_loss:.3f}")
                    loss_sum, loss_n, t_log = torch.zeros((), device=device), 0, now
                do_val, do_save = step % config.val_every == 0 or last, step % config.checkpoint_every == 0 or last
                better = False
                if info.is_main and do_val:
                    model.eval()
                    better = validate(step, last)
                    model.train()
                # A new best is always checkpointed, and that step checkpoint first: a kill before best/
                # is written leaves a checkpoint that names it, and the resume writes best/ from it.
                if info.is_main and (do_save or better):
                    save(step, epoch, position, finished=last)
                if better:
                    save_best(step)
                if do_val or do_save:  # the other ranks wait for rank 0's writes
                    distributed.barrier(info)
                    t_log = time.monotonic()  # samples/s counts training time only
                if last:
                    break
        bar.close()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        distributed.teardown(info)


def repair_best(sd: StageDir, latest: Path, state: dict[str, Any]) -> None:
    """Make best/ hold the step that the resumed checkpoint's state names as best.

    The best step's checkpoint is written before best/ (see the loop), so a kill between the two
    leaves `latest` naming a best step that best/ does not hold yet: best/ is written from that
    step's checkpoint (byte-identical to what the loop would have written).
    """
    best_step = state["best"]["step"]
    if best_step is None:
        return
    best = checkpoint.best_dir(sd.path)
    held = atomic.read_json(best / "state.json").get("step") if (best / "state.json").exists() else None
    if held == best_step:
        return
    source = dict(checkpoints.list_steps(checkpoint.checkpoints_dir(sd.path))).get(best_step)
    if source is None:
        raise ValueError(f"{sd.path}: best/ holds step {held} but {latest.name} says the best is step {best_step}, "
                         "whose checkpoint is gone; rerun with --force")
    src_state = checkpoint.read_state(source)
    log.warning("%s: best/ holds step %s, not the best step %d (a kill before it was written); writing it from %s",
                sd.path, held, best_step, source.name)
    checkpoint.export(source, best, {"step": best_step, "epoch": src_state["epoch"], "best": state["best"]})


def make_optimizer(params: list, config: TrainConfig, device: Any, capturable: bool = False) -> Any:
    """Adam as the paper sets it (fused on GPU); `capturable` keeps its state on the GPU for CUDA graphs."""
    import torch

    return torch.optim.Adam(params, lr=noam_lr(1, config.noam_d_model, config.warmup, config.lr_factor),
                            betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                            fused=device.type == "cuda", capturable=capturable)


class TrainStep:
    """One optimisation step: forward (bf16 autocast on GPU), CXE loss, backward, clip by value, Adam.

    With `cuda_graph` the whole step is captured once, after `WARMUP` eager steps on a side stream,
    and replayed from then on: at the paper's batch of 32 a step is bound by kernel-launch
    overhead, not by FLOPs. Batches are copied into static buffers; the learning rate lives in a
    GPU tensor the graph reads.
    """

    WARMUP = 3

    def __init__(self, net: Any, opt: Any, params: list, config: TrainConfig, pad: int, device: Any, amp: bool,
                 cuda_graph: bool = False) -> None:
        import torch

        self.net, self.opt, self.params, self.config, self.pad = net, opt, params, config, pad
        self.device, self.amp, self.cuda_graph = device, amp, cuda_graph
        self.calls, self.graph, self.static, self.static_loss = 0, None, None, None
        if cuda_graph:
            for group in opt.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)

    def _set_lr(self, lr: float) -> None:
        import torch

        for group in self.opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _forward_backward(self, b: dict) -> Any:
        import torch

        from pcm.loss import caption_loss, clip_weights

        # No autocast weight cache: a captured graph must recompute the casts at every replay.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            logits = self.net(b["global"], b["patches"], b["inputs"])
        c = self.config
        loss = caption_loss(logits, b["targets"], clip_weights(b["clip_score"], c.cxe_w, c.cxe), pad=self.pad,
                            label_smoothing=c.label_smoothing, focal_gamma=c.focal_gamma, reduction=c.loss_reduction)
        loss.backward()
        if c.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(self.params, c.grad_clip)
        self.opt.step()
        return loss.detach()

    def __call__(self, batch: dict, lr: float) -> Any:
        """Train on one batch (tensors on the device) at learning rate `lr`; returns the loss tensor."""
        import torch

        self._set_lr(lr)
        if not self.cuda_graph:
            self.opt.zero_grad(set_to_none=True)
            return self._forward_backward(batch)
        if self.static is None:
            self.static = {k: v.clone() for k, v in batch.items()}
        else:
            for k, v in batch.items():
                self.static[k].copy_(v, non_blocking=True)
        self.calls += 1
        if self.calls <= self.WARMUP:  # eager steps on a side stream, as capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                loss = self._forward_backward(self.static)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.opt.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_loss = self._forward_backward(self.static)
        self.graph.replay()
        return self.static_loss


def evaluate_val(model, vocab, val, store, config: TrainConfig, device, autocast) -> float:
    """Validation score on the real val images: CIDEr of decoded captions, or the caption loss."""
    import numpy as np
    import torch

    from pcm.loss import caption_loss

    predictions: dict[str, str] = {}
    losses: list[float] = []
    with torch.no_grad(), autocast:
        for start in range(0, len(val), config.val_batch_size):
            sl = slice(start, start + config.val_batch_size)
            g, v = store.gather(val.shard[sl], val.row[sl])
            g, v = g.to(device), v.to(device)
            if config.val_metric == "cider":
                from pcm.decode import beam_search, greedy_decode

                if config.val_beam == 1:
                    ids = greedy_decode(model, g, v, bos=vocab.bos, eos=vocab.eos, banned=vocab.banned,
                                        max_len=model.cfg.max_len)
                else:
                    ids = beam_search(model, g, v, bos=vocab.bos, eos=vocab.eos, banned=vocab.banned,
                                      beam_size=config.val_beam, max_len=model.cfg.max_len)
                predictions.update({k: vocab.decode(s) for k, s in zip(val.image_ids[sl], ids, strict=True)})
            else:
                from pcm.dataset import caption_tokens

                refs = val.references[sl]
                which = np.repeat(np.arange(len(refs)), [len(r) for r in refs])
                inp, out = caption_tokens([t for r in refs for t in r], vocab, model.cfg.max_len)
                memory, pad = model.encode(g, v)
                logits = model.decode(torch.from_numpy(inp).to(device), memory[which], pad[which])
                n = len(which)
                losses.append(float(caption_loss(logits, torch.from_numpy(out).to(device), pad=vocab.pad)) * n)
    if config.val_metric == "loss":
        return sum(losses) / sum(len(r) for r in val.references)
    from pcm.metrics import score_cider

    return score_cider(predictions, dict(zip(val.image_ids, val.references, strict=True)))


# ---------------------------------------------------------------------- torchrun entry point
def main(argv: list[str] | None = None) -> None:
    """`python -m pcm.stages.train --config JSON --captions DIR --encode DIR --root DIR` (one torchrun worker)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pcm.stages.train", description=main.__doc__)
    p.add_argument("--config", required=True, help="TrainConfig as JSON")
    p.add_argument("--captions", required=True)
    p.add_argument("--encode", required=True)
    p.add_argument("--root", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TrainConfig.model_validate_json(a.config)
    train_worker(config, a.captions, a.encode, plan(config, a.captions, a.encode, a.root))


if __name__ == "__main__":
    main(sys.argv[1:])
