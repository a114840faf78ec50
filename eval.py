"""Accuracy and routing analytics: how well a model classifies, and how it routes.

The idea
--------
A sparse MoE can reach the same top-1 with very different routing: experts that share the
tokens evenly or a few that take everything, a token that keeps its expert for the whole run
or one that changes expert every epoch. TGR-MoE's claim is about the second kind of number,
so every one of them is measured here, from the `Routing` records the model returns (never by
re-running a router). Each metric is a plain function with its formula:

    utilisation        u_e = (1/T) Σ_t 1[argmax_e' p_{t,e'} = e]          (clean p, top-1)
    routing entropy    Ĥ   = −Σ_e u_e log u_e / log E        ∈ [0, 1]     (TGR Table S2)
    dropped fraction   d   = (1/T) Σ_t 1[no expert processed token t]
    consistency(A, B)  c   = (1/T) Σ_t 1[top1_A(t) = top1_B(t)]          (on a fixed watch set)
    agreement          a   = (1/T) Σ_t 1[argmax p_t = argmax p_t^teacher]

and, for M²oT's label-free students, what the frozen features know (probe.py:
the k-NN top-1 of the CLS token, linear segmentation and depth probes of the patch tokens)
and the expert→teacher preference (M²oT's own measure: `m2ot.teacher_preferences`), and with
`--specialisation` whether the experts themselves split the teachers (m2ot_measure.py).

`evaluate` runs a model over a loader and returns top-1/top-5 and the per-layer metrics;
train.py logs them every epoch, with the adjacent-epoch consistency of `watch_assignments`.

Hard consistency counts argmax flips, so a router that never decided (two experts a hair
apart, a flip on the slightest change) looks unstable only because it is unconfident. Four
measures hold confidence apart (`routing_stability`, logged by train.py each epoch; the study
in experiments/tgr_claims.py reads them):

    soft consistency   1 − (1/T) Σ_t ½ Σ_e |p_A(t, e) − p_B(t, e)|       (1 − total variation)
    by margin          the hard consistency within bins of the earlier check's top-2 logit gap
    token entropy      (1/T) Σ_t H(p_t) / log E     (confidence; the entropy above is balance)
    last fluctuation   F(i) = share of tokens whose expert still changes after check i
                       (StableMoE, Dai et al. 2022; from train.py --watch-every's checks)

The command line reads a train.py checkpoint:

    python eval.py --checkpoint RUN/checkpoint.pt [--route student|teacher] [--compare B.pt]
                   [--data ... --data-path ...] [--knn] [--seg-probe] [--depth-probe]
                   [--specialisation] [--json] [--plots DIR]

`--route teacher` lets the run's teacher router choose the experts (TGR sec. 5.3, the upper
bound that needs the teacher at inference); `--compare` measures consistency on the watch
set train.py follows (`data.watch_indices`); `--knn` adds the k-NN top-1, `--seg-probe` the
mIoU and `--depth-probe` the RMSE of linear probes trained on the frozen model (on the
synthetic data's part masks and depth, or `--data ade20k` / `nyud`: then the probes alone;
`--backbone FILE` probes another dense ViT, a teacher, on the run's data instead of its model);
an M²oT checkpoint with π adds the expert→teacher preference, and `--specialisation` the
expert × teacher matrices read from the experts (it loads the run's teachers); the table and
`--plots` are report's.

Letters: T tokens (B·N), E experts, K choices per token.

Decisions where the papers are silent
-------------------------------------
* Utilisation and consistency read the top-1 of the *clean* p, so router noise (training only)
  and capacity dropping do not move them: they describe what the router prefers.
* The dropped fraction counts tokens that no expert processed (the residual alone carried
  them). With K = 1 that is the fraction of dropped assignments; with expert choice it is the
  fraction of tokens no expert picked; Soft MoE drops nothing.
* Under DDP every rank evaluates its shard and the counts are summed across ranks, so the
  numbers are those of the whole validation set (DistributedSampler pads with a few repeats);
  the k-NN gathers every rank's embeddings, so every rank computes the same k-NN.
* The CLI rebuilds model and teacher from the checkpoint's `model_args` / `teacher_args`
  (checkpoint.load_run), never importing train.py, with the run's eval capacity factor
  unless `--eval-capacity-factor` is given. Teacher agreement is measured whenever the
  checkpoint has a teacher router (TGR keeps its last one after the switch); if the teacher
  file is gone, the rest is still measured and a note says so (`--route teacher` then fails).
* The k-NN bank is the train split read with the *evaluation* transform (no augmentation),
  the queries the validation split; both are the CLS token after the final norm, L2-normalised.
* A model without a classifier (`head` = nn.Identity, `num_classes=0`: M²oT) has no top-1 or
  top-5 and no class check against the data; `--knn` measures it.
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from checkpoint import load_run
from data import DATASETS, build_dataset, normalize, watch_images
from errors import ArgumentParser, UsageError, run_cli
from flags import add_flag, teacher_args_from_flags
from m2ot import (
    M2oT,
    load_mix_routers,
    plot_teacher_preference,
    preference_report,
    preference_table,
)
from m2ot_measure import specialisation, specialisation_table
from m2ot_teachers import load_final_teacher
from pretrained import CLASSIFIER, build_vit, vit_config, vit_weights
from probe import TASKS, check_probes, dense_probes, knn_eval
from report import fmt_table, patch_map, require_matplotlib, write_plots
from router import check_routing
from teacher import build_teacher_routers, load_teacher, teacher_route
from vit import amp_dtype_for, autocast, evaluating

DENSE_ONLY = tuple(d for d in TASKS if d not in DATASETS)  # ade20k, nyud: no classes


# ----------------------------------------------------------------------------- metrics
def top1_experts(routing):
    """argmax_e p_{t,e} of the clean router probabilities: (T,) long.

    With a selection bias b (`--method lossfree`) the router's choice is argmax_e (p + b)."""
    if routing.selection_bias is not None:
        return (routing.probs + routing.selection_bias).argmax(dim=-1)  # (T,)
    return routing.probs.argmax(dim=-1)  # (T,)


