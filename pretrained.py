"""Pretrained ViTs from other projects, read into ours and frozen.

The idea
--------
A teacher is somebody else's network: an official DeiT-III file, timm's or torchvision's
ViTs, DINOv2 with or without registers, or a dense run of this project. Each is told apart
by the file's *contents*, never its name (`vit_weights`), renamed to timm's keys
(`to_timm`), its architecture read from the tensors (`vit_config`), and loaded, shape-checked
key by key (`check_keys`), into `vit.VisionTransformer` (`build_vit`). What runs of it, and
what it is asked for, is the teacher's own file: teacher.py (TGR's layer-aligned features)
and m2ot_teachers.py (final features). Both wrap the ViT in `Frozen`.

Every weights file of the project, ours included, is opened by one reader,
`read_checkpoint`; checkpoint.py writes and resumes our runs with it.

Letters: D_t a teacher's width, G its grid side, R registers.

Decisions where the papers are silent
-------------------------------------
* `read_checkpoint` is the one reader: `weights_only=True`, which every file train.py writes
  and the DeiT-III / timm / torchvision files allow; only a torch.save zip holding other
  Python objects (an argparse Namespace, numpy RNG states: older DeiT-style checkpoints) is
  read in full, since the user named the file. Every failure is one `UsageError` line.
* Heads are not stored anywhere: `HEADS_BY_WIDTH` gives DeiT/timm/torchvision's 64-dim
  heads (ViT-H's 16), which every `--model` of moe.py's `MODELS` also has
  (tests/test_teacher.py); another width must be a multiple of 64. The rest of the
  architecture is read from the tensors' shapes.
* The ViT is built on the "meta" device and the checkpoint's tensors are assigned to it: no
  random initialisation that the weights would overwrite, and loading a teacher draws nothing
  from torch's random stream (the student's initialisation does not depend on the teacher).
* `torchvision:NAME` uses torchvision's default weights from its cache, else downloads them;
  with `random_ok` (`--teacher-random`) a missing cache gives torchvision's random init.
* Registers (DINOv2-reg) follow CLS as in timm; the official layout's CLS position slot folds
  into `cls_token` (timm's conversion, exact). Another grid resamples the positions
  bicubically (`resample_pos_embed`), prefix slots kept.
* Other projects' `module.` / `_orig_mod.` prefixes (DDP, torch.compile) are stripped on
  reading.
* The classifier (`head.`, `fc_norm.`) is never loaded: a teacher is asked for features, so
  any class count loads.
"""

import math
import os
import re
import warnings
import zipfile
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from errors import UsageError
from vit import VisionTransformer, autocast

HEADS_BY_WIDTH = {96: 3, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # DeiT, timm, torchvision
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

CLASSIFIER = ("head.", "fc_norm.")  # never run by a teacher: never loaded


# ----------------------------------------------------------------------------- any weights file
def read_checkpoint(path, what="checkpoint", hint=""):
    """The project's one checkpoint reader (teacher weights, --resume, --finetune, eval.py),
    on the CPU, `weights_only` where the file allows it (see the decisions above). Every
    failure is one UsageError line naming `what` (e.g. "--resume") and the path."""
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path}: no such checkpoint{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not zipfile.is_zipfile(path):  # not (or no longer all) a torch.save zip
            why = f"not a PyTorch checkpoint, or truncated ({type(err).__name__})"
            raise UsageError(f"{what} {path}: {why}; use another file") from None
    try:  # a torch.save zip holding Python objects
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UsageError(f"{what} {path}: cannot read it ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------- other projects' ViTs
def torchvision_weights(name, random_ok):
    """(state_dict, pretrained) of torchvision's ViT `name`; downloads only if allowed."""
    import torchvision

    names = [n for n in torchvision.models.list_models() if n.startswith("vit_")]
    if name not in names:
        raise UsageError(f"unknown torchvision ViT {name!r}: choose one of {', '.join(names)}")

    # the default weights: from torch.hub's cache, else downloaded (unless random ones will do)
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if os.path.isfile(cached) or not random_ok:
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False), True
        except Exception as err:  # offline, proxy, truncated file ...
            raise UsageError(
                f"torchvision:{name}: weights are not in {cached} and could not be fetched "
                f"({type(err).__name__}); put the file there, or pass --teacher-random"
            ) from None

    # --teacher-random and nothing cached: torchvision's random initialisation
    warnings.warn(f"torchvision:{name}: weights not cached, using RANDOM weights", stacklevel=3)
    return torchvision.models.get_model(name, weights=None).state_dict(), False


def read_state_dict(path, what, hint=""):
    """(tensors, args) of a checkpoint file: {"model"}, {"state_dict"} or a plain state dict."""
    ckpt = read_checkpoint(str(path), what, hint)
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} holds a {type(ckpt).__name__}, not a state dict")

    # the run's flags, if the file has them (a dict, or older DeiT files' Namespace)
    args = ckpt.get("args") or {}
    args = args if isinstance(args, dict) else getattr(args, "__dict__", {})  # Namespace

    # the tensors, under "model", "state_dict" or at the top level
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)} if isinstance(sd, dict) else {}
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}  # DDP/compile
    if not sd:
        raise UsageError(f"{path} holds no weights (top-level keys: {list(ckpt)[:5]})")
    return sd, args


def to_timm(sd):
    """Rename a DeiT-III, torchvision, DINOv2 or timm ViT state dict to timm keys: (sd, kind)."""
    if "register_tokens" in sd or "mask_token" in sd:  # facebookresearch/dinov2
        sd = {k: v for k, v in sd.items() if k != "mask_token"}  # for masked training only
        if "register_tokens" in sd:  # CLS's position slot folds into CLS; registers have none
            sd["reg_token"] = sd.pop("register_tokens")  # (1, R, D_t)
            sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]  # (1, 1, D_t)
            sd["pos_embed"] = sd["pos_embed"][:, 1:]  # (1, G², D_t)
        return sd, "dinov2"

    # torchvision: every key renamed by TORCHVISION_TO_TIMM's patterns, in order
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


