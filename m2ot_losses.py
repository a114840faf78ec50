"""M²oT's three losses, each a small pure function: distillation, specialisation, balance.

The idea
--------
A student of several teachers learns, without labels, from three terms (M²oT Eq. 10):

    L = L_dist + λ_1 · L_tas + λ_2 · L_switch

L_dist pulls the student's projected features toward each teacher's (Eq. 2), L_tas pulls
each *expert's* output toward its own mixture of teachers (Eq. 8, or its MAP form, Eq. 6-7),
and L_switch keeps the experts' loads even (the Switch Transformer's f·P loss). m2ot.py
builds their inputs (heads, π, the teachers' standardised targets) and sums them over
teachers and MoE layers; here each is written once, with its equation above the code.

| function               | term                                   | paper                       |
|------------------------|----------------------------------------|-----------------------------|
| `feature_distill_loss` | L_dist, one teacher, CLS or patches    | M²oT eq. (2); UNIC          |
| `tas_loss`             | L_tas (`--tas-form mixture`)           | M²oT eq. (8)                |
| `tas_map_loss`         | L_tas (`--tas-form map`)               | M²oT eq. (6)-(7)            |
| `switch_load_loss`     | L_switch (λ_2)                         | Switch Transformer eq. (4)  |

Legend: h_i(x) `pred`, T_i(x) `target` (..., d) in Eq. 2, one teacher and one kind of token;
in Eq. 8, φ(t, e) `expert_out` (T, K, D) the output of the expert of each of token t's K
assignments, p_e(t) `probs` (T, K) the clean router softmax of that expert, `kept` (T, K) False
where capacity dropped the assignment, π(t, e, i) `pi` (T, K, N_T) the teacher-aware router's
softmax over teachers for that expert, T_i(t) `targets[i]` (T, D) teacher i's target
already mapped to width D (m2ot.py's Q_i T_i), T̄(t, e) = Σ_i π(t, e, i)·T_i(t) the expert's
target; `tas_map_loss` weighs each teacher's own distance instead, Σ_i π(t, e, i)·‖φ − T_i‖₁.
Letters: T tokens, K top-k, D width, N_T teachers (N is the house's letter for the tokens of
an image, so teachers take N_T).
p (T, E) in `switch_load_loss` is the clean router softmax, `top1` (T,) each token's first
choice.

Decisions where the papers are silent
-------------------------------------
* `feature_distill_loss` follows UNIC's `modeling/losses.py` (naver/unic), which M²oT cites
  for both distances: per token 1 − cos over the channels, smooth-L1 (β = 1) averaged over the
  channels, each averaged over tokens (UNIC averages patches per image, then images: the same
  number when every image has as many tokens). Their sum is unweighted, as Eq. 2 writes it;
  UNIC weights each term 0.5 (`--lam_lcos`, `--lam_lsl1`), so its value is half of ours.
  Summing or averaging over teachers and over CLS/patch is the caller's (UNIC averages both).
* `tas_loss`: Eq. 8's ‖·‖_1 is taken as a mean over channels, not a sum, so the value does not
  grow with D (Table 1's L_tas, 1.45 to 3.27 summed over six layers, fits a per-channel mean
  on standardised targets; a sum over 768 channels would be in the hundreds). p is the clean
  softmax ("softmax(r(x))"), not the combine weight; a dropped assignment adds nothing and
  sends no gradient to its expert, and 1/T still counts every token (a token with all its
  assignments dropped adds 0).
* `tas_map_loss` is Eq. 7 with Eq. 6's weighted median not yet replaced by the weighted mean:
  φ stands in for the latent target, so the loss is the MAP objective's negative
  log-likelihood at φ (Laplace noise, ‖·‖₁ a mean over channels as above), π for w_i.
* The M²oT losses detach the teacher side (frozen teachers) and compute in float32, so bf16
  activations under autocast give a float32 loss.
"""

import torch
import torch.nn.functional as F

from losses import flatten_tokens


def switch_load_loss(p, top1):
    # L_switch = E · Σ_e f_e · P_e,  f_e = fraction of tokens whose top-1 is e,
    # P_e = (1/T) Σ_t p_{t,e}; equals 1 under perfectly uniform routing
    p = flatten_tokens(p)  # (T, E), at least float32
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    E = p.shape[-1]
    top1 = top1.reshape(-1)  # (T,)
    # counts by index_add in float32 (bincount's output size depends on the data, which breaks
    # a torch.compile graph; bf16 would round counts above 256)
    f = p.new_zeros(E).index_add_(0, top1, p.new_ones(top1.shape)) / top1.numel()  # (E,)
    return E * (f * p.mean(dim=0)).sum()


