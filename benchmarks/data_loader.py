"""Can the loader feed the step? Where a worker's CPU time goes, and images/s per worker count.

The idea
--------
A DeiT-Ti step on an H200 takes ~35 ms for 256 images: the CPU side must read, decode, crop,
flip and RandAugment thousands of JPEGs a second to keep up. This script measures train.py's
own training pipeline (`data.build_dataset` on `--data folder`, `data.build_loader`: DeiT's
RandomResizedCrop 224, flip, `rand-m9-mstd0.5-inc1`; persistent workers) on a folder of JPEGs:

1. **Where the time goes**: each stage of the pipeline, per image, in this one process and one
   thread (a loader worker is single-threaded): file read, JPEG decode (PIL, as ImageFolder),
   then each transform of `data.build_transform` in turn, and the collate. The worker's cost
   per image with RandAugment in it (the CPU path) and without it (the device path,
   `--aa-on-device`), and the batched RandAugment (`augment.rand_augment_batch`) on this CPU
   and, with `--device cuda`, on the GPU.
2. **The loader**: images/s of the loader for each path at each worker count. The consumer
   does what the step's `data.device_batch` does with the batch (to the device, the batched
   RandAugment on the device path, normalise, random erasing) and nothing more.

    python benchmarks/data_loader.py                     # 512 JPEGs, workers 0 1 2
    python benchmarks/data_loader.py --workers 4 15 --images 4096 --batch-size 256  # a GPU box
    python benchmarks/data_loader.py --folder /data/imagenet            # real JPEGs (train/)
    python benchmarks/data_loader.py --make /tmp/jpegs --images 4096 --classes 100  # only write
    python benchmarks/data_loader.py --quick             # a smoke test, seconds

Decisions
---------
* Generated JPEGs are ImageNet-like in size (random sides 300-500 px, quality 90) and made of
  smooth noise, so decoding costs about what a photo costs; a real folder can be given.
  Image i is a function of (seed, i): the same folder whatever the number of processes.
* Stage times are per-thread CPU time (`time.thread_time`), the mean over `--stage-images`
  images: a shared machine's load inflates wall clock, not a thread's own CPU time.
* Loader images/s are wall clock: one untimed pass first (workers start, the page cache fills),
  then `--passes` timed passes, the best shown: the loader's capacity, not the machine's noise.
  On CUDA each pass ends with a synchronize, so the device's share is inside the time.
"""

import argparse
import io
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import augment  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from train import keep_freed_memory  # noqa: E402

PATHS = {"cpu": "RandAugment in the workers", "device": "RandAugment on the device batch"}


# ----------------------------------------------------------------------------- the JPEGs
def _write_jpegs(root, indices, classes, seed):
    torch.set_num_threads(1)
    for i in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        h, w = torch.randint(300, 501, (2,), generator=g).tolist()
        coarse = torch.rand(3, h // 16 + 1, w // 16 + 1, generator=g)  # smooth colour fields
        img = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear")[0]
        img = (img * 200 + 40 * torch.rand(3, h, w, generator=g)).clamp(0, 255).byte()
        split = "val" if i < classes else "train"  # the first image of each class: val/
        folder = Path(root) / split / f"c{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg", quality=90)


def make_jpegs(root, n, classes=8, seed=0):
    """n JPEGs in root/train/CLASS/ and one per class in root/val/ (data.py checks that both
    hold the same classes), ImageNet-like in size; written by all CPUs at once."""
    procs = max(1, min(16, len(os.sched_getaffinity(0))))
    chunks = [range(classes + p, n + classes, procs) for p in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_write_jpegs, [root] * procs, chunks, [classes] * procs, [seed] * procs))
    _write_jpegs(root, range(classes), classes, seed)


# ----------------------------------------------------------------------------- 1. the stages
def _cpu_ms(fn, *a):  # (result, this thread's CPU time in ms)
    start = time.thread_time()
    out = fn(*a)
    return out, 1e3 * (time.thread_time() - start)


def _pil_decode(raw):  # the previous loader: torchvision's default, PIL
    return Image.open(io.BytesIO(raw.numpy().tobytes())).convert("RGB")


