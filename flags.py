"""The command line: every flag in DeiT's spelling, the defaults that depend on the method.

The idea
--------
A reader who knows DeiT's `main.py` should be able to type our flags from memory: the same
names (`--batch-size`, `--lr`, `--warmup-epochs`, `--mixup`, `--data-path`, ...), the same
meanings (`--batch-size` is per process; lr scales by batch · world / 512), and DeiT's underscore
spellings (`--output_dir`) as aliases (`add_flag`). What is new lives in its own groups: the
MoE layer, the routing method, the teacher; M²oT's group, its defaults and its checks are
m2ot_flags.py's, which this file calls at each step.

Some defaults depend on other flags, and are written into `args` (and so saved) once, by
`resolve_defaults`, before `check_args` turns every impossible setting into one line:

    --experts / --topk          16 / 1 (V-MoE); 8 / 2 with --teachers (M²oT sec. 5)
    --student-balance-coef      0.005 (V-MoE); 0 for tgr (TGR-MoE sec. 3: no balance loss)
                                and lossfree (its selection bias balances instead)
    --eval-capacity-factor      4.0 for top-K (V-MoE's eval config); else the training cf
    --compile, --aa-on-device   on for CUDA (compile: where Triton is installed); off on a CPU

Every user mistake, here or in any module, ends as one `error: ...` line and exit status 2
(errors.py's `run_cli`): a `UsageError` (ValueError) or an OSError, never a traceback.

Decisions where the papers are silent
-------------------------------------
* One `UsageError` (errors.py) for every user mistake the command lines raise; the lower
  modules (router, moe, data) raise plain ValueError / FileNotFoundError, which `run_cli`
  prints the same way.
* `--help` shows every default; the usage line stays short (the groups list the flags).
* `teacher_args_from_flags` turns saved flags into `load_teacher` arguments (checkpoint.py's
  `model_args_from_flags` does the same for `build_model`); checkpoints store the results, and
  these read older checkpoints.
"""

import argparse
import importlib.util

import torch

import m2ot_flags
from augment import parse_aa
from data import DATASETS
from errors import ArgumentParser, UsageError
from moe import METHODS, MODELS
from router import check_routing

TRITON = importlib.util.find_spec("triton") is not None  # installed? (no import, no CUDA init)
VMOE_EVAL_CF = 4.0  # V-MoE's evaluation capacity factor for top-K routers (see resolve_defaults)


def add_flag(group, *names, **kw):
    """add_argument, with DeiT's underscore spelling of every dashed name as an alias."""
    alias = ["--" + n[2:].replace("-", "_") for n in names if "-" in n[2:]]
    return group.add_argument(*names, *alias, **kw)


