"""One process of the train stage: its data, model and Adam (setup), the linear loop, validation and checkpoints.

`pcm.stages.train` holds the stage (config, plan, verify, run_train) and calls `train_worker` in its own
process, or relaunches itself under torchrun, whose every rank calls it. Rank 0 writes the step
checkpoints, best/, metrics.jsonl and the event files; a run resumes from its latest checkpoint
(published as written on an object-store root, so on another host too).

Every `config` here is the stage's TrainConfig. It is annotated as its base class, StageConfig, because this
module imports nothing of the stage: the stage imports the worker, never the other way round (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcm import checkpoint
from pcm.config import StageConfig
from pcm.device import resolve_device
from pcm.model import PCMNetConfig
from pcm.optim import OptimizerSpec, StepSpec, TrainStep, make_optimizer, noam_lr
from pcm.split_images import load_split_images
from pcm.stages.contract import ProgressFn
from pcm.validation import evaluate_val
from storage import atomic, checkpoints, jsonl, publish
from storage.layout import StageDir
from storage.result import StageResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainInputs:
    """What a train stage reads: the finished ingest and encode stages, a refine stage's pairs (optional), and
    validation on another data set (its ingest and real-only encode results; optional)."""

    captions: StageResult
    encode: StageResult
    refine: StageResult | None = None
    val: tuple[StageResult, StageResult] | None = None

    @property
    def val_source(self) -> tuple[StageResult, StageResult]:
        """The (ingest, encode) results whose val split picks best/."""
        return self.val or (self.captions, self.encode)


def warmup_steps(config: StageConfig, total: int) -> int:
    """The run's warm-up: `warmup_fraction` of its `total` steps (at least 1) when set, else `warmup`."""
    return max(1, round(config.warmup_fraction * total)) if config.warmup_fraction else config.warmup


def lr_at(config: StageConfig, step: int, warmup: int | None = None) -> float:
    """The Noam learning rate of `step` under this config (`warmup`: the run's, see warmup_steps)."""
    return noam_lr(step, config.noam_d_model, warmup or config.warmup, config.lr_factor)


def optimizer_spec(config: StageConfig, warmup: int | None = None) -> OptimizerSpec:
    """Adam's settings of this config, starting at the schedule's step-1 rate."""
    return OptimizerSpec(lr=lr_at(config, 1, warmup), betas=config.betas, eps=config.eps,
                         weight_decay=config.weight_decay)


def step_spec(config: StageConfig, cxe_w: float | None = None) -> StepSpec:
    """The loss and clipping settings of this config (`cxe_w`: the resolved w when the config says auto)."""
    if cxe_w is None:
        if config.cxe_w == "auto":
            raise ValueError("cxe_w = 'auto' is resolved from the training pairs: pass the resolved w")
        cxe_w = config.cxe_w
    return StepSpec(cxe=config.cxe, cxe_w=cxe_w, label_smoothing=config.label_smoothing,
                    focal_gamma=config.focal_gamma, loss_reduction=config.loss_reduction, grad_clip=config.grad_clip)


@dataclass
class TrainData:
    """What the inputs give a run: the pairs and their tokens, the val split, vocabulary, concepts, CLIP head."""

    pairs: Any            # dataset.Pairs (synthetic image features x captions)
    store: Any            # their FeatureStore
    inputs: Any           # decoder input / target token ids, one row per pair
    targets: Any
    val: Any              # split_images.SplitImages: the real val images and their references (possibly none)
    val_store: Any
    vocab: Any
    model_config: PCMNetConfig  # the preset fitted to the feature shapes
    names: list[str]      # concept names and their CLIP text embeddings
    bank: Any
    head: Any             # CLIP's ln_post and proj
    clip_spec: dict[str, Any]
    cxe: dict[str, Any]   # w as used (auto resolved) and the weights it gives the pairs (mean, share 0, share 1)
    reference: Any = None  # pcm.confidence.Reference: the training distribution saved with every checkpoint