def expert_utilisation(top1, num_experts):
    # u_e = (1/T) Σ_t 1[top1(t) = e]
    counts = torch.bincount(top1.reshape(-1), minlength=num_experts).float()  # (E,)
    return counts / counts.sum().clamp(min=1)


def normalised_entropy(utilisation):
    # Ĥ = −Σ_e u_e log u_e / log E: 1 = every expert equally used, 0 = one expert takes all
    u = utilisation.float()
    return float(-torch.special.xlogy(u, u).sum() / math.log(u.numel()))


def dropped_fraction(routing):
    # d = (1/T) Σ_t 1[no kept assignment for token t]; records without `kept` drop nothing
    return float(routing.dropped())


def routing_consistency(top1_a, top1_b):
    # c = (1/T) Σ_t 1[top1_A(t) = top1_B(t)]: the same tokens routed by two model states
    return float((top1_a == top1_b).float().mean())


# ----------------------------------------------------------------------------- stability, read
# so that an unconfident router cannot look unstable only because it is unconfident: a token
# whose two best experts are a hair apart flips its top-1 on the slightest change (and, while
# training, on the router noise σ/E), so the hard consistency above mixes "the routing moved"
# with "the routing never decided". These split the two.
MARGIN_BINS = (0.1, 0.5, 2.0)  # edges of the top-2 logit-gap bins (V-MoE's noise σ/E: 0.0625-0.125)


def top2_gap(logits):
    # m_t = logit of the best expert − logit of the second best   (0: undecided)
    best_two = logits.float().topk(2, dim=-1).values  # (T, 2)
    return best_two[:, 0] - best_two[:, 1]  # (T,)


