"""CLIP-weighted cross-entropy, label smoothing, focal factor and the Noam schedule against hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pcm.loss import caption_loss, clip_weights
from pcm.optim import noam_lr

PAD = 0


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6)
    targets = torch.tensor([[2, 3, 4, 5], [1, 2, PAD, PAD], [5, PAD, PAD, PAD]])
    return logits, targets


def hand_nll(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Sum over real tokens of -log softmax, per caption, in plain Python loops."""
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(logits.shape[1]):
            y = int(targets[b, t])
            if y == PAD:
                continue
            row = logits[b, t].tolist()
            total += -(row[y] - math.log(sum(math.exp(z) for z in row)))
        out.append(total)
    return out


def test_clip_weight_is_w_times_cosine_clamped_to_one():
    cos = torch.tensor([0.1, 0.2, 0.3, -0.2])
    assert torch.allclose(clip_weights(cos, 4.0), torch.tensor([0.4, 0.8, 1.0, 0.0]))
    assert torch.allclose(clip_weights(cos, 2.5), torch.tensor([0.25, 0.5, 0.75, 0.0]))
    assert torch.equal(clip_weights(cos, 4.0, enabled=False), torch.ones(4))


def test_the_numpy_weights_the_reports_and_train_use_are_the_losss_own():
    """encode's weight summary and train's recorded weights (cxe_weights_np) give what the loss trains with."""
    import numpy as np

    from pcm.loss import cxe_weights_np
    from pcm.score_summary import cxe_weight_stats

    cos = np.array([-0.3, 0.0, 0.1, 0.24, 0.25, 0.9], dtype=np.float32)
    for w in (1.8, 4.0):
        torch_w = clip_weights(torch.from_numpy(cos), w).double().numpy()
        assert np.allclose(cxe_weights_np(cos, w), torch_w, atol=1e-6)
        stats = cxe_weight_stats(cos, w)
        assert stats["mean"] == round(float(torch_w.mean()), 4)
        assert stats["fraction_zero"] == round(float((torch_w <= 0).mean()), 4)


def test_unit_weights_equal_cross_entropy_summed_over_tokens_mean_over_batch():
    logits, targets = batch()
    want = F.cross_entropy(logits.reshape(-1, 6), targets.reshape(-1), ignore_index=PAD, reduction="sum") / 3
    assert torch.allclose(caption_loss(logits, targets, pad=PAD), want, atol=1e-6)
    assert torch.allclose(caption_loss(logits, targets, torch.ones(3), pad=PAD), want, atol=1e-6)


def test_weighted_loss_against_hand_computation_without_batch_normalisation():
    logits, targets = batch()
    cos = torch.tensor([0.1, 0.3, 0.2])
    w = clip_weights(cos, 4.0)                                   # 0.4, 1.0, 0.8
    nll = hand_nll(logits, targets)
    want = (0.4 * nll[0] + 1.0 * nll[1] + 0.8 * nll[2]) / 3      # not divided by the sum of weights
    assert caption_loss(logits, targets, w, pad=PAD).item() == pytest.approx(want, rel=1e-5)


def test_label_smoothing_is_the_release_kl_to_one_minus_eps_and_eps_over_v_minus_one():
    logits, targets = batch()
    eps, V = 0.1, 6
    logp = torch.log_softmax(logits, -1)
    per = []
    for b in range(3):
        total = 0.0
        for t in range(4):
            y = int(targets[b, t])
            if y == PAD:
                continue
            for v in range(V):   # KL(q || p) = sum_v q_v (log q_v - log p_v), term by term
                q = 1 - eps if v == y else eps / (V - 1)
                total += q * (math.log(q) - logp[b, t, v].item())
        per.append(total)
    got = caption_loss(logits, targets, pad=PAD, label_smoothing=eps).item()
    assert got == pytest.approx(sum(per) / 3, rel=1e-5)