@dataclass
class Run:
    """One process's run as setup builds it; the loop advances the last four (what a checkpoint records)."""

    config: StageConfig
    sd: StageDir
    info: Any             # distributed.DistInfo
    device: Any
    data: TrainData
    model: Any            # the PCMNet (what is saved) ...
    opt: Any
    train_step: TrainStep  # ... and the step over its DDP / compiled wrapper
    batches: Any          # dataset.EpochBatches
    total: int
    warmup: int           # the run's warm-up steps (warmup_steps)
    autocast: Any         # bf16 autocast or a null context, for validation
    step: int
    epoch: int
    position: int         # next batch of the epoch
    best: dict[str, Any]  # {"metric", "value", "step"} of the best validation so far
    events: Any = None    # pcm.tracking.EventLog on rank 0, else None


def train_worker(config: StageConfig, inputs: TrainInputs, sd: StageDir, progress: ProgressFn | None = None) -> None:
    """The training of one process (rank 0 writes checkpoints, best/ and metrics.jsonl)."""
    import torch

    from pcm import distributed

    info = distributed.from_env()
    device = torch.device(resolve_device(config.device, info.local_rank))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    distributed.setup(info, device)
    try:
        run = setup(config, inputs, sd, info, device)
        try:
            train_loop(run, progress)
        finally:
            if run.events is not None:
                run.events.close()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        distributed.teardown(info)


def load_data(config: StageConfig, inputs: TrainInputs) -> TrainData:
    """Pairs (a refine stage's when given), vocabulary, concepts, CLIP head and the val split (another data
    set's with `inputs.val`), checked against the feature shards."""
    from pcm import confidence, dataset
    from pcm.vocab import Vocab

    captions, encode, refine = inputs.captions, inputs.encode, inputs.refine
    enc = encode.stage_dir
    pairs = dataset.load_pairs(captions.stage_dir, enc, config.data_fraction, config.seed,
                               refine=refine.stage_dir if refine else None)
    store = dataset.FeatureStore(enc, "features")
    store.check_rows(pairs.shard, pairs.row, pairs.image_keys)
    # The confidence reference of the pairs as made (before any control rewrites them).
    reference = confidence.training_reference(pairs.clip_score, pairs.shard, pairs.row, store, config.seed)
    if config.shuffle_images:
        log.warning("train.shuffle_images: a control run; every caption is paired with another caption's image")
        pairs = pairs.with_images_shuffled(config.seed)
    pairs, cxe = cxe_weighting(config, pairs)
    d_embed, d_width, n_patches = store.shapes(int(pairs.shard[0]))
    names, bank = dataset.load_concepts(enc)
    head, head_meta = dataset.load_clip_head(enc)
    cfg = config.model_preset().with_data_shapes(d_embed, d_width, n_patches, str(enc.path))
    if "ln_eps" in head_meta:
        cfg = cfg.model_copy(update={"clip_ln_eps": float(head_meta["ln_eps"])})
    clip_spec = encode.extra.get("clip") or json.loads(head_meta.get("clip", "{}"))
    vocab = Vocab.build(pairs.texts, config.min_word_count)
    tokens, targets = dataset.caption_tokens(pairs.texts, vocab, cfg.max_len)
    val_cap, val_enc = inputs.val_source
    val = load_split_images(val_cap.stage_dir, val_enc.stage_dir, "val", config.val_max_images)
    val_store = dataset.FeatureStore(val_enc.stage_dir, "real")
    if len(val):
        val_store.check_rows(val.shard, val.row, val.image_ids)
        if config.val_metric == "cider":
            from pcm.metrics import require_java

            require_java()  # fail now, not at the first validation
    if len(val) == 0:
        log.warning("%s: no encoded val images (encode ran without real images or ingest has no val split); "
                    "validation is skipped and best/ holds the final model", val_enc.path)
    return TrainData(pairs, store, tokens, targets, val, val_store, vocab, cfg, names, bank, head, clip_spec, cxe,
                     reference)


