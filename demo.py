"""The offline demonstration: a dense teacher, then V-MoE and TGR students, on a laptop CPU.

`make demo` runs this file. It calls `train.main` on generated images
(`--data synthetic`, no download, no GPU): a dense `micro` DeiT (the teacher), a V-MoE student
and a TGR student guided by that teacher for the first half of its epochs (`--distill-until
0.5`), then prints their top-1, per-layer routing entropy H(util)/log E and adjacent-epoch
routing consistency (the fraction of a fixed watch set's tokens that keep their top-1 expert
from one epoch to the next, averaged over epochs 1..end) from each run's log.jsonl. Last,
`eval.py` reads the TGR student's checkpoint and writes its figures to runs/demo/plots. It also
trains M²oT's second teacher (runs/demo/m2ot-teacher: `tiny`, patch 8, another generated task),
so that the README's M²oT command runs right after `make demo`.
`--all` also trains every other method on the same data and schedule (expert choice, Soft MoE,
StableMoE, z-loss, auxiliary-loss-free balancing, and the teacher-route upper bound with the
same teacher) for the README's table of our numbers.

`--m2ot` (also in `--all`) runs the second paper's comparison offline: two dense teachers of
different shapes trained on different generated tasks (the micro teacher above, patch 4 on
the 40-class task, and a wider `tiny` model with patch 8 on another 10-class task), then
four students of both, without labels and with two seeds each: a dense student, a sparse
MoE (`--method m2ot --tas-coef 0`), M²oT (Eq. 8) and M²oT with the MAP form of L_tas
(`--tas-form map`). It prints the k-NN top-1 of each student's CLS embedding on the 40-class
task, the last epoch's L_dist per teacher, L_tas and L_switch, and the expert -> teacher
preference (`eval.py`'s, on the watch set): its sharpness per expert and per token, and how
many experts favour each teacher; and, as M²oT's ADE20K and NYUd columns, the mIoU and RMSE of
linear probes on each student's frozen patch tokens (`eval.py --seg-probe --depth-probe`, on
the generated part masks and depth), with each teacher's own as the ceiling.

It is a demonstration, not a claim: one seed, a few minutes of training on a toy data set,
far from the paper's 300 ImageNet epochs. It shows the pipeline end to end and what to look
at; differences of a point or two in top-1 here are noise. `--quick` shrinks it to seconds
(the test suite runs that).
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import eval
import train
from flags import VMOE_EVAL_CF
from moe import METHODS

COMMON = (
    "--model micro --img-size 32 --patch-size 4 --data synthetic --nb-classes 40 --experts 8 "
    "--topk 1 --batch-size 64 --lr 8e-3 --warmup-epochs 1 --drop-path 0 --print-freq 100000 "
    "--num-workers 0 "  # lr 8e-3·64/512 = 1e-3 per step
    "--mixup 0 --cutmix 0 --aa none --reprob 0 --no-repeated-aug --no-model-ema "  # DeiT's
    # augmentations and EMA off for minute-long runs (repeated augmentation would show a third
    # of the images per epoch; an EMA of decay 0.99996 over 400 steps is the initial weights)
    "--no-compile"  # on a GPU too: compiling each short run would take longer than the run
).split()
M2OT_TEACHER = (  # the second teacher: wider, coarser patches, another generated task
    "--model tiny --patch-size 8 --synthetic-seed 1 --nb-classes 10 --method dense"
).split()
SIZES = {  # train images, val images, teacher epochs, student epochs, M²oT student epochs
    "full": (2500, 500, 6, 10, 5),
    "quick": (128, 64, 1, 2, 2),
}


def run(out, sizes, *flags):
    """train.main in this process; returns the wall time in seconds."""
    size = ["--synthetic-train-size", str(sizes[0]), "--synthetic-val-size", str(sizes[1])]
    argv = [*COMMON, *size, "--output-dir", str(out), "--overwrite", *flags]  # a demo starts over
    args = train.get_args_parser().parse_args(argv)
    start = time.time()
    train.main(args)
    return time.time() - start


def row(name, out, seconds):
    """top-1 and entropy of the last epoch; consistency averaged over epochs 1..end."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    later = log[1:] or log  # epoch 0 compares with the random initial routing: left out
    consistency = [sum(c) / len(later) for c in zip(*(r["consistency_prev"] for r in later))]
    cells = [log[-1]["routing_entropy"] or [], consistency if log[-1]["moe_layers"] else []]
    cells = [" ".join(f"{x:.3f}" for x in xs) or "-" for xs in cells]
    distilled = sum(r["distilling"] for r in log)
    line = (
        f"| {name} | {log[-1]['val_top1']:.1f} | {cells[0]} | {cells[1]} | "
        f"{distilled}/{len(log)} | {seconds:.0f} s |"
    )
    if "val_top1_student_route" in log[-1]:  # teacher-route: the same model, the student routes
        line += f"\n| {name}, student's route | {log[-1]['val_top1_student_route']:.1f} | | | | |"
    return line