def stage_times(args, paths, batch):
    """Mean CPU ms per image of each stage of the training pipeline (`data.read_rgb`, then
    `data.build_transform`'s transforms, then the collate) and of the previous loader's PIL
    decode; and of the batched RandAugment on batches of the crops. Run in a child process
    with one thread, as a loader worker (setting this process's threads to 1 and back slows
    its later work ~10x)."""
    torch.set_num_threads(1)
    random.seed(0)  # the same crops and RandAugment draws in every run: only the clock varies
    torch.manual_seed(0)
    args.aa_on_device = False  # the whole CPU pipeline, RandAugment included
    transforms = data.build_transform(True, args).transforms
    times, before, crops = {}, {"JPEG decode (PIL, RGB)": 0.0, "ToImage of a PIL image": 0.0}, []
    add = lambda into, name, t: into.update({name: into.get(name, 0.0) + t})
    for path in paths:
        raw, t = _cpu_ms(torchvision.io.read_file, path)
        add(times, "file read", t)
        img, t = _cpu_ms(torchvision.io.decode_image, raw, torchvision.io.ImageReadMode.RGB)
        add(times, "JPEG decode (torchvision.io, to a tensor)", t)
        pil, t = _cpu_ms(_pil_decode, raw)
        add(before, "JPEG decode (PIL, RGB)", t)
        add(before, "ToImage of a PIL image", _cpu_ms(v2.ToImage(), pil)[1])
        for transform in transforms:
            if isinstance(transform, augment.RandAugment):
                crops.append(img)  # the device path's worker output: uint8, cropped, flipped
            img, t = _cpu_ms(transform, img)
            add(times, type(transform).__name__, t)
    stacked, t = _cpu_ms(torch.stack, crops[:batch])  # the collate, per image of a batch
    times["collate (torch.stack)"] = t * len(paths) / len(stacked)
    per_image = lambda d: {name: t / len(paths) for name, t in d.items()}
    keep_freed_memory()  # as train.py on a CPU: big batch tensors reuse the heap's pages
    batched = batched_aa_ms(torch.stack(crops), batch, torch.device("cpu"))
    return per_image(times), per_image(before), batched, crops[:batch]


def batched_aa_ms(crops, batch, device):
    """ms per image of `augment.rand_augment_batch` on `device`, over 10 batches after 2
    untimed (CPU: this one thread's CPU time; CUDA: wall clock, synchronised)."""
    aa = augment.parse_aa("rand-m9-mstd0.5-inc1")
    x = crops[torch.arange(batch) % len(crops)].to(device)  # (B, 3, S, S) uint8
    run = lambda i: augment.rand_augment_batch(x, torch.Generator().manual_seed(i), **aa)
    for i in range(2):
        run(i)
    cuda = device.type == "cuda"
    torch.cuda.synchronize() if cuda else None
    clock = time.perf_counter if cuda else time.thread_time
    start = clock()
    for i in range(10):
        run(i)
    torch.cuda.synchronize() if cuda else None
    return 1e3 * (clock() - start) / (10 * batch)


def print_stages(args, dataset, opts, device):
    paths = [path for path, _ in dataset.samples[: opts.stage_images]]
    with ProcessPoolExecutor(1) as child:  # one thread, as a loader worker
        ms, pil, batched, crops = child.submit(stage_times, args, paths, opts.batch_size).result()
    cpu_path = sum(ms.values())
    device_path = cpu_path - ms["RandAugment"]
    # before: PIL decoded the file and ToImage copied it into a tensor, RandAugment in the worker
    decode = [name for name in ms if name.startswith("JPEG decode")][0]
    old = cpu_path - ms[decode] - ms["ToImage"] + sum(pil.values())
    print(f"Where a worker's CPU time goes: mean of {len(paths)} images, one thread, CPU time\n")
    print("| stage | ms / image | share of the CPU path |")
    print("|---|---:|---:|")
    for name, t in ms.items():
        print(f"| {name} | {t:.2f} | {100 * t / cpu_path:.0f}% |")
    for name, t in pil.items():
        print(f"| (before: {name}) | {t:.2f} | – |")
    print(f"| **worker before** (PIL decode, RandAugment in it) | {old:.2f} | 1.00× |")
    print(f"| **worker, CPU path** (--no-aa-on-device) | {cpu_path:.2f} | {cpu_path / old:.2f}× |")
    print(f"| **worker, device path** (--aa-on-device) | {device_path:.2f} | ", end="")
    print(f"{device_path / old:.2f}× |")
    print(f"| batched RandAugment, this CPU, batch {opts.batch_size} | {batched:.2f} | – |")
    if device.type == "cuda":
        on_gpu = batched_aa_ms(torch.stack(crops), opts.batch_size, device)
        print(f"| batched RandAugment, {torch.cuda.get_device_name()} | {on_gpu:.4f} | – |")
    print()