def vit_weights(source, random_ok, what):
    """(timm-keyed state dict, checkpoint args, kind, pretrained) of a ViT teacher source."""
    if isinstance(source, str) and source.startswith("torchvision:"):
        sd, pretrained = torchvision_weights(source.split(":", 1)[1], random_ok)
        args = {}
    else:
        hint = " (give a .pth/.pt file or torchvision:vit_b_16)"
        sd, args = read_state_dict(source, what, hint)
        pretrained = True
    sd, kind = to_timm(sd)
    return sd, args, "project" if args.get("method") is not None else kind, pretrained


def vit_config(sd, args, where):
    """VisionTransformer kwargs read from the weights (heads: HEADS_BY_WIDTH)."""
    # a dense ViT, or one line saying what the file is instead
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.norm2.weight"):
        if key not in sd:
            seen = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(sd.items())[:3])
            raise UsageError(f"{where} is not a ViT checkpoint: no {key!r} (it holds {seen}, …)")
    if any(k.endswith((".mlp.router.weight", ".mlp.w1", ".mlp.phi")) for k in sd):
        why = f"is a sparse MoE checkpoint (method {args.get('method', '?')})"
        raise UsageError(f"{where} {why}; the teacher must be dense: train.py --method dense")

    # the architecture, read from the tensors' shapes
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape  # (D_t, 3, P, P)
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    regs = sd["reg_token"].shape[1] if "reg_token" in sd else 0  # R
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * dim

    # the grid: G² positions (no CLS slot), or G² + 1 + R
    positions = sd["pos_embed"].shape[1]
    grid = math.isqrt(positions)
    no_embed_class = grid * grid == positions  # DeiT-III, DINOv2-reg: no CLS slot
    if not no_embed_class:
        grid = math.isqrt(positions - 1 - regs)
        if grid * grid != positions - 1 - regs:
            why = f"not G² or G² + {1 + regs}"
            raise UsageError(f"{where}: pos_embed has {positions} positions, {why}")

    # the heads are stored nowhere: the usual 64-dim heads (every --model of ours has them)
    if dim in HEADS_BY_WIDTH or dim % 64 == 0:
        heads = HEADS_BY_WIDTH.get(dim, dim // 64)
    else:
        raise UsageError(f"{where}: cannot tell the number of heads of a width-{dim} ViT")

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
        no_embed_class=no_embed_class,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,  # DeiT-III's layer scale
        reg_tokens=regs,
    )


def check_keys(sd, expected, where, model="the ViT its weights describe"):
    """Strict load with a readable message: first missing, mismatching or unexpected key."""
    for key, value in expected.items():
        if key not in sd:
            raise UsageError(f"{where} does not fit {model}: {key} missing")
        if sd[key].shape != value.shape:
            raise UsageError(
                f"{where}: {key} is {tuple(sd[key].shape)} in the checkpoint but "
                f"{tuple(value.shape)} in {model}"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise UsageError(f"{where} has weights {model} lacks: {extra[0]} ({len(extra)} in all)")


def resample_pos_embed(pos, grid, new_grid, num_prefix):
    """Bicubic interpolation of the patch positions to another grid; prefix slots kept."""
    prefix = pos[:, :num_prefix]  # (1, 1 + R or 0, D_t)
    patches = pos[:, num_prefix:]  # (1, G², D_t)
    patches = rearrange(patches, "1 (h w) d -> 1 d h w", h=grid)  # (1, D_t, G, G)
    patches = F.interpolate(
        patches.float(), size=(new_grid, new_grid), mode="bicubic", antialias=True
    )  # (1, D_t, G', G')
    return torch.cat([prefix, rearrange(patches, "1 d h w -> 1 (h w) d")], dim=1)  # (1, N', D_t)


def build_vit(sd, cfg, where, skip, grid=None):
    """`vit.VisionTransformer(**cfg)` holding `sd` but the keys under `skip`, at `grid`
    (positions resampled when it is not the weights' own). Skipped modules stay on "meta"."""
    with torch.device("meta"):  # shapes only: no random init to overwrite, no RNG consumed
        vit = VisionTransformer(**cfg)
    expected = {k: v for k, v in vit.state_dict().items() if not k.startswith(skip)}
    sd = {k: v.float() for k, v in sd.items() if not k.startswith(skip)}
    check_keys(sd, expected, where)

    # another grid: positions resampled, the ViT rebuilt at that size
    if grid is not None and grid != vit.grid:
        prefix = 0 if cfg["no_embed_class"] else vit.num_prefix_tokens
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], vit.grid, grid, prefix)
        with torch.device("meta"):
            vit = VisionTransformer(**{**cfg, "img_size": grid * cfg["patch_size"]})
    vit.load_state_dict(sd, strict=False, assign=True)  # strict by check_keys
    return vit


# ----------------------------------------------------------------------------- frozen
class Frozen(nn.Module):
    """What every teacher shares: no gradients, eval mode for good, optional bf16 autocast."""

    def freeze(self):
        self.requires_grad_(False)  # stop-gradient: the backbone never updates
        self.train(False)

    def train(self, mode=True):
        # frozen for good: an outer model.train() must not switch the teacher to training
        return super().train(False)

    def autocast(self, images):
        """bf16 autocast on the images' device when the teacher runs in bf16, else nothing."""
        return autocast(images.device, torch.bfloat16 if self.dtype == "bf16" else None)
