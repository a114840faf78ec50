"""M²oT's losses, each a small pure function: distillation, specialisation, balance, and the
variants tried to make the experts split the teachers.

The idea
--------
A student of several teachers learns, without labels, from three terms (M²oT Eq. 10):

    L = L_dist + λ_1 · L_tas + λ_2 · L_switch

L_dist pulls the student's projected features toward each teacher's (Eq. 2), L_tas pulls
each *expert's* output toward its own mixture of teachers (Eq. 8, or its MAP form, Eq. 6-7),
and L_switch keeps the experts' loads even (the Switch Transformer's f·P loss). m2ot.py
builds their inputs (heads, π, the teachers' standardised targets) and sums them over
teachers and MoE layers; here each is written once, with its equation above the code.

| function                    | term                                        | paper              |
|-----------------------------|---------------------------------------------|--------------------|
| `feature_distill_per_image` | L_dist, one teacher and kind of token, per image | M²oT eq. (2)  |
| `feature_distill_loss`      | its mean over the images                    | M²oT eq. (2); UNIC |
| `teacher_drop_mask`         | which teachers count (`--teacher-drop`)     | UNIC               |
| `tas_loss`                  | L_tas (`--tas-form mixture`)                | M²oT eq. (8)       |
| `tas_map_loss`              | L_tas (`--tas-form map`)                    | M²oT eq. (6)-(7)   |
| `tas_heads_loss`            | L_tas through heads (`--tas-form heads`)    | a variant          |
| `pi_balance_loss`           | π's teacher shares even (`--pi-balance`)    | a variant          |
| `switch_load_loss`          | L_switch (λ_2), top-1 or all K choices      | Switch eq. (4)     |

Legend: h_i(x) `pred`, T_i(x) `target` (..., d) in Eq. 2, one teacher and one kind of token;
in Eq. 8, φ(t, e) `expert_out` (T, K, D) the output of the expert of each of token t's K
assignments, p_e(t) `probs` (T, K) the clean router softmax of that expert, `kept` (T, K) False
where capacity dropped the assignment, π(t, e, i) `pi` (T, K, N_T) the teacher-aware router's
softmax over teachers for that expert, T_i(t) `targets[i]` (T, D) teacher i's target
already mapped to width D (m2ot.py's Q_i T_i), T̄(t, e) = Σ_i π(t, e, i)·T_i(t) the expert's
target; `tas_map_loss` weighs each teacher's own distance instead, Σ_i π(t, e, i)·‖φ − T_i‖₁.
Letters: T tokens, K top-k, D width, N_T teachers (N is the house's letter for the tokens of
an image, so teachers take N_T).
p (T, E) in `switch_load_loss` is the clean router softmax, `chosen` (T,) each token's first
choice, or (T, K) all of its K choices.

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
* `channels="sum"` (`--tas-norm sum`) takes ‖·‖₁ as Eq. 8 writes it, summed over the D
  channels: D times the mean, so λ_1 weighs L_tas D times more.
* `tas_heads_loss` compares g_i(φ) with T_i, g_i a learnable linear map D -> d_i per teacher
  and MoE layer (m2ot.py), in place of a fixed Q_i: the expert need only *carry* teacher i's
  features, in any basis, not write them in Q_i's. π weighs each teacher's distance outside
  the norm, as in the MAP form (a mixture of targets of different widths has no meaning).
* `teacher_drop_mask` follows UNIC's teacher dropping: per image, the teacher the student fits
  worst is always kept and every other is dropped with probability p; the kept losses are not
  rescaled (UNIC's coefficients are 0 or 1).
* `pi_balance_loss` is N_T · Σ_i s_i², s_i the mean of π(t, e, i) over tokens and *all*
  experts: 1 when the experts' mixtures share the teachers evenly, N_T when every expert of
  every token leans to one teacher (the Switch loss's shape, on π instead of the router).
* The M²oT losses detach the teacher side (frozen teachers) and compute in float32, so bf16
  activations under autocast give a float32 loss.
"""

import torch
import torch.nn.functional as F

from losses import flatten_tokens


