"""The data: generated images, CIFAR, Pets and ImageNet, with DeiT's transforms and samplers.

The idea
--------
DeiT's `datasets.py` in one file. A data set is chosen by `--data`, built by
`build_dataset(is_train, args)` (DeiT's name and argument order) and fed through
`build_transform(is_train, args)`; `build_loader` wraps it in a DataLoader with the sampler a
(possibly distributed) run needs. The offline default is `SyntheticImages`: generated
images whose classes are pairs of shared "parts", so tokens fall into a few visual kinds that
experts can specialise on, with no file and no download.

| --data            | what                                              | classes |
|-------------------|---------------------------------------------------|---------|
| synthetic         | generated, deterministic, offline                 | --nb-classes (10) |
| cifar10, cifar100 | torchvision, downloaded into --data-path if online | 10, 100 |
| pets              | Oxford-IIIT Pets (trainval / test), torchvision    | 37      |
| imagenet, folder  | ImageFolder with --data-path/train and /val        | folders |

Letters: B images, S image side in pixels.

Decisions where the papers are silent
-------------------------------------
* Images of <= 64 px get a reflect-padded random crop (CIFAR style), not RandomResizedCrop.
* Larger images are evaluated resized to S / `--eval-crop-ratio`, centre-cropped to S
  (DeiT's 0.875 by default; DeiT-III's 1.0). Dense labels (ADE20K, NYUd): probe.py.
* `build_dataset(True, args, augment=False)` is the train split through the evaluation
  transform: the feature bank of a k-NN evaluation must not be augmented (DINO's protocol).
* eval.py reads the validation split alone (`with_train=False`): no scan of ImageNet's train.
* The workers decode files to uint8 tensors (`read_rgb`) and stop at uint8; `normalize`,
  `random_erasing` and MixUp/CutMix run on the device batch (`device_batch`), as timm's
  PrefetchLoader. Workers persist and re-seed per epoch (`EpochSeeded`): exact resume holds.
* `--aa-on-device` (default on CUDA): the workers stop after crop and flip and
  `device_batch` RandAugments the uint8 batch (`augment.rand_augment_batch`), seeded by
  (seed, epoch, batch, rank): a resumed run draws the same. Old checkpoints: off.
* An ImageFolder's train/ and val/ must hold the same class folders (`check_data_path`):
  ImageFolder numbers classes in sorted order, so one missing folder shifts every later label.
  Errors are ordinary exceptions; the command lines make them one line (`errors.run_cli`).
* The watch set (`watch_indices`: the validation images whose routing train.py follows and
  eval.py --compare measures) is class-stratified and seeded, the same everywhere.
"""

import functools
import itertools
import os
import random
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from augment import MEAN, STD, RandAugment, parse_aa, rand_augment_batch, random_erasing

DATASETS = ("synthetic", "cifar10", "cifar100", "pets", "imagenet", "folder")