def gap_scores(routing):
    """The scores whose top-2 gap measures a router's confidence: its logits, or, for a record
    without logits (Soft MoE's, whose p is each expert's share of a token's output), log p,
    which differs from softmax logits by a per-token constant and so has the same gaps."""
    if routing.logits is not None:
        return routing.logits  # (T, E)
    return routing.probs.float().clamp_min(1e-12).log()  # (T, E)


def soft_consistency(p_a, p_b):
    # c_soft = 1 − (1/T) Σ_t TV(p_A(t), p_B(t)),   TV = ½ Σ_e |p_A(t, e) − p_B(t, e)|
    # 1 when every token keeps its whole distribution; a near-uniform router that stays
    # near-uniform scores near 1 even where its argmax flips
    return float(1.0 - 0.5 * (p_a.float() - p_b.float()).abs().sum(dim=-1).mean())


def consistency_by_margin(top1_a, top1_b, gap_a, edges=MARGIN_BINS):
    """The hard consistency within bins of the *earlier* check's top-2 gap: [[c, share], ...],
    one pair per bin (edges split [0, ∞) into len(edges) + 1 bins; c is None for an empty bin).
    """
    # c_b = (1/|T_b|) Σ_{t∈T_b} 1[top1_A(t) = top1_B(t)],  T_b = {t : m_A(t) in bin b}
    bins = torch.bucketize(gap_a, torch.tensor(edges, dtype=gap_a.dtype))  # (T,) bin of each
    out = []
    for b in range(len(edges) + 1):
        in_bin = bins == b  # (T,)
        n = int(in_bin.sum())
        same = float((top1_a[in_bin] == top1_b[in_bin]).float().mean()) if n else None
        out.append([same, n / max(1, gap_a.numel())])
    return out


def token_entropy(p):
    # H_tok = (1/T) Σ_t −Σ_e p_{t,e} log p_{t,e} / log E    ∈ [0, 1]: 1 = every token undecided
    # (the routing entropy above is of the *utilisation*: balance, not confidence)
    p = p.float()
    return float(-torch.special.xlogy(p, p).sum(dim=-1).mean() / math.log(p.shape[-1]))


def last_fluctuation(assignments):
    """StableMoE's last-fluctuation curve (Dai et al. 2022, Fig. 1): for each check i of a list
    of (T,) top-1 assignments taken in order, the share of tokens whose expert still changes
    at some later check. 0 at the last check; a router that has settled by check i has 0 there.
    """
    # F(i) = (1/T) Σ_t 1[∃ j > i: top1_j(t) ≠ top1_{j−1}(t)]
    a = torch.stack([x.long() for x in assignments])  # (checks, T)
    changed = a[1:] != a[:-1]  # (checks − 1, T): True where check j+1 differs from check j
    # index of each token's last change (j+1), or 0 if it never changed
    where = torch.arange(1, a.shape[0]).unsqueeze(-1) * changed  # (checks − 1, T)
    last = where.max(dim=0).values if changed.numel() else torch.zeros(a.shape[1])  # (T,)
    return [float((last > i).float().mean()) for i in range(a.shape[0])]


def routing_stability(now, before):
    """The epoch's stability metrics for train.py's log, per MoE layer, from two `watch_routing`
    passes over the same watch set (`before` None: only the metrics of `now`)."""
    record = {
        "probe_token_entropy": [token_entropy(p) for _, p, _ in now],
        "probe_gap_median": [float(gap.median()) for _, _, gap in now],
    }
    if before is not None:
        pairs = list(zip(now, before))
        record["consistency_soft_prev"] = [soft_consistency(n[1], b[1]) for n, b in pairs]
        record["consistency_by_margin_prev"] = [
            consistency_by_margin(b[0], n[0], b[2]) for n, b in pairs
        ]
    return record


def teacher_agreement(student_logits, teacher_logits):
    # a = (1/T) Σ_t 1[argmax p_t = argmax p_t^teacher]  (softmax keeps the argmax of the logits)
    s = student_logits.reshape(-1, student_logits.shape[-1]).argmax(-1)  # (T,)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).argmax(-1)  # (T,)
    return (s == t).float().mean()  # a 0-dim tensor: the training step logs it without a sync


