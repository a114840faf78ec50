"""data.py: DeiT's augmentations on timm's scale (checked against timm itself) and random
erasing. The data sets and loaders are exercised by every train.py test."""

import argparse
import math
import random

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

import data

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
            data.TF, fn, lambda img, *a, _fn=fn, **kw: calls.setdefault(_fn, (a, kw)) and img
        )
    data.RAND_OPS[name](image(), m, [0, 0, 0])
    return calls


def test_the_op_set_and_the_policy_are_timms():
    assert set(data.RAND_OPS) == set(timm_aa._RAND_INCREASING_TRANSFORMS)
    timm = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", {})
    ours = data.parse_aa("rand-m9-mstd0.5-inc1")
    assert ours == {"num_ops": timm.num_layers, "magnitude": 9.0, "magnitude_std": 0.5}
    assert {op.magnitude for op in timm.ops} == {9} and {op.prob for op in timm.ops} == {0.5}
    assert {op.magnitude_std for op in timm.ops} == {0.5}
    assert data.RandAugment(**ours).prob == 0.5
    assert data.parse_aa("none") is None


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
    noisy = data.RandAugment(magnitude=9.0, magnitude_std=0.5)
    draws = torch.tensor([noisy.sample_magnitude() for _ in range(2000)])
    assert draws.std() == pytest.approx(0.5, rel=0.1) and draws.mean() == pytest.approx(9, abs=0.05)
    assert draws.max() <= 10.0  # clipped to timm's [0, 10]
    fixed = data.RandAugment(magnitude=9.0, magnitude_std=0.0)
    assert {fixed.sample_magnitude() for _ in range(10)} == {9.0}


@pytest.mark.parametrize("name", sorted(data.RAND_OPS))
def test_every_op_keeps_a_uint8_image(name):
    for m in (0.0, 9.0, 10.0):
        out = data.RAND_OPS[name](image(), m, [124, 116, 104])
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


@pytest.mark.parametrize("remode", ["pixel", "const"])
def test_random_erasing_erases_one_rectangle_per_image(remode):
    torch.manual_seed(0)
    x = torch.full((4, 3, 40, 40), 7.0)  # normalised images far from N(0, 1) values
    data.random_erasing(x, 1.0, remode)  # in place, on the batch's device
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
    data.random_erasing(x, 0.25, "const", count=1)
    hit = (x == 0).flatten(1).any(1).float().mean()
    assert 0.18 < hit < 0.32  # p = 0.25 per image
    one, upto3 = torch.full((2, 300, 1, 40, 40), 7.0)
    data.random_erasing(one, 1.0, "const", count=1)
    data.random_erasing(upto3, 1.0, "const", count=3)  # 1, 2 or 3 rectangles: 2 on average
    ratio = (upto3 == 0).float().mean() / (one == 0).float().mean()
    assert 1.4 < ratio < 2.1  # less than 2: rectangles overlap


def test_the_loader_hands_over_uint8_and_normalize_matches_torchvision():
    args = argparse.Namespace(img_size=32, crop_flip=True, aa="rand-m9-mstd0.5-inc1",
                              reprob=0.25, remode="pixel", recount=1)  # fmt: skip
    names = [type(t).__name__ for t in data.build_transform(True, args).transforms]
    assert names[-2:] == ["RandAugment", "ToPureTensor"]  # no float work in the workers
    args.aa = "none"
    assert "RandAugment" not in [
        type(t).__name__ for t in data.build_transform(True, args).transforms
    ]
    img = data.build_transform(False, args)(image(0, 32))
    assert img.dtype == torch.uint8 and type(img) is torch.Tensor
    batch = torch.stack([img, img.flip(-1)])  # (2, 3, 32, 32)
    want = v2.Normalize(data.MEAN, data.STD)(v2.ToDtype(torch.float32, scale=True)(batch))
    torch.testing.assert_close(data.normalize(batch), want)
    assert data.normalize(want) is want  # float input: already normalised


