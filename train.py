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
again, so the rest of the run costs what V-MoE costs (`switch_due` decides, `switch_off`
performs it).
Other methods: dense; vmoe (importance + load, 0.005 each, summed over layers as V-MoE);
expert-choice; softmoe; stablemoe (V-MoE, then router frozen, noise and balance loss off
after `--stable-stage1`); zloss (+1e-3
z-loss); teacher-route (sec. 5.3: R_t routes, trained by L_task + λ_load Σ(importance +
load); the student router, never used to choose, learns from λ_distill Σ_i KL, eq. S2).

M²oT (`--teachers SRC ...`, SPEC sec. 9, `m2ot.py`): `--method m2ot`, and the dense and Soft
MoE students of the same teachers, learn without labels, L = L_dist + λ_1 L_tas + λ_2 L_switch
(`m2ot.m2ot_losses`); `--tas-coef 0` is the paper's plain Sparse MoE row.

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
* Fixed schedule: distil the first ceil(F·epochs) epochs (at least one whenever F > 0),
  printed at start. `adaptive`: after each epoch a streak grows if every MoE layer's
  adjacent-epoch consistency is >= `--switch-consistency` (else it resets); at
  `--switch-patience` it switches. Epoch 0 compares with the initial routing.
* Every input file (--resume, --finetune, --teacher, --data-path) is opened and checked before
  any data set is built, any file is written or any step runs, whatever the schedule.
* Per-step LR: warm-up from `--warmup-lr`, cosine to `--min-lr`; base = lr·batch·world·
  accum/512 (`--accum-iter`: DeiT-III's gradient accumulation, `no_sync` before the last
  batch of a step). No weight decay on biases, norms, pos_embed, cls_token (DeiT). bf16
  autocast on CUDA only; `cudnn.benchmark` on.
* The step hands nothing to Python (no `.item()`, no `bool()` of a tensor): losses and
  metrics are summed on the device and read at `--print-freq`; a nan/inf loss is noted on the
  device and stops the run at the next progress line, naming the first bad step (no
  checkpoint is written after it). `--compile` compiles `compute_losses`, the step's whole
  forward (student, losses, teacher and routers while distilling) with its backward; it
  recompiles once at the switch or StableMoE's freeze, never per step.
