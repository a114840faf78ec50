"""M²oT: several teachers guide the *experts* of a sparse-MoE student.

The idea
--------
Distil N_T frozen foundation models (DINOv2, SigLIP, SAM, ...) into one student, without
labels: the student's final features z go through one projector head per teacher,
ẑ_i = g_i(z) (Eq. 1), and each ẑ_i is pulled toward that teacher's features T_i(x) (Eq. 2).
A *dense* student lands in the **compromised trap** (Prop. 1): one shared feature extractor
serving every teacher at once converges to their compromise (with a squared distance, to
the teachers' mean), so it matches each teacher worse than a student of that teacher alone.

M²oT gives the student sparse MoE layers and a second loss that makes each expert lean
toward its own mixture of teachers, so that capacity splits by teacher instead of averaging:

    L_dist = mean_i ½ [ D(g_i^cls(z_cls), T_i^cls) + D(g_i^patch(z_patch), T_i^patch) ]  (Eq. 2)
             D = (1 − cos) + smoothL1_β=1
    π(t, e, ·) = softmax_i( W_π x_t )_(e, ·)     the teacher-aware router, one per MoE layer
    T̄(t, e)   = Σ_i π(t, e, i) · Q_i T_i(t)     each expert's own mixture of teachers     (Eq. 8)
    L_tas     = Σ_layers mean_t Σ_{e kept for t} p_e(t) · mean_c |φ(t, e) − T̄(t, e)|
    L_switch  = Σ_layers E · Σ_e f_e · P_e       on the top-1 choices
    L         = L_dist + λ_1 · L_tas + λ_2 · L_switch,   λ_1 = 0.5, λ_2 = 0.01          (Eq. 10)

D, L_tas and L_switch are m2ot_losses.py's `feature_distill_loss`, `tas_loss` and
`switch_load_loss`.

φ(t, e) is expert e's output for token t (before its combine weight): TAS compares what an
expert *computes* with the teachers directly, inside the network, which no projector head
can absorb. π is its only extra parameter, used in training only: heads and π are dropped
at inference; the student is a plain MoE ViT.

What Eq. 8 does when π trains with the experts (`tas_form="mixture"`, the faithful row): by
the triangle inequality ‖φ − Σ_i π_i T_i‖₁ ≤ Σ_i π_i ‖φ − T_i‖₁, a mixture is never a harder
target than one teacher. φ starts near 0, the mixture nearest 0 is the mean of standardised
teachers, and there π gets no net pull: uniform π with every expert at the teachers' mean is
a stable point, Prop. 1's compromise. A falling L_tas then means the experts reach the mean,
not that they specialise (tests/test_m2ot.py, notebook 07). `tas_form="map"` is the objective
before the paper's first approximation (Eq. 6-7, π outside the norm, `m2ot_losses.tas_map_loss`):
L_tas = Σ_layers mean_t Σ_{e kept} p_e(t) Σ_i π(t, e, i) mean_c |φ(t, e) − Q_i T_i(t)|, lowest
with π on the teacher nearest φ and φ on it: π sharpens. Whether the experts then *split* the
teachers is measured, not assumed (docs/m2ot.md).

Legend (paper -> code): T_i -> `FinalTeacher` (m2ot_teachers.py) outputs, standardised by
`M2oT.targets`; g_i -> `ProjectorHeads`; r(x) -> each MoE layer's router (`Routing.probs`);
π -> `TeacherAwareRouter`; φ -> `Routing.expert_out`; x_t (π's input) -> `Routing.inputs`;
K -> the kept assignments; λ_1, λ_2 -> `tas_coef`, `switch_coef`.
Letters: B images, N = 1 + G² tokens (CLS first), D student width, d_i teacher i's width,
G the student's grid, g_i a teacher's grid, E experts, K experts per token, T = B·N tokens.

Decisions where the paper is silent
-----------------------------------
* L_dist is the **mean** over teachers (`dist_reduce="mean"`; "sum" is Eq. 2 as written), as
  UNIC, whose distances Eq. 2 uses, averages them: L_dist keeps one scale for any N_T, and
  Table 1's 0.145-0.187 (no teacher count given) fits a mean better than a sum. Against
  Eq. 2's sum it makes λ_1 N_T times stronger: with the paper's 7 teachers λ_1 = 0.5 acts as
  ~3.5 would on the sum, near Table 3's harmful 5. CLS and patches are averaged too.
* Targets: a teacher's CLS token after its final norm (the mean of its patches where it has
  none) and its patch tokens, resized bilinearly from its grid g_i to the student's G
  (`align_tokens`), each teacher fed its own normalisation (`renormalise`) at the student's
  pixel size or "SRC@SIZE" (`m2ot_teachers.teacher_source`). Each target is **standardised per
  channel** (UNIC's practice: teachers of different scales weigh alike) with running
  statistics: a moving average (momentum 0.1, the first batch whole) of the training batches
  (all ranks' under DDP), kept as checkpoint buffers, so resume is exact.
* TAS compares φ (width D) with teacher features (width d_i): Q_i is a fixed semi-orthogonal
  d_i -> D matrix (identity when d_i = D), drawn once from a seeded generator (not torch's
  global stream) and stored as a buffer: no parameters, so it cannot collapse to make L_tas
  trivially small. TAS uses the *standardised* targets, so T̄ mixes teachers of equal scale.
* π reads the MoE layer's input (the LN2 output the router reads), detached: it estimates
  which teachers an expert should follow and is thrown away after training, so it is given
  no say in the backbone's features; TAS reaches the student through φ and p, as Eq. 8 writes.
  ‖·‖₁ is a mean over channels (losses.py); L_tas and L_switch are summed over MoE layers.
* The router gets TAS's gradient through p (Eq. 8 weights each gap by softmax(r(x))): an
  expert that matches its mixture better becomes likelier.
* The MAP form keeps the paper's π (per token; no prior, temperature or balance): on a toy
  with L_dist (docs/m2ot.md) π goes one-hot unaided; a per-expert prior left every expert on
  one teacher, as without it; balancing π's teacher shares split π, not the experts' outputs.
* `tas_coef = 0` (the paper's "Sparse MoE" row): π still learns, on detached φ and p (with
  weight 1, its only loss), so that L_tas is *measured* for the baseline (Table 1: 3.27).
* Dense and Soft MoE students (the paper's other rows) have no kept assignments: L = L_dist.
* Projector heads: Linear(D, D) -> GELU -> Linear(D, d_i), one for CLS and one for patches
  per teacher ("commonly MLPs", Eq. 1; hidden width D, a choice).

Variants (each a flag, off by default; what each does is measured in docs/m2ot.md)
-----------------------------------------------------------------------------------
    tas_form="heads"      (--tas-form heads)  the MAP form through a learnable linear read-out
                          g_i: D -> d_i per layer and teacher (`tas_heads`), instead of Q_i
    tas_norm="sum"        (--tas-norm sum)    ‖·‖₁ summed over channels, as Eq. 8 writes it;
                          with dist_reduce="sum", the paper's weighting
    tas_pi="fixed"        (--tas-pi fixed)    π one-hot, expert e on teacher e mod N_T
                          (`FixedTeacherRouter`): the specialisation measure's positive control
    pi_balance=c          (--pi-balance c)    + c · N_T Σ_i share_i², π's teacher shares kept even
    teacher_drop=p        (--teacher-drop p)  UNIC's teacher dropping on L_dist (training only;
                          the logged per-teacher parts are undropped)
    switch_choices="all"  (--switch-choices all)  L_switch over all K choices, not the first
"""

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from augment import MEAN, STD
from m2ot_losses import (
    feature_distill_per_image,
    pi_balance_loss,
    switch_load_loss,
    tas_heads_loss,
    tas_loss,
    tas_map_loss,
    teacher_drop_mask,
)
from vit import evaluating, expert_outputs_kept


