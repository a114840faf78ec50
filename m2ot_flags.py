"""M²oT's command line: its flags, the defaults they change, their checks, its recipe line.

The idea
--------
`--teachers SRC ...` turns train.py's run into a student of several frozen teachers, learning
from their final features without labels (m2ot.py). `--method m2ot` is M²oT's own top-K
student; a dense or Soft MoE student of the same teachers is the paper's other rows. flags.py
builds the command line and asks this file for M²oT's part of each of its steps:

    add_flags          the "M²oT" group of train.py --help
    resolve_defaults   E = 8, K = 2, every second block, experts of width H/K (its sec. 5)
    check_args         which methods may learn from --teachers
    describe           the recipe line's "N teachers, no labels, λ_1, λ_2"

Decisions where the paper is silent
-----------------------------------
* `--method m2ot` builds the same top-K MoE ViT as `vmoe` (`BUILT_AS`: checkpoint.py saves
  and rebuilds it so); what makes it M²oT is the objective, not the model.
* The flags take DeiT's underscore spellings as aliases (`--tas_coef`), as every flag of
  flags.py does.
* The MoE defaults follow the paper's sec. 5: 8 experts, K = 2, a MoE layer in every second
  block, each expert H/K wide so that the K active experts hold one dense MLP's weights
  (its Table 4). Each is a default only: a flag given on the command line wins.

This file imports nothing of the project but errors.py, so flags.py (and checkpoint.py, for
`BUILT_AS`) may read it without reaching M²oT's models.
"""

from errors import UsageError

BUILT_AS = {"m2ot": "vmoe"}  # --method -> the moe.py method its student is built as
STUDENTS = ("m2ot", "dense", "softmoe")  # the methods that may learn from --teachers


def built_as(method):
    """The moe.py method that --method `method` builds: `BUILT_AS`'s, else itself."""
    return BUILT_AS.get(method, method)


def add_flags(parser):
    """M²oT's group of train.py's flags (each also in DeiT's underscore spelling)."""
    g = parser.add_argument_group("M²oT: several teachers guide the experts (no labels)")

    # the teachers, and how their final features are distilled
    g.add_argument(
        "--teachers",
        nargs="+",
        default=[],
        help="frozen teachers whose final features the student (m2ot, dense or softmoe) "
        "distils without labels: SRC[@SIZE] each, SRC any --teacher source or timm:NAME=PATH, "
        "SIZE the side in pixels it runs at (docs/m2ot.md)",
    )
    g.add_argument(
        "--dist-reduce",
        "--dist_reduce",
        default="mean",
        choices=["mean", "sum"],
        help="--teachers: L_dist over the teachers, their mean or their sum (Eq. 2 as written; "
        "λ_1 then weighs N_T times less)",
    )

    # the expert losses of --method m2ot
    g.add_argument(
        "--tas-coef",
        "--tas_coef",
        type=float,
        default=0.5,
        help="m2ot: λ_1, weight of the teacher-aware specialisation loss L_tas (0: the paper's "
        "plain Sparse MoE row; π still learns, but L_tas no longer reaches the experts)",
    )
    g.add_argument(
        "--tas-form",
        "--tas_form",
        default="mixture",
        choices=["mixture", "map", "heads"],
        help="m2ot: L_tas as Eq. 8, each expert toward its π-mixture of teachers (mixture), "
        "the MAP form, π weighing each teacher's own distance (map, Eq. 6-7), or the MAP form "
        "through a learnable linear read-out g_i of the expert per teacher instead of the "
        "fixed Q_i (heads)",
    )
    g.add_argument(
        "--switch-coef",
        "--switch_coef",
        type=float,
        default=0.01,
        help="m2ot: λ_2, weight of the Switch Transformer load-balancing loss on the tokens' "
        "top-1 experts",
    )

    # variants tried to make the experts split the teachers (docs/m2ot.md); each off by default
    g.add_argument(
        "--tas-norm",
        "--tas_norm",
        default="mean",
        choices=["mean", "sum"],
        help="m2ot: L_tas's ‖·‖₁ as a mean over the D channels, or their sum as Eq. 8 writes "
        "it (D times stronger; with --dist-reduce sum the paper's weighting)",
    )
    g.add_argument(
        "--tas-pi",
        "--tas_pi",
        default="learned",
        choices=["learned", "fixed"],
        help="m2ot: π learned (the paper), or fixed, expert e tied to teacher e mod N_T (a "
        "positive control for the specialisation measure)",
    )
    g.add_argument(
        "--pi-balance",
        "--pi_balance",
        type=float,
        default=0.0,
        help="m2ot: weight of a loss keeping π's teacher shares even across experts, N_T Σ_i "
        "share_i² (0: off)",
    )
    g.add_argument(
        "--teacher-drop",
        "--teacher_drop",
        type=float,
        default=0.0,
        help="--teachers: UNIC's teacher dropping, per image keep the worst-fit teacher and drop "
        "each other's distillation loss with this probability (UNIC: 0.5; 0: off)",
    )
    g.add_argument(
        "--switch-choices",
        "--switch_choices",
        default="first",
        choices=["first", "all"],
        help="m2ot: L_switch counts each token's first choice (Switch's top-1) or all K",
    )

    # the label-free measure of the student
    g.add_argument(
        "--knn-every",
        "--knn_every",
        type=int,
        default=1,
        help="--teachers: the k-NN top-1 of the CLS embedding every N epochs (0: after the "
        "last epoch only)",
    )


