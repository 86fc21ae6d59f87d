"""Training throughput of PCM-Net (samples/s and model FLOP utilisation) on random features of the real shapes.

    python bench/train.py --preset vitl14 --device cuda --batch-size 32 --steps 300 --amp --cuda-graphs
    python bench/train.py --preset tiny --device cpu --steps 20          # quick check on a laptop

ViT-L/14 shapes: 64 patches x 1024, global 768, concept bank 446, vocabulary 10,200, 20 words
(+ BOS/EOS = 21 decoder positions). The step is the training loop's own (`pcm.optim.TrainStep`):
bf16 autocast, fused Adam, CXE loss, clipping by value, and optionally torch.compile and a
whole-step CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcm.model import PCMNet, load_preset  # noqa: E402
from pcm.optim import TrainStep, make_optimizer  # noqa: E402
from pcm.stages.train import TrainConfig  # noqa: E402
from pcm.stages.train_worker import optimizer_spec, step_spec  # noqa: E402

SHAPES = {"vitl14": (768, 1024, 64), "vitb32": (512, 768, 49), "tiny": (64, 64, 4)}
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def random_batch(batch: int, shapes: tuple[int, int, int], vocab: int, words: int, device: torch.device) -> dict:
    d_embed, d_width, n = shapes
    g = torch.nn.functional.normalize(torch.randn(batch, d_embed, device=device), dim=-1)
    tokens = torch.randint(4, vocab, (batch, words + 2), device=device)
    return {"global": g, "patches": torch.randn(batch, n, d_width, device=device), "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:].contiguous(), "clip_score": torch.rand(batch, device=device) * 0.4}


def step_flops(model: PCMNet, batch: dict, step: TrainStep) -> int:
    """FLOPs of one eager forward + backward, counted by torch's FlopCounterMode (optimizer excluded)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pcm.loss import caption_loss

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(batch["global"].device.type, dtype=torch.bfloat16, enabled=step.amp):
        logits = model(batch["global"], batch["patches"], batch["inputs"])
        caption_loss(logits.float(), batch["targets"], pad=0).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="vitl14", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=200, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps (compilation, graph capture)")
    p.add_argument("--vocab", type=int, default=10_200)
    p.add_argument("--concepts", type=int, default=446)
    p.add_argument("--words", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (default on CUDA)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the whole step as a CUDA graph")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (else from a table)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    amp = a.amp or device.type == "cuda"
    if a.cuda_graphs and device.type != "cuda":
        p.error("--cuda-graphs needs a CUDA device")
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    shapes = SHAPES[a.preset]
    cfg = load_preset(a.preset).with_data_shapes(*shapes, "bench")
    bank = torch.nn.functional.normalize(torch.randn(a.concepts, shapes[0]), dim=-1)
    head = {"ln_post.weight": torch.ones(shapes[1]), "ln_post.bias": torch.zeros(shapes[1]),
            "proj": torch.randn(shapes[1], shapes[0]) / shapes[1] ** 0.5}
    model = PCMNet(cfg, a.vocab, bank, head).to(device).train()
    params = [q for q in model.parameters() if q.requires_grad]
    config = TrainConfig(preset=a.preset, batch_size=a.batch_size, device=a.device, cuda_graphs=a.cuda_graphs)
    opt = make_optimizer(params, optimizer_spec(config), device, capturable=a.cuda_graphs)
    net = torch.compile(model) if a.compile else model
    step = TrainStep(net, opt, params, step_spec(config), pad=0, device=device, amp=amp, cuda_graph=a.cuda_graphs)
    batches = [random_batch(a.batch_size, shapes, a.vocab, a.words, device) for _ in range(4)]
    flops = step_flops(model, batches[0], step)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(a.warmup):
        step(batches[i % 4], 1e-4)
    sync()
    t0 = time.perf_counter()
    for i in range(a.steps):
        loss = step(batches[i % 4], 1e-4)
    sync()
    seconds = time.perf_counter() - t0
    per_s = a.steps * a.batch_size / seconds
    peak = peak_tflops(device, a.peak_tflops)
    achieved = flops * a.steps / seconds / 1e12
    result = {"preset": a.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "batch_size": a.batch_size, "compile": a.compile, "amp": amp, "cuda_graphs": a.cuda_graphs,
              "params_m": round(sum(q.numel() for q in params) / 1e6, 2), "step_ms": round(1000 * seconds / a.steps, 3),
              "samples_per_s": round(per_s, 1), "gflops_per_step": round(flops / 1e9, 2),
              "achieved_tflops": round(achieved, 2), "mfu": round(achieved / peak, 4) if peak else None,
              "loss": round(float(loss), 4)}
    if a.json:
        print(json.dumps(result))
    else:
        mfu = f"{100 * result['mfu']:.1f}% of {peak:.0f} TFLOP/s" if peak else "n/a (no peak known; --peak-tflops)"
        print(f"{a.preset} on {result['device']}: batch {a.batch_size}, {result['step_ms']} ms/step, "
              f"{result['samples_per_s']} samples/s, {result['gflops_per_step']} GFLOP/step, "
              f"{result['achieved_tflops']} TFLOP/s, MFU {mfu}")
    return result


if __name__ == "__main__":
    main()
