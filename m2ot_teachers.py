"""M²oT's teachers: frozen models whose *final* features the student distils.

The idea
--------
M²oT (Multi-Teacher Mixture-of-Experts distillation) distils several frozen foundation
models into one student at once. What it takes from each teacher i is T_i(x): the teacher's
final features, after its final norm, as a CLS vector and a grid of patch tokens. These are
not TGR's teacher features (teacher.py: the *intermediate* LN2 outputs a router would read);
they are what a downstream user of the teacher would see.

    cls, patches = teacher(images)     (B, D_t), (B, g², D_t) float32

Sources: anything `teacher.load_teacher` reads (a DeiT-III / DINOv2 / torchvision ViT or a
dense run of train.py), or "timm:NAME=PATH" for models that are not plain ViTs (SigLIP,
SAM2/Hiera, AIMv2, CLIP image towers), run through timm's `forward_intermediates`. A source
may end in "@SIZE", the side in pixels it runs at (`teacher_source`).

Legend (paper -> code): T_i -> `FinalTeacher(images)`; m2ot.py standardises and aligns it.
Letters: B images, D_t a teacher's width, g its grid side, p_t its patch size.

Decisions where the paper is silent
-----------------------------------
* Final teachers run at the student's pixel size unless "SRC@SIZE" names another: round
  (size / p_t) patches of their own size p_t (a hierarchical model's: its last map's stride),
  positions resampled bicubically (ours, or timm's `set_input_size`: the same), images resized
  bilinearly; m2ot.py aligns their g×g grids. Native sizes cost more (DINOv2 at 518 px ~5x
  224 px) for no new pixels: a finer map and the size they were trained at (docs/m2ot.md).
* Their CLS is the class token after the final norm, else the mean of the patches. timm models
  give the last block's (stage's) map from `forward_intermediates`, normed where timm allows
  (Hiera/SAM2 norm only their pooled vector), and mean/std from `pretrained_cfg`; ViT
  checkpoints' are ImageNet's. The caller renormalises the images (`m2ot.renormalise`).
* A final teacher runs the final norm, never the head (any class count loads).
* "timm:NAME=PATH": `timm.create_model(NAME, num_classes=0)`, PATH loaded strictly (classifier
  ignored); a blank image run at load gives width and grid (`_measure`), or one line if the
  model cannot take that size. "timm:NAME" with `random_ok`: random weights from a forked RNG.
  timm is optional: imported only when a timm teacher is asked for.
"""

import math
from inspect import signature
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from augment import MEAN, STD
from errors import UsageError
from pretrained import (
    CLASSIFIER,
    Frozen,
    build_vit,
    check_keys,
    read_state_dict,
    vit_config,
    vit_weights,
)


def teacher_source(source, img_size):
    """--teachers SRC[@SIZE] -> (SRC, the side in pixels the teacher runs at: SIZE, else
    the student's img_size). A file whose own name holds an @ is taken whole."""
    src, at, size = str(source).rpartition("@")
    if not at or Path(source).exists():
        return source, img_size
    if not size.isdigit() or int(size) < 1:
        why = f"{size!r} after the @ is not a size in pixels"
        raise UsageError(f"--teachers {source}: {why} (SRC@SIZE, e.g. dinov2.pth@518)")
    return src, int(size)


class FinalTeacher(Frozen):
    """A frozen model's final features (M²oT's T_i), after its final norm, registers dropped.

    cls, patches = teacher(images)    (B, D_t), (B, g², D_t) float32; images (B, 3, H, W) in
    the teacher's own `mean`/`std`. model: a `vit.VisionTransformer`, or a timm model run with
    `forward_intermediates(**timm_opts)` (its `dim` and `grid` are set by `_measure`).
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
        self.model = model
        self.dtype = dtype  # "bf16" autocast or "fp32"
        self.timm_opts = timm_opts  # forward_intermediates' options; None for our ViT
        self.img_size = img_size  # the side in pixels it runs at
        self.patch_size = patch_size  # p_t
        self.grid = img_size // patch_size  # g
        self.mean = tuple(map(float, mean))  # its own input normalisation
        self.std = tuple(map(float, std))
        self.kind = kind
        self.source = str(source)
        self.pretrained = pretrained
        self.has_cls = timm_opts is None or timm_opts.get("return_prefix_tokens", False)
        self.dim = getattr(model, "embed_dim", None)
        self.freeze()

    @torch.no_grad()
    def forward(self, images):
        if images.shape[-2:] != (self.img_size, self.img_size):
            size = (self.img_size, self.img_size)
            images = F.interpolate(images, size=size, mode="bilinear")  # (B, 3, g·p, g·p)

        # the final features: CLS (or the patches' mean) and the patch tokens, registers dropped
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


def _measure(teacher, where):
    """Resize a timm teacher's input and run one blank image through it: its width and
    grid, or one line saying why it cannot run at the student's size."""
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
        s = teacher.img_size
        why = (str(err).splitlines() or [""])[0][:200]  # the first line of the error
        raise UsageError(
            f"{where} cannot run at {s}x{s} px (the student's size in {teacher.patch_size}-px "
            f"patches): {type(err).__name__}: {why}; choose another model or --img-size"
        ) from None
    teacher.dim = patches.shape[-1]  # D_t
    teacher.grid = math.isqrt(patches.shape[1])  # g


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

    # the model, and its weights from PATH (its classifier ignored)
    with torch.random.fork_rng(devices=[]):  # random init: torch's stream left as it was
        model = timm.create_model(name, pretrained=False, num_classes=0)
    if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
        raise UsageError(f"timm:{name} has no forward_intermediates: choose another model")
    if path:
        sd = read_state_dict(path, f"timm:{name}")[0]
        expected = model.state_dict()
        head = model.pretrained_cfg.get("classifier") or "head"  # a name, or several
        head = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
        sd = {k: v for k, v in sd.items() if k in expected or not k.startswith(head)}
        check_keys(sd, expected, path, model=f"timm's {name}")
        model.load_state_dict(sd)

    # how it runs: round(S / p_t) patches of its own size, its CLS if it has one, its mean/std
    patch = model.feature_info[-1]["reduction"]  # a ViT's patch, a hierarchy's last stride
    params = signature(model.forward_intermediates).parameters
    has_cls = getattr(model, "cls_token", None) is not None and "return_prefix_tokens" in params
    opts = {"norm": True, "return_prefix_tokens": True} if has_cls else {"norm": True}
    size = max(1, round(img_size / patch)) * patch
    cfg = model.pretrained_cfg
    mean = cfg.get("mean", MEAN)  # its own input normalisation
    std = cfg.get("std", STD)

    # the teacher, its width and grid measured on one blank image
    about = dict(dtype="fp32", kind="timm", source=source, pretrained=bool(path), timm_opts=opts)
    teacher = FinalTeacher(model, img_size=size, patch_size=patch, mean=mean, std=std, **about)
    _measure(teacher, source)  # in fp32: bf16 is slow on many CPUs
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

    # a ViT checkpoint: round(S / p_t) patches of its own size, positions resampled
    sd, args, kind, pretrained = vit_weights(source, random_ok, "teacher")
    cfg = vit_config(sd, args, source)
    patch = cfg["patch_size"]  # p_t
    grid = max(1, round(img_size / patch))  # g
    vit = build_vit(sd, cfg, source, CLASSIFIER, grid)  # the final norm is loaded and run
    about = dict(dtype=dtype, kind=kind, source=source, pretrained=pretrained)
    return FinalTeacher(vit, img_size=grid * patch, patch_size=patch, **about)
