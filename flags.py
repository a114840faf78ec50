"""The command line: every flag in DeiT's spelling, the defaults that depend on the method.

The idea
--------
A reader who knows DeiT's `main.py` should be able to type our flags from memory: the same
names (`--batch-size`, `--lr`, `--warmup-epochs`, `--mixup`, `--data-path`, ...), the same
meanings (`--batch-size` is per process; lr scales by batch · world / 512), and DeiT's underscore
spellings (`--output_dir`) as aliases (`add_flag`). What is new lives in its own groups: the
MoE layer, the routing method, the teacher, M²oT's teachers.

Some defaults depend on other flags, and are written into `args` (and so saved) once, by
`resolve_defaults`, before `check_args` turns every impossible setting into one line:

    --experts / --topk          16 / 1 (V-MoE); 8 / 2 with --teachers (M²oT sec. 5)
    --student-balance-coef      0.005 (V-MoE); 0 for tgr (TGR-MoE sec. 3: no balance loss)
                                and lossfree (its selection bias balances instead)
    --eval-capacity-factor      4.0 for top-K (V-MoE's eval config); else the training cf
    --compile, --aa-on-device   on for CUDA (compile: where Triton is installed); off on a CPU

Every user mistake, here or in any module, ends as one `error: ...` line and exit status 2
(`run_cli`, SPEC sec. 10): a `UsageError` (ValueError) or an OSError, never a traceback.

Decisions where the papers are silent
-------------------------------------
* One `UsageError` for every user mistake the command lines raise; the lower modules (router,
  moe, data) raise plain ValueError / FileNotFoundError, which `run_cli` prints the same way.
* `--help` shows every default; the usage line stays short (the groups list the flags).
* `model_args_from_flags` / `teacher_args_from_flags` turn saved flags into `build_model` /
  `load_teacher` arguments; checkpoints store the results, and these read older checkpoints.
"""

import argparse
import importlib.util
import sys

import torch

from augment import parse_aa
from data import DATASETS
from moe import METHODS, MODELS
from router import check_routing

TRITON = importlib.util.find_spec("triton") is not None  # installed? (no import, no CUDA init)
VMOE_EVAL_CF = 4.0  # V-MoE's evaluation capacity factor for top-K routers (see resolve_defaults)


class UsageError(ValueError):
    """A user mistake: `run_cli` prints its one line (`error: ...`), exit status 2."""


class HelpFormatter(argparse.HelpFormatter):
    """`--help` with each flag's default (none shown for flags whose default is unset)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or action.default in (None, False, "", [], argparse.SUPPRESS):
            return help
        return help + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: ... (see --help)`, exit 2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main, args):
    """main(args) for train.py, eval.py and teacher.py: a user mistake is one line, exit 2.

    User mistakes arrive as ValueError (UsageError, bad settings, files that do not fit) or
    OSError (missing files and folders): SPEC sec. 10, never a traceback from deep inside torch.
    """
    try:
        return main(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def add_flag(group, *names, **kw):
    """add_argument, with DeiT's underscore spelling of every dashed name as an alias."""
    alias = ["--" + n[2:].replace("-", "_") for n in names if "-" in n[2:]]
    return group.add_argument(*names, *alias, **kw)


def as_dict(flags):
    """Saved flags as a dict: a checkpoint's `args` (dict) or a parsed Namespace."""
    return flags if isinstance(flags, dict) else vars(flags)


# ----------------------------------------------------------------------------- flag types
def distill_until(text, flag="--distill-until", adaptive=True):
    """--distill-until, parsed once: a fraction F in [0, 1] of the epochs, or "adaptive"."""
    if text == "adaptive" and adaptive:
        return text
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 <= fraction <= 1:
        why = "give a fraction" + " or adaptive" * adaptive
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: {why}")
    return fraction


def teacher_layer(text):
    """--teacher-layers: a 1-indexed teacher block, or "final" (after the final norm)."""
    if text == "final" or text.isdigit():
        return text if text == "final" else int(text)
    raise argparse.ArgumentTypeError(f"--teacher-layers {text!r}: a block number or final")


def stable_stage1(text):
    """--stable-stage1: the fraction of the epochs in which StableMoE's router still learns."""
    return distill_until(text, "--stable-stage1", adaptive=False)