# ----------------------------------------------------------------------------- model passes
@torch.no_grad()
def watch_assignments(model, images, route_logits=None, batch_size=128):
    """Top-1 experts (clean p) of every token of `images`, one (T,) tensor per MoE layer.

    route_logits: optional callable images -> list of (B, N, E) routing logits, one per MoE
    layer, that choose the experts instead (teacher-route mode; `teacher.teacher_route`).
    """
    per_layer = []
    with evaluating(model):
        for chunk in images.split(batch_size):
            _, routings = model(chunk, route=route_logits(chunk) if route_logits else None)
            per_layer.append([top1_experts(r).cpu() for r in routings])
    return [torch.cat(layer) for layer in zip(*per_layer)]  # per layer: (T,)


@torch.no_grad()
def watch_routing(model, images, batch_size=128):
    """Per MoE layer: (top-1 experts (T,), clean p (T, E), top-2 logit gap (T,)), on the CPU:
    what `routing_stability` compares between two checks."""
    per_layer = []
    with evaluating(model):
        for chunk in images.split(batch_size):
            _, routings = model(chunk)
            rows = [(top1_experts(r), r.probs.float(), top2_gap(gap_scores(r))) for r in routings]
            per_layer.append([tuple(x.cpu() for x in row) for row in rows])
    return [tuple(torch.cat(parts) for parts in zip(*layer)) for layer in zip(*per_layer)]


@torch.no_grad()
def evaluate(model, loader, device, *, route_logits=None, route_by_teacher=False, amp_dtype=None):
    """Top-1/top-5 accuracy and per-MoE-layer utilisation, entropy, dropped fraction, agreement.

    route_logits: optional callable images -> list of (B, N, E) teacher-router logits, one per
    MoE layer (`teacher.teacher_route`): the per-layer teacher agreement is measured, and with
    `route_by_teacher` they choose the experts (teacher-route mode, TGR sec. 5.3). amp_dtype:
    autocast dtype on CUDA (bf16). Returns a dict of floats and per-layer lists.
    A model without a classifier (`head` = nn.Identity: M²oT's label-free students) gets no
    top-1/top-5, only the routing metrics (`knn_eval` measures its embedding).
    """
    classifier = not isinstance(getattr(model, "head", None), nn.Identity)
    correct1, correct5, seen = torch.zeros(3, dtype=torch.float64, device=device).unbind()
    counts = dropped = tokens = agreed = None  # (layers, E), (layers,) ×3
    with evaluating(model):
        for images, targets in loader:
            images = normalize(images.to(device, non_blocking=True))  # uint8 -> float (B, 3, S, S)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                t_logits = route_logits(images) if route_logits else None  # list of (B, N, E)
                logits, routings = model(images, route=t_logits if route_by_teacher else None)
            if classifier:
                top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
                hit = top == targets.unsqueeze(1)  # (B, 5)
                correct1 = correct1 + hit[:, 0].sum()
                correct5 = correct5 + hit.any(dim=1).sum()
            seen = seen + targets.numel()
            if routings and counts is None:
                counts = torch.zeros(len(routings), routings[0].num_experts, device=device).double()
                dropped, tokens, agreed = torch.zeros(3, len(routings), device=device).double()
            for i, r in enumerate(routings):
                T = r.probs.shape[0]  # this batch's tokens; counts: tokens per expert
                counts[i] += expert_utilisation(top1_experts(r), counts.shape[1]) * T
                dropped[i] += r.dropped() * T  # a tensor: no host sync per batch
                tokens[i] += T
                if t_logits is not None:  # the student's own router vs the teacher router
                    own = r.student_logits if r.student_logits is not None else r.logits
                    agreed[i] += teacher_agreement(own, t_logits[i]) * T
    stats = [correct1, correct5, seen] + ([counts, dropped, tokens, agreed] if routings else [])
    if dist.is_available() and dist.is_initialized():
        for t in stats:
            dist.all_reduce(t)  # sum over ranks: every rank saw its own shard
    out = {"top1": float(100 * correct1 / seen)} if classifier else {}
    if classifier and logits.shape[-1] >= 5:
        out["top5"] = float(100 * correct5 / seen)
    if counts is not None:
        util = counts / tokens.unsqueeze(1)  # (layers, E) u_e over the whole validation set
        out["utilisation"] = [[round(float(u), 4) for u in row] for row in util]
        out["routing_entropy"] = [normalised_entropy(row) for row in util]
        out["dropped_frac"] = [float(d / t) for d, t in zip(dropped, tokens)]
        if route_logits is not None:
            out["teacher_agreement"] = [float(a / t) for a, t in zip(agreed, tokens)]
    return out


