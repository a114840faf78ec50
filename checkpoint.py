"""Weights on disk, both ways: our checkpoints, and other projects' ViTs read into ours.

The idea
--------
A run must survive being killed and must be readable without the code that wrote it. So a
checkpoint is written atomically (`save_checkpoint`: a temporary file, then a rename), holds
everything an exact resume needs (`training_state`, read back by `restore`) in DeiT's layout
`{model, optimizer, lr_scheduler, epoch, scaler, args}` plus ours, and carries `model_args`
(the `build_model` keyword arguments), so that `load_run` rebuilds the model without the
trainer. A run starts from --resume, --finetune or --upcycle weights (`read_starts`,
`load_pretrained`, `continued_router`), all read before anything else runs.

Teachers come from other projects: an official DeiT-III file, timm's or torchvision's ViTs,
DINOv2 with or without registers, or a dense run of ours. Each is told apart by the file's
*contents*, never its name (`vit_weights`), renamed to timm's keys (`to_timm`), its
architecture read from the tensors (`vit_config`), and loaded, shape-checked key by key
(`check_keys`), into `vit.VisionTransformer` (`build_vit`).

Letters: D_t a teacher's width, G its grid side, R registers.

Decisions where the papers are silent
-------------------------------------
* `read_checkpoint` is the one reader: `weights_only=True`, which every file train.py writes
  and the DeiT-III / timm / torchvision files allow; only a torch.save zip holding other
  Python objects (an argparse Namespace, numpy RNG states: older DeiT-style checkpoints) is
  read in full, since the user named the file. Every failure is one `UsageError` line.
* Heads are not stored anywhere: a project checkpoint gives its model name (`moe.MODELS`);
  otherwise `HEADS_BY_WIDTH` (DeiT/timm/torchvision's 64-dim heads, ViT-H's 16). The rest
  of the architecture is read from the tensors' shapes.
* The ViT is built on the "meta" device and the checkpoint's tensors are assigned to it: no
  random initialisation that the weights would overwrite, and loading a teacher draws nothing
  from torch's random stream (the student's initialisation does not depend on the teacher).
* `torchvision:NAME` uses torchvision's default weights from its cache, else downloads them;
  with `random_ok` (`--teacher-random`) a missing cache gives torchvision's random init.
* Registers (DINOv2-reg) follow CLS as in timm; the official layout's CLS position slot folds
  into `cls_token` (timm's conversion, exact). Another grid resamples the positions
  bicubically (`resample_pos_embed`), prefix slots kept.
* Checkpoints hold unwrapped, uncompiled weights (no `module.` / `_orig_mod.` prefixes; other
  projects' are stripped on reading). Sampler and worker seeds follow (seed, epoch, rank), so
  the RNG states, the step and log.jsonl cut back to the epoch make a resume exact.
"""

import argparse
import json
import math
import os
import random
import re
import warnings
import zipfile
from dataclasses import asdict
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from errors import UsageError
from moe import METHODS, MODELS, build_model, upcycle
from vit import VisionTransformer

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


# ----------------------------------------------------------------------------- any checkpoint
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


