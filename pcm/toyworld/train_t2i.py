"""Train the toy text-to-image model: a diffusers StableDiffusionPipeline on the world's `models` set.

The recipe (../shared/TOYWORLD-RECIPE.md, measured on this 2-core machine): 32 px images; an
AutoencoderKL with downsampling 4 (32 px -> 8x8x4 latents) trained first; latents of every
training image computed once (posterior mean x scaling factor); then a small
UNet2DConditionModel with the standard epsilon objective, scaled-linear betas, 10% empty
captions for classifier-free guidance, AdamW with warm-up and linear decay, an EMA of the
weights; and a transformers CLIPTextModel trained with it from scratch, its token embedding
frozen (a dense update of the 49,408 rows would dominate the cost). Saved with
`save_pretrained` in fp16, so the synthesize stage loads it through the same `from_pretrained`
path as a real Stable Diffusion.
"""

from __future__ import annotations

import json
import logging
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

CONTEXT = 32
VAE_CFG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "norm_num_groups": 16, "sample_size": 32,
           "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
           "block_out_channels": [32, 64, 64], "layers_per_block": 1}
UNET_CFG = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 16,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [64, 128], "cross_attention_dim": 64, "attention_head_dim": 4}
TEXT_CFG = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": CONTEXT, "hidden_act": "quick_gelu",
            "projection_dim": 64, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
SCHEDULER_CFG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "steps_offset": 1, "prediction_type": "epsilon"}


@dataclass
class T2ITrainConfig:
    scenes: int = 20000
    vae_steps: int = 600
    vae_batch: int = 64
    vae_lr: float = 1e-3
    unet_steps: int = 1900
    batch_size: int = 64
    lr: float = 1.5e-3
    warmup: int = 50
    final_lr_fraction: float = 0.3
    ema: float = 0.995
    empty_caption: float = 0.1
    phrasings: int = 6
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 200


def pixels(scenes: list[world.Scene]) -> torch.Tensor:
    """The scenes as the model sees them: [N, 3, 32, 32] in [-1, 1], float16 to halve memory."""
    arr = np.stack([np.asarray(world.model_view(world.draw(s))) for s in tqdm(scenes, desc="drawing", mininterval=5)])
    return (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1).half()


def _lr_lambda(cfg: T2ITrainConfig):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup)
        return warm * (1 - (1 - cfg.final_lr_fraction) * min(1.0, step / cfg.unet_steps))
    return f