def test_the_train_split_without_augmentation_reads_as_the_validation_does():
    """build_dataset(True, args, augment=False): the train images through the eval transform
    (eval.py's k-NN bank)."""
    args = argparse.Namespace(data="synthetic", data_path="", nb_classes=4, img_size=32,
                              synthetic_train_size=8, synthetic_val_size=4, synthetic_seed=0,
                              crop_flip=True, aa="rand-m9-mstd0.5-inc1")  # fmt: skip
    kinds = lambda dataset: [type(t).__name__ for t in dataset.transform.transforms]  # noqa: E731
    train, val = data.build_dataset(True, args)[0], data.build_dataset(False, args)[0]
    plain = data.build_dataset(True, args, augment=False)[0]
    assert "RandAugment" in kinds(train) and kinds(plain) == kinds(val)
    generated = data.SyntheticImages(8, 4, 32, "train")[3][0]  # the train split's image 3
    assert len(plain) == 8 and torch.equal(plain[3][0], generated)  # 32 px: eval keeps it


# ---------------------------------------------------------------------------- repeated augmentation
def check_repeats(per_rank, n, world):
    """DeiT's RASampler: n // world indices per process; within the epoch each image appears 3
    times (one image at the cut may have fewer), its copies on different processes."""
    assert all(len(ix) == n // world for ix in per_rank)
    everything = [i for ix in per_rank for i in ix]
    counts = torch.bincount(torch.tensor(everything), minlength=n)
    assert sorted(set(counts.tolist()) - {0}) in ([3], [1, 3], [2, 3])
    assert (counts < 3).sum() - (counts == 0).sum() <= 1  # only the image at the cut
    assert (counts == 3).sum() >= (n // world * world) // 3 - 1  # about a third of the images
    if world > 1:  # a's three copies are dealt to different processes
        first = per_rank[0][0]
        assert sum(first in ix for ix in per_rank) == min(world, 3)


@pytest.mark.parametrize("n", [64, 100])
def test_rasampler_in_one_process(n):
    sampler = data.RASampler(range(n), seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    check_repeats([first], n, 1)
    assert first[:3] == [first[0]] * 3  # copies in a row: one process gets all three
    sampler.set_epoch(2)
    assert list(sampler) != first and len(sampler) == n  # a new permutation, same length


RASAMPLER_RANKS = """
import json, os, sys, torch.distributed as dist
sys.path.insert(0, {root!r})
import data
dist.init_process_group("gloo")
sampler = data.RASampler(range({n}), dist.get_world_size(), dist.get_rank(), seed=0)
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, list(sampler))
if dist.get_rank() == 0:
    print(json.dumps(gathered))
dist.destroy_process_group()
"""


def test_rasampler_across_two_processes(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root, n = str(Path(__file__).resolve().parents[1]), 100
    script = tmp_path / "ranks.py"
    script.write_text(RASAMPLER_RANKS.format(root=root, n=n))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*cmd, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_rank = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(per_rank) == 2
    check_repeats(per_rank, n, 2)
    assert per_rank == [list(data.RASampler(range(n), 2, r, seed=0)) for r in (0, 1)]


# ---------------------------------------------------------------------------- persistent workers
def test_persistent_workers_draw_an_epochs_augmentations_as_a_fresh_loader_would():
    """Epoch 1 of a loader whose 2 workers lived through epoch 0 equals epoch 1 of a new
    loader (a resumed run): the workers re-seed from (seed, epoch), not from their history."""
    args = argparse.Namespace(data="synthetic", data_path="", nb_classes=4, img_size=32,
                              synthetic_train_size=32, synthetic_seed=0, crop_flip=True,
                              aa="rand-m9-mstd0.5-inc1", repeated_aug=False, seed=0,
                              batch_size=8, num_workers=2)  # fmt: skip
    dataset, _ = data.build_dataset(True, args)

    def epoch_batches(loader, epoch):
        data.set_epoch(loader, epoch)
        return torch.cat([images for images, _ in loader])  # (32, 3, 32, 32) uint8

    lived = data.build_loader(dataset, True, args)
    assert lived.persistent_workers and isinstance(lived.dataset, data.EpochSeeded)
    first, second = epoch_batches(lived, 0), epoch_batches(lived, 1)
    fresh = epoch_batches(data.build_loader(dataset, True, args), 1)
    assert first.dtype == torch.uint8 and not torch.equal(first, second)
    assert torch.equal(second, fresh)
