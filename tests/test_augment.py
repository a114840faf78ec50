"""augment.py: DeiT's RandAugment on timm's scale (checked against timm itself), random
erasing. MixUp/CutMix are torchvision's (v2.MixUp, v2.CutMix), exercised by every train.py test."""

import math
import random

import pytest
import torch
from torchvision import tv_tensors

import augment

timm_aa = pytest.importorskip("timm.data.auto_augment")


def image(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return tv_tensors.Image(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))


def recorded_args(monkeypatch, name, m):
    """The arguments RAND_OPS[name] hands to torchvision at magnitude m (signs made positive)."""
    calls = {}
    monkeypatch.setattr(random, "random", lambda: 0.0)  # _signed keeps +x
    for fn in ("rotate", "affine", "posterize", "solarize", "adjust_brightness"):
        monkeypatch.setattr(
            augment.TF, fn, lambda img, *a, _fn=fn, **kw: calls.setdefault(_fn, (a, kw)) and img
        )
    augment.RAND_OPS[name](image(), m, [0, 0, 0])
    return calls


def test_the_op_set_and_the_policy_are_timms():
    assert set(augment.RAND_OPS) == set(timm_aa._RAND_INCREASING_TRANSFORMS)
    timm = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", {})
    ours = augment.parse_aa("rand-m9-mstd0.5-inc1")
    assert ours == {"num_ops": timm.num_layers, "magnitude": 9.0, "magnitude_std": 0.5}
    assert {op.magnitude for op in timm.ops} == {9} and {op.prob for op in timm.ops} == {0.5}
    assert {op.magnitude_std for op in timm.ops} == {0.5}
    assert augment.RandAugment(**ours).prob == 0.5
    assert augment.parse_aa("none") is None


@pytest.mark.parametrize("m", [9.0, 10.0, 4.5])
def test_largest_rotation_shear_translate_equal_timms(monkeypatch, m):
    """At DeiT's m9, rotate ≤ 27°, shear ≤ 0.27, translate ≤ 0.405 of the side: timm's
    level-to-argument functions, not torchvision's 31-bin scale (0.3 of that at magnitude 9)."""
    rotate = recorded_args(monkeypatch, "Rotate", m)["rotate"][0][0]
    assert rotate == pytest.approx(timm_aa._rotate_level_to_arg(m, {})[0])
    shear = recorded_args(monkeypatch, "ShearX", m)["affine"][1]["shear"][0]
    timm_shear = abs(timm_aa._shear_level_to_arg(m, {})[0])  # a shear factor
    assert math.tan(math.radians(shear)) == pytest.approx(timm_shear)
    shift = recorded_args(monkeypatch, "TranslateXRel", m)["affine"][1]["translate"][0]
    timm_shift = timm_aa._translate_rel_level_to_arg(m, {"translate_pct": 0.45})[0]
    assert shift == pytest.approx(abs(timm_shift) * 32)  # a fraction of the image side
    bits = recorded_args(monkeypatch, "PosterizeIncreasing", m)["posterize"][0][0]
    assert bits == timm_aa._posterize_increasing_level_to_arg(m, {})[0]
    if m < 10:
        threshold = recorded_args(monkeypatch, "SolarizeIncreasing", m)["solarize"][0][0]
        assert threshold == timm_aa._solarize_increasing_level_to_arg(m, {})[0]
    factor = recorded_args(monkeypatch, "BrightnessIncreasing", m)["adjust_brightness"][0][0]
    assert factor == pytest.approx(max(timm_aa._enhance_increasing_level_to_arg(m, {})))


def test_magnitude_noise_varies_between_calls():
    random.seed(0)
    noisy = augment.RandAugment(magnitude=9.0, magnitude_std=0.5)
    draws = torch.tensor([noisy.sample_magnitude() for _ in range(2000)])
    assert draws.std() == pytest.approx(0.5, rel=0.1) and draws.mean() == pytest.approx(9, abs=0.05)
    assert draws.max() <= 10.0  # clipped to timm's [0, 10]
    fixed = augment.RandAugment(magnitude=9.0, magnitude_std=0.0)
    assert {fixed.sample_magnitude() for _ in range(10)} == {9.0}


@pytest.mark.parametrize("name", sorted(augment.RAND_OPS))
def test_every_op_keeps_a_uint8_image(name):
    for m in (0.0, 9.0, 10.0):
        out = augment.RAND_OPS[name](image(), m, [124, 116, 104])
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


@pytest.mark.parametrize("remode", ["pixel", "const"])
def test_random_erasing_erases_one_rectangle_per_image(remode):
    torch.manual_seed(0)
    x = torch.full((4, 3, 40, 40), 7.0)  # normalised images far from N(0, 1) values
    augment.random_erasing(x, 1.0, remode)  # in place, on the batch's device
    for img in x:
        erased = (img != 7.0).all(0)  # (40, 40)
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert erased.sum() == area  # one solid rectangle
        assert 0.02 * 1600 <= area <= 1600 / 3 + 40  # timm's scale (0.02, 1/3), rounding
        assert (img == 0).any() == (remode == "const")


def test_random_erasing_probability_and_count():
    random.seed(0)
    x = torch.full((400, 1, 20, 20), 7.0)
    augment.random_erasing(x, 0.25, "const", count=1)
    hit = (x == 0).flatten(1).any(1).float().mean()
    assert 0.18 < hit < 0.32  # p = 0.25 per image
    one, upto3 = torch.full((2, 300, 1, 40, 40), 7.0)
    augment.random_erasing(one, 1.0, "const", count=1)
    augment.random_erasing(upto3, 1.0, "const", count=3)  # 1, 2 or 3 rectangles: 2 on average
    ratio = (upto3 == 0).float().mean() / (one == 0).float().mean()
    assert 1.4 < ratio < 2.1  # less than 2: rectangles overlap