# ----------------------------------------------------------------------------- our checkpoints
def save_checkpoint(path, state):
    """torch.save to PATH.tmp, then rename: a kill mid-save leaves the last good file intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)


def rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def rng_states(world):
    """Every rank's `rng_state`, gathered (the same list on every rank)."""
    states = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def load_weights(model, state_dict, what):
    """load_state_dict, strict, with the last line of torch's message as the one error line."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        msg = str(err).splitlines()[-1].strip()
        raise UsageError(f"{what} does not fit this model: {msg}") from None


def restore(ckpt, resume, optimizer, out, rank, world):
    """--resume: optimizer and RNG states. Returns (start epoch, step, the probe's last
    routing, every earlier epoch's probe routing); a fresh run (`ckpt` None) starts at epoch 0.
    It reads the run folder and writes nothing there (`start_run_folder` does, once every
    input has been checked)."""
    if ckpt is None:
        return 0, 0, None, {}
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as err:  # another --method (e.g. one with teacher routers)
        raise UsageError(f"--resume {resume}: optimizer state does not fit ({err})") from None
    set_rng_state(ckpt["rng"][rank] if len(ckpt["rng"]) == world else ckpt["rng"][0])
    start = ckpt["epoch"] + 1
    probe_history = {}  # every epoch's probe routing, for consistency_final.json
    if (out / "probe_routing.pt").is_file():
        history = torch.load(out / "probe_routing.pt", weights_only=True)
        probe_history = {e: a for e, a in history.items() if e < start}
    return start, ckpt["step"], ckpt["probe_prev"], probe_history


def model_args_from_flags(flags, num_classes):
    """`build_model` keyword arguments from train.py's flags (a dict or Namespace).

    Every method with a router (top-K and expert choice) gets the capacity and group options;
    Soft MoE and dense have none. Runs from before --expert-hidden have no such flag: None.
    """
    f = flags if isinstance(flags, dict) else vars(flags)  # a checkpoint's dict, or a Namespace
    margs = dict(
        name=f["model"],
        method=f["method"],
        num_classes=num_classes,
        img_size=f["img_size"],
        patch_size=f["patch_size"],
        num_experts=f["experts"],
        k=f["topk"],
        moe_layers=f["moe_layers"],
        drop_path_rate=f["drop_path"],
        expert_hidden=f.get("expert_hidden"),
    )
    if METHODS[f["method"]] in ("top-k", "expert-choice"):
        margs.update(
            capacity_factor=f["capacity_factor"],
            noise_std=f["noise_std"],
            group_size=f["moe_group_size"],
            batch_priority=f["batch_priority"],
            eval_capacity_factor=f["eval_capacity_factor"],
        )
    if f["method"] == "lossfree":  # the selection bias's step (older runs have no such method)
        margs["bias_update_rate"] = f["bias_update_rate"]
    return margs


def start_run_folder(out, args, start_epoch):
    """Rank 0, once every input has been read and checked: the run's arguments (args.json) and
    its log, cut back to the epochs before `start_epoch` (a resumed run's checkpoint lacks the
    later ones; a fresh run, start_epoch 0, starts a new log). Nothing is written into the run
    folder before this, so a run that stops on a bad input leaves an earlier run's files as
    they were."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    log = out / "log.jsonl"
    if log.is_file():
        lines = log.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if json.loads(ln)["epoch"] < start_epoch]
        log.write_text("".join(kept))


def read_starts(args, out):
    """The weights a run starts from, read before anything else runs: (--resume path, its
    checkpoint, the --finetune or --upcycle checkpoint), None where not asked for. `--resume
    auto` is OUT/checkpoint.pt if there is one; a new run in a folder that holds one needs
    --overwrite. --upcycle takes a dense train.py run only; a
    tgr --finetune continues the pre-trained run's teacher router (`continued_router`), so
    it must have one, unless --fresh-teacher-router."""
    resume = args.resume
    if resume == "auto":
        resume = str(out / "checkpoint.pt") if (out / "checkpoint.pt").is_file() else ""

    # a folder that holds a run is continued or, said explicitly, started over: never mixed
    if not resume and not args.overwrite and (out / "checkpoint.pt").is_file():
        raise UsageError(
            f"{out} holds a run (checkpoint.pt): continue it with --resume auto, choose another "
            "--output-dir, or pass --overwrite to start a new run there"
        )
    ckpt = read_checkpoint(resume, "--resume") if resume else None
    pre = read_checkpoint(args.finetune, "--finetune") if args.finetune else None
    if args.upcycle:  # sparse upcycling: only a dense checkpoint's MLPs can start experts
        pre = read_checkpoint(args.upcycle, "--upcycle")
        if not isinstance(pre, dict) or (pre.get("args") or {}).get("method") != "dense":
            raise UsageError(f"--upcycle {args.upcycle}: not a train.py --method dense checkpoint")
    if pre is not None and args.method == "tgr" and not args.fresh_teacher_router:
        if not (isinstance(pre, dict) and pre.get("teacher_router")):
            why = "has no teacher router to continue TGR with (tgr runs save one)"
            raise UsageError(f"--finetune {args.finetune} {why}; or --fresh-teacher-router")
    return resume, ckpt, pre


def continued_router(args, ckpt, pretrained):
    """The teacher routers' starting state: the checkpoint's on --resume; on a tgr --finetune
    the pre-trained run's (TGR-MoE continues TGR while fine-tuning: the teacher router was
    trained together with the student's experts, so its expert numbering is theirs; a fresh
    one would pull the student toward a random permutation of its experts); else None."""
    if ckpt is not None:
        return ckpt["teacher_router"]
    if pretrained is not None and args.method == "tgr" and not args.fresh_teacher_router:
        return pretrained["teacher_router"]
    return None