def m2ot_row(name, seed, out, seconds):
    """One student: k-NN top-1, the last epoch's losses, eval.py's preference sharpness."""
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    argv = ["--checkpoint", str(out / "checkpoint.pt"), "--seg-probe", "--depth-probe"]
    res = eval.main(eval.get_args_parser().parse_args(argv))
    per_layer = lambda key: " ".join(f"{x:.2f}" for x in res.get(key, [])) or "-"
    sharp = per_layer("preference_sharpness")
    token = per_layer("token_sharpness")
    favourites = " ".join("/".join(map(str, f)) for f in res.get("favourite_counts", [])) or "-"
    loss = [f"{last[k]:.3f}" if k in last else "-" for k in ("train_tas", "train_switch")]
    dist = f"{last['train_dist_0']:.3f}, {last['train_dist_1']:.3f}"
    return (
        f"| {name} | {seed} | {last['val_knn_top1']:.1f} | {res['seg_miou']:.1f} | "
        f"{res['depth_rmse']:.3f} | {dist} | {loss[0]} | {loss[1]} "
        f"| {sharp} | {token} | {favourites} | {seconds:.0f} s |"
    )


def teacher_rows(teachers):
    """Each teacher's linear probes on the students' scenes (teacher A's run, the 40-class
    task; `eval.py --backbone`): what the students distil from, the ceiling of their columns."""
    lines = []
    for name, path in zip("AB", teachers):
        argv = ["--checkpoint", teachers[0], "--backbone", path, "--seg-probe", "--depth-probe"]
        res = eval.main(eval.get_args_parser().parse_args(argv))
        cells = f"{res['seg_miou']:.1f} | {res['depth_rmse']:.3f} |" + " |" * 7
        lines.append(f"| teacher {name} | 0 | - | {cells}")
    return lines