# ----------------------------------------------------------------------------- 2. the loader
def images_per_s(args, workers, path, passes, device):
    """Best images/s over `passes` timed passes of one loader, and the bytes of an image."""
    args.num_workers, args.aa_on_device = workers, path == "device"
    dataset, _ = data.build_dataset(True, args)
    loader = data.build_loader(dataset, True, args, pin_memory=device.type == "cuda")
    best = 0.0
    for p in range(passes + 1):  # pass 0 starts the workers and warms the page cache
        data.set_epoch(loader, p)
        start, seen = time.perf_counter(), 0
        for it, (images, labels) in enumerate(loader):
            data.device_batch(images, labels, device, args, None, (p, it))  # the step's share
            seen += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if p > 0:
            best = max(best, seen / (time.perf_counter() - start))
    del loader  # ends the persistent workers
    return best, images.numel() * images.element_size() / images.shape[0]  # bytes per image


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=None, help="an ImageFolder root with train/ and val/")
    p.add_argument("--make", default=None, help="only write the generated JPEGs to this root")
    p.add_argument("--images", type=int, default=512, help="generated JPEGs")
    p.add_argument("--classes", type=int, default=8, help="generated classes (folders)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--passes", type=int, default=2, help="timed passes over the folder")
    p.add_argument("--stage-images", type=int, default=200, help="images timed stage by stage")
    p.add_argument("--no-loader", action="store_true", help="the stage table only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="32 small JPEGs, 0 and 1 worker")
    return p


def main(opts):
    if opts.make:
        return make_jpegs(Path(opts.make), opts.images, opts.classes)
    if opts.quick:
        opts.images, opts.workers, opts.batch_size, opts.img_size = 32, [0, 1], 8, 64
        opts.passes, opts.stage_images = 1, 16
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(opts.folder or tmp)
        if opts.folder is None:
            make_jpegs(root, opts.images, opts.classes)
        # train.py's own flags and defaults: the DeiT recipe's augmentations
        args = train.get_args_parser().parse_args(
            [
                *("--data", "folder", "--data-path", str(root)),
                *("--batch-size", str(opts.batch_size), "--img-size", str(opts.img_size)),
                *("--device", opts.device),
            ]
        )
        device, dataset = torch.device(opts.device), data.build_dataset(True, args)[0]
        print(
            f"{len(dataset)} JPEGs of {root}, {opts.img_size}² crops, batch {opts.batch_size}, "
            f"aa {args.aa}, reprob {args.reprob}, {len(os.sched_getaffinity(0))} CPUs, "
            f"device {opts.device}\n"
        )
        print_stages(args, dataset, opts, device)
        if opts.no_loader:
            return
        names = [f"{PATHS[path]}, images/s" for path in opts.paths]
        ratio = " device / cpu |" if len(opts.paths) == 2 else ""
        print(f"The loader: best of {opts.passes} passes, wall clock\n")
        print(f"| workers | {' | '.join(names)} |{ratio} bytes/image (uint8 vs float32) |")
        print(f"|---:|{'---:|' * len(names)}{'---:|' if ratio else ''}---|")
        for w in opts.workers:
            speeds = [images_per_s(args, w, path, opts.passes, device) for path in opts.paths]
            cells = " | ".join(f"{ips:.0f}" for ips, _ in speeds)
            ratio = f" {speeds[1][0] / speeds[0][0]:.2f} |" if len(speeds) == 2 else ""
            u8 = speeds[0][1]
            print(f"| {w} | {cells} |{ratio} {u8 / 1e3:.0f} kB vs {4 * u8 / 1e3:.0f} kB |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
