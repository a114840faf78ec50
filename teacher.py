"""The frozen dense teacher, its layer-aligned features, and the teacher router; M²oT's teachers.

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
official layout), or a dense run of this project's `train.py --method dense`. checkpoint.py
tells them apart by their contents and loads them, shape-checked, into `vit.VisionTransformer`;
this file decides what runs of it.

M²oT's teachers (`load_final_teacher`) give *final* features, after the final norm, from the
sources above or "timm:NAME=PATH" for models that are not plain ViTs (SigLIP, SAM2/Hiera,
AIMv2, CLIP image towers), run through timm's `forward_intermediates`.

Legend (paper -> code): h_t -> `teacher(images)[j]`; R_t -> `TeacherRouter`; p_t -> softmax of
its logits; λ_load, λ_ent -> `load_coef`, `ent_coef` (0.005 each, TGR Table S1); M²oT's T_i ->
`FinalTeacher(images)`.
Letters: B images, N tokens (patches + CLS), D_t teacher width, E experts, G grid side,
R registers, g a final teacher's grid side.

Decisions where the papers are silent
-------------------------------------
* The TGR teacher never runs the final norm and head, so their keys are ignored (any class
  count loads); a final teacher runs the norm, never the head.
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
* Final teachers (M²oT) run at the student's pixel size unless "SRC@SIZE" names another: round
  (size / p_t) patches of their own size p_t (a hierarchical model's: its last map's stride),
  positions resampled bicubically (ours, or timm's `set_input_size`: the same), images resized
  bilinearly; m2ot.py aligns their g×g grids. Native sizes cost more (DINOv2 at 518 px ~5x
  224 px) for no new pixels: a finer map and the size they were trained at (docs/m2ot.md).
* Their CLS is the class token after the final norm, else the mean of the patches. timm models
  give the last block's (stage's) map from `forward_intermediates`, normed where timm allows
  (Hiera/SAM2 norm only their pooled vector), and mean/std from `pretrained_cfg`; ViT
  checkpoints' are ImageNet's. The caller renormalises the images.
* "timm:NAME=PATH": `timm.create_model(NAME, num_classes=0)`, PATH loaded strictly (classifier
  ignored); a blank image run at load gives width and grid, or one line if the model cannot
  take that size. "timm:NAME" with `random_ok`: random weights from a forked RNG.
"""

import math
from inspect import signature

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from augment import MEAN, STD
from checkpoint import build_vit, check_keys, read_state_dict, vit_config, vit_weights
from flags import ArgumentParser, UsageError, add_flag, run_cli
from losses import entropy_loss, importance_loss
from m2ot import teacher_source
from vit import VisionTransformer

CLASSIFIER = ("head.", "fc_norm.")  # never run, ignored
NEVER_RUN = ("norm.", *CLASSIFIER)  # TGR's teacher also stops before the final norm


# ----------------------------------------------------------------------------- the teacher
class _Frozen(nn.Module):
    """What every teacher shares: no gradients, eval mode for good, optional bf16 autocast."""

    def freeze(self):
        self.requires_grad_(False)  # stop-gradient: the backbone never updates
        self.train(False)

    def train(self, mode=True):
        # frozen for good: an outer model.train() must not switch the teacher to training
        return super().train(False)

    def autocast(self, images):
        return torch.autocast(images.device.type, torch.bfloat16, enabled=self.dtype == "bf16")


