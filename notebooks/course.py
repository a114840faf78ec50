"""What the notebooks share: the setup cell, the training flags, "run train.py with these".

Nothing here teaches MoE. It is the plumbing every notebook would otherwise copy, so that the
notebooks' cells hold only what they teach (they import the modules and never
re-implement them). A notebook starts with

    import course  # first: it puts the repo root on sys.path, so `import train, moe, ...` works

    QUICK, DEVICE = course.setup(threads=1, seed=SEED)

and trains its micro models with `course.train_run(RUNS / "vmoe", *flags)`.

    QUICK   True under the test suite's `TGR_NOTEBOOK_QUICK=1`: every notebook shrinks its data,
            epochs and steps so that it runs in seconds (tests/test_notebooks.py)
    DEVICE  "cuda" when there is one, else "cpu" (a string: it is also a `--device` flag)
"""

import contextlib
import io
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

ROOT = Path(__file__).resolve().parent.parent  # the repo root: the notebooks live in notebooks/
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUICK = os.environ.get("TGR_NOTEBOOK_QUICK") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Small figures, saved small: the committed .ipynb carries every plot as a PNG.
PLOT_SETTINGS = {
    "figure.dpi": 72,
    "figure.figsize": (9, 3.2),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 10,
    "lines.markersize": 4,
}
INLINE_FIGURES = '{"bbox_inches": "tight", "pil_kwargs": {"optimize": True}}'


def setup(threads=1, seed=0):
    """Plot style, tensor print options, CPU threads and the seed; returns (QUICK, DEVICE).

    threads: 1 by default, since micro models gain little from more and a shared CPU punishes
    them (the test suite runs the notebooks next to other work).
    """
    shell = sys.modules.get("IPython")  # imported already when a Jupyter kernel runs us
    shell = shell.get_ipython() if shell else None
    if shell is not None:  # the magics `%matplotlib inline` and `%config InlineBackend...`
        shell.run_line_magic("matplotlib", "inline")
        shell.run_line_magic("config", f"InlineBackend.print_figure_kwargs = {INLINE_FIGURES}")
    plt.rcParams.update(PLOT_SETTINGS)  # after the backend: activating it may reset rcParams
    torch.set_printoptions(precision=3, sci_mode=False, linewidth=100)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return QUICK, DEVICE


def micro_flags(*, img_size, patch_size, experts, train_images, val_images, seed=0):
    """train.py flags every notebook run shares: a `micro` ViT on generated images, on a CPU.

    The DeiT recipe's augmentations, label smoothing and stochastic depth are off: these runs
    last minutes, not 300 epochs. lr 8e-3 at DeiT's batch of 512 is 1e-3 at our batch of 64.
    The watch set whose routing train.py follows every epoch is the whole validation set.
    """
    return [
        *("--model", "micro", "--img-size", str(img_size), "--patch-size", str(patch_size)),
        *("--experts", str(experts), "--batch-size", "64"),
        *("--synthetic-train-size", str(train_images), "--synthetic-val-size", str(val_images)),
        *("--watch-size", str(val_images), "--warmup-epochs", "1", "--lr", "8e-3"),
        *("--min-lr", "1e-4", "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0"),
        *("--no-repeated-aug", "--no-model-ema", "--smoothing", "0", "--drop-path", "0"),
        *("--print-freq", "100000"),  # no per-step lines (the epoch lines are silenced too)
        *("--num-workers", "0"),  # loader workers would take the model's CPU cores
        *("--seed", str(seed), "--device", DEVICE),
    ]


def train_run(output_dir, *flags):
    """`python train.py FLAGS --output-dir OUTPUT_DIR` in this process, its printing silenced.

    Returns train.main's dict: "model" (the trained student), "routers" (the teacher
    routers while they still run), "m2ot" (an M²oT run's heads and π), "history" (one
    log.jsonl record per epoch) and "args". The output folder is required: train.py's default,
    runs/MODEL-METHOD, would put checkpoints inside the repo.
    """
    import train  # here, not at the top: it is found through the sys.path entry made above

    # --overwrite: a notebook run again trains again, in the same folder
    argv = [*flags, "--output-dir", str(output_dir), "--overwrite"]
    args = train.get_args_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):  # train.py prints a line per epoch
        return train.main(args)


def evidence(setting="fast"):
    """One setting of docs/evidence.json: experiments/tgr_claims.py's multi-seed results.

    "arms": per arm (vmoe, tgr, tgr-random, vmoe-ent-match, ...) and per measure (top1, adj,
    final_half, entropy, ...) {"mean", "ci95", "n"}; "diffs": the same for differences paired
    by seed ("tgr - vmoe", ...); "curves": per arm the mean per-epoch curves. `fast` is
    notebook 04's configuration, 10 seeds. Regenerated by `python experiments/tgr_claims.py
    --settings fast` (about 77 minutes of CPU, resumable), then `--report-only`.
    """
    import json

    return json.loads((ROOT / "docs" / "evidence.json").read_text())[setting]


def split_study():
    """docs/m2ot_split.json: experiments/m2ot_split.py's results, "toy" and "students", each
    {"GROUP ARM": {seed: summary}} (GROUP "E4-K2" for the toy, the teacher pair for the
    students; ARM the arm's folder name, e.g. "control-fixed-pi"); every summary holds the
    "representational" and "causal" readings (m2ot_measure.indices, per MoE layer for the
    students). Regenerated by `python experiments/m2ot_split.py` (about 1.5 hours of CPU,
    resumable), then `--report-only`."""
    import json

    return json.loads((ROOT / "docs" / "m2ot_split.json").read_text())


def pm(stat, digits=3):
    """An evidence statistic as "mean ± 95% interval"."""
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f}"