def load_pretrained(model, sd, path):
    """--finetune / --upcycle: a pre-trained run's weights into `model`, its head dropped if
    the classes differ; a dense run into a MoE model is upcycled (`moe.upcycle`: every expert
    starts as the dense MLP). Returns True if the weights were loaded as they are (so the
    pre-trained routing can be compared with the new one), False if upcycled."""
    pre_args = sd.get("args") or {}  # the pre-trained run's flags
    sd = sd.get("model", sd)
    own = model.state_dict()
    other_head = lambda k, v: k.startswith("head.") and (k not in own or v.shape != own[k].shape)
    sd = {k: v for k, v in sd.items() if not other_head(k, v)}  # a new head, or none

    # a dense run into a MoE model: every expert starts as the dense MLP
    if pre_args.get("method") == "dense" and model.moe_layers:
        upcycle(model, sd)
        return False

    # the same architecture: every weight must fit as it is
    for key, value in sd.items():
        if key not in own or own[key].shape != value.shape:
            shape = tuple(own[key].shape) if key in own else "absent"
            raise UsageError(f"--finetune {path}: {key} is {tuple(value.shape)}, here {shape}")
    model.load_state_dict(sd, strict=False)
    return True


def training_state(model, optimizer, args, epoch, step, *, switch, model_ema, m2ot, **ours):
    """The checkpoint of an epoch's end: DeiT's layout {model, optimizer, lr_scheduler, epoch,
    scaler, args}, then ours: everything `restore` needs for an exact resume (the step, every
    rank's RNG `rng`, the `schedule.Switch`, the probe's last routing `probe_prev` and its
    distributions `probe_prev_routing`, the pre-trained one `ref_assign`), the teacher router
    (eval.py --route teacher), the EMA, M²oT's heads and π, and the arguments that rebuild
    model and teacher without the trainer (`model_args`, `teacher_args`). Modules are stored
    as their state dicts."""
    state = {
        # DeiT's layout
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": {"step": step, "base_lr": args.base_lr},
        "epoch": epoch,
        "scaler": None,
        "args": vars(args),
        # ours
        "step": step,
        "switch": asdict(switch),
        "model_args": model.model_args,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "m2ot": m2ot.state_dict() if m2ot is not None else None,
    }
    return {**state, **ours}  # rng, probe_prev(_routing), ref_assign, teacher_router, teacher_args


def load_run(path, device, what="--checkpoint", eval_capacity_factor=None):
    """A train.py checkpoint -> (model in eval mode, the run's flags as a Namespace, checkpoint).

    The model is rebuilt from the checkpoint's `model_args` (the `build_model` keyword
    arguments), or, in a checkpoint written before they were saved, from its flags.
    """
    ckpt = read_checkpoint(path, what)
    if not isinstance(ckpt, dict) or "model" not in ckpt or not ckpt.get("args"):
        raise UsageError(f"{what} {path}: not a train.py checkpoint (it has no 'model' and 'args')")
    args = argparse.Namespace(**ckpt["args"])

    # the build_model keyword arguments: saved, or read from the run's flags
    model_args = ckpt.get("model_args")
    if model_args is None:  # older checkpoint: the same arguments, from the run's flags
        try:
            model_args = model_args_from_flags(ckpt["args"], ckpt["model"]["head.weight"].shape[0])
        except KeyError as err:
            raise UsageError(f"{what} {path}: an old checkpoint without flag {err}") from None
    if eval_capacity_factor is not None and "eval_capacity_factor" in model_args:
        model_args = {**model_args, "eval_capacity_factor": eval_capacity_factor}

    # the model, rebuilt without the trainer, holding the checkpoint's weights
    model = build_model(**model_args)
    load_weights(model, ckpt["model"], f"{what} {path}")
    return model.to(device).eval(), args, ckpt


# ----------------------------------------------------------------------------- other projects ViTs
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
    """VisionTransformer kwargs read from the weights (heads: args or HEADS_BY_WIDTH)."""
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

    # the heads are stored nowhere: our model's name, else the usual 64-dim heads
    name = args.get("model")
    if name in MODELS and MODELS[name]["embed_dim"] == dim:
        heads = MODELS[name]["num_heads"]
    elif dim in HEADS_BY_WIDTH or dim % 64 == 0:
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
