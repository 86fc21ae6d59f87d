"""Diffusion models: diffusers text-to-image pipelines by hub id, local directory or built-in preset.

Loading (`load_pipeline`, `load_tiny_vae`), then generation: `Synthesizer` turns prompts and
seeds into uint8 images with a loaded pipeline, from a `GenerationSpec` (no stage config).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from pcm import bundled
from pcm.device import resolve_device, torch_dtype
from storage.checkpoints import atomic_directory

log = logging.getLogger(__name__)

PRESET_DIR = bundled.PRESETS / "diffusion"

# Scheduler names accepted on the command line and in configs -> diffusers class names.
SCHEDULERS = {
    "dpm++": "DPMSolverMultistepScheduler",   # DPM-Solver++ (2M), the default: good images in ~20 steps
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",                     # for LCM-distilled models (2-8 steps)
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# -- names --------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return bundled.names("diffusion", ".json")


def is_preset(model: str) -> bool:
    """Only the names of the bundled preset files count (never a path built from user input)."""
    return model in preset_names()


def preset_path(name: str) -> Path:
    """The data file of a diffusion preset (only the bundled names; never a path built from input)."""
    return bundled.path("diffusion", ".json", name, "diffusion")


def preset_digest(name: str) -> str:
    """A short hash of a preset's data file: a changed preset gives a new cache entry and fingerprint."""
    return hashlib.sha256(preset_path(name).read_bytes()).hexdigest()[:12]


def load_preset(name: str) -> dict[str, Any]:
    return json.loads(preset_path(name).read_text(encoding="utf-8"))


SD_VAE_FACTOR = 8      # Stable Diffusion 1.x/2.x and SDXL VAEs downsample by 8
SIZE_MULTIPLE = 8      # what height and width must be a multiple of, whatever the model


def vae_factor(model: str) -> int | None:
    """How much a preset's VAE downsamples (2 ** (len(block_out_channels) - 1)); None for other models,
    whose factor is only known once they load (8 for Stable Diffusion)."""
    if not is_preset(model):
        return None
    return 2 ** (len(load_preset(model)["vae"]["block_out_channels"]) - 1)


def size_multiple(model: str) -> int:
    """What height/width must be a multiple of for `model`: SIZE_MULTIPLE and its VAE factor."""
    return math.lcm(SIZE_MULTIPLE, vae_factor(model) or SD_VAE_FACTOR)


def render_defaults(model: str) -> dict[str, int]:
    """The height, width and steps a preset renders at when they are not set (its `render` block); {} for hub
    ids and directories, which get SynthesizeConfig's own defaults."""
    return dict(load_preset(model)["render"]) if is_preset(model) else {}


def check_scheduler(name: str) -> str:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    return name


def cache_dir() -> Path:
    """Where built presets are kept: $PCM_CACHE_DIR, else ~/.cache/pcm-net."""
    return Path(os.environ.get("PCM_CACHE_DIR") or Path.home() / ".cache" / "pcm-net").expanduser()


# -- schedulers -----------------------------------------------------------------------------
def make_scheduler(name: str, base_config: Any) -> Any:
    """The scheduler `name` configured like the model's own (betas, prediction type, spacing)."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[check_scheduler(name)])
    return cls.from_config(base_config)


# -- the tiny tokenizer ---------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (the base symbols of CLIP's BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges read from the BPE file bundled with open_clip (no network).

    The file is found without importing open_clip (which imports torchvision, seconds).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed; it ships the BPE vocabulary the tiny tokenizer needs")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # As in CLIP: the first line is a header, then 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges  # type: ignore[return-value]


def clip_tokenizer(model_max_length: int = 77) -> Any:
    """A transformers CLIPTokenizer equal to CLIP's (same ids as open_clip), built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         unk_token="<|endoftext|>")