class Teacher(_Frozen):
    """A frozen ViT that returns the LN2 outputs of chosen 1-indexed blocks.

    feats = teacher(images)    list of (B, N, D_t) float32, one per entry of `layers`;
    layer depth + 1 (`--teacher-layers final`) is the last block's output after the final norm
    """

    def __init__(self, vit, layers, *, dtype="bf16", resample=False, kind="", pretrained=True):
        super().__init__()
        self.layers, self.depth = tuple(layers), len(vit.blocks)
        self.final = max(self.layers) > self.depth  # the paper's last-layer ablation
        vit.blocks = vit.blocks[: max(self.layers)]  # never run past the deepest block needed
        vit.norm, vit.head = vit.norm if self.final else nn.Identity(), nn.Identity()  # norm: final
        self.vit, self.dtype, self.resample = vit, dtype, resample
        self.kind, self.pretrained = kind, pretrained
        self.dim, self.grid = vit.embed_dim, vit.grid
        self.patch_size = vit.patch_embed.proj.kernel_size[0]
        self.img_size = self.grid * self.patch_size
        self.freeze()

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
        wanted, feats, prefix = set(self.layers), {}, self.vit.num_prefix_tokens
        tokens = lambda h: torch.cat([h[:, :1], h[:, prefix:]], dim=1) if prefix > 1 else h
        with self.autocast(images):
            x = self.vit.embed(images)  # (B, N, D_t)
            for i, block in enumerate(self.vit.blocks, start=1):  # vit.Block, written out
                x = x + block.ls1(block.attn(block.norm1(x)))  # (B, N, D_t)
                h = block.norm2(x)  # (B, N, D_t) h_t^(i): what the MLP (and a router) reads
                if i in wanted:  # registers dropped: CLS and patches, as the student's tokens
                    feats[i] = tokens(h).float()  # (B, 1 + G², D_t)
                if i < len(self.vit.blocks) or self.final:
                    x = x + block.ls2(block.mlp(h)[0])  # (B, N, D_t)
            if self.final:  # the final features: every block, then the final norm
                feats[self.depth + 1] = tokens(self.vit.norm(x)).float()  # (B, 1 + G², D_t)
        return [feats[i] for i in self.layers]

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
    sd, args, kind, pretrained = vit_weights(source, random_ok, "--teacher")
    cfg = vit_config(sd, args, source)
    bad = [i for i in layers if i != "final" and not 1 <= int(i) <= cfg["depth"]]
    layers = [cfg["depth"] + 1 if i == "final" else int(i) for i in layers]  # depth + 1: final
    if bad:
        depth = cfg["depth"]
        raise UsageError(f"teacher block {bad[0]} does not exist: {source} has 1..{depth}")
    grid = cfg["img_size"] // cfg["patch_size"]
    if student_grid is not None and student_grid != grid and not resample:
        raise UsageError(
            f"token grids differ: teacher {grid}x{grid} ({cfg['img_size']} px, patch "
            f"{cfg['patch_size']}) vs student {student_grid}x{student_grid}; use a teacher of "
            "the student's grid or pass --teacher-resample"
        )
    skip = NEVER_RUN if max(layers) <= cfg["depth"] else CLASSIFIER  # "final" runs the norm
    vit = build_vit(sd, cfg, source, skip, student_grid)  # the head: dropped by Teacher
    if reinit is not None:
        vit, kind = random_twin(vit, cfg, reinit), f"{kind}, re-initialised (seed {reinit})"
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


# ----------------------------------------------------------------------------- final features
class FinalTeacher(_Frozen):
    """A frozen model's final features (M²oT's T_i), after its final norm, registers dropped.

    cls, patches = teacher(images)    (B, D_t), (B, g², D_t) float32; images (B, 3, H, W) in
    the teacher's own `mean`/`std`. model: a `vit.VisionTransformer`, or a timm model run with
    `forward_intermediates(**timm_opts)` (its `dim` and `grid` are set by `_probe`).
    """

    def __init__(
        self,
        model,
        *,
        img_size,
        patch_size,
        mean=MEAN,
        std=STD,
        dtype="bf16",
        kind="",
        source="",
        pretrained=True,
        timm_opts=None,
    ):
        super().__init__()
        self.model, self.dtype, self.timm_opts = model, dtype, timm_opts
        self.img_size, self.patch_size, self.grid = img_size, patch_size, img_size // patch_size
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.kind, self.source, self.pretrained = kind, str(source), pretrained
        self.has_cls = timm_opts is None or timm_opts.get("return_prefix_tokens", False)
        self.dim = getattr(model, "embed_dim", None)
        self.freeze()

    @torch.no_grad()
    def forward(self, images):
        if images.shape[-2:] != (self.img_size, self.img_size):
            size = (self.img_size, self.img_size)
            images = F.interpolate(images, size=size, mode="bilinear")  # (B, 3, g·p, g·p)
        with self.autocast(images):
            if self.timm_opts is None:  # every block, then the final norm
                x, _ = self.model.forward_features(images)  # (B, 1 + R + g², D_t)
                prefix = x[:, : self.model.num_prefix_tokens]  # (B, 1 + R, D_t)
                patches = x[:, self.model.num_prefix_tokens :]  # (B, g², D_t)
            else:  # timm: the last block's (stage's) map, and its prefix tokens if it has CLS
                out = self.model.forward_intermediates(
                    images, indices=1, intermediates_only=True, **self.timm_opts
                )[-1]
                fmap, prefix = out if self.has_cls else (out, None)  # (B, D_t, g, g), (B, ·, D_t)
                patches = rearrange(fmap, "b d h w -> b (h w) d")  # (B, g², D_t)
            cls = prefix[:, 0] if self.has_cls else patches.mean(dim=1)  # (B, D_t)
        return cls.float(), patches.float()

    def extra_repr(self):
        return f"kind={self.kind}, dim={self.dim}, grid={self.grid}, img_size={self.img_size}"


def _probe(teacher, where):
    """Resize a timm teacher's input, run one blank image: its width and grid, or one line."""
    blank = torch.zeros(1, 3, teacher.img_size, teacher.img_size)
    try:
        if hasattr(teacher.model, "set_input_size"):  # ViTs: positions resampled bicubically
            teacher.model.set_input_size(img_size=(teacher.img_size,) * 2)
        try:
            _, patches = teacher(blank)  # (1, g², D_t)
        except AssertionError as err:  # Hiera, SAM2: "normalization of features not supported"
            if "normaliz" not in str(err):
                raise
            teacher.timm_opts["norm"] = False  # their norm acts on the pooled vector only
            _, patches = teacher(blank)  # (1, g², D_t)
    except Exception as err:
        s, why = teacher.img_size, (str(err).splitlines() or [""])[0][:200]
        raise UsageError(
            f"{where} cannot run at {s}x{s} px (the student's size in {teacher.patch_size}-px "
            f"patches): {type(err).__name__}: {why}; choose another model or --img-size"
        ) from None
    teacher.dim, teacher.grid = patches.shape[-1], math.isqrt(patches.shape[1])


