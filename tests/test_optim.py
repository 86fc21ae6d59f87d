"""pcm/optim.py: the Noam schedule against its formula, Adam from its spec, and one eager TrainStep by hand."""

from __future__ import annotations

import pytest
import torch

from pcm.loss import caption_loss, clip_weights
from pcm.optim import OptimizerSpec, StepSpec, TrainStep, make_optimizer, noam_lr


@pytest.mark.parametrize("step, d_model, warmup, factor", [
    (1, 512, 10_000, 1.0), (37, 512, 10_000, 1.0), (10_000, 512, 10_000, 1.0), (123_456, 512, 10_000, 1.0),
    (5, 64, 10, 2.5), (10, 64, 10, 2.5), (11, 64, 10, 2.5), (999, 256, 400, 0.3)])
def test_noam_lr_is_its_formula(step, d_model, warmup, factor):
    want = factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
    assert noam_lr(step, d_model, warmup, factor) == want


def test_noam_lr_counts_steps_from_one():
    assert noam_lr(0) == noam_lr(-3) == noam_lr(1)


def test_make_optimizer_is_adam_as_the_spec_says():
    params = [torch.nn.Parameter(torch.zeros(3))]
    spec = OptimizerSpec(lr=noam_lr(1), betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01)
    opt = make_optimizer(params, spec, torch.device("cpu"))
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (noam_lr(1), (0.8, 0.95), 1e-6, 0.01)
    assert not group["fused"] and not group["capturable"]  # fused only on GPU; capturable only when asked


class TinyNet(torch.nn.Module):
    """The captioner's call signature, net(global, patches, inputs) -> logits [B, L, V], in two layers."""

    def __init__(self, d: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.image = torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, g: torch.Tensor, patches: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(inputs) + self.image(g + patches.mean(1))[:, None])


def tiny_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 11, (4, 6), generator=gen)
    tokens[2, 4:] = 0  # padding
    return {"global": torch.randn(4, 8, generator=gen), "patches": torch.randn(4, 3, 8, generator=gen),
            "inputs": tokens[:, :-1], "targets": tokens[:, 1:].contiguous(),
            "clip_score": torch.rand(4, generator=gen) * 0.4}


SPEC = StepSpec(cxe=True, cxe_w=4.0, label_smoothing=0.1, focal_gamma=2.0, loss_reduction="token-mean", grad_clip=0.05)


def test_an_eager_train_step_is_forward_loss_backward_clip_adam():
    torch.manual_seed(0)
    net, ref = TinyNet(), TinyNet()
    ref.load_state_dict(net.state_dict())
    adam = OptimizerSpec(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cpu = torch.device("cpu")
    step = TrainStep(net, make_optimizer(list(net.parameters()), adam, cpu), list(net.parameters()), SPEC, pad=0,
                     device=cpu, amp=False)
    ref_opt = make_optimizer(list(ref.parameters()), adam, cpu)
    for i, lr in enumerate([1e-3, 3e-3, 2e-3]):
        b = tiny_batch()
        got = step(b, lr)
        # The same step by hand: the order the loop's numerics depend on.
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.zero_grad(set_to_none=True)
        logits = ref(b["global"], b["patches"], b["inputs"])
        loss = caption_loss(logits, b["targets"], clip_weights(b["clip_score"], SPEC.cxe_w, SPEC.cxe), pad=0,
                            label_smoothing=SPEC.label_smoothing, focal_gamma=SPEC.focal_gamma,
                            reduction=SPEC.loss_reduction)
        loss.backward()
        torch.nn.utils.clip_grad_value_(list(ref.parameters()), SPEC.grad_clip)
        ref_opt.step()
        assert torch.equal(got, loss.detach()), i
        assert step.opt.param_groups[0]["lr"] == lr
        for (name, a), b_ in zip(net.state_dict().items(), ref.state_dict().values(), strict=True):
            assert torch.equal(a, b_), (i, name)


def test_no_clipping_when_grad_clip_is_none():
    torch.manual_seed(0)
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spec = StepSpec(cxe=False, cxe_w=4.0, label_smoothing=0.0, focal_gamma=0.0, loss_reduction="caption-sum",
                    grad_clip=None)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    TrainStep(net, opt, list(net.parameters()), spec, pad=0, device=torch.device("cpu"), amp=False)(tiny_batch(), 1.0)
    grads_beyond_clip = any((before[k] - v).abs().max() > 0.05 for k, v in net.state_dict().items())
    assert grads_beyond_clip  # plain SGD at lr 1 moved some weight by more than a 0.05 clip would allow
