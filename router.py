"""How tokens pick experts: noisy top-K token choice (V-MoE) and expert choice.

The idea
--------
A sparse MoE layer has E expert MLPs but runs only K of them per token. A *router*
decides which: a linear map scores every token against every expert,

    logits = x W_r                       x: (T, D) LN2 output, W_r: (D, E), no bias
    p      = softmax(logits)             the clean routing distribution

and the token goes to its K best experts. Two things make this more than an argmax:

* **Noise** (V-MoE, Riquelme et al. 2021, eq. 1). During training Gaussian noise is added
  to the logits before the choice, ε ~ N(0, (σ/E)²), q = softmax(logits + ε). The noisy q
  picks the experts and weights their outputs; the clean p feeds the balance loss, the
  distillation KL and every metric. V-MoE's configs write `noise_std = 1.0  # Actually, it's
  1.0 / num_experts` (google-research/vmoe) and its code divides by E. The TGR paper's Table S1
  says only "Gaussian noise (std 1.0)"; reading it as V-MoE's setting is ours, from its "same
  configuration as VMoE" for every MoE variant.
* **Capacity**. Experts run as batched matmuls over fixed-size buffers, so each expert can
  take at most C tokens per group of S tokens:

      C = ceil(K · S · cf / E), rounded up to a multiple of 4        (V-MoE, cf = 1.05)

  A token's k-th choice is kept only if fewer than C earlier assignments went to that expert;
  the rest are *dropped*: the MoE adds nothing to that token and the residual carries it on.
  "Earlier" means: every token's top-1 choice comes before any top-2 choice (k-major order,
  as V-MoE's dispatcher), and within one k, tokens go in their order in the group, or, with
  batch-priority routing (BPR, Riquelme et al. sec. 4), in decreasing order of their top-1
  weight, so the tokens the router is surest about are the last ones dropped.

**Auxiliary-loss-free balancing** (Wang et al. 2024, used by DeepSeek-V3 sec. 2.1.2) keeps the
load even without a balance loss: a per-expert bias b is added to the scores *for the choice
only*, e = top-K(q + b), while the combine weights stay q; after every training batch each
overloaded expert's b falls and each underloaded one's rises by a fixed step (moe.py's
`update_expert_bias`). No gradient is involved, so the bias cannot pull the router's logits
the way an auxiliary loss does.

Expert choice (Zhou et al. 2022) turns the choice around: each expert takes its top-C tokens
by p, so no expert overflows and no balance loss is needed, but a token may get 0 or many
experts.

The record
----------
Every router returns a `Routing`, the one record losses and metrics read (they never
re-run the router). Tensors are flattened to tokens, T = B·N, in (image, token) order.

Legend (paper -> code): W_r -> `router.weight` (stored as nn.Linear, (E, D)); p -> `probs`;
q -> softmax of `noisy_logits`; C -> `capacity`; S -> `group_size * N`; BPR ->
`batch_priority`.

Decisions where the papers are silent
-------------------------------------
* Combine weights are the noisy q of the chosen experts, *not renormalised* over the K
  (V-MoE does not renormalise), and are set to 0 for dropped assignments: `weights` is
  exactly what multiplies the expert outputs.
* If the batch does not split into groups of `group_size` images (a last, smaller batch),
  the group shrinks to the largest divisor of B not above `group_size`; capacity is computed
  for that group size.
* The selection bias is added to the gate probabilities q (V-MoE's softmax scores), as
  DeepSeek-V3 adds it to its sigmoid affinities, and stays in the choice at evaluation (it is
  part of how the router routes); metrics read argmax (p + b) for such a router.
* When the outside caller supplies the routing logits (teacher-route mode, TGR sec. 5.3),
  they replace the layer's own logits for the choice; the layer's own logits are still
  recorded in `student_logits` so that the distillation KL can pull them along.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Letters: B images, N tokens per image, D width, E experts, K choices per token,
# G groups, S tokens per group, C capacity per expert and group, T = B·N tokens.


@dataclass
class Routing:
    """What one MoE layer decided. Fields that don't apply to a router are None."""

    logits: torch.Tensor | None  # (T, E) logits that routed (clean)
    probs: torch.Tensor | None  # (T, E) clean softmax p
    experts: torch.Tensor | None  # (T, K) long, chosen expert per choice
    weights: torch.Tensor | None  # (T, K) combine weights, 0 where dropped
    kept: torch.Tensor | None  # (T, K) bool, False where capacity dropped it
    noisy_logits: torch.Tensor | None = None  # (T, E) logits + noise (training only)
    logit_noise_std: float = 0.0  # std of the noise added to the logits: σ/E (0 at eval)
    position: torch.Tensor | None = None  # (T, K) long, slot in the expert buffer
    capacity: int = 0  # C per expert and group
    num_groups: int = 1  # G
    student_logits: torch.Tensor | None = None  # (T, E) the layer's own router logits
    expert_out: torch.Tensor | None = None  # (T, K, D) φ, pre-weight; only if the layer keeps it
    inputs: torch.Tensor | None = None  # (T, D) the layer's input x_t; kept with expert_out
    selection_bias: torch.Tensor | None = None  # (E,) b added to the scores to choose (lossfree)

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    def dropped(self) -> torch.Tensor:
        """d = (1/T) Σ_t 1[no kept assignment for token t], the tokens capacity dropped: a
        0-dim tensor (a training step logs it without a host sync); 0 without `kept`."""
        if self.kept is None:
            return torch.zeros(())
        return 1.0 - self.kept.any(dim=-1).float().mean()