def expert_maps(model, images, route_logits=None):
    """Top-1 expert of every patch per MoE layer: [((B, g, g) student, teacher's or None)]."""
    student = watch_assignments(model, images)  # per layer (B·N,), CLS first in every image
    teacher_logits = route_logits(images) if route_logits else [None] * len(student)
    maps = []
    for s, t in zip(student, teacher_logits):
        t = None if t is None else patch_map(t.argmax(-1).cpu(), model.grid)
        maps.append((patch_map(s, model.grid), t))
    return maps


# ----------------------------------------------------------------------------- the command line
def compare(model, other, watch, path):
    """Routing consistency of two checkpoints on the watch images, per MoE layer."""
    mine, theirs = ((m.moe_layers, m.num_experts, m.grid) for m in (model, other))
    if mine != theirs:
        raise UsageError(
            f"--compare {path}: another architecture (MoE layers, E, grid "
            f"{theirs}) than the checkpoint's {mine}"
        )
    pairs = zip(watch_assignments(model, watch), watch_assignments(other, watch))
    return [routing_consistency(a, b) for a, b in pairs]


def route_of(model, ckpt, args, opts, device):
    """The run's teacher route (its frozen teacher and trained teacher routers: images ->
    list of (B, N, E) logits) where it kept a teacher router, to route by (--route teacher)
    or to compare with; None if it has none, or if its teacher is gone and the student
    routes (a note says so). Older checkpoints: the teacher's arguments from the flags."""
    if ckpt.get("teacher_router") is None:
        if opts.route == "teacher":
            why = f"{opts.checkpoint} ({args.method}) has no teacher router"
            raise UsageError(f"--route teacher: {why} (tgr and teacher-route runs save one)")
        return None
    t_args = ckpt.get("teacher_args") or teacher_args_from_flags(ckpt["args"], model.moe_layers)
    try:
        teacher = load_teacher(**{**t_args, "source": opts.teacher or t_args["source"]})
    except UsageError as err:  # student routing needs no teacher: measure the rest
        if opts.route == "teacher":
            raise
        print(f"note: no teacher agreement: {err} (give the run's --teacher)", file=sys.stderr)
        return None
    routers = build_teacher_routers(teacher, model.num_experts)
    routers.load_state_dict(ckpt["teacher_router"])
    return teacher_route(teacher.to(device), routers.to(device).eval())


def run_args(opts, args, model):
    """The run's flags with eval.py's overrides (--data, --data-path, --batch-size; None keeps
    the run's), and its validation split, checked against the model's classes (None where
    only the probes run: a data set with dense labels alone, or a --backbone)."""
    for name in ("data", "data_path", "batch_size"):
        if getattr(opts, name) is not None:
            setattr(args, name, getattr(opts, name))
    if args.data in DENSE_ONLY or opts.backbone:
        return args, None
    val_set, classes = build_dataset(False, args)  # the validation split only
    head = None if isinstance(model.head, nn.Identity) else model.head.out_features
    if head is not None and classes != head:
        why = f"has {classes} classes, the checkpoint's head {head}: give the run's data"
        raise UsageError(f"--data {args.data} {why}")
    return args, val_set