# ----------------------------------------------------------------------------- generated images
class SyntheticImages(torch.utils.data.Dataset):
    """Generated images: each class is a pair of *part types* from a shared pool.

    A part type is a shape (disc, square, ring, cross, stripes, diamond) in a colour; an image
    of class c draws each of its two parts 1-2 times at random places and sizes on a noisy
    background. Parts are shared between classes, so tokens fall into a few visual kinds that
    experts can specialise on, while the class needs the pair. Image i of a split is a pure
    function of (seed, split, i): any size and class count, no files, identical everywhere.
    """

    SHAPES = ("disc", "square", "ring", "cross", "stripes", "diamond")

    def __init__(self, size, num_classes, img_size, split="train", *, seed=0, transform=None):
        self.size = size  # images in the split
        self.num_classes = num_classes
        self.img_size = img_size  # S
        self.transform = transform
        self.seed = 2 * seed + (split != "train")

        # every class a different pair of the P part types, drawn once from the seed
        parts = 4  # P part types with P(P-1)/2 >= classes
        while parts * (parts - 1) // 2 < num_classes:
            parts += 1
        g = torch.Generator().manual_seed(seed)
        pairs = list(itertools.combinations(range(parts), 2))
        self.pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=g)[:num_classes]]

        # every part type its own colour; the pixel grid the shapes are drawn on
        hue = (torch.arange(parts) * 0.618034) % 1.0  # golden-ratio hues: well spread
        # fully saturated colour of that hue: the HSV -> RGB formula with S = V = 1
        rgb = (((hue[:, None] * 6 + torch.tensor([0.0, 4.0, 2.0])) % 6 - 3).abs() - 1).clamp(0, 1)
        self.colours = 0.1 + 0.9 * rgb  # (P, 3)
        ys, xs = torch.meshgrid(torch.arange(img_size), torch.arange(img_size), indexing="ij")
        self.yx = torch.stack([ys, xs]).float() + 0.5  # (2, S, S) pixel centres

    def __len__(self):
        return self.size

    def _mask(self, kind, dy, dx, r):
        a = dy.abs()  # |dy|
        b = dx.abs()  # |dx|
        d = (dy**2 + dx**2).sqrt()  # distance from the centre
        box = torch.maximum(a, b)
        return {
            "disc": d <= r,
            "square": box <= 0.8 * r,
            "ring": (d <= r) & (d >= 0.55 * r),
            "cross": (torch.minimum(a, b) <= 0.3 * r) & (box <= r),
            "stripes": (box <= 0.85 * r) & (((dx + r) / (0.35 * r)).floor() % 2 == 0),
            "diamond": a + b <= r,
        }[kind]

    def render(self, index, far_to_near=False):
        """Image i, float (3, S, S) in [0, 1], its class and its part instances as painted,
        [(part type, radius, mask (S, S))], in the order of the draws or `far_to_near`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        rand = lambda *shape: torch.rand(shape, generator=g)
        S = self.img_size
        label = index % self.num_classes
        img = 0.25 + 0.25 * rand(3, 1, 1) + 0.08 * torch.randn(3, S, S, generator=g)  # (3, S, S)

        # each of the class's two parts 1-2 times, at a random place and size
        drawn = []  # (part, r, mask, colour)
        for part in self.pairs[label]:
            for _ in range(1 + int(rand(1) < 0.5)):
                r = S * (0.12 + 0.1 * float(rand(1)))
                cy, cx = (r + (S - 2 * r) * rand(2)).tolist()
                mask = self._mask(self.SHAPES[part % 6], self.yx[0] - cy, self.yx[1] - cx, r)
                drawn.append((part, r, mask, self.colours[part] * (0.8 + 0.4 * float(rand(1)))))

        # painted in order, each over the ones before it, then a little noise over all
        if far_to_near:  # probe.SyntheticScenes: smallest (farthest) first, ties as drawn
            drawn.sort(key=lambda d: d[1])
        for _, _, mask, colour in drawn:
            img = torch.where(mask, colour[:, None, None], img)  # (3, S, S)
        img = (img + 0.04 * torch.randn(3, S, S, generator=g)).clamp(0, 1)  # (3, S, S)
        return img, label, [d[:3] for d in drawn]

    def __getitem__(self, index):
        img, label, _ = self.render(index)
        img = torchvision.tv_tensors.Image((img * 255).round().to(torch.uint8))  # (3, S, S)
        return (self.transform(img) if self.transform else img), label


# ----------------------------------------------------------------------------- on the device
# The workers hand over uint8 images (a quarter of float32's bytes through shared memory and
# the host-to-device copy); the per-pixel float work runs on the training device, as timm's
# PrefetchLoader does: normalisation, then random erasing, then MixUp/CutMix (train.py).
@functools.cache
def _mean_std(device):
    mean = torch.tensor(MEAN, device=device).view(3, 1, 1) * 255  # (3, 1, 1) in uint8 units
    return mean, torch.tensor(STD, device=device).view(3, 1, 1) * 255


def normalize(images):
    """uint8 images (..., 3, S, S) -> float32 (x − mean) / std, on their own device.

    Float input is taken to be normalised already and returned as it is (tests, a user's own
    tensors)."""
    if images.is_floating_point():
        return images
    mean, std = _mean_std(images.device)
    return (images.float() - mean) / std


def device_batch(images, targets, device, args, mix, at):
    """A training batch made ready on the device: RandAugment if --aa-on-device, uint8 ->
    normalised float, random erasing (--reprob), MixUp/CutMix (`mix`, from `build_mixup`), in
    DeiT's order. at: (epoch, batch index), which seeds the device RandAugment. Returns
    (images, targets, labels): targets are soft (B, classes) under mixing, labels the un-mixed
    classes (B,) for the training top-1."""
    images = images.to(device, non_blocking=True)  # (B, 3, S, S) uint8

    # --aa-on-device: RandAugment on the uint8 batch, seeded by (seed, epoch, batch, rank)
    if getattr(args, "aa_on_device", None) and (aa := parse_aa(args.aa)):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        seed = ((args.seed * 1_000_003 + at[0]) * 1_000_003 + at[1]) * 1_009 + rank
        images = rand_augment_batch(images, torch.Generator().manual_seed(seed % 2**63), **aa)

    # then DeiT's order: normalise, random erasing, MixUp/CutMix
    images = normalize(images)  # (B, 3, S, S) float32
    labels = targets = targets.to(device, non_blocking=True)  # (B,)
    if args.reprob > 0:
        random_erasing(images, args.reprob, args.remode, args.recount)
    if mix is not None:
        images, targets = mix(images, targets)  # targets: (B, classes) soft labels
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)  # faster patchify
    return images, targets, labels


# ----------------------------------------------------------------------------- DeiT's pipeline
def build_transform(is_train, args):
    """DeiT's train / eval pipelines up to RandAugment, on uint8 images (torchvision v2).

    They end in a uint8 tensor (3, S, S): `normalize` and `random_erasing` follow on the
    device batch, and RandAugment too under --aa-on-device (`device_batch`)."""
    S = args.img_size
    small = S <= 64  # CIFAR-sized

    # crop and flip (training), or resize and centre-crop (evaluation)
    t = [v2.ToImage()]
    if is_train and args.crop_flip:
        if small:  # CIFAR-style: keep the whole small image, shift it a little
            t += [v2.Resize((S, S)), v2.RandomCrop(S, padding=S // 8, padding_mode="reflect")]
        else:
            t += [v2.RandomResizedCrop(S, interpolation=v2.InterpolationMode.BICUBIC)]
        t += [v2.RandomHorizontalFlip()]
    elif small:
        t += [v2.Resize((S, S))]
    else:  # DeiT eval: resize to S / crop ratio, centre crop S
        ratio = getattr(args, "eval_crop_ratio", 0.875)  # checkpoints older than the flag: 0.875
        t += [v2.Resize(int(S / ratio), interpolation=v2.InterpolationMode.BICUBIC)]
        t += [v2.CenterCrop(S)]

    # RandAugment in the workers, unless it runs on the device batch (`device_batch`)
    if is_train and not getattr(args, "aa_on_device", None) and (aa := parse_aa(args.aa)):
        t += [RandAugment(**aa)]  # on uint8, as timm on PIL images
    return v2.Compose([*t, v2.ToPureTensor()])  # uint8 (3, S, S): `normalize` on the device


def read_rgb(path):
    """ImageFolder's loader: a file as a uint8 tensor (3, H, W). torchvision.io decodes JPEG
    (greyscale and CMYK too) and PNG to the pixels PIL's convert("RGB") gives (tested), without
    PIL's copy into a tensor: ~20% of a worker's time (docs/benchmarks.md). PIL reads the rest,
    and everything if torchvision drops these decoders (deprecated in 0.29 for TorchCodec).
    A file neither can read (corrupt, truncated, not an image) is an OSError that names it."""
    io = torchvision.io
    try:
        return io.decode_image(io.read_file(path), mode=io.ImageReadMode.RGB)
    except (RuntimeError, AttributeError):  # BMP, TIFF, ...; or a torchvision without them
        pass

    # PIL: every other format, and the last word on a file torchvision could not decode
    try:
        return torchvision.datasets.folder.default_loader(path)
    except OSError as err:  # PIL's messages do not always name the file ("Truncated File Read")
        raise OSError(f"cannot read image {path}: {err}") from None


def class_folders(root):
    """The class names of an ImageFolder split: its sub-folders, sorted (ImageFolder's order)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def check_data_path(args, with_train=True):
    """An ImageFolder data set needs --data-path/train and /val (FileNotFoundError if not),
    with the same class folders: ImageFolder numbers the classes in sorted order, so one
    missing or extra folder would shift every label after it (ValueError naming the first)."""
    if args.data not in ("imagenet", "folder"):
        return
    root = Path(args.data_path)
    for split in ("train", "val") if with_train else ("val",):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"--data-path {root}: no {split}/CLASS/*.jpg folders found")
    if not (root / "train").is_dir():  # eval.py reads val/ alone: nothing to compare with
        return

    # the same class folders in both, or every label after the first difference shifts
    train = class_folders(root / "train")
    val = class_folders(root / "val")
    if train != val:
        first = min(set(train) ^ set(val))  # the first class, in sorted order, that differs
        where = "val/ lacks" if first in train else "train/ lacks"
        raise ValueError(
            f"--data-path {root}: {where} the class folder {first!r} (train/ {len(train)} "
            f"classes, val/ {len(val)}): every label after it would shift; make them the same"
        )


