"""Our checkpoints: a run that survives being killed and is readable without the trainer.

The idea
--------
A run must survive being killed and must be readable without the code that wrote it. So a
checkpoint is written atomically (`save_checkpoint`: a temporary file, then a rename), holds
everything an exact resume needs (`training_state`, read back by `restore`) in DeiT's layout
`{model, optimizer, lr_scheduler, epoch, scaler, args}` plus ours, and carries `model_args`
(the `build_model` keyword arguments), so that `load_run` rebuilds the model without the
trainer. A run starts from --resume, --finetune or --upcycle weights (`read_starts`,
`load_pretrained`, `continued_router`), all read before anything else runs, and writes
into its folder only once they are (`start_run_folder`).

Files are opened by pretrained.py's `read_checkpoint`, the project's one reader, which also
reads other projects' ViTs.

Decisions where the papers are silent
-------------------------------------
* Checkpoints hold unwrapped, uncompiled weights (no `module.` / `_orig_mod.` prefixes).
  Sampler and worker seeds follow (seed, epoch, rank), so the RNG states, the step and
  log.jsonl cut back to the epoch make a resume exact.
* The watch set (train.py's fixed validation images whose routing is followed) keeps its first
  name on disk, "probe": the checkpoint keys `probe_prev` / `probe_prev_routing`, the files
  probe_routing.pt / probe_steps.pt and the log's `probe_token_entropy` / `probe_gap_median`,
  so every run written before resumes and reads the same.
* A student of several teachers (`--method m2ot`) is a top-K MoE ViT: saved, and rebuilt,
  as moe.py's `vmoe` (`m2ot_flags.built_as`, which also reads the checkpoints that named it
  by its own method).
"""

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from errors import UsageError
from m2ot_flags import built_as
from moe import METHODS, build_model, upcycle
from pretrained import read_checkpoint


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


@dataclass
class Progress:
    """Where a run stands when it starts (`restore`): a fresh run's is the default."""

    epoch: int = 0  # the first epoch to train
    step: int = 0  # optimizer steps already taken
    watch_prev: list | None = None  # the watch set's top-1 experts at the last epoch's end
    watch_history: dict = field(default_factory=dict)  # epoch -> that routing (probe_routing.pt)


def restore(ckpt, resume, optimizer, out, rank, world):
    """--resume: optimizer and RNG states, and the run's `Progress`; a fresh run (`ckpt`
    None) starts at epoch 0. It reads the run folder and writes nothing there
    (`start_run_folder` does, once every input has been checked)."""
    if ckpt is None:
        return Progress()
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as err:  # another --method (e.g. one with teacher routers)
        raise UsageError(f"--resume {resume}: optimizer state does not fit ({err})") from None
    set_rng_state(ckpt["rng"][rank] if len(ckpt["rng"]) == world else ckpt["rng"][0])

    # every earlier epoch's watch-set routing, for consistency_final.json
    start = ckpt["epoch"] + 1
    watch_history = {}
    if (out / "probe_routing.pt").is_file():
        history = torch.load(out / "probe_routing.pt", weights_only=True)
        watch_history = {e: a for e, a in history.items() if e < start}
    return Progress(start, ckpt["step"], ckpt["probe_prev"], watch_history)


def model_args_from_flags(flags, num_classes):
    """`build_model` keyword arguments from train.py's flags (a dict or Namespace).

    Every method with a router (top-K and expert choice) gets the capacity and group options;
    Soft MoE and dense have none. Runs from before --expert-hidden have no such flag: None.
    """
    f = flags if isinstance(flags, dict) else vars(flags)  # a checkpoint's dict, or a Namespace
    method = built_as(f["method"])  # --method m2ot: built as vmoe
    margs = dict(
        name=f["model"],
        method=method,
        num_classes=num_classes,
        img_size=f["img_size"],
        patch_size=f["patch_size"],
        num_experts=f["experts"],
        k=f["topk"],
        moe_layers=f["moe_layers"],
        drop_path_rate=f["drop_path"],
        expert_hidden=f.get("expert_hidden"),
    )
    if METHODS[method] in ("top-k", "expert-choice"):
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


def training_state(model, optimizer, args, epoch, step, *, switch, model_ema, m2ot=None, **ours):
    """The checkpoint of an epoch's end: DeiT's layout {model, optimizer, lr_scheduler, epoch,
    scaler, args}, then ours: everything `restore` needs for an exact resume (the step, every
    rank's RNG `rng`, the `schedule.Switch`, the watch set's last routing `probe_prev` and its
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
    # saved under M²oT's method name (older runs): built as vmoe
    model_args = {**model_args, "method": built_as(model_args["method"])}
    if eval_capacity_factor is not None and "eval_capacity_factor" in model_args:
        model_args = {**model_args, "eval_capacity_factor": eval_capacity_factor}

    # the model, rebuilt without the trainer, holding the checkpoint's weights
    model = build_model(**model_args)
    load_weights(model, ckpt["model"], f"{what} {path}")
    return model.to(device).eval(), args, ckpt