def feature_distill_loss(pred, target, beta=1.0):
    """M²oT Eq. 2 for one teacher and one kind of token (CLS or patches); (..., d) -> scalar.

    Reductions as in UNIC (see the module's decisions): 1 − cos per token, averaged over
    tokens; smooth-L1 averaged over tokens and channels; the two added with weight 1.
    """
    # L_cos + L_sl1 = (1/T) Σ_t (1 − cos(h_t, y_t)) + (1/(T·d)) Σ_{t,c} smoothL1_β(h_tc − y_tc)
    #   h = h_i(x) the student's projected features, y = T_i(x) the teacher's
    # smoothL1_β(x) = ½x²/β if |x| < β else |x| − ½β
    # The target is detached: it is a frozen teacher's feature, and the loss must move only
    # the student (its projector and backbone).
    pred = flatten_tokens(pred).float()  # (T, d)
    target = flatten_tokens(target).detach().float()  # (T, d)
    cos = 1.0 - F.cosine_similarity(pred, target, dim=-1).mean()  # scale-invariant: direction
    sl1 = F.smooth_l1_loss(pred, target, beta=beta)  # mean over T and d: magnitude too
    return cos + sl1


def tas_loss(expert_out, probs, kept, pi, targets):
    """M²oT Eq. 8, the teacher-aware specialisation loss of one MoE layer -> scalar.

    expert_out φ (T, K, D), probs p (T, K), kept (T, K) bool, pi π (T, K, N_T) and
    targets (N_T, T, D) the teachers' features: see the legend. The caller sums it over the
    MoE layers.
    """
    # T̄(t, e) = Σ_i π(t, e, i) · T_i(t)                 each expert's own mixture of teachers
    # L_tas = (1/T) Σ_t Σ_{k kept} p_{e_k}(t) · (1/D) Σ_c |φ(t, e_k)_c − T̄(t, e_k)_c|
    # The teachers are frozen: their features are detached, so the loss moves the experts
    # (φ), the router (p) and the teacher-aware router (π), never a teacher.
    targets = targets.detach().float()  # (N_T, T, D)
    t_bar = torch.einsum("tkn,ntd->tkd", pi.float(), targets)  # (T, K, D)
    # a dropped assignment is masked before |·|: no value and no gradient (not even a NaN
    # from whatever its slot of expert_out holds) reaches its expert, p or π
    gap = torch.where(kept.unsqueeze(-1), expert_out.float() - t_bar, 0.0)  # (T, K, D)
    return (probs.float() * gap.abs().mean(dim=-1)).sum(dim=-1).mean()


def tas_map_loss(expert_out, probs, kept, pi, targets):
    """The MAP form of TAS (M²oT Eq. 6-7 before its first approximation) -> scalar.

    The same inputs as `tas_loss`; π weighs each teacher's distance *outside* the norm.
    """
    # L_map = (1/T) Σ_t Σ_{k kept} p_{e_k}(t) · Σ_i π(t,e_k,i) · (1/D) Σ_c |φ(t,e_k)_c − T_i(t)_c|
    # Σ_i π_i ‖φ − T_i‖₁ ≥ ‖φ − Σ_i π_i T_i‖₁ (the triangle inequality): unlike Eq. 8 it is
    # lowest where π sits on the teacher nearest φ and φ on that teacher, not on a mixture.
    targets = targets.detach().float()  # (N_T, T, D) frozen teachers, as in tas_loss
    phi = expert_out.float()  # (T, K, D)
    keep = kept.unsqueeze(-1)  # (T, K, 1)
    gaps = [  # a teacher at a time (autograd still keeps N_T × (T, K, D): N_T× Eq. 8's memory)
        torch.where(keep, phi - t.unsqueeze(1), 0.0).abs().mean(dim=-1) for t in targets
    ]  # N_T × (T, K)
    per_teacher = torch.stack(gaps, dim=-1)  # (T, K, N_T)
    return (probs.float() * (pi.float() * per_teacher).sum(dim=-1)).sum(dim=-1).mean()
