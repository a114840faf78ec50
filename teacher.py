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
  `layers` may name any blocks (repeats allowed), so that ablation is one flag away.

Sources, told apart by the *contents* of the file, never its name (`load_teacher`):
  1. official facebookresearch/deit DeiT-III: `{"model": sd}`, `blocks.i.gamma_1/gamma_2`, a
     `pos_embed` of (1, 196, D) with no CLS slot (added before CLS is concatenated);
  2. timm naming (`blocks.i.ls1.gamma`), e.g. `timm.create_model(...).state_dict()` saved;
  3. `"torchvision:vit_b_16"` (any torchvision ViT) or a torchvision ViT state dict;
  4. a dense checkpoint of this project's `train.py --method dense` (`{"model", "args"}`);
  5. DINOv2 in timm's layout (`reg_token`) or the official one (`register_tokens`, `mask_token`).
Every layout is renamed to timm's keys and loaded, shape-checked, into `moe.VisionTransformer`.

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
* Width, depth, patch size, grid, MLP ratio, qkv bias, layer scale and CLS-slot layout are read
  from the weights. Heads are not stored anywhere: a project checkpoint gives its model name
  (`moe.MODELS`); otherwise `HEADS_BY_WIDTH` (DeiT/timm/torchvision's 64-dim heads, ViT-H's 16).
* The TGR teacher never runs the final norm and head, so their keys are ignored (any class
  count loads); a final teacher runs the norm, never the head.
* The ViT is built on the "meta" device and the checkpoint's tensors are assigned to it: no
  random initialisation that the weights would overwrite, and loading a teacher draws nothing
  from torch's random stream (the student's initialisation does not depend on the teacher).
