"""Do the experts split the teachers? A measure of the experts themselves (M²oT).

The idea
--------
M²oT's promise is experts that specialise per teacher. Its own readings, π's expert→teacher
preference and its sharpness (m2ot.py), describe π, the router that *assigns* teachers, not
what the experts compute: π can go one-hot while every expert's output sits at the teachers'
mean (docs/m2ot.md). This file reads the experts, per MoE layer, as an expert × teacher
matrix M, two ways:

    representational  R[e, i] = linear CKA between φ(t, e), over the tokens t expert e took,
                      and T_i(t), teacher i's standardised target in its own width: how much
                      of the teacher's geometry the expert's outputs hold, in any rotation
                      (so independent of the fixed Q_i)
    causal            C[e, i] = L_dist,i(x; expert e dropped in this layer) − L_dist,i(x)
                      how much teacher i's distillation loss rises when expert e's
                      assignments are dropped (as capacity drops them), mean over the images

Both are turned into shares the same way. A teacher whose features every expert matters
more for (a harder teacher, a more predictable one) is not a specialisation, so each column
is first made a share of that teacher's total, then each row a distribution:

    A[e, i] = max(M[e, i], 0) / Σ_e' max(M[e', i], 0)     expert e's share of teacher i
    S[e, i] = A[e, i] / Σ_i' A[e, i']                     how expert e divides itself

and read with two indices:

    SI = mean_e max_i S[e, i]                    1/N_T: no expert leans; 1: each serves one
    DI = H(favourites) / log N_T                 favourite_e = argmax_i S[e, i]; 0: every
                                                 expert favours one teacher; 1: even split

The permuted-teacher null says what SI the estimate's noise gives when no expert is tied to
any teacher: the teachers of every sample (an image for C, a token for R) are relabelled at
random, independently per sample, and the matrix is read again (`NULL_DRAWS` draws); its bar
is the draws' mean + 2 sd. "Specialised" means SI above that bar and above the same layer's
SI in the λ_1 = 0 run (the Sparse MoE: what routing and distillation alone do), and DI > 0.5.
`specialisation` reports SI, DI and the null for both readings; the λ_1 = 0 comparison is the
experiment's (experiments/m2ot_split.py), which has both runs.

Which reading decides: the representational one. The positive control (π fixed one-hot, expert
e tied to teacher e mod N_T) must read as specialised; on the one-layer toy of
experiments/m2ot_split.py (E 4, K 2, seed 0) it does under CKA (SI 0.83 against 0.63 for
λ_1 = 0; its experts' CKA with their own teacher 0.84-0.94, with the other 0.14-0.23) and does
not under the causal reading (0.58 against 0.66): the distillation heads decode each teacher
from whichever expert a token kept, so dropping an expert raises both teachers' losses even
when its outputs hold one teacher. The causal reading is reported beside it as what the split
does to the distillation, not as the test. Cross-validated ridge R², the other candidate,
failed the control too (SI 0.56 against 0.63 for λ_1 = 0): an expert whose output is any
full-rank function of the token predicts every teacher linearly.

Legend: E experts, N_T teachers, T = B·N tokens, K top-k; φ(t, e) expert e's output for
token t before its combine weight (`Routing.expert_out`); T_i(t) teacher i's target for the
token (m2ot.M2oT.teacher_token_list: CLS and patches, standardised).

Decisions where the papers are silent
-------------------------------------
* Dropping an expert drops its *assignments* (the token keeps its other K − 1 experts, with
  their weights unchanged), as a capacity overflow would: the network's own failure mode.
* The causal rise is measured on the evaluation images with every other layer intact, per
  layer; a negative rise (dropping helped) counts as 0 in the shares.
* CKA is the plain (biased) linear CKA on the expert's tokens; an expert with fewer than
  4·D tokens gets no row (NaN) and is left out of SI and DI.
* The null's teachers are padded with zero channels to one width, which changes no CKA, so a
  token's teachers can be swapped whatever their widths.
"""

import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from vit import evaluating, expert_outputs_kept

NULL_DRAWS = 20  # draws of the permuted-teacher null
MIN_TOKENS_PER_INPUT = 4  # an expert needs 4·D tokens for a row of the representational matrix


# ----------------------------------------------------------------------------- the indices
def shares(matrix):
    """M (E, N_T) -> S (E, N_T): each column a share of its teacher's total, then each row a
    distribution; NaN rows stay NaN (and a row of zeros becomes NaN: no share to give)."""
    # A[e, i] = max(M, 0) / Σ_e' max(M, 0);   S[e, i] = A[e, i] / Σ_i' A[e, i']
    positive = matrix.clamp_min(0)  # NaN stays NaN
    column = positive.nansum(dim=0, keepdim=True)  # (1, N_T)
    a = positive / column.clamp_min(1e-12)  # (E, N_T)
    return a / a.sum(dim=1, keepdim=True)  # (E, N_T); 0/0 -> NaN