def train_vae(images: torch.Tensor, cfg: T2ITrainConfig, work: Path, progress: bool) -> torch.nn.Module:
    """1. The autoencoder: L1 + MSE reconstruction and a tiny KL term (what SD's VAE uses, minus the GAN)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CFG)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    state = work / "vae-state.pt"
    step = load_state(state, {"vae": vae, "opt": opt}, work / "vae-log.jsonl") if state.exists() else 0
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="toy VAE", disable=not progress, mininterval=10)
    while step < cfg.vae_steps:
        x = images[torch.randint(0, len(images), (cfg.vae_batch,))].float()
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:
            jsonl.append(work / "vae-log.jsonl", {"step": step, "loss": round(loss.item(), 5)})
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            save_state(state, step, {"vae": vae, "opt": opt})
    bar.close()
    return vae.eval().requires_grad_(False)


def encode_latents(vae: torch.nn.Module, images: torch.Tensor, work: Path) -> tuple[torch.Tensor, float, float]:
    """2. Posterior means of every training image, once; the scaling factor makes their std 1."""
    cache = work / "latents.pt"
    if cache.exists():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        return saved["latents"], float(saved["scaling_factor"]), float(saved["psnr"])
    means, psnr = [], []
    with torch.inference_mode():
        for chunk in tqdm(images.split(256), desc="latents", mininterval=5):
            mean = vae.encode(chunk.float()).latent_dist.mean
            rec = vae.decode(mean).sample.clamp(-1, 1)
            mse = ((rec - chunk.float()) / 2).pow(2).flatten(1).mean(1)
            psnr.append(10 * torch.log10(1 / mse))
            means.append(mean)
    latents = torch.cat(means)
    scaling = 1.0 / latents.std().item()
    mean_psnr = torch.cat(psnr).mean().item()
    with atomic.atomic_path(cache) as tmp:
        torch.save({"latents": latents, "scaling_factor": torch.tensor(scaling), "psnr": torch.tensor(mean_psnr)}, tmp)
    return latents, scaling, mean_psnr


def train_unet(latents: torch.Tensor, tokens: torch.Tensor, empty: torch.Tensor, cfg: T2ITrainConfig, work: Path,
               progress: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """3. UNet + text encoder, epsilon objective; returns the EMA UNet and the text encoder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**UNET_CFG)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CFG))
    text.get_input_embeddings().requires_grad_(False)
    noise = DDPMScheduler(**SCHEDULER_CFG)
    params = list(unet.parameters()) + [p for p in text.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    ema = EMAModel(unet.parameters(), decay=cfg.ema)
    ema_text = EMAModel([p for p in text.parameters() if p.requires_grad], decay=cfg.ema)
    state = work / "unet-state.pt"
    mods = {"unet": unet, "text": text, "opt": opt, "sched": sched, "ema": ema, "ema_text": ema_text}
    step = load_state(state, mods, work / "unet-log.jsonl") if state.exists() else 0
    bar = tqdm(total=cfg.unet_steps, initial=step, desc="toy UNet", disable=not progress, mininterval=10)
    t0 = time.process_time()
    n, k = tokens.shape[:2]
    while step < cfg.unet_steps:
        idx = torch.randint(0, n, (cfg.batch_size,))
        ids = tokens[idx, torch.randint(0, k, (cfg.batch_size,))]
        drop = torch.rand(cfg.batch_size) < cfg.empty_caption
        ids = torch.where(drop[:, None], empty[None, :], ids)
        x0 = latents[idx]
        eps = torch.randn_like(x0)
        t = torch.randint(0, noise.config.num_train_timesteps, (cfg.batch_size,))
        pred = unet(noise.add_noise(x0, eps, t), t, encoder_hidden_states=text(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        ema_text.step([p for p in text.parameters() if p.requires_grad])
        step += 1
        bar.update(1)
        if step % 20 == 0:
            jsonl.append(work / "unet-log.jsonl", {"step": step, "loss": round(loss.item(), 5),
                                              "cpu_s": round(time.process_time() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            save_state(state, step, mods)
    bar.close()
    ema.copy_to(unet.parameters())
    ema_text.copy_to([p for p in text.parameters() if p.requires_grad])
    return unet.eval(), text.eval()


def assemble(vae, unet, text, scaling: float):
    """The trained parts as a StableDiffusionPipeline (no safety checker: it would black out pictures)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from pcm.diffusion import clip_tokenizer

    vae.register_to_config(scaling_factor=scaling)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(model_max_length=CONTEXT),
                                   unet=unet, scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CFG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_pipeline(pipe, out: Path, used_tokens: torch.Tensor) -> None:
    """fp16 `save_pretrained` into a temporary directory, renamed into place; token rows no world text uses
    are zeroed (they are frozen random rows the model never saw)."""
    from pcm.toyworld.train_clip import zero_unused_rows
    from storage.checkpoints import atomic_directory

    zero_unused_rows(pipe.text_encoder.get_input_embeddings().weight, used_tokens)
    with atomic_directory(out) as tmp:  # a kill while replacing an older model leaves it recoverable, not gone
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)


def train_t2i(out: Path, cfg: T2ITrainConfig, work: Path, progress: bool = True) -> dict:
    """Train (or resume) VAE, latents and UNet into the diffusers directory `out/`."""
    from pcm.toyworld.train_clip import world_token_ids

    seed_everything(cfg.seed, cfg.threads)
    work.mkdir(parents=True, exist_ok=True)
    scenes = scene_set("models", cfg.scenes)
    images = pixels(scenes)
    vae = train_vae(images, cfg, work, progress)
    latents, scaling, psnr = encode_latents(vae, images, work)
    latents = latents * scaling
    log.info("toy VAE: held-in PSNR %.1f dB, scaling factor %.3f", psnr, scaling)

    from pcm.diffusion import clip_tokenizer

    tokenizer = clip_tokenizer(model_max_length=CONTEXT)
    rng = random.Random(cfg.seed)

    def ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt").input_ids

    tokens = ids([world.caption(s, rng) for s in scenes for _ in range(cfg.phrasings)]).view(len(scenes), cfg.phrasings, -1)
    empty = ids([""])[0]
    unet, text = train_unet(latents, tokens, empty, cfg, work, progress)
    pipe = assemble(vae, unet, text, scaling)

    import open_clip

    used = torch.unique(torch.cat([world_token_ids(open_clip.SimpleTokenizer(context_length=CONTEXT)), empty]))
    save_pipeline(pipe, out, used)
    report = {"config": asdict(cfg), "vae_psnr_db": round(psnr, 2), "scaling_factor": scaling,
              "unet_parameters": sum(p.numel() for p in unet.parameters())}
    atomic.write_json(out / "training.json", report)
    return report


if __name__ == "__main__":  # python -m pcm.toyworld.train_t2i OUT WORK
    import sys

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(train_t2i(Path(sys.argv[1]), T2ITrainConfig(), Path(sys.argv[2]))))