def backbone_of(opts, args, device):
    """--backbone: a dense ViT file (a teacher: DeiT-III, DINOv2, a timm-layout state dict,
    torchvision:NAME, a dense run) as a frozen model at the run's image size (its positions
    resampled where its own grid differs), for the probes alone."""
    sd, flags_of_run, _, _ = vit_weights(opts.backbone, False, "--backbone")
    cfg = vit_config(sd, flags_of_run, opts.backbone)
    grid = args.img_size // cfg["patch_size"]  # the run's pixels in the backbone's patches
    return build_vit(sd, cfg, opts.backbone, CLASSIFIER, grid).to(device).eval()


def measure(model, args, ckpt, opts, device, val_set):
    """Accuracy, routing, k-NN, consistency, preference and figures on the validation split."""
    route_logits = route_of(model, ckpt, args, opts, device)
    cuda = device.type == "cuda"
    amp_dtype = amp_dtype_for(device)
    batches = lambda data: torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, pin_memory=cuda, num_workers=opts.num_workers
    )
    loader = batches(val_set)
    by_teacher = opts.route == "teacher"
    res = dict(images=len(val_set), route=opts.route if model.moe_layers else None)
    accuracy_and_routing = evaluate(
        model,
        loader,
        device,
        route_logits=route_logits,
        amp_dtype=amp_dtype,
        route_by_teacher=by_teacher,
    )
    res.update(accuracy_and_routing)
    if opts.knn:  # the bank: the train split through the evaluation transform
        bank = batches(build_dataset(True, args, augment=False)[0])
        k = opts.knn_k
        temperature = opts.knn_temperature
        res["knn_top1"] = knn_eval(model, bank, loader, device, k, temperature, amp_dtype)
    watch = None  # train.py's watch set: decoded once, where something measures on it
    if opts.compare or ckpt.get("m2ot") or opts.specialisation:
        watch = watch_images(val_set, opts.watch_size).to(device)
    if opts.compare:
        other, _, _ = load_run(opts.compare, device, "--compare", opts.eval_capacity_factor)
        res.update(
            compare=str(opts.compare), consistency=compare(model, other, watch, opts.compare)
        )
    if (mix_routers := load_mix_routers(ckpt.get("m2ot") or {}, model.num_experts)) is not None:
        res.update(preference_report(model, mix_routers, getattr(args, "teachers", []), watch))
    if opts.specialisation:
        res["specialisation"] = expert_specialisation(model, args, ckpt, watch, device)
    return res, route_logits


def expert_specialisation(model, args, ckpt, watch, device):
    """m2ot_measure's readings of a top-K M²oT student on the watch images: its teachers
    loaded again from the run's --teachers, its heads and statistics from the checkpoint."""
    options = dict(img_size=args.img_size, dtype=args.teacher_dtype, random_ok=args.teacher_random)
    teachers = [load_final_teacher(t, **options).to(device) for t in args.teachers]
    m2ot = M2oT.for_student(model, teachers, args, routed=True).to(device)
    m2ot.load_state_dict(ckpt["m2ot"])
    return specialisation(model, m2ot, watch)


