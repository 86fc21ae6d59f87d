"""Frozen CLIP (open_clip): load any ViT architecture or a tiny preset, encode images and texts."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pcm import bundled
from pcm.config import strict_scalars
from pcm.device import resolve_device, torch_dtype

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

PRESET_DIR = bundled.PRESETS / "clip"
LOCAL_DIR = "local-dir:"
Precision = Literal["fp32", "fp16", "bf16"]


def preset_names() -> list[str]:
    """The tiny presets shipped as data files under pcm/presets/clip/."""
    return bundled.names("clip", ".json")


def preset_path(name: str) -> Path:
    """The data file of a CLIP preset (only the bundled names; never a path built from input)."""
    return bundled.path("clip", ".json", name, "CLIP")


@cache
def read_preset(name: str) -> dict[str, Any]:
    """A preset's JSON: description, seed, default pool and the open_clip model/preprocess configs."""
    return json.loads(preset_path(name).read_text(encoding="utf-8"))


def _grid_side(model: str, pretrained: str | None) -> int | None:
    """Patch grid side of a model from its config (no weights loaded), or None if unknown."""
    if model in preset_names():
        vision = read_preset(model)["model_cfg"]["vision_cfg"]
    elif pretrained and pretrained.startswith(LOCAL_DIR):
        cfg_file = Path(pretrained[len(LOCAL_DIR):]) / "open_clip_config.json"
        if not cfg_file.is_file():
            return None
        vision = json.loads(cfg_file.read_text(encoding="utf-8"))["model_cfg"]["vision_cfg"]
    else:
        import open_clip

        cfg = open_clip.get_model_config(model)
        if cfg is None:
            return None
        vision = cfg["vision_cfg"]
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if not isinstance(size, int) or not isinstance(patch, int):
        return None
    return size // patch


class ClipSpec(BaseModel):
    """Which CLIP to use; its JSON goes into fingerprints, feature files and checkpoints.

    A preset (`tiny`, `tiny-l14`) has random weights from its seed unless `pretrained` names a
    checkpoint file. `pool` is the side of the patch grid after average pooling (None: no
    pooling). Left out, it follows the paper: a 16x16 grid (ViT-L/14 at 224 px) pools to 8x8, presets use their
    own default, anything else is not pooled.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    _scalars = field_validator("*", mode="before")(strict_scalars)  # pool=true is no grid side

    model: str = Field("ViT-L-14", description="open_clip architecture (ViT-L-14, ViT-B-32, ...) or preset: "
                       "tiny, tiny-l14")
    pretrained: str | None = Field("openai", description="open_clip tag (openai; none for presets), a checkpoint "
                                   "file, or local-dir:/path holding open_clip_config.json + weights")
    precision: Precision = Field("fp16", description="fp32 on the CPU is faster")
    pool: int | None = Field(None, description="patch grid side after average pooling; unset: 16x16 -> 8x8 as in "
                             "the paper, presets their own, anything else none (no pooling)")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not all(isinstance(data.get(k, ""), str | None) for k in ("model", "pretrained")):
            return data  # the field checks name what is wrong (model=3 reached open_clip: an AttributeError)
        model = data.get("model", cls.model_fields["model"].default)
        if model in preset_names() and "pretrained" not in data:
            data = {**data, "pretrained": None}  # presets are random-weight by default
        if "pool" not in data:
            pretrained = data.get("pretrained", cls.model_fields["pretrained"].default)
            if model in preset_names():
                pool = read_preset(model)["pool"]
            else:
                pool = 8 if _grid_side(model, pretrained) == 16 else None
            data = {**data, "pool": pool}
        return data

    @model_validator(mode="after")
    def _check(self) -> ClipSpec:
        if self.pool is not None and self.pool < 1:
            raise ValueError(f"pool must be a grid side >= 1 or None, got {self.pool}")
        if self.model in preset_names() and self.pretrained and self.pretrained.startswith(LOCAL_DIR):
            raise ValueError(f"preset {self.model!r} takes a checkpoint file as pretrained, not {self.pretrained!r}")
        quick_gelu(self)  # a -quickgelu name with GELU-trained weights fails here, at the edge
        return self

    @property
    def is_preset(self) -> bool:
        return self.model in preset_names()

    @property
    def is_local(self) -> bool:
        """Whether the weights are a local file or directory (identified by content), not a tag or a preset's seed."""
        p = self.pretrained
        return bool(p) and (p.startswith(LOCAL_DIR) or os.path.exists(os.path.expanduser(p)))

    def label(self) -> str:
        """A short name for tables and titles: `ViT-L-14/openai`, `tiny/seed-0`, `toyworld-clip/local-dir:clip`
        (a local directory or checkpoint file by its last name, never its whole path)."""
        if self.is_preset and not self.pretrained:
            return f"{self.model}/seed-{read_preset(self.model)['seed']}"
        pretrained = self.pretrained or "random"
        local = pretrained.startswith(LOCAL_DIR)
        path = pretrained[len(LOCAL_DIR):] if local else pretrained
        if local or "/" in path or os.sep in path:
            pretrained = (LOCAL_DIR if local else "") + (Path(path).name or path)
        return f"{self.model}/{pretrained}"


