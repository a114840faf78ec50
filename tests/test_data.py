"""data.py: the workers' uint8 pipeline and the device-side normalisation, the splits, the
ImageFolder checks, the samplers. The data sets and loaders are exercised by every train.py
test; the augmentations are augment.py's (tests/test_augment.py)."""

import argparse

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import data


def image(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return tv_tensors.Image(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))


def test_the_loader_hands_over_uint8_and_normalize_matches_torchvision():
    args = argparse.Namespace(
        img_size=32,
        crop_flip=True,
        aa="rand-m9-mstd0.5-inc1",
        reprob=0.25,
        remode="pixel",
        recount=1,
    )
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


def test_aa_on_device_moves_randaugment_from_the_workers_to_the_device_batch():
    """--aa-on-device: the workers stop after crop and flip; device_batch applies the batched
    RandAugment, seeded by (seed, epoch, batch, rank): the same batch position draws the same
    augmentations (exact resume), another draws others. Args without the flag (an older
    checkpoint's) keep RandAugment in the workers."""
    args = argparse.Namespace(
        img_size=32, crop_flip=True, aa="rand-m9-mstd0.5-inc1", reprob=0.0, seed=0
    )
    names = lambda: [type(t).__name__ for t in data.build_transform(True, args).transforms]
    assert "RandAugment" in names()  # no aa_on_device attribute: off
    args.aa_on_device = True
    assert "RandAugment" not in names() and names()[-2:] == ["RandomHorizontalFlip", "ToPureTensor"]
    batch = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    targets, cpu = torch.zeros(16, dtype=torch.long), torch.device("cpu")
    ready = lambda at: data.device_batch(batch, targets, cpu, args, None, at)[0]
    seed = ((0 * 1_000_003 + 1) * 1_000_003 + 2) * 1_009 + 0  # (seed 0, epoch 1, batch 2, rank 0)
    want = data.rand_augment_batch(batch, torch.Generator().manual_seed(seed))
    assert torch.equal(ready((1, 2)), data.normalize(want))
    assert not torch.equal(ready((1, 2)), ready((1, 3)))  # the next batch: other draws
    args.aa_on_device = False
    assert torch.equal(ready((1, 2)), data.normalize(batch))


def test_read_rgb_gives_pils_pixels_as_a_tensor(tmp_path):
    """ImageFolder's loader decodes with torchvision.io: RGB, greyscale and CMYK JPEGs and a PNG
    named .jpg read as PIL's convert("RGB") reads them; PIL reads what torchvision.io cannot."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 4, 6, 7, generator=g), (48, 56))
    pixels = (smooth[0] * 255).byte().permute(1, 2, 0).numpy()  # (48, 56, 4) smooth colours
    files = {
        "rgb.jpg": (Image.fromarray(pixels[..., :3]), "JPEG"),
        "grey.jpg": (Image.fromarray(pixels[..., 0]), "JPEG"),
        "cmyk.jpg": (Image.fromarray(pixels, "CMYK"), "JPEG"),
        "png.jpg": (Image.fromarray(pixels[..., :3]), "PNG"),  # ImageNet has such files
        "rgb.bmp": (Image.fromarray(pixels[..., :3]), "BMP"),  # not torchvision.io's: PIL
    }
    for name, (img, kind) in files.items():
        img.save(tmp_path / name, format=kind)
        pil = Image.open(tmp_path / name).convert("RGB")
        ours = data.read_rgb(str(tmp_path / name))
        assert torch.equal(v2.functional.pil_to_tensor(pil), v2.ToImage()(ours)), name


def test_an_unreadable_image_is_an_os_error_that_names_the_file(tmp_path):
    """A truncated JPEG, or a file that is no image at all, stops the run with one line that
    names the file (PIL's own message, e.g. "Truncated File Read", does not)."""
    pixels = (torch.rand(48, 56, 3, generator=torch.Generator().manual_seed(0)) * 255).byte()
    Image.fromarray(pixels.numpy()).save(tmp_path / "whole.jpg", format="JPEG")
    whole = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("truncated.jpg", "text.jpg"):
        with pytest.raises(OSError, match=f"cannot read image .*{name}"):
            data.read_rgb(str(tmp_path / name))


def test_the_train_split_without_augmentation_reads_as_the_validation_does():
    """build_dataset(True, args, augment=False): the train images through the eval transform
    (eval.py's k-NN bank)."""
    args = argparse.Namespace(
        data="synthetic",
        data_path="",
        nb_classes=4,
        img_size=32,
        synthetic_train_size=8,
        synthetic_val_size=4,
        synthetic_seed=0,
        crop_flip=True,
        aa="rand-m9-mstd0.5-inc1",
    )
    kinds = lambda dataset: [type(t).__name__ for t in dataset.transform.transforms]
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
    proc = subprocess.run([*cmd, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_rank = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(per_rank) == 2
    check_repeats(per_rank, n, 2)
    assert per_rank == [list(data.RASampler(range(n), 2, r, seed=0)) for r in (0, 1)]


# ---------------------------------------------------------------------------- persistent workers
def test_persistent_workers_draw_an_epochs_augmentations_as_a_fresh_loader_would():
    """Epoch 1 of a loader whose 2 workers lived through epoch 0 equals epoch 1 of a new
    loader (a resumed run): the workers re-seed from (seed, epoch), not from their history."""
    args = argparse.Namespace(
        data="synthetic",
        data_path="",
        nb_classes=4,
        img_size=32,
        synthetic_train_size=32,
        synthetic_seed=0,
        crop_flip=True,
        aa="rand-m9-mstd0.5-inc1",
        repeated_aug=False,
        seed=0,
        batch_size=8,
        num_workers=2,
    )
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


def folder(root, train, val):
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
    return argparse.Namespace(data="folder", data_path=str(root))


def test_train_and_val_must_hold_the_same_class_folders(tmp_path):
    """ImageFolder numbers classes in sorted order: a class missing from one split shifts
    every label after it. The first class (in that order) that differs is named."""
    data.check_data_path(folder(tmp_path / "same", ["cat", "dog"], ["cat", "dog"]))
    with pytest.raises(ValueError, match=r"val/ lacks the class folder 'bird'"):
        data.check_data_path(folder(tmp_path / "a", ["bird", "cat", "dog"], ["cat", "dog"]))
    with pytest.raises(ValueError, match=r"train/ lacks the class folder 'cow'.*2 classes, val/ 3"):
        data.check_data_path(folder(tmp_path / "b", ["cat", "dog"], ["cat", "cow", "dog"]))
    # eval.py reads val/ alone (with_train=False): nothing to compare with, no error
    lone = tmp_path / "lone"
    (lone / "val" / "cat").mkdir(parents=True)
    data.check_data_path(argparse.Namespace(data="folder", data_path=str(lone)), with_train=False)
