"""The frozen dense teacher, its layer-aligned features, and the teacher router.

The idea
--------
A sparse router is trained through the few experts it picked: only the chosen paths carry
gradient back to it, so it learns next to nothing about the experts it did not pick
("gradient blocking"). Early in training, before experts differ, this sparse, local signal
makes the assignment of a fixed token flicker from step to step (TGR-MoE sec. 1, 3).
A *dense* model has no such problem: every weight is updated at every step, so its
intermediate features form a stable, global description of each token. TGR-MoE borrows it:

    h_t^(i) = LN2 output of teacher block i             (B, N, D_t), the MLP's input
    p_t^(i) = softmax(R_t^(i) h_t^(i))                   R_t: Linear(D_t -> E), no noise
    L_teacher = Σ_{i∈S_MoE} λ_load·L_imp(p_t^(i)) + λ_ent·L_ent(p_t^(i))     (sec. 3.2)

and the student router is pulled toward p_t with KL(sg(p_t) ‖ p) (`losses.routing_kl`).

* The teacher backbone is frozen (`requires_grad_(False)`, always in eval mode, run under
  `torch.no_grad()`): it is a fixed feature space, not a model being trained.
* The teacher router sees **no task loss**. Its job is not to classify but to turn the
  teacher's feature space into a routing that is *balanced* (importance loss: every expert
  gets tokens) and *confident* (entropy loss: each token clearly prefers one). That
  distribution is the prior; the KL carries it across the gradient block to the student.
* **Layer-aligned blocks, not the last**: student MoE layer i learns from teacher block i,
  the same depth and the same kind of tensor its own router reads. With the teacher's last
  layer instead, the paper's ImageNet-1K accuracy falls from 77.81% to 75.83%, below V-MoE:
  the last features are too abstract and task-specific to say how mid-network tokens split.
  `layers` may name any blocks (repeats allowed), or "final": the last block's output after
  the final norm, the paper's "last layer" (`--teacher-layers final final final`).

Sources (`load_teacher(source, layers)`): an official facebookresearch/deit DeiT-III file, the
same in timm's naming, `"torchvision:vit_b_16"` (any torchvision ViT), DINOv2 (timm's or the
official layout), or a dense run of this project's `train.py --method dense`. pretrained.py
tells them apart by their contents and loads them, shape-checked, into `vit.VisionTransformer`;
this file decides what runs of it.

Legend (paper -> code): h_t -> `teacher(images)[j]`; R_t -> `TeacherRouter`; p_t -> softmax of
its logits; λ_load, λ_ent -> `load_coef`, `ent_coef` (0.005 each, TGR Table S1).
Letters: B images, N tokens (patches + CLS), D_t teacher width, E experts, G grid side,
R registers.

Decisions where the papers are silent
-------------------------------------
* The teacher never runs the head, and runs the final norm only for "final" (the last-layer
  ablation), so their keys are ignored (any class count loads).
* bf16 autocast by default, on CPU and GPU alike (the teacher is TGR's main extra cost; on
  this project's CPU a TGR step was 1.4x faster than with fp32, benchmarks/train_step.py),
  features returned as float32, within cosine 0.999 of fp32 (tests/test_teacher.py).
* `no_grad`, not `inference_mode`: inference tensors cannot enter the teacher router's graph.
* Grids must match; `resample=True` interpolates the position grid bicubically to the
  student's and resizes input images (bilinear) to grid × teacher patch, so teacher patch
  (r, c) covers the same pixels as student patch (r, c).
* The teacher router is a bias-free linear map, the same form as the student's router.
* The teacher router's L_imp is taken over the whole batch by default (the paper gives no
  groups, and the teacher router has no capacity); `groups` (`--teacher-balance group`) takes it
  per routing group of images, as the student's V-MoE losses are: a control of the study in
  experiments/tgr_claims.py (docs/evidence.md says what it changes).
* `reinit` (`--teacher-reinit SEED`) keeps the source's architecture and draws the weights a
  dense run of that seed starts from: the control for "does the teacher's *knowledge* matter?"
* Registers (DINOv2-reg) are dropped from every output: a teacher's tokens are CLS and
  patches, as the student's.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ArgumentParser, UsageError, run_cli
from losses import entropy_loss, importance_loss
from pretrained import CLASSIFIER, Frozen, build_vit, vit_config, vit_weights
from vit import VisionTransformer

NEVER_RUN = ("norm.", *CLASSIFIER)  # TGR's teacher also stops before the final norm


# ----------------------------------------------------------------------------- the teacher
class UnreadMLP(nn.Module):
    """Stands in for an MLP whose output is never read: adds nothing, costs nothing."""

    def forward(self, h):
        return torch.zeros_like(h), None  # (B, N, D_t), no routing


class Teacher(Frozen):
    """A frozen ViT that returns the LN2 outputs of chosen 1-indexed blocks.

    feats = teacher(images)    list of (B, N, D_t) float32, one per entry of `layers`;
    layer depth + 1 (`--teacher-layers final`) is the last block's output after the final norm
    """

    def __init__(self, vit, layers, *, dtype="bf16", resample=False, kind="", pretrained=True):
        super().__init__()
        self.layers = tuple(layers)  # 1-indexed; depth + 1 is "final"
        self.depth = len(vit.blocks)
        self.final = max(self.layers) > self.depth  # the paper's last-layer ablation

        # cut what never runs: the blocks past the deepest one needed, the head, the final norm,
        # and the deepest block's MLP, whose input h_t is all that is read of it
        vit.blocks = vit.blocks[: max(self.layers)]  # never run past the deepest block needed
        vit.norm = vit.norm if self.final else nn.Identity()  # run for "final" only
        vit.head = nn.Identity()
        if not self.final:
            vit.blocks[-1].mlp = UnreadMLP()

        # how it runs, and what it is
        self.vit = vit
        self.dtype = dtype  # "bf16" autocast or "fp32"
        self.resample = resample  # resize other images to its grid
        self.kind = kind
        self.pretrained = pretrained
        self.dim = vit.embed_dim  # D_t
        self.grid = vit.grid  # G
        self.patch_size = vit.patch_embed.proj.kernel_size[0]
        self.img_size = self.grid * self.patch_size
        self.freeze()

        # h_t^(i): a hook on each wanted block's norm2 keeps its output, what the block's MLP
        # (and a student router) reads, while the block itself runs as the student's do
        self.kept = {}  # block -> (B, N, D_t), filled during a forward
        for i in sorted({i for i in self.layers if i <= self.depth}):
            vit.blocks[i - 1].norm2.register_forward_hook(self.keeper(i))

    def keeper(self, i):
        """The forward hook of block i's norm2: keep its output as h_t^(i)."""

        def keep(module, inputs, output):
            self.kept[i] = output

        return keep

    @torch.no_grad()
    def forward(self, images):
        if images.shape[-2:] != (self.img_size, self.img_size):
            if not self.resample:
                raise UsageError(
                    f"teacher expects {self.img_size}x{self.img_size} images ({self.grid}x"
                    f"{self.grid} patches of {self.patch_size}), got {tuple(images.shape[-2:])}; "
                    "pass --teacher-resample to resize them"
                )
            size = (self.img_size, self.img_size)
            images = F.interpolate(images, size=size, mode="bilinear")  # (B, 3, G·P, G·P)

        # the blocks up to the deepest wanted one; the hooks keep their LN2 outputs
        with self.autocast(images):
            x = self.vit.embed(images)  # (B, N, D_t)
            for block in self.vit.blocks:
                x, _ = block(x)  # (B, N, D_t); a dense block routes nothing
            feats = dict(self.kept)
            self.kept.clear()
            if self.final:  # the final features: every block, then the final norm
                feats[self.depth + 1] = self.vit.norm(x)  # (B, N, D_t)

        # registers dropped: CLS and patches, as the student's tokens, in float32
        prefix = self.vit.num_prefix_tokens  # 1 + R
        tokens = lambda h: torch.cat([h[:, :1], h[:, prefix:]], dim=1) if prefix > 1 else h
        return [tokens(feats[i]).float() for i in self.layers]  # (B, 1 + G², D_t) each

    def extra_repr(self):
        return f"kind={self.kind}, layers={self.layers}, dim={self.dim}, grid={self.grid}"


