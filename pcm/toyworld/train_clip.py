"""Train the toy CLIP: an open_clip model from a config, contrastive on the world's `models` scene set.

Texts are the scenes' captions in varied phrasings plus "A photo of {concept}." prompts, so the
concept embeddings PCM-Net's salient-concept detection uses mean something. The contrastive
targets are soft: a text counts as a positive for every image in the batch it is true of (same
scene key for a caption, the concept present for a prompt), so repeated scenes and shared
concepts are not pushed apart. Saved as an open_clip `local-dir:` model (config + fp16
safetensors), which `pcm/clip.py` loads exactly as any real checkpoint directory.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pcm.toyworld import world
from pcm.toyworld.resume import load_state, save_state, seed_everything
from pcm.toyworld.scenes import scene_set
from storage import atomic, jsonl

log = logging.getLogger(__name__)

PROMPT = "A photo of {c}."
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": world.MODEL_SIZE, "patch_size": 4, "width": 96, "layers": 4, "head_width": 32,
                   "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


@dataclass
class ClipTrainConfig:
    scenes: int = 20000
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    prompt_fraction: float = 0.25     # share of texts that are concept prompts
    phrasings: int = 6                # caption variants per scene, drawn once
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 200


def build_model() -> torch.nn.Module:
    import open_clip

    return open_clip.CLIP(**MODEL_CFG)


def images_tensor(scenes: list[world.Scene], preprocess) -> torch.Tensor:
    """The scenes drawn at 128 px and preprocessed as CLIP sees them: [N, 3, 32, 32] float16."""
    return torch.stack([preprocess(world.draw(s)) for s in tqdm(scenes, desc="drawing", unit="img",
                                                                  mininterval=5)]).half()


def zero_unused_rows(weight: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the token-embedding rows no world text uses (they are never read); returns `weight`."""
    keep = torch.zeros(weight.shape[0], dtype=torch.bool)
    keep[used] = True
    with torch.no_grad():
        weight[~keep] = 0
    return weight


def save_clip(model: torch.nn.Module, out: Path, used_tokens: torch.Tensor | None = None) -> None:
    """Write `out/` as an open_clip local-dir model: fp16 weights, token rows no world text uses zeroed."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if used_tokens is not None:
        sd["token_embedding.weight"] = zero_unused_rows(sd["token_embedding.weight"].clone(), used_tokens)
    sd = {k: (v.half() if v.is_floating_point() and k != "logit_scale" else v) for k, v in sd.items()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(sd, str(tmp))
    atomic.write_json(out / CONFIG_FILE, {"model_cfg": MODEL_CFG, "preprocess_cfg": {}})


def world_token_ids(tokenizer) -> torch.Tensor:
    """Token ids any world caption or prompt can contain (sampled widely: the grammar is small)."""
    rng = random.Random(0)
    texts = [world.caption(s, rng) for s in scene_set("models", 3000)]
    texts += [t for s in scene_set("eval", 300) for t in world.references(s, rng)]
    texts += [PROMPT.format(c=c) for c in world.all_concept_words()]
    return torch.unique(tokenizer(texts))


def train_clip(out: Path, cfg: ClipTrainConfig, work: Path, progress: bool = True) -> dict:
    """Train (or resume) the toy CLIP into `out/`; returns its held-out retrieval scores."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    seed_everything(cfg.seed, cfg.threads)
    work.mkdir(parents=True, exist_ok=True)
    preprocess = image_transform_v2(PreprocessCfg(size=world.MODEL_SIZE), is_train=False)
    tokenizer = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])

    # 1. Data: drawings, caption variants, prompts and what each text is true of.
    scenes = scene_set("models", cfg.scenes)
    images = images_tensor(scenes, preprocess)
    rng = random.Random(cfg.seed)
    variants = tokenizer([world.caption(s, rng) for s in scenes for _ in range(cfg.phrasings)]).view(
        len(scenes), cfg.phrasings, -1)
    concepts = world.all_concept_words()
    prompts = tokenizer([PROMPT.format(c=c) for c in concepts])
    has = np.zeros((len(scenes), len(concepts)), dtype=bool)
    for i, s in enumerate(scenes):
        has[i, [concepts.index(c) for c in world.concept_words(s)]] = True
    key_ids = {}
    scene_key = np.array([key_ids.setdefault(s.key(), len(key_ids)) for s in scenes])

    # 2. Model, optimiser (no decay on gains, biases, embeddings, temperature), schedule.
    model = build_model()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    state_file = work / "clip-state.pt"
    step = (load_state(state_file, {"model": model, "opt": opt, "sched": sched}, work / "clip-log.jsonl")
            if state_file.exists() else 0)
    if step:
        log.info("resuming toy CLIP training at step %d", step)

    # 3. The loop.
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="toy CLIP", unit="step", disable=not progress, mininterval=10)
    t0 = time.process_time()
    while step < cfg.steps:
        idx = np.random.randint(0, len(scenes), cfg.batch_size)
        is_prompt = np.random.rand(cfg.batch_size) < cfg.prompt_fraction
        cid = np.array([np.random.choice(np.flatnonzero(has[i])) for i in idx])
        texts = torch.where(torch.from_numpy(is_prompt)[:, None], prompts[cid],
                            variants[idx, np.random.randint(0, cfg.phrasings, cfg.batch_size)])
        # truth[i, j]: text j is true of image i
        truth = np.where(is_prompt[None, :], has[idx][:, cid], scene_key[idx][:, None] == scene_key[idx][None, :])
        truth = torch.from_numpy(truth).float()
        feats = model(images[idx].float(), texts)
        logits = feats[2] * feats[0] @ feats[1].T                # [images, texts]
        loss = 0.5 * (torch.sum(-F.log_softmax(logits, 1) * truth / truth.sum(1, keepdim=True), 1).mean()
                      + torch.sum(-F.log_softmax(logits, 0) * truth / truth.sum(0, keepdim=True), 0).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        if step % 20 == 0:
            jsonl.append(work / "clip-log.jsonl", {"step": step, "loss": round(loss.item(), 4),
                                              "cpu_s": round(time.process_time() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_state(state_file, step, {"model": model, "opt": opt, "sched": sched})
    bar.close()

    # 4. Save and measure on held-out drawn scenes.
    model.eval()
    save_clip(model, out, world_token_ids(tokenizer))
    from pcm.toyworld.quality import clip_retrieval

    scores = clip_retrieval(out)   # from the saved files, loaded as the encode stage loads them
    atomic.write_json(out / "training.json", {"config": asdict(cfg), "retrieval_1000_held_out": scores,
                                              "model_cfg": MODEL_CFG})
    log.info("toy CLIP: R@1 %.3f R@5 %.3f on 1000 held-out scenes", scores["image_to_caption_r1"],
             scores["image_to_caption_r5"])
    return scores


if __name__ == "__main__":  # python -m pcm.toyworld.train_clip OUT WORK [steps]
    import sys

    logging.basicConfig(level=logging.INFO)
    c = ClipTrainConfig(steps=int(sys.argv[3])) if len(sys.argv) > 3 else ClipTrainConfig()
    print(json.dumps(train_clip(Path(sys.argv[1]), c, Path(sys.argv[2]))))