# ----------------------------------------------------------------------------- targets
def renormalise(mean, std):
    """(scale, shift), each (1, 3, 1, 1): images normalised with the loader's ImageNet MEAN/STD
    -> normalised with a teacher's (mean, std), as x·scale + shift."""
    # x_raw = x·STD + MEAN,   x_i = (x_raw − mean) / std = x·(STD / std) + (MEAN − mean) / std
    mean, std, old, old_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (mean, std, MEAN, STD))
    return old_std / std, (old - mean) / std


def align_tokens(patches, grid, new_grid):
    """A teacher's patch tokens on its g×g grid -> the student's G×G grid (bilinear)."""
    if grid == new_grid:
        return patches  # (B, G², d)
    maps = rearrange(patches, "b (h w) d -> b d h w", h=grid)  # (B, d, g, g)
    maps = F.interpolate(maps, size=(new_grid, new_grid), mode="bilinear", align_corners=False)
    return rearrange(maps, "b d h w -> b (h w) d")  # (B, G², d)


def semi_orthogonal(d_in, d_out, seed):
    """A fixed (d_out, d_in) matrix with orthonormal rows or columns; identity if equal."""
    if d_in == d_out:
        return torch.eye(d_out)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(max(d_in, d_out), min(d_in, d_out), generator=gen)
    q, _ = torch.linalg.qr(a)  # (max, min), orthonormal columns
    return q if d_out > d_in else q.t()  # (d_out, d_in)