def load_teacher(
    source,
    layers,
    *,
    dtype="bf16",
    random_ok=False,
    resample=False,
    student_grid=None,
    reinit=None,
):
    """Build a frozen `Teacher` from a checkpoint path or "torchvision:NAME".

    layers: 1-indexed teacher blocks, one per student MoE layer (repeats allowed).
    student_grid: the student's patch-grid side; a different teacher grid is an error
    unless `resample`. random_ok: torchvision weights may be random if not cached.
    reinit: a seed: the source's architecture with fresh random weights (`random_twin`).
    """
    if dtype not in ("bf16", "fp32"):
        raise UsageError(f"teacher dtype {dtype!r}: use bf16 or fp32")
    if not layers:
        raise UsageError("no teacher layers given")

    # the weights and the architecture they describe; the blocks asked for must exist
    sd, args, kind, pretrained = vit_weights(source, random_ok, "--teacher")
    cfg = vit_config(sd, args, source)
    bad = [i for i in layers if i != "final" and not 1 <= int(i) <= cfg["depth"]]
    layers = [cfg["depth"] + 1 if i == "final" else int(i) for i in layers]  # depth + 1: final
    if bad:
        depth = cfg["depth"]
        raise UsageError(f"teacher block {bad[0]} does not exist: {source} has 1..{depth}")

    # teacher patch (r, c) must cover student patch (r, c): the same grid, or resampled
    grid = cfg["img_size"] // cfg["patch_size"]
    if student_grid is not None and student_grid != grid and not resample:
        raise UsageError(
            f"token grids differ: teacher {grid}x{grid} ({cfg['img_size']} px, patch "
            f"{cfg['patch_size']}) vs student {student_grid}x{student_grid}; use a teacher of "
            "the student's grid or pass --teacher-resample"
        )

    # the ViT, without what never runs (or its random twin: --teacher-reinit)
    skip = NEVER_RUN if max(layers) <= cfg["depth"] else CLASSIFIER  # "final" runs the norm
    vit = build_vit(sd, cfg, source, skip, student_grid)  # the head: dropped by Teacher
    if reinit is not None:
        vit = random_twin(vit, cfg, reinit)
        kind = f"{kind}, re-initialised (seed {reinit})"
    return Teacher(vit, layers, dtype=dtype, resample=resample, kind=kind, pretrained=pretrained)