# -- presets --------------------------------------------------------------------------------
def build_preset(name: str, device: str = "cpu") -> Any:
    """A random-weight StableDiffusionPipeline from a preset's configs; deterministic (fixed seed)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = load_preset(name)
    # Built on the CPU (the CPU RNG gives the same weights on every machine), then moved; fork_rng
    # keeps the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p["seed"])
        unet = UNet2DConditionModel(**p["unet"])
        vae = AutoencoderKL(**p["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**p["text_encoder"]))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(**p["tokenizer"]), unet=unet,
        scheduler=DPMSolverMultistepScheduler(**p["scheduler"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to(device)


def preset_dir(name: str) -> Path:
    """The cache directory of a built preset (its name carries the preset's digest)."""
    return cache_dir() / "diffusion" / f"{name}-{preset_digest(name)}"


def ensure_preset(name: str) -> Path:
    """Build a cached preset once (into a temporary directory, then rename) and return its directory.

    A killed build leaves only a temporary directory, never a half model under the final name;
    two processes building at once both succeed and one of the identical copies is kept.
    """
    final = preset_dir(name)
    if (final / "model_index.json").exists():
        return final
    log.info("building diffusion preset %r into %s (first use)", name, final)
    with atomic_directory(final, keep_existing=True) as tmp:
        build_preset(name).save_pretrained(tmp, safe_serialization=True)
    return final


# -- loading --------------------------------------------------------------------------------
def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(model) or model.count("/") > 1


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def missing_model_message(model: str, revision: str | None, what: str = "diffusion model") -> str:
    rev = f" (revision {revision})" if revision else ""
    rev_arg = f" --revision {revision}" if revision else ""
    why = "the hub is offline (HF_HUB_OFFLINE=1)" if _offline() else "the hub could not be reached"
    local = f"models/{model.rstrip('/').split('/')[-1]}"
    return (f"{what} {model!r}{rev} is not available here: there is no such local directory, it is not in the "
            f"Hugging Face cache, and {why}. Download it on a machine with network:\n"
            f"    hf download {model}{rev_arg} --local-dir {local}\n"
            f"(huggingface_hub older than 0.34 names it: huggingface-cli download {model}{rev_arg} --local-dir "
            f"{local}), then copy {local} to this machine and pass the directory instead of the id "
            f"(`pcm run --set synthesize.model={local}`, `pcm synthesize ... --set model={local}`).")


def _source(model: str, revision: str | None, what: str) -> str:
    """A local directory (checked) or a hub id; a missing local path is an error naming it."""
    local = Path(model).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if _looks_like_path(model):
        raise FileNotFoundError(
            f"{what} directory {model!r} does not exist. Pass a diffusers model directory (one holding "
            f"model_index.json or config.json), a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, "
            f"or a preset ({', '.join(preset_names())}).")
    return model


def load_pipeline(model: str, *, revision: str | None = None, dtype: str = "fp32", device: str = "cpu",
                  scheduler: str = "dpm++") -> Any:
    """A UNet-based diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, Turbo) ready on `device`.

    `model` is a preset name (`tiny`, `sd15-arch`), a local diffusers directory or a hub id (read
    from the local Hugging Face cache when offline). The safety checker is not loaded: it would
    replace flagged training images by black ones.
    """
    check_scheduler(scheduler)
    with quiet_loading():
        pipe = _load_pipeline(model, revision, torch_dtype(dtype), device)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ValueError(f"{model}: {type(pipe).__name__} is not supported; the synthesize stage runs UNet-based "
                         "text-to-image pipelines (Stable Diffusion 1.x/2.x, SDXL and their Turbo/LCM variants)")
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-component progress bars from diffusers and transformers while a pipeline loads (the stage has its
    own bar); their warnings stay."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def _load_pipeline(model: str, revision: str | None, dt: Any, device: str) -> Any:
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    # Without accelerate, diffusers warns at every load that it falls back to low_cpu_mem_usage=False: say it.
    memory = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    if is_preset(model):
        if revision:
            raise ValueError(f"revision {revision!r} given for the preset {model!r}; presets have no revisions")
        if load_preset(model)["cache"]:
            return DiffusionPipeline.from_pretrained(ensure_preset(model), dtype=dt, **memory)
        return build_preset(model, device=device).to(dtype=dt)
    source = _source(model, revision, "diffusion model")
    if Path(source).is_dir() and not (Path(source) / "model_index.json").exists():
        raise FileNotFoundError(f"{source}: not a diffusers pipeline directory (no model_index.json); "
                                "pass the directory that `hf download --local-dir` wrote")
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 passes a deprecated argument to huggingface_hub; nothing to act on.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            index = DiffusionPipeline.load_config(source, revision=revision)
            extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
            return AutoPipelineForText2Image.from_pretrained(source, revision=revision, dtype=dt, **extra, **memory)
    except OSError as e:  # includes huggingface_hub's offline / not-found errors
        if Path(source).is_dir():
            raise FileNotFoundError(f"{source}: incomplete diffusers model directory ({e})") from None
        raise FileNotFoundError(missing_model_message(model, revision)) from None


def load_tiny_vae(spec: str, pipe: Any, *, model: str) -> Any:
    """A TAESD-style AutoencoderTiny decoder matching `pipe` (dtype, device, latent channels).

    `spec` is a hub id (madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL), a local
    directory, or `tiny`: a random decoder from the model preset's `tiny_vae` config (presets only).
    """
    import torch
    from diffusers import AutoencoderTiny

    dtype, device = pipe.vae.dtype, pipe.vae.device
    if spec == "tiny":
        if not is_preset(model):
            raise ValueError("tiny_vae='tiny' is the random decoder of the presets; for real models pass "
                             "madebyollin/taesd (SD 1.x/2.x), madebyollin/taesdxl (SDXL) or a local directory")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(load_preset(model)["seed"] + 1)
            vae = AutoencoderTiny(**load_preset(model)["tiny_vae"])
    else:
        source = _source(spec, None, "tiny VAE")
        try:
            vae = AutoencoderTiny.from_pretrained(source, dtype=dtype)
        except OSError:
            if Path(source).is_dir():
                raise FileNotFoundError(f"{source}: not an AutoencoderTiny directory (config.json + weights)") from None
            raise FileNotFoundError(missing_model_message(spec, None, "tiny VAE")) from None
    want = pipe.unet.config.in_channels
    if vae.config.latent_channels != want:
        raise ValueError(f"tiny VAE {spec!r} has {vae.config.latent_channels} latent channels but the model's UNet "
                         f"makes {want}; use the tiny VAE trained for this model family")
    return vae.to(device=device, dtype=dtype).eval()


# -- generation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSpec:
    """What `Synthesizer` reads: the model and its sampling settings (what), then how it runs on the device.

    The synthesize stage builds one from its config (`pcm.stages.synthesize.generation_spec`).
    """

    model: str
    revision: str | None = None
    dtype: str = "fp32"
    scheduler: str = "dpm++"
    steps: int = 20
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    negative_prompt: str = ""
    tiny_vae: str | None = None
    # -- how, not what
    device: str = "auto"
    batch_size: int = 8          # a compiled UNet gets every batch padded to this size
    compile: bool = False
    channels_last: bool = False


class Prompted(Protocol):
    """A planned sample: its prompt and its own seed (pcm.samples.Sample)."""

    prompt: str
    seed: int


def decode_latents(vae: Any, latents: Any) -> Any:
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1], as the pipelines decode them."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:  # SDXL-style VAEs with per-channel statistics
        m = latents.new_tensor(mean).view(1, -1, 1, 1)
        s = latents.new_tensor(std).view(1, -1, 1, 1)
        z = latents * s / cfg.scaling_factor + m
    else:
        z = latents / cfg.scaling_factor
    param_dtype = next(vae.parameters()).dtype
    return vae.decode(z.to(param_dtype), return_dict=False)[0]


