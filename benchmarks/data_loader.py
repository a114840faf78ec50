"""Can the loader feed the step? Images/s of train.py's ImageFolder pipeline, per worker count.

The idea
--------
A DeiT-Ti step on an H100 takes a few milliseconds for 128 images: the CPU side must decode,
crop, flip and RandAugment thousands of JPEGs a second to keep up. This script times the
training loader train.py builds (`data.build_dataset` on `--data folder`, `data.build_loader`:
RandomResizedCrop 224, flip, DeiT's RandAugment; persistent workers) over a folder of
generated JPEGs, for several worker counts, in two forms:

* uint8    what train.py does: the workers stop at uint8 (B, 3, 224, 224); normalisation and
           random erasing happen on the training device (`data.normalize`, `random_erasing`)
* float32  the previous pipeline: the workers also convert to float32, normalise and erase,
           and 4x the bytes travel through shared memory and to the device

    python benchmarks/data_loader.py                     # 512 JPEGs, workers 0 1 2
    python benchmarks/data_loader.py --workers 0 4 8 16 --images 4096   # a GPU machine
    python benchmarks/data_loader.py --folder /data/imagenet            # real JPEGs (train/)
    python benchmarks/data_loader.py --quick             # a smoke test, seconds

Decisions
---------
* Generated JPEGs are ImageNet-like in size (random sides 300-500 px, quality 90) and made of
  smooth noise, so decoding costs about what a photo costs; a real folder can be given.
* One untimed pass first (workers start, the page cache fills), then `--passes` timed passes;
  the best pass is shown: the loader's capacity, not the machine's noise.
* Only the loader is timed: the consumer does nothing with the batch but hold it. The
  device-side work of the uint8 form (normalise, erase) runs in the step and is timed by
  train_step.py; on a CPU-only run it is timed here too (--device cpu adds it to uint8).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import augment  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402


def make_jpegs(root, n, classes=8, seed=0):
    """n JPEGs in root/train/CLASS/ (and one per class in val/), ImageNet-like in size."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        h, w = torch.randint(300, 501, (2,), generator=g).tolist()
        coarse = torch.rand(3, h // 16 + 1, w // 16 + 1, generator=g)  # smooth colour fields
        img = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear")[0]
        img = (img * 200 + 40 * torch.rand(3, h, w, generator=g)).clamp(0, 255).byte()
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg", quality=90)
    for c in range(min(n, classes)):  # val/ holds train/'s classes, as data.py checks
        (root / "val" / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / "val" / f"c{c}" / "0.jpg")


class Float32Workers(torch.utils.data.Dataset):
    """The old pipeline: the training transform, then float32, normalisation and random
    erasing in the worker."""

    def __init__(self, dataset, args):
        self.dataset, self.args = dataset, args
        self.to_float = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(augment.MEAN, augment.STD)]
        )

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        img = self.to_float(img)[None]  # (1, 3, S, S)
        augment.random_erasing(img, self.args.reprob, self.args.remode, self.args.recount)
        return img[0], label


def images_per_s(args, workers, form, passes):
    """Best images/s over `passes` timed passes of one loader."""
    args.num_workers = workers
    dataset, _ = data.build_dataset(True, args)
    if form == "float32":
        dataset = Float32Workers(dataset, args)
    loader = data.build_loader(dataset, True, args)
    best = 0.0
    for p in range(passes + 1):  # pass 0 starts the workers and warms the page cache
        data.set_epoch(loader, p)
        start, seen = time.perf_counter(), 0
        for images, labels in loader:
            if form == "uint8" and args.device == "cpu":  # the device's share, on this CPU
                data.device_batch(images, labels, torch.device("cpu"), args, None)
            seen += images.shape[0]
        if p > 0:
            best = max(best, seen / (time.perf_counter() - start))
    del loader  # ends the persistent workers
    return best, images.numel() * images.element_size() / images.shape[0]  # bytes per image


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--folder", default=None, help="an ImageFolder root with train/ (default: generated)"
    )
    p.add_argument("--images", type=int, default=512, help="generated JPEGs")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--passes", type=int, default=2, help="timed passes over the folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="32 small JPEGs, 0 and 1 worker")
    opts = p.parse_args()
    if opts.quick:
        opts.images, opts.workers, opts.batch_size, opts.img_size, opts.passes = (
            32,
            [0, 1],
            8,
            64,
            1,
        )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(opts.folder or tmp)
        if opts.folder is None:
            make_jpegs(root, opts.images)
        # train.py's own flags and defaults: the DeiT recipe's augmentations
        args = train.get_args_parser().parse_args(
            [
                *("--data", "folder", "--data-path", str(root)),
                *("--batch-size", str(opts.batch_size), "--img-size", str(opts.img_size)),
                *("--device", opts.device),
            ]
        )
        n = len(data.build_dataset(True, args)[0])
        print(
            f"{n} JPEGs of {root}, {opts.img_size}² crops, batch {opts.batch_size}, "
            f"aa {args.aa}, reprob {args.reprob}, {os.cpu_count()} CPUs, "
            f"best of {opts.passes} passes\n"
        )
        print("| workers | uint8 images/s | float32 images/s | uint8 / float32 | bytes/image |")
        print("|---:|---:|---:|---:|---|")
        for w in opts.workers:
            u8, u8_bytes = images_per_s(args, w, "uint8", opts.passes)
            f32, f32_bytes = images_per_s(args, w, "float32", opts.passes)
            print(
                f"| {w} | {u8:.0f} | {f32:.0f} | {u8 / f32:.2f} | "
                f"{u8_bytes / 1e3:.0f} kB vs {f32_bytes / 1e3:.0f} kB |"
            )


if __name__ == "__main__":
    main()