def _timm_teacher(source, img_size, dtype, random_ok):
    """`FinalTeacher` of "timm:NAME=PATH", or of "timm:NAME" with random weights (random_ok)."""
    name, _, path = source.removeprefix("timm:").partition("=")
    try:
        import timm  # a test-only dependency: imported only when a timm teacher is asked for
    except ImportError:
        raise UsageError(f"timm:{name} needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise UsageError(f"unknown timm model {name!r}: see timm.list_models()")
    if not path and not random_ok:
        raise UsageError(f"{source}: give its weights, timm:{name}=PATH, or --teacher-random")
    with torch.random.fork_rng(devices=[]):  # random init: torch's stream left as it was
        model = timm.create_model(name, pretrained=False, num_classes=0)
    if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
        raise UsageError(f"timm:{name} has no forward_intermediates: choose another model")
    if path:
        sd, expected = read_state_dict(path, f"timm:{name}")[0], model.state_dict()
        head = model.pretrained_cfg.get("classifier") or "head"  # a name, or several
        head = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
        sd = {k: v for k, v in sd.items() if k in expected or not k.startswith(head)}
        check_keys(sd, expected, path, model=f"timm's {name}")
        model.load_state_dict(sd)
    patch = model.feature_info[-1]["reduction"]  # a ViT's patch, a hierarchy's last stride
    params = signature(model.forward_intermediates).parameters
    has_cls = getattr(model, "cls_token", None) is not None and "return_prefix_tokens" in params
    opts = {"norm": True, "return_prefix_tokens": True} if has_cls else {"norm": True}
    cfg, size = model.pretrained_cfg, max(1, round(img_size / patch)) * patch
    mean, std = cfg.get("mean", MEAN), cfg.get("std", STD)  # its own input normalisation
    about = dict(dtype="fp32", kind="timm", source=source, pretrained=bool(path), timm_opts=opts)
    teacher = FinalTeacher(model, img_size=size, patch_size=patch, mean=mean, std=std, **about)
    _probe(teacher, source)  # in fp32: bf16 is slow on many CPUs
    teacher.dtype = dtype
    return teacher


def load_final_teacher(source, *, img_size, dtype="bf16", random_ok=False):
    """A frozen `FinalTeacher` (M²oT) from any `load_teacher` source or "timm:NAME=PATH".

    img_size: the student's image side in pixels, or SIZE of a "SRC@SIZE" source; the teacher
    runs at round(img_size / p_t) patches of its own patch size p_t (positions resampled).
    random_ok: torchvision weights may be random if not cached; "timm:NAME" is random.
    """
    if dtype not in ("bf16", "fp32"):
        raise UsageError(f"teacher dtype {dtype!r}: use bf16 or fp32")
    source, img_size = teacher_source(source, img_size)  # "SRC@SIZE": its own size
    if isinstance(source, str) and source.startswith("timm:"):
        return _timm_teacher(source, img_size, dtype, random_ok)
    sd, args, kind, pretrained = vit_weights(source, random_ok, "teacher")
    cfg = vit_config(sd, args, source)
    grid = max(1, round(img_size / cfg["patch_size"]))
    vit = build_vit(sd, cfg, source, CLASSIFIER, grid)  # the final norm is loaded and run
    size, patch = grid * cfg["patch_size"], cfg["patch_size"]
    about = dict(dtype=dtype, kind=kind, source=source, pretrained=pretrained)
    return FinalTeacher(vit, img_size=size, patch_size=patch, **about)


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
    options = dict(dtype=args.teacher_dtype, random_ok=args.teacher_random)
    options.update(resample=args.teacher_resample, student_grid=args.img_size // args.patch_size)
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
    p = ArgumentParser("teacher.py", description="Load a TGR teacher, print its feature shapes.")
    p.add_argument("source", help="checkpoint path or torchvision:vit_b_16")
    add_flag(p, "--layers", type=int, nargs="+", default=[8, 10, 12], help="1-indexed blocks")
    add_flag(p, "--img-size", type=int, default=224, help="the student's image size")
    add_flag(p, "--patch-size", type=int, default=16, help="the student's patch size")
    add_flag(p, "--teacher-dtype", "--dtype", default="bf16", choices=["bf16", "fp32"], help="")
    add_flag(p, "--teacher-random", action="store_true", help="random torchvision weights ok")
    add_flag(p, "--teacher-resample", action="store_true", help="resample grid and images")
    return p


def cli(argv=None):
    run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