def release_loss(logits, targets, clip_score, *, alpha, eps, gamma, pad):
    """X-modaler's WeightedLabelSmoothing (gamma_type 'batch'), re-derived step by step on small tensors.

    The release pads targets with -1; here pad ids are mapped to -1 first. Its 'batch' focal
    factor multiplies an [N] loss by an [N, 1] factor, giving an [N, N] matrix whose entries with
    both tokens real are averaged: mean_i(g_i) * mean_j(loss_j).
    """
    bs, seq_len, V = logits.shape
    t = torch.where(targets == pad, torch.full_like(targets, -1), targets).reshape(-1)
    w = torch.clamp(clip_score * alpha, 0.0, 1.0)[:, None].expand(bs, seq_len).reshape(-1)
    logP = F.log_softmax(logits.reshape(-1, V), dim=-1)
    mask = t >= 0
    idx = t.clamp(min=0)
    g = (1 - torch.gather(F.softmax(logits.reshape(-1, V), dim=-1), 1, idx[:, None])) ** gamma   # [N, 1]
    true_dist = torch.full_like(logP, eps / (V - 1)).scatter_(1, idx[:, None], 1 - eps)
    loss = torch.nn.KLDivLoss(reduction="none")(logP, true_dist).sum(1) * w                        # [N]
    loss = loss * g                                                                                  # [N, N]
    mask = mask[None, :].expand(len(t), -1) * mask[:, None]
    return torch.masked_select(loss, mask).mean()


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_release_numerics_match_the_release_formula_in_value_and_gradient(gamma):
    torch.manual_seed(3)
    logits = torch.randn(4, 7, 11, dtype=torch.float64)
    targets = torch.randint(1, 11, (4, 7))
    targets[1, 4:] = PAD
    targets[3, 2:] = PAD
    cos = torch.tensor([0.1, 0.3, 0.2, 0.05], dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    want = release_loss(a, targets, cos, alpha=4.0, eps=0.1, gamma=gamma, pad=PAD)
    got = caption_loss(b, targets, clip_weights(cos, 4.0).double(), pad=PAD, label_smoothing=0.1,
                       focal_gamma=gamma, reduction="token-mean")
    want.backward()
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(a.grad, b.grad.to(a.grad.dtype), rtol=1e-4, atol=1e-7)


def test_token_mean_reduction_divides_by_real_tokens_not_captions():
    logits, targets = batch()
    nll = hand_nll(logits, targets)                              # 4 + 2 + 1 = 7 real tokens
    assert caption_loss(logits, targets, pad=PAD, reduction="token-mean").item() == pytest.approx(sum(nll) / 7, rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        caption_loss(logits, targets, pad=PAD, reduction="mean")


def test_focal_factor_is_the_batch_mean_of_one_minus_p_target_squared():
    logits, targets = batch()
    p = torch.softmax(logits, -1)
    factors = [(1 - p[b, t, int(targets[b, t])].item()) ** 2 for b in range(3) for t in range(4)
               if int(targets[b, t]) != PAD]
    want = sum(hand_nll(logits, targets)) / 3 * (sum(factors) / len(factors))
    assert caption_loss(logits, targets, pad=PAD, focal_gamma=2.0).item() == pytest.approx(want, rel=1e-5)


def test_loss_is_linear_in_the_weights_and_ignores_pad_logits():
    logits, targets = batch()
    w = torch.tensor([0.4, 1.0, 0.8])
    assert torch.allclose(caption_loss(logits, targets, w / 2, pad=PAD), caption_loss(logits, targets, w, pad=PAD) / 2)
    changed = logits.clone()
    changed[2, 1:] += 100.0                                      # only padded positions of caption 2
    assert torch.allclose(caption_loss(changed, targets, w, pad=PAD), caption_loss(logits, targets, w, pad=PAD))


def test_noam_schedule_values():
    peak = noam_lr(10_000)
    assert peak == pytest.approx(512 ** -0.5 * 10_000 ** -0.5) and peak == pytest.approx(4.419e-4, rel=1e-3)
    assert noam_lr(9_999) < peak and noam_lr(10_001) < peak
    assert noam_lr(5_000) == pytest.approx(peak / 2)             # linear warm-up
    assert noam_lr(40_000) == pytest.approx(peak / 2)            # then 1 / sqrt(step)
    assert noam_lr(1) == pytest.approx(512 ** -0.5 * 10_000 ** -1.5)
    assert noam_lr(100, d_model=512, warmup=100, factor=2.0) == pytest.approx(2 * 512 ** -0.5 * 0.1)