* The teacher runs under bf16 autocast by default (it is TGR's main extra cost); features are
  returned as float32. bf16 stays within cosine 0.999 of fp32 (tests/test_teacher.py).
* `no_grad`, not `inference_mode`: inference tensors cannot enter the teacher router's graph.
* `torchvision:NAME` uses torchvision's default weights from its cache, else downloads them;
  with `random_ok` (`--teacher-random`) a missing cache gives torchvision's random init
  without touching the network, and `teacher.pretrained` is False.
* Grids must match; `resample=True` interpolates the position grid bicubically to the
  student's and resizes input images (bilinear) to grid × teacher patch, so teacher patch
  (r, c) covers the same pixels as student patch (r, c).
* The teacher router is a bias-free linear map, the same form as the student's router.
* Registers (DINOv2-reg) follow CLS as in timm and are dropped from every output: a teacher's
  tokens are CLS and patches, as the student's. The official layout's CLS position slot folds
  into `cls_token` (timm's conversion, exact).
* Final teachers (M²oT) run at about the student's pixel size: round(img_size / p_t) patches of
  their own size p_t (a hierarchical model's: its last map's stride), positions resampled
  bicubically (ours, or timm's `set_input_size`: the same), images resized bilinearly;
  m2ot.py aligns their g×g grids. Not at their native size: a DINOv2 at 518 px costs ~5x one
  at 224 px, for pixels the student never sees.
* Their CLS is the class token after the final norm, else the mean of the patches. timm models
  give the last block's (stage's) map from `forward_intermediates`, normed where timm allows
  (Hiera/SAM2 norm only their pooled vector), and mean/std from `pretrained_cfg`; ViT
  checkpoints' are ImageNet's. The caller renormalises the images.
* "timm:NAME=PATH": `timm.create_model(NAME, num_classes=0)`, PATH loaded strictly (classifier
  ignored); a blank image run at load gives width and grid, or one line if the model cannot
  take that size. "timm:NAME" with `random_ok`: random weights from a forked RNG.
* Two helpers every command line needs live here, the lowest file that has a command line:
  `read_checkpoint` (the one checkpoint reader, used for teacher weights, train.py's --resume
  and --finetune, and eval.py) and `run_cli` (a user mistake becomes one `error:` line).
"""

import argparse
import math
import os
import re
import sys
import warnings
import zipfile
from inspect import signature
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from losses import entropy_loss, importance_loss
from moe import MODELS, VisionTransformer

HEADS_BY_WIDTH = {96: 3, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # DeiT, timm, torchvision
CLASSIFIER = ("head.", "fc_norm.")  # never run, ignored
NEVER_RUN = ("norm.", *CLASSIFIER)  # TGR's teacher also stops before the final norm
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ViT checkpoints'
TORCHVISION_TO_TIMM = [  # (pattern, replacement), applied in order
    (r"^class_token$", "cls_token"),
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.", "head."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."),
    (r"\.ln_([12])\.", r".norm\1."),
    (r"\.self_attention\.in_proj_(weight|bias)$", r".attn.qkv.\1"),  # q, k, v stacked as timm
    (r"\.self_attention\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.(0|linear_1)\.", ".mlp.fc1."),
    (r"\.mlp\.(3|linear_2)\.", ".mlp.fc2."),
]


class TeacherError(ValueError):
    """A teacher source or setting that cannot work; the message is one line with the fix."""


# ----------------------------------------------------------------------------- reading weights
def read_checkpoint(path, what="checkpoint", hint=""):
    """The project's one checkpoint reader (teacher weights, --resume, --finetune, eval.py).

    torch.load on the CPU with `weights_only=True` (tensors and plain containers only), which
    every file train.py writes and the DeiT-III/timm/torchvision files allow. Only a torch.save
    zip holding other Python objects (an argparse Namespace, numpy RNG states: older DeiT-style
    checkpoints) is read in full, since the user named the file. Every failure is one
    TeacherError line naming `what` (e.g. "--resume") and the path.
    """
    if not os.path.isfile(path):
        raise TeacherError(f"{what} {path}: no such checkpoint{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not zipfile.is_zipfile(path):  # not (or no longer all) a torch.save zip
            why = f"not a PyTorch checkpoint, or truncated ({type(err).__name__})"
            raise TeacherError(f"{what} {path}: {why}; use another file") from None
    try:  # a torch.save zip holding Python objects
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise TeacherError(f"{what} {path}: cannot read it ({type(err).__name__}: {err})") from None


def _torchvision_weights(name, random_ok):
    """(state_dict, pretrained) of torchvision's ViT `name`; downloads only if allowed."""
    import torchvision

    names = [n for n in torchvision.models.list_models() if n.startswith("vit_")]
    if name not in names:
        raise TeacherError(f"unknown torchvision ViT {name!r}: choose one of {', '.join(names)}")
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if os.path.isfile(cached) or not random_ok:
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False), True
        except Exception as err:  # offline, proxy, truncated file ...
            raise TeacherError(
                f"torchvision:{name}: weights are not in {cached} and could not be fetched "
                f"({type(err).__name__}); put the file there, or pass --teacher-random"
            ) from None
    warnings.warn(f"torchvision:{name}: weights not cached, using RANDOM weights", stacklevel=3)
    return torchvision.models.get_model(name, weights=None).state_dict(), False


def _state_dict(path, what, hint=""):
    """(tensors, args) of a checkpoint file: {"model"}, {"state_dict"} or a plain state dict."""
    ckpt = read_checkpoint(str(path), what, hint)
    if not isinstance(ckpt, dict):
        raise TeacherError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    args = ckpt.get("args") or {}
    args = args if isinstance(args, dict) else getattr(args, "__dict__", {})  # Namespace
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)} if isinstance(sd, dict) else {}
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}  # DDP/compile
    if not sd:
        raise TeacherError(f"{path} holds no weights (top-level keys: {list(ckpt)[:5]})")
    return sd, args