def mlp_kind(method):
    """What MLP a --method's MoE blocks get (moe.METHODS: None, "top-k", "expert-choice" or
    "soft"); M²oT's student is built as the method `m2ot_flags.BUILT_AS` names."""
    return METHODS[m2ot_flags.built_as(method)]


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

    # the network: a DeiT size, and the routing method its MoE layers use
    add_flag(
        g,
        "--model",
        default="tiny",
        choices=list(MODELS),
        help="ViT size (width, blocks, heads): micro (96, 6, 3: CPU demos and tests), "
        "tiny (DeiT-Ti: 192, 12, 3), small (DeiT-S: 384, 12, 6), base (DeiT-B: 768, 12, 12)",
    )
    add_flag(
        g,
        "--method",
        default="vmoe",
        choices=[*METHODS, *m2ot_flags.BUILT_AS],
        help="routing method: dense (no experts: DeiT) | vmoe (V-MoE: noisy top-K, importance "
        "+ load losses) | tgr (teacher-guided routing: the student router distils a teacher "
        "router's; needs --teacher) | stablemoe (V-MoE, then the router frozen after "
        "--stable-stage1) | zloss (V-MoE + router z-loss) | teacher-route (the teacher router "
        "chooses the experts, TGR sec. 5.3; needs --teacher) | expert-choice (each expert picks "
        "its tokens) | softmoe (Soft MoE: experts see mixtures of all tokens) | lossfree (V-MoE "
        "balanced by a selection bias instead of a loss) | m2ot (M²oT's top-K student of "
        "--teachers, no labels)",
    )

    # the MoE layers: how many experts, how many a token takes, in which blocks, how wide
    add_flag(
        g,
        "--experts",
        type=int,
        help="E, experts per MoE layer (16; m2ot and the other students of --teachers: 8)",
    )
    add_flag(
        g,
        "--topk",
        type=int,
        help="K, experts per token: top-K methods send each token to K experts, expert-choice "
        "and softmoe size their capacity and slots for K per token "
        "(1; m2ot and the other students of --teachers: 2)",
    )
    add_flag(
        g,
        "--moe-layers",
        type=int,
        nargs="+",
        help="1-indexed blocks whose MLP becomes a MoE layer (micro: 4 6; tiny, small, base: "
        "8 10 12; with --teachers every second block, 2 4 ..., as M²oT; dense: none)",
    )
    add_flag(
        g,
        "--expert-hidden",
        type=int,
        help="H, each expert's hidden width (the dense MLP's 4·width; with --teachers 4·width/K, "
        "so the K active experts hold one dense MLP's weights, M²oT Table 4)",
    )

    # the router: capacity, noise and the order in which tokens claim a place
    add_flag(
        g,
        "--capacity-factor",
        type=float,
        default=1.05,
        help="top-K and expert-choice: capacity factor cf while training; each expert holds "
        "C = ceil(K·S·cf/E) of a routing group's S tokens (top-K: at most, C rounded up to a "
        "multiple of 4, the overflow dropped; expert-choice: its C best)",
    )
    add_flag(
        g,
        "--eval-capacity-factor",
        type=float,
        help=f"top-K and expert-choice: capacity factor cf at evaluation (top-K: {VMOE_EVAL_CF}, "
        "V-MoE's evaluation config; expert-choice: --capacity-factor)",
    )
    add_flag(
        g,
        "--noise-std",
        type=float,
        default=1.0,
        help="top-K methods: σ of the Gaussian noise N(0, (σ/E)²) added to the router logits "
        "while training (V-MoE); the noise chooses the experts, the losses read the clean "
        "probabilities; 0: no noise",
    )
    add_flag(
        g,
        "--moe-group-size",
        type=int,
        default=8,
        help="top-K and expert-choice: images per routing group; capacity (and the student's "
        "balance losses) are taken per group",
    )
    add_flag(
        g,
        "--batch-priority",
        action="store_true",
        help="top-K methods: batch-priority routing (V-MoE's BPR): tokens claim capacity in "
        "decreasing order of their top-1 weight, so the least sure are dropped first "
        "(without it: in token order)",
    )

    # the ViT's input and regularisation (DeiT's flags)
    add_flag(
        g,
        "--img-size",
        "--input-size",
        type=int,
        default=224,
        help="side in pixels of the square images the model reads (the data are cropped or "
        "resized to it)",
    )
    add_flag(
        g,
        "--patch-size",
        type=int,
        default=16,
        help="side in pixels of a square patch; the token grid is img-size / patch-size a side",
    )
    add_flag(
        g,
        "--drop-path",
        type=float,
        default=0.1,
        help="stochastic depth: the probability of dropping the last block's residual branches, "
        "rising linearly from 0 at the first block (DeiT's)",
    )

    # where the weights start (else a fresh initialisation)
    add_flag(
        g,
        "--finetune",
        default="",
        help="fine-tune a train.py checkpoint: its weights, with a new head if the classes "
        "differ (a dense run into a MoE model is upcycled; tgr continues the run's teacher "
        "router unless --fresh-teacher-router)",
    )
    add_flag(
        g,
        "--upcycle",
        default="",
        help="sparse upcycling from a train.py --method dense checkpoint: its weights copied, "
        "each MoE block's experts cut from that block's dense MLP, the routers fresh",
    )


