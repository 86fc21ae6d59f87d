"""The two-level bootstrap of the ablation: intervals and paired differences against known truths."""

from __future__ import annotations

import numpy as np
import pytest

from pcm.stats import DETECTABLE_SE, bootstrap_arms


def test_a_constant_shift_is_found_exactly_and_noise_free_arms_have_no_width():
    base = np.tile(np.arange(50, dtype=float), (3, 1))          # 3 seeds that agree, 50 images
    out = bootstrap_arms({"base": base, "better": base + 5.0}, "base", n=300)
    assert out["better"]["vs"]["mean"] == pytest.approx(5.0)
    assert out["better"]["vs"]["ci95"] == pytest.approx([5.0, 5.0])   # paired by seed and image: no spread
    assert out["better"]["vs"]["excludes_0"] and out["better"]["vs"]["detectable"] == pytest.approx(0.0, abs=1e-9)
    assert out["base"]["mean"] == pytest.approx(24.5) and out["base"]["sd"] == 0.0
    assert "vs" not in out["base"]


def test_intervals_cover_the_truth_at_about_the_nominal_rate():
    # Seeds differ by N(0, 2) and images by N(0, 10): the interval of the mean should hold the true mean 100
    # (and the difference's interval the true effect 0) in about 95 of 100 experiments.
    rng = np.random.default_rng(1)
    hits_mean, hits_diff = 0, 0
    for trial in range(60):
        img = rng.normal(0, 10, 200)
        a = 100 + img + rng.normal(0, 2, (5, 1)) + rng.normal(0, 3, (5, 200))
        b = 100 + img + rng.normal(0, 2, (5, 1)) + rng.normal(0, 3, (5, 200))
        out = bootstrap_arms({"a": a, "b": b}, "a", n=400, seed=trial)
        lo, hi = out["a"]["ci95"]
        hits_mean += lo <= 100 <= hi
        dlo, dhi = out["b"]["vs"]["ci95"]
        hits_diff += dlo <= 0 <= dhi
    assert hits_mean >= 50 and hits_diff >= 50          # ~57 expected; a broken resampling falls far below


def test_detectable_effect_is_2_8_standard_errors_and_arms_must_share_images():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (4, 30)), rng.normal(0, 1, (4, 30))
    vs = bootstrap_arms({"a": a, "b": b}, "a", n=500)["b"]["vs"]
    assert vs["detectable"] == pytest.approx(DETECTABLE_SE * vs["se"]) and DETECTABLE_SE == pytest.approx(2.8016, abs=1e-3)
    assert vs["per_seed"] == pytest.approx(list(b.mean(1) - a.mean(1)))
    with pytest.raises(ValueError, match="same images"):
        bootstrap_arms({"a": a, "b": b[:, :10]}, "a")


def test_each_arm_can_have_its_own_reference():
    base = np.tile(np.arange(20, dtype=float), (2, 1))
    out = bootstrap_arms({"base": base, "method": base + 3, "with_step": base + 10},
                         {"method": "base", "with_step": "method"}, n=200)
    assert out["method"]["vs"]["reference"] == "base" and out["method"]["vs"]["mean"] == pytest.approx(3)
    assert out["with_step"]["vs"]["reference"] == "method" and out["with_step"]["vs"]["mean"] == pytest.approx(7)
    assert "vs" not in out["base"]