def _to_timm(sd):
    """Rename a DeiT-III, torchvision, DINOv2 or timm ViT state dict to timm keys: (sd, kind)."""
    if "register_tokens" in sd or "mask_token" in sd:  # facebookresearch/dinov2
        sd = {k: v for k, v in sd.items() if k != "mask_token"}  # for masked training only
        if "register_tokens" in sd:  # CLS's position slot folds into CLS; registers have none
            sd["reg_token"] = sd.pop("register_tokens")  # (1, R, D_t)
            sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]  # (1, 1, D_t)
            sd["pos_embed"] = sd["pos_embed"][:, 1:]  # (1, G², D_t)
        return sd, "dinov2"
    if "conv_proj.weight" in sd or any(k.startswith("encoder.layers.") for k in sd):
        renamed = {}
        for key, value in sd.items():
            for pattern, repl in TORCHVISION_TO_TIMM:
                key = re.sub(pattern, repl, key)
            renamed[key] = value
        return renamed, "torchvision"
    if any(k.endswith(".gamma_1") for k in sd):  # official DeiT-III: gamma_1 is timm's ls1.gamma
        return {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in sd.items()}, "deit3"
    return sd, "timm"


def _vit_weights(source, random_ok, what):
    """(timm-keyed state dict, checkpoint args, kind, pretrained) of a ViT teacher source."""
    if isinstance(source, str) and source.startswith("torchvision:"):
        (sd, pretrained), args = _torchvision_weights(source.split(":", 1)[1], random_ok), {}
    else:
        hint = " (give a .pth/.pt file or torchvision:vit_b_16)"
        (sd, args), pretrained = _state_dict(source, what, hint), True
    sd, kind = _to_timm(sd)
    return sd, args, "project" if args.get("method") is not None else kind, pretrained