def switch_load_loss(p, chosen):
    """The Switch Transformer's load loss of one MoE layer -> scalar. p (..., E) the clean
    softmax; chosen (T,) each token's top-1 expert, or (T, K) all K choices (`--switch-choices
    all`): f then counts every assignment, each f_e a share of the T·K choices."""
    # L_switch = E · Σ_e f_e · P_e,  f_e = share of the choices that went to e,
    # P_e = (1/T) Σ_t p_{t,e}; equals 1 under perfectly uniform routing
    p = flatten_tokens(p)  # (T, E), at least float32
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    E = p.shape[-1]
    chosen = chosen.reshape(-1)  # (T,) or (T·K,)
    # counts by index_add in float32 (bincount's output size depends on the data, which breaks
    # a torch.compile graph; bf16 would round counts above 256)
    f = p.new_zeros(E).index_add_(0, chosen, p.new_ones(chosen.shape)) / chosen.numel()  # (E,)
    return E * (f * p.mean(dim=0)).sum()


def feature_distill_per_image(pred, target, beta=1.0):
    """M²oT Eq. 2 for one teacher and one kind of token, per image: (B, d) or (B, N, d) -> (B,).

    Reductions as in UNIC (see the module's decisions): 1 − cos per token, averaged over the
    image's tokens; smooth-L1 averaged over its tokens and channels; the two added with weight 1.
    """
    # D_b = (1/N) Σ_n (1 − cos(h_bn, y_bn)) + (1/(N·d)) Σ_{n,c} smoothL1_β(h_bnc − y_bnc)
    #   h = h_i(x) the student's projected features, y = T_i(x) the teacher's
    # smoothL1_β(x) = ½x²/β if |x| < β else |x| − ½β
    # The target is detached: it is a frozen teacher's feature, and the loss must move only
    # the student (its projector and backbone).
    pred = pred.float()
    target = target.detach().float()
    if pred.dim() == 2:  # CLS tokens: one token per image
        pred = pred.unsqueeze(1)  # (B, 1, d)
        target = target.unsqueeze(1)  # (B, 1, d)
    cos = 1.0 - F.cosine_similarity(pred, target, dim=-1).mean(dim=1)  # (B,) direction
    sl1 = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").mean(dim=(1, 2))  # (B,)
    return cos + sl1  # (B,)


def feature_distill_loss(pred, target, beta=1.0):
    """M²oT Eq. 2 for one teacher and one kind of token (CLS or patches) -> scalar: the mean
    over images of `feature_distill_per_image` (every image has as many tokens)."""
    return feature_distill_per_image(pred, target, beta).mean()


def teacher_drop_mask(per_image, p, generator=None):
    """UNIC's teacher dropping: which (teacher, image) losses count, (N_T, B) of 0. and 1.

    per_image (N_T, B): each teacher's distillation loss on each image. The teacher with the
    highest loss on an image (the one the student fits worst) is always kept; every other is
    dropped with probability p, independently per image.
    """
    # keep_{i,b} = 1[i = argmax_j L_{j,b}]  or  1[u_{i,b} ≥ p],   u ~ U(0, 1)
    worst = per_image.argmax(dim=0)  # (B,)
    is_worst = torch.arange(per_image.shape[0], device=per_image.device).unsqueeze(1) == worst
    u = torch.rand(per_image.shape, device=per_image.device, generator=generator)  # (N_T, B)
    return (is_worst | (u >= p)).float()  # (N_T, B)


def reduce_channels(gap, channels):
    """‖·‖₁ of a (..., D) gap: a mean over the channels (the default) or a sum (Eq. 8 as
    written)."""
    return gap.abs().sum(dim=-1) if channels == "sum" else gap.abs().mean(dim=-1)