def main(opts):
    """Evaluate opts.checkpoint (parsed flags); returns the result dict (what --json prints)."""
    plt = require_matplotlib() if opts.plots else None  # fail before the slow part
    check_routing(1, 1, opts.eval_capacity_factor)  # one line for a capacity factor <= 0
    device = torch.device(opts.device)
    cf = opts.eval_capacity_factor
    model, args, ckpt = load_run(opts.checkpoint, device, eval_capacity_factor=cf)
    if opts.specialisation and (args.method != "m2ot" or not ckpt.get("m2ot")):
        raise UsageError("--specialisation: needs a checkpoint of train.py --method m2ot")
    tasks = [t for t in TASKS["synthetic"] if getattr(opts, f"{t}_probe")]
    backbone = backbone_of(opts, args, device) if opts.backbone else None
    depth = len((backbone or model).blocks)  # of the network the probes read
    check_probes(opts.data or args.data, tasks, opts.probe_blocks, depth)
    args, val_set = run_args(opts, args, model)
    if val_set is None and not tasks:
        why = f"--backbone {opts.backbone}" if opts.backbone else f"--data {args.data}"
        raise UsageError(f"{why}: the probes alone; give --seg-probe/--depth-probe")
    res = dict(checkpoint=str(opts.checkpoint), model=args.model, method=args.method)
    res.update(epoch=ckpt.get("epoch"), data=args.data)
    if opts.backbone:  # another network on this run's data (and flags): probed alone
        model = backbone
        on = f"a frozen backbone on the data of {opts.checkpoint}"
        res.update(checkpoint=opts.backbone, model=f"ViT {model.embed_dim}", method=on)
    if val_set is not None:  # a data set with classes: the image-level measurements
        measured, route_logits = measure(model, args, ckpt, opts, device, val_set)
        res.update(measured)
    res["moe_layers"] = list(model.moe_layers)
    res["num_experts"] = getattr(model, "num_experts", 0)  # a --backbone has none
    if not model.moe_layers:
        res["note"] = "dense: no routing"
    if tasks:  # linear probes on the frozen features (M²oT's ADE20K and NYUd columns)
        kw = dict(epochs=opts.probe_epochs, lr=opts.probe_lr, blocks=opts.probe_blocks)
        res.update(dense_probes(model, args, device, tasks, workers=opts.num_workers, **kw))
    if plt is not None and val_set is not None:
        log = Path(opts.checkpoint).with_name("log.jsonl")
        history = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        images = watch_images(val_set, opts.map_images).to(device)  # (n, 3, S, S)
        maps = expert_maps(model, images, route_logits)
        extra = {}  # an M²oT run with π: its expert -> teacher preference
        if "teacher_preference" in res:
            extra["teacher_preference.png"] = lambda: plot_teacher_preference(plt, res)
        res["plots"] = write_plots(plt, Path(opts.plots), res, history, images, maps, extra)
    return res