def _vit_config(sd, args, where):
    """VisionTransformer kwargs read from the weights (heads: args or HEADS_BY_WIDTH)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.norm2.weight"):
        if key not in sd:
            seen = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(sd.items())[:3])
            raise TeacherError(f"{where} is not a ViT checkpoint: no {key!r} (it holds {seen}, …)")
    if any(k.endswith((".mlp.router.weight", ".mlp.w1", ".mlp.phi")) for k in sd):
        method = args.get("method", "?")
        raise TeacherError(
            f"{where} is a sparse MoE checkpoint (method {method}); the teacher must be dense: "
            "train one with train.py --method dense"
        )
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape  # (D_t, 3, P, P)
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    regs = sd["reg_token"].shape[1] if "reg_token" in sd else 0  # R
    positions = sd["pos_embed"].shape[1]
    grid = math.isqrt(positions)
    no_embed_class = grid * grid == positions  # DeiT-III, DINOv2-reg: no CLS slot
    if not no_embed_class:
        grid = math.isqrt(positions - 1 - regs)
        if grid * grid != positions - 1 - regs:
            why = f"not G² or G² + {1 + regs}"
            raise TeacherError(f"{where}: pos_embed has {positions} positions, {why}")
    name = args.get("model")
    if name in MODELS and MODELS[name]["embed_dim"] == dim:
        heads = MODELS[name]["num_heads"]
    elif dim in HEADS_BY_WIDTH or dim % 64 == 0:
        heads = HEADS_BY_WIDTH.get(dim, dim // 64)
    else:
        raise TeacherError(f"{where}: cannot tell the number of heads of a width-{dim} ViT")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * dim
    return dict(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=0,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=hidden / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
        no_embed_class=no_embed_class,
        reg_tokens=regs,
    )


def _check_keys(sd, expected, where, model="the ViT its weights describe"):
    """Strict load with a readable message: first missing, mismatching or unexpected key."""
    for key, value in expected.items():
        if key not in sd:
            raise TeacherError(f"{where} does not fit {model}: {key} missing")
        if sd[key].shape != value.shape:
            raise TeacherError(
                f"{where}: {key} is {tuple(sd[key].shape)} in the checkpoint but "
                f"{tuple(value.shape)} in {model}"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise TeacherError(f"{where} has weights {model} lacks: {extra[0]} ({len(extra)} in all)")


def _resample_pos_embed(pos, grid, new_grid, num_prefix):
    """Bicubic interpolation of the patch positions to another grid; prefix slots kept."""
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]  # (1, 1 + R or 0, D_t), (1, G², D_t)
    patches = rearrange(patches, "1 (h w) d -> 1 d h w", h=grid)  # (1, D_t, G, G)
    patches = F.interpolate(
        patches.float(), size=(new_grid, new_grid), mode="bicubic", antialias=True
    )  # (1, D_t, G', G')
    return torch.cat([prefix, rearrange(patches, "1 d h w -> 1 (h w) d")], dim=1)  # (1, N', D_t)


def _build_vit(sd, cfg, where, skip, grid=None):
    """`moe.VisionTransformer(**cfg)` holding `sd` but the keys under `skip`, at `grid`
    (positions resampled when it is not the weights' own). Skipped modules stay on "meta"."""
    with torch.device("meta"):  # shapes only: no random init to overwrite, no RNG consumed
        vit = VisionTransformer(**cfg)
    expected = {k: v for k, v in vit.state_dict().items() if not k.startswith(skip)}
    sd = {k: v.float() for k, v in sd.items() if not k.startswith(skip)}
    _check_keys(sd, expected, where)
    if grid is not None and grid != vit.grid:
        prefix = 0 if cfg["no_embed_class"] else vit.num_prefix_tokens
        sd["pos_embed"] = _resample_pos_embed(sd["pos_embed"], vit.grid, grid, prefix)
        with torch.device("meta"):
            vit = VisionTransformer(**{**cfg, "img_size": grid * cfg["patch_size"]})
    vit.load_state_dict(sd, strict=False, assign=True)  # strict by _check_keys
    return vit


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

    feats = teacher(images)    list of (B, N, D_t) float32, one per entry of `layers`
    """

    def __init__(self, vit, layers, *, dtype="bf16", resample=False, kind="", pretrained=True):
        super().__init__()
        self.layers, self.depth = tuple(layers), len(vit.blocks)
        vit.blocks = vit.blocks[: max(self.layers)]  # never run past the deepest block needed
        vit.norm, vit.head = nn.Identity(), nn.Identity()  # nor the final norm and head
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
                raise TeacherError(
                    f"teacher expects {self.img_size}x{self.img_size} images ({self.grid}x"
                    f"{self.grid} patches of {self.patch_size}), got {tuple(images.shape[-2:])}; "
                    "pass --teacher-resample to resize them"
                )
            size = (self.img_size, self.img_size)
            images = F.interpolate(images, size=size, mode="bilinear")  # (B, 3, G·P, G·P)
        wanted, feats, prefix = set(self.layers), {}, self.vit.num_prefix_tokens
        with self.autocast(images):
            x = self.vit.embed(images)  # (B, N, D_t)
            for i, block in enumerate(self.vit.blocks, start=1):  # moe.Block, written out
                x = x + block.ls1(block.attn(block.norm1(x)))  # (B, N, D_t)
                h = block.norm2(x)  # (B, N, D_t) h_t^(i): what the MLP (and a router) reads
                if i in wanted:  # registers dropped: CLS and patches, as the student's tokens
                    h = torch.cat([h[:, :1], h[:, prefix:]], dim=1) if prefix > 1 else h
                    feats[i] = h.float()  # (B, 1 + G², D_t)
                if i < len(self.vit.blocks):
                    x = x + block.ls2(block.mlp(h)[0])  # (B, N, D_t)
        return [feats[i] for i in self.layers]

    def extra_repr(self):
        return f"kind={self.kind}, layers={self.layers}, dim={self.dim}, grid={self.grid}"


def teacher_args_from_flags(flags, moe_layers):
    """`load_teacher` keyword arguments from train.py's flags (a dict or Namespace).

    moe_layers: the student's MoE blocks; the teacher uses the same blocks unless
    --teacher-layers names others (one per MoE layer). train.py saves the result in its
    checkpoints as `teacher_args`; eval.py reads it back.
    """
    f = flags if isinstance(flags, dict) else vars(flags)
    layers = list(f["teacher_layers"] or moe_layers)
    if len(layers) != len(moe_layers):
        raise TeacherError(
            f"--teacher-layers: {len(layers)} blocks for {len(moe_layers)} MoE layers"
        )
    return dict(source=f["teacher"], layers=layers, dtype=f.get("teacher_dtype") or "bf16",
                random_ok=f["teacher_random"], resample=f["teacher_resample"],
                student_grid=f["img_size"] // f["patch_size"])  # fmt: skip


def load_teacher(
    source, layers, *, dtype="bf16", random_ok=False, resample=False, student_grid=None
):
    """Build a frozen `Teacher` from a checkpoint path or "torchvision:NAME".

    layers: 1-indexed teacher blocks, one per student MoE layer (repeats allowed).
    student_grid: the student's patch-grid side; a different teacher grid is an error
    unless `resample`. random_ok: torchvision weights may be random if not cached.
    """
    if dtype not in ("bf16", "fp32"):
        raise TeacherError(f"teacher dtype {dtype!r}: use bf16 or fp32")
    layers = [int(i) for i in layers]
    if not layers:
        raise TeacherError("no teacher layers given")
    sd, args, kind, pretrained = _vit_weights(source, random_ok, "--teacher")
    cfg = _vit_config(sd, args, source)
    bad = [i for i in layers if not 1 <= i <= cfg["depth"]]
    if bad:
        depth = cfg["depth"]
        raise TeacherError(f"teacher block {bad[0]} does not exist: {source} has 1..{depth}")
    grid = cfg["img_size"] // cfg["patch_size"]
    if student_grid is not None and student_grid != grid and not resample:
        raise TeacherError(
            f"token grids differ: teacher {grid}x{grid} ({cfg['img_size']} px, patch "
            f"{cfg['patch_size']}) vs student {student_grid}x{student_grid}; use a teacher of "
            "the student's grid or pass --teacher-resample"
        )
    vit = _build_vit(sd, cfg, source, NEVER_RUN, student_grid)  # final norm, head: by Teacher
    return Teacher(vit, layers, dtype=dtype, resample=resample, kind=kind, pretrained=pretrained)


# ----------------------------------------------------------------------------- final features
class FinalTeacher(_Frozen):
    """A frozen model's final features (M²oT's T_i), after its final norm, registers dropped.

    cls, patches = teacher(images)    (B, D_t), (B, g², D_t) float32; images (B, 3, H, W) in
    the teacher's own `mean`/`std`. model: a `moe.VisionTransformer`, or a timm model run with
    `forward_intermediates(**timm_opts)` (its `dim` and `grid` are set by `_probe`).
    """

    def __init__(self, model, *, img_size, patch_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 dtype="bf16", kind="", source="", pretrained=True, timm_opts=None):  # fmt: skip
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
        raise TeacherError(
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
        raise TeacherError(f"timm:{name} needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise TeacherError(f"unknown timm model {name!r}: see timm.list_models()")
    if not path and not random_ok:
        raise TeacherError(f"{source}: give its weights, timm:{name}=PATH, or --teacher-random")
    with torch.random.fork_rng(devices=[]):  # random init: torch's stream left as it was
        model = timm.create_model(name, pretrained=False, num_classes=0)
    if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
        raise TeacherError(f"timm:{name} has no forward_intermediates: choose another model")
    if path:
        sd, expected = _state_dict(path, f"timm:{name}")[0], model.state_dict()
        head = model.pretrained_cfg.get("classifier") or "head"  # a name, or several
        head = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
        sd = {k: v for k, v in sd.items() if k in expected or not k.startswith(head)}
        _check_keys(sd, expected, path, model=f"timm's {name}")
        model.load_state_dict(sd)
    patch = model.feature_info[-1]["reduction"]  # a ViT's patch, a hierarchy's last stride
    params = signature(model.forward_intermediates).parameters
    has_cls = getattr(model, "cls_token", None) is not None and "return_prefix_tokens" in params
    opts = {"norm": True, "return_prefix_tokens": True} if has_cls else {"norm": True}
    cfg, size = model.pretrained_cfg, max(1, round(img_size / patch)) * patch
    teacher = FinalTeacher(model, img_size=size, patch_size=patch, dtype="fp32", kind="timm",
                           mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD),
                           source=source, pretrained=bool(path), timm_opts=opts)  # fmt: skip
    _probe(teacher, source)  # in fp32: bf16 is slow on many CPUs
    teacher.dtype = dtype
    return teacher


def load_final_teacher(source, *, img_size, dtype="bf16", random_ok=False):
    """A frozen `FinalTeacher` (M²oT) from any `load_teacher` source or "timm:NAME=PATH".

    img_size: the student's image side in pixels; the teacher runs at round(img_size / p_t)
    patches of its own patch size p_t (positions resampled), so it sees the same pixels.
    random_ok: torchvision weights may be random if not cached; "timm:NAME" is random.
    """
    if dtype not in ("bf16", "fp32"):
        raise TeacherError(f"teacher dtype {dtype!r}: use bf16 or fp32")
    if isinstance(source, str) and source.startswith("timm:"):
        return _timm_teacher(source, img_size, dtype, random_ok)
    sd, args, kind, pretrained = _vit_weights(source, random_ok, "teacher")
    cfg = _vit_config(sd, args, source)
    grid = max(1, round(img_size / cfg["patch_size"]))
    vit = _build_vit(sd, cfg, source, CLASSIFIER, grid)  # the final norm is loaded and run
    return FinalTeacher(vit, img_size=grid * cfg["patch_size"], patch_size=cfg["patch_size"],
                        dtype=dtype, kind=kind, source=source, pretrained=pretrained)  # fmt: skip


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


def teacher_objective(teacher_logits, load_coef=0.005, ent_coef=0.005):
    """L_teacher over the MoE layers; returns (total, {"load", "ent"} unweighted sums).

    No task loss: the router's only aims are balanced (L_imp) and confident (L_ent) routing.
    """
    if not teacher_logits:
        raise ValueError("teacher_objective needs the logits of at least one layer")
    load = ent = 0.0
    for logits in teacher_logits:
        p_t = logits.float().softmax(dim=-1)  # (B, N, E)
        load = load + importance_loss(p_t)
        ent = ent + entropy_loss(p_t)
    # L_teacher = Σ_i λ_load·L_imp(p_t^(i)) + λ_ent·L_ent(p_t^(i))
    total = load_coef * load + ent_coef * ent
    return total, {"load": load.detach(), "ent": ent.detach()}


# ----------------------------------------------------------------------------- command lines
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: ... (see --help)`, exit 2)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main, args):
    """main(args) for train.py, eval.py and this file: a user mistake is one line, exit 2.

    User mistakes arrive as ValueError (TeacherError, bad flags, files that do not fit) or
    OSError (missing files and folders): SPEC sec. 10, never a traceback from deep inside torch.
    """
    try:
        return main(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def show_teacher(args):
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


def main(argv=None):
    parser = ArgumentParser(description="Load a TGR teacher, print its feature shapes.")
    parser.add_argument("source", help="checkpoint path or torchvision:vit_b_16")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 10, 12])
    parser.add_argument("--img-size", type=int, default=224, help="the student's image size")
    parser.add_argument("--patch-size", type=int, default=16, help="the student's patch size")
    parser.add_argument("--teacher-dtype", "--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--teacher-random", action="store_true", help="random torchvision ok")
    parser.add_argument("--teacher-resample", action="store_true", help="resample grid/images")
    run_cli(show_teacher, parser.parse_args(argv))


if __name__ == "__main__":
    main()