def _method_flags(parser):
    g = parser.add_argument_group("method: losses and the distillation schedule")

    # the student's own router losses
    add_flag(
        g,
        "--student-balance-coef",
        type=float,
        help="top-K methods (not with --teachers): weight λ of V-MoE's importance + load "
        "losses, summed over the MoE layers (0.005; tgr and lossfree: 0)",
    )
    add_flag(
        g,
        "--zloss-coef",
        type=float,
        default=1e-3,
        help="zloss: weight of the router z-loss, the mean over tokens of logsumexp(logits)², "
        "summed over the MoE layers (ST-MoE: keeps the router logits small)",
    )
    add_flag(
        g,
        "--student-entropy-coef",
        type=float,
        default=0.0,
        help="top-K methods: weight of an entropy loss on the student router's own p, asking "
        "for confident routing without a teacher (a control for tgr; 0: off)",
    )
    add_flag(
        g,
        "--bias-update-rate",
        type=float,
        default=1e-3,
        help="lossfree: step u by which each expert's selection bias moves after every "
        "training batch, down if the expert is overloaded, up if not (DeepSeek-V3's 0.001)",
    )

    # the teacher router and the distillation KL
    add_flag(
        g,
        "--distill-coef",
        type=float,
        default=5.0,
        help="tgr and teacher-route: λ_distill, weight of the KL from the teacher router's p_t "
        "to the student router's p (tgr: averaged over the MoE layers; teacher-route: summed)",
    )
    add_flag(
        g,
        "--teacher-load-coef",
        type=float,
        default=0.005,
        help="tgr: λ_load, weight of the balance (importance) loss on the teacher router's p_t",
    )
    add_flag(
        g,
        "--teacher-ent-coef",
        type=float,
        default=0.005,
        help="tgr: λ_ent, weight of the entropy loss that makes the teacher router's p_t confident",
    )
    add_flag(
        g,
        "--teacher-balance",
        default="batch",
        choices=["batch", "group"],
        help="tgr: the teacher router's balance loss over the whole batch (batch), or per "
        "routing group of --moe-group-size images, as the student's (group)",
    )
    add_flag(
        g,
        "--router-grad",
        default="task",
        choices=["task", "distill-only"],
        help="tgr: what trains the student router while distilling: task (the task loss and "
        "the KL) or distill-only (the KL alone; the task loss's gradient into the router is "
        "zeroed)",
    )
    add_flag(
        g,
        "--distill-tokens",
        default="all",
        choices=["all", "cls"],
        help="tgr and teacher-route: the tokens whose routing the KL distils: all (CLS and "
        "every patch) or cls (the CLS token alone)",
    )

    # when the distillation (StableMoE: the router's learning) stops
    add_flag(
        g,
        "--distill-until",
        type=distill_until,
        default=0.5,
        help="tgr: distil during the first fraction F of the epochs (ceil(F·epochs); 0: never, "
        "1: all), or adaptive (until the routing settles, see --switch-consistency); then the "
        "teacher and its routers are deleted",
    )
    add_flag(
        g,
        "--stable-stage1",
        type=stable_stage1,
        default=0.5,
        help="stablemoe: the fraction F of the epochs (ceil(F·epochs)) in which the router "
        "learns; then it is frozen, with its noise and the balance loss off",
    )
    add_flag(
        g,
        "--switch-consistency",
        type=float,
        default=0.8,
        help="tgr --distill-until adaptive: the adjacent-epoch routing consistency (share of "
        "the watch set's tokens that keep their top-1 expert) every MoE layer must reach",
    )
    add_flag(
        g,
        "--switch-patience",
        type=int,
        default=2,
        help="tgr --distill-until adaptive: epochs in a row at or above --switch-consistency "
        "before the distillation stops",
    )

    g = parser.add_argument_group("teacher")

    # the frozen dense teacher: which file, which blocks, how it runs
    add_flag(
        g,
        "--teacher",
        default="",
        help="tgr and teacher-route: the frozen dense teacher, a .pth/.pt file (a train.py "
        "--method dense run, DeiT-III, DINOv2, a timm-layout ViT) or torchvision:NAME",
    )
    add_flag(
        g,
        "--teacher-layers",
        type=teacher_layer,
        nargs="+",
        help="tgr and teacher-route: per MoE layer, the 1-indexed teacher block whose LN2 "
        "output feeds its teacher router, or final (the last block after the final norm); "
        "when not given, the student's MoE blocks",
    )
    add_flag(
        g,
        "--teacher-dtype",
        default="bf16",
        choices=["bf16", "fp32"],
        help="tgr, teacher-route and --teachers: the autocast dtype of the teachers' forward "
        "pass (their features are returned as float32)",
    )
    add_flag(
        g,
        "--teacher-random",
        action="store_true",
        help="--teacher / --teachers torchvision:NAME (or timm:NAME): random weights where "
        "none are cached, instead of a download (offline tests)",
    )
    add_flag(
        g,
        "--teacher-resample",
        action="store_true",
        help="tgr and teacher-route: accept a teacher of another token grid: its position "
        "embeddings are resampled and the images resized to the student's grid",
    )
    add_flag(
        g,
        "--teacher-reinit",
        type=int,
        metavar="SEED",
        help="tgr and teacher-route: replace the teacher's weights by a random initialisation "
        "from SEED (a control: the same architecture without its knowledge)",
    )
    add_flag(
        g,
        "--fresh-teacher-router",
        action="store_true",
        help="tgr with --finetune: a new teacher router R_t instead of continuing the "
        "pre-trained run's",
    )