* The data workers stop at uint8 images; `data.device_batch` normalises, erases and mixes on the
  device (timm's PrefetchLoader does the same). Validation batches are 1.5x the training one.
* The frozen teacher runs under bf16 autocast on CPU and GPU alike (`--teacher-dtype`): on
  this project's CPU a TGR step was 1.4x faster than with an fp32 teacher (train_step.py).
* Exact resume: every rank's RNG states, the step, the switch state and the probe's last
  assignments are saved; sampler and worker seeds follow (seed, epoch, rank); log.jsonl is
  cut back to the checkpoint's epoch. Checkpoints also carry `model_args` and `teacher_args`
  (the `build_model` / `load_teacher` keyword arguments): eval.py needs nothing else.
* Besides log.jsonl, consistency_final.json holds every epoch's per-layer consistency with the
  last epoch's routing (from probe_routing.pt), the paper's consistency-with-final curve.
* On CPU the process asks glibc to keep freed memory (`moe.keep_freed_memory`): without it the
  big MoE weight gradients are page-faulted afresh every step.
* `--eval-capacity-factor` defaults to 4.0 for the top-K methods: V-MoE's ImageNet-1k config
  (google-research/vmoe, vmoe/configs/vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1.py,
  "Use higher capacity for evaluation": `config.evaluate.model_overrides` sets the
  dispatcher's capacity_factor to 4.0; training keeps 1.05). Expert choice keeps its training
  cf: there the capacity is how many tokens each expert takes, so a larger one would change
  the computation, not just stop drops. The resolved value is saved in args and model_args.
* Defaults: `--output-dir` runs/MODEL-METHOD; `--num-workers` the CPUs per process minus one,
  at most 10 (DeiT's), on CUDA, 0 on CPU (where workers would take the model's cores).
* DDP: rank 0 writes the checkpoint while the others wait in a barrier; the process group's
  timeout is 30 minutes (a checkpoint of E = 128 experts is tens of GB).
* The teacher agreement is logged on training batches and, while a teacher runs, on the
  validation set (`val_teacher_agreement`).
* `--teachers` runs (`resolve_defaults`): M²oT's student, E = 8, K = 2, MoE in every second
  block, experts H/K wide (Table 4: the dense model's active parameters); no classifier, no
  MixUp/CutMix/smoothing (no labels), no EMA (no top-1 to show it); `val_knn_top1` every
  `--knn-every` epochs and at the last (the bank is a pass over the train split); heads, π and
  the targets' statistics are saved as "m2ot" and, outside DDP, averaged by hand like the
  teacher routers. `--upcycle` takes a dense checkpoint only.
"""

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (
    DATASETS,
    build_dataset,
    build_loader,
    build_mixup,
    check_data_path,
    default_workers,
    device_batch,
    parse_aa,
    set_epoch,
)
from eval import (
    evaluate,
    knn_eval,
    probe_assignments,
    probe_images,
    routing_consistency,
    teacher_agreement,
)
from losses import importance_loss, load_loss, routing_kl, z_loss
from m2ot import M2oT, keep_expert_outputs, m2ot_losses
from moe import METHODS, MODELS, build_model, keep_freed_memory, model_args_from_flags, upcycle
from router import check_routing
from teacher import (
    ArgumentParser,
    build_teacher_routers,
    load_final_teacher,
    load_teacher,
    read_checkpoint,
    run_cli,
    teacher_args_from_flags,
    teacher_objective,
    teacher_route,
)

# V-MoE's evaluation capacity factor for top-K routers (source in the docstring's decisions)
VMOE_EVAL_CF = 4.0


class TrainError(ValueError):
    """A user mistake: `teacher.run_cli` prints this one line (`error: ...`), exit status 2."""


# ============================================================================ arguments
def distill_until(text, flag="--distill-until", adaptive=True):
    """--distill-until, parsed once: a fraction F in [0, 1] of the epochs, or "adaptive"."""
    if text == "adaptive" and adaptive:
        return text
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 <= fraction <= 1:
        raise argparse.ArgumentTypeError(
            f"{flag} {text!r}: give a fraction" + " or adaptive" * adaptive
        )
    return fraction


def stable_stage1(text):
    """--stable-stage1: the fraction of the epochs in which StableMoE's router still learns."""
    return distill_until(text, "--stable-stage1", adaptive=False)


def get_args_parser(add_help=True):
    parser = ArgumentParser("tgr-moe training (DeiT flags + MoE + TGR)", add_help=add_help)

    def add(group, *names, **kw):  # DeiT's underscore spellings are aliases of the dash ones
        alias = ["--" + n[2:].replace("-", "_") for n in names if "-" in n[2:]]
        group.add_argument(*names, *alias, **kw)

    on_off = argparse.BooleanOptionalAction
    g = parser.add_argument_group("model")
    add(g, "--model", default="tiny", choices=list(MODELS), help="micro | tiny | small | base")
    add(g, "--method", default="vmoe", choices=list(METHODS), help="routing method")
    add(g, "--experts", type=int, default=None, help="E, experts per MoE layer (16; m2ot 8)")
    add(g, "--topk", type=int, default=None, help="K, experts per token (1; m2ot 2)")
    add(g, "--moe-layers", type=int, nargs="+", default=None,
        help="1-indexed MoE blocks (the model's; with --teachers every second)")  # fmt: skip
    add(g, "--expert-hidden", type=int, default=None,
        help="each expert's hidden width h (default H; with --teachers H/K)")  # fmt: skip
    add(g, "--capacity-factor", type=float, default=1.05, help="train capacity factor (V-MoE)")
    add(
        g,
        "--eval-capacity-factor",
        type=float,
        default=None,
        help=f"eval capacity factor (default {VMOE_EVAL_CF} for top-K as V-MoE, else the train cf)",
    )
    add(g, "--noise-std", type=float, default=1.0, help="router noise σ (added as σ/E)")
    add(g, "--moe-group-size", type=int, default=8, help="images per routing group")
    add(g, "--batch-priority", action="store_true", help="batch-priority routing (BPR)")
    add(g, "--img-size", "--input-size", type=int, default=224, help="image side in pixels")
    add(g, "--patch-size", type=int, default=16, help="patch side in pixels")
    add(g, "--drop-path", type=float, default=0.1, help="stochastic depth rate")
    add(g, "--finetune", default="", help="pre-trained checkpoint to fine-tune (new head)")
    add(g, "--upcycle", default="", help="dense checkpoint whose MLPs start the experts")

    g = parser.add_argument_group("method: losses and the distillation schedule")
    add(g, "--student-balance-coef", type=float, help="importance+load: 0.005, tgr 0")
    add(g, "--zloss-coef", type=float, default=1e-3, help="z-loss weight (--method zloss)")
    add(g, "--distill-coef", type=float, default=5.0, help="λ_distill")
    add(g, "--teacher-load-coef", type=float, default=0.005, help="λ_load (teacher router)")
    add(g, "--teacher-ent-coef", type=float, default=0.005, help="λ_ent (teacher router)")
    add(g, "--distill-until", type=distill_until, default=0.5,
        help="fraction F of the epochs to distil (ceil(F·epochs) epochs), or adaptive")  # fmt: skip
    add(g, "--stable-stage1", type=stable_stage1, default=0.5,
        help="stablemoe: fraction of the epochs before the router is frozen")  # fmt: skip
    add(g, "--switch-consistency", type=float, default=0.8, help="adaptive switch threshold")
    add(g, "--switch-patience", type=int, default=2, help="adaptive: epochs above threshold")
    add(g, "--router-grad", default="task", choices=["task", "distill-only"], help="tgr router")

    g = parser.add_argument_group("teacher")
    add(g, "--teacher", default="", help="dense checkpoint (.pth/.pt) or torchvision:vit_b_16")
    add(g, "--teacher-layers", type=int, nargs="+", help="block per MoE layer (default same)")
    add(g, "--teacher-dtype", default="bf16", choices=["bf16", "fp32"], help="teacher autocast")
    add(g, "--teacher-random", action="store_true", help="allow random torchvision weights")
    add(g, "--teacher-resample", action="store_true", help="resample a different token grid")
    add(g, "--fresh-teacher-router", action="store_true",
        help="tgr --finetune: a new teacher router, not the pre-trained run's")  # fmt: skip

    g = parser.add_argument_group("M²oT: several teachers guide the experts (no labels)")
    add(g, "--teachers", nargs="+", default=[],
        help="final-feature teachers: checkpoints, torchvision:NAME, timm:NAME=PATH")  # fmt: skip
    add(g, "--tas-coef", type=float, default=0.5, help="λ_1, TAS loss (0: the Sparse MoE row)")
    add(g, "--switch-coef", type=float, default=0.01, help="λ_2, Switch load loss")
    add(g, "--knn-every", type=int, default=1, help="k-NN validation every N epochs (0: last)")

    g = parser.add_argument_group("optimisation (DeiT recipe)")
    add(g, "--batch-size", type=int, default=64, help="images per process per batch")
    add(
        g,
        "--accum-iter",
        type=int,
        default=1,
        help="batches per optimizer step (gradient accumulation, DeiT-III/MAE)",
    )
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
    add(g, "--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy (timm's), or none")
    add(g, "--reprob", type=float, default=0.25, help="random erasing probability (0 = off)")
    add(g, "--remode", default="pixel", choices=["pixel", "const"], help="random erasing fill")
    add(g, "--recount", type=int, default=1, help="random erasing: up to N rectangles")
    add(g, "--repeated-aug", action=on_off, default=True, help="DeiT's repeated augmentation ×3")
    add(g, "--crop-flip", action=on_off, default=True, help="random crop and flip")
    add(g, "--eval-crop-ratio", type=float, default=0.875, help="eval: resize S/ratio, crop S")
    add(
        g,
        "--compile",
        action="store_true",
        help="torch.compile the step: student, losses and, while distilling, the teacher",
    )
    add(g, "--model-ema", action=on_off, default=None, help="EMA of the weights (DeiT; on, "
        "off with --teachers)")  # fmt: skip
    add(g, "--model-ema-decay", type=float, default=0.99996, help="EMA decay per step")

    g = parser.add_argument_group("data")
    add(g, "--data", "--data-set", default="synthetic", choices=DATASETS, help="data set")
    add(g, "--data-path", default="data", help="data root (ImageFolder: train/ and val/)")
    add(g, "--nb-classes", type=int, default=None, help="classes of the synthetic set")
    add(g, "--synthetic-train-size", type=int, default=10000)
    add(g, "--synthetic-val-size", type=int, default=1000)
    add(g, "--synthetic-seed", type=int, default=0, help="seed of the generated data")
    add(g, "--num-workers", type=int, default=None, help="loader workers (CUDA: CPUs, <= 10)")
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
    if METHODS[args.method] in ("top-k", "expert-choice"):  # router.py owns these rules
        check_routing(args.experts, args.topk, args.capacity_factor, args.eval_capacity_factor)
    if args.method in ("tgr", "teacher-route") and not args.teacher:
        raise TrainError(f"--method {args.method} needs --teacher (e.g. runs/micro-dense/...pt)")
    if args.method == "m2ot" and not args.teachers:
        raise TrainError("--method m2ot needs --teachers SRC [SRC ...] (dense checkpoints, ...)")
    if args.teachers and args.method not in ("m2ot", "dense", "softmoe"):
        raise TrainError(f"--teachers: the students are m2ot, dense and softmoe, not {args.method}")
    if min(args.tas_coef, args.switch_coef) < 0 or args.knn_every < 0:
        raise TrainError("--tas-coef, --switch-coef and --knn-every must be >= 0")
    if args.upcycle and args.finetune:
        raise TrainError("--upcycle and --finetune both start the weights: give one")
    for name in ("batch_size", "epochs", "experts", "print_freq", "probe_size", "accum_iter"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
    parse_aa(args.aa)  # one line for a policy data.py cannot build
    if not 0 <= args.reprob <= 1 or args.recount < 1:
        raise TrainError(f"--reprob {args.reprob} / --recount {args.recount}: need [0, 1] / >= 1")
    if not 0 < args.eval_crop_ratio <= 1:
        raise TrainError(f"--eval-crop-ratio {args.eval_crop_ratio}: give a ratio in (0, 1]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda but no GPU is visible; use --device cpu")


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


# ============================================================================ distributed
def init_distributed(args):
    """(rank, world size, device): torchrun is detected from the RANK environment variable."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(args.device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = args.device.startswith("cuda")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    # 30 min: the other ranks wait in a barrier while rank 0 writes a checkpoint (an E = 128
    # Base one is tens of GB); NCCL's 10-minute default could end the run there
    timeout = datetime.timedelta(minutes=30)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return rank, world, device


def wrap(model, args, world, device):
    """DDP, rebuilt when the set of trainable parameters changes (--compile compiles the
    whole step instead: `compute_losses`, see `train`)."""
    if world > 1:
        ids = [device] if device.type == "cuda" else None  # CPU (gloo): no device ids
        model = DistributedDataParallel(model, device_ids=ids)
    return model


# ============================================================================ the schedule
@dataclass
class Switch:
    """The distillation switch: has it happened, at which epoch, why; the adaptive streak."""

    done: bool = False
    epoch: int = 0
    reason: str = ""
    streak: int = 0


def distill_epochs(args):
    """Epochs 0 .. n-1 distil (stablemoe: learn the router): n = ceil(F · epochs), F from
    --distill-until (--stable-stage1); None for the adaptive rule."""
    fraction = args.stable_stage1 if args.method == "stablemoe" else args.distill_until
    if fraction == "adaptive":
        return None
    return math.ceil(round(fraction * args.epochs, 6))  # round: 0.3·10 is 3.0000…04


def describe_schedule(args):
    """The one line printed at start, e.g. "distilling epochs 0–149 of 300"."""
    n, what = distill_epochs(args), "distilling"
    if args.method == "stablemoe":  # stage 1 learns the router, stage 2 freezes it
        what = "router learning (frozen after)"
    if n is None:
        return f"{what} until the adaptive switch (--switch-consistency {args.switch_consistency})"
    return f"{what} epochs 0–{n - 1} of {args.epochs}" if n else f"{what}: no epoch"


def switch_due(args, switch, epoch, consistency):
    """(switch now?, why): the fixed fraction, or the adaptive consistency rule."""
    n = distill_epochs(args)
    if n is not None:
        if args.method == "stablemoe":
            return epoch + 1 >= n, f"--stable-stage1 {args.stable_stage1} of {args.epochs} epochs"
        return epoch + 1 >= n, f"--distill-until {args.distill_until} of {args.epochs} epochs"
    # adaptive: every MoE layer's adjacent-epoch consistency above the threshold, `patience` times
    switch.streak = switch.streak + 1 if min(consistency) >= args.switch_consistency else 0
    last = [round(c, 3) for c in consistency]
    why = f"adaptive: consistency_prev >= {args.switch_consistency} in every MoE layer"
    return switch.streak >= args.switch_patience, f"{why} for {switch.streak} epoch(s), last {last}"


def decide_switch(args, switch, epoch, consistency, world, device):
    """The one decision, taken on rank 0 and broadcast: every rank must take the same branch."""
    last_epoch = epoch + 1 == args.epochs  # nothing left to switch to
    if args.method not in ("tgr", "stablemoe") or switch.done or last_epoch:
        return False, ""
    due, why = switch_due(args, switch, epoch, consistency)
    if world > 1:
        flag = torch.tensor([float(due)], device=device)
        dist.broadcast(flag, 0)
        due = bool(flag.item())
    return due, why


def stable_stage2(model, args):
    """StableMoE stage 2 (TGR-MoE's baseline): the router is copied and frozen, and the task
    trains alone: no router noise (it would still move assignments) and no balance loss (it
    would still move the backbone features the frozen router reads)."""
    for i in model.moe_layers:
        model.blocks[i - 1].mlp.router.requires_grad_(False)
        model.blocks[i - 1].mlp.noise_std = 0.0  # σ = 0: the clean top-K of p chooses
    args.student_balance_coef = 0.0


def switch_off(args, model, optimizer, routers):
    """Perform the switch. tgr: returns the teacher routers' final weights (CPU, for eval.py
    --route teacher) and removes their optimizer group, found by its name, with its state;
    the caller then drops teacher and routers. stablemoe: stage 2 (`stable_stage2`)."""
    if args.method == "stablemoe":
        stable_stage2(model, args)
        return None
    group = next(g for g in optimizer.param_groups if g.get("name") == "teacher_router")
    for p in group["params"]:
        optimizer.state.pop(p, None)
    optimizer.param_groups.remove(group)
    return {k: v.cpu() for k, v in routers.state_dict().items()}


# ============================================================================ inputs and model
def read_inputs(args, out):
    """Open and check every input file before anything else runs (SPEC sec. 10).

    Returns (resume path, resume checkpoint, --finetune/--upcycle checkpoint, teacher, its
    `load_teacher` arguments, the --teachers): None ([]) where not asked for. The teacher is
    loaded (and so checked) even where the schedule will not run it, e.g. a resume after the
    switch: a bad --teacher never passes silently.
    """
    resume = args.resume
    if resume == "auto":
        resume = str(out / "checkpoint.pt") if (out / "checkpoint.pt").is_file() else ""
    ckpt = read_checkpoint(resume, "--resume") if resume else None
    pre = read_checkpoint(args.finetune, "--finetune") if args.finetune else None
    if args.upcycle:  # sparse upcycling: only a dense checkpoint's MLPs can start experts
        pre = read_checkpoint(args.upcycle, "--upcycle")
        if not isinstance(pre, dict) or (pre.get("args") or {}).get("method") != "dense":
            raise TrainError(f"--upcycle {args.upcycle}: not a train.py --method dense checkpoint")
    if pre is not None and args.method == "tgr" and not args.fresh_teacher_router:
        if not (isinstance(pre, dict) and pre.get("teacher_router")):  # see continued_router
            why = "has no teacher router to continue TGR with (tgr runs save one)"
            raise TrainError(f"--finetune {args.finetune} {why}; or --fresh-teacher-router")
    teacher = t_args = None
    if args.method in ("tgr", "teacher-route"):
        t_args = teacher_args_from_flags(args, args.moe_layers or MODELS[args.model]["moe_layers"])
        teacher = load_teacher(**t_args)
    options = dict(img_size=args.img_size, dtype=args.teacher_dtype, random_ok=args.teacher_random)
    teachers = [load_final_teacher(source, **options) for source in args.teachers]
    check_data_path(args)
    return resume, ckpt, pre, teacher, t_args, teachers


def build_student(args, num_classes):
    """The student ViT of --model/--method (`model.model_args` rebuilds it). A student of
    --teachers has no classifier (no labels: `model(images)` gives its CLS features) and its
    MoE layers hand back φ and their inputs for M²oT's TAS loss."""
    model = build_model(**model_args_from_flags(args, 0 if args.teachers else num_classes))
    keep_expert_outputs(model, on=bool(args.teachers))
    return model


def build_m2ot(args, model, teachers, device, world):
    """M²oT's training-only parts (`m2ot.M2oT`): heads, π, statistics; identical on every rank."""
    with_pi = args.method == "m2ot"
    m2ot = M2oT([t.to(device) for t in teachers], model.embed_dim, model.grid,
                len(model.moe_layers) if with_pi else 0, args.experts).to(device)  # fmt: skip
    if world > 1:  # rank 0's initial heads and π everywhere
        for p in m2ot.parameters():
            dist.broadcast(p.data, 0)
    return m2ot


def build_teacher(args, model, device, world, teacher=None):
    """The frozen teacher and one TeacherRouter per MoE layer (identical on every rank)."""
    if teacher is None:
        teacher = load_teacher(**teacher_args_from_flags(args, model.moe_layers))
    routers = build_teacher_routers(teacher, args.experts).to(device)
    if world > 1:  # rank 0's initial routers everywhere (DDP does the same for the student)
        for p in routers.parameters():
            dist.broadcast(p.data, 0)
    return teacher.to(device), routers


def load_pretrained(model, sd, path, probe):
    """--finetune: pre-trained weights in, head dropped if the classes differ.

    Returns the pre-trained model's probe routing (to log consistency against) or None.
    """
    pre_args, sd = sd.get("args") or {}, sd.get("model", sd)
    own = model.state_dict()
    other_head = lambda k, v: k.startswith("head.") and (k not in own or v.shape != own[k].shape)  # noqa: E731
    sd = {k: v for k, v in sd.items() if not other_head(k, v)}  # a new head, or none
    if pre_args.get("method") == "dense" and model.moe_layers:
        upcycle(model, sd)  # dense -> MoE: every expert starts as the dense MLP
        return None
    for key, value in sd.items():
        if key not in own or own[key].shape != value.shape:
            shape = tuple(own[key].shape) if key in own else "absent"
            raise TrainError(f"--finetune {path}: {key} is {tuple(value.shape)}, here {shape}")
    model.load_state_dict(sd, strict=False)
    return probe_assignments(model, probe) if model.moe_layers else None


def continued_router(args, ckpt, pretrained):
    """The teacher routers' starting state: the checkpoint's on --resume; on a tgr --finetune
    the pre-trained run's (TGR-MoE continues TGR while fine-tuning: the teacher router was
    trained together with the student's experts, so its expert numbering is theirs; a fresh
    one would pull the student toward a random permutation of its experts); else None."""
    if ckpt is not None:
        return ckpt["teacher_router"]
    if pretrained is not None and args.method == "tgr" and not args.fresh_teacher_router:
        return pretrained["teacher_router"]
    return None


def describe_recipe(args):
    """The effective recipe, printed once at start: what the run trains with, flags resolved."""
    batch = f"{args.batch_size}·world" + (f"·{args.accum_iter}" if args.accum_iter > 1 else "")
    routed = METHODS[args.method] in ("top-k", "expert-choice")
    text = (f"recipe: AdamW lr {args.base_lr:.2e} (= {args.lr} × {batch}/512), "
            f"wd {args.weight_decay}, warm-up {args.warmup_epochs} epochs, cosine to "
            f"{args.min_lr}; aa {args.aa}, reprob {args.reprob}, repeated-aug "
            f"{args.repeated_aug}, mixup {args.mixup}, cutmix {args.cutmix}, smoothing "
            f"{args.smoothing}, drop-path {args.drop_path}, ema "
            f"{args.model_ema_decay if args.model_ema else 'off'}, eval crop "
            f"{args.eval_crop_ratio}" + (f", capacity factor {args.capacity_factor} train / "
            f"{args.eval_capacity_factor} eval" if routed else ""))  # fmt: skip
    if args.teachers:  # no labels: MixUp/CutMix and smoothing have nothing to act on
        labels = f"mixup {args.mixup}, cutmix {args.cutmix}, smoothing {args.smoothing}, "
        text = text.replace(labels, "") + (f"; {len(args.teachers)} teachers, no labels, "
                                           f"λ_1 (tas) {args.tas_coef}, λ_2 (switch) "
                                           f"{args.switch_coef}")  # fmt: skip
    return text


def build_optimizer(model, routers, args, cuda, m2ot=None):
    """AdamW (DeiT): no weight decay on biases, norms, pos_embed and cls_token; the teacher
    routers, while they train, in a group named "teacher_router" (`switch_off` removes it);
    M²oT's heads and π follow the student's rules."""
    decay, no_decay = [], []
    named = [*model.named_parameters(), *(m2ot.named_parameters() if m2ot else [])]
    for name, p in named:
        flat = p.ndim <= 1 or name.endswith((".b1", ".b2")) or name in ("pos_embed", "cls_token")
        (no_decay if flat else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    if routers is not None:
        groups.append({"params": list(routers.parameters()), "name": "teacher_router"})
    fast = {"fused": True} if cuda else {"foreach": True}  # one kernel over all the experts
    return torch.optim.AdamW(groups, betas=tuple(args.opt_betas), eps=args.opt_eps,
                             weight_decay=args.weight_decay, **fast)  # fmt: skip


class ModelEma:
    """ema ← decay·ema + (1 − decay)·θ after every optimizer step (DeiT's timm ModelEma): a
    frozen copy of the model taken at the start, updated with one fused lerp, no host sync."""

    def __init__(self, model, decay):
        self.module, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model):
        pairs = zip([*self.module.parameters(), *self.module.buffers()],
                    [*model.parameters(), *model.buffers()])  # fmt: skip
        ema, new = zip(*[(e, n.detach()) for e, n in pairs if e.is_floating_point()])
        torch._foreach_lerp_(list(ema), list(new), 1.0 - self.decay)


def build_ema(model, args, ckpt):
    """--model-ema (DeiT): a `ModelEma` with its own validation line (val_top1_ema), saved as
    "model_ema" and resumed. None without the flag."""
    if not args.model_ema:
        return None
    ema = ModelEma(model, args.model_ema_decay)
    if ckpt is not None and ckpt.get("model_ema") is not None:
        load_weights(ema.module, ckpt["model_ema"], "--resume's model_ema")
    return ema


def lr_at(step, args, steps_per_epoch):
    """Linear warm-up from --warmup-lr, then cosine to --min-lr (per step)."""
    # lr(s) = warmup_lr + (base − warmup_lr)·s/W  for s < W, else
    # lr(s) = min_lr + ½(base − min_lr)(1 + cos(π (s − W)/(total − W)))
    warm, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    if step < warm:
        return args.warmup_lr + (args.base_lr - args.warmup_lr) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return args.min_lr + 0.5 * (args.base_lr - args.min_lr) * (1 + math.cos(math.pi * progress))


# ============================================================================ one step
def compute_losses(model, images, targets, args, teacher, routers, labels=None):
    """Forward the student (and, while distilling, the teacher); unweighted parts -> weighted sum.

    Returns (student loss, teacher-router loss or 0, {part: detached value}); with `labels`
    (the un-mixed classes, (B,)) also the batch's top-1 in % (TGR Fig. S2's training accuracy).
    A student of --teachers (`routers` is then the `m2ot.M2oT`) learns from them alone, Eq. 10.
    """
    if args.teachers:
        loss, parts = m2ot_losses(model, routers, images, args.tas_coef, args.switch_coef)
        return loss, 0.0, parts
    parts = {}
    # (B, N, E) per MoE layer: the trainable routers on the frozen (no_grad) teacher features
    t_logits = teacher_route(teacher, routers)(images) if teacher is not None else None
    route = t_logits if args.method == "teacher-route" else None
    logits, routings = model(images, route=route)  # (B, classes), one Routing per MoE layer
    loss = parts["task"] = F.cross_entropy(logits.float(), targets, label_smoothing=args.smoothing)
    if labels is not None:
        parts["top1"] = 100 * (logits.argmax(-1) == labels).float().mean()
    if args.student_balance_coef > 0 and METHODS[args.method] == "top-k":
        # V-MoE: L_aux = Σ_i λ·(L_imp + L_load), each per routing group and averaged over the
        # groups (as capacity is); in teacher-route the record's logits are R_t's
        parts["importance"] = sum(importance_loss(r.probs, r.num_groups) for r in routings)
        noisy = lambda r: r.noisy_logits if r.logit_noise_std else r.logits  # noqa: E731
        parts["load"] = sum(load_loss(r.logits, noisy(r), r.logit_noise_std, args.topk,
                                      r.num_groups) for r in routings)  # fmt: skip
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
        agree = [teacher_agreement(s, t) for s, t in pairs]  # tensors: no host sync
        parts["teacher_agreement"] = torch.stack(agree).mean()
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


def average_router_grads(routers, world):
    """The teacher routers are not inside the DDP-wrapped student, so DDP never averages their
    gradients: without this every rank's router would follow its own shard of the data and the
    ranks would distil toward different targets."""
    for p in routers.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world


def check_finite(bad_step, bad_value, epoch, out):
    """Stop at a non-finite loss, naming the first step that had one (read once per progress
    line: the check waits for the device there, not in every step)."""
    if (step := int(bad_step)) >= 0:
        kept = f"the last good checkpoint is {out / 'checkpoint.pt'}"
        raise TrainError(f"loss is {float(bad_value)} at step {step} (epoch {epoch}); {kept}")


def train_one_epoch(model, teacher, routers, optimizer, loader, mix, args, epoch, step, out,
                    world, ema=None, losses_fn=compute_losses):  # fmt: skip
    """One pass over the training data (DeiT's engine.py); returns (step, sums, images, lr).

    sums: every loss part summed over the epoch's batches on the device (this rank's), for
    `epoch_means`. Nothing in a step waits for the device: sums stay tensors, and the first
    non-finite loss is noted on the device and checked at each progress line.
    --accum-iter N: one optimizer step per N batches, each loss divided by N, DDP's all-reduce
    only on the N-th (`no_sync` before it); a last incomplete group of batches is left out.
    losses_fn: `compute_losses` or its torch.compile'd self (--compile).
    """
    device, accum = next(model.parameters()).device, args.accum_iter
    batches = len(loader) // accum * accum
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    sums, seen, t0 = {}, 0, time.time()
    bad_step = torch.full((), -1, device=device)  # the first step whose loss was nan/inf
    bad_value = torch.zeros((), device=device)
    for it, (images, targets) in enumerate(loader):
        if it == batches:
            break
        if it % accum == 0:  # the first batch of an optimizer step
            lr = lr_at(step, args, batches // accum)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
        images, targets, labels = device_batch(images, targets, device, args, mix)
        last = (it + 1) % accum == 0  # the batch whose backward all-reduces
        with model.no_sync() if world > 1 and not last else contextlib.nullcontext():
            with torch.autocast(**amp):  # bf16 on GPU only
                loss, teacher_loss, parts = losses_fn(model, images, targets, args, teacher,
                                                      routers, labels)  # fmt: skip
            total = loss + teacher_loss
            (total / accum).backward()
        new_bad = ~torch.isfinite(total.detach()) & (bad_step < 0)
        bad_step = torch.where(new_bad, step, bad_step)
        bad_value = torch.where(new_bad, total.detach().float(), bad_value)
        if last:
            if routers is not None and world > 1:
                average_router_grads(routers, world)
            if args.clip_grad:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
        seen += images.shape[0] * world
        for k, v in {"loss": total.detach().float(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        if (it + 1) % args.print_freq == 0 or it + 1 == batches:
            check_finite(bad_step, bad_value, epoch, out)
            elapsed = time.time() - t0
            eta = datetime.timedelta(seconds=round(elapsed * (batches / (it + 1) - 1)))
            shown = " ".join(f"{k} {float(v) / (it + 1):.4f}" for k, v in sums.items())
            print0(f"epoch {epoch} [{it + 1}/{batches}] {shown} lr {lr:.2e} "
                   f"{seen / elapsed:.0f} img/s eta {eta}")  # fmt: skip
    return step, sums, seen, lr


# ============================================================================ checkpoints
def save_checkpoint(path, state):
    """torch.save to PATH.tmp, then rename: a kill mid-save leaves the last good file intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)


def rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def load_weights(model, state_dict, what):
    """load_state_dict, strict, with the last line of torch's message as the one error line."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        msg = str(err).splitlines()[-1].strip()
        raise TrainError(f"{what} does not fit this model: {msg}") from None


def restore(ckpt, resume, optimizer, out, rank, world):
    """--resume: optimizer, RNG, log.jsonl cut back; returns (start epoch, step, last probe)."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as err:  # another --method (e.g. one with teacher routers)
        raise TrainError(f"--resume {resume}: optimizer state does not fit ({err})") from None
    set_rng_state(ckpt["rng"][rank] if len(ckpt["rng"]) == world else ckpt["rng"][0])
    if rank == 0 and (out / "log.jsonl").is_file():  # drop epochs the checkpoint lacks
        lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if json.loads(ln)["epoch"] <= ckpt["epoch"]]
        (out / "log.jsonl").write_text("".join(kept))
    print0(f"resumed from {resume} at epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
    return ckpt["epoch"] + 1, ckpt["step"], ckpt["probe_prev"]


def save_epoch(out, state, record, assign, probe_history):
    """Rank 0, end of an epoch: log line, checkpoint, and the consistency-with-final file."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    save_checkpoint(out / "checkpoint.pt", state)
    if assign:  # consistency with the final routing (TGR Fig. 1), rewritten each epoch
        probe_history[record["epoch"]] = [a.to(torch.uint8) for a in assign]  # E <= 256
        save_checkpoint(out / "probe_routing.pt", probe_history)
        last = probe_history[record["epoch"]]
        final = [[routing_consistency(a, b) for a, b in zip(h, last)]
                 for h in probe_history.values()]  # fmt: skip
        (out / "consistency_final.json").write_text(json.dumps(final))


# ============================================================================ epoch metrics
def epoch_means(sums, world, steps, device):
    """Every logged loss part averaged over the epoch's steps and all ranks."""
    means = torch.stack([torch.as_tensor(v, device=device) for v in sums.values()])
    if world > 1:
        dist.all_reduce(means)
    return dict(zip(sums, (means / (world * steps)).tolist()))


def validate(args, model, val_loader, device, route, ema=None, knn_loader=None):
    """The epoch's validation: accuracy and routing metrics (teacher-route: also the student's
    own route; --model-ema: also the averaged weights' top-1; with `knn_loader`, the train
    split seen without augmentation: the k-NN top-1 of the CLS embedding, M²oT's measure)."""
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    by_teacher = args.method == "teacher-route"  # the teacher router chooses the experts
    routed = dict(teacher=route, route_by_teacher=by_teacher)
    run = lambda m, **kw: evaluate(m, val_loader, device, amp_dtype=amp_dtype, **kw)  # noqa: E731
    val = run(model, **routed)
    record = {"val_top1": val.get("top1"), "val_top5": val.get("top5"),
              "moe_layers": list(model.moe_layers)}  # fmt: skip
    record.update({k: val.get(k) for k in ("routing_entropy", "utilisation", "dropped_frac")})
    record["val_teacher_agreement"] = val.get("teacher_agreement")  # while a teacher runs
    if by_teacher:  # the upper bound vs routing by the student's own router
        record["val_top1_student_route"] = run(model)["top1"]
    if ema is not None:  # routed as the model is (tgr: no teacher agreement needed here)
        record["val_top1_ema"] = run(ema.module, **(routed if by_teacher else {})).get("top1")
    if knn_loader is not None:  # weighted k-NN, k = 20, T = 0.07 (DINO's protocol)
        record["val_knn_top1"] = knn_eval(
            model, knn_loader, val_loader, device, amp_dtype=amp_dtype
        )
    return record


# ============================================================================ main
def resolve_defaults(args):
    """The defaults that depend on --method or --teachers, written into args (and so saved)."""
    distil = bool(args.teachers)  # M²oT's family: students of several teachers, no labels
    if args.experts is None:  # M²oT: E = 8, K = 2 (its sec. 5); else V-MoE's 16, top-1
        args.experts = 8 if distil else 16
    if args.topk is None:
        args.topk = 2 if distil else 1
    if distil and args.moe_layers is None:  # M²oT: every second block (1-indexed 2, 4, ...)
        args.moe_layers = list(range(2, MODELS[args.model]["depth"] + 1, 2))
    if distil and args.expert_hidden is None and args.method != "dense":
        # H/K: K active experts hold the dense MLP's weights (M²oT Table 4)
        args.expert_hidden = int(MODELS[args.model]["embed_dim"] * 4) // args.topk
    if args.model_ema is None:  # DeiT keeps an EMA; a feature student has no top-1 to show it
        args.model_ema = not distil
    if args.eval_capacity_factor is None:  # V-MoE evaluates top-K with room; EC routes as trained
        top_k = METHODS[args.method] == "top-k"
        args.eval_capacity_factor = VMOE_EVAL_CF if top_k else args.capacity_factor
    if args.student_balance_coef is None:  # TGR (sec. 3): the student has no balance loss
        args.student_balance_coef = 0.0 if args.method == "tgr" else 0.005


def main(args):
    """Train; returns {"model": the unwrapped student, "routers", "m2ot", "history", "args"}."""
    resolve_defaults(args)
    check_args(args)
    args.output_dir = args.output_dir or f"runs/{args.model}-{args.method}"
    rank, world, device = init_distributed(args)
    if args.num_workers is None:  # the CPUs per process, at most DeiT's 10; 0 on a CPU run
        args.num_workers = default_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: the fastest patchify conv
    if device.type == "cpu":
        keep_freed_memory()  # big per-step tensors reuse memory instead of fresh pages
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device):
    out, cuda = Path(args.output_dir), device.type == "cuda"
    resume, ckpt, pretrained, teacher, t_args, teachers = read_inputs(args, out)  # checked first
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))

    # ------------------------------------------------------------------ data
    train_set, num_classes = build_dataset(True, args)
    val_set, _ = build_dataset(False, args)
    pin = args.pin_mem and cuda
    train_loader = build_loader(train_set, True, args, rank=rank, world=world, pin_memory=pin)
    val_loader = build_loader(val_set, False, args, rank=rank, world=world, pin_memory=pin)
    steps_per_epoch = len(train_loader) // args.accum_iter  # optimizer steps
    if steps_per_epoch == 0:
        batch = f"{args.batch_size} x --accum-iter {args.accum_iter}"
        raise TrainError(f"{len(train_set)} training images < one step of {batch}")
    mix = None if teachers else build_mixup(args, num_classes)  # MixUp/CutMix, not w/o labels
    knn_loader = None  # M²oT's students: the k-NN bank is the train split, not augmented
    if teachers:
        bank = build_dataset(True, args, augment=False)[0]
        knn_loader = build_loader(bank, False, args, rank=rank, world=world, pin_memory=pin)
    # (P, 3, S, S) fixed validation images whose routing we follow over epochs
    probe = probe_images(val_set, args.probe_size).to(device)

    # ------------------------------------------------------------------ model and teacher
    model = build_student(args, num_classes).to(device)
    ref_assign = None  # --finetune: the pre-trained model's routing of the probe set
    if ckpt is not None:
        load_weights(model, ckpt["model"], f"--resume {resume}")
        ref_assign = ckpt["ref_assign"]
    elif pretrained is not None:
        ref_assign = load_pretrained(model, pretrained, args.finetune or args.upcycle, probe)
    m2ot = build_m2ot(args, model, teachers, device, world) if teachers else None
    if m2ot is not None and ckpt is not None:  # heads, π and the targets' statistics
        load_weights(m2ot, ckpt["m2ot"], f"--resume {resume}'s M²oT heads")
    default = Switch(done=distill_epochs(args) == 0, reason="a fraction of 0 epochs")
    switch = Switch(**ckpt["switch"]) if ckpt else default  # done? when? why?
    if args.method == "stablemoe" and switch.done:
        stable_stage2(model, args)
    if args.method in ("tgr", "stablemoe"):
        print0(describe_schedule(args))
    routers = route = None
    # after the switch the last teacher router is kept (CPU, frozen) for eval.py --route teacher
    router_state = ckpt.get("teacher_router") if ckpt else None
    if args.method == "teacher-route" or (args.method == "tgr" and not switch.done):
        teacher, routers = build_teacher(args, model, device, world, teacher)
        if (state := continued_router(args, ckpt, pretrained)) is not None:
            load_weights(routers, state, f"the teacher router of {resume or args.finetune}")
        route = teacher_route(teacher, routers)
    else:
        teacher = None  # checked above; not needed by the rest of this run
    model_without_ddp = model  # checkpoints hold these weights: no module./_orig_mod. prefixes
    model = wrap(model_without_ddp, args, world, device)

    # ------------------------------------------------------------------ optimizer
    # DeiT's linear scaling rule, on the batch of one optimizer step (DeiT-III: × accum-iter)
    args.base_lr = args.lr * args.batch_size * world * args.accum_iter / 512
    optimizer = build_optimizer(model_without_ddp, routers, args, cuda, m2ot)
    ema = build_ema(model_without_ddp, args, ckpt)  # None unless --model-ema
    start_epoch, step, prev_assign, probe_history = 0, 0, None, {}
    if ckpt is not None:
        start_epoch, step, prev_assign = restore(ckpt, resume, optimizer, out, rank, world)
        if (out / "probe_routing.pt").is_file():  # every epoch's probe routing, for the final plot
            history = torch.load(out / "probe_routing.pt", weights_only=True)
            probe_history = {e: a for e, a in history.items() if e < start_epoch}
    elif rank == 0:
        (out / "log.jsonl").unlink(missing_ok=True)
    if prev_assign is None:  # routing at initialisation: epoch 0's "previous epoch"
        prev_assign = probe_assignments(model_without_ddp, probe)
    del ckpt, pretrained
    params = sum(p.numel() for p in model_without_ddp.parameters()) / 1e6
    extra = sum(p.numel() for p in routers.parameters()) / 1e6 if routers is not None else 0
    router = f" + {extra:.3f}M teacher router" if extra else ""  # TGR Table S2's "+ router"
    if m2ot is not None:  # training only, like the teacher router
        heads = sum(p.numel() for p in m2ot.parameters()) / 1e6
        router = f" + {heads:.3f}M heads and π for {len(teachers)} teachers"
    print0(f"{args.model} {args.method}: {params:.2f}M params{router}, {len(train_set)} images, "
           f"{world} process(es) on {device}, {steps_per_epoch} steps/epoch")  # fmt: skip
    print0(describe_recipe(args))
    # --compile: the whole step's forward (student, losses, teacher and routers while they
    # run) and its backward, as one program; the switch (teacher gone) and StableMoE's freeze
    # change what it sees, so it recompiles once there, never per step
    losses_fn = torch.compile(compute_losses) if args.compile else compute_losses

    # ------------------------------------------------------------------ loop
    history = []
    for epoch in range(start_epoch, args.epochs):
        set_epoch(train_loader, epoch)  # the permutation and the workers' seeds
        distilling, t0 = teacher is not None or m2ot is not None, time.time()
        trainable = m2ot if m2ot is not None else routers  # outside DDP: averaged by hand
        step, sums, seen, lr = train_one_epoch(model, teacher, trainable, optimizer, train_loader,
                                               mix, args, epoch, step, out, world, ema,
                                               losses_fn)  # fmt: skip
        train_time = time.time() - t0
        means = epoch_means(sums, world, steps_per_epoch * args.accum_iter, device)

        # -------------------------------------------------------------- metrics and switch
        t1 = time.time()
        knn_due = args.knn_every and (epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs
        val = validate(args, model_without_ddp, val_loader, device, route, ema,
                       knn_loader if knn_due else None)  # fmt: skip
        assign = probe_assignments(model_without_ddp, probe)
        consistency = [routing_consistency(a, b) for a, b in zip(assign, prev_assign)]
        record = {"epoch": epoch, "step": step, "lr": lr, "distilling": distilling,
                  **{f"train_{k}": v for k, v in means.items()},  # train_loss and its parts
                  **val, "consistency_prev": consistency,
                  "images_per_s": seen / train_time, "epoch_time_s": train_time}  # fmt: skip
        if ref_assign is not None:  # the same tokens, before and after fine-tuning
            pairs = zip(assign, ref_assign)
            record["consistency_pretrained"] = [routing_consistency(a, b) for a, b in pairs]
        prev_assign = assign
        if args.method == "stablemoe":  # during this epoch
            record["router_frozen"] = switch.done
        due, why = decide_switch(args, switch, epoch, consistency, world, device)
        if due:
            switch = Switch(done=True, epoch=epoch + 1, reason=why, streak=switch.streak)
            record["switch"] = {"after_epoch": epoch, "reason": why}
            print0(f"switch after epoch {epoch}: {why}")
            router_state = switch_off(args, model_without_ddp, optimizer, routers) or router_state
            if args.method == "tgr":  # free the teacher: the rest of the run is V-MoE
                teacher = routers = route = None
                if cuda:
                    torch.cuda.empty_cache()
            else:  # stablemoe: the frozen router changes the trainable set, so DDP is rebuilt
                model = wrap(model_without_ddp, args, world, device)
        record["eval_time_s"] = time.time() - t1  # validation and probe: not training time
        history.append(record)
        entropy = [round(e, 3) for e in val.get("routing_entropy") or []]
        score = val.get("val_knn_top1") if teachers else val["val_top1"]
        name = "val k-NN top-1" if teachers else "val top-1"
        print0(f"epoch {epoch}: {name} {score or float('nan'):.2f}  routing entropy {entropy}  "
               f"consistency {[round(c, 3) for c in consistency]}")  # fmt: skip

        # -------------------------------------------------------------- checkpoint
        rngs = [rng_state()] * world
        if world > 1:  # every rank's RNG, so that a resumed DDP run continues exactly
            dist.all_gather_object(rngs, rng_state())
        if rank == 0:
            state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": {"step": step, "base_lr": args.base_lr}, "epoch": epoch,
                     "scaler": None, "args": vars(args),  # DeiT's layout, then ours:
                     "teacher_router": router_state if routers is None else routers.state_dict(),
                     "step": step, "rng": rngs, "switch": asdict(switch), "probe_prev": prev_assign,
                     "ref_assign": ref_assign, "model_args": model_without_ddp.model_args,
                     "model_ema": ema.module.state_dict() if ema is not None else None,
                     "teacher_args": t_args,
                     "m2ot": m2ot.state_dict() if m2ot is not None else None}  # fmt: skip
            save_epoch(out, state, record, assign, probe_history)
        if world > 1:  # the others wait for the write here, not in the next step's all-reduce
            dist.barrier()
    return {"model": model_without_ddp, "routers": routers, "m2ot": m2ot, "history": history,
            "args": args}  # fmt: skip


def cli(argv=None):
    run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
