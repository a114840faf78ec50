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

and, for M²oT's label-free students (SPEC sec. 9), the embedding and the experts' teachers:

    k-NN top-1         ŷ   = argmax_c Σ_{j ∈ k most similar} exp(cos(z, z_j) / T) 1[y_j = c]
                             (CLS embedding z, DINO's k = 20, T = 0.07)
    preference         pref(e, i) = mean of π(t, e, i) over the tokens t expert e processed
    sharpness          s   = mean_e max_i pref(e, i)      ∈ [1/N_T, 1]     (M²oT Fig. 4b)

`evaluate` runs a model over a data loader and returns top-1/top-5 and the per-layer metrics;
`train.py` logs them every epoch (and `knn_eval` for M²oT students), and logs the
adjacent-epoch consistency from `probe_assignments` (the previous epoch's top-1 experts of a
fixed probe batch).

The command line reads a train.py checkpoint (SPEC sec. 12):

    python eval.py --checkpoint RUN/checkpoint.pt [--route student|teacher] [--compare B.pt]
                   [--data ... --data-path ...] [--knn] [--json] [--plots DIR]

`--route teacher` lets the run's teacher router choose the experts (TGR sec. 5.3, the upper
bound that needs the teacher at inference); `--compare` measures consistency on
`--probe-size` validation images (the probe train.py follows: `probe_indices`, a seeded,
class-stratified sample); `--knn` adds the k-NN top-1 (any checkpoint); an M²oT checkpoint
with π adds the expert→teacher preference on the same probe set; `--plots` draws utilisation,
the log.jsonl curves, expert maps (each patch coloured by its top-1 expert) and the
preference heatmaps.

