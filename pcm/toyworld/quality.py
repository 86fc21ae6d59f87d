"""How good the toy models are, measured on held-out scenes with the loaders the pipeline itself uses.

- Toy CLIP: image-to-caption R@1 / R@5 among 1,000 held-out drawn scenes (first reference each).
- Toy text-to-image: for 100 held-out captions, the toy CLIP's caption-to-image R@1 among the 100
  generated images (chance 1%), and the mean cosine of an image to its own caption minus to the
  other captions; plus a grid of real drawing vs generated image.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from pcm.toyworld import world
from pcm.toyworld.scenes import scene_set


def load_toy_clip(clip_dir: str | Path):
    """The toy CLIP through `pcm/clip.py`, as the encode stage loads it."""
    from pcm.clip import ClipSpec, load_clip

    return load_clip(ClipSpec(model="toyworld-clip", pretrained=f"local-dir:{Path(clip_dir).resolve()}",
                              precision="fp32"))


def held_out(n: int) -> tuple[list[world.Scene], list[str]]:
    """`n` scenes of the eval set with their full first reference (the same for every measurement)."""
    scenes = scene_set("eval", n)
    rng = random.Random(1)
    return scenes, [world.references(s, rng)[0] for s in scenes]


def _ranks(sim: torch.Tensor, keys: list) -> tuple[float, float]:
    """R@1 and R@5 of rows over columns; a column counts as right when its scene record equals the row's."""
    ids = torch.tensor([keys.index(k) for k in keys])
    top = sim.topk(min(5, sim.shape[1]), dim=1).indices
    hit = ids[top] == ids[:, None]
    return hit[:, 0].float().mean().item(), hit.any(dim=1).float().mean().item()


def swap_gelu_for_quick_gelu(model: torch.nn.Module) -> int:
    """Replace every nn.GELU by open_clip's QuickGELU in place (what a mismatched load does); returns the count."""
    from open_clip.transformer import QuickGELU

    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.GELU)]
    for parent, name in swaps:
        setattr(parent, name, QuickGELU())
    return len(swaps)


def activation_mismatch(clip_dir: str | Path, n: int = 1000) -> dict[str, float]:
    """The QuickGELU bug in miniature: the GELU-trained toy CLIP run with QuickGELU, against itself.

    Mean cosine of each image / text / patch feature to the correctly computed one, and R@1 both ways.
    """
    import torch.nn.functional as F

    from pcm.clip import encode_images, encode_texts

    clip = load_toy_clip(clip_dir)
    scenes, texts = held_out(n)
    pixels = torch.stack([clip.preprocess(world.draw(s)) for s in scenes])
    runs = []
    for swap in (False, True):
        if swap and not swap_gelu_for_quick_gelu(clip.model):
            raise ValueError(f"{clip_dir}: the toy CLIP has no nn.GELU to swap")
        g, patches = encode_images(clip, pixels)
        runs.append((g, patches, encode_texts(clip, texts)))
    (g, p, t), (g2, p2, t2) = runs
    keys = [s.key() for s in scenes]
    return {"image_cos": F.cosine_similarity(g, g2, dim=-1).mean().item(),
            "text_cos": F.cosine_similarity(t, t2, dim=-1).mean().item(),
            "patch_cos": F.cosine_similarity(p, p2, dim=-1).mean().item(),
            "r1_gelu": _ranks(g @ t.T, keys)[0], "r1_quick_gelu": _ranks(g2 @ t2.T, keys)[0], "scenes": n}


def clip_retrieval(clip_dir: str | Path, n: int = 1000) -> dict[str, float]:
    from pcm.clip import encode_images, encode_texts

    clip = load_toy_clip(clip_dir)
    scenes, texts = held_out(n)
    pixels = torch.stack([clip.preprocess(world.draw(s)) for s in scenes])
    g, _ = encode_images(clip, pixels)
    t = encode_texts(clip, texts)
    r1, r5 = _ranks(g @ t.T, [s.key() for s in scenes])
    return {"image_to_caption_r1": r1, "image_to_caption_r5": r5, "scenes": n}


def t2i_quality(t2i_dir: str | Path, clip_dir: str | Path, n: int = 100, steps: int = 20, guidance: float = 4.0,
                grid: Path | None = None, seed: int = 0) -> dict[str, float]:
    """Generate one image per held-out caption and ask the toy CLIP which caption each one shows."""
    from pcm.clip import encode_images, encode_texts
    from pcm.diffusion import load_pipeline

    pipe = load_pipeline(str(t2i_dir), dtype="fp32", device="cpu")
    scenes, texts = held_out(n)
    images = []
    for b in range(0, n, 50):
        gen = [torch.Generator().manual_seed(seed + i) for i in range(b, min(n, b + 50))]
        images += pipe(texts[b:b + 50], num_inference_steps=steps, guidance_scale=guidance, height=world.MODEL_SIZE,
                       width=world.MODEL_SIZE, generator=gen).images
    clip = load_toy_clip(clip_dir)
    g, _ = encode_images(clip, torch.stack([clip.preprocess(im) for im in images]))
    t = encode_texts(clip, texts)
    sim = t @ g.T                                              # [captions, images]
    r1, r5 = _ranks(sim, [s.key() for s in scenes])
    own = sim.diag()
    other = (sim.sum(1) - own) / (n - 1)
    real, _ = encode_images(clip, torch.stack([clip.preprocess(world.draw(s)) for s in scenes]))
    if grid is not None:
        real_vs_generated(scenes, texts, images, grid)
    return {"caption_to_image_r1": r1, "caption_to_image_r5": r5, "chance_r1": 1 / n,
            "cos_own_minus_other": (own - other).mean().item(),
            "cos_own_real_drawing": (t * real).sum(1).mean().item(), "cos_own_generated": own.mean().item(),
            "images": n, "steps": steps, "guidance": guidance}


def real_vs_generated(scenes: list[world.Scene], texts: list[str], images: list, path: Path, n: int = 8) -> Path:
    """A PNG: per column the drawing of a held-out caption's scene above the toy model's image of it."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from storage import atomic

    cell, text_h = 128, 60
    out = Image.new("RGB", (n * cell, 2 * cell + text_h), "white")
    d = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i in range(min(n, len(images))):
        out.paste(world.draw(scenes[i], cell), (i * cell, 0))
        out.paste(images[i].resize((cell, cell), Image.NEAREST), (i * cell, cell))
        d.multiline_text((i * cell + 2, 2 * cell + 2), "\n".join(textwrap.wrap(texts[i], 20)[:4]), fill="black",
                         font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        out.save(tmp, format="PNG")
    return path