def tas_loss(expert_out, probs, kept, pi, targets, channels="mean"):
    """M²oT Eq. 8, the teacher-aware specialisation loss of one MoE layer -> scalar.

    expert_out φ (T, K, D), probs p (T, K), kept (T, K) bool, pi π (T, K, N_T) and
    targets (N_T, T, D) the teachers' features: see the legend; channels: ‖·‖₁ as a "mean"
    over the D channels or a "sum". The caller sums it over the MoE layers.
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
    return (probs.float() * reduce_channels(gap, channels)).sum(dim=-1).mean()


def tas_map_loss(expert_out, probs, kept, pi, targets, channels="mean"):
    """The MAP form of TAS (M²oT Eq. 6-7 before its first approximation) -> scalar.

    The same inputs as `tas_loss`; π weighs each teacher's distance *outside* the norm.
    """
    # L_map = (1/T) Σ_t Σ_{k kept} p_{e_k}(t) · Σ_i π(t,e_k,i) · (1/D) Σ_c |φ(t,e_k)_c − T_i(t)_c|
    # Σ_i π_i ‖φ − T_i‖₁ ≥ ‖φ − Σ_i π_i T_i‖₁ (the triangle inequality): unlike Eq. 8 it is
    # lowest where π sits on the teacher nearest φ and φ on that teacher, not on a mixture.
    # One φ serves every teacher: `pi_weighted_distance` with predictions [φ, φ, ...].
    predictions = [expert_out.float()] * len(targets)  # N_T × (T, K, D), one tensor
    return pi_weighted_distance(predictions, probs, kept, pi, targets, channels)


def tas_heads_loss(predictions, probs, kept, pi, targets, channels="mean"):
    """TAS through learnable heads (`--tas-form heads`) -> scalar.

    predictions: [g_i(φ) (T, K, d_i)] per teacher, each expert output through teacher i's
    head; targets: [T_i (T, d_i)] the teachers' standardised features in their own widths;
    probs, kept, pi as in `tas_loss`.
    """
    # L = (1/T) Σ_t Σ_{k kept} p_{e_k}(t) · Σ_i π(t,e_k,i) · ‖g_i(φ(t,e_k)) − T_i(t)‖₁
    # The MAP form with g_i(φ) in place of φ and T_i in place of Q_i T_i: an expert is near
    # teacher i when a linear read-out of its output is, whatever basis it writes in.
    return pi_weighted_distance(predictions, probs, kept, pi, targets, channels)


def pi_weighted_distance(predictions, probs, kept, pi, targets, channels="mean"):
    """Σ_i π_i · ‖prediction_i − T_i‖₁ per kept assignment, p-weighted, mean over tokens: the
    MAP form's sum (φ for every teacher) and the heads form's (g_i(φ) for teacher i).

    predictions: N_T × (T, K, d_i); targets: N_T × (T, d_i) (frozen: detached); probs, kept,
    pi as in `tas_loss`.
    """
    # L = (1/T) Σ_t Σ_{k kept} p_{e_k}(t) · Σ_i π(t,e_k,i) · ‖prediction_i(t,e_k) − T_i(t)‖₁
    keep = kept.unsqueeze(-1)  # (T, K, 1)
    gaps = []  # a teacher at a time (autograd still keeps N_T × (T, K, d_i))
    for y, t in zip(predictions, targets):
        gap = torch.where(keep, y.float() - t.detach().float().unsqueeze(1), 0.0)  # (T, K, d_i)
        # a dropped assignment is masked before |·|: no value and no gradient reaches it
        gaps.append(reduce_channels(gap, channels))  # (T, K)
    per_teacher = torch.stack(gaps, dim=-1)  # (T, K, N_T)
    return (probs.float() * (pi.float() * per_teacher).sum(dim=-1)).sum(dim=-1).mean()


def pi_balance_loss(mix):
    """π's teacher shares kept even across the experts (`--pi-balance`) -> scalar.

    mix: π (T, E, N_T), every expert's mixture for every token of one MoE layer.
    """
    # L_bal = N_T · Σ_i s_i²,  s_i = (1/(T·E)) Σ_{t,e} π(t, e, i)
    # 1 when the teachers get equal shares, N_T when every mixture sits on one teacher: with
    # π sharp, the only way down is to give each teacher its share of the experts
    share = mix.float().mean(dim=(0, 1))  # (N_T,)
    return share.numel() * (share**2).sum()
