"""Plain-PyTorch DDP trainer: the DeiT recipe, every routing method, teacher-guided routing.

The idea
--------
One script, read top to bottom (args -> distributed init -> data -> model and teacher ->
optimizer -> loop -> checkpoint), runs both a CPU demo on generated images and a 300-epoch
`torchrun --nproc_per_node=8 train.py --model small --method tgr --teacher deit3.pth --data
imagenet --data-path /data/imagenet`; only flags differ. TGR (TGR-MoE sec. 3, SPEC sec. 6):

    L_student = L_task + λ_distill/|S| Σ_{i∈S} KL(sg(p_t^(i)) ‖ p^(i))        λ_distill = 5.0
    L_teacher = Σ_{i∈S} λ_load·L_imp(p_t^(i)) + λ_ent·L_ent(p_t^(i))           0.005 each

p is the student router's clean softmax, p_t = softmax(R_t(h_t)) the teacher router's on the
frozen teacher's layer-aligned features h_t. Both go into one backward: the KL detaches p_t
and L_teacher reaches only R_t. After `--distill-until` (fraction of the epochs; 0.5, the
paper's best "first half", or `adaptive`) teacher and routers are deleted and never run
again, so the rest of the run costs what V-MoE costs.
Other methods: dense; vmoe (importance + load, 0.005 each, summed over layers as V-MoE);
expert-choice; softmoe; stablemoe (V-MoE, router frozen at the same switch); zloss (+1e-3
z-loss); teacher-route (sec. 5.3: R_t routes, trained by L_task + λ_load Σ(importance +
load); the student router, never used to choose, learns from λ_distill Σ_i KL, eq. S2).

Legend: λ_distill `--distill-coef`, λ_load/λ_ent `--teacher-load-coef/--teacher-ent-coef`,
S `--moe-layers`, R_t `TeacherRouter`, h_t `teacher(images)[i]`, g `routing.weights`.
Letters: B images, N tokens, D width, E experts, S image side, T = B·N tokens.

Decisions where the papers are silent
-------------------------------------
* `--router-grad distill-only` (tgr, while distilling): a hook zeroes the gradient of every
  layer's combine weights g, the task loss's only path into the router, so the router learns
  from the KL alone while it still routes (its own layer's KL: a later layer's KL would
  reach it only through g too). It stays inside autograd, so DDP averages it like
  any gradient (a separate autograd.grad would need an all-reduce of its own).
* The teacher routers sit outside the DDP-wrapped student: their gradients are averaged by hand.
* Fixed schedule: distil while epoch < round(F·epochs). `adaptive`: after each epoch a streak
  grows if every MoE layer's adjacent-epoch consistency is >= `--switch-consistency` (else it
  resets); at `--switch-patience` it switches. Epoch 0 compares with the initial routing.
* Per-step LR: warm-up from `--warmup-lr`, cosine to `--min-lr`; base = lr·batch·world/512.
  No weight decay on biases, norms, pos_embed, cls_token (DeiT). bf16 autocast on CUDA only.
* The frozen teacher runs under bf16 autocast on CPU and GPU alike (`--teacher-dtype`): on
  this project's CPU a TGR step was 1.4x faster than with an fp32 teacher (train_step.py).
* Images of <= 64 px get a reflect-padded random crop (CIFAR style), not RandomResizedCrop.
* Exact resume: every rank's RNG states, the step, the switch state and the probe's last
  assignments are saved; sampler and worker seeds follow (seed, epoch, rank); log.jsonl is
  cut back to the checkpoint's epoch.
* Besides log.jsonl, consistency_final.json holds every epoch's per-layer consistency with the
  last epoch's routing (from probe_routing.pt), the paper's consistency-with-final curve.
* On CPU the process asks glibc to keep freed memory (`keep_freed_memory`): without it the big
  MoE weight gradients are page-faulted afresh every step.
* Defaults: `--output-dir` runs/MODEL-METHOD; `--num-workers` 8 on CUDA, 0 on CPU (where
  workers would take the model's cores). The teacher agreement is logged on training
  batches and, while a teacher runs, on the validation set (`val_teacher_agreement`).
"""

import argparse
import ctypes
import datetime
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from eval import (
    evaluate,
    probe_assignments,
    probe_images,
    routing_consistency,
    teacher_agreement,
)
from losses import importance_loss, load_loss, routing_kl, z_loss
from moe import METHODS, MODELS, build_model, upcycle
from teacher import TeacherError, TeacherRouter, load_teacher, teacher_objective

DATASETS = ("synthetic", "cifar10", "cifar100", "pets", "imagenet", "folder")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as DeiT