class RunningStandardiser(nn.Module):
    """y = (x − μ) / σ per channel, μ and σ² moving averages of the training batches."""

    def __init__(self, dim, momentum=0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # batches so far

    @torch.no_grad()
    def forward(self, x):  # x: (..., d), float32
        if self.training:
            flat = x.reshape(-1, x.shape[-1])  # (n, d)
            moments = torch.stack([flat.mean(0), flat.pow(2).mean(0)])  # (2, d)
            if dist.is_available() and dist.is_initialized():  # every rank: the same statistics
                dist.all_reduce(moments)
                moments /= dist.get_world_size()
            mean = moments[0]  # (d,) E[x]
            var = (moments[1] - moments[0] ** 2).clamp_min(0)  # (d,) E[x²] − E[x]²
            m = torch.where(self.seen > 0, self.momentum, 1.0)  # the first batch: taken whole
            self.mean.lerp_(mean, m)
            self.var.lerp_(var, m)
            self.seen += 1
        return (x - self.mean) / (self.var + 1e-6).sqrt()


# ----------------------------------------------------------------------------- parameters
class ProjectorHeads(nn.Module):
    """g_i for one teacher: an MLP D -> D -> d_i for the CLS token and one for patch tokens."""

    def __init__(self, dim, teacher_dim):
        super().__init__()
        mlp = lambda: nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, teacher_dim))
        self.cls = mlp()  # for the CLS token
        self.patch = mlp()  # for the patch tokens


class TeacherAwareRouter(nn.Linear):
    """π of one MoE layer: Linear(D -> E·N_T), softmax over teachers; π(x): (..., E, N_T)."""

    def __init__(self, dim, num_experts, num_teachers):
        super().__init__(dim, num_experts * num_teachers, bias=False)
        self.num_experts = num_experts  # E
        self.num_teachers = num_teachers  # N_T
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x):
        logits = super().forward(x).unflatten(-1, (self.num_experts, self.num_teachers))
        return logits.float().softmax(dim=-1)  # (..., E, N_T): each expert's teacher mixture


class FixedTeacherRouter(nn.Module):
    """A fixed π, the positive control (`--tas-pi fixed`): expert e serves teacher e mod N_T
    alone, π(x)_(e, ·) = one-hot(e mod N_T) for every token. No parameters."""

    def __init__(self, num_experts, num_teachers):
        super().__init__()
        self.num_experts = num_experts  # E
        self.num_teachers = num_teachers  # N_T
        owner = torch.arange(num_experts) % num_teachers  # (E,) e mod N_T
        self.register_buffer("choice", F.one_hot(owner, num_teachers).float(), persistent=False)

    def forward(self, x):
        return self.choice.expand(*x.shape[:-1], -1, -1)  # (..., E, N_T)


