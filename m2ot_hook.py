"""M²oT's side of a training run: the one object train.py meets it through.

The idea
--------
train.py is TGR's trainer: a student with labels, a teacher router, a switch. A student of
several teachers (`--teachers`; `--method m2ot`, or a dense or Soft MoE student of the same
teachers) learns instead from the teachers' final features, without labels (m2ot.py). It
differs from the labelled run in a handful of places, and each is one call on `M2oTHook`:

    M2oTHook.read(args)     load and check the teachers, with the run's other inputs
    hook.build_student      the student without a classifier, its MoE layers handing back
                            φ and x_t for L_tas
    hook.start              the training-only parts (heads, π, target statistics), resumed
                            from the checkpoint's "m2ot" entry
    hook.losses             Eq. 10 for a batch, in place of train.py's `compute_losses`
    hook.measure            the k-NN top-1 of the CLS embedding, at the epochs --knn-every asks
    hook.describe           the start line's "+ heads and π for N teachers"

The heads and π train beside the student, outside its DDP wrapper, as the teacher routers
do (train.py's `Guides.extra`); the checkpoint stores them under "m2ot".

Decisions where the paper is silent
-----------------------------------
* The k-NN bank is the train split read with the evaluation transform (no augmentation), as
  DINO's k-NN protocol reads it; it is built once, at `start`.
* `--knn-every N` measures after every N-th epoch and always after the last (0: the last only);
  the epochs between log no k-NN top-1 (the epoch line shows "-").
"""

from checkpoint import load_weights, model_args_from_flags
from data import build_dataset, build_loader
from m2ot import M2oT, keep_expert_outputs, m2ot_losses
from m2ot_teachers import load_final_teacher
from moe import build_model
from probe import knn_eval
from vit import amp_dtype_for


class M2oTHook:
    """A run of a student of `--teachers`: its teachers, and, once `start`ed, the `M2oT`
    module (heads, π, statistics) and the k-NN bank."""

    def __init__(self, args, teachers):
        self.args = args
        self.teachers = teachers  # m2ot_teachers.FinalTeacher, one per --teachers source
        self.module = None  # m2ot.M2oT, built by `start`
        self.knn_bank = None  # the train split without augmentation, for `measure`

    @classmethod
    def read(cls, args):
        """The hook of a run of --teachers, its teachers loaded (one error line for a bad
        one); None without --teachers."""
        if not args.teachers:
            return None
        options = dict(
            img_size=args.img_size,
            dtype=args.teacher_dtype,
            random_ok=args.teacher_random,
        )
        return cls(args, [load_final_teacher(source, **options) for source in args.teachers])

    def build_student(self):
        """The student of --model/--method with no classifier (no labels: `model(images)`
        gives its CLS features), its MoE layers handing back φ and x_t for L_tas."""
        model = build_model(**model_args_from_flags(self.args, 0))
        keep_expert_outputs(model)
        return model

    def start(self, model, device, rank, world, ckpt=None, resume=""):
        """Build the training-only parts beside `model` (on `device`; a resumed run's from
        the checkpoint) and the k-NN bank; returns the `M2oT` module (train.py broadcasts
        rank 0's initial weights to the other ranks)."""
        args = self.args

        # heads and standardisers per teacher, π per MoE layer (top-K students only)
        teachers = [t.to(device) for t in self.teachers]
        routed = args.method == "m2ot"
        self.module = M2oT.for_student(model, teachers, args, routed).to(device)
        if ckpt is not None:  # heads, π and the targets' statistics
            load_weights(self.module, ckpt["m2ot"], f"--resume {resume}'s M²oT heads")

        # the k-NN bank: the train split, read as the validation split is
        bank, _ = build_dataset(True, args, augment=False)
        pin = args.pin_mem and device.type == "cuda"
        self.knn_bank = build_loader(bank, False, args, rank=rank, world=world, pin_memory=pin)
        return self.module

    def losses(self, model, images, targets, args, guides, labels=None):
        """Eq. 10 for one batch, with train.py's `compute_losses` signature (so the step, and
        --compile, run it alike): (L, 0 for the absent teacher router, {part: value}).
        Labels and targets are not read."""
        loss, parts = m2ot_losses(model, self.module, images, args.tas_coef, args.switch_coef)
        return loss, 0.0, parts

    def measure(self, model, val_loader, epoch):
        """{"val_knn_top1": the k-NN top-1 (weighted, k = 20, T = 0.07)} after the epochs
        --knn-every asks for, else {}."""
        every = self.args.knn_every
        last = epoch + 1 == self.args.epochs
        if not (every and (epoch + 1) % every == 0) and not last:
            return {}
        device = next(model.parameters()).device
        amp_dtype = amp_dtype_for(device)
        return {
            "val_knn_top1": knn_eval(model, self.knn_bank, val_loader, device, amp_dtype=amp_dtype)
        }

    def describe(self):
        """The start line's part: what trains beside the student only in training."""
        heads = sum(p.numel() for p in self.module.parameters()) / 1e6
        return f" + {heads:.3f}M heads and π for {len(self.teachers)} teachers"
