"""Plain-PyTorch DDP trainer: the DeiT recipe, every routing method, teacher-guided routing.

The idea
--------
One script, read top to bottom (args -> distributed init -> data -> model and teacher ->
optimizer -> loop -> checkpoint), runs both a CPU demo on generated images and a 300-epoch
`torchrun --nproc_per_node=8 train.py --model small --method tgr --teacher deit3.pth --data
imagenet --data-path /data/imagenet`; only flags differ. TGR (TGR-MoE sec. 3):

    L_student = L_task + λ_distill/|S| Σ_{i∈S} KL(sg(p_t^(i)) ‖ p^(i))        λ_distill = 5.0
    L_teacher = Σ_{i∈S} λ_load·L_imp(p_t^(i)) + λ_ent·L_ent(p_t^(i))           0.005 each

p is the student router's clean softmax, p_t = softmax(R_t(h_t)) the teacher router's on the
frozen teacher's layer-aligned features h_t. Both go into one backward: the KL detaches p_t
and L_teacher reaches only R_t. After `--distill-until` (fraction of the epochs; 0.5, the
paper's best "first half", or `adaptive`) teacher and routers are deleted and never run
again, so the rest of the run costs what V-MoE costs (schedule.py: at each epoch's end
`decide_switch` decides, `switch_off` performs it).
Other methods: dense; vmoe (importance + load, 0.005 each, summed over layers as V-MoE);
expert-choice; softmoe; stablemoe (V-MoE, then router frozen, noise and balance loss off
after `--stable-stage1`); zloss (+1e-3 z-loss); teacher-route (sec. 5.3: R_t routes, trained
by L_task + λ_load Σ(importance + load); the student router, never used to choose, learns
from λ_distill Σ_i KL, eq. S2).

M²oT (`--teachers SRC ...`): `--method m2ot`, and the dense and Soft MoE students of the
same teachers, learn without labels, L = L_dist + λ_1 L_tas + λ_2 L_switch (m2ot.py). This
file meets it through one object, `m2ot_hook.M2oTHook` (`hook` below): read with the inputs,
it builds the student, starts its heads and π, gives the batch's loss in place of
`compute_losses` and measures the k-NN top-1; nothing else here knows of it.

Legend: λ_distill `--distill-coef`, λ_load/λ_ent `--teacher-load-coef/--teacher-ent-coef`,
S `--moe-layers`, R_t `TeacherRouter`, h_t `teacher(images)[i]`, g `routing.weights`.
Letters: B images, N tokens, D width, E experts, S image side, T = B·N tokens.

Decisions where the papers are silent
-------------------------------------
Each is written where it is taken: in the helper's docstring (the step's in `compute_losses`
and `train_one_epoch`, the inputs' in `read_inputs`, DDP's in `average_grads`), in
schedule.py, checkpoint.py and flags.py. Two shape the whole file: the step hands nothing to
Python (losses and metrics stay on the device until a progress line reads them; a nan/inf
loss stops the run there, naming the first bad step), and `--compile` (CUDA's default) compiles
the step's whole forward (`compute_losses`) with its backward, again at the switch only.
Besides log.jsonl, consistency_final.json holds every epoch's per-layer consistency with the
last epoch's routing (from probe_routing.pt), the paper's consistency-with-final curve; the
log also carries the soft and by-margin consistency, token entropy and top-2 gap of the watch
set (eval.routing_stability), and `--watch-every N` saves the watch set's routing after every
N-th step (probe_steps.pt, StableMoE's last-fluctuation curve).
Controls beyond the paper (experiments/tgr_claims.py): `--student-entropy-coef` (an entropy
loss on the student's own router, no teacher), `--teacher-reinit` (a random-weight teacher),
`--teacher-balance group`, and `--method lossfree` (balance by a selection bias, moe.py).
"""

import argparse
import contextlib
import copy
import ctypes
import datetime
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import data
import flags
import schedule
from augment import build_mixup
from errors import UsageError, run_cli
from eval import (
    evaluate,
    routing_consistency,
    routing_stability,
    teacher_agreement,
    watch_assignments,
    watch_routing,
)
from flags import get_args_parser
from losses import entropy_loss, importance_loss, load_loss, routing_kl, z_loss
from m2ot_hook import M2oTHook
from moe import METHODS, MODELS, build_model
from report import describe_params, epoch_line, progress_line
from teacher import (
    build_teacher_routers,
    load_teacher,
    teacher_objective,
    teacher_route,
)
from vit import amp_dtype_for, autocast


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