def cxe_weighting(config: StageConfig, pairs: Any) -> tuple[Any, dict[str, Any]]:
    """CXE's w as used (`auto`: from these pairs) and the weights it gives them; with `cxe_uniform` (a control)
    the pairs' scores are replaced so that every pair gets the mean weight."""
    import numpy as np

    from pcm.loss import auto_cxe_w, cxe_weights_np

    if config.cxe_w != "auto":
        w = float(config.cxe_w)
    else:  # without CXE, w weighs nothing: 1 stands in, and the scores need not allow an auto w
        w = auto_cxe_w(pairs.clip_score) if config.cxe else 1.0
    weights = cxe_weights_np(pairs.clip_score, w) if config.cxe else np.ones(len(pairs))
    stats = {"cxe_w": w, "weight_mean": float(weights.mean()), "weight_zero": float((weights <= 0).mean()),
             "weight_cap": float((weights >= 1).mean())}
    if config.cxe_uniform:
        log.warning("train.cxe_uniform: a control run; every pair weighs %.4f, CXE's mean weight", stats["weight_mean"])
        # min(1, w * s) with s = mean / w is exactly the mean (at most 1) for every pair.
        pairs = pairs.with_scores(np.full(len(pairs), stats["weight_mean"] / w, dtype=np.float32))
        stats["uniform"] = True
    return pairs, stats


def setup(config: StageConfig, inputs: TrainInputs, sd: StageDir, info: Any, device: Any) -> Run:
    """Data, model, Adam and the step; then the latest checkpoint's state, or a fresh start."""
    import torch

    from pcm import dataset, distributed
    from pcm.model import PCMNet

    data = load_data(config, inputs)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = PCMNet(data.model_config, len(data.vocab), data.bank, data.head).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.cuda_graphs and (device.type != "cuda" or info.world > 1):
        raise ValueError("cuda_graphs needs one CUDA device (devices=1, device=cuda)")
    batches = dataset.EpochBatches(data.pairs, data.store, data.inputs, data.targets, config.batch_size, config.seed,
                                   info.rank, info.world)
    total = len(batches) * config.epochs
    total = min(total, config.max_steps) if config.max_steps else total
    warmup = warmup_steps(config, total)
    if total < warmup and info.is_main:
        log.warning("train: %d steps in all but %d of warm-up: the learning rate rises for the whole run and never "
                    "decays; lower train.warmup or give train.warmup_fraction (e.g. 0.1)", total, warmup)
    opt = make_optimizer(params, optimizer_spec(config, warmup), device, capturable=config.cuda_graphs)

    if info.is_main:  # an object-store root: a newer checkpoint another host published (killed there)
        checkpoints.fetch_published(sd.checkpoints, sd.metrics_log)
    distributed.barrier(info)
    latest = checkpoints.latest(sd.checkpoints)
    if latest is not None:
        state = resume(config, sd, latest, info, model, opt, data.vocab)
    else:
        checkpoint.seed_all(config.seed + 1 + info.rank)
        state = {"step": 0, "epoch": 0, "position": 0, "best": {"metric": config.val_metric, "value": None, "step": None}}
    events = None
    if info.is_main:
        metrics_path = sd.metrics_log
        if latest is not None:
            jsonl.truncate(metrics_path, state["step"])
        else:  # lines (and events) of a run killed before its first checkpoint are redone
            metrics_path.unlink(missing_ok=True)
            shutil.rmtree(sd.events, ignore_errors=True)
            jsonl.append(metrics_path, {"step": 0, "total_steps": total, "train_pairs": len(data.pairs),
                                        "val_images": len(data.val), "vocab": len(data.vocab),
                                        "val_metric": config.val_metric, "warmup": warmup, "cxe": data.cxe})
        events = open_events(config, sd, data, resumed_at=state["step"] if latest is not None else None)

    # Wrapped and stepped only now, over the loaded weights and Adam state: a CUDA-graph step turns Adam's
    # learning rate into a GPU tensor, which loading the optimizer state would replace.
    net = distributed.wrap(model, info, device)
    if config.compile:
        net = torch.compile(net)
    amp = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    train_step = TrainStep(net, opt, params, step_spec(config, data.cxe["cxe_w"]), data.vocab.pad, device, amp, config.cuda_graphs)
    return Run(config, sd, info, device, data, model, opt, train_step, batches, total, warmup, autocast,
               step=state["step"], epoch=state["epoch"], position=state["position"], best=state["best"],
               events=events)