def get_args_parser():
    """eval.py's parser: what to read, what to measure, on which data (None: the run's)."""
    p = ArgumentParser("eval.py", description="accuracy and routing analytics of a train.py run")

    # the run, who routes it, and how the results are shown
    add_flag(
        p,
        "--checkpoint",
        required=True,
        help="the train.py checkpoint to evaluate (RUN/checkpoint.pt); its model and teacher "
        "are rebuilt from it",
    )
    add_flag(
        p,
        "--route",
        choices=["student", "teacher"],
        default="student",
        help="who chooses the experts: student (the model's own routers) or teacher (the run's "
        "frozen teacher and saved teacher router, TGR sec. 5.3; tgr and teacher-route runs)",
    )
    add_flag(
        p,
        "--compare",
        default="",
        help="another checkpoint of the same architecture: the per-layer routing consistency "
        "with it (share of the watch set's tokens given the same top-1 expert)",
    )
    add_flag(
        p,
        "--json",
        action="store_true",
        help="print the results as one JSON object instead of a table",
    )
    add_flag(
        p,
        "--plots",
        default="",
        help="a folder to write the PNG figures into: utilisation, training curves, expert "
        "maps, an M²oT run's teacher preference (needs matplotlib)",
    )
    add_flag(
        p,
        "--teacher",
        help="tgr and teacher-route runs: the teacher's file (or torchvision:NAME) if it has "
        "moved since training (when not given: the path saved in the checkpoint)",
    )

    # the data and the routing settings (when not given: the run's)
    add_flag(
        p,
        "--data",
        "--data-set",
        choices=[*DATASETS, *DENSE_ONLY],
        help="the data set to evaluate on (when not given: the run's); ade20k and nyud have "
        "dense labels only, for --seg-probe and --depth-probe",
    )
    add_flag(
        p,
        "--data-path",
        help="the data root, as train.py's --data-path (when not given: the run's)",
    )
    add_flag(
        p,
        "--batch-size",
        type=int,
        help="images per evaluation batch, the probes' too (when not given: the run's)",
    )
    add_flag(
        p,
        "--eval-capacity-factor",
        type=float,
        help="top-K and expert-choice runs: the capacity factor at evaluation (when not given: "
        "the run's --eval-capacity-factor)",
    )

    # do the experts split the teachers? (M²oT, m2ot_measure.py)
    add_flag(
        p,
        "--specialisation",
        action="store_true",
        help="an M²oT run: the expert × teacher matrices read from the experts themselves "
        "(representational: linear CKA of its outputs with each teacher's targets; causal: "
        "each teacher's L_dist rise with an expert dropped), SI, DI and a permuted-teacher "
        "null, on the watch set; loads the run's --teachers",
    )

    # the k-NN top-1 of the CLS embedding (M²oT's measure, DINO's protocol)
    add_flag(
        p,
        "--knn",
        action="store_true",
        help="also measure the weighted k-NN top-1 of the CLS embedding (bank: the train split "
        "without augmentation; queries: the validation split)",
    )
    add_flag(
        p,
        "--knn-k",
        type=int,
        default=20,
        help="--knn: the number of nearest neighbours that vote (DINO's)",
    )
    add_flag(
        p,
        "--knn-temperature",
        type=float,
        default=0.07,
        help="--knn: the temperature T of each vote's weight exp(cos / T) (DINO's)",
    )

    # the watch set whose routing is compared
    add_flag(
        p,
        "--watch-size",
        "--probe-size",
        type=int,
        default=256,
        help="validation images in the watch set of --compare and of an M²oT run's "
        "expert→teacher preference (train.py's --watch-size picks the same images; "
        "--probe-size: its older name)",
    )

    # linear probes on the frozen features (M²oT's segmentation and depth columns)
    add_flag(
        p,
        "--seg-probe",
        action="store_true",
        help="train a linear segmentation probe on the frozen patch tokens and report its mIoU "
        "(--data synthetic or ade20k)",
    )
    add_flag(
        p,
        "--depth-probe",
        action="store_true",
        help="train a linear depth probe on the frozen patch tokens and report its RMSE "
        "(--data synthetic or nyud)",
    )
    add_flag(
        p,
        "--probe-epochs",
        type=int,
        default=10,
        help="--seg-probe / --depth-probe: epochs the linear probes train for",
    )
    add_flag(
        p,
        "--probe-lr",
        type=float,
        default=1e-2,
        help="--seg-probe / --depth-probe: the probes' AdamW learning rate (cosine to 0)",
    )
    add_flag(
        p,
        "--probe-blocks",
        type=int,
        default=1,
        help="--seg-probe / --depth-probe: read the patch tokens of the last n blocks, "
        "concatenated (DINOv2's multi-layer probe)",
    )
    add_flag(
        p,
        "--backbone",
        default="",
        help="probe this dense ViT file instead of the run's model, on the run's data (a "
        "teacher: DeiT-III, DINOv2, torchvision:NAME, a dense run); the probes only",
    )

    # figures and machinery
    add_flag(
        p,
        "--map-images",
        type=int,
        default=4,
        help="--plots: validation images shown in expert_maps.png",
    )
    add_flag(
        p,
        "--num-workers",
        type=int,
        default=0,
        help="data-loader worker processes (0: load in the main process)",
    )
    add_flag(
        p,
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to evaluate: cuda, cuda:N or cpu",
    )
    return p


def cli(argv=None):
    """The command line: parse, evaluate (a user mistake is one line), print, return the dict."""
    opts = get_args_parser().parse_args(argv)
    res = run_cli(main, opts)
    tables = fmt_table(res) + preference_table(res) + specialisation_table(res)
    print(json.dumps(res) if opts.json else tables)
    return res


if __name__ == "__main__":
    cli()