@dataclass
class LoadedClip:
    """An open_clip model in eval mode with its image preprocessing and tokenizer."""

    model: Any                       # open_clip.CLIP
    preprocess: Callable[[Any], Any]  # PIL image -> float tensor [3, H, W]
    tokenizer: Callable[[list[str]], Any]  # texts -> long tensor [B, context_length]
    spec: ClipSpec
    device: str

    @property
    def grid(self) -> int:
        """Side of the patch grid before pooling."""
        return int(self.model.visual.grid_size[0])

    @property
    def patches(self) -> int:
        """Number of patch tokens per image after pooling."""
        side = self.spec.pool or self.grid
        return side * side

    @property
    def width(self) -> int:
        return int(self.model.visual.ln_post.weight.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.proj.shape[1])

    @property
    def ln_eps(self) -> float:
        return float(self.model.visual.ln_post.eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype


def _named_tag(spec: ClipSpec) -> bool:
    """True when `pretrained` is an open_clip tag (not a file, a local dir, None or a preset)."""
    return (not spec.is_preset and bool(spec.pretrained) and not spec.pretrained.startswith(LOCAL_DIR)
            and not os.path.exists(spec.pretrained))


def quick_gelu(spec: ClipSpec) -> bool:
    """Whether `spec` must be built with QuickGELU although its architecture name says GELU (no weights read).

    OpenAI's weights (and MetaCLIP's, DFN's) were trained with QuickGELU; open_clip's plain names
    (`ViT-L-14`) build nn.GELU and only warn, which degrades every feature. The tag's own config says
    which activation it was trained with; the plain name then gets `force_quick_gelu`. A `-quickgelu`
    name with a GELU-trained tag is an error: there is no way to load it as it was trained.
    """
    if not _named_tag(spec):
        return False
    import open_clip

    arch = open_clip.get_model_config(spec.model)
    if arch is None:
        return False  # not an open_clip architecture: load_clip says so
    arch_quick = bool(arch.get("quick_gelu"))
    plain = spec.model.removesuffix("-quickgelu")
    if spec.pretrained in open_clip.list_pretrained_tags_by_model(spec.model):
        tag_quick = bool(open_clip.get_pretrained_cfg(spec.model, spec.pretrained).get("quick_gelu"))
    elif arch_quick and spec.pretrained in open_clip.list_pretrained_tags_by_model(plain):
        tag_quick = bool(open_clip.get_pretrained_cfg(plain, spec.pretrained).get("quick_gelu"))
    else:
        return False  # an unknown tag: load_clip's missing-weights error lists the known ones
    if arch_quick and not tag_quick:
        raise ValueError(f"clip.model={spec.model!r} uses QuickGELU but the weights {spec.pretrained!r} were trained "
                         f"with GELU; use clip.model={plain!r}")
    return tag_quick and not arch_quick


def _missing_weights_error(spec: ClipSpec, cause: BaseException) -> RuntimeError:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if spec.pretrained not in tags:
        return RuntimeError(
            f"clip.pretrained={spec.pretrained!r} is neither a pretrained tag of {spec.model} "
            f"({', '.join(tags) or 'none'}) nor an existing checkpoint file nor 'local-dir:/path'")
    cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
    if cfg.get("hf_hub"):
        repo, file = cfg["hf_hub"].rsplit("/", 1)  # open_clip's own split: "org/repo/" or "org/repo/file"
        file = file or "open_clip_model.safetensors"
        local = f"models/{repo.split('/')[-1]}"
        fetch = (f"hf download {repo} {file} --local-dir {local} (huggingface_hub older than 0.34: "
                 f"huggingface-cli download {repo} {file} --local-dir {local}), copy {local} here and set "
                 f"clip.pretrained={local}/{file} (`pcm encode --set clip.pretrained=...`, "
                 f"`pcm run --set encode.clip.pretrained=...`)")
    else:
        fetch = (f"fetch the weights file from {cfg.get('url', '?')} and set its path as "
                 "clip.pretrained=/path/to/open_clip_model.safetensors (`pcm encode --set clip.pretrained=...`)")
    return RuntimeError(
        f"CLIP weights {spec.model}/{spec.pretrained} are not available on this machine ({type(cause).__name__}). "
        f"Download them where there is internet: {fetch}; or run python -c \"import open_clip; "
        f"open_clip.create_model('{spec.model}', pretrained='{spec.pretrained}')\", which fills the Hugging Face "
        f"cache (~/.cache/huggingface or $HF_HOME; copy it here).")


def _check_supported(model: Any, spec: ClipSpec) -> None:
    """Patch features and `clip_head` assume a plain ViT whose embedding is proj(ln_post(CLS))."""
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"clip.model={spec.model!r}: only open_clip ViT image towers are supported "
                         f"(got {type(visual).__name__}); pick a ViT-* architecture")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool or visual.proj is None:
        raise ValueError(f"clip.model={spec.model!r}: the image embedding is not proj(ln_post(CLS)) "
                         "(attention/average pooling); PCM-Net needs a CLS-token ViT such as ViT-B-32 or ViT-L-14")
    grid = visual.grid_size[0]
    if visual.grid_size[0] != visual.grid_size[1]:
        raise ValueError(f"clip.model={spec.model!r}: non-square patch grid {visual.grid_size} is not supported")
    if spec.pool is not None and grid % spec.pool:
        raise ValueError(f"clip.pool={spec.pool}: must divide the {grid}x{grid} patch grid of {spec.model}")