def random_twin(vit, cfg, seed):
    """The teacher's architecture with the random weights a dense run starts from (`--teacher-
    reinit SEED`): the control that asks whether TGR needs the teacher's *knowledge*, or only a
    fixed network to anchor the routing to. Drawn from a forked RNG, so the run's own random
    stream (student initialisation, data order) is the same as with the trained teacher."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        twin = VisionTransformer(**{**cfg, "img_size": vit.grid * cfg["patch_size"]})
    return twin


# ----------------------------------------------------------------------------- teacher router
class TeacherRouter(nn.Linear):
    """R_t: Linear(D_t -> E), no bias, no noise; logits = router(h), (B, N, E)."""

    def __init__(self, teacher_dim, num_experts):
        super().__init__(teacher_dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.weight, std=0.02)  # as the student's router


def build_teacher_routers(teacher, num_experts):
    """One fresh TeacherRouter per teacher layer (= per student MoE layer)."""
    return nn.ModuleList(TeacherRouter(teacher.dim, num_experts) for _ in teacher.layers)


def teacher_route(teacher, routers):
    """images -> [R_t^(i)(h_t^(i)) for each MoE layer i]: the (B, N, E) teacher-router logits.

    The one place the frozen teacher's features meet the trainable routers (train.py's step,
    the validation agreement and eval.py --route teacher all call it).
    """
    return lambda images: [R(h) for R, h in zip(routers, teacher(images))]  # (B, N, E) each


def teacher_objective(teacher_logits, load_coef=0.005, ent_coef=0.005, groups=1):
    """L_teacher over the MoE layers; returns (total, {"importance", "ent"} unweighted sums).

    groups: L_imp per routing group of images, averaged (the student's V-MoE losses are taken
    that way, `--teacher-balance group`), or 1: over the whole batch (the default).

    No task loss: the router's only aims are balanced and confident routing. The paper calls
    the balance part its "load" loss (λ_load); what it computes is V-MoE's importance loss,
    CV² of the mean probabilities (the teacher router has no noise, so no noisy load term),
    and it is logged under that name (train_teacher_importance), not as the student's load.
    """
    if not teacher_logits:
        raise ValueError("teacher_objective needs the logits of at least one layer")
    imp = ent = 0.0
    for logits in teacher_logits:
        p_t = logits.float().softmax(dim=-1)  # (B, N, E)
        imp = imp + importance_loss(p_t, groups)  # groups of whole images: (B, N) in order
        ent = ent + entropy_loss(p_t)
    # L_teacher = Σ_i λ_load·L_imp(p_t^(i)) + λ_ent·L_ent(p_t^(i))
    total = load_coef * imp + ent_coef * ent
    return total, {"importance": imp.detach(), "ent": ent.detach()}


# ----------------------------------------------------------------------------- command line
def main(args):
    """Load the teacher of `args`, run it on two random images, print what it is."""
    options = dict(
        dtype=args.teacher_dtype,
        random_ok=args.teacher_random,
        resample=args.teacher_resample,
        student_grid=args.img_size // args.patch_size,
    )
    teacher = load_teacher(args.source, args.layers, **options)
    feats = teacher(torch.randn(2, 3, args.img_size, args.img_size))
    print(
        f"{teacher.kind} teacher: D_t={teacher.dim}, {teacher.depth} blocks, grid "
        f"{teacher.grid}x{teacher.grid}, patch {teacher.patch_size}, "
        f"{'pretrained' if teacher.pretrained else 'RANDOM'} weights, {teacher.dtype}"
    )
    for i, h in zip(teacher.layers, feats):
        print(f"block {i}: LN2 output {tuple(h.shape)}")


def get_args_parser():
    """teacher.py's flags, in train.py's spelling (DeiT's underscore forms are aliases)."""
    p = ArgumentParser("teacher.py", description="Load a TGR teacher, print its feature shapes.")
    p.add_argument(
        "source",
        help="a DeiT-III / DINOv2 / train.py checkpoint (.pth, .pt), or torchvision:NAME",
    )
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[8, 10, 12],
        help="1-indexed teacher blocks whose LN2 outputs to return, one per student MoE layer",
    )
    p.add_argument(
        "--img-size",
        "--img_size",
        type=int,
        default=224,
        help="the student's image side in pixels",
    )
    p.add_argument(
        "--patch-size",
        "--patch_size",
        type=int,
        default=16,
        help="the student's patch side in pixels (the teacher must match its grid)",
    )
    p.add_argument(
        "--teacher-dtype",
        "--teacher_dtype",
        "--dtype",
        default="bf16",
        choices=["bf16", "fp32"],
        help="autocast dtype of the teacher's forward (its features are returned as float32)",
    )
    p.add_argument(
        "--teacher-random",
        "--teacher_random",
        action="store_true",
        help="allow torchvision weights that are not cached to be random (no download)",
    )
    p.add_argument(
        "--teacher-resample",
        "--teacher_resample",
        action="store_true",
        help="resample the teacher's position grid and the images to the student's grid",
    )
    return p


def cli(argv=None):
    run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
