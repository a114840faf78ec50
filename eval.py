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
    consistency(A, B)  c   = (1/T) Σ_t 1[top1_A(t) = top1_B(t)]          (on a fixed probe set)
    agreement          a   = (1/T) Σ_t 1[argmax p_t = argmax p_t^teacher]

and, for M²oT's label-free students (SPEC sec. 9), the embedding (the expert→teacher
preference it also reports is M²oT's own measure: `m2ot.teacher_preferences`):

    k-NN top-1         ŷ   = argmax_c Σ_{j ∈ k most similar} exp(cos(z, z_j) / T) 1[y_j = c]
                             (CLS embedding z, DINO's k = 20, T = 0.07)

`evaluate` runs a model over a loader and returns top-1/top-5 and the per-layer metrics;
train.py logs them every epoch, with the adjacent-epoch consistency of `probe_assignments`.

The command line reads a train.py checkpoint (SPEC sec. 12):

    python eval.py --checkpoint RUN/checkpoint.pt [--route student|teacher] [--compare B.pt]
                   [--data ... --data-path ...] [--knn] [--json] [--plots DIR]

`--route teacher` lets the run's teacher router choose the experts (TGR sec. 5.3, the upper
bound that needs the teacher at inference); `--compare` measures consistency on the probe
set train.py follows (`data.probe_indices`); `--knn` adds the k-NN top-1; an M²oT
checkpoint with π adds the expert→teacher preference; the table and `--plots` are report's.

Letters: T tokens (B·N), E experts, K choices per token, M k-NN bank images, V queries.

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

import contextlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_run
from data import build_dataset, normalize, probe_images
from flags import ArgumentParser, UsageError, add_flag, run_cli, teacher_args_from_flags
from m2ot import load_mix_routers, preference_report
from report import fmt_table, patch_map, require_matplotlib, write_plots
from router import check_routing
from teacher import build_teacher_routers, load_teacher, teacher_route


# ----------------------------------------------------------------------------- metrics
def top1_experts(routing):
    """argmax_e p_{t,e} of the clean router probabilities: (T,) long."""
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


def teacher_agreement(student_logits, teacher_logits):
    # a = (1/T) Σ_t 1[argmax p_t = argmax p_t^teacher]  (softmax keeps the argmax of the logits)
    s = student_logits.reshape(-1, student_logits.shape[-1]).argmax(-1)  # (T,)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).argmax(-1)  # (T,)
    return (s == t).float().mean()  # a 0-dim tensor: the training step logs it without a sync


KNN_CHUNK = 1 << 26  # k-NN queries in chunks of KNN_CHUNK // M: (chunk, M) sims ≈ 256 MB


