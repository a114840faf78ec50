"""augment.rand_augment_batch, the device-side RandAugment: the same ops as the per-image
`RandAugment` (the reference) image by image, the same draws, the mean-colour fill, p = 0.5,
deterministic in its generator; on a GPU (skipped elsewhere) no host sync.

Tolerances. Colour ops: max |Δ| ≤ 1 grey level (both sides are float32 arithmetic truncated to
uint8; a factor computed in another order moves a value across an integer now and then).
Geometric ops: bilinear on both sides, max |Δ| ≤ 1 grey level on at most 2% of the pixels (the
batched grid is `F.affine_grid`'s, torchvision's is its own; their float rounding differs).
"""

import random

import pytest
import torch
from torchvision import tv_tensors

import augment

NAMES = list(augment.RAND_OPS)


def images(batch, height=32, width=32, seed=0):
    """Half noise, half smooth colour fields: the ops see edges and flat regions."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=g)
    coarse = torch.rand(batch, 3, height // 8, width // 8, generator=g)  # (B, 3, h, w)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    return torch.where(torch.arange(batch).view(-1, 1, 1, 1) % 2 == 0, noise, smooth * 255).byte()


def batched(x, name, m, sign):
    """One op at magnitude m and sign on every image of x, through the batched path."""
    B, _, H, W = x.shape
    ops = torch.full((B,), NAMES.index(name))
    full = lambda v: torch.full((B,), v, dtype=torch.float64)
    params = augment._op_params(ops, full(m), full(sign), H, W).float()  # (B, 13)
    counts = augment._SORT_KEY[ops].bincount(minlength=len(augment.OP_ORDER)).tolist()
    return augment.apply_sorted(x.clone(), params, counts)


def per_image(x, name, m, sign, monkeypatch):
    """The reference: RAND_OPS[name] image by image, its random sign forced to `sign`."""
    monkeypatch.setattr(random, "random", lambda: 0.0 if sign > 0 else 0.9)  # _signed
    return torch.stack([augment.RAND_OPS[name](tv_tensors.Image(i), m, augment.FILL) for i in x])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_every_batched_op_equals_the_per_image_op(name, shape, monkeypatch):
    x = images(6, *shape)
    for m in (0.0, 0.2, 3.0, 7.31, 9.0, 10.0):
        for sign in (1.0, -1.0):
            diff = (
                batched(x, name, m, sign).int() - per_image(x, name, m, sign, monkeypatch)
            ).abs()
            assert diff.max() <= 1, (name, m, sign)
            if name in augment.GEOMETRIC:
                assert (diff > 0).float().mean() <= 0.02, (name, m, sign)


def test_the_draws_match_the_per_image_sampler(monkeypatch):
    """8000 images × 2 slots from each sampler. Ops: a two-sample chi-square over the 15 ops
    (14 degrees of freedom; 36.1 is its 0.1% tail). Coins, magnitudes and signs: within 4
    standard errors of p = 0.5 and N(9, 0.5²) clipped to [0, 10] (P(m = 10) = P(z ≥ 2) = 2.3%)."""
    n, seen = 8000, []
    recorder = lambda name: lambda img, m, fill: seen.append((name, m)) or img
    monkeypatch.setattr(augment, "RAND_OPS", {name: recorder(name) for name in NAMES})
    random.seed(0)
    reference = augment.RandAugment(num_ops=2, magnitude=9.0, magnitude_std=0.5)
    for _ in range(n):
        reference(None)
    ops, applied, m, signs = augment.sample_ops(n, torch.Generator().manual_seed(0))
    ref_counts = torch.bincount(torch.tensor([NAMES.index(k) for k, _ in seen]), minlength=15)
    counts = torch.bincount(ops[applied], minlength=15)
    # two-sample chi-square: Σ (√(N2/N1)·a − √(N1/N2)·b)² / (a + b)
    a, b = ref_counts.double(), counts.double()
    k1, k2 = (b.sum() / a.sum()).sqrt(), (a.sum() / b.sum()).sqrt()
    assert ((k1 * a - k2 * b) ** 2 / (a + b)).sum() < 36.1
    assert ops.shape == (n, 2) and ops.min() == 0 and ops.max() == 14  # 15 ops, with replacement
    se = (0.25 / (2 * n)) ** 0.5  # of a fraction at p = 0.5
    assert abs(len(seen) / (2 * n) - 0.5) < 4 * se and abs(applied.double().mean() - 0.5) < 4 * se
    assert abs((signs > 0).double().mean() - 0.5) < 4 * se
    for mags in (torch.tensor([v for _, v in seen]), m[applied]):
        assert abs(mags.mean() - 8.99) < 0.03 and abs(mags.std() - 0.49) < 0.03  # clipped N(9, .25)
        assert 0.0 <= mags.min() and mags.max() == 10.0
        assert abs((mags == 10.0).double().mean() - 0.0228) < 0.008


def test_the_batch_is_each_image_through_its_own_draws():
    """rand_augment_batch sorts, gathers and scatters: each image ends up with the ops of its
    own draws, in slot order, as if it were augmented alone."""
    x, seed = images(24), 3
    out = augment.rand_augment_batch(x, torch.Generator().manual_seed(seed))
    ops, applied, m, signs = augment.sample_ops(24, torch.Generator().manual_seed(seed))
    changed = 0
    for i in range(24):
        img = x[i : i + 1]  # (1, 3, S, S)
        for k in range(2):
            if applied[i, k]:
                img = batched(img, NAMES[ops[i, k]], float(m[i, k]), float(signs[i, k]))
        assert (out[i].int() - img[0].int()).abs().max() <= 1, i
        changed += not torch.equal(out[i], x[i])
    assert 12 <= changed < 24  # a quarter of the images draw no op at all (p = 0.5, twice)
    again = augment.rand_augment_batch(x, torch.Generator().manual_seed(seed))
    assert torch.equal(out, again) and out.dtype == torch.uint8  # a function of the generator
    other = augment.rand_augment_batch(x, torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(out, other)


@pytest.mark.parametrize("name", augment.GEOMETRIC)
def test_the_fill_is_the_mean_colour(name):
    """A black image moved at full strength (45% shift, 30°, shear 0.3): what comes from outside
    it is the mean colour, edges a blend of black and it, as torchvision's fill."""
    out = batched(torch.zeros(2, 3, 40, 40, dtype=torch.uint8), name, 10.0, 1.0)  # (2, 3, 40, 40)
    fill = torch.tensor(augment.FILL).view(3, 1, 1)  # (124, 116, 104)
    assert (out == fill).all(1).sum() >= 2 * 40  # pixels of exactly the fill colour
    share = out.double() / fill  # every pixel is t · fill for one t in [0, 1] (rounded)
    assert (share.amax(1) - share.amin(1)).max() < 0.02
    if name == "TranslateXRel":  # the first 18 columns (0.45 · 40) come from outside
        assert (out[..., :18] == fill).all() and (out[..., 18:] == 0).all()
    if name == "TranslateYRel":
        assert (out[..., :18, :] == fill).all() and (out[..., 18:, :] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_it_never_waits_and_agrees_with_the_cpu():
    """CUDA's sync debug mode "error" raises on any blocking copy, .item() or nonzero: the
    draws and the sort stay on the CPU, the parameters travel in pinned async copies. The GPU's
    float arithmetic may differ by a grey level, which a second op (posterize, solarize) can
    widen: at most 1% of the pixels may differ by more than 1."""
    x = images(64, 64, 64)
    cpu = augment.rand_augment_batch(x, torch.Generator().manual_seed(0))
    cuda = x.cuda()
    augment.rand_augment_batch(cuda, torch.Generator().manual_seed(0))  # lazy init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment.rand_augment_batch(cuda, torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    diff = (out.cpu().int() - cpu.int()).abs()
    assert (diff > 1).float().mean() < 0.01