def _recipe_flags(parser):
    on_off = argparse.BooleanOptionalAction
    g = parser.add_argument_group("optimisation and augmentation (DeiT recipe)")

    # the batch and the learning-rate schedule
    add_flag(
        g,
        "--batch-size",
        type=int,
        default=64,
        help="images per process per batch (DeiT's: the global batch is batch-size × "
        "processes × accum-iter)",
    )
    add_flag(
        g,
        "--accum-iter",
        type=int,
        default=1,
        help="gradient accumulation: batches per optimizer step (the LR scales with them)",
    )
    add_flag(
        g,
        "--epochs",
        type=int,
        default=300,
        help="training epochs (passes over the training set; with --repeated-aug, about a "
        "third of the images, 3 times each)",
    )
    add_flag(
        g,
        "--lr",
        type=float,
        default=5e-4,
        help="peak learning rate for a global batch of 512, scaled linearly: lr × batch-size × "
        "processes × accum-iter / 512 (DeiT's rule)",
    )
    add_flag(
        g,
        "--min-lr",
        type=float,
        default=1e-5,
        help="the learning rate the cosine schedule ends at",
    )
    add_flag(
        g,
        "--warmup-lr",
        type=float,
        default=1e-6,
        help="the learning rate at step 0, where the linear warm-up starts",
    )
    add_flag(
        g,
        "--warmup-epochs",
        type=float,
        default=5,
        help="epochs of linear warm-up from --warmup-lr to the scaled --lr (fractions allowed)",
    )

    # AdamW
    add_flag(
        g,
        "--weight-decay",
        type=float,
        default=0.05,
        help="AdamW weight decay (none on biases, norms, pos_embed and cls_token)",
    )
    add_flag(g, "--opt-eps", type=float, default=1e-8, help="AdamW's ε, added to the denominator")
    add_flag(
        g,
        "--opt-betas",
        type=float,
        nargs=2,
        default=(0.9, 0.999),
        help="AdamW's β1 and β2, the decays of its moment estimates",
    )
    add_flag(
        g,
        "--clip-grad",
        type=float,
        help="clip the gradients' global norm to this before each optimizer step (not given: "
        "no clipping)",
    )

    # labels: smoothing and batch mixing (runs with labels, not --teachers)
    add_flag(
        g,
        "--smoothing",
        type=float,
        default=0.1,
        help="label smoothing ε of the cross-entropy",
    )
    add_flag(
        g,
        "--mixup",
        type=float,
        default=0.8,
        help="MixUp α; with --cutmix, one of the two is chosen per batch (0: no MixUp)",
    )
    add_flag(
        g,
        "--cutmix",
        type=float,
        default=1.0,
        help="CutMix α; with --mixup, one of the two is chosen per batch (0: no CutMix)",
    )

    # per-image augmentation
    add_flag(
        g,
        "--aa",
        default="rand-m9-mstd0.5-inc1",
        help="RandAugment policy in timm's spelling, or none: rand, then m the magnitude "
        "(0-10), mstd its std, n the ops per image (2) and inc1 (timm's increasing ops, the "
        "only set here)",
    )
    add_flag(
        g,
        "--aa-on-device",
        action=on_off,
        help="RandAugment the uint8 batch on the device instead of in the loader's workers "
        "(on for CUDA, off on a CPU)",
    )
    add_flag(
        g,
        "--reprob",
        type=float,
        default=0.25,
        help="random erasing: the probability that an image gets erased rectangles (0: off)",
    )
    add_flag(
        g,
        "--remode",
        default="pixel",
        choices=["pixel", "const"],
        help="random erasing's fill: pixel (N(0, 1) noise per pixel) or const (zeros), "
        "after normalisation",
    )
    add_flag(
        g,
        "--recount",
        type=int,
        default=1,
        help="random erasing: an erased image gets 1 to N rectangles (drawn uniformly)",
    )
    add_flag(
        g,
        "--repeated-aug",
        action=on_off,
        default=True,
        help="DeiT's repeated augmentation: each epoch takes a third of the images, 3 "
        "differently augmented copies of each (--no-repeated-aug: a plain shuffle)",
    )
    add_flag(
        g,
        "--crop-flip",
        action=on_off,
        default=True,
        help="random crop (RandomResizedCrop; a reflect-padded crop at 64 px or less) and "
        "horizontal flip of the training images",
    )
    add_flag(
        g,
        "--eval-crop-ratio",
        type=float,
        default=0.875,
        help="evaluation of images over 64 px: resize to img-size / ratio, centre-crop "
        "img-size (DeiT's 0.875; DeiT-III's 1.0)",
    )

    # speed, and the averaged weights
    add_flag(
        g,
        "--compile",
        action=on_off,
        help="torch.compile the training step, the teacher's forward too (on for CUDA where "
        "Triton is installed, off on a CPU)",
    )
    add_flag(
        g,
        "--model-ema",
        action=on_off,
        help="keep an exponential moving average of the weights, validated every epoch "
        "(val_top1_ema) and saved (DeiT's; on by default, off with --teachers)",
    )
    add_flag(
        g,
        "--model-ema-decay",
        type=float,
        default=0.99996,
        help="--model-ema: the average's decay per optimizer step",
    )