def resolve_defaults(args, model):
    """The MoE defaults of a student of --teachers, written into args where no flag gave
    them (M²oT sec. 5). model: the --model's row of moe.MODELS (depth, embed_dim)."""
    if not args.teachers:
        return
    if args.experts is None:  # E = 8
        args.experts = 8
    if args.topk is None:  # K = 2
        args.topk = 2
    if args.moe_layers is None:  # every second block (1-indexed 2, 4, ...)
        args.moe_layers = list(range(2, model["depth"] + 1, 2))
    if args.expert_hidden is None and args.method != "dense":
        # H/K: K active experts hold the dense MLP's weights (M²oT Table 4)
        args.expert_hidden = int(model["embed_dim"] * 4) // args.topk
    if args.model_ema is None:  # DeiT keeps an EMA; a feature student has no top-1 to show it
        args.model_ema = False


def check_args(args):
    """One line for a setting M²oT cannot run (errors.py says how)."""
    if args.method == "m2ot" and not args.teachers:
        raise UsageError("--method m2ot needs --teachers SRC [SRC ...] (dense checkpoints, ...)")
    if args.teachers and args.method not in STUDENTS:
        students = ", ".join(STUDENTS[:-1]) + f" and {STUDENTS[-1]}"
        raise UsageError(f"--teachers: the students are {students}, not {args.method}")
    if min(args.tas_coef, args.switch_coef, args.pi_balance) < 0 or args.knn_every < 0:
        raise UsageError("--tas-coef, --switch-coef, --pi-balance and --knn-every must be >= 0")
    if not 0 <= args.teacher_drop < 1:
        raise UsageError(f"--teacher-drop must be in [0, 1), not {args.teacher_drop}")


def describe(args):
    """The recipe line's M²oT part ("" without --teachers)."""
    if not args.teachers:
        return ""
    text = f"; {len(args.teachers)} teachers, no labels, λ_1 (tas) {args.tas_coef}, "
    text += f"λ_2 (switch) {args.switch_coef}"

    # the variants, where one is on
    variants = {
        "tas-form": (args.tas_form, "mixture"),
        "tas-norm": (args.tas_norm, "mean"),
        "tas-pi": (args.tas_pi, "learned"),
        "pi-balance": (args.pi_balance, 0.0),
        "teacher-drop": (args.teacher_drop, 0.0),
        "switch-choices": (args.switch_choices, "first"),
    }
    on = [f"{name} {value}" for name, (value, off) in variants.items() if value != off]
    return text + (f" ({', '.join(on)})" if on else "")
