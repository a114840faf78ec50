"""The half-schedule switch: distil the routing early, then train as plain V-MoE.

The idea
--------
TGR-MoE's teacher helps where a sparse router is weakest: at the start, before the experts
differ, when the assignment of a fixed token flickers from step to step. Once the routing has
settled the teacher has nothing left to give, and running it costs time and memory. So the
paper distils for a first part of training only (its sec. 4.4):

    distil epochs 0 .. n−1,  n = ceil(F · epochs)     F = --distill-until
    F = 1.0   standard TGR-MoE (77.81% on ImageNet-1K)
    F = 0.5   first-half distillation, the paper's best (78.13%) and the default

and then *switches*: the teacher and its routers are deleted, their optimizer group removed,
and the rest of the run costs exactly what V-MoE costs (`switch_off`). The switch happens
at an epoch's end; `decide_switch` takes the decision on rank 0 and broadcasts it, because
every rank must leave the teacher behind at the same step.

Beyond the paper, `--distill-until adaptive` switches when the student's routing has settled
by the paper's own measure: every MoE layer's adjacent-epoch consistency (eval.py) at least
`--switch-consistency` (0.8, TGR's plateau in the paper) for `--switch-patience` epochs.

StableMoE (the paper's baseline, `--method stablemoe`) has the same two stages without a
teacher: the router learns during the first `--stable-stage1` of the epochs, then it is
frozen (`stable_stage2`).

Legend: F `--distill-until` (or `--stable-stage1`), n `distill_epochs(args)`, the switch's
state `Switch` (saved in every checkpoint: a resumed run knows whether it still distils).

Decisions where the papers are silent
-------------------------------------
* Fixed schedule: distil the first ceil(F·epochs) epochs (at least one whenever F > 0),
  printed at start (`describe_schedule`). F = 0 never builds the teacher.
* Adaptive: after each epoch a streak grows if every MoE layer's adjacent-epoch consistency
  is >= the threshold (else it resets); at the patience it switches. Epoch 0 compares with
  the routing at initialisation. The log records when and why (`switch` in log.jsonl).
* No switch after the last epoch: there is nothing left to train without the teacher.
* The teacher routers' last weights are kept (CPU, frozen) in the checkpoints after the
  switch, for eval.py --route teacher and the teacher agreement.
* StableMoE's stage 2 turns off the router noise (it would still move assignments) and the
  balance loss (it would still move the backbone features the frozen router reads); the
  frozen router changes the trainable set, so train.py rebuilds DDP there.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- the switch
@dataclass
class Switch:
    """The distillation switch: has it happened, at which epoch (the first without the
    teacher), why; and the adaptive rule's streak of settled epochs."""

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


def initial_switch(args):
    """The switch of a fresh run: already done when the schedule has no distilling epoch."""
    if distill_epochs(args) == 0:
        return Switch(done=True, epoch=0, reason="a fraction of 0 epochs")
    return Switch()


def describe_schedule(args, switch):
    """The line printed at start, e.g. "distilling epochs 0–149 of 300"; a resumed run after
    the switch says when and why it happened."""
    n = distill_epochs(args)
    what = "distilling"
    if args.method == "stablemoe":  # stage 1 learns the router, stage 2 freezes it
        what = "router learning (frozen after)"
    if n == 0:
        return f"{what}: no epoch"
    if switch.done:
        return f"{what}: over, switched before epoch {switch.epoch} ({switch.reason})"
    if n is None:
        return f"{what} until the adaptive switch (--switch-consistency {args.switch_consistency})"
    return f"{what} epochs 0–{n - 1} of {args.epochs}"


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


def switch_off(args, switch, epoch, why, model, optimizer, routers):
    """Perform the switch after `epoch`; returns (the new `Switch`, the teacher routers' final
    weights or None). tgr: the weights (CPU, for eval.py --route teacher) are kept and the
    routers' optimizer group, found by its name, is removed with its state; the caller then
    drops teacher and routers. stablemoe: stage 2 (`stable_stage2`)."""
    switch = Switch(done=True, epoch=epoch + 1, reason=why, streak=switch.streak)
    if args.method == "stablemoe":
        stable_stage2(model, args)
        return switch, None
    group = next(g for g in optimizer.param_groups if g.get("name") == "teacher_router")
    for p in group["params"]:
        optimizer.state.pop(p, None)
    optimizer.param_groups.remove(group)
    return switch, {k: v.cpu() for k, v in routers.state_dict().items()}


# ----------------------------------------------------------------------------- the learning rate
def lr_at(step, args, steps_per_epoch):
    """Linear warm-up from --warmup-lr, then cosine to --min-lr (per step)."""
    # lr(s) = warmup_lr + (base − warmup_lr)·s/W  for s < W, else
    # lr(s) = min_lr + ½(base − min_lr)(1 + cos(π (s − W)/(total − W)))
    warm = args.warmup_epochs * steps_per_epoch  # W, in steps
    total = args.epochs * steps_per_epoch
    if step < warm:
        return args.warmup_lr + (args.base_lr - args.warmup_lr) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return args.min_lr + 0.5 * (args.base_lr - args.min_lr) * (1 + math.cos(math.pi * progress))