def _run_flags(parser):
    g = parser.add_argument_group("data")

    # which images, from where
    add_flag(
        g,
        "--data",
        "--data-set",
        default="synthetic",
        choices=DATASETS,
        help="the data set: synthetic (generated images, offline), cifar10, cifar100, pets "
        "(Oxford-IIIT Pets), imagenet or folder (an ImageFolder under --data-path)",
    )
    add_flag(
        g,
        "--data-path",
        default="data",
        help="the data root: imagenet and folder read its train/CLASS/ and val/CLASS/ images; "
        "cifar10, cifar100 and pets are downloaded into it when missing",
    )

    # the generated images of --data synthetic
    add_flag(
        g,
        "--nb-classes",
        type=int,
        help="--data synthetic: the number of classes, each a pair of coloured shapes (10 "
        "when not given; the other data sets have their own)",
    )
    add_flag(
        g,
        "--synthetic-train-size",
        type=int,
        default=10000,
        help="--data synthetic: images in the generated training split",
    )
    add_flag(
        g,
        "--synthetic-val-size",
        type=int,
        default=1000,
        help="--data synthetic: images in the generated validation split",
    )
    add_flag(
        g,
        "--synthetic-seed",
        type=int,
        default=0,
        help="--data synthetic: the seed the generated images and classes are drawn from",
    )

    # the loader
    add_flag(
        g,
        "--num-workers",
        type=int,
        help="data-loader worker processes per process (when not given: on CUDA the CPUs per "
        "process, at most 10; on a CPU 0, loading in the main process)",
    )
    add_flag(
        g,
        "--pin-mem",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load batches into pinned (page-locked) host memory for faster copies to the "
        "GPU (CUDA only)",
    )

    g = parser.add_argument_group("run")

    # where the run lives and how it starts
    add_flag(
        g,
        "--output-dir",
        help="the run folder: args.json, log.jsonl, checkpoint.pt (when not given: "
        "runs/MODEL-METHOD)",
    )
    add_flag(
        g,
        "--resume",
        default="",
        help="continue a run from its checkpoint: a path (RUN/checkpoint.pt), or auto (the "
        "output dir's checkpoint.pt, if there is one)",
    )
    add_flag(
        g,
        "--overwrite",
        action="store_true",
        help="start a new run in an output dir that holds another run's checkpoint, replacing "
        "its files (without it, such a folder is refused, never written to)",
    )
    add_flag(
        g,
        "--seed",
        type=int,
        default=0,
        help="the run's random seed: initialisation, data order and augmentation follow from it",
    )
    add_flag(
        g,
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to train: cuda, cuda:N or cpu (torchrun: each process its local GPU)",
    )

    # what it reports
    add_flag(
        g,
        "--print-freq",
        type=int,
        default=50,
        help="a progress line every N batches (in one process also at least every 30 s)",
    )
    add_flag(
        g,
        "--watch-size",
        "--probe-size",
        type=int,
        default=256,
        help="validation images in the watch set, whose routing is watched every epoch "
        "(consistency between epochs, the adaptive switch; --probe-size: its older name)",
    )
    add_flag(
        g,
        "--watch-every",
        "--probe-every",
        type=int,
        default=0,
        help="also route the watch set every N optimizer steps into probe_steps.pt (0: off; "
        "--probe-every: its older name)",
    )


