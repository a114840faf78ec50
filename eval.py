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

`evaluate` runs a model over a data loader and returns top-1/top-5 and the per-layer metrics;
`train.py` logs them every epoch, and logs the adjacent-epoch consistency from
`probe_assignments` (the previous epoch's top-1 experts of a fixed probe batch).

Letters: T tokens (B·N), E experts, K choices per token.

Decisions where the papers are silent
-------------------------------------
* Utilisation and consistency read the top-1 of the *clean* p, so router noise (training only)
  and capacity dropping do not move them: they describe what the router prefers.
* The dropped fraction counts tokens that no expert processed (the residual alone carried
  them). With K = 1 that is the fraction of dropped assignments; with expert choice it is the
  fraction of tokens no expert picked; Soft MoE drops nothing.
* Under DDP every rank evaluates its shard and the counts are summed across ranks, so the
  numbers are those of the whole validation set (DistributedSampler pads with a few repeats).
"""

import math

import torch
import torch.distributed as dist


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
    return float((s == t).float().mean())


# ----------------------------------------------------------------------------- model passes
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
def evaluate(model, loader, device, *, route=None, amp_dtype=None):
    """Top-1/top-5 accuracy and per-MoE-layer utilisation, entropy and dropped fraction.

    route: optional callable images -> list of (B, N, E) logits that choose the experts
    (teacher-route mode, TGR sec. 5.3); amp_dtype: autocast dtype on CUDA (e.g. bf16).
    Returns a dict of floats and per-layer lists.
    """
    was_training = model.training
    model.eval()
    correct1, correct5, seen = torch.zeros(3, dtype=torch.float64, device=device).unbind()
    counts = dropped = tokens = None  # (layers, E), (layers,), (layers,)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            logits, routings = model(images, route=route(images) if route else None)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
        hit = top == targets.unsqueeze(1)  # (B, 5)
        correct1 = correct1 + hit[:, 0].sum()
        correct5 = correct5 + hit.any(dim=1).sum()
        seen = seen + targets.numel()
        if routings and counts is None:
            E = routings[0].num_experts
            counts = torch.zeros(len(routings), E, dtype=torch.float64, device=device)
            dropped = torch.zeros(len(routings), dtype=torch.float64, device=device)
            tokens = torch.zeros(len(routings), dtype=torch.float64, device=device)
        for i, r in enumerate(routings):
            T = r.probs.shape[0]
            counts[i] += torch.bincount(top1_experts(r), minlength=counts.shape[1])
            dropped[i] += dropped_fraction(r) * T
            tokens[i] += T
    stats = [correct1, correct5, seen] + ([counts, dropped, tokens] if counts is not None else [])
    if dist.is_available() and dist.is_initialized():
        for t in stats:
            dist.all_reduce(t)  # sum over ranks: every rank saw its own shard
    model.train(was_training)
    out = {"top1": float(100 * correct1 / seen)}
    if logits.shape[-1] >= 5:
        out["top5"] = float(100 * correct5 / seen)
    if counts is not None:
        util = counts / counts.sum(dim=1, keepdim=True)  # (layers, E)
        out["utilisation"] = [[round(float(u), 4) for u in row] for row in util]
        out["routing_entropy"] = [normalised_entropy(row) for row in util]
        out["dropped_frac"] = [float(d / t) for d, t in zip(dropped, tokens)]
    return out