def m2ot_rows(root, sizes, seeds):
    """M²oT's offline comparison (see the docstring): 4 students x seeds of teachers A and B."""
    teachers = [str(root / "dense" / "checkpoint.pt"), str(root / "m2ot-teacher" / "checkpoint.pt")]
    students = {
        "dense student": ["--method", "dense"],
        "M²oT": ["--method", "m2ot"],
        "M²oT, MAP form": ["--method", "m2ot", "--tas-form", "map"],
        "sparse MoE (--tas-coef 0)": ["--method", "m2ot", "--tas-coef", "0"],
    }

    # K = 2 as M²oT; fp32 teachers: bf16 made these CPU steps 2.7x slower (docs/m2ot.md)
    common = [
        *("--topk", "2", "--teachers", *teachers, "--epochs", str(sizes[4])),
        *("--teacher-dtype", "fp32"),
    ]
    lines = [
        "| student | seed | k-NN top-1 | seg mIoU | depth RMSE | L_dist A, B | L_tas | L_switch "
        "| preference sharpness L2 L4 L6 | per token | favourites A/B | wall |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|---|---|---:|",
        *teacher_rows(teachers),
    ]

    # every student, with every seed
    for i, (name, flags) in enumerate(students.items()):
        for seed in seeds:
            out = root / f"m2ot-student{i}-seed{seed}"
            seconds = run(out, sizes, *flags, *common, "--seed", seed)
            lines.append(m2ot_row(name, seed, out, seconds))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--all", action="store_true", help="also every other --method, M²oT")
    parser.add_argument("--m2ot", action="store_true", help="also M²oT's comparison")
    opts = parser.parse_args()

    # the size of every run, and the flags they share
    sizes = SIZES["quick" if opts.quick else "full"]
    root = Path(opts.output_dir)
    seed = ["--seed", opts.seed]
    teacher_epochs = ["--epochs", str(sizes[2])]
    student_epochs = ["--epochs", str(sizes[3])]
    start = time.time()
    times = {}  # run name -> wall time in seconds

    # the dense teacher, then V-MoE and TGR students (TGR guided by that teacher)
    times["dense"] = run(root / "dense", sizes, "--method", "dense", *teacher_epochs, *seed)
    times["vmoe"] = run(root / "vmoe", sizes, "--method", "vmoe", *student_epochs, *seed)
    teacher = ["--teacher", str(root / "dense" / "checkpoint.pt"), "--distill-until", "0.5"]
    times["tgr"] = run(root / "tgr", sizes, "--method", "tgr", *teacher, *student_epochs, *seed)
    # M²oT's second teacher (B), for the README's M²oT command and --m2ot; not in the table
    b_time = run(root / "m2ot-teacher", sizes, *M2OT_TEACHER, *teacher_epochs, *seed)

    # --all: every other method on the same data and schedule; --m2ot: M²oT's students
    others = [m for m in METHODS if m not in times] if opts.all else []
    for method in others:  # stablemoe freezes its router after half the epochs, like TGR's switch
        flags = ["--method", method, *student_epochs, *seed]
        flags += teacher if method == "teacher-route" else []
        times[method] = run(root / method, sizes, *flags)
    m2ot = m2ot_rows(root, sizes, ["0", "1"]) if opts.m2ot or opts.all else []

    # the table of the runs and how to read it, then M²oT's
    cf = f"top-K capacity factor 1.05 in training, {VMOE_EVAL_CF} at evaluation"
    print(
        f"\nmicro DeiT (MoE: E=8, K=1 in blocks 4 and 6; {cf}), {sizes[0]} generated 32x32 "
        f"images, seed {opts.seed}, {time.time() - start:.0f} s in all\n"
    )
    print(
        "| run | val top-1 | routing entropy L4 L6 | adjacent consistency L4 L6 | distilled "
        "epochs | wall |\n|---|---:|---|---|---:|---:|"
    )
    for name in times:
        print(row(name, root / name, times[name]))
    print(f"(and M²oT's second teacher, {root / 'm2ot-teacher'}: {b_time:.0f} s)")
    print(
        "\nentropy: H(expert use)/log E on the validation set, 1 = every expert equally used.\n"
        "consistency: share of a fixed watch set's tokens that keep their top-1 expert from\n"
        "one epoch to the next (mean over epochs 1..end).\n"
        "This is a demonstration of the pipeline on toy data, not a claim about the method:\n"
        "one seed and a few CPU minutes, far from the paper's 300 ImageNet epochs."
    )

    if m2ot:
        print(
            "\nM²oT, two teachers (A: the micro teacher above; B: tiny, patch 8, another task)"
            "; students micro,\nE=8, K=2, h=H/2, MoE in blocks 2 4 6, no labels; k-NN (k=20, "
            "T=0.07) on the 40-class task;\nseg mIoU (%), depth RMSE: linear probes on the "
            "frozen patch tokens, the same task's part masks\nand pseudo-depth (probe.py); "
            "losses: last epoch's training means\n"
        )
        print("\n".join(m2ot))

    # the routing of the TGR student, read by eval.py (figures only where matplotlib is installed)
    argv = ["--checkpoint", str(root / "tgr" / "checkpoint.pt")]
    if importlib.util.find_spec("matplotlib"):
        argv += ["--plots", str(root / "plots")]
    print(f"\n$ python eval.py {' '.join(argv)}")
    eval.cli(argv)


if __name__ == "__main__":
    main()