def _build_preset(spec: ClipSpec) -> tuple[Any, Any]:
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preset = read_preset(spec.model)
    # A private RNG stream: the same seed gives the same weights without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset["seed"])
        model = open_clip.CLIP(**preset["model_cfg"], cast_dtype=open_clip.get_cast_dtype(spec.precision))
    if spec.pretrained:
        if not os.path.isfile(spec.pretrained):
            raise FileNotFoundError(f"clip.pretrained={spec.pretrained!r}: checkpoint file not found")
        open_clip.load_checkpoint(model, spec.pretrained, weights_only=True)
    if spec.precision != "fp32":
        # As open_clip's factory does: weights in low precision, LayerNorms (LayerNormFp32) in fp32.
        open_clip.model.convert_weights_to_lp(model, dtype=torch_dtype(spec.precision))
    size = preset["model_cfg"]["vision_cfg"]["image_size"]
    preprocess = image_transform_v2(PreprocessCfg(size=size, **preset["preprocess_cfg"]), is_train=False)
    return model, preprocess


def load_clip(spec: ClipSpec, device: str = "cpu") -> LoadedClip:
    """Load CLIP frozen in eval mode on `device` in `spec.precision`; one clear error when weights are missing."""
    import open_clip

    device = resolve_device(device)
    if spec.is_preset:
        model, preprocess = _build_preset(spec)
        tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
    else:
        name = spec.pretrained if spec.pretrained and spec.pretrained.startswith(LOCAL_DIR) else spec.model
        pretrained = None if name != spec.model else spec.pretrained
        force_quick_gelu = quick_gelu(spec)
        if force_quick_gelu:
            log.info("clip: %s/%s built with QuickGELU, the activation its weights were trained with",
                     spec.model, spec.pretrained)
        try:
            # open_clip casts to fp16/bf16 itself, keeping LayerNorms in fp32 (LayerNormFp32).
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, precision=spec.precision, device="cpu", weights_only=True,
                force_quick_gelu=force_quick_gelu)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"clip.pretrained={spec.pretrained!r}: {e}") from None
        except RuntimeError as e:
            if "not found in built-ins" in str(e):
                raise ValueError(f"clip.model={spec.model!r} is not an open_clip architecture nor a preset "
                                 f"({', '.join(preset_names())}); see open_clip.list_models()") from None
            raise _missing_weights_error(spec, e) from None
        tokenizer = open_clip.get_tokenizer(name)
    _check_supported(model, spec)
    model = model.to(device).eval().requires_grad_(False)
    return LoadedClip(model=model, preprocess=preprocess, tokenizer=tokenizer, spec=spec, device=device)


