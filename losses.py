"""Every auxiliary routing and distillation objective, as a small pure function.

The idea
--------
A sparse router left alone to the task loss collapses (a few experts take every token) or
flickers (the same token changes expert from step to step). Each function here is one of
the answers in the literature. They take routing tensors and return a scalar; leading
dimensions are flattened to tokens, so (B, N, E) and (T, E) inputs mean the same thing.
They are computed unweighted; `train.py` weights them with coefficients from its flags and
logs every part. M²oT (SPEC section 9) adds two more: its feature-distillation loss, and the
teacher-aware specialisation loss that pulls each expert toward its own mixture of teachers.

| function               | used by                                   | paper                       |
|------------------------|-------------------------------------------|-----------------------------|
| `importance_loss`      | V-MoE student; TGR teacher router (L_load)| V-MoE eq. (4); TGR sec. 3.2 |
| `load_loss`            | V-MoE student                             | V-MoE eq. (5)-(8)           |
| `entropy_loss`         | TGR teacher router (L_ent)                | TGR sec. 3.2                |
| `routing_kl`           | TGR student (L_distill)                   | TGR sec. 3.3                |
| `z_loss`               | `--method zloss`                          | ST-MoE eq. (5)              |
| `switch_load_loss`     | M²oT student (λ_2)                        | Switch Transformer eq. (4)  |
| `feature_distill_loss` | M²oT student (m2ot.py)                    | M²oT eq. (2); UNIC          |
| `tas_loss`             | M²oT student (m2ot.py)                    | M²oT eq. (8)                |
| `tas_map_loss`         | M²oT student, `--tas-form map`            | M²oT eq. (6)-(7)            |

Legend: p `probs` (T, E) clean softmax; Imp_e importance of expert e; Φ the standard normal
CDF; p_t the teacher router's distribution; sg stop-gradient (`.detach()`); σ `noise_std` of
`load_loss` is the std of the noise that was added to the logits (the router's σ/E,
`Routing.logit_noise_std`).

M²oT: h_i(x) `pred`, T_i(x) `target` (..., d) in Eq. 2, one teacher and one kind of token;
in Eq. 8, φ(t, e) `expert_out` (T, K, D) the output of the expert of each of token t's K
assignments, p_e(t) `probs` (T, K) the clean router softmax of that expert, `kept` (T, K) False
where capacity dropped the assignment, π(t, e, i) `pi` (T, K, N_T) the teacher-aware router's
softmax over teachers for that expert, T_i(t) `targets[i]` (T, D) teacher i's target
already mapped to width D (SPEC's Q_i T_i), T̄(t, e) = Σ_i π(t, e, i)·T_i(t) the expert's
target; `tas_map_loss` weighs each teacher's own distance instead, Σ_i π(t, e, i)·‖φ − T_i‖₁.
Letters: T tokens, K top-k, D width, N_T teachers (N is the house's letter for the tokens of
an image, so teachers take SPEC's N_T).

Decisions where the papers are silent
-------------------------------------
* V-MoE computes importance and load losses per group of images (the groups it routes and
  caps capacity in) and averages them. `importance_loss` and `load_loss` take `groups=G`:
  the tokens are G equal, contiguous groups (router.py's layout), CV² is taken per group and
  averaged. The default G = 1 is the batch-level value. The trainer passes the routing's
  `num_groups`; TGR's teacher router has no capacity and no groups, so its L_imp stays
  batch-level.
* `load_loss` with `noise_std = 0` (noise off) uses the σ -> 0 limit of Φ, a hard indicator
  of "at or above the threshold": the value is still the CV², it just has no gradient.
* `routing_kl` takes probabilities (the spec's signature) or, with `from_logits=True`,
  logits: the trainer uses logits so that no log of a tiny probability is ever taken.
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


def _tokens(x):
    """(..., E) -> (T, E): every leading dimension is a token dimension."""
    return x.reshape(-1, x.shape[-1])  # (T, E)


def _group_mean(x, groups):
    """(T, E) -> (G, E): the mean over each of G equal, contiguous groups of tokens."""
    if x.shape[0] % groups:
        raise ValueError(f"{x.shape[0]} tokens do not split into {groups} equal groups")
    return x.reshape(groups, -1, x.shape[-1]).mean(dim=1)  # (G, E)


def _cv_squared(v):
    """(std(v) / mean(v))² along the last dim, population std: 0 iff all entries are equal."""
    return (v.std(dim=-1, unbiased=False) / v.mean(dim=-1)) ** 2


def importance_loss(p, groups=1):
    # Imp_{g,e} = (1/S) Σ_{t∈g} p_{t,e};   L_imp = (1/G) Σ_g (std(Imp_g) / mean(Imp_g))²
    importance = _group_mean(_tokens(p), groups)  # (G, E)
    return _cv_squared(importance).mean()


def load_loss(logits, noisy_logits, noise_std, k, groups=1):
    # threshold_t = k-th largest noisy logit of token t
    # P_{t,e} = P(e still in the top-k under fresh noise) = 1 − Φ((threshold_t − logits_{t,e}) / σ)
    # L_load = (1/G) Σ_g CV²(mean_{t∈g} P_{t,e})
    logits, noisy_logits = _tokens(logits), _tokens(noisy_logits)  # (T, E)
    threshold = noisy_logits.topk(k, dim=-1).values[:, -1:]  # (T, 1)
    if noise_std > 0:  # Φ = torch.special.ndtr (no argument validation: no host sync)
        prob_selected = 1.0 - torch.special.ndtr((threshold - logits) / noise_std)  # (T, E)
    else:  # σ -> 0: the CDF becomes a step
        prob_selected = (logits >= threshold).to(logits.dtype)  # (T, E)
    return _cv_squared(_group_mean(prob_selected, groups)).mean()


def entropy_loss(p):
    # L_ent = −(1/T) Σ_t Σ_e p_{t,e} log p_{t,e}   (minimised: confident assignments)
    p = _tokens(p)  # (T, E)
    return -torch.special.xlogy(p, p).sum(dim=-1).mean()  # xlogy: 0·log 0 = 0


def routing_kl(p_student, p_teacher, *, from_logits=False):
    # L_distill = KL(sg(p_t) ‖ p) = (1/T) Σ_t Σ_e p_t,e (log p_t,e − log p_e)
    # The teacher side is detached: the KL moves the student router toward the teacher's
    # distribution and must never move the teacher router toward the student (whose
    # routing is the unstable thing we are correcting).
    s, t = _tokens(p_student), _tokens(p_teacher).detach()  # (T, E), (T, E)
    if from_logits:
        log_ps = F.log_softmax(s.float(), dim=-1)  # (T, E)
        log_pt = F.log_softmax(t.float(), dim=-1)  # (T, E)
        return (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1).mean()
    # probabilities: p_t log p_t with xlogy (0 where p_t = 0), minus p_t log p
    return (torch.special.xlogy(t, t) - t * torch.log(s)).sum(dim=-1).mean()


def z_loss(logits):
    # L_z = (1/T) Σ_t (log Σ_e exp(logits_{t,e}))²   keeps router logits small (ST-MoE)
    return _tokens(logits).float().logsumexp(dim=-1).pow(2).mean()


def switch_load_loss(p, top1):
    # L_switch = E · Σ_e f_e · P_e,  f_e = fraction of tokens whose top-1 is e,
    # P_e = (1/T) Σ_t p_{t,e}; equals 1 under perfectly uniform routing
    p = _tokens(p)  # (T, E), at least float32
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    E, top1 = p.shape[-1], top1.reshape(-1)  # top1: (T,)
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
    pred, target = _tokens(pred).float(), _tokens(target).detach().float()  # (T, d)
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
    phi, keep = expert_out.float(), kept.unsqueeze(-1)  # (T, K, D), (T, K, 1)
    gaps = [  # a teacher at a time (autograd still keeps N_T × (T, K, D): N_T× Eq. 8's memory)
        torch.where(keep, phi - t.unsqueeze(1), 0.0).abs().mean(dim=-1) for t in targets
    ]  # N_T × (T, K)
    per_teacher = torch.stack(gaps, dim=-1)  # (T, K, N_T)
    return (probs.float() * (pi.float() * per_teacher).sum(dim=-1)).sum(dim=-1).mean()