def build_dataset(is_train, args, augment=None):
    """(data set, number of classes) of --data, the train or the validation split.

    augment: the training transform (None: for the train split only); `augment=False` reads
    the train split as the validation is read (eval.py's k-NN bank)."""
    augment = is_train if augment is None else augment
    root = Path(args.data_path)
    name = args.data
    transform = build_transform(augment, args)

    # generated images: any size, any number of classes
    if name == "synthetic":
        split = "train" if is_train else "val"
        C = args.nb_classes or 10
        size = args.synthetic_train_size if is_train else args.synthetic_val_size
        return SyntheticImages(
            size, C, args.img_size, split, seed=args.synthetic_seed, transform=transform
        ), C

    # an ImageFolder: --data-path/train and /val
    if name in ("imagenet", "folder"):
        check_data_path(args, with_train=is_train)
        split = root / ("train" if is_train else "val")
        dataset = torchvision.datasets.ImageFolder(split, transform, loader=read_rgb)
        return dataset, len(dataset.classes)

    # torchvision's CIFAR and Pets: read from --data-path, downloaded there if not yet
    sets = torchvision.datasets
    known = {"cifar10": (sets.CIFAR10, 10), "cifar100": (sets.CIFAR100, 100)}
    cls, C = known.get(name, (sets.OxfordIIITPet, 37))
    kw = {"train": is_train} if name != "pets" else {"split": "trainval" if is_train else "test"}
    try:
        return cls(root, transform=transform, download=False, **kw), C
    except RuntimeError:  # not there yet: fetch it (needs the network)
        try:
            return cls(root, transform=transform, download=True, **kw), C
        except Exception as err:
            why = f"not in --data-path {root} and the download failed ({type(err).__name__})"
            raise ValueError(f"{name}: {why}") from None


