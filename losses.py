"""Every auxiliary routing and distillation objective, as a small pure function.

The idea
--------
A sparse router left alone to the task loss collapses (a few experts take every token) or
flickers (the same token changes expert from step to step). Each function here is one of
the answers in the literature. They take routing tensors and return a scalar; leading
dimensions are flattened to tokens, so (B, N, E) and (T, E) inputs mean the same thing.
They are computed unweighted; `train.py` weights them with coefficients from its flags and
logs every part.

| function               | used by                                   | paper                       |
|------------------------|-------------------------------------------|-----------------------------|
| `importance_loss`      | V-MoE student; TGR teacher router (L_load)| V-MoE eq. (4); TGR sec. 3.2 |
| `load_loss`            | V-MoE student                             | V-MoE eq. (5)-(8)           |
| `entropy_loss`         | TGR teacher router (L_ent)                | TGR sec. 3.2                |
| `routing_kl`           | TGR student (L_distill)                   | TGR sec. 3.3                |
| `z_loss`               | `--method zloss`                          | ST-MoE eq. (5)              |

Legend: p `probs` (T, E) clean softmax; Imp_e importance of expert e; Φ the standard normal
CDF; p_t the teacher router's distribution; sg stop-gradient (`.detach()`); σ `noise_std` of
`load_loss` is the std of the noise that was added to the logits (the router's σ/E,
`Routing.logit_noise_std`).

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
"""

import torch
import torch.nn.functional as F


def flatten_tokens(x):
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
    importance = _group_mean(flatten_tokens(p), groups)  # (G, E)
    return _cv_squared(importance).mean()


def load_loss(logits, noisy_logits, noise_std, k, groups=1):
    # threshold_t = k-th largest noisy logit of token t
    # P_{t,e} = P(e still in the top-k under fresh noise) = 1 − Φ((threshold_t − logits_{t,e}) / σ)
    # L_load = (1/G) Σ_g CV²(mean_{t∈g} P_{t,e})
    logits = flatten_tokens(logits)  # (T, E)
    noisy_logits = flatten_tokens(noisy_logits)  # (T, E)
    threshold = noisy_logits.topk(k, dim=-1).values[:, -1:]  # (T, 1)
    if noise_std > 0:  # Φ = torch.special.ndtr (no argument validation: no host sync)
        prob_selected = 1.0 - torch.special.ndtr((threshold - logits) / noise_std)  # (T, E)
    else:  # σ -> 0: the CDF becomes a step
        prob_selected = (logits >= threshold).to(logits.dtype)  # (T, E)
    return _cv_squared(_group_mean(prob_selected, groups)).mean()


def entropy_loss(p):
    # L_ent = −(1/T) Σ_t Σ_e p_{t,e} log p_{t,e}   (minimised: confident assignments)
    p = flatten_tokens(p)  # (T, E)
    return -torch.special.xlogy(p, p).sum(dim=-1).mean()  # xlogy: 0·log 0 = 0


def routing_kl(p_student, p_teacher, *, from_logits=False):
    # L_distill = KL(sg(p_t) ‖ p) = (1/T) Σ_t Σ_e p_t,e (log p_t,e − log p_e)
    # The teacher side is detached: the KL moves the student router toward the teacher's
    # distribution and must never move the teacher router toward the student (whose
    # routing is the unstable thing we are correcting).
    s = flatten_tokens(p_student)  # (T, E)
    t = flatten_tokens(p_teacher).detach()  # (T, E)
    if from_logits:
        log_ps = F.log_softmax(s.float(), dim=-1)  # (T, E)
        log_pt = F.log_softmax(t.float(), dim=-1)  # (T, E)
        return (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1).mean()
    # probabilities: p_t log p_t with xlogy (0 where p_t = 0), minus p_t log p
    return (torch.special.xlogy(t, t) - t * torch.log(s)).sum(dim=-1).mean()


def z_loss(logits):
    # L_z = (1/T) Σ_t (log Σ_e exp(logits_{t,e}))²   keeps router logits small (ST-MoE)
    return flatten_tokens(logits).float().logsumexp(dim=-1).pow(2).mean()