def split_index(s):
    """SI = mean over experts of max_i S[e, i]: 1/N_T no lean, 1 each expert one teacher."""
    rows = s[~s.isnan().any(dim=1)]  # (E', N_T)
    return float(rows.max(dim=1).values.mean()) if len(rows) else float("nan")


def diversity_index(s):
    """DI = H(the experts' favourite teachers) / log N_T: 0 all favour one, 1 an even split."""
    rows = s[~s.isnan().any(dim=1)]  # (E', N_T)
    if not len(rows):
        return float("nan")
    counts = torch.bincount(rows.argmax(dim=1), minlength=s.shape[1]).float()  # (N_T,)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()  # H = −Σ p log p over favoured teachers
    return float(entropy / math.log(s.shape[1]))


def relabel(per_sample, generator):
    """The permuted-teacher null's draw: (N_T, n, ...) with the teachers of each of the n
    samples (images or tokens) put in a random order of their own."""
    N_T, n = per_sample.shape[:2]
    order = torch.rand(N_T, n, generator=generator).argsort(dim=0)  # (N_T, n): σ_s per sample
    index = order.view(N_T, n, *[1] * (per_sample.dim() - 2)).expand_as(per_sample)
    return per_sample.gather(0, index)


def permuted_null(matrix_of, draws=NULL_DRAWS, seed=0):
    """SI under the permuted-teacher null -> (mean, mean + 2 sd) over `draws` draws.

    matrix_of(relabelled): the expert × teacher matrix read again from per-sample data
    relabelled by `relabelled` (`relabel` with a fixed generator): no expert keeps a relation
    to any one teacher, whatever each teacher's scale."""
    gen = torch.Generator().manual_seed(seed)
    values = [split_index(shares(matrix_of(lambda x: relabel(x, gen)))) for _ in range(draws)]
    values = torch.tensor(values)
    return float(values.mean()), float(values.mean() + 2 * values.std())


def indices(matrix, null=None):
    """The readings of one expert × teacher matrix, JSON-ready (rounded; NaN -> None): the
    matrix, its shares, SI, DI and the permuted-teacher null's (mean, bar) if given."""
    s = shares(matrix)
    number = lambda v: None if v is None or math.isnan(v) else round(v, 4)
    rows = lambda m: [[number(v) for v in row] for row in m.tolist()]
    null_mean, null_bar = null or (None, None)
    return {
        "matrix": rows(matrix),
        "shares": rows(s),
        "si": number(split_index(s)),
        "di": number(diversity_index(s)),
        "null_si": number(null_mean),
        "null_si_bar": number(null_bar),
    }


# ------------------------------------------------------------------------ causal: drop an expert
@contextmanager
def expert_dropped(layer, expert):
    """Within the block, `layer` (a top-K MoEMLP) drops every assignment to `expert`, as a
    capacity overflow does: the token keeps its other experts and their weights."""
    route = layer.route

    def route_without(tokens, num_images, route_logits=None):
        routing = route(tokens, num_images, route_logits)
        routing.kept = routing.kept & (routing.experts != expert)  # (T, K)
        return routing

    layer.route = route_without  # an instance attribute: shadows the method
    try:
        yield
    finally:
        del layer.route


@torch.no_grad()
def per_image_dist(model, m2ot, images, targets):
    """Each teacher's L_dist (Eq. 2) of the student on each image: (N_T, B)."""
    tokens, _ = model(images, features=True)  # (B, N, D)
    return m2ot.per_image_dist(tokens, targets)  # (N_T, B)


@torch.no_grad()
def causal_readings(model, m2ot, images):
    """Per MoE layer, `indices` of C (E, N_T): the rise of each teacher's L_dist with each
    expert's assignments dropped in that layer, with its null (images relabelled)."""
    targets = m2ot.targets(images)
    base = per_image_dist(model, m2ot, images, targets)  # (N_T, B)
    out = []
    for block in model.moe_layers:
        layer = model.blocks[block - 1].mlp
        rises = []  # E × (N_T, B)
        for e in range(model.num_experts):
            with expert_dropped(layer, e):
                rises.append(per_image_dist(model, m2ot, images, targets) - base)
        rises = torch.stack(rises, dim=2).cpu()  # (N_T, B, E)
        matrix_of = partial(causal_matrix, rises)
        out.append(indices(matrix_of(lambda x: x), permuted_null(matrix_of)))
    return out


def causal_matrix(rises, relabelled):
    """C (E, N_T) from the rises per teacher, image and expert (N_T, B, E), the images'
    teachers `relabelled` (the identity, or a draw of the null)."""
    return relabelled(rises).mean(dim=1).T  # (E, N_T): the mean over the images


