"""The optimisation side of training: Adam as the paper sets it, the Noam schedule, and one training step.

torch is imported inside the functions: the train stage imports this module, and `pcm --help`
must not pay for torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def noam_lr(step: int, d_model: int = 512, warmup: int = 10_000, factor: float = 1.0) -> float:
    """Noam schedule: factor * d^-0.5 * min(step^-0.5, step * warmup^-1.5), steps counted from 1."""
    step = max(step, 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


@dataclass(frozen=True)
class OptimizerSpec:
    """Adam's settings; `lr` is where it starts (the schedule sets it again at every step)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def make_optimizer(params: list, spec: OptimizerSpec, device: Any, capturable: bool = False) -> Any:
    """Adam as the paper sets it (fused on GPU); `capturable` keeps its state on the GPU for CUDA graphs."""
    import torch

    return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay,
                            fused=device.type == "cuda", capturable=capturable)


@dataclass(frozen=True)
class StepSpec:
    """What one step's loss and update read: CLIP weighting, the loss's form, clipping by value."""

    cxe: bool
    cxe_w: float
    label_smoothing: float
    focal_gamma: float
    loss_reduction: str
    grad_clip: float | None


def clipped_share(grads: list[Any], clip: float) -> float:
    """The share of gradient elements whose magnitude exceeds `clip`: those that clipping by value changes."""
    import torch

    grads = [g for g in grads if g is not None]
    n = sum(g.numel() for g in grads)
    if n == 0:
        return 0.0
    over = torch.stack([(g.abs() > clip).sum() for g in grads]).sum()
    return float(over) / n


class TrainStep:
    """One optimisation step: forward (bf16 autocast on GPU), CXE loss, backward, clip by value, Adam.

    With `cuda_graph` the whole step is captured once, after `WARMUP` eager steps on a side stream,
    and replayed from then on: at the paper's batch of 32 a step is bound by kernel-launch
    overhead, not by FLOPs. Batches are copied into static buffers; the learning rate lives in a
    GPU tensor the graph reads.

    `clip_share`: after a call with `measure_clip`, the share of gradient elements that clipping changed
    on that step (pcm.optim.clipped_share; a device sync, so asked for on log steps only); None when not
    measured, when clipping is off, or under a CUDA graph (a graph cannot sync).
    """

    WARMUP = 3

    def __init__(self, net: Any, opt: Any, params: list, spec: StepSpec, pad: int, device: Any, amp: bool,
                 cuda_graph: bool = False) -> None:
        import torch

        self.net, self.opt, self.params, self.spec, self.pad = net, opt, params, spec, pad
        self.device, self.amp, self.cuda_graph = device, amp, cuda_graph
        self.calls, self.graph, self.static, self.static_loss = 0, None, None, None
        self.clip_share: float | None = None
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

    def _forward_backward(self, b: dict, measure_clip: bool = False) -> Any:
        import torch

        from pcm.loss import caption_loss, clip_weights

        # No autocast weight cache: a captured graph must recompute the casts at every replay.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            logits = self.net(b["global"], b["patches"], b["inputs"])
        s = self.spec
        loss = caption_loss(logits, b["targets"], clip_weights(b["clip_score"], s.cxe_w, s.cxe), pad=self.pad,
                            label_smoothing=s.label_smoothing, focal_gamma=s.focal_gamma, reduction=s.loss_reduction)
        loss.backward()
        if s.grad_clip is not None:
            if measure_clip:  # before clipping: the elements it changes
                self.clip_share = clipped_share([p.grad for p in self.params], s.grad_clip)
            torch.nn.utils.clip_grad_value_(self.params, s.grad_clip)
        self.opt.step()
        return loss.detach()

    def __call__(self, batch: dict, lr: float, measure_clip: bool = False) -> Any:
        """Train on one batch (tensors on the device) at learning rate `lr`; returns the loss tensor.
        `measure_clip`: set `clip_share` for this step (eager mode only)."""
        import torch

        self._set_lr(lr)
        self.clip_share = None
        if not self.cuda_graph:
            self.opt.zero_grad(set_to_none=True)
            return self._forward_backward(batch, measure_clip)
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