# ----------------------------------------------------------------------------- train.py
def _model_flags(parser):
    g = parser.add_argument_group("model")
    add_flag(g, "--model", default="tiny", choices=list(MODELS), help="micro | tiny | small | base")
    add_flag(g, "--method", default="vmoe", choices=list(METHODS), help="routing method")
    add_flag(g, "--experts", type=int, help="E, experts per MoE layer (16; m2ot 8)")
    add_flag(g, "--topk", type=int, help="K, experts per token (1; m2ot 2)")
    add_flag(g, "--moe-layers", type=int, nargs="+", help="1-indexed MoE blocks (m2ot: even)")
    add_flag(g, "--expert-hidden", type=int, help="each expert's hidden width (H; m2ot H/K)")
    add_flag(g, "--capacity-factor", type=float, default=1.05, help="train capacity factor")
    add_flag(
        g, "--eval-capacity-factor", type=float, help=f"eval cf ({VMOE_EVAL_CF} top-K, else train)"
    )
    add_flag(g, "--noise-std", type=float, default=1.0, help="router noise σ (added as σ/E)")
    add_flag(g, "--moe-group-size", type=int, default=8, help="images per routing group")
    add_flag(g, "--batch-priority", action="store_true", help="batch-priority routing (BPR)")
    add_flag(g, "--img-size", "--input-size", type=int, default=224, help="image side in pixels")
    add_flag(g, "--patch-size", type=int, default=16, help="patch side in pixels")
    add_flag(g, "--drop-path", type=float, default=0.1, help="stochastic depth rate")
    add_flag(g, "--finetune", default="", help="pre-trained checkpoint to fine-tune (new head)")
    add_flag(g, "--upcycle", default="", help="dense checkpoint whose MLPs start the experts")


def _method_flags(parser):
    g = parser.add_argument_group("method: losses and the distillation schedule")
    add_flag(g, "--student-balance-coef", type=float, help="importance+load (0.005; tgr 0)")
    add_flag(g, "--zloss-coef", type=float, default=1e-3, help="z-loss weight (--method zloss)")
    add_flag(
        g,
        "--student-entropy-coef",
        type=float,
        default=0.0,
        help="weight of an entropy loss on the student router's p (confidence without a teacher)",
    )
    add_flag(
        g,
        "--bias-update-rate",
        type=float,
        default=1e-3,
        help="lossfree: step u of each expert's selection bias per batch (DeepSeek-V3's 0.001)",
    )
    add_flag(g, "--distill-coef", type=float, default=5.0, help="λ_distill")
    add_flag(g, "--teacher-load-coef", type=float, default=0.005, help="λ_load (teacher router)")
    add_flag(g, "--teacher-ent-coef", type=float, default=0.005, help="λ_ent (teacher router)")
    add_flag(
        g,
        "--teacher-balance",
        default="batch",
        choices=["batch", "group"],
        help="teacher router's L_imp over the whole batch, or per routing group as the student's",
    )
    add_flag(
        g,
        "--distill-until",
        type=distill_until,
        default=0.5,
        help="fraction F of the epochs to distil, or adaptive",
    )
    add_flag(
        g,
        "--stable-stage1",
        type=stable_stage1,
        default=0.5,
        help="stablemoe: fraction of the epochs the router learns",
    )
    add_flag(g, "--switch-consistency", type=float, default=0.8, help="adaptive: threshold")
    add_flag(g, "--switch-patience", type=int, default=2, help="adaptive: epochs above it")
    add_flag(g, "--router-grad", default="task", choices=["task", "distill-only"], help="tgr")
    add_flag(
        g, "--distill-tokens", default="all", choices=["all", "cls"], help="tgr: tokens in the KL"
    )

    g = parser.add_argument_group("teacher")
    add_flag(g, "--teacher", default="", help="dense checkpoint (.pth/.pt) or torchvision:NAME")
    add_flag(
        g, "--teacher-layers", type=teacher_layer, nargs="+", help="block per MoE layer, or final"
    )
    add_flag(g, "--teacher-dtype", default="bf16", choices=["bf16", "fp32"], help="autocast")
    add_flag(g, "--teacher-random", action="store_true", help="allow random torchvision weights")
    add_flag(g, "--teacher-resample", action="store_true", help="resample another token grid")
    add_flag(
        g,
        "--teacher-reinit",
        type=int,
        metavar="SEED",
        help="replace the teacher's weights by a random initialisation from SEED (a control: "
        "the same architecture without its knowledge)",
    )
    add_flag(g, "--fresh-teacher-router", action="store_true", help="tgr --finetune: new R_t")