def group_size_for(batch: int, group_size: int) -> int:
    """Largest divisor of `batch` that is <= group_size (groups must tile the batch)."""
    g = max(1, min(group_size, batch))
    while batch % g:
        g -= 1
    return g


def check_routing(num_experts: int, k: int, *capacity_factors: float | None) -> None:
    """The one check of the routing settings: K ≤ E and every capacity factor > 0.

    Raises ValueError with one readable line; MoEMLP calls it when it is built (so a bad flag
    fails before any step), the routing functions when they run.
    """
    if k > num_experts:
        raise ValueError(f"top-k ({k}) cannot exceed the number of experts ({num_experts})")
    if any(cf is not None and cf <= 0 for cf in capacity_factors):
        raise ValueError("capacity factor must be > 0 (capacity < 1 token per expert)")


def capacity_for(tokens_per_group: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """C = ceil(K · S · cf / E), rounded up to a multiple of 4 (V-MoE's convention)."""
    check_routing(num_experts, k, capacity_factor)
    c = math.ceil(k * tokens_per_group * capacity_factor / num_experts)
    return 4 * math.ceil(c / 4)


def group_queues(
    experts: torch.Tensor,
    num_groups: int,
    priority: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every group's queue of assignments, k-major: all top-1 choices of the group, then all
    top-2 choices, ...; within one k, tokens in their order in the group, or by decreasing
    `priority` (T,). Returns the queued experts (G, K·S) and the priority order (G, S), or
    None without one (`token_order` undoes it)."""
    T, k = experts.shape
    G = num_groups
    S = T // num_groups  # tokens per group
    expert_g = experts.view(G, S, k)  # (G, S, K)
    order = None
    if priority is not None:  # highest priority first (and so the last dropped)
        order = priority.view(G, S).argsort(dim=1, descending=True)  # (G, S)
        expert_g = expert_g.gather(1, order.unsqueeze(-1).expand(G, S, k))  # (G, S, K) sorted
    return expert_g.transpose(1, 2).reshape(G, k * S), order  # (G, K·S) k-major


def token_order(position: torch.Tensor, order: torch.Tensor | None, k: int) -> torch.Tensor:
    """Queue positions (G, K·S), in queue order, back to (T, K): every position at its token's
    place (the inverse of `group_queues`)."""
    G = position.shape[0]
    S = position.shape[1] // k
    position = position.view(G, k, S).transpose(1, 2)  # (G, S, K)
    if order is not None:  # undo the priority sort
        position = torch.empty_like(position).scatter_(
            1, order.unsqueeze(-1).expand(G, S, k), position
        )  # (G, S, K)
    return position.reshape(G * S, k)  # (T, K)


def queue_positions_one_hot(
    experts: torch.Tensor,
    num_experts: int,
    *,
    num_groups: int,
    priority: torch.Tensor | None = None,
) -> torch.Tensor:
    """`queue_positions` as the textbook computes it, the same numbers (tested): a one-hot of
    every assignment in queue order, counted up by a cumsum. It builds a (G, K·S, E) tensor,
    so its memory and time grow with E: the layer uses the sort of `queue_positions`.

        seen[g, i, e]  = #{assignments 0..i of group g's queue that chose e}
        position(i)    = seen[g, i, e_i] − 1
    """
    queue, order = group_queues(experts, num_groups, priority)  # (G, K·S)

    # count every expert's assignments along the queue, read each one's own count
    seen = F.one_hot(queue, num_experts).cumsum(dim=1)  # (G, K·S, E)
    position = seen.gather(2, queue.unsqueeze(-1)).squeeze(-1) - 1  # (G, K·S)
    return token_order(position, order, experts.shape[1])  # (T, K)


def queue_positions(
    experts: torch.Tensor,
    num_experts: int,
    *,
    num_groups: int,
    priority: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each assignment's place in its expert's queue: (T, K) long, 0 = first in line.

    experts: (T, K) chosen experts, T = num_groups · S tokens, groups contiguous. Each group
    queues as `group_queues` lines it up: k-major, and by decreasing `priority` (T,) if given
    (batch-priority routing passes the top-1 weights).

        position(t, k) = #{earlier assignments in the queue with the same expert}

    The textbook (`queue_positions_one_hot`, above) counts along a (G, K·S, E) one-hot
    tensor. A stable sort by expert gives the same numbers without it, in time and memory that
    do not grow with E: it lines each expert's assignments up in queue order, so an
    assignment's position is its index in the sorted queue minus where its expert's run
    starts, and `searchsorted` on the sorted experts finds every run's start in one call. (The
    sort does not need `num_experts`; the argument stays so that callers do not change.)
    """
    k = experts.shape[1]
    queue, order = group_queues(experts, num_groups, priority)  # (G, K·S)

    # a stable sort keeps queue order among equal experts: expert e's assignments form one
    # run of the sorted queue, in the order they queued
    sorted_experts, by_expert = queue.sort(dim=1, stable=True)  # (G, K·S), (G, K·S)
    # run_start(i) = first index of the sorted queue that holds expert sorted_experts[i]
    run_start = torch.searchsorted(sorted_experts, sorted_experts)  # (G, K·S)
    rank = torch.arange(queue.shape[1], device=queue.device)  # (K·S,) index in the sorted queue
    # position = rank − run_start, written back to the queue slot it was sorted from
    position = torch.empty_like(queue).scatter_(1, by_expert, rank - run_start)  # (G, K·S)
    return token_order(position, order, k)  # (T, K)


def top_k_routing(
    logits: torch.Tensor,
    *,
    k: int,
    capacity_factor: float,
    num_groups: int,
    logit_noise_std: float = 0.0,
    batch_priority: bool = False,
    selection_bias: torch.Tensor | None = None,
) -> Routing:
    """Noisy top-K token choice with capacity, V-MoE semantics.

    logits: (T, E) clean router logits, T = num_groups · S tokens, groups contiguous.
    logit_noise_std: std of the noise added to the logits, σ/E (0 = deterministic, e.g. eval).
    selection_bias: (E,) b, auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2): the experts
    are the top-K of q + b, their combine weights q alone (b chooses, it never weighs).
    """
    T, E = logits.shape
    check_routing(E, k, capacity_factor)
    G = num_groups
    S = T // num_groups  # tokens per group
    probs = logits.softmax(dim=-1)  # (T, E) clean p

    # q = softmax(logits + ε), ε ~ N(0, (σ/E)²): noise only chooses, it never enters the losses
    noisy_logits = None
    if logit_noise_std > 0:
        # one op for logits + σ·ε (add's alpha); torch has no fused noisy softmax
        noisy_logits = torch.add(logits, torch.randn_like(logits), alpha=logit_noise_std)  # (T, E)
        gates = noisy_logits.softmax(dim=-1)  # (T, E) q
    else:
        gates = probs
    if selection_bias is None:
        combine, experts = gates.topk(k, dim=-1)  # (T, K), (T, K)
    else:
        # e_t = top-K_e (q_{t,e} + b_e),  g_{t,k} = q_{t,e_k}: the bias moves the choice only
        experts = (gates + selection_bias).topk(k, dim=-1).indices  # (T, K)
        combine = gates.gather(1, experts)  # (T, K)

    # --- capacity: position of every assignment in its expert's queue, per group ---
    capacity = capacity_for(S, E, k, capacity_factor)
    order = combine[:, 0] if batch_priority else None  # BPR: surest tokens first
    position = queue_positions(experts, E, num_groups=G, priority=order)  # (T, K)
    kept = position < capacity  # (T, K)
    weights = combine * kept  # (T, K) dropped assignments contribute nothing

    return Routing(
        logits=logits,
        probs=probs,
        experts=experts,
        weights=weights,
        kept=kept,
        noisy_logits=noisy_logits,
        logit_noise_std=logit_noise_std,
        position=position,
        capacity=capacity,
        num_groups=G,
        student_logits=logits,
        selection_bias=selection_bias,
    )


def expert_choice_routing(
    logits: torch.Tensor, *, k: int, capacity_factor: float, num_groups: int
) -> Routing:
    """Expert choice: within each group every expert takes its top-C tokens by p.

    C = ceil(K · S · cf / E) so each expert handles about K/E of the tokens, matching the
    compute of top-K token choice (TGR supplementary sec. A). The record is written with one
    column per expert: experts[t, e] = e, kept[t, e] = "expert e took token t", so a token can
    be kept 0..E times; position[t, e] is its slot in expert e's buffer.
    """
    T, E = logits.shape
    check_routing(E, k, capacity_factor)
    G = num_groups
    S = T // num_groups  # tokens per group
    probs = logits.softmax(dim=-1)  # (T, E)
    capacity = min(S, math.ceil(k * S * capacity_factor / E))

    # each expert ranks the group's tokens by p and keeps the best C
    probs_g = probs.view(G, S, E).transpose(1, 2)  # (G, E, S)
    top_p, top_tok = probs_g.topk(capacity, dim=-1)  # (G, E, C), (G, E, C)
    kept = torch.zeros(G, E, S, dtype=torch.bool, device=logits.device)
    kept.scatter_(2, top_tok, True)  # (G, E, S)
    position = torch.zeros(G, E, S, dtype=torch.long, device=logits.device)
    slot = torch.arange(capacity, device=logits.device).expand(G, E, capacity)  # (G, E, C)
    position.scatter_(2, top_tok, slot)  # (G, E, S)

    # the record: one column per expert, tokens in their order
    kept = kept.transpose(1, 2).reshape(T, E)  # (T, E)
    position = position.transpose(1, 2).reshape(T, E)  # (T, E)
    experts = torch.arange(E, device=logits.device).expand(T, E)  # (T, E)
    return Routing(
        logits=logits,
        probs=probs,
        experts=experts,
        weights=probs * kept,  # (T, E)
        kept=kept,
        position=position,
        capacity=capacity,
        num_groups=G,
        student_logits=logits,
    )