class TrainError(Exception):
    """A user mistake: the CLI prints this one line (`error: ...`) and exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error (SPEC sec. 10)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# ============================================================================ arguments
def get_args_parser(add_help=True):
    parser = ArgumentParser("tgr-moe training (DeiT flags + MoE + TGR)", add_help=add_help)

    def add(group, *names, **kw):  # DeiT's underscore spellings are aliases of the dash ones
        alias = ["--" + n[2:].replace("-", "_") for n in names if "-" in n[2:]]
        group.add_argument(*names, *alias, **kw)

    on_off = argparse.BooleanOptionalAction
    g = parser.add_argument_group("model")
    add(g, "--model", default="tiny", choices=list(MODELS), help="micro | tiny | small | base")
    add(g, "--method", default="vmoe", choices=list(METHODS), help="routing method")
    add(g, "--experts", type=int, default=16, help="E, experts per MoE layer")
    add(g, "--topk", type=int, default=1, help="K, experts per token")
    add(g, "--moe-layers", type=int, nargs="+", default=None, help="1-indexed MoE blocks")
    add(g, "--capacity-factor", type=float, default=1.05, help="train capacity factor (V-MoE)")
    add(g, "--eval-capacity-factor", type=float, default=None, help="eval capacity factor")
    add(g, "--noise-std", type=float, default=1.0, help="router noise σ (added as σ/E)")
    add(g, "--moe-group-size", type=int, default=8, help="images per routing group")
    add(g, "--batch-priority", action="store_true", help="batch-priority routing (BPR)")
    add(g, "--img-size", "--input-size", type=int, default=224, help="image side in pixels")
    add(g, "--patch-size", type=int, default=16, help="patch side in pixels")
    add(g, "--drop-path", type=float, default=0.1, help="stochastic depth rate")
    add(g, "--finetune", default="", help="pre-trained checkpoint to fine-tune (new head)")

    g = parser.add_argument_group("method: losses and the distillation schedule")
    add(g, "--student-balance-coef", type=float, help="importance+load: 0.005, tgr 0")
    add(g, "--zloss-coef", type=float, default=1e-3, help="z-loss weight (--method zloss)")
    add(g, "--distill-coef", type=float, default=5.0, help="λ_distill")
    add(g, "--teacher-load-coef", type=float, default=0.005, help="λ_load (teacher router)")
    add(g, "--teacher-ent-coef", type=float, default=0.005, help="λ_ent (teacher router)")
    add(g, "--distill-until", default="0.5", help="fraction of epochs to distil, or adaptive")
    add(g, "--switch-consistency", type=float, default=0.8, help="adaptive switch threshold")
    add(g, "--switch-patience", type=int, default=2, help="adaptive: epochs above threshold")
    add(g, "--router-grad", default="task", choices=["task", "distill-only"], help="tgr router")

    g = parser.add_argument_group("teacher")
    add(g, "--teacher", default="", help="dense checkpoint (.pth/.pt) or torchvision:vit_b_16")
    add(g, "--teacher-layers", type=int, nargs="+", help="block per MoE layer (default same)")
    add(g, "--teacher-dtype", default="bf16", choices=["bf16", "fp32"], help="teacher autocast")
    add(g, "--teacher-random", action="store_true", help="allow random torchvision weights")
    add(g, "--teacher-resample", action="store_true", help="resample a different token grid")

    g = parser.add_argument_group("optimisation (DeiT recipe)")
    add(g, "--batch-size", type=int, default=64, help="images per process per step")
    add(g, "--epochs", type=int, default=300)
    add(g, "--lr", type=float, default=5e-4, help="LR at a global batch of 512")
    add(g, "--min-lr", type=float, default=1e-5)
    add(g, "--warmup-lr", type=float, default=1e-6)
    add(g, "--warmup-epochs", type=float, default=5)
    add(g, "--weight-decay", type=float, default=0.05)
    add(g, "--opt-eps", type=float, default=1e-8)
    add(g, "--opt-betas", type=float, nargs=2, default=(0.9, 0.999))
    add(g, "--clip-grad", type=float, default=None, help="max gradient norm")
    add(g, "--smoothing", type=float, default=0.1, help="label smoothing")
    add(g, "--mixup", type=float, default=0.8, help="MixUp α (0 = off)")
    add(g, "--cutmix", type=float, default=1.0, help="CutMix α (0 = off)")
    add(g, "--randaug-n", type=int, default=2, help="RandAugment ops (0 = off)")
    add(g, "--randaug-m", type=int, default=9, help="RandAugment magnitude")
    add(g, "--crop-flip", action=on_off, default=True, help="random crop and flip")
    add(g, "--compile", action="store_true", help="torch.compile the student")

    g = parser.add_argument_group("data")
    add(g, "--data", "--data-set", default="synthetic", choices=DATASETS)
    add(g, "--data-path", default="data", help="data root (ImageFolder: train/ and val/)")
    add(g, "--nb-classes", type=int, default=None, help="classes of the synthetic set")
    add(g, "--synthetic-train-size", type=int, default=10000)
    add(g, "--synthetic-val-size", type=int, default=1000)
    add(g, "--synthetic-seed", type=int, default=0, help="seed of the generated data")
    add(g, "--num-workers", type=int, default=None, help="loader workers (8 CUDA, 0 CPU)")
    add(g, "--pin-mem", action=on_off, default=True)

    g = parser.add_argument_group("run")
    add(g, "--output-dir", default=None, help="run folder (default runs/MODEL-METHOD)")
    add(g, "--resume", default="", help="RUN/checkpoint.pt, or auto (the output dir's)")
    add(g, "--seed", type=int, default=0)
    add(g, "--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add(g, "--print-freq", type=int, default=50, help="progress line every N steps")
    add(g, "--probe-size", type=int, default=256, help="validation images of the probe set")
    return parser


def check_args(args):
    """Turn impossible settings into one readable line each (SPEC sec. 10)."""
    moe = METHODS[args.method] is not None
    if moe and args.topk > args.experts:
        raise TrainError(f"--topk {args.topk} exceeds --experts {args.experts}")
    if args.capacity_factor <= 0 or (args.eval_capacity_factor or 1) <= 0:
        raise TrainError("capacity factor must be > 0 (capacity < 1 token per expert)")
    if args.method in ("tgr", "teacher-route") and not args.teacher:
        raise TrainError(f"--method {args.method} needs --teacher (e.g. runs/micro-dense/...pt)")
    fraction = args.distill_until.replace(".", "", 1).isdigit() and float(args.distill_until) <= 1
    if args.distill_until != "adaptive" and not fraction:
        raise TrainError(f"--distill-until {args.distill_until!r}: give a fraction or adaptive")
    for name in ("batch_size", "epochs", "experts", "print_freq", "probe_size"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda but no GPU is visible; use --device cpu")


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


# ============================================================================ data
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
        self.size, self.num_classes, self.img_size = size, num_classes, img_size
        self.transform = transform
        self.seed = 2 * seed + (split != "train")
        parts = 4  # P part types with P(P-1)/2 >= classes
        while parts * (parts - 1) // 2 < num_classes:
            parts += 1
        g = torch.Generator().manual_seed(seed)
        pairs = list(itertools.combinations(range(parts), 2))
        self.pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=g)[:num_classes]]
        hue = (torch.arange(parts) * 0.618034) % 1.0  # golden-ratio hues: well spread
        # fully saturated colour of that hue: the HSV -> RGB formula with S = V = 1
        rgb = (((hue[:, None] * 6 + torch.tensor([0.0, 4.0, 2.0])) % 6 - 3).abs() - 1).clamp(0, 1)
        self.colours = 0.1 + 0.9 * rgb  # (P, 3)
        ys, xs = torch.meshgrid(torch.arange(img_size), torch.arange(img_size), indexing="ij")
        self.yx = torch.stack([ys, xs]).float() + 0.5  # (2, S, S) pixel centres

    def __len__(self):
        return self.size

    def _mask(self, kind, dy, dx, r):
        a, b, d = dy.abs(), dx.abs(), (dy**2 + dx**2).sqrt()
        box = torch.maximum(a, b)
        return {
            "disc": d <= r,
            "square": box <= 0.8 * r,
            "ring": (d <= r) & (d >= 0.55 * r),
            "cross": (torch.minimum(a, b) <= 0.3 * r) & (box <= r),
            "stripes": (box <= 0.85 * r) & (((dx + r) / (0.35 * r)).floor() % 2 == 0),
            "diamond": a + b <= r,
        }[kind]

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        rand = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731
        S, label = self.img_size, index % self.num_classes
        img = 0.25 + 0.25 * rand(3, 1, 1) + 0.08 * torch.randn(3, S, S, generator=g)  # (3, S, S)
        for part in self.pairs[label]:
            for _ in range(1 + int(rand(1) < 0.5)):
                r = S * (0.12 + 0.1 * float(rand(1)))
                cy, cx = (r + (S - 2 * r) * rand(2)).tolist()
                mask = self._mask(self.SHAPES[part % 6], self.yx[0] - cy, self.yx[1] - cx, r)
                colour = self.colours[part] * (0.8 + 0.4 * float(rand(1)))  # (3,)
                img = torch.where(mask, colour[:, None, None], img)  # (3, S, S)
        img = (img + 0.04 * torch.randn(3, S, S, generator=g)).clamp(0, 1)  # (3, S, S)
        img = torchvision.tv_tensors.Image((img * 255).round().to(torch.uint8))  # (3, S, S)
        return (self.transform(img) if self.transform else img), label


def build_transform(args, train):
    """DeiT's train / eval pipelines on uint8 images, in torchvision.transforms.v2."""
    S, small = args.img_size, args.img_size <= 64
    t = [v2.ToImage()]
    if train and args.crop_flip:
        if small:  # CIFAR-style: keep the whole small image, shift it a little
            t += [v2.Resize((S, S)), v2.RandomCrop(S, padding=S // 8, padding_mode="reflect")]
        else:
            t += [v2.RandomResizedCrop(S, interpolation=v2.InterpolationMode.BICUBIC)]
        t += [v2.RandomHorizontalFlip()]
    elif small:
        t += [v2.Resize((S, S))]
    else:  # DeiT eval: resize to S/0.875, centre crop S
        t += [v2.Resize(int(S / 0.875), interpolation=v2.InterpolationMode.BICUBIC)]
        t += [v2.CenterCrop(S)]
    if train and args.randaug_n > 0:
        t += [v2.RandAugment(num_ops=args.randaug_n, magnitude=args.randaug_m)]
    t += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(t)


def build_datasets(args, with_train=True):
    """(train set, val set, number of classes) for --data.

    with_train=False returns None for the train set without touching it (eval.py: no scan of
    ImageNet's 1.28M training files, no download of a training split).
    """
    root, name = Path(args.data_path), args.data
    tr, ev = build_transform(args, True), build_transform(args, False)
    if name == "synthetic":
        C, kw = args.nb_classes or 10, dict(seed=args.synthetic_seed)
        train = SyntheticImages(args.synthetic_train_size, C, args.img_size, transform=tr, **kw)
        val = SyntheticImages(args.synthetic_val_size, C, args.img_size, "val", transform=ev, **kw)
        return (train if with_train else None), val, C
    if name in ("imagenet", "folder"):
        for split in ("train", "val") if with_train else ("val",):
            if not (root / split).is_dir():
                raise TrainError(f"--data-path {root}: no {split}/CLASS/*.jpg folders found")
        train = torchvision.datasets.ImageFolder(root / "train", tr) if with_train else None
        val = torchvision.datasets.ImageFolder(root / "val", ev)
        return train, val, len((train or val).classes)
    sets = torchvision.datasets
    cls, C = {"cifar10": (sets.CIFAR10, 10), "cifar100": (sets.CIFAR100, 100)}.get(name) or (
        sets.OxfordIIITPet, 37)  # fmt: skip

    def split(train, transform):
        kw = {"train": train} if name != "pets" else {"split": "trainval" if train else "test"}
        try:
            return cls(root, transform=transform, download=False, **kw)
        except RuntimeError:  # not there yet: fetch it (needs the network)
            try:
                return cls(root, transform=transform, download=True, **kw)
            except Exception as err:
                why = f"not in --data-path {root} and the download failed ({type(err).__name__})"
                raise TrainError(f"{name}: {why}") from None

    return (split(True, tr) if with_train else None), split(False, ev), C


# ============================================================================ checkpoints
def save_checkpoint(path, state):
    """torch.save to PATH.tmp, then rename: a kill mid-save leaves the last good file intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path, what):
    if not Path(path).is_file():
        raise TrainError(f"{what} {path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        why = f"cannot read it ({type(err).__name__}): truncated? Use an earlier one"
        raise TrainError(f"{what} {path}: {why}") from None


def rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def load_pretrained(model, path, probe):
    """--finetune: pre-trained weights in, head dropped if the classes differ.

    Returns the pre-trained model's probe routing (to log consistency against) or None.
    """
    sd = read_checkpoint(path, "--finetune")
    pre_args, sd = sd.get("args") or {}, sd.get("model", sd)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") and v.shape != own[k].shape)}
    if pre_args.get("method") == "dense" and model.moe_layers:
        upcycle(model, sd)  # dense -> MoE: every expert starts as the dense MLP
        return None
    for key, value in sd.items():
        if key not in own or own[key].shape != value.shape:
            shape = tuple(own[key].shape) if key in own else "absent"
            raise TrainError(f"--finetune {path}: {key} is {tuple(value.shape)}, here {shape}")
    model.load_state_dict(sd, strict=False)
    return probe_assignments(model, probe) if model.moe_layers else None


def build_student(args, num_classes):
    """The student ViT of --model/--method; bad combinations become one TrainError line."""
    a, opts = args, {}
    if METHODS[a.method] == "top-k":
        opts = dict(capacity_factor=a.capacity_factor, noise_std=a.noise_std,
                    group_size=a.moe_group_size, batch_priority=a.batch_priority,
                    eval_capacity_factor=a.eval_capacity_factor)  # fmt: skip
    try:
        return build_model(a.model, a.method, num_classes, a.img_size, a.patch_size, a.experts,
                           a.topk, a.moe_layers, drop_path_rate=a.drop_path, **opts)  # fmt: skip
    except ValueError as err:
        raise TrainError(str(err)) from None


def build_teacher(args, model, device, world):
    """The frozen teacher and one TeacherRouter per MoE layer (identical on every rank)."""
    layers = args.teacher_layers or list(model.moe_layers)
    if len(layers) != len(model.moe_layers):
        raise TrainError(
            f"--teacher-layers: {len(layers)} blocks for {len(model.moe_layers)} MoE layers"
        )
    teacher = load_teacher(args.teacher, layers, dtype=args.teacher_dtype or "bf16",
                           random_ok=args.teacher_random, resample=args.teacher_resample,
                           student_grid=model.grid)  # fmt: skip
    teacher.to(device)
    routers = torch.nn.ModuleList(TeacherRouter(teacher.dim, args.experts) for _ in layers)
    routers.to(device)
    if world > 1:  # rank 0's initial routers everywhere (DDP does the same for the student)
        for p in routers.parameters():
            dist.broadcast(p.data, 0)
    return teacher, routers


# ============================================================================ one step
def compute_losses(model, images, targets, args, teacher, routers):
    """Forward the student (and, while distilling, the teacher); unweighted parts -> weighted sum.

    Returns (student loss, teacher-router loss or 0, {part: detached value}).
    """
    parts, t_logits = {}, None
    if teacher is not None:
        feats = teacher(images)  # frozen backbone, runs under no_grad: list of (B, N, D_t)
        t_logits = [R(h) for R, h in zip(routers, feats)]  # (B, N, E) each, trainable routers
    route = t_logits if args.method == "teacher-route" else None
    logits, routings = model(images, route=route)  # (B, classes), one Routing per MoE layer
    loss = parts["task"] = F.cross_entropy(logits.float(), targets, label_smoothing=args.smoothing)
    if args.student_balance_coef > 0 and METHODS[args.method] == "top-k":
        # V-MoE: L_aux = Σ_i λ·(L_imp + L_load); in teacher-route the record's logits are R_t's
        parts["importance"] = sum(importance_loss(r.probs) for r in routings)
        parts["load"] = sum(
            load_loss(r.logits, r.noisy_logits if r.noise_std else r.logits, r.noise_std, args.topk)
            for r in routings
        )
        loss = loss + args.student_balance_coef * (parts["importance"] + parts["load"])
    if args.method == "zloss":
        parts["zloss"] = sum(z_loss(r.logits) for r in routings)  # L_z = mean_t logsumexp²
        loss = loss + args.zloss_coef * parts["zloss"]
    teacher_loss = 0.0
    if t_logits is not None:
        # L_distill = KL(sg(p_t) ‖ p) = Σ_e p_t,e (log p_t,e − log p_e); sg = .detach(): the KL
        # pulls the student toward the teacher router and never the teacher router toward it
        pairs = [(r.student_logits, t) for r, t in zip(routings, t_logits)]  # (T, E), (B, N, E)
        parts["distill"] = sum(routing_kl(s, t.detach(), from_logits=True) for s, t in pairs)
        # how often the student's own top-1 already is the teacher router's, averaged over layers
        agree = [teacher_agreement(s, t) for s, t in pairs]
        parts["teacher_agreement"] = torch.tensor(sum(agree) / len(agree))
        scale = 1 if args.method == "teacher-route" else len(routings)  # eq. S2 sums; TGR averages
        loss = loss + args.distill_coef / scale * parts["distill"]
        if args.method == "tgr":  # the teacher router sees no task loss, only balance + entropy
            coefs = args.teacher_load_coef, args.teacher_ent_coef
            teacher_loss, t_parts = teacher_objective(t_logits, *coefs)
            parts["teacher_load"], parts["teacher_ent"] = t_parts["load"], t_parts["ent"]
        if args.router_grad == "distill-only" and args.method == "tgr":
            for r in routings:  # g's gradient is the task loss's only way into the router
                r.weights.register_hook(torch.zeros_like)
    return loss, teacher_loss, {k: v.detach().float() for k, v in parts.items()}


def keep_freed_memory():
    """CPU, glibc: serve big tensors from the heap and keep freed memory for the next step.

    glibc gives every allocation above 32 MiB fresh mmap pages and unmaps them on free, so
    such a tensor costs page faults (the kernel zeroes every page) on every step. MoE layers
    make them: at E=128 the weight gradients (E, D, H) of one Tiny layer are 75 MB each, and
    this alone made the layer ~25% slower (benchmarks/moe_layer.py --glibc-default).
    jemalloc / tcmalloc behave like this setting. Returns False where mallopt is missing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): leave the allocator alone
        return False
    # M_MMAP_MAX (-4) = 0: no mmap; M_TRIM_THRESHOLD (-1) = 2 GiB: keep the freed heap
    return libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2**31 - 1) == 1