def to_uint8(images: Any) -> Any:
    """[B, 3, H, W] in [-1, 1] -> uint8 numpy [B, H, W, 3] (diffusers' postprocess, bit for bit).

    The same operations in the same dtypes as diffusers (the affine map in the image dtype, then
    float32, round half to even), but on the device: only uint8 crosses to the host.
    """
    import torch

    x = (images / 2 + 0.5).clamp(0, 1).float()
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Synthesizer:
    """A loaded pipeline that turns (prompts, seeds) into uint8 images, or a failure reason per sample."""

    def __init__(self, spec: GenerationSpec) -> None:
        import torch

        self.spec = spec
        self.device = resolve_device(spec.device)
        self.pipe = load_pipeline(spec.model, revision=spec.revision, dtype=spec.dtype,
                                  device=self.device, scheduler=spec.scheduler)
        self.vae = self.pipe.vae
        if spec.tiny_vae:
            self.vae = load_tiny_vae(spec.tiny_vae, self.pipe, model=spec.model)
        # SDXL's VAE overflows in fp16; its pipeline decodes in fp32 and so do we.
        upcast = getattr(self.vae.config, "force_upcast", False) and hasattr(self.pipe, "upcast_vae")
        if upcast and self.vae is self.pipe.vae and self.vae.dtype == torch.float16:
            self.vae = self.vae.to(torch.float32)
        if spec.channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if spec.compile:
            self.pipe.unet = torch.compile(self.pipe.unet)
        scale = self.pipe.vae_scale_factor
        if spec.height % scale or spec.width % scale:
            raise ValueError(f"height and width must be multiples of {scale} for {spec.model}")
        self.latent_shape = (self.pipe.unet.config.in_channels, spec.height // scale, spec.width // scale)

    def generate_samples(self, samples: Sequence[Prompted]) -> list[Any]:
        return self.generate([s.prompt for s in samples], [s.seed for s in samples])

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Any]:
        """One entry per prompt: a uint8 [H, W, 3] array, or a string saying why the sample failed."""
        import torch

        n = len(prompts)
        if self.spec.compile and n < self.spec.batch_size:
            # A compiled UNet recompiles for a new batch size: pad the tail batch, drop the extra rows.
            pad = self.spec.batch_size - n
            prompts, seeds = list(prompts) + [prompts[-1]] * pad, list(seeds) + [seeds[-1]] * pad
        latents = self.denoise(prompts, seeds)[:n]
        out: list[Any] = [None] * n
        finite = torch.isfinite(latents.flatten(1)).all(dim=1).tolist()
        good = [i for i in range(n) if finite[i]]
        for i in range(n):
            if not finite[i]:
                out[i] = "non-finite latents after denoising"
        if good:
            with torch.inference_mode():
                images = decode_latents(self.vae, latents[good])
            ok_pixels = torch.isfinite(images.flatten(1)).all(dim=1).tolist()
            pixels = to_uint8(images.nan_to_num())
            for j, i in enumerate(good):
                out[i] = pixels[j] if ok_pixels[j] else "non-finite pixels after VAE decoding"
        return out

    def denoise(self, prompts: Sequence[str], seeds: Sequence[int]) -> Any:
        """Final latents [B, C, h, w] from the pipeline: prompts encoded in one batch, guidance batched.

        Each sample has its own CPU generator: it draws the initial latents here and the noise of
        ancestral samplers inside the pipeline, so a sample does not depend on its batch.
        """
        import torch

        c = self.spec
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = torch.cat([torch.randn((1, *self.latent_shape), generator=g) for g in generators])
        with torch.inference_mode():
            return self.pipe(
                prompt=list(prompts), negative_prompt=[c.negative_prompt] * len(prompts) if c.negative_prompt else None,
                height=c.height, width=c.width, num_inference_steps=c.steps, guidance_scale=c.guidance_scale,
                latents=latents.to(self.pipe.device, self.pipe.unet.dtype), generator=generators,
                output_type="latent", return_dict=False)[0]