def pool_patches(tokens: torch.Tensor, grid: int, pool: int | None) -> torch.Tensor:
    """Average-pool patch tokens [B, grid*grid, W] to [B, pool*pool, W] over square windows."""
    import torch.nn.functional as F

    if pool is None or pool == grid:
        return tokens
    B, N, W = tokens.shape
    x = tokens.transpose(1, 2).reshape(B, W, grid, grid)     # [B, W, grid, grid], row-major patches
    k = grid // pool
    x = F.avg_pool2d(x, kernel_size=k, stride=k)             # [B, W, pool, pool]
    return x.flatten(2).transpose(1, 2)                      # [B, pool*pool, W]


def encode_images(clip: LoadedClip, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global embedding [B, D_embed] (L2-normalised) and patch tokens [B, P, W], both float32.

    Patches are the last transformer block's tokens without CLS, before ln_post/proj (open_clip's
    `forward_intermediates` returns exactly these), optionally average-pooled.
    """
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        x = pixels.to(clip.device, dtype=clip.dtype, non_blocking=True)
        out = clip.model.visual.forward_intermediates(x, indices=1, output_fmt="NLC", normalize_intermediates=False)
        tokens = out["image_intermediates"][-1]               # [B, grid*grid, W], CLS already split off
        patches = pool_patches(tokens.float(), clip.grid, clip.spec.pool)
        g = F.normalize(out["image_features"].float(), dim=-1)  # proj(ln_post(CLS)) [B, D_embed]
    return g, patches


def encode_tokens(clip: LoadedClip, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings [B, D_embed] (float32) of tokenised texts [B, context_length]."""
    import torch

    with torch.inference_mode():
        t = clip.model.encode_text(tokens.to(clip.device, non_blocking=True), normalize=True)
    return t.float()


def encode_texts(clip: LoadedClip, texts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings [B, D_embed] (float32)."""
    return encode_tokens(clip, clip.tokenizer(texts))


def embed_concepts(clip: LoadedClip, words: list[str], prompt: str, ensemble: str | None,
                   batch_size: int = 256) -> np.ndarray:
    """L2-normalised concept embeddings [C, D]: each word in `prompt` ("A photo of {c}."), or the renormalised
    mean over an open_clip template set (`ensemble`: openai-imagenet or simple-imagenet)."""
    import numpy as np
    import torch

    if ensemble is None:
        return np.concatenate([encode_texts(clip, [prompt.format(c=c) for c in words[s:s + batch_size]]).cpu().numpy()
                               for s in range(0, len(words), batch_size)])
    import open_clip
    from open_clip import zero_shot_metadata

    templates = {"openai-imagenet": zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES,
                 "simple-imagenet": zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES}[ensemble]
    per_batch = max(1, batch_size // len(templates))
    with torch.inference_mode():
        bank = open_clip.build_zero_shot_classifier(clip.model, clip.tokenizer, words, templates,
                                                    num_classes_per_batch=per_batch, device=clip.device)
    return bank.T.float().cpu().numpy()                                      # [D, C] -> [C, D], unit rows


def clip_head(clip: LoadedClip) -> dict[str, torch.Tensor]:
    """CLIP's frozen image head as float32 CPU tensors: joint = ln_post(v) @ proj."""
    visual = clip.model.visual
    return {"ln_post.weight": visual.ln_post.weight.detach().float().cpu(),   # [W]
            "ln_post.bias": visual.ln_post.bias.detach().float().cpu(),       # [W]
            "proj": visual.proj.detach().float().cpu()}                      # [W, D_embed]