def _m2ot_flags(parser):
    g = parser.add_argument_group("M²oT: several teachers guide the experts (no labels)")
    add_flag(
        g,
        "--teachers",
        nargs="+",
        default=[],
        help="final-feature teachers, SRC[@SIZE] (docs/m2ot.md)",
    )
    add_flag(g, "--tas-coef", type=float, default=0.5, help="λ_1, TAS (0: the Sparse MoE row)")
    add_flag(
        g,
        "--tas-form",
        default="mixture",
        choices=["mixture", "map"],
        help="TAS loss: Eq. 8 (π inside the norm) or the MAP form (Eq. 6-7)",
    )
    add_flag(
        g, "--dist-reduce", default="mean", choices=["mean", "sum"], help="L_dist: mean | Eq. 2 sum"
    )
    add_flag(g, "--switch-coef", type=float, default=0.01, help="λ_2, Switch load loss")
    add_flag(g, "--knn-every", type=int, default=1, help="k-NN validation every N epochs (0: last)")


def _recipe_flags(parser):
    on_off = argparse.BooleanOptionalAction
    g = parser.add_argument_group("optimisation and augmentation (DeiT recipe)")
    add_flag(g, "--batch-size", type=int, default=64, help="images per process per batch")
    add_flag(g, "--accum-iter", type=int, default=1, help="batches per optimizer step")
    add_flag(g, "--epochs", type=int, default=300, help="epochs")
    add_flag(g, "--lr", type=float, default=5e-4, help="LR at a global batch of 512")
    add_flag(g, "--min-lr", type=float, default=1e-5, help="cosine schedule's final LR")
    add_flag(g, "--warmup-lr", type=float, default=1e-6, help="LR at step 0")
    add_flag(g, "--warmup-epochs", type=float, default=5, help="linear warm-up epochs")
    add_flag(g, "--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    add_flag(g, "--opt-eps", type=float, default=1e-8, help="AdamW ε")
    add_flag(g, "--opt-betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW β")
    add_flag(g, "--clip-grad", type=float, help="max gradient norm (off)")
    add_flag(g, "--smoothing", type=float, default=0.1, help="label smoothing")
    add_flag(g, "--mixup", type=float, default=0.8, help="MixUp α (0 = off)")
    add_flag(g, "--cutmix", type=float, default=1.0, help="CutMix α (0 = off)")
    add_flag(g, "--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment (timm's), or none")
    add_flag(g, "--aa-on-device", action=on_off, help="RandAugment the device batch (CUDA: on)")
    add_flag(g, "--reprob", type=float, default=0.25, help="random erasing probability")
    add_flag(g, "--remode", default="pixel", choices=["pixel", "const"], help="erasing fill")
    add_flag(g, "--recount", type=int, default=1, help="random erasing: up to N rectangles")
    add_flag(g, "--repeated-aug", action=on_off, default=True, help="repeated augmentation ×3")
    add_flag(g, "--crop-flip", action=on_off, default=True, help="random crop and flip")
    add_flag(g, "--eval-crop-ratio", type=float, default=0.875, help="eval: resize S/ratio, crop S")
    add_flag(g, "--compile", action=on_off, help="torch.compile the step, teacher too (CUDA: on)")
    add_flag(g, "--model-ema", action=on_off, help="EMA of the weights (DeiT; off w/ --teachers)")
    add_flag(g, "--model-ema-decay", type=float, default=0.99996, help="EMA decay per step")


def _run_flags(parser):
    g = parser.add_argument_group("data")
    add_flag(g, "--data", "--data-set", default="synthetic", choices=DATASETS, help="data set")
    add_flag(g, "--data-path", default="data", help="data root (ImageFolder: train/ and val/)")
    add_flag(g, "--nb-classes", type=int, help="classes of the synthetic set (10)")
    add_flag(g, "--synthetic-train-size", type=int, default=10000, help="generated train images")
    add_flag(g, "--synthetic-val-size", type=int, default=1000, help="generated val images")
    add_flag(g, "--synthetic-seed", type=int, default=0, help="seed of the generated data")
    add_flag(g, "--num-workers", type=int, help="loader workers (CUDA: the CPUs, <= 10; CPU: 0)")
    add_flag(g, "--pin-mem", action=argparse.BooleanOptionalAction, default=True, help="pin")

    g = parser.add_argument_group("run")
    add_flag(g, "--output-dir", help="run folder (runs/MODEL-METHOD)")
    add_flag(g, "--resume", default="", help="RUN/checkpoint.pt, or auto (the output dir's)")
    add_flag(g, "--seed", type=int, default=0, help="seed of the run")
    add_flag(g, "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    add_flag(g, "--print-freq", type=int, default=50, help="a progress line every N steps")
    add_flag(g, "--probe-size", type=int, default=256, help="validation images of the probe set")
    add_flag(
        g,
        "--probe-every",
        type=int,
        default=0,
        help="also route the probe set every N optimizer steps into probe_steps.pt (0: off)",
    )


def get_args_parser(add_help=True):
    """train.py's parser (DeiT's `get_args_parser`): flags in groups, DeiT's names."""
    parser = ArgumentParser(
        "train.py",
        description="tgr-moe training: DeiT's recipe, sparse MoE routers, teacher guidance",
        usage="%(prog)s [--model M] [--method M] [--teacher SRC] ... (DeiT's flags, below)",
        add_help=add_help,
    )
    for flags in (_model_flags, _method_flags, _m2ot_flags, _recipe_flags, _run_flags):
        flags(parser)
    return parser


def resolve_defaults(args):
    """The defaults that depend on --method, --teachers or --device, written into args."""
    distil = bool(args.teachers)  # M²oT's family: students of several teachers, no labels
    if args.experts is None:  # M²oT: E = 8, K = 2 (its sec. 5); else V-MoE's 16, top-1
        args.experts = 8 if distil else 16
    if args.topk is None:
        args.topk = 2 if distil else 1
    if distil and args.moe_layers is None:  # M²oT: every second block (1-indexed 2, 4, ...)
        args.moe_layers = list(range(2, MODELS[args.model]["depth"] + 1, 2))
    if distil and args.expert_hidden is None and args.method != "dense":
        # H/K: K active experts hold the dense MLP's weights (M²oT Table 4)
        args.expert_hidden = int(MODELS[args.model]["embed_dim"] * 4) // args.topk
    if args.model_ema is None:  # DeiT keeps an EMA; a feature student has no top-1 to show it
        args.model_ema = not distil
    if args.eval_capacity_factor is None:
        # V-MoE's ImageNet-1k config (google-research/vmoe, vmoe_paper/vmoe_s32_last2_ilsvrc2012_
        # randaug_light1.py, "Use higher capacity for evaluation") evaluates top-K at cf 4.0;
        # expert choice keeps its cf: there it is how many tokens an expert takes
        top_k = METHODS[args.method] == "top-k"
        args.eval_capacity_factor = VMOE_EVAL_CF if top_k else args.capacity_factor
    if args.aa_on_device is None:  # on a GPU the workers are the bottleneck (docs/benchmarks.md)
        args.aa_on_device = args.device.startswith("cuda")
    if args.compile is None:  # GPU: 1.23-1.51x the eager step's images/s (docs/training.md)
        args.compile = args.device.startswith("cuda") and TRITON  # inductor's GPU kernels
    if args.student_balance_coef is None:  # TGR (sec. 3): the student has no balance loss;
        # lossfree balances with its selection bias instead of a loss
        args.student_balance_coef = 0.0 if args.method in ("tgr", "lossfree") else 0.005


def check_args(args):
    """Turn impossible settings into one readable line each (SPEC sec. 10)."""
    if METHODS[args.method] in ("top-k", "expert-choice"):  # router.py owns these rules
        check_routing(args.experts, args.topk, args.capacity_factor, args.eval_capacity_factor)
    if args.method in ("tgr", "teacher-route") and not args.teacher:
        demo = "runs/demo/dense/checkpoint.pt, which make demo writes"
        raise UsageError(f"--method {args.method} needs --teacher (a dense run, e.g. {demo})")
    if args.method == "m2ot" and not args.teachers:
        raise UsageError("--method m2ot needs --teachers SRC [SRC ...] (dense checkpoints, ...)")
    if args.teachers and args.method not in ("m2ot", "dense", "softmoe"):
        raise UsageError(f"--teachers: the students are m2ot, dense and softmoe, not {args.method}")
    if min(args.student_entropy_coef, args.bias_update_rate, args.probe_every) < 0:
        raise UsageError(
            "--student-entropy-coef, --bias-update-rate and --probe-every must be >= 0"
        )
    if min(args.tas_coef, args.switch_coef) < 0 or args.knn_every < 0:
        raise UsageError("--tas-coef, --switch-coef and --knn-every must be >= 0")
    if args.upcycle and args.finetune:
        raise UsageError("--upcycle and --finetune both start the weights: give one")
    for name in ("batch_size", "epochs", "experts", "print_freq", "probe_size", "accum_iter"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    parse_aa(args.aa)  # one line for a policy augment.py cannot build
    if not 0 <= args.reprob <= 1 or args.recount < 1:
        raise UsageError(f"--reprob {args.reprob} / --recount {args.recount}: need [0, 1] / >= 1")
    if not 0 < args.eval_crop_ratio <= 1:
        raise UsageError(f"--eval-crop-ratio {args.eval_crop_ratio}: give a ratio in (0, 1]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda but no GPU is visible; use --device cpu")


def describe_recipe(args):
    """The effective recipe, printed once at start: what the run trains with, flags resolved."""
    batch = f"{args.batch_size}·world" + (f"·{args.accum_iter}" if args.accum_iter > 1 else "")
    ema = args.model_ema_decay if args.model_ema else "off"
    optimiser = [
        f"recipe: AdamW lr {args.base_lr:.2e} (= {args.lr} × {batch}/512)",
        f"wd {args.weight_decay}",
        f"warm-up {args.warmup_epochs} epochs, cosine to {args.min_lr}",
    ]
    parts = [f"aa {args.aa}", f"reprob {args.reprob}", f"repeated-aug {args.repeated_aug}"]
    if not args.teachers:  # no labels: MixUp/CutMix and smoothing have nothing to act on
        parts += [f"mixup {args.mixup}", f"cutmix {args.cutmix}", f"smoothing {args.smoothing}"]
    parts += [f"drop-path {args.drop_path}", f"ema {ema}", f"eval crop {args.eval_crop_ratio}"]
    if METHODS[args.method] in ("top-k", "expert-choice"):
        cf = f"capacity factor {args.capacity_factor} train / {args.eval_capacity_factor} eval"
        parts.append(cf)
    if args.compile:  # the first steps (and the TGR/StableMoE switch) wait for the compiler
        parts.append("compiled (--no-compile: eager)")
    text = ", ".join(optimiser) + "; " + ", ".join(parts)
    if args.teachers:
        text += f"; {len(args.teachers)} teachers, no labels, λ_1 (tas) {args.tas_coef}, "
        text += f"λ_2 (switch) {args.switch_coef}"
    return text


# ----------------------------------------------------------------------------- saved flags
def model_args_from_flags(flags, num_classes):
    """`build_model` keyword arguments from train.py's flags (a dict or Namespace).

    Every method with a router (top-K and expert choice) gets the capacity and group options;
    Soft MoE and dense have none. Runs from before --expert-hidden have no such flag: None.
    """
    f = as_dict(flags)
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


def teacher_args_from_flags(flags, moe_layers):
    """`teacher.load_teacher` keyword arguments from train.py's flags (a dict or Namespace).

    moe_layers: the student's MoE blocks; the teacher uses the same blocks unless
    --teacher-layers names others (one per MoE layer). train.py saves the result in its
    checkpoints as `teacher_args`; eval.py reads it back.
    """
    f = as_dict(flags)
    layers = list(f["teacher_layers"] or moe_layers)
    if len(layers) != len(moe_layers):
        raise UsageError(f"--teacher-layers: {len(layers)} blocks for {len(moe_layers)} MoE layers")
    return dict(
        source=f["teacher"],
        layers=layers,
        dtype=f.get("teacher_dtype") or "bf16",
        random_ok=f["teacher_random"],
        resample=f["teacher_resample"],
        student_grid=f["img_size"] // f["patch_size"],
        reinit=f.get("teacher_reinit"),
    )