# ============================================================================ distributed
def init_distributed(args):
    """(rank, world size, device): torchrun is detected from the RANK environment variable."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(args.device)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
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


def broadcast_from_rank0(module, world):
    """Rank 0's initial weights everywhere, for the trainable parts outside the DDP-wrapped
    student (DDP does the same for the student when it wraps it)."""
    if world > 1:
        for p in module.parameters():
            dist.broadcast(p.data, 0)
    return module


# ============================================================================ inputs and model
@dataclass
class Guides:
    """Who teaches the student: TGR's frozen teacher and its trainable routers (tgr and
    teacher-route, until the switch); none for the other methods. `extra`: what else trains
    beside the student by its rules (a hook's parts: M²oT's heads and π). The routers and
    `extra` train outside the student's DDP wrapper."""

    teacher: nn.Module | None = None
    routers: nn.ModuleList | None = None
    extra: nn.Module | None = None

    def route_logits(self):
        """images -> [(B, N, E) teacher-router logits per MoE layer], or None without one."""
        return teacher_route(self.teacher, self.routers) if self.routers is not None else None

    def trainable(self):
        return [m for m in (self.routers, self.extra) if m is not None]


@dataclass
class Inputs:
    """Every input file of a run, read and checked before anything else (`read_inputs`);
    None where not asked for. The weights are dropped (set to None) once they are loaded."""

    resume: str  # the --resume checkpoint's path, "" for a new run
    ckpt: dict | None  # its contents
    pretrained: dict | None  # the --finetune or --upcycle checkpoint
    teacher: nn.Module | None  # TGR's frozen teacher (tgr, teacher-route)
    teacher_args: dict | None  # its `load_teacher` arguments, saved in every checkpoint
    hook: M2oTHook | None  # M²oT's side of the run, its teachers loaded (--teachers)


def read_inputs(args, out):
    """Open and check every input file before anything else runs (errors.py): no data set
    is built, no file written and no step run before a bad one is one error line.

    Returns an `Inputs` record. The teacher is loaded (and so checked) even where the
    schedule will not run it, e.g. a resume after the switch: a bad --teacher never passes
    silently.
    """
    resume, ckpt, pre = checkpoint.read_starts(args, out)
    teacher = t_args = None
    if args.method in ("tgr", "teacher-route"):
        moe_layers = args.moe_layers or MODELS[args.model]["moe_layers"]
        t_args = flags.teacher_args_from_flags(args, moe_layers)
        teacher = load_teacher(**t_args)
    hook = M2oTHook.read(args)  # None without --teachers
    data.check_data_path(args)
    return Inputs(resume, ckpt, pre, teacher, t_args, hook)


def build_student(args, num_classes, hook=None):
    """The student ViT of --model/--method (`model.model_args` rebuilds it); a hook's own
    (M²oT's: no classifier, MoE layers that hand back φ)."""
    if hook is not None:
        return hook.build_student()
    return build_model(**checkpoint.model_args_from_flags(args, num_classes))


def build_teacher(args, model, device, world, teacher=None):
    """The frozen teacher and one TeacherRouter per MoE layer (identical on every rank)."""
    if teacher is None:
        teacher = load_teacher(**flags.teacher_args_from_flags(args, model.moe_layers))
    routers = build_teacher_routers(teacher, args.experts).to(device)
    return teacher.to(device), broadcast_from_rank0(routers, world)


def start_student(model, args, resume, ckpt, pretrained, watch):
    """The student's starting weights: --resume's, --finetune's or --upcycle's (checkpoint.py),
    or its initialisation. Returns the routing of the watch set to log consistency against
    after fine-tuning (`consistency_pretrained`): the pre-trained model's, None if none."""
    if ckpt is not None:
        checkpoint.load_weights(model, ckpt["model"], f"--resume {resume}")
        return ckpt["ref_assign"]
    if pretrained is not None:
        as_is = checkpoint.load_pretrained(model, pretrained, args.finetune or args.upcycle)
        return watch_assignments(model, watch) if as_is and model.moe_layers else None
    return None