def get_args_parser(add_help=True):
    """train.py's parser (DeiT's `get_args_parser`): flags in groups, DeiT's names."""
    parser = ArgumentParser(
        "train.py",
        description="tgr-moe training: DeiT's recipe, sparse MoE routers, teacher guidance",
        usage="%(prog)s [--model M] [--method M] [--teacher SRC] ... (DeiT's flags, below)",
        add_help=add_help,
    )
    for flags in (_model_flags, _method_flags, m2ot_flags.add_flags, _recipe_flags, _run_flags):
        flags(parser)
    return parser


def resolve_defaults(args):
    """The defaults that depend on --method, --teachers or --device, written into args."""
    m2ot_flags.resolve_defaults(args, MODELS[args.model])  # --teachers: M²oT's sec. 5
    if args.experts is None:  # V-MoE: 16 experts, top-1
        args.experts = 16
    if args.topk is None:
        args.topk = 1
    if args.model_ema is None:  # DeiT keeps an EMA
        args.model_ema = True
    if args.eval_capacity_factor is None:
        # V-MoE's ImageNet-1k config (google-research/vmoe, vmoe_paper/vmoe_s32_last2_ilsvrc2012_
        # randaug_light1.py, "Use higher capacity for evaluation") evaluates top-K at cf 4.0;
        # expert choice keeps its cf: there it is how many tokens an expert takes
        top_k = mlp_kind(args.method) == "top-k"
        args.eval_capacity_factor = VMOE_EVAL_CF if top_k else args.capacity_factor
    if args.aa_on_device is None:  # on a GPU the workers are the bottleneck (docs/benchmarks.md)
        args.aa_on_device = args.device.startswith("cuda")
    if args.compile is None:  # GPU: 1.23-1.51x the eager step's images/s (docs/training.md)
        args.compile = args.device.startswith("cuda") and TRITON  # inductor's GPU kernels
    if args.student_balance_coef is None:  # TGR (sec. 3): the student has no balance loss;
        # lossfree balances with its selection bias instead of a loss
        args.student_balance_coef = 0.0 if args.method in ("tgr", "lossfree") else 0.005


def check_args(args):
    """Turn impossible settings into one readable line each (errors.py says how)."""
    if mlp_kind(args.method) in ("top-k", "expert-choice"):  # router.py owns these rules
        check_routing(args.experts, args.topk, args.capacity_factor, args.eval_capacity_factor)
    if args.method in ("tgr", "teacher-route") and not args.teacher:
        demo = "runs/demo/dense/checkpoint.pt, which make demo writes"
        raise UsageError(f"--method {args.method} needs --teacher (a dense run, e.g. {demo})")
    m2ot_flags.check_args(args)
    if min(args.student_entropy_coef, args.bias_update_rate, args.watch_every) < 0:
        raise UsageError(
            "--student-entropy-coef, --bias-update-rate and --watch-every must be >= 0"
        )
    if args.upcycle and args.finetune:
        raise UsageError("--upcycle and --finetune both start the weights: give one")
    for name in ("batch_size", "epochs", "experts", "print_freq", "watch_size", "accum_iter"):
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
    if mlp_kind(args.method) in ("top-k", "expert-choice"):
        cf = f"capacity factor {args.capacity_factor} train / {args.eval_capacity_factor} eval"
        parts.append(cf)
    if args.compile:  # the first steps (and the TGR/StableMoE switch) wait for the compiler
        parts.append("compiled (--no-compile: eager)")
    return ", ".join(optimiser) + "; " + ", ".join(parts) + m2ot_flags.describe(args)


# ----------------------------------------------------------------------------- saved flags
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