def load_mix_routers(state, num_experts):
    """The π of every MoE layer from a checkpoint's "m2ot" state (keys pi.{j}.weight); None
    when the run had none (a dense or Soft MoE multi-teacher student)."""
    keys = sorted((k for k in state if k.startswith("pi.")), key=lambda k: int(k.split(".")[1]))
    if not keys:
        return None
    routers = nn.ModuleList()
    for key in keys:
        w = state[key]  # (E·N_T, D)
        router = TeacherAwareRouter(w.shape[1], num_experts, w.shape[0] // num_experts)
        router.weight.data.copy_(w)
        routers.append(router)
    return routers


def keep_expert_outputs(model, on=True):
    """Make every top-K MoE layer of `model` hand back φ and its input in its Routing."""
    for i in model.moe_layers:
        if hasattr(model.blocks[i - 1].mlp, "keep_expert_outputs"):
            model.blocks[i - 1].mlp.keep_expert_outputs = on


# ----------------------------------------------------------------------------- the module
class M2oT(nn.Module):
    """Everything M²oT adds to a student during training: frozen teachers (not saved), their
    standardisers, projector heads and, for a top-K student, one π per MoE layer.

    teachers: `m2ot_teachers.FinalTeacher`s; dim, grid: the student's width D and grid G;
    num_moe_layers, num_experts: 0 for a dense or Soft MoE student (no π, no TAS).
    """

    def __init__(
        self,
        teachers,
        dim,
        grid,
        num_moe_layers=0,
        num_experts=0,
        *,
        tas_form="mixture",
        dist_reduce="mean",
        tas_norm="mean",
        tas_pi="learned",
        pi_balance=0.0,
        teacher_drop=0.0,
        switch_choices="first",
    ):
        super().__init__()
        self.teachers = list(teachers)  # a plain list: frozen, loaded from --teachers, not saved
        self.grid = grid  # G, the student's
        self.tas_form = tas_form  # "mixture" (Eq. 8), "map" (Eq. 6-7) or "heads"
        self.dist_reduce = dist_reduce  # "mean" or "sum" over teachers
        # the variants (docs/m2ot.md), each off by default
        self.tas_norm = tas_norm  # ‖·‖₁ over channels: "mean" or "sum" (Eq. 8 as written)
        self.pi_balance = pi_balance  # weight of `pi_balance_loss`
        self.teacher_drop = teacher_drop  # UNIC's p: drop a teacher's loss per image
        self.switch_choices = switch_choices  # L_switch on the "first" choice or on "all" K

        # per teacher: projector heads g_i and the standardisers of its targets
        widths = [t.dim for t in self.teachers]  # d_i
        self.heads = nn.ModuleList(ProjectorHeads(dim, d) for d in widths)
        self.norm_cls = nn.ModuleList(RunningStandardiser(d) for d in widths)
        self.norm_patch = nn.ModuleList(RunningStandardiser(d) for d in widths)

        # per MoE layer: π (none for a dense or Soft MoE student); `tas_pi="fixed"`: the
        # control, expert e tied to teacher e mod N_T
        n = len(widths) if num_moe_layers else 0
        if tas_pi == "fixed":
            self.pi = nn.ModuleList(
                FixedTeacherRouter(num_experts, n) for _ in range(num_moe_layers)
            )
        else:
            self.pi = nn.ModuleList(
                TeacherAwareRouter(dim, num_experts, n) for _ in range(num_moe_layers)
            )

        # per MoE layer and teacher, `tas_form="heads"` only: a learnable read-out g_i: D -> d_i
        # of the experts' outputs, in place of the fixed Q_i
        heads = num_moe_layers if tas_form == "heads" else 0
        self.tas_heads = nn.ModuleList(
            nn.ModuleList(nn.Linear(dim, d) for d in widths) for _ in range(heads)
        )

        # per teacher, fixed: Q_i, and the renormalisation of the images it is fed
        for i, (t, d) in enumerate(zip(self.teachers, widths)):
            self.register_buffer(f"q{i}", semi_orthogonal(d, dim, seed=i))  # Q_i: (D, d_i), fixed
            scale, shift = renormalise(t.mean, t.std)  # the teacher's own input normalisation
            self.register_buffer(f"scale{i}", scale, persistent=False)
            self.register_buffer(f"shift{i}", shift, persistent=False)

    @classmethod
    def for_student(cls, model, teachers, args, routed):
        """The module of a run of `args` (train.py's flags) beside its student `model`: π per
        MoE layer when `routed` (a top-K student), the variants as the flags ask."""
        layers = len(model.moe_layers) if routed else 0
        variant = lambda name, off: getattr(args, name, off)  # a run from before the flag: off
        return cls(
            teachers,
            model.embed_dim,
            model.grid,
            layers,
            model.num_experts if routed else 0,
            tas_form=args.tas_form,
            dist_reduce=args.dist_reduce,
            tas_norm=variant("tas_norm", "mean"),
            tas_pi=variant("tas_pi", "learned"),
            pi_balance=variant("pi_balance", 0.0),
            teacher_drop=variant("teacher_drop", 0.0),
            switch_choices=variant("switch_choices", "first"),
        )

    def targets(self, images):
        """[(CLS (B, d_i), patches (B, G², d_i))] per teacher: standardised, no gradient."""
        out = []
        for i, t in enumerate(self.teachers):
            x = images * getattr(self, f"scale{i}") + getattr(self, f"shift{i}")  # (B, 3, S, S)
            cls, patches = t(x)  # (B, d_i), (B, g_i², d_i)
            patches = align_tokens(patches.float(), t.grid, self.grid)  # (B, G², d_i)
            out.append((self.norm_cls[i](cls.float()), self.norm_patch[i](patches)))
        return out

    def per_image_dist(self, tokens, targets):
        """Eq. 2's distance of each teacher on each image, the mean of CLS and patches: (N_T, B)."""
        per_image = []  # N_T × (B,)
        for head, (cls, patches) in zip(self.heads, targets):
            l_cls = feature_distill_per_image(head.cls(tokens[:, 0]), cls)  # (B,)
            l_patch = feature_distill_per_image(head.patch(tokens[:, 1:]), patches)  # (B,)
            per_image.append(0.5 * (l_cls + l_patch))  # mean over CLS and patch
        return torch.stack(per_image)  # (N_T, B)

    def distill(self, tokens, targets):
        """Eq. 2: (L_dist, [per-teacher part]); tokens (B, N, D) the student's final features.
        With `teacher_drop` (training only), UNIC's teacher dropping decides per image which
        teachers' losses count; the per-teacher parts are logged undropped."""
        per_image = self.per_image_dist(tokens, targets)  # (N_T, B)
        parts = list(per_image.mean(dim=1))  # N_T × scalar: each teacher's L_dist

        # UNIC: keep the worst-fit teacher of each image, drop each other with p
        if self.training and self.teacher_drop > 0:
            per_image = per_image * teacher_drop_mask(per_image.detach(), self.teacher_drop)
        per_teacher = per_image.mean(dim=1)  # (N_T,)

        # L_dist = Σ_i (Eq. 2) or mean_i (the default)
        total = per_teacher.sum() if self.dist_reduce == "sum" else per_teacher.mean()
        return total, parts

    def teacher_token_list(self, targets):
        """Every teacher's target for every student token, in its own width: [(T, d_i)]."""
        return [
            rearrange(torch.cat([cls.unsqueeze(1), patches], dim=1), "b n d -> (b n) d")
            for cls, patches in targets  # (B, N, d_i), CLS first
        ]

    def teacher_tokens(self, targets):
        """Every teacher's target for every student token, mapped to width D by its fixed Q_i:
        (N_T, T, D)."""
        feats = self.teacher_token_list(targets)  # N_T × (T, d_i)
        return torch.stack([f @ getattr(self, f"q{i}").t() for i, f in enumerate(feats)])

    def tas(self, routings, targets, detach=False):
        """L_tas (`tas_form`: Eq. 8, the MAP form or through heads) summed over the MoE layers;
        targets: `targets(images)`'s. detach: only π (and the TAS heads) learn (the tas_coef = 0
        baseline)."""
        if self.tas_form == "heads":
            feats = self.teacher_token_list(targets)  # N_T × (T, d_i): no Q_i
            heads = list(self.tas_heads)
        else:
            feats = self.teacher_tokens(targets)  # (N_T, T, D)
            heads = [None] * len(self.pi)
        total = 0.0
        for pi, routing, g in zip(self.pi, routings, heads):
            total = total + layer_tas(
                pi, routing, feats, detach, self.tas_form, channels=self.tas_norm, heads=g
            )
        return total

    def balance(self, routings):
        """`pi_balance_loss` of every MoE layer's π on its tokens, summed over the layers."""
        return sum(pi_balance_loss(pi(r.inputs.detach())) for pi, r in zip(self.pi, routings))


def chosen_mixtures(pi, routing):
    """π(t, e_{t,k}, ·) of every assignment of one MoE layer: (T, K, N_T). π reads the layer
    input detached: an estimate of teacher relevance, not a path for TAS into the backbone (that
    goes through φ and p, as Eq. 8 writes it)."""
    mix = pi(routing.inputs.detach())  # (T, E, N_T)
    index = routing.experts.unsqueeze(-1).expand(-1, -1, pi.num_teachers)  # (T, K, N_T)
    return mix.gather(1, index)  # (T, K, N_T)


def layer_tas(
    pi, routing, teacher_feats, detach=False, form="mixture", channels="mean", heads=None
):
    """L_tas of one MoE layer from its Routing (φ in `expert_out`, the input in `inputs`).
    teacher_feats: (N_T, T, D), Q_i-mapped, or for form "heads" [(T, d_i)] in each teacher's
    own width, read through `heads` (g_i per teacher). detach: φ and p get no gradient, π (and
    the heads) alone learn."""
    # mixture (Eq. 8): mean_t Σ_{e kept} p_e(t) · ‖φ(t, e) − Σ_i π(t, e, i) Q_i T_i(t)‖₁
    # map (Eq. 6-7):   mean_t Σ_{e kept} p_e(t) · Σ_i π(t, e, i) · ‖φ(t, e) − Q_i T_i(t)‖₁
    # heads:           mean_t Σ_{e kept} p_e(t) · Σ_i π(t, e, i) · ‖g_i(φ(t, e)) − T_i(t)‖₁
    probs = routing.probs.gather(1, routing.experts)  # (T, K)
    phi = routing.expert_out  # (T, K, D)
    if detach:
        probs = probs.detach()
        phi = phi.detach()
    mix = chosen_mixtures(pi, routing)  # (T, K, N_T)
    if form == "heads":
        predictions = [g(phi) for g in heads]  # N_T × (T, K, d_i)
        return tas_heads_loss(predictions, probs, routing.kept, mix, teacher_feats, channels)
    loss = tas_map_loss if form == "map" else tas_loss
    return loss(phi, probs, routing.kept, mix, teacher_feats, channels)


def m2ot_losses(model, m2ot, images, tas_coef=0.5, switch_coef=0.01):
    """Eq. 10 for one batch: (L, {part: detached value}); `model` may be DDP-wrapped.

    The parts are dist, dist_<i> per teacher, and for a top-K student tas, switch and, with
    `pi_balance`, pi_balance.
    """
    tokens, routings = model(images, features=True)  # (B, N, D), one Routing per MoE layer
    targets = m2ot.targets(images)
    loss, per_teacher = m2ot.distill(tokens, targets)
    parts = {"dist": loss, **{f"dist_{i}": v for i, v in enumerate(per_teacher)}}

    # a top-K student: + λ_1 · L_tas + λ_2 · L_switch over its MoE layers
    if len(m2ot.pi) and routings:
        parts["tas"] = m2ot.tas(routings, targets, detach=tas_coef == 0)
        loss = loss + (tas_coef or 1.0) * parts["tas"]  # tas_coef 0: π's own loss, weight 1
        if m2ot.pi_balance > 0:  # the variant: π's teacher shares kept even across experts
            parts["pi_balance"] = m2ot.balance(routings)
            loss = loss + m2ot.pi_balance * parts["pi_balance"]
        # Eq. 9 on the top-1 choice of each token (experts are sorted by the router's score),
        # or on all K choices (`switch_choices="all"`)
        first = m2ot.switch_choices != "all"
        chosen = [r.experts[:, 0] if first else r.experts for r in routings]
        parts["switch"] = sum(switch_load_loss(r.probs, c) for r, c in zip(routings, chosen))
        loss = loss + switch_coef * parts["switch"]
    return loss, {k: v.detach().float() for k, v in parts.items()}


# ----------------------------------------------------------------------------- measuring it
def preference_sums(mix, experts, kept, num_experts):
    """Over the kept assignments (t, e) of each expert: Σ π(t, e, ·), Σ max_i π(t, e, i), and
    their number: (E, N_T), (E,), (E,). mix: π (T, E, N_T); experts, kept: (T, K), a Routing's."""
    T, K = experts.shape
    chosen = mix.gather(1, experts.unsqueeze(-1).expand(T, K, mix.shape[-1]))[kept]  # (A, N_T)
    e = experts[kept]  # (A,) the expert of every kept assignment
    sums = mix.new_zeros(num_experts, mix.shape[-1]).index_add_(0, e, chosen)  # (E, N_T)
    peaks = mix.new_zeros(num_experts).index_add_(0, e, chosen.max(dim=1).values)  # (E,)
    return sums, peaks, torch.bincount(e, minlength=num_experts)  # (E,)


def teacher_preference(mix, experts, kept, num_experts):
    """Expert→teacher preference (M²oT Fig. 4b): (E, N_T), each row a distribution.

    A NaN row: that expert took no token (0 / 0, it has no preference to show)."""
    # pref(e, i) = mean over the tokens t expert e processed of π(t, e, i)
    sums, _, counts = preference_sums(mix, experts, kept, num_experts)
    return sums / counts.unsqueeze(1)  # (E, N_T)


def preference_sharpness(pref):
    # sharpness = mean_e max_i pref(e, i) over the experts that took tokens (NaN rows skipped):
    # 1/N_T = every expert mixes the teachers evenly, 1 = every expert serves one teacher
    rows = pref[~pref.isnan().any(dim=1)]  # (E', N_T)
    return float(rows.max(dim=1).values.mean())


def favourite_counts(pref):
    """[#{e : argmax_i pref(e, i) = j} for each teacher j], experts with tokens only: tells
    "every expert leans to one teacher" ([8, 0]) from "they split the teachers" ([4, 4])."""
    rows = pref[~pref.isnan().any(dim=1)]  # (E', N_T)
    return torch.bincount(rows.argmax(dim=1), minlength=pref.shape[1]).tolist()


@torch.no_grad()
def teacher_preferences(model, mix_routers, images, batch_size=128):
    """Every MoE layer's expert→teacher preference on `images` (normalised), (E, N_T) each,
    and its per-token sharpness, mean_{(t, e) kept} max_i π(t, e, i). π of layer j is
    `mix_routers[j]` on the layer's input (`Routing.inputs`, kept while this runs)."""
    # per layer Σ π(t, e, ·), Σ max_i π(t, e, i) and the count, summed over the batches
    sums = 0  # (layers, E, N_T)
    peaks = 0  # (layers, E)
    counts = 0  # (layers, E)
    with expert_outputs_kept(model), evaluating(model):  # both restored after
        for chunk in images.split(batch_size):
            _, routings = model(chunk)
            parts = [
                preference_sums(pi(r.inputs), r.experts, r.kept, model.num_experts)
                for pi, r in zip(mix_routers, routings)
            ]
            sums = sums + torch.stack([s for s, _, _ in parts])  # (layers, E, N_T)
            peaks = peaks + torch.stack([m for _, m, _ in parts])  # (layers, E)
            counts = counts + torch.stack([c for _, _, c in parts])  # (layers, E)

    per_token = (peaks.sum(dim=-1) / counts.sum(dim=-1)).tolist()  # (layers,)
    return list(sums / counts.unsqueeze(-1)), per_token  # NaN rows: no token taken


def preference_report(model, mix_routers, teachers, watch):
    """eval.py's M²oT numbers per MoE layer on the watch images: the expert→teacher preference
    (E × N_T rows, null where an expert took no token), its sharpness per expert and per token,
    the experts per favourite teacher and the number of teachers favoured; the teachers' names
    (file names, with their folder where two are alike; "teacher i" when unknown)."""
    prefs, per_token = teacher_preferences(model, mix_routers.to(watch.device).eval(), watch)

    # the teachers' names: file names, with their folder where two are alike
    names = [Path(t).name for t in teachers or []]
    if len(set(names)) < len(names):
        names = ["/".join(Path(t).parts[-2:]) for t in teachers]
    if len(names) != prefs[0].shape[1]:
        names = [f"teacher {i}" for i in range(prefs[0].shape[1])]

    # JSON-ready numbers: rounded, null where an expert took no token
    rows = lambda p: [[None if math.isnan(x) else round(x, 4) for x in r] for r in p.tolist()]
    favourites = [favourite_counts(p) for p in prefs]
    return {
        "teachers": names,
        "teacher_preference": [rows(p) for p in prefs],
        "preference_sharpness": [preference_sharpness(p) for p in prefs],
        "token_sharpness": per_token,
        "favourite_counts": favourites,
        "distinct_favourites": [sum(n > 0 for n in f) for f in favourites],
    }


# ----------------------------------------------------------------------------- showing it
def preference_table(res):
    """eval.py's printed M²oT section ("" without π): per MoE layer the preference's
    sharpness per expert and per token and the experts per favourite teacher, then each
    layer's expert × teacher table."""
    if "teacher_preference" not in res:
        return ""
    columns = ["teacher-preference sharpness", "per-token sharpness", "experts per favourite"]
    lines = ["", "| MoE block | " + " | ".join(columns) + " |", "|---" * 4 + "|"]
    rows = zip(
        res["moe_layers"],
        res["preference_sharpness"],  # per expert: mean_e max_i pref(e, i)
        res["token_sharpness"],  # per token: mean max π over the kept assignments
        res["favourite_counts"],  # e.g. 8/0: every expert leans to one teacher
    )
    for block, sharp, token, counts in rows:
        lines.append(f"| {block} | {sharp:.3f} | {token:.3f} | {'/'.join(map(str, counts))} |")

    # each layer's expert -> teacher preference
    teachers = res["teachers"]
    for block, pref in zip(res["moe_layers"], res["teacher_preference"]):
        lines += [
            "",
            f"teacher preference, block {block} (mean π over each expert's tokens)",
            "| expert | " + " | ".join(teachers) + " |",
            "|---" * (len(teachers) + 1) + "|",
        ]
        lines += [
            f"| {e} | " + " | ".join("-" if x is None else f"{x:.3f}" for x in row) + " |"
            for e, row in enumerate(pref)
        ]
    return "\n".join(lines)


def plot_teacher_preference(plt, res):
    """teacher_preference.png: per MoE layer, each expert's mean π over teachers (M²oT Fig. 4b)."""
    import numpy as np  # matplotlib's own dependency

    layers = res["moe_layers"]
    teachers = res["teachers"]  # N_T names
    E = res["num_experts"]
    fig, axes = plt.subplots(
        1,
        len(layers),
        figsize=(len(layers) * (1.5 + 0.9 * len(teachers)), 1.3 + 0.35 * E),
        squeeze=False,
    )
    for ax, block, pref, sharp in zip(
        axes[0], layers, res["teacher_preference"], res["preference_sharpness"]
    ):
        pref = np.array(pref, dtype=float)  # (E, N_T); null rows (no token taken) -> NaN, blank
        ax.imshow(pref, cmap="viridis", vmin=0, vmax=1, aspect="auto")

        # every cell's share written on it, dark on light cells, light on dark ones
        for (e, i), share in np.ndenumerate(pref):
            if not np.isnan(share):
                ax.text(
                    i,
                    e,
                    f"{share:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="k" if share > 0.6 else "w",
                )
        ax.set(
            title=f"block {block}: sharpness {sharp:.2f}",
            xlabel="teacher",
            ylabel="expert",
            xticks=range(len(teachers)),
            yticks=range(E),
        )
        ax.set_xticklabels(teachers, fontsize=7, rotation=20)
    fig.tight_layout()
    return fig