def labels_of(dataset):
    """Every image's class, (len,) long, without decoding an image where the set knows them."""
    if isinstance(dataset, SyntheticImages):
        return torch.arange(len(dataset)) % dataset.num_classes
    for attr in ("targets", "_labels"):  # ImageFolder and CIFAR; OxfordIIITPet
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr))
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])  # any other: read all


# ----------------------------------------------------------------------------- the watch set
def watch_indices(labels, n, seed=0):
    """The watch set's indices into a data set with classes `labels` (L,): n of them, sorted.

    Class-stratified and seeded: every class's images in a seeded random order, then the first
    image of every class, the second of every class, ... until n. It covers min(#classes, n)
    classes whatever the data set's order (an ImageFolder is sorted by class: its first 256
    images are ~5 ImageNet classes) and is the same on every run, rank and machine.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)  # (L,) a seeded shuffle
    shuffled = torch.as_tensor(labels)[order]  # (L,) their classes
    by_class = torch.sort(shuffled, stable=True).indices  # (L,) grouped by class, order kept
    grouped = shuffled[by_class]  # (L,) classes, sorted
    first = torch.searchsorted(grouped, grouped)  # (L,) where each one's class begins
    rank = torch.empty_like(order)
    rank[by_class] = torch.arange(len(order)) - first  # (L,) its place within its class
    # rounds: every class's 1st image (in shuffled order), then every class's 2nd, ...
    pick = torch.argsort(rank * len(order) + torch.arange(len(order)))[:n]
    return order[pick].sort().values


def watch_images(dataset, n, seed=0):
    """The watch set of `dataset` (validation), `watch_indices` of it, normalised: (n, 3, S, S)."""
    images = [dataset[int(i)][0] for i in watch_indices(labels_of(dataset), n, seed)]
    return normalize(torch.stack(images))  # float32, as the model takes them


# ----------------------------------------------------------------------------- loaders
class RASampler(torch.utils.data.Sampler):
    """DeiT's repeated augmentation (Hoffer et al. 2020; DeiT's samplers.py, `--repeated-aug`).

    Every epoch a seeded permutation, each image repeated 3 times in a row and dealt
    round-robin to the processes, where each copy gets its own augmentation. Each process keeps
    len(data set) // world indices: an epoch sees about a third of the images, 3 times each.
    DeiT also rounds that down to a multiple of 256; we keep every image (small data sets).
    """

    def __init__(self, dataset, world=1, rank=0, *, repeats=3, shuffle=True, seed=0):
        self.n = len(dataset)
        self.world = world  # processes
        self.rank = rank
        self.repeats = repeats  # copies of every image
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0  # `set_epoch` moves it
        self.num_samples = self.n // world

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        order = order.repeat_interleave(self.repeats)  # (3n,) a a a b b b c c c ...
        total = -(-len(order) // self.world) * self.world  # padded to a multiple of world
        order = torch.cat([order, order[: total - len(order)]])
        return iter(order[self.rank :: self.world][: self.num_samples].tolist())

    def __len__(self):
        return self.num_samples


class EpochSeeded(torch.utils.data.Dataset):
    """A data set whose loader workers re-seed themselves at the start of every epoch.

    Persistent workers keep their random streams running, so epoch e's augmentations would
    depend on every epoch before it and a resumed run would draw others. Here worker w seeds
    `random` and torch with (seed, epoch, w) at its first image of an epoch (`set_epoch`
    shares the epoch through shared memory), as if restarted every epoch. In-process loading
    (no workers) keeps the main process's streams, which the checkpoint saves.
    """

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed
        self.seen = None  # the epoch this worker last seeded for
        self.epoch = torch.multiprocessing.Value("q", 0, lock=False)  # shared with the workers

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        worker = torch.utils.data.get_worker_info()
        if worker is not None and self.seen != self.epoch.value:
            self.seen = self.epoch.value
            seed = (self.seed * 1_000_003 + self.seen) * 1_009 + worker.id
            random.seed(seed)
            torch.manual_seed(seed)
        return self.dataset[index]


def set_epoch(loader, epoch):
    """Every epoch, before iterating: the sampler's permutation and the workers' seeds."""
    loader.sampler.set_epoch(epoch)
    if isinstance(loader.dataset, EpochSeeded):
        loader.dataset.epoch.value = epoch


def default_workers(device, local_world=1):
    """--num-workers when not given: the CPUs this process may use, split between the
    processes of the machine, at most 10 (DeiT's); 0 on a CPU-only run, where workers would
    take the model's cores."""
    if device.type != "cuda":
        return 0
    return max(1, min(10, len(os.sched_getaffinity(0)) // local_world - 1))


def build_loader(dataset, is_train, args, *, rank=0, world=1, pin_memory=False):
    """A DataLoader over this process's shard: shuffled for training, in order for validation.

    Training drops the last incomplete batch (every step has B images) and shuffles with a
    sampler seeded by --seed, DeiT's RASampler under --repeated-aug, else a DistributedSampler;
    call `set_epoch(loader, epoch)` every epoch. Batches are uint8 (B, 3, S, S): `normalize`
    them on the device. Workers persist across epochs and keep 4 batches each in flight;
    training's are `EpochSeeded`, so a resumed run draws the same augmentations. Validation
    batches are 1.5x the training batch (DeiT: no gradients, so memory allows).
    """
    # the sampler: this process's shard, reshuffled every epoch in training
    if is_train and args.repeated_aug:
        sampler = RASampler(dataset, world, rank, seed=args.seed)
    else:
        sampler = DistributedSampler(dataset, world, rank, shuffle=is_train, seed=args.seed)

    # workers persist across epochs; training's re-seed themselves every epoch
    workers = args.num_workers
    if is_train and workers > 0:
        dataset = EpochSeeded(dataset, args.seed * 1_000 + rank)
    batch = args.batch_size if is_train else int(1.5 * args.batch_size)
    keep = dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}
    kw = dict(num_workers=workers, pin_memory=pin_memory, drop_last=is_train, **keep)
    return DataLoader(dataset, batch, sampler=sampler, **kw)