def open_events(config: StageConfig, sd: StageDir, data: TrainData, resumed_at: int | None) -> Any:
    """Rank 0's TensorBoard log under events/<run name>/. A fresh run records its name, config and CXE's
    statistics at step 0; a resumed one purges the points after its checkpoint's step, which it redoes."""
    from pcm import tracking

    name = tracking.run_name(config.run_name or Path(config.preset).stem)
    events = tracking.EventLog(sd.events_run(name), purge_step=None if resumed_at is None else resumed_at + 1)
    if resumed_at is None:
        events.text("run", 0, f"`{name}`: train {sd.fingerprint}\n\n    " + json.dumps(config.content(), indent=1)
                    .replace("\n", "\n    "))
        events.scalars(0, {f"cxe/{k}": v for k, v in data.cxe.items() if isinstance(v, int | float)
                           and not isinstance(v, bool)})
    return events


def resume(config: StageConfig, sd: StageDir, latest: Path, info: Any, model: Any, opt: Any, vocab: Any) -> dict[str, Any]:
    """Load model, Adam and RNG states from the latest checkpoint; returns its state (position, best)."""
    import torch

    from pcm.vocab import Vocab

    state = checkpoint.load_weights(latest, model, opt)
    if Vocab.load(latest / checkpoints.VOCAB).words != vocab.words:
        raise ValueError(f"{latest}: its vocabulary differs from the one built from the data; "
                         "the inputs changed under this stage directory; rerun with --force")
    if info.world == 1:
        checkpoint.set_rng_state(state["rng"])
    else:  # ranks draw different dropout masks; resume reseeds them from (seed, rank, step)
        torch.manual_seed(hash((config.seed, info.rank, state["step"])) % 2**63)
    log.info("resuming %s at step %d (epoch %d, batch %d)", sd.path, state["step"], state["epoch"], state["position"])
    if info.is_main:
        repair_best(sd, latest, state)
    return state


def train_loop(run: Run, progress: ProgressFn | None) -> None:
    """Step to `run.total`: log every `log_every`, validate every `val_every`, checkpoint every `checkpoint_every`."""
    import torch
    from tqdm import tqdm

    from pcm import distributed

    config, info, device = run.config, run.info, run.device
    metrics_path = run.sd.metrics_log
    bar = tqdm(total=run.total, initial=run.step, desc="train", unit="step",
               disable=not (config.progress_bar and info.is_main))
    loss_sum, loss_n, t_log = torch.zeros((), device=device), 0, time.monotonic()
    run.model.train()
    while run.step < run.total:
        run.batches.set_epoch(run.epoch)
        loader = torch.utils.data.DataLoader(
            run.batches, batch_size=None, sampler=range(run.position, len(run.batches)),
            num_workers=config.num_workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed), persistent_workers=False)
        for batch in loader:
            b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            run.step, run.position = run.step + 1, run.position + 1
            log_step = run.step % config.log_every == 0 or run.step >= run.total
            loss = run.train_step(b, lr_at(config, run.step, run.warmup), measure_clip=log_step and info.is_main)
            loss_sum += loss
            loss_n += 1
            bar.update(1)

            if run.position == len(run.batches):  # the epoch is done: the next position is the next epoch's start
                run.epoch, run.position = run.epoch + 1, 0
            last = run.step >= run.total
            if log_step:
                mean_loss = float(distributed.mean(loss_sum / loss_n, info))
                now = time.monotonic()
                if info.is_main:
                    line = {"step": run.step, "epoch": run.epoch, "loss": mean_loss,
                            "lr": lr_at(config, run.step, run.warmup),
                            "samples_per_s": loss_n * config.batch_size / (now - t_log)}
                    if run.train_step.clip_share is not None:  # this step's, not the window's (see TrainStep)
                        line["grad_clip_share"] = run.train_step.clip_share
                    jsonl.append(metrics_path, line)
                    run.events.scalars(run.step, {"train/" + k: v for k, v in line.items() if k != "step"})
                    bar.set_postfix(loss=f"{mean_loss:.3f}")
                    if progress:
                        progress(run.step, run.total, f"loss {mean_loss:.3f}")
                loss_sum, loss_n, t_log = torch.zeros((), device=device), 0, now
            do_val = run.step % config.val_every == 0 or last
            do_save = run.step % config.checkpoint_every == 0 or last
            better = False
            if info.is_main and do_val:
                run.model.eval()
                better = validate(run, last)
                run.model.train()
            # A new best is always checkpointed, and that step checkpoint first: a kill before best/
            # is written leaves a checkpoint that names it, and the resume writes best/ from it.
            if info.is_main and (do_save or better):
                run.events.flush()  # the points the checkpoint covers are on disk before it
                save(run, finished=last)
            if better:
                save_best(run)
            if do_val or do_save:  # the other ranks wait for rank 0's writes
                distributed.barrier(info)
                t_log = time.monotonic()  # samples/s counts training time only
            if last:
                break
    bar.close()