def knn_top1(train_feats, train_labels, val_feats, val_labels, num_classes, k=20, temperature=0.07):
    """Weighted k-NN top-1 (%) of val embeddings (V, D) against a train bank (M, D): DINO's
    protocol and constants (Caron et al. 2021, its eval_knn.py: k = 20, T = 0.07)."""
    # > "k-NN classification using shared backbone" (M²oT sec. 5.1, its ImageNet-1k number)
    # s_j = cos(z, z_j); score_c = Σ_{j ∈ k most similar} exp(s_j / T) 1[y_j = c]; ŷ = argmax_c
    bank = F.normalize(train_feats.float(), dim=1)  # (M, D)
    bank_labels, device = train_labels.to(bank.device), bank.device
    k, rows = min(k, len(bank)), max(1, KNN_CHUNK // len(bank))
    correct = 0
    for z, y in zip(val_feats.split(rows), val_labels.split(rows)):
        sim = F.normalize(z.float().to(device), dim=1) @ bank.T  # (V', M) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (V', k) the k nearest train images
        votes = torch.zeros(len(z), num_classes, device=device)  # (V', classes)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == y.to(device)).sum())
    return 100 * correct / len(val_labels)


# ----------------------------------------------------------------------------- model passes
@contextlib.contextmanager
def evaluating(model):
    """model.eval() inside the block, its own training flag back after it (even on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast(device, amp_dtype):
    """Autocast to `amp_dtype` (bf16 on CUDA), or nothing when it is None."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype))


@torch.no_grad()
def probe_assignments(model, images, route_logits=None, batch_size=128):
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


@torch.no_grad()
def cls_embeddings(model, loader, device, amp_dtype=None):
    """The CLS token of `forward_features` (after the final norm) of every image of `loader`:
    features (n, D) float32 and labels (n,). Under DDP every rank gathers all the shards (equal
    sizes: the DistributedSampler pads), so every rank holds the same embeddings."""
    feats, labels = [], []
    with evaluating(model):
        for images, targets in loader:
            images = normalize(images.to(device, non_blocking=True))  # uint8 -> (B, 3, S, S)
            with autocast(device, amp_dtype):
                tokens, _ = model.forward_features(images)  # (B, N, D)
            feats.append(tokens[:, 0].float())  # (B, D) the CLS token
            labels.append(targets.to(device))
    out = [torch.cat(feats), torch.cat(labels)]  # (n, D), (n,)
    if dist.is_available() and dist.is_initialized():
        for i, t in enumerate(out):
            shards = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(shards, t)
            out[i] = torch.cat(shards)  # (world·n, ...) every rank's images
    return tuple(out)


def knn_eval(model, train_loader, val_loader, device, k=20, temperature=0.07, amp_dtype=None):
    """k-NN top-1 (%) of the CLS embedding: the bank from `train_loader` (read with the
    evaluation transform: `build_dataset(True, args, augment=False)`), queries from val."""
    bank, bank_labels = cls_embeddings(model, train_loader, device, amp_dtype)  # (M, D), (M,)
    queries, labels = cls_embeddings(model, val_loader, device, amp_dtype)  # (V, D), (V,)
    classes = int(max(bank_labels.max(), labels.max())) + 1
    return knn_top1(bank, bank_labels, queries, labels, classes, k, temperature)


def expert_maps(model, images, route_logits=None):
    """Top-1 expert of every patch per MoE layer: [((B, g, g) student, teacher's or None)]."""
    student = probe_assignments(model, images)  # per layer (B·N,), CLS first in every image
    teacher_logits = route_logits(images) if route_logits else [None] * len(student)
    maps = []
    for s, t in zip(student, teacher_logits):
        t = None if t is None else patch_map(t.argmax(-1).cpu(), model.grid)
        maps.append((patch_map(s, model.grid), t))
    return maps


# ----------------------------------------------------------------------------- the command line
def compare(model, other, probe, path):
    """Routing consistency of two checkpoints on the probe images, per MoE layer."""
    mine, theirs = ((m.moe_layers, m.num_experts, m.grid) for m in (model, other))
    if mine != theirs:
        raise UsageError(
            f"--compare {path}: another architecture (MoE layers, E, grid "
            f"{theirs}) than the checkpoint's {mine}"
        )
    pairs = zip(probe_assignments(model, probe), probe_assignments(other, probe))
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
    the run's), and its validation split, checked against the model's classes."""
    for name in ("data", "data_path", "batch_size"):
        if getattr(opts, name) is not None:
            setattr(args, name, getattr(opts, name))
    val_set, classes = build_dataset(False, args)  # the validation split only
    head = None if isinstance(model.head, nn.Identity) else model.head.out_features
    if head is not None and classes != head:
        why = f"has {classes} classes, the checkpoint's head {head}: give the run's data"
        raise UsageError(f"--data {args.data} {why}")
    return args, val_set


def main(opts):
    """Evaluate opts.checkpoint (parsed flags); returns the result dict (what --json prints)."""
    plt = require_matplotlib() if opts.plots else None  # fail before the slow part
    check_routing(1, 1, opts.eval_capacity_factor)  # one line for a capacity factor <= 0
    device, cf = torch.device(opts.device), opts.eval_capacity_factor
    model, args, ckpt = load_run(opts.checkpoint, device, eval_capacity_factor=cf)
    args, val_set = run_args(opts, args, model)
    route_logits = route_of(model, ckpt, args, opts, device)
    cuda, amp_dtype = device.type == "cuda", torch.bfloat16 if device.type == "cuda" else None
    batches = lambda data: torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, pin_memory=cuda, num_workers=opts.num_workers
    )
    loader, route = batches(val_set), opts.route if model.moe_layers else None
    res = dict(checkpoint=str(opts.checkpoint), model=args.model, method=args.method)
    res.update(epoch=ckpt.get("epoch"), data=args.data, images=len(val_set), route=route)
    by_teacher = opts.route == "teacher"
    res.update(
        evaluate(
            model,
            loader,
            device,
            route_logits=route_logits,
            amp_dtype=amp_dtype,
            route_by_teacher=by_teacher,
        )
    )
    if opts.knn:  # the bank: the train split through the evaluation transform
        bank = batches(build_dataset(True, args, augment=False)[0])
        k, temperature = opts.knn_k, opts.knn_temperature
        res["knn_top1"] = knn_eval(model, bank, loader, device, k, temperature, amp_dtype)
    res["moe_layers"], res["num_experts"] = list(model.moe_layers), model.num_experts
    if not model.moe_layers:
        res["note"] = "dense: no routing"
    probe = None  # train.py's probe set: decoded once, where something measures on it
    if opts.compare or ckpt.get("m2ot"):
        probe = probe_images(val_set, opts.probe_size).to(device)
    if opts.compare:
        other, _, _ = load_run(opts.compare, device, "--compare", cf)
        res.update(
            compare=str(opts.compare), consistency=compare(model, other, probe, opts.compare)
        )
    if (mix_routers := load_mix_routers(ckpt.get("m2ot") or {}, model.num_experts)) is not None:
        res.update(preference_report(model, mix_routers, getattr(args, "teachers", []), probe))
    if plt is not None:
        log = Path(opts.checkpoint).with_name("log.jsonl")
        history = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        images = probe_images(val_set, opts.map_images).to(device)  # (n, 3, S, S)
        maps = expert_maps(model, images, route_logits)
        res["plots"] = write_plots(plt, Path(opts.plots), res, history, images, maps)
    return res


def get_args_parser():
    p = ArgumentParser("eval.py", description="accuracy and routing analytics of a train.py run")
    add_flag(p, "--checkpoint", required=True, help="RUN/checkpoint.pt")
    who = "who chooses the experts (teacher: tgr / teacher-route runs)"
    add_flag(p, "--route", choices=["student", "teacher"], default="student", help=who)
    add_flag(p, "--compare", default="", help="another checkpoint of the same architecture")
    add_flag(p, "--json", action="store_true", help="print one JSON object")
    add_flag(p, "--plots", default="", help="folder for the PNG figures (needs matplotlib)")
    add_flag(p, "--teacher", help="the run's teacher, if it has moved")
    add_flag(p, "--data", "--data-set", help="the data set (the run's)")
    add_flag(p, "--data-path", help="the data root (the run's)")
    add_flag(p, "--batch-size", type=int, help="images per batch (the run's)")
    add_flag(p, "--eval-capacity-factor", type=float, help="capacity factor (the run's)")
    add_flag(p, "--knn", action="store_true", help="k-NN top-1 of the CLS embedding (train split)")
    add_flag(p, "--knn-k", type=int, default=20, help="neighbours that vote (DINO's)")
    add_flag(p, "--knn-temperature", type=float, default=0.07, help="T of exp(cos / T) (DINO's)")
    add_flag(p, "--probe-size", type=int, default=256, help="probe images: --compare, preference")
    add_flag(p, "--map-images", type=int, default=4, help="images in expert_maps.png")
    add_flag(p, "--num-workers", type=int, default=0, help="loader workers")
    add_flag(p, "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="")
    return p


def cli(argv=None):
    """The command line: parse, evaluate (a user mistake is one line), print, return the dict."""
    opts = get_args_parser().parse_args(argv)
    res = run_cli(main, opts)
    print(json.dumps(res) if opts.json else fmt_table(res))
    return res


if __name__ == "__main__":
    cli()