Letters: T tokens (B·N), E experts, K choices per token, N_T teachers, M images in the k-NN
bank, V queries.

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
* The CLI rebuilds the model with `build_model(**ckpt["model_args"])` and the teacher with
  `load_teacher(**ckpt["teacher_args"])`, never importing train.py (checkpoints older than
  those keys: the same arguments from the run's saved flags), with the run's eval capacity
  factor unless `--eval-capacity-factor` is given. Teacher agreement is measured whenever the
  checkpoint has a teacher router (TGR keeps its last one after the switch); if the teacher
  file is gone, the rest is still measured and a note says so (`--route teacher` then fails).
* The k-NN bank is the train split read with the *evaluation* transform (no augmentation),
  the queries the validation split; both are the CLS token after the final norm, L2-normalised.
* A model without a classifier (`head` = nn.Identity, `num_classes=0`: M²oT) has no top-1 or
  top-5 and no class check against the data; `--knn` measures it.
* The preference averages π over the *kept* assignments (a dropped one was not processed);
  an expert that took no probe token has a NaN row (null in `--json`), skipped by sharpness.
* matplotlib is optional (not in requirements.txt): `--plots` without it is one error line.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import MEAN, STD, build_dataset, labels_of, normalize
from m2ot import load_mix_routers
from moe import build_model, model_args_from_flags
from router import check_routing
from teacher import (
    ArgumentParser,
    TeacherError,
    build_teacher_routers,
    load_teacher,
    read_checkpoint,
    run_cli,
    teacher_args_from_flags,
    teacher_route,
)


class EvalError(ValueError):
    """A user mistake: `teacher.run_cli` prints this one line (`error: ...`), exit status 2."""


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
    if routing.kept is None:
        return 0.0
    return float(1.0 - routing.kept.any(dim=-1).float().mean())


def routing_consistency(top1_a, top1_b):
    # c = (1/T) Σ_t 1[top1_A(t) = top1_B(t)]: the same tokens routed by two model states
    return float((top1_a == top1_b).float().mean())


def teacher_agreement(student_logits, teacher_logits):
    # a = (1/T) Σ_t 1[argmax p_t = argmax p_t^teacher]  (softmax keeps the argmax of the logits)
    s = student_logits.reshape(-1, student_logits.shape[-1]).argmax(-1)  # (T,)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).argmax(-1)  # (T,)
    return (s == t).float().mean()  # a 0-dim tensor: the training step logs it without a sync


# k-NN over a bank of M train embeddings: queries in chunks of KNN_CHUNK // M, so the
# (chunk, M) similarities stay near 2^26 floats (256 MB) whatever the bank's size
KNN_CHUNK = 1 << 26


def knn_top1(train_feats, train_labels, val_feats, val_labels, num_classes, k=20,
             temperature=0.07):  # fmt: skip
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


def preference_sums(mix, experts, kept, num_experts):
    """Σ π(t, e, ·) over the kept assignments (t, e) of each expert, and their number:
    (E, N_T), (E,). mix: π (T, E, N_T); experts, kept: (T, K) from the layer's Routing."""
    T, K = experts.shape
    chosen = mix.gather(1, experts.unsqueeze(-1).expand(T, K, mix.shape[-1]))  # (T, K, N_T)
    e = experts[kept]  # (A,) the expert of every kept assignment
    sums = mix.new_zeros(num_experts, mix.shape[-1]).index_add_(0, e, chosen[kept])  # (E, N_T)
    return sums, torch.bincount(e, minlength=num_experts)  # (E,)


def teacher_preference(mix, experts, kept, num_experts):
    """Expert→teacher preference (M²oT Fig. 4b): (E, N_T), each row a distribution.

    A NaN row: that expert took no token (0 / 0, it has no preference to show)."""
    # pref(e, i) = mean over the tokens t expert e processed of π(t, e, i)
    sums, counts = preference_sums(mix, experts, kept, num_experts)
    return sums / counts.unsqueeze(1)  # (E, N_T)


def preference_sharpness(pref):
    # sharpness = mean_e max_i pref(e, i) over the experts that took tokens (NaN rows skipped):
    # 1/N_T = every expert mixes the teachers evenly, 1 = every expert serves one teacher
    rows = pref[~pref.isnan().any(dim=1)]  # (E', N_T)
    return float(rows.max(dim=1).values.mean())


# ----------------------------------------------------------------------------- model passes
def probe_indices(labels, n, seed=0):
    """The probe set's indices into a data set with classes `labels` (L,): n of them, sorted.

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


def probe_images(dataset, n, seed=0):
    """The probe set of `dataset` (validation), `probe_indices` of it, normalised: (n, 3, S, S)."""
    images = [dataset[int(i)][0] for i in probe_indices(labels_of(dataset), n, seed)]
    return normalize(torch.stack(images))  # float32, as the model takes them


@torch.no_grad()
def probe_assignments(model, images, route=None, batch_size=128):
    """Top-1 experts (clean p) of every token of `images`, one (T,) tensor per MoE layer.

    route: optional callable images -> list of (B, N, E) routing logits (teacher-route mode).
    """
    was_training = model.training
    model.eval()
    per_layer = []
    for chunk in images.split(batch_size):
        _, routings = model(chunk, route=route(chunk) if route else None)
        per_layer.append([top1_experts(r).cpu() for r in routings])
    model.train(was_training)
    return [torch.cat(layer) for layer in zip(*per_layer)]  # per layer: (T,)


@torch.no_grad()
def evaluate(model, loader, device, *, teacher=None, route_by_teacher=False, amp_dtype=None):
    """Top-1/top-5 accuracy and per-MoE-layer utilisation, entropy, dropped fraction, agreement.

    teacher: optional callable images -> list of (B, N, E) teacher-router logits, one per MoE
    layer; with it the per-layer teacher agreement is measured, and with `route_by_teacher`
    those logits also choose the experts (teacher-route mode, TGR sec. 5.3).
    amp_dtype: autocast dtype on CUDA (e.g. bf16). Returns a dict of floats and per-layer lists.
    A model without a classifier (`head` = nn.Identity: M²oT's label-free students) gets no
    top-1/top-5, only the routing metrics (`knn_eval` measures its embedding).
    """
    classifier = not isinstance(getattr(model, "head", None), nn.Identity)
    was_training = model.training
    model.eval()
    correct1, correct5, seen = torch.zeros(3, dtype=torch.float64, device=device).unbind()
    counts = dropped = tokens = agreed = None  # (layers, E), (layers,) ×3
    for images, targets in loader:
        images = normalize(images.to(device, non_blocking=True))  # uint8 -> float (B, 3, S, S)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            t_logits = teacher(images) if teacher else None  # list of (B, N, E)
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
            T = r.probs.shape[0]
            counts[i] += expert_utilisation(top1_experts(r), counts.shape[1]) * T  # tokens per e
            dropped[i] += dropped_fraction(r) * T
            tokens[i] += T
            if t_logits is not None:  # the student's own router vs the teacher router
                own = r.student_logits if r.student_logits is not None else r.logits
                agreed[i] += teacher_agreement(own, t_logits[i]) * T
    stats = [correct1, correct5, seen] + ([counts, dropped, tokens, agreed] if routings else [])
    if dist.is_available() and dist.is_initialized():
        for t in stats:
            dist.all_reduce(t)  # sum over ranks: every rank saw its own shard
    model.train(was_training)
    out = {"top1": float(100 * correct1 / seen)} if classifier else {}
    if classifier and logits.shape[-1] >= 5:
        out["top5"] = float(100 * correct5 / seen)
    if counts is not None:
        util = counts / tokens.unsqueeze(1)  # (layers, E) u_e over the whole validation set
        out["utilisation"] = [[round(float(u), 4) for u in row] for row in util]
        out["routing_entropy"] = [normalised_entropy(row) for row in util]
        out["dropped_frac"] = [float(d / t) for d, t in zip(dropped, tokens)]
        if teacher is not None:
            out["teacher_agreement"] = [float(a / t) for a, t in zip(agreed, tokens)]
    return out


@torch.no_grad()
def cls_embeddings(model, loader, device, amp_dtype=None):
    """The CLS token of `forward_features` (after the final norm) of every image of `loader`:
    features (n, D) float32 and labels (n,). Under DDP every rank gathers all the shards (equal
    sizes: the DistributedSampler pads), so every rank holds the same embeddings."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, targets in loader:
        images = normalize(images.to(device, non_blocking=True))  # uint8 -> float (B, 3, S, S)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            tokens, _ = model.forward_features(images)  # (B, N, D)
        feats.append(tokens[:, 0].float())  # (B, D) the CLS token
        labels.append(targets.to(device))
    model.train(was_training)
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


@torch.no_grad()
def teacher_preferences(model, mix_routers, images, batch_size=128):
    """Expert→teacher preference of every MoE layer on `images` (normalised float): a list
    of (E, N_T). π of layer j is `mix_routers[j]` (m2ot.TeacherAwareRouter) on the layer's
    input, which the layers hand over in `Routing.inputs` while `keep_expert_outputs` is on."""
    layers = [model.blocks[i - 1].mlp for i in model.moe_layers]
    kept_before, was_training = [layer.keep_expert_outputs for layer in layers], model.training
    model.eval()
    sums, counts = 0, 0  # per layer (E, N_T) and (E,), summed over the batches
    try:
        for layer in layers:
            layer.keep_expert_outputs = True
        for chunk in images.split(batch_size):
            _, routings = model(chunk)
            parts = [preference_sums(pi(r.inputs), r.experts, r.kept, model.num_experts)
                     for pi, r in zip(mix_routers, routings)]  # fmt: skip
            sums = sums + torch.stack([s for s, _ in parts])  # (layers, E, N_T)
            counts = counts + torch.stack([c for _, c in parts])  # (layers, E)
    finally:
        for layer, before in zip(layers, kept_before):
            layer.keep_expert_outputs = before
        model.train(was_training)
    return list(sums / counts.unsqueeze(-1))  # per layer (E, N_T); NaN rows: no token taken


def patch_map(top1, grid):
    """Top-1 experts of B images' tokens, (B·N,) or (B, N) with CLS first -> (B, grid, grid)."""
    return top1.reshape(-1, grid * grid + 1)[:, 1:].reshape(-1, grid, grid)  # CLS dropped


def for_display(images):
    """(B, 3, S, S) images normalised as data.py does -> (B, S, S, 3) in [0, 1] for imshow."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def expert_maps(model, images, teacher=None):
    """Top-1 expert of every patch per MoE layer: [((B, g, g) student, teacher's or None)]."""
    student = probe_assignments(model, images)  # per layer (B·N,), CLS first in every image
    teacher_logits = teacher(images) if teacher else [None] * len(student)  # (B, N, E) each
    maps = []
    for s, t in zip(student, teacher_logits):
        t = None if t is None else patch_map(t.argmax(-1).cpu(), model.grid)
        maps.append((patch_map(s, model.grid), t))
    return maps


# ----------------------------------------------------------------------------- pictures
DPI = 100  # every figure is figsize × DPI pixels (no tight bounding box: sizes are known)


def require_matplotlib():
    """matplotlib.pyplot on a file-only backend, or one EvalError line: it is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # write files, open no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError("--plots needs matplotlib (optional): pip install matplotlib") from None
    return plt


def expert_colours(plt, E):
    """A qualitative colour map with one colour per expert (hues spread when E > 20)."""
    from matplotlib.colors import ListedColormap

    base = plt.get_cmap("tab10" if E <= 10 else "tab20" if E <= 20 else "hsv")
    return ListedColormap([base(i if E <= 20 else i / E) for i in range(E)])


def plot_utilisation(plt, res):
    """utilisation.png: one bar chart per MoE layer, the share of tokens whose top-1 is e."""
    layers = res["moe_layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3), squeeze=False)
    for ax, block, u, h in zip(axes[0], layers, res["utilisation"], res["routing_entropy"]):
        ax.bar(range(len(u)), u)
        ax.axhline(1 / len(u), color="k", ls="--", lw=1, label="balanced: 1/E")
        ax.set(title=f"block {block}: entropy {h:.3f}", xlabel="expert", ylabel="utilisation")
    axes[0, 0].legend()
    fig.tight_layout()
    return fig


def plot_curves(plt, res, history):
    """curves.png: the run's log.jsonl, one point per epoch; shaded: epochs that distilled."""
    layers = res["moe_layers"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    epochs = [r["epoch"] for r in history]
    per_layer = lambda key: zip(*[r[key] or [] for r in history])  # noqa: E731
    blocks = [f"block {b}" for b in layers]
    panels = [("val top-1 (%)", [[r.get(k) for r in history] for k in ("val_top1",
               "val_knn_top1")], ["classifier", "k-NN (CLS embedding)"]),
              ("routing entropy H(u)/log E", per_layer("routing_entropy"), blocks),
              ("adjacent-epoch consistency", per_layer("consistency_prev"), blocks),
              ("distillation KL (train mean, Σ layers)",
               [[r.get("train_distill") for r in history]], [None])]  # fmt: skip
    for ax, (title, series, names) in zip(axes.flat, panels):
        for name, ys in zip(names, series):
            xy = [(x, y) for x, y in zip(epochs, ys) if y is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=name)
        for e in (r["epoch"] for r in history if r["distilling"]):
            ax.axvspan(e - 0.5, e + 0.5, color="tab:orange", alpha=0.12, lw=0)
        if not ax.lines:
            ax.text(0.5, 0.5, "dense: no routing" if not layers else "not logged: no teacher",
                    ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        ax.set(title=title, xlabel="epoch")
        if len(ax.lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{res['model']} {res['method']} (shaded: distilling epochs)")
    fig.tight_layout()
    return fig


def plot_expert_maps(plt, res, images, maps):
    """expert_maps.png: each patch coloured by its top-1 expert; student next to teacher."""
    pics = for_display(images)  # (B, S, S, 3)
    columns = [("image", None)]
    for block, (s, t) in zip(res["moe_layers"], maps):
        columns += [(f"block {block}: student", s)] + (
            [(f"block {block}: teacher", t)] * (t is not None)
        )
    rows, E, S = len(pics), res["num_experts"], pics.shape[1]
    fig, axes = plt.subplots(
        rows, len(columns), figsize=(2 * len(columns), 2 * rows), squeeze=False
    )
    cmap = expert_colours(plt, E)
    for r, pic in enumerate(pics):
        for c, (title, m) in enumerate(columns):
            ax = axes[r, c]
            if m is None:  # the image itself
                ax.imshow(pic.numpy())
            else:  # the image in grey (shapes stay visible) under the expert colours
                ax.imshow(pic.mean(-1).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.imshow(m[r].numpy(), cmap=cmap, vmin=-0.5, vmax=E - 0.5, alpha=0.7,
                          extent=(0, S, S, 0), interpolation="nearest")  # fmt: skip
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle(f"top-1 expert of every patch (colour = expert, E = {E})", fontsize=9)
    return fig


def plot_teacher_preference(plt, res):
    """teacher_preference.png: per MoE layer, each expert's mean π over teachers (M²oT Fig. 4b)."""
    import numpy as np  # matplotlib's own dependency

    layers, teachers, E = res["moe_layers"], res["teachers"], res["num_experts"]
    fig, axes = plt.subplots(1, len(layers), figsize=(len(layers) * (1.5 + 0.9 * len(teachers)),
                             1.3 + 0.35 * E), squeeze=False)  # fmt: skip
    for ax, block, pref, sharp in zip(
        axes[0], layers, res["teacher_preference"], res["preference_sharpness"]
    ):
        pref = np.array(pref, dtype=float)  # (E, N_T); null rows (no token taken) -> NaN, blank
        ax.imshow(pref, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for (e, i), share in np.ndenumerate(pref):
            if not np.isnan(share):
                ax.text(i, e, f"{share:.2f}", ha="center", va="center", fontsize=7,
                        color="k" if share > 0.6 else "w")  # fmt: skip
        ax.set(title=f"block {block}: sharpness {sharp:.2f}", xlabel="teacher", ylabel="expert",
               xticks=range(len(teachers)), yticks=range(E))  # fmt: skip
        ax.set_xticklabels(teachers, fontsize=7, rotation=20)
    fig.tight_layout()
    return fig


def write_plots(plt, out, res, history, images, maps):
    """utilisation.png, curves.png (needs the run's log.jsonl), expert_maps.png and, for an
    M²oT run with π, teacher_preference.png; returns the paths."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--plots {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    if res["moe_layers"]:
        figures["utilisation.png"] = lambda: plot_utilisation(plt, res)
    if history:
        figures["curves.png"] = lambda: plot_curves(plt, res, history)
    if res["moe_layers"]:
        figures["expert_maps.png"] = lambda: plot_expert_maps(plt, res, images, maps)
    if "teacher_preference" in res:
        figures["teacher_preference.png"] = lambda: plot_teacher_preference(plt, res)
    for name, draw in figures.items():
        fig = draw()
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
    return [str(out / name) for name in figures]


# ----------------------------------------------------------------------------- checkpoints
def load_run(path, device, what="--checkpoint", eval_capacity_factor=None):
    """A train.py checkpoint -> (model in eval mode, the run's flags as a Namespace, checkpoint).

    The model is rebuilt from the checkpoint's `model_args` (the `build_model` keyword
    arguments), or, in a checkpoint written before they were saved, from its flags.
    """
    ckpt = read_checkpoint(path, what)
    if not isinstance(ckpt, dict) or "model" not in ckpt or not ckpt.get("args"):
        raise EvalError(f"{what} {path}: not a train.py checkpoint (it has no 'model' and 'args')")
    args = argparse.Namespace(**ckpt["args"])
    model_args = ckpt.get("model_args")
    if model_args is None:  # older checkpoint: the same arguments, from the run's flags
        try:
            model_args = model_args_from_flags(ckpt["args"], ckpt["model"]["head.weight"].shape[0])
        except KeyError as err:
            raise EvalError(f"{what} {path}: an old checkpoint without flag {err}") from None
    if eval_capacity_factor is not None and "eval_capacity_factor" in model_args:
        model_args = {**model_args, "eval_capacity_factor": eval_capacity_factor}
    model = build_model(**model_args)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise EvalError(f"{what} {path}: {str(err).splitlines()[-1].strip()}") from None
    return model.to(device).eval(), args, ckpt


def load_teacher_route(model, ckpt, device, source=None):
    """The run's frozen teacher + its trained teacher routers as images -> list of (B, N, E)."""
    teacher_args = ckpt.get("teacher_args")
    if teacher_args is None:  # older checkpoint: from the run's flags
        teacher_args = teacher_args_from_flags(ckpt["args"], model.moe_layers)
    teacher = load_teacher(**{**teacher_args, "source": source or teacher_args["source"]})
    routers = build_teacher_routers(teacher, model.num_experts)
    routers.load_state_dict(ckpt["teacher_router"])
    return teacher_route(teacher.to(device), routers.to(device).eval())


def compare(model, other, val_set, opts, device):
    """Routing consistency of two checkpoints on the probe set (--probe-size images)."""
    if (other.moe_layers, other.num_experts, other.grid) != (
        model.moe_layers, model.num_experts, model.grid):  # fmt: skip
        raise EvalError(f"--compare {opts.compare}: another architecture (MoE layers "
                        f"{other.moe_layers}, E={other.num_experts}, grid {other.grid}) than "
                        f"the checkpoint's ({model.moe_layers}, E={model.num_experts}, "
                        f"grid {model.grid})")  # fmt: skip
    probe = probe_images(val_set, opts.probe_size).to(device)  # train.py's probe set
    pairs = zip(probe_assignments(model, probe), probe_assignments(other, probe))
    return [routing_consistency(a, b) for a, b in pairs]


def preference_result(model, ckpt, args, val_set, opts, device):
    """An M²oT checkpoint's expert→teacher preference on the probe set (--probe-size images),
    per MoE layer, for the result dict; {} when the run had no π (not M²oT, dense, Soft MoE)."""
    routers = load_mix_routers(ckpt.get("m2ot") or {}, model.num_experts)
    if routers is None or not model.moe_layers:
        return {}
    probe = probe_images(val_set, opts.probe_size).to(device)  # train.py's probe set
    prefs = teacher_preferences(model, routers.to(device).eval(), probe)
    names = [Path(t).name for t in getattr(args, "teachers", None) or []]  # the plots' labels
    if len(set(names)) < len(names):  # A/checkpoint.pt, B/checkpoint.pt: with their folders
        names = ["/".join(Path(t).parts[-2:]) for t in args.teachers]
    if len(names) != prefs[0].shape[1]:
        names = [f"teacher {i}" for i in range(prefs[0].shape[1])]

    def rounded(pref):  # null where NaN (JSON has none): an expert that took no probe token
        return [[None if math.isnan(x) else round(x, 4) for x in row] for row in pref.tolist()]

    return {"teachers": names, "teacher_preference": [rounded(p) for p in prefs],
            "preference_sharpness": [preference_sharpness(p) for p in prefs]}  # fmt: skip


# ----------------------------------------------------------------------------- printing
def fmt_table(res):
    """The readable form of `run`'s result (what is printed without --json)."""
    head = (f"{res['checkpoint']}: {res['model']} {res['method']}, epoch {res['epoch']}; "
            f"{res['data']} val, {res['images']} images")  # fmt: skip
    lines = [head + (f"; route: {res['route']}" if res["route"] else "")]
    names = {"top1": "top-1", "top5": "top-5", "knn_top1": "k-NN top-1"}
    scores = [f"{name} {res[key]:.2f}" for key, name in names.items() if key in res]
    lines.append("   ".join(scores) or "no classifier: no top-1 (--knn: the k-NN top-1)")
    if not res["moe_layers"]:
        return "\n".join(lines + [res["note"]])
    cols = {"routing entropy": res["routing_entropy"], "dropped": res["dropped_frac"],
            "busiest expert ×E": [max(u) * len(u) for u in res["utilisation"]],
            "teacher agreement": res.get("teacher_agreement"),
            "teacher-preference sharpness": res.get("preference_sharpness"),
            f"consistency vs {res.get('compare')}": res.get("consistency")}  # fmt: skip
    cols = {k: v for k, v in cols.items() if v is not None}
    lines += ["", "| MoE block | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, block in enumerate(res["moe_layers"]):
        lines.append(f"| {block} | " + " | ".join(f"{v[i]:.3f}" for v in cols.values()) + " |")
    for block, u in zip(res["moe_layers"], res["utilisation"]):
        lines.append(f"utilisation, block {block}: " + " ".join(f"{x:.3f}" for x in u))
    for block, pref in zip(res["moe_layers"], res.get("teacher_preference", [])):
        lines += ["", f"teacher preference, block {block} (mean π over each expert's tokens)",
                  "| expert | " + " | ".join(res["teachers"]) + " |",
                  "|---" * (len(res["teachers"]) + 1) + "|"]  # fmt: skip
        lines += [f"| {e} | " + " | ".join("-" if x is None else f"{x:.3f}" for x in row) + " |"
                  for e, row in enumerate(pref)]  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command line
# python eval.py --checkpoint RUN/checkpoint.pt [--route student|teacher] [--compare B.pt]
#                [--data ... --data-path ...] [--json] [--plots DIR]
def run(opts):
    """Evaluate opts.checkpoint; returns the result dict (what --json prints)."""
    plt = require_matplotlib() if opts.plots else None  # fail before the slow part
    check_routing(1, 1, opts.eval_capacity_factor)  # one line for a capacity factor <= 0
    device = torch.device(opts.device)
    model, args, ckpt = load_run(
        opts.checkpoint, device, eval_capacity_factor=opts.eval_capacity_factor
    )
    for name in ("data", "data_path", "batch_size"):  # None: keep the run's value
        if getattr(opts, name) is not None:
            setattr(args, name, getattr(opts, name))
    val_set, classes = build_dataset(False, args)  # the validation split only
    if not isinstance(model.head, nn.Identity) and classes != model.head.out_features:
        raise EvalError(f"--data {args.data} has {classes} classes, the checkpoint's head "
                        f"{model.head.out_features}: give the run's data")  # fmt: skip
    has_router = ckpt.get("teacher_router") is not None
    if opts.route == "teacher" and not has_router:
        raise EvalError(f"--route teacher: {opts.checkpoint} ({args.method}) has no teacher "
                        "router (tgr and teacher-route runs save one)")  # fmt: skip
    teacher = None
    if has_router:  # the teacher router: to route by (--route teacher) or to compare with
        try:
            teacher = load_teacher_route(model, ckpt, device, source=opts.teacher)
        except TeacherError as err:  # student routing needs no teacher: measure the rest
            if opts.route == "teacher":
                raise
            print(f"note: no teacher agreement: {err} (give the run's --teacher)", file=sys.stderr)
    cuda, amp_dtype = device.type == "cuda", torch.bfloat16 if device.type == "cuda" else None

    def batches(data):
        return torch.utils.data.DataLoader(data, batch_size=args.batch_size, pin_memory=cuda,
                                           num_workers=opts.num_workers)  # fmt: skip

    loader = batches(val_set)
    res = {"checkpoint": str(opts.checkpoint), "model": args.model, "method": args.method,
           "epoch": ckpt.get("epoch"), "data": args.data, "images": len(val_set),
           "route": opts.route if model.moe_layers else None}  # fmt: skip
    res.update(evaluate(model, loader, device, teacher=teacher, amp_dtype=amp_dtype,
                        route_by_teacher=opts.route == "teacher"))  # fmt: skip
    if opts.knn:  # the bank: the train split through the evaluation transform
        bank = batches(build_dataset(True, args, augment=False)[0])
        res["knn_top1"] = knn_eval(model, bank, loader, device, opts.knn_k, opts.knn_temperature,
                                   amp_dtype)  # fmt: skip
    res["moe_layers"], res["num_experts"] = list(model.moe_layers), model.num_experts
    if not model.moe_layers:
        res["note"] = "dense: no routing"
    if opts.compare:
        other, _, _ = load_run(opts.compare, device, "--compare", opts.eval_capacity_factor)
        res["compare"] = str(opts.compare)
        res["consistency"] = compare(model, other, val_set, opts, device)
    res.update(preference_result(model, ckpt, args, val_set, opts, device))  # M²oT with π
    if plt is not None:
        log = Path(opts.checkpoint).with_name("log.jsonl")
        history = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        images = probe_images(val_set, opts.map_images).to(device)  # (n, 3, S, S)
        maps = expert_maps(model, images, teacher)
        res["plots"] = write_plots(plt, Path(opts.plots), res, history, images, maps)
    return res


def get_args_parser():
    p = ArgumentParser(description="accuracy and routing analytics of a train.py run")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt")
    p.add_argument("--route", choices=["student", "teacher"], default="student",
                   help="who chooses the experts (teacher: tgr / teacher-route runs)")  # fmt: skip
    p.add_argument("--compare", default="", help="another checkpoint of the same architecture")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plots", default="", help="folder for the PNG figures (needs matplotlib)")
    p.add_argument("--teacher", default=None, help="the run's teacher, if it has moved")
    p.add_argument("--data", default=None, help="default: the run's --data")
    p.add_argument("--data-path", default=None, help="default: the run's --data-path")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    p.add_argument("--eval-capacity-factor", type=float, default=None,
                   help="capacity factor at evaluation (default: the run's)")  # fmt: skip
    p.add_argument("--knn", action="store_true",
                   help="k-NN top-1 of the CLS embedding (reads the train split)")  # fmt: skip
    p.add_argument("--knn-k", type=int, default=20, help="neighbours that vote (DINO's 20)")
    p.add_argument("--knn-temperature", type=float, default=0.07,
                   help="T of the votes' weights exp(cos / T) (DINO's 0.07)")  # fmt: skip
    p.add_argument("--probe-size", type=int, default=256,
                   help="images for --compare and the teacher preference")  # fmt: skip
    p.add_argument("--map-images", type=int, default=4, help="images in expert_maps.png")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv=None):
    opts = get_args_parser().parse_args(argv)
    res = run_cli(run, opts)
    print(json.dumps(res) if opts.json else fmt_table(res))
    return res


if __name__ == "__main__":
    main()