def build_optimizer(model, routers, args, cuda, extra=None):
    """AdamW (DeiT): no weight decay on biases, norms, pos_embed and cls_token; the teacher
    routers, while they train, in a group named "teacher_router" (`switch_off` removes it);
    `extra` (a hook's parts, M²oT's heads and π) follows the student's rules."""
    decay = []
    no_decay = []
    named = [*model.named_parameters(), *(extra.named_parameters() if extra else [])]
    for name, p in named:
        flat = p.ndim <= 1 or name.endswith((".b1", ".b2")) or name in ("pos_embed", "cls_token")
        (no_decay if flat else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    if routers is not None:
        groups.append({"params": list(routers.parameters()), "name": "teacher_router"})
    fast = {"fused": True} if cuda else {"foreach": True}  # one kernel over all the experts
    adam = dict(betas=tuple(args.opt_betas), eps=args.opt_eps, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, **adam, **fast)


class ModelEma:
    """ema ← decay·ema + (1 − decay)·θ after every optimizer step (DeiT's timm ModelEma): a
    frozen copy of the model taken at the start, updated with one fused lerp, no host sync."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model):
        ema = [*self.module.parameters(), *self.module.buffers()]
        new = [*model.parameters(), *model.buffers()]
        ema, new = zip(*[(e, n.detach()) for e, n in zip(ema, new) if e.is_floating_point()])
        torch._foreach_lerp_(list(ema), list(new), 1.0 - self.decay)


def build_ema(model, args, ckpt):
    """--model-ema (DeiT): a `ModelEma` with its own validation line (val_top1_ema), saved as
    "model_ema" and resumed. None without the flag."""
    if not args.model_ema:
        return None
    ema = ModelEma(model, args.model_ema_decay)
    if ckpt is not None and ckpt.get("model_ema") is not None:
        checkpoint.load_weights(ema.module, ckpt["model_ema"], "--resume's model_ema")
    return ema


# ============================================================================ one step
def compute_losses(model, images, targets, args, guides, labels=None):
    """Forward the student (and, while distilling, the teacher); unweighted parts -> weighted sum.

    Returns (student loss, teacher-router loss or 0, {part: detached value}); with `labels`
    (the un-mixed classes, (B,)) also the batch's top-1 in % (TGR Fig. S2's training accuracy).
    `--router-grad distill-only` (tgr, while distilling): a hook zeroes the gradient of every
    layer's combine weights g, the task loss's only path into the router, so the router learns
    from its own layer's KL alone while it still routes. It stays inside autograd, so DDP
    averages it like any gradient (a separate autograd.grad would need an all-reduce).
    `--distill-tokens cls` (the summary's "targets the CLS token"): the KL of the CLS token alone.
    """
    parts = {}
    # (B, N, E) per MoE layer: the trainable routers on the frozen (no_grad) teacher features
    route_logits = guides.route_logits()  # None without a teacher router
    t_logits = route_logits(images) if route_logits is not None else None
    route = t_logits if args.method == "teacher-route" else None
    logits, routings = model(images, route=route)  # (B, classes), one Routing per MoE layer
    loss = parts["task"] = F.cross_entropy(logits.float(), targets, label_smoothing=args.smoothing)
    if labels is not None:
        parts["top1"] = 100 * (logits.argmax(-1) == labels).float().mean()
    if routings and routings[0].kept is not None:  # at the training cf: what capacity drops
        parts["dropped"] = torch.stack([r.dropped() for r in routings]).mean()
    if args.student_balance_coef > 0 and METHODS[args.method] == "top-k":
        # V-MoE: L_aux = Σ_i λ·(L_imp + L_load), each per routing group and averaged over the
        # groups (as capacity is); in teacher-route the record's logits are R_t's
        parts["importance"] = sum(importance_loss(r.probs, r.num_groups) for r in routings)
        noisy = lambda r: r.noisy_logits if r.logit_noise_std else r.logits
        load = (
            load_loss(r.logits, noisy(r), r.logit_noise_std, args.topk, r.num_groups)
            for r in routings
        )
        parts["load"] = sum(load)
        loss = loss + args.student_balance_coef * (parts["importance"] + parts["load"])
    if args.method == "zloss":
        parts["zloss"] = sum(z_loss(r.logits) for r in routings)  # L_z = mean_t logsumexp²
        loss = loss + args.zloss_coef * parts["zloss"]
    if args.student_entropy_coef > 0 and METHODS[args.method] == "top-k":
        # L_ent = Σ_i −mean_t Σ_e p log p on the student's own p: the confidence the teacher
        # router is trained for, asked of the student directly, without a teacher
        probs = [r.student_logits.float().softmax(dim=-1) for r in routings]  # (T, E) each
        parts["student_ent"] = sum(entropy_loss(p) for p in probs)
        loss = loss + args.student_entropy_coef * parts["student_ent"]
    teacher_loss = 0.0
    if t_logits is not None:
        # L_distill = KL(sg(p_t) ‖ p) = Σ_e p_t,e (log p_t,e − log p_e); sg = .detach(): the KL
        # pulls the student toward the teacher router and never the teacher router toward it
        n = 1 if args.distill_tokens == "cls" else None  # (B, N, E) pairs; cls: (B, 1, E)
        pairs = [(r.student_logits.view_as(t)[:, :n], t[:, :n]) for r, t in zip(routings, t_logits)]
        parts["distill"] = sum(routing_kl(s, t.detach(), from_logits=True) for s, t in pairs)
        # how often the student's own top-1 already is the teacher router's, averaged over layers
        agree = [teacher_agreement(s, t) for s, t in pairs]  # tensors: no host sync
        parts["teacher_agreement"] = torch.stack(agree).mean()
        scale = 1 if args.method == "teacher-route" else len(routings)  # eq. S2 sums; TGR averages
        loss = loss + args.distill_coef / scale * parts["distill"]
        if args.method == "tgr":  # the teacher router sees no task loss, only balance + entropy
            coefs = args.teacher_load_coef, args.teacher_ent_coef
            # --teacher-balance group: L_imp per routing group of images, as the student's
            groups = routings[0].num_groups if args.teacher_balance == "group" else 1
            teacher_loss, t_parts = teacher_objective(t_logits, *coefs, groups=groups)
            parts.update(teacher_importance=t_parts["importance"], teacher_ent=t_parts["ent"])
        if args.router_grad == "distill-only" and args.method == "tgr":
            for r in routings:  # g's gradient is the task loss's only way into the router
                r.weights.register_hook(torch.zeros_like)
    return loss, teacher_loss, {k: v.detach().float() for k, v in parts.items()}


def average_grads(module, world):
    """The teacher routers (and a hook's parts, `Guides.extra`) are not inside the DDP-wrapped
    student, so DDP never averages their gradients: without this every rank's router would
    follow its own shard of the data and the ranks would distil toward different targets."""
    for p in module.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world


def check_finite(bad_step, bad_value, epoch, out):
    """Stop at a non-finite loss, naming the first step that had one (read once per progress
    line: the check waits for the device there, not in every step)."""
    if (step := int(bad_step)) >= 0:
        kept = f"the last good checkpoint is {out / 'checkpoint.pt'}"
        raise UsageError(f"loss is {float(bad_value)} at step {step} (epoch {epoch}); {kept}")


@dataclass
class StepWatch:
    """--watch-every N: the watch set's top-1 experts after every N-th optimizer step (rank 0),
    for StableMoE's last-fluctuation curve (`eval.last_fluctuation`); train.py saves `history`
    as probe_steps.pt at each epoch's end, beside the checkpoint, and a resume reads it back.
    The check routes the watch set in eval mode and waits for the device: off by default."""

    every: int
    images: torch.Tensor
    history: dict  # optimizer step -> [(T,) uint8 top-1 expert per MoE layer]

    def after_step(self, model, step):
        if self.every and step % self.every == 0:
            assign = watch_assignments(getattr(model, "module", model), self.images)
            self.history[step] = [a.to(torch.uint8) for a in assign]  # E <= 256


def load_step_watch(args, out, watch, step, rank):
    """The run's `StepWatch` (None without --watch-every, or off rank 0): a resumed run keeps
    the checks of the steps it had already trained, up to the checkpoint's step."""
    if not args.watch_every or rank != 0:
        return None
    history = {}
    if step > 0 and (out / "probe_steps.pt").exists():
        saved = torch.load(out / "probe_steps.pt", weights_only=True)
        history = {s: a for s, a in saved.items() if s <= step}
    return StepWatch(args.watch_every, watch, history)


@dataclass
class Learner:
    """What a training step works with, besides the batch (`train_one_epoch`)."""

    model: nn.Module  # the student, DDP-wrapped under torchrun
    guides: Guides  # who teaches it (`Guides()`: nobody)
    optimizer: torch.optim.Optimizer
    losses_fn: object = compute_losses  # `compute_losses`, a hook's, or either compiled
    ema: ModelEma | None = None  # --model-ema
    step_watch: StepWatch | None = None  # --watch-every


def train_one_epoch(learner, loader, mix, args, epoch, step):
    """One pass over the training data (DeiT's engine.py); returns (step, sums, images, lr).

    learner: the `Learner` (model, guides, optimizer, loss function, EMA, step watch).
    sums: every loss part summed over the epoch's batches on the device (this rank's), for
    `epoch_means`. Nothing in a step waits for the device: sums stay tensors, and the first
    non-finite loss is noted on the device and checked at each progress line.
    --accum-iter N: one optimizer step per N batches, each loss divided by N, DDP's all-reduce
    only on the N-th (`no_sync` before it); a last incomplete group of batches is left out."""
    model = learner.model
    guides = learner.guides
    optimizer = learner.optimizer
    device = next(model.parameters()).device
    accum = args.accum_iter
    world = dist.get_world_size() if dist.is_initialized() else 1
    batches = len(loader) // accum * accum
    amp_dtype = amp_dtype_for(device)  # bf16 on GPU only
    model.train()
    sums = {}  # every logged loss part, summed over the epoch's steps (on the device)
    seen = 0  # images trained on, all ranks
    t0 = time.time()
    last_line = t0
    bad_step = torch.full((), -1, device=device)  # the first step whose loss was nan/inf
    bad_value = torch.zeros((), device=device)
    for it, (images, targets) in enumerate(loader):
        if it == batches:
            break
        if it % accum == 0:  # the first batch of an optimizer step
            lr = schedule.lr_at(step, args, batches // accum)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
        images, targets, labels = data.device_batch(images, targets, device, args, mix, (epoch, it))
        last = (it + 1) % accum == 0  # the batch whose backward all-reduces
        with model.no_sync() if world > 1 and not last else contextlib.nullcontext():
            with autocast(device, amp_dtype):
                loss, teacher_loss, parts = learner.losses_fn(
                    model, images, targets, args, guides, labels
                )
            total = loss + teacher_loss
            (total / accum).backward()
        new_bad = ~torch.isfinite(total.detach()) & (bad_step < 0)
        bad_step = torch.where(new_bad, step, bad_step)
        bad_value = torch.where(new_bad, total.detach().float(), bad_value)
        if last:
            for outside in guides.trainable() if world > 1 else ():
                average_grads(outside, world)
            if args.clip_grad:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            optimizer.step()
            if learner.ema is not None:
                learner.ema.update(model)
            step += 1
            if learner.step_watch is not None:
                learner.step_watch.after_step(model, step)
        seen += images.shape[0] * world
        for k, v in {"loss": total.detach().float(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        # a line every --print-freq steps and, in one process, at least every 30 s (a CPU run);
        # under DDP only by step count: every rank must check finiteness at the same step
        slow = world == 1 and time.time() - last_line > 30
        if (it + 1) % args.print_freq == 0 or it + 1 == batches or slow:
            check_finite(bad_step, bad_value, epoch, Path(args.output_dir))
            print0(progress_line(epoch, it + 1, batches, sums, lr, seen, time.time() - t0))
            last_line = time.time()
    return step, sums, seen, lr


# ============================================================================ epoch's end
def save_epoch(out, state, record, assign, watch_history, step_watch=None):
    """Rank 0, end of an epoch: log line, checkpoint, the consistency-with-final file and
    (--watch-every) the watch set's routing after every N-th step."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    checkpoint.save_checkpoint(out / "checkpoint.pt", state)
    if step_watch is not None:
        checkpoint.save_checkpoint(out / "probe_steps.pt", step_watch.history)
    if assign:  # consistency with the final routing (TGR Fig. 1), rewritten each epoch
        watch_history[record["epoch"]] = [a.to(torch.uint8) for a in assign]  # E <= 256
        checkpoint.save_checkpoint(out / "probe_routing.pt", watch_history)
        last = watch_history[record["epoch"]]
        final = [
            [routing_consistency(a, b) for a, b in zip(h, last)] for h in watch_history.values()
        ]
        (out / "consistency_final.json").write_text(json.dumps(final))


def epoch_means(sums, world, steps, device):
    """Every logged loss part averaged over the epoch's steps and all ranks."""
    means = torch.stack([torch.as_tensor(v, device=device) for v in sums.values()])
    if world > 1:
        dist.all_reduce(means)
    return dict(zip(sums, (means / (world * steps)).tolist()))


def validate(args, model, val_loader, guides, ema=None):
    """The epoch's validation: accuracy and routing metrics (teacher-route: also the student's
    own route; --model-ema: also the averaged weights' top-1)."""
    device = next(model.parameters()).device
    amp_dtype = amp_dtype_for(device)
    by_teacher = args.method == "teacher-route"  # the teacher router chooses the experts
    routed = dict(route_logits=guides.route_logits(), route_by_teacher=by_teacher)
    run = lambda m, **kw: evaluate(m, val_loader, device, amp_dtype=amp_dtype, **kw)
    val = run(model, **routed)
    record = {"val_top1": val.get("top1"), "val_top5": val.get("top5")}
    record["moe_layers"] = list(model.moe_layers)
    record.update({k: val.get(k) for k in ("routing_entropy", "utilisation", "dropped_frac")})
    record["val_teacher_agreement"] = val.get("teacher_agreement")  # while a teacher runs
    if by_teacher:  # the upper bound vs routing by the student's own router
        record["val_top1_student_route"] = run(model)["top1"]
    if ema is not None:  # routed as the model is (tgr: no teacher agreement needed here)
        record["val_top1_ema"] = run(ema.module, **(routed if by_teacher else {})).get("top1")
    return record


# ============================================================================ main
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


def main(args):
    """Train; returns {"model": the unwrapped student, "routers", "m2ot" (the hook's parts),
    "history", "args"}."""
    flags.resolve_defaults(args)
    flags.check_args(args)
    args.output_dir = args.output_dir or f"runs/{args.model}-{args.method}"
    rank, world, device = init_distributed(args)
    if args.num_workers is None:  # the CPUs per process, at most DeiT's 10; 0 on a CPU run
        args.num_workers = data.default_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: the fastest patchify conv
    if device.type == "cpu":
        keep_freed_memory()  # big per-step tensors reuse memory instead of fresh pages
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class RunData:
    """The data of a run (`build_data`)."""

    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    num_classes: int
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    mix: object | None  # MixUp/CutMix on the device batch (augment.build_mixup), or None


def build_data(args, rank, world, cuda, labels=True):
    """The data of a run, a `RunData`. `labels=False` (a student of --teachers): no
    MixUp/CutMix."""
    train_set, num_classes = data.build_dataset(True, args)
    val_set, _ = data.build_dataset(False, args)
    pin = args.pin_mem and cuda
    loader = lambda dataset, is_train: data.build_loader(
        dataset, is_train, args, rank=rank, world=world, pin_memory=pin
    )
    train_loader = loader(train_set, True)
    val_loader = loader(val_set, False)
    if len(train_loader) // args.accum_iter == 0:  # not one optimizer step
        batch = f"{args.batch_size} x --accum-iter {args.accum_iter}"
        raise UsageError(f"{len(train_set)} training images < one step of {batch}")
    mix = build_mixup(args, num_classes) if labels else None
    return RunData(train_set, val_set, num_classes, train_loader, val_loader, mix)


def train(args, rank, world, device):
    out = Path(args.output_dir)
    cuda = device.type == "cuda"
    inputs = read_inputs(args, out)  # every input file, checked first
    resume = inputs.resume
    ckpt = inputs.ckpt
    hook = inputs.hook  # M²oT's side of the run (--teachers), None for every other run
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    flags_given = argparse.Namespace(**vars(args))  # args.json: the flags, before derived values

    # ------------------------------------------------------------------ data
    run_data = build_data(args, rank, world, cuda, labels=hook is None)
    train_loader = run_data.train_loader
    steps_per_epoch = len(train_loader) // args.accum_iter  # optimizer steps
    watch = data.watch_images(run_data.val_set, args.watch_size).to(device)  # (P, 3, S, S)

    # ------------------------------------------------------------------ model and teachers
    model = build_student(args, run_data.num_classes, hook).to(device)
    # --finetune: the pre-trained model's routing of the watch set, to compare the new with
    ref_assign = start_student(model, args, resume, ckpt, inputs.pretrained, watch)
    guides = Guides()
    if hook is not None:  # its heads and π train beside the student, as the routers do
        guides.extra = broadcast_from_rank0(
            hook.start(model, device, rank, world, ckpt, resume), world
        )
    switch = schedule.Switch(**ckpt["switch"]) if ckpt else schedule.initial_switch(args)
    if args.method == "stablemoe" and switch.done:
        schedule.stable_stage2(model, args)
    # after the switch the last teacher router is kept (CPU, frozen) for eval.py --route teacher
    router_state = ckpt.get("teacher_router") if ckpt else None
    if args.method == "teacher-route" or (args.method == "tgr" and not switch.done):
        guides.teacher, guides.routers = build_teacher(args, model, device, world, inputs.teacher)
        if (state := checkpoint.continued_router(args, ckpt, inputs.pretrained)) is not None:
            where = f"the teacher router of {resume or args.finetune}"
            checkpoint.load_weights(guides.routers, state, where)
    model_without_ddp = model  # checkpoints hold these weights: no module./_orig_mod. prefixes
    model = wrap(model_without_ddp, args, world, device)

    # ------------------------------------------------------------------ optimizer
    # DeiT's linear scaling rule, on the batch of one optimizer step (DeiT-III: × accum-iter)
    args.base_lr = args.lr * args.batch_size * world * args.accum_iter / 512
    optimizer = build_optimizer(model_without_ddp, guides.routers, args, cuda, guides.extra)
    ema = build_ema(model_without_ddp, args, ckpt)  # None unless --model-ema
    # where the run stands: epoch 0 of a fresh run (ckpt None), else the checkpoint's
    progress = checkpoint.restore(ckpt, resume, optimizer, out, rank, world)
    if ckpt is not None:
        print0(f"resumed from {resume} at epoch {progress.epoch}, step {progress.step}")
    prev_assign = progress.watch_prev
    if prev_assign is None:  # routing at initialisation: epoch 0's "previous epoch"
        prev_assign = watch_assignments(model_without_ddp, watch)
    # the watch set's distributions at the last check, for the soft and by-margin consistency
    # (a checkpoint from before they were logged has none: that epoch logs them without)
    if ckpt is None:
        prev_watched = watch_routing(model_without_ddp, watch)
    else:
        prev_watched = ckpt.get("probe_prev_routing")
    step_watch = load_step_watch(args, out, watch, progress.step, rank)
    # the weights live in the model now: the checkpoints' copies are freed
    del ckpt
    inputs.ckpt = None
    inputs.pretrained = None
    inputs.teacher = None

    # ------------------------------------------------------------------ the run folder
    # every input has been read and checked: only now is anything written into the folder
    if rank == 0:
        checkpoint.start_run_folder(out, flags_given, progress.epoch)
    params = describe_params(model_without_ddp, guides.routers)
    if hook is not None:
        params += hook.describe()
    where = f"{len(run_data.train_set)} images, {world} process(es) on {device}"
    print0(f"{args.model} {args.method}: {params}, {where}, {steps_per_epoch} steps/epoch")
    print0(flags.describe_recipe(args))
    if args.method in ("tgr", "stablemoe"):
        print0(schedule.describe_schedule(args, switch))

    # the loss of a batch: TGR's and its baselines' (`compute_losses`), or the hook's; with
    # --compile, the step as one program, recompiled at the switch only (the docstring)
    losses_fn = compute_losses if hook is None else hook.losses
    if args.compile:
        losses_fn = torch.compile(losses_fn)
    learner = Learner(model, guides, optimizer, losses_fn, ema, step_watch)

    # ------------------------------------------------------------------ loop
    step = progress.step
    history = []
    for epoch in range(progress.epoch, args.epochs):
        data.set_epoch(train_loader, epoch)  # the permutation and the workers' seeds
        distilling = bool(guides.trainable())
        t0 = time.time()
        step, sums, seen, lr = train_one_epoch(
            learner, train_loader, run_data.mix, args, epoch, step
        )
        train_time = time.time() - t0
        means = epoch_means(sums, world, steps_per_epoch * args.accum_iter, device)

        # -------------------------------------------------------------- metrics and switch
        t1 = time.time()
        val = validate(args, model_without_ddp, run_data.val_loader, guides, ema)
        if hook is not None:  # the k-NN top-1, at the epochs --knn-every asks for
            val.update(hook.measure(model_without_ddp, run_data.val_loader, epoch))
        watched = watch_routing(model_without_ddp, watch)  # per layer: top-1, p, top-2 logit gap
        assign = [top1 for top1, _, _ in watched]
        consistency = [routing_consistency(a, b) for a, b in zip(assign, prev_assign)]
        record = {"epoch": epoch, "step": step, "lr": lr, "distilling": distilling}
        record.update({f"train_{k}": v for k, v in means.items()})  # train_loss and its parts
        record.update(val, consistency_prev=consistency, images_per_s=seen / train_time)
        if model_without_ddp.moe_layers:  # soft and by-margin consistency, confidence
            record.update(routing_stability(watched, prev_watched))
        record["epoch_time_s"] = train_time
        if ref_assign is not None:  # the same tokens, before and after fine-tuning
            pairs = zip(assign, ref_assign)
            record["consistency_pretrained"] = [routing_consistency(a, b) for a, b in pairs]
        prev_assign = assign
        prev_watched = watched
        if args.method == "stablemoe":  # during this epoch
            record["router_frozen"] = switch.done
        due, why = schedule.decide_switch(args, switch, epoch, consistency, world, device)
        if due:  # the distillation switch (schedule.py): the rest of the run is V-MoE
            record["switch"] = {"after_epoch": epoch, "reason": why}
            print0(f"switch after epoch {epoch}: {why}")
            switch, state = schedule.switch_off(
                args, switch, epoch, why, model_without_ddp, optimizer, guides.routers
            )
            router_state = state or router_state
            if args.method == "tgr":  # free the teacher and its routers
                guides = Guides()
                learner.guides = guides
                torch.cuda.empty_cache()  # (a no-op without CUDA)
            else:  # stablemoe: the frozen router changes the trainable set, so DDP is rebuilt
                model = wrap(model_without_ddp, args, world, device)
                learner.model = model
        record["eval_time_s"] = time.time() - t1  # validation and the watch set: not training time
        history.append(record)
        print0(epoch_line(epoch, record, consistency))

        # -------------------------------------------------------------- checkpoint
        rngs = checkpoint.rng_states(world)  # every rank's: a resumed DDP run continues exactly
        if rank == 0:
            routers = guides.routers.state_dict() if guides.routers is not None else router_state
            ours = dict(rng=rngs, switch=switch, model_ema=ema, m2ot=guides.extra)
            ours.update(probe_prev=prev_assign, ref_assign=ref_assign, teacher_router=routers)
            ours.update(probe_prev_routing=prev_watched)  # (top-1, p, gap) per layer: exact resume
            state = checkpoint.training_state(
                model_without_ddp,
                optimizer,
                args,
                epoch,
                step,
                teacher_args=inputs.teacher_args,
                **ours,
            )
            save_epoch(out, state, record, assign, progress.watch_history, step_watch)
        if world > 1:  # the others wait for the write here, not in the next step's all-reduce
            dist.barrier()
    result = dict(model=model_without_ddp, routers=guides.routers, m2ot=guides.extra)
    return {**result, "history": history, "args": args}


def cli(argv=None):
    """The command line: parse, train (a user mistake is one line, exit status 2)."""
    return run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
