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


# ------------------------------------------------------------------------ the batched op parameters
def one_op_params(name, m, sign=1.0, height=32, width=32):
    """The parameter row (13,) that the batched path builds for one image drawing `name`."""
    op = torch.tensor([list(augment.RAND_OPS).index(name)])
    as_f64 = lambda v: torch.tensor([v], dtype=torch.float64)
    return augment._op_params(op, as_f64(m), as_f64(sign), height, width)[0]


def test_the_parameter_columns_are_named_and_hold_timms_arguments():
    """The named columns tile the 13 columns once each, and each holds its op's argument as
    timm's level-to-argument functions give it."""
    named = [
        augment.FACTOR,
        augment.POSTERIZE_MASK,
        augment.SOLARIZE_THRESHOLD,
        augment.SOLARIZE_ADD,
        augment.AFFINE,
        augment.FILL_COLOUR,
    ]
    columns = [c for cols in named for c in range(augment.NUM_PARAMS)[cols]]
    assert columns == list(range(augment.NUM_PARAMS))

    for m in (0.0, 4.5, 9.0, 10.0):
        factor = one_op_params("BrightnessIncreasing", m)[augment.FACTOR]
        assert factor.item() == pytest.approx(max(timm_aa._enhance_increasing_level_to_arg(m, {})))
        bits = timm_aa._posterize_increasing_level_to_arg(m, {})[0]  # the high bits kept
        mask = one_op_params("PosterizeIncreasing", m)[augment.POSTERIZE_MASK]
        assert mask.item() == 256 - 2 ** (8 - bits)
        threshold = one_op_params("SolarizeIncreasing", m)[augment.SOLARIZE_THRESHOLD]
        assert threshold.item() == timm_aa._solarize_increasing_level_to_arg(m, {})[0]
        add = one_op_params("SolarizeAdd", m)[augment.SOLARIZE_ADD]
        assert add.item() == timm_aa._solarize_add_level_to_arg(m, {})[0]
        assert one_op_params("Rotate", m)[augment.FILL_COLOUR].tolist() == augment.FILL

        # a shift by t pixels: source x − t, in affine_grid's units (±1 the edges) −2t / W
        t = timm_aa._translate_rel_level_to_arg(m, {"translate_pct": 0.45})[0] * 32
        theta = one_op_params("TranslateXRel", m)[augment.AFFINE].view(2, 3)
        want = torch.tensor([[1.0, 0.0, -2 * abs(t) / 32], [0.0, 1.0, 0.0]], dtype=torch.float64)
        assert torch.allclose(theta, want)


# ----------------------------------------------------------------------------- the fill at the seam
def warped_both_ways(x, name, m, sign, monkeypatch):
    """RAND_OPS[name] image by image (its random sign forced to `sign`) and the batched path
    (`_op_params`, `apply_sorted`) on the same uint8 images: two results (B, 3, H, W)."""
    monkeypatch.setattr(random, "random", lambda: 0.0 if sign > 0 else 0.9)  # _signed
    per_image = [augment.RAND_OPS[name](tv_tensors.Image(i), m, augment.FILL) for i in x]

    B, _, H, W = x.shape
    ops = torch.full((B,), list(augment.RAND_OPS).index(name))
    full = lambda v: torch.full((B,), v, dtype=torch.float64)
    params = augment._op_params(ops, full(m), full(sign), H, W).float()  # (B, 13)
    counts = augment._SORT_KEY[ops].bincount(minlength=len(augment.OP_ORDER)).tolist()
    batched = augment.apply_sorted(x.clone(), params, counts)  # (B, 3, H, W)
    return torch.stack(per_image), batched


@pytest.mark.parametrize("name", augment.GEOMETRIC)
@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_an_image_of_the_fill_colour_stays_that_colour_under_every_warp(name, shape, monkeypatch):
    """A bilinear tap outside the image reads the fill colour, so an image of that very colour
    comes out of any rotation, shear or shift unchanged, the seam where it meets the fill
    included (a blend that weighs the image twice there darkens the seam)."""
    fill = torch.tensor(augment.FILL, dtype=torch.uint8).view(1, 3, 1, 1)
    x = fill.expand(2, 3, *shape).clone()  # (2, 3, H, W)
    for m in (0.2, 3.125, 7.31, 9.0):
        for sign in (1.0, -1.0):
            for out in warped_both_ways(x, name, m, sign, monkeypatch):
                assert torch.equal(out, x), (name, m, sign, (out.int() - x).abs().max())


@pytest.mark.parametrize("m", [3.125, 9.0])  # shifts of 4.5 and 12.96 rows
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_shift_is_the_image_padded_with_the_fill_interpolated_by_hand(m, sign, monkeypatch):
    """TranslateYRel by t = ±0.45·m/10·H rows against a loop: output row y reads source row
    s = y − t of the image padded with the fill colour P, (1 − f)·P[k] + f·P[k + 1] with
    k = ⌊s⌋, f = s − k. Both paths agree within a grey level (their float rounding)."""
    H, W = 32, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=g)
    fill = torch.tensor(augment.FILL, dtype=torch.float64).view(1, 3, 1).expand(2, 3, W)
    padded = lambda j: x[:, :, j].double() if 0 <= j < H else fill  # (2, 3, W) row j of P

    t = sign * 0.45 * m / 10 * H
    rows = []
    for y in range(H):
        k = math.floor(y - t)
        f = y - t - k
        rows.append((1 - f) * padded(k) + f * padded(k + 1))  # (2, 3, W)
    want = torch.stack(rows, 2).round()  # (2, 3, H, W)

    for out in warped_both_ways(x, "TranslateYRel", m, sign, monkeypatch):
        assert (out.double() - want).abs().max() <= 1, (m, sign)