def lr_at(step, args, steps_per_epoch):
    """Linear warm-up from --warmup-lr, then cosine to --min-lr (per step)."""
    # lr(s) = warmup_lr + (base − warmup_lr)·s/W  for s < W, else
    # lr(s) = min_lr + ½(base − min_lr)(1 + cos(π (s − W)/(total − W)))
    warm, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    if step < warm:
        return args.warmup_lr + (args.base_lr - args.warmup_lr) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return args.min_lr + 0.5 * (args.base_lr - args.min_lr) * (1 + math.cos(math.pi * progress))


# ============================================================================ main
def main(args):
    """Train; returns {"model": the unwrapped student, "routers", "history": epoch records}."""
    check_args(args)
    if args.student_balance_coef is None:  # TGR (sec. 3): the student has no balance loss
        args.student_balance_coef = 0.0 if args.method == "tgr" else 0.005
    args.output_dir = args.output_dir or f"runs/{args.model}-{args.method}"
    # ------------------------------------------------------------------ distributed init
    if "RANK" in os.environ:  # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        cuda = args.device.startswith("cuda")
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        rank, world, device = 0, 1, torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # big per-step tensors reuse memory instead of fresh pages
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device):
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    out, cuda = Path(args.output_dir), device.type == "cuda"
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)  # bf16 on GPU only
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))

    # ------------------------------------------------------------------ data
    train_set, val_set, num_classes = build_datasets(args)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    loader_rng = torch.Generator()  # re-seeded every epoch: worker seeds follow (seed, epoch)
    workers = args.num_workers if args.num_workers is not None else (8 if cuda else 0)
    kw = dict(batch_size=args.batch_size, num_workers=workers, pin_memory=args.pin_mem and cuda)
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, generator=loader_rng,
                              **kw)  # fmt: skip
    val_sampler = DistributedSampler(val_set, world, rank, shuffle=False)
    val_loader = DataLoader(val_set, sampler=val_sampler, generator=torch.Generator(), **kw)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise TrainError(f"{len(train_set)} training images < one batch of {args.batch_size}")
    mixes = [v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []
    mixes += [v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else []
    mix = v2.RandomChoice(mixes) if mixes else None  # MixUp or CutMix per batch, as DeiT
    # (P, 3, S, S) fixed validation images whose routing we follow over epochs
    probe = probe_images(val_set, args.probe_size).to(device)

    # ------------------------------------------------------------------ model and teacher
    model = build_student(args, num_classes).to(device)
    resume = args.resume
    if resume == "auto":
        resume = str(out / "checkpoint.pt") if (out / "checkpoint.pt").is_file() else ""
    ckpt = read_checkpoint(resume, "--resume") if resume else None
    ref_assign = None  # --finetune: the pre-trained model's routing of the probe set
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            msg = str(err).splitlines()[-1].strip()
            raise TrainError(f"--resume {resume} does not fit this model: {msg}") from None
        ref_assign = ckpt["ref_assign"]
    elif args.finetune:
        ref_assign = load_pretrained(model, args.finetune, probe)
    schedule = args.distill_until
    distill_epochs = None if schedule == "adaptive" else round(float(schedule) * args.epochs)
    sw = {"done": distill_epochs == 0, "epoch": 0, "reason": "--distill-until 0", "streak": 0}
    sw = ckpt["switch"] if ckpt else sw  # the switch state: has it happened, when, why
    if args.method == "stablemoe" and sw["done"]:
        freeze_routers(model)
    teacher = routers = teacher_route = None
    # after the switch the last teacher router is kept (CPU, frozen) for eval.py --route teacher
    router_state = ckpt.get("teacher_router") if ckpt else None
    if args.method == "teacher-route" or (args.method == "tgr" and not sw["done"]):
        teacher, routers = build_teacher(args, model, device, world)
        if ckpt is not None:
            routers.load_state_dict(ckpt["teacher_router"])
        teacher_route = lambda x: [R(h) for R, h in zip(routers, teacher(x))]  # noqa: E731
    model_without_ddp = model  # checkpoints hold these weights: no module./_orig_mod. prefixes
    model = wrap(model_without_ddp, args, world, device)

    # ------------------------------------------------------------------ optimizer
    args.base_lr = args.lr * args.batch_size * world / 512  # DeiT's linear scaling rule
    decay, no_decay = [], []
    for name, p in model_without_ddp.named_parameters():
        flat = p.ndim <= 1 or name.endswith((".b1", ".b2")) or name in ("pos_embed", "cls_token")
        (no_decay if flat else decay).append(p)  # no weight decay on biases, norms, embeddings
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    if routers is not None:
        groups.append({"params": list(routers.parameters()), "name": "teacher_router"})
    fast = {"fused": True} if cuda else {"foreach": True}  # one kernel over all the experts
    optimizer = torch.optim.AdamW(groups, betas=tuple(args.opt_betas), eps=args.opt_eps,
                                  weight_decay=args.weight_decay, **fast)  # fmt: skip
    start_epoch, step, prev_assign = 0, 0, None
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as err:  # another --method (e.g. one with teacher routers)
            raise TrainError(f"--resume {resume}: optimizer state does not fit ({err})") from None
        start_epoch, step, prev_assign = ckpt["epoch"] + 1, ckpt["step"], ckpt["probe_prev"]
        set_rng_state(ckpt["rng"][rank] if len(ckpt["rng"]) == world else ckpt["rng"][0])
        if rank == 0 and (out / "log.jsonl").is_file():  # drop epochs the checkpoint lacks
            lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
            kept = [ln for ln in lines if json.loads(ln)["epoch"] <= ckpt["epoch"]]
            (out / "log.jsonl").write_text("".join(kept))
        print0(f"resumed from {resume} at epoch {start_epoch}, step {step}")
    elif rank == 0:
        (out / "log.jsonl").unlink(missing_ok=True)
    routing_file = out / "probe_routing.pt"  # every epoch's probe routing, for the final plot
    probe_history = (
        torch.load(routing_file, weights_only=True) if ckpt and routing_file.is_file() else {}
    )
    probe_history = {e: a for e, a in probe_history.items() if e < start_epoch}
    if prev_assign is None:  # routing at initialisation: epoch 0's "previous epoch"
        prev_assign = probe_assignments(model_without_ddp, probe)
    del ckpt
    params = sum(p.numel() for p in model_without_ddp.parameters()) / 1e6
    print0(f"{args.model} {args.method}: {params:.2f}M params, {len(train_set)} images, "
           f"{world} process(es) on {device}, {steps_per_epoch} steps/epoch")  # fmt: skip

    # ------------------------------------------------------------------ loop
    history = []
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        loader_rng.manual_seed(args.seed * 100_003 + epoch * 101 + rank)
        model.train()
        distilling = teacher is not None
        sums, seen, t0 = {}, 0, time.time()
        for it, (images, targets) in enumerate(train_loader):
            lr = lr_at(step, args, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)  # (B, 3, S, S)
            targets = targets.to(device, non_blocking=True)  # (B,)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)  # faster patchify
            if mix is not None:
                images, targets = mix(images, targets)  # targets: (B, classes) soft labels
            with torch.autocast(**amp):
                loss, teacher_loss, parts = compute_losses(model, images, targets, args,
                                                           teacher, routers)  # fmt: skip
            total = loss + teacher_loss
            if not math.isfinite(value := total.item()):
                kept = f"the last good checkpoint is {out / 'checkpoint.pt'}"
                raise TrainError(f"loss is {value} at step {step} (epoch {epoch}); {kept}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if routers is not None and world > 1:
                # The teacher routers are not inside the DDP-wrapped student, so DDP never
                # averages their gradients: without this every rank's router would follow its
                # own shard of the data and the ranks would distil toward different targets.
                for p in routers.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            if args.clip_grad:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            optimizer.step()
            step, seen = step + 1, seen + images.shape[0] * world
            for k, v in {"loss": total.detach().float(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
            if (it + 1) % args.print_freq == 0 or it + 1 == steps_per_epoch:
                elapsed = time.time() - t0
                eta = datetime.timedelta(seconds=round(elapsed * (steps_per_epoch / (it + 1) - 1)))
                shown = " ".join(f"{k} {float(v) / (it + 1):.4f}" for k, v in sums.items())
                print0(f"epoch {epoch} [{it + 1}/{steps_per_epoch}] {shown} lr {lr:.2e} "
                       f"{seen / elapsed:.0f} img/s eta {eta}")  # fmt: skip
        train_time = time.time() - t0
        means = torch.stack([torch.as_tensor(v, device=device) for v in sums.values()])
        if world > 1:
            dist.all_reduce(means)
        means = (means / (world * steps_per_epoch)).tolist()

        # -------------------------------------------------------------- metrics and switch
        by_teacher = args.method == "teacher-route"  # the teacher router chooses the experts
        amp_dtype = torch.bfloat16 if cuda else None
        val = evaluate(model_without_ddp, val_loader, device, amp_dtype=amp_dtype,
                       teacher=teacher_route, route_by_teacher=by_teacher)  # fmt: skip
        assign = probe_assignments(model_without_ddp, probe)
        consistency = [routing_consistency(a, b) for a, b in zip(assign, prev_assign)]
        record = {"epoch": epoch, "step": step, "lr": lr, "distilling": distilling,
                  **{f"train_{k}": v for k, v in zip(sums, means)},  # train_loss and its parts
                  "val_top1": val["top1"], "val_top5": val.get("top5"),
                  "moe_layers": list(model_without_ddp.moe_layers), "consistency_prev": consistency,
                  **{k: val.get(k) for k in ("routing_entropy", "utilisation", "dropped_frac")},
                  "val_teacher_agreement": val.get("teacher_agreement"),  # while a teacher runs
                  "images_per_s": seen / train_time}  # fmt: skip
        if args.method == "teacher-route":  # the upper bound vs routing by the student's router
            student_route = evaluate(model_without_ddp, val_loader, device, amp_dtype=amp_dtype)
            record["val_top1_student_route"] = student_route["top1"]
        if ref_assign is not None:
            pairs = zip(assign, ref_assign)  # the same tokens, before and after fine-tuning
            record["consistency_pretrained"] = [routing_consistency(a, b) for a, b in pairs]
        prev_assign = assign
        if args.method == "stablemoe":  # during this epoch
            record["router_frozen"] = sw["done"]
        last_epoch = epoch + 1 == args.epochs  # nothing left to switch to
        if args.method in ("tgr", "stablemoe") and not sw["done"] and not last_epoch:
            switch, why = switch_due(args, sw, epoch, distill_epochs, consistency)
            if world > 1:  # every rank must take the same branch: rank 0 decides
                flag = torch.tensor([float(switch)], device=device)
                dist.broadcast(flag, 0)
                switch = bool(flag.item())
            if switch:
                sw.update(done=True, epoch=epoch + 1, reason=why)
                record["switch"] = {"after_epoch": epoch, "reason": why}
                print0(f"switch after epoch {epoch}: {why}")
                if args.method == "tgr":  # free the teacher: the rest of the run is V-MoE
                    router_state = {k: v.cpu() for k, v in routers.state_dict().items()}
                    for p in routers.parameters():
                        optimizer.state.pop(p, None)
                    optimizer.param_groups.pop()  # the teacher-router group, added last
                    teacher = routers = teacher_route = None
                    if cuda:
                        torch.cuda.empty_cache()
                else:  # stablemoe: the router is kept as it is and frozen from now on
                    freeze_routers(model_without_ddp)
                    model = wrap(model_without_ddp, args, world, device)
        record["epoch_time_s"] = time.time() - t0
        history.append(record)
        entropy = [round(e, 3) for e in val.get("routing_entropy") or []]
        print0(f"epoch {epoch}: val top-1 {val['top1']:.2f}  routing entropy {entropy}  "
               f"consistency {[round(c, 3) for c in consistency]}")  # fmt: skip

        # -------------------------------------------------------------- checkpoint
        rngs = [rng_state()] * world
        if world > 1:  # every rank's RNG, so that a resumed DDP run continues exactly
            dist.all_gather_object(rngs, rng_state())
        if rank == 0:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": {"step": step, "base_lr": args.base_lr}, "epoch": epoch,
                     "scaler": None, "args": vars(args),  # DeiT's layout, then ours:
                     "teacher_router": router_state if routers is None else routers.state_dict(),
                     "step": step, "rng": rngs, "switch": sw, "probe_prev": prev_assign,
                     "ref_assign": ref_assign}  # fmt: skip
            save_checkpoint(out / "checkpoint.pt", state)
            if assign:  # consistency with the final routing (TGR Fig. 1), rewritten each epoch
                probe_history[epoch] = [a.to(torch.uint8) for a in assign]  # E <= 256
                save_checkpoint(routing_file, probe_history)
                final = [[routing_consistency(a, b) for a, b in zip(h, probe_history[epoch])]
                         for h in probe_history.values()]  # fmt: skip
                (out / "consistency_final.json").write_text(json.dumps(final))
    return {"model": model_without_ddp, "routers": routers, "history": history}


def switch_due(args, sw, epoch, distill_epochs, consistency):
    """(switch now?, why): the fixed fraction, or the adaptive consistency rule."""
    if distill_epochs is not None:
        why = f"--distill-until {args.distill_until} of {args.epochs} epochs"
        return epoch + 1 >= distill_epochs, why
    # adaptive: every MoE layer's adjacent-epoch consistency above the threshold, `patience` times
    sw["streak"] = sw["streak"] + 1 if min(consistency) >= args.switch_consistency else 0
    last = [round(c, 3) for c in consistency]
    why = f"adaptive: consistency_prev >= {args.switch_consistency} in every MoE layer"
    return sw["streak"] >= args.switch_patience, f"{why} for {sw['streak']} epoch(s), last {last}"


def freeze_routers(model):
    """StableMoE stage 2: the student's routers stop learning (requires_grad False)."""
    for i in model.moe_layers:
        model.blocks[i - 1].mlp.router.requires_grad_(False)


def wrap(model, args, world, device):
    """DDP (rebuilt when the set of trainable parameters changes) and optional compile."""
    if world > 1:
        ids = [device] if device.type == "cuda" else None  # CPU (gloo): no device ids
        model = DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if args.compile else model


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (TrainError, TeacherError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