def validate(run: Run, last: bool) -> bool:
    """Score the val split at this step; True when it is the best so far (then best/ is written)."""
    config, data = run.config, run.data
    if len(data.val) == 0:  # nothing to select on: best/ is the final model
        if last:
            run.best = {"metric": "none", "value": None, "step": run.step}
        return last
    value = evaluate_val(run.model, data.vocab, data.val, data.val_store, run.device, run.autocast,
                         metric=config.val_metric, beam=config.val_beam, batch_size=config.val_batch_size)
    best = run.best["value"]
    better = best is None or (value > best if config.val_metric == "cider" else value < best)
    jsonl.append(run.sd.metrics_log, {"step": run.step, "val": value, "val_metric": config.val_metric})
    run.events.scalars(run.step, {f"val/{config.val_metric}": value})
    if better:
        run.best = {"metric": config.val_metric, "value": value, "step": run.step}
    return better


def save(run: Run, finished: bool) -> None:
    """The step checkpoint: weights, Adam, position, best and RNG states (the oldest beyond keep_last go)."""
    config, data = run.config, run.data
    ckpt_root = run.sd.checkpoints
    record = {"train_pairs": len(data.pairs), "val_images": len(data.val), "vocab": len(data.vocab),
              "scheduler": {"kind": "noam", "d_model": config.noam_d_model, "warmup": run.warmup,
                            "factor": config.lr_factor},
              "step": run.step, "epoch": run.epoch, "position": run.position, "finished": finished,
              "best": run.best, "rng": checkpoint.rng_state()}
    checkpoint.save(ckpt_root / checkpoints.step_name(run.step), model=run.model, vocab=data.vocab,
                    config=config.model_dump(mode="json"), clip=data.clip_spec, concept_names=data.names,
                    state=record, optimizer=run.opt, reference=data.reference)
    publish.publish_checkpoint(ckpt_root / checkpoints.step_name(run.step), run.sd.metrics_log)
    checkpoints.prune(ckpt_root, config.keep_last)   # here only: the store keeps every step a host published


def save_best(run: Run) -> None:
    """best/: this step's weights without Adam."""
    data = run.data
    checkpoint.save(checkpoints.recover(run.sd.best), model=run.model, vocab=data.vocab,
                    config=run.config.model_dump(mode="json"), clip=data.clip_spec, concept_names=data.names,
                    state={"step": run.step, "epoch": run.epoch, "best": run.best}, reference=data.reference)


def repair_best(sd: StageDir, latest: Path, state: dict[str, Any]) -> None:
    """Make best/ hold the step that the resumed checkpoint's state names as best.

    The best step's checkpoint is written before best/ (see the loop), so a kill between the two
    leaves `latest` naming a best step that best/ does not hold yet: best/ is written from that
    step's checkpoint (byte-identical to what the loop would have written).
    """
    best_step = state["best"]["step"]
    if best_step is None:
        return
    best = checkpoints.recover(sd.best)
    held = atomic.read_json(best / checkpoints.STATE).get("step") if (best / checkpoints.STATE).exists() else None
    if held == best_step:
        return
    source = dict(checkpoints.list_steps(sd.checkpoints)).get(best_step)
    if source is None:
        raise ValueError(f"{sd.path}: best/ holds step {held} but {latest.name} says the best is step {best_step}, "
                         "whose checkpoint is gone; rerun with --force")
    src_state = checkpoint.read_state(source)
    log.warning("%s: best/ holds step %s, not the best step %d (a kill before it was written); writing it from %s",
                sd.path, held, best_step, source.name)
    checkpoint.export(source, best, {"step": best_step, "epoch": src_state["epoch"], "best": state["best"]})