# ---------------------------------------------------------------------- representational: ridge R²
def linear_cka(x, y):
    """Linear CKA between two representations of the same n tokens, x (n, D) and y (n, d)."""
    # CKA(X, Y) = ‖Ỹᵀ X̃‖²_F / (‖X̃ᵀ X̃‖_F · ‖Ỹᵀ Ỹ‖_F),   X̃, Ỹ centred over the tokens
    # 1 when Y is X up to a rotation and a scale, 0 when no direction of one is in the other
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def expert_samples(routing, num_experts):
    """Each expert's outputs and tokens in one MoE layer's Routing (φ kept): E × (n_e, D) and
    E × (n_e,), the kept assignments of expert e and the tokens they belong to."""
    mine = [(routing.experts == e) & routing.kept for e in range(num_experts)]  # E × (T, K)
    phis = [routing.expert_out[m].cpu() for m in mine]  # E × (n_e, D)
    tokens = [m.nonzero()[:, 0].cpu() for m in mine]  # E × (n_e,)
    return phis, tokens


def expert_cka(phi, token, feats):
    """One expert's row of the representational matrix: linear CKA between its outputs φ
    (n, D) and each teacher's targets at its tokens, feats (N_T, T, d); NaN if n < 4·D."""
    if len(phi) < MIN_TOKENS_PER_INPUT * phi.shape[1]:
        return torch.full((len(feats),), float("nan"))
    return torch.tensor([linear_cka(phi, f[token]) for f in feats])


@torch.no_grad()
def representational_readings(model, m2ot, images):
    """Per MoE layer, `indices` of R (E, N_T): linear CKA between each expert's outputs and
    each teacher's targets on the tokens it took, with its null (tokens relabelled)."""
    with expert_outputs_kept(model):
        _, routings = model(images, features=True)
    feats = m2ot.teacher_token_list(m2ot.targets(images))  # N_T × (T, d_i)
    width = max(f.shape[1] for f in feats)
    # zero columns change no CKA: the teachers padded to one width, so a null can mix them
    feats = torch.stack([F.pad(f, (0, width - f.shape[1])) for f in feats]).cpu()  # (N_T, T, d)
    out = []
    for r in routings:
        phis, tokens = expert_samples(r, model.num_experts)  # E × (n_e, D), E × (n_e,)
        matrix_of = partial(representational_matrix, phis, tokens, feats)
        out.append(indices(matrix_of(lambda x: x), permuted_null(matrix_of)))
    return out


def representational_matrix(phis, tokens, feats, relabelled):
    """R (E, N_T) from each expert's outputs and tokens and the teachers' targets (N_T, T, d),
    the tokens' teachers `relabelled` (the identity, or a draw of the null)."""
    feats = relabelled(feats)  # (N_T, T, d)
    return torch.stack([expert_cka(p, t, feats) for p, t in zip(phis, tokens)]).float()


# ----------------------------------------------------------------------------- the report
@torch.no_grad()
def distances(model, m2ot, images):
    """Per MoE layer, where the experts' outputs are: mean_c |φ(t, e) − y(t)| over the kept
    assignments for y = each teacher's Q_i-mapped target, then the teachers' mean. An output
    of ≈ 0 against a standardised target is E|N(0, 1)| = 0.798 from it: the chance level."""
    with expert_outputs_kept(model):
        _, routings = model(images, features=True)
    feats = m2ot.teacher_tokens(m2ot.targets(images))  # (N_T, T, D)
    targets = [*feats, feats.mean(dim=0)]  # N_T + 1 × (T, D)
    gap = lambda r, y: (r.expert_out - y.unsqueeze(1)).abs().mean(dim=-1)[r.kept].mean()
    return [[round(float(gap(r, y)), 4) for y in targets] for r in routings]


def specialisation(model, m2ot, images):
    """eval.py's expert × teacher readings per MoE layer on `images` (normalised): for the
    causal and the representational matrix, the matrix, its shares, SI, DI and the null; and
    the experts' distances to each teacher and to their mean."""
    m2ot.eval()
    with evaluating(model):
        return {
            "causal": causal_readings(model, m2ot, images),
            "representational": representational_readings(model, m2ot, images),
            "distances": distances(model, m2ot, images),
        }


def specialisation_table(res):
    """eval.py's printed section ("" without it): per MoE layer and reading, SI against the
    null's 95th percentile, DI and the experts per favourite teacher."""
    if "specialisation" not in res:
        return ""
    columns = ["reading", "SI", "null SI + 2 sd", "DI", "experts per favourite"]
    lines = [
        "",
        "experts × teachers (SI: 1/N_T no lean, 1 one teacher each; DI: 0 all one teacher)",
        "| MoE block | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for reading in ("causal", "representational"):
        for block, r in zip(res["moe_layers"], res["specialisation"][reading]):
            s = torch.tensor([[math.nan if v is None else v for v in row] for row in r["shares"]])
            rows = s[~s.isnan().any(dim=1)]
            favourites = torch.bincount(rows.argmax(dim=1), minlength=s.shape[1]).tolist()
            number = lambda v, digits: "-" if v is None else f"{v:.{digits}f}"
            lines.append(
                f"| {block} | {reading} | {number(r['si'], 3)} | {number(r['null_si_bar'], 3)} | "
                f"{number(r['di'], 2)} | {'/'.join(map(str, favourites))} |"
            )
    return "\n".join(lines)
