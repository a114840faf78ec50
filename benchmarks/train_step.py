"""What does the teacher cost? Images/s of one training step: dense, V-MoE, TGR.

The idea
--------
TGR adds, per training step, a forward pass of a frozen dense teacher up to its deepest
routed block, one small linear router per MoE layer and a KL. This script times a full
training step (forward, backward, AdamW step, through `train.compute_losses`, the code the
trainer runs) at DeiT-Tiny student shapes, 224x224, with a DeiT-III-S-sized teacher (random
weights, built by `moe.build_model("small", "dense")`, saved as a project checkpoint and
loaded by `teacher.load_teacher` like a real one):

* dense       DeiT-Ti, the baseline every time is divided by
* vmoe        V-MoE-Ti (E experts in blocks 8, 10, 12, K = 1, importance + load losses)
* tgr         TGR while distilling, teacher in fp32, and with `--teacher-dtype bf16`
* tgr-after   TGR after the switch: the teacher is gone, the step is V-MoE's

and projects the whole-run cost of TGR relative to V-MoE for a distillation fraction F:

    cost(F) = (F · t_tgr + (1 − F) · t_vmoe) / t_vmoe            (step time only)

    python benchmarks/train_step.py                      # 224², batch 16: minutes on 2 cores
    python benchmarks/train_step.py --device cuda --batch-size 128    # on a GPU (bf16 autocast)
    python benchmarks/train_step.py --quick              # micro at 32²: a smoke test
    python benchmarks/train_step.py --device cuda --batch-size 128 --compile  # whole step compiled

Decisions
---------
* Only the step is timed: no data loading, no evaluation. A real run also waits for its
  data; where that dominates, the teacher's forward hides behind it (see the README).
* Interleaved rounds (each round runs every variant once, in turn) and the median of
  `--repeats` rounds, so load from other processes on a shared machine hits all alike.
* On CUDA the student runs under bf16 autocast as in train.py, and the teacher defaults to
  bf16; the fp32 teacher row is kept for comparison.
* A step is what train.py's step does: a uint8 batch already on the device is normalised
  (`data.normalize`), then `train.compute_losses` (or, with `--compile`, its torch.compile'd
  self, as `train.py --compile`: student, losses, teacher and routers in one program),
  backward and AdamW. The untimed warm-up rounds take the compilation; the table's last
  column is the first step's time, what `--compile` costs at start-up (once per variant
  here; train.py compiles again at the TGR and StableMoE switch).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from data import normalize  # noqa: E402
from flags import resolve_defaults  # noqa: E402
from moe import build_model  # noqa: E402
from train import keep_freed_memory  # noqa: E402


def step_fn(variant, args, device, teacher_path):
    """A closure running one training step of `variant` on a fixed random batch."""
    method, dtype = {
        "dense": ("dense", None),
        "vmoe": ("vmoe", None),
        "tgr fp32 teacher": ("tgr", "fp32"),
        "tgr bf16 teacher": ("tgr", "bf16"),
        "tgr-after": ("tgr", None),
    }[variant]
    flags = [
        *("--model", args.model, "--method", method, "--experts", str(args.experts)),
        *("--img-size", str(args.img_size), "--patch-size", str(args.patch_size)),
        *("--teacher", teacher_path, "--teacher-dtype", dtype or "fp32"),
    ]
    targs = train.get_args_parser().parse_args(flags)
    resolve_defaults(targs)  # as train.main: K, E, balance coefficient of the method
    torch.manual_seed(0)
    model = train.build_student(targs, 1000).to(device)
    teacher = routers = None
    params = list(model.parameters())
    if dtype is not None:  # distilling: the teacher and its routers take part
        teacher, routers = train.build_teacher(targs, model, device, 1)
        params += list(routers.parameters())
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=1e-4, **fast)
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)  # as loaded
    targets = torch.randint(0, 1000, (args.batch_size,), device=device)
    cuda = device.type == "cuda"
    losses = torch.compile(train.compute_losses) if args.compile else train.compute_losses

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, teacher_loss, _ = losses(
                model, normalize(images), targets, targs, train.Guides(teacher, routers)
            )
        optimizer.zero_grad(set_to_none=True)
        (loss + teacher_loss).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    return step


VARIANTS = ["dense", "vmoe", "tgr fp32 teacher", "tgr bf16 teacher", "tgr-after"]


def get_args_parser():
    p = argparse.ArgumentParser("training-step benchmark: dense vs V-MoE vs TGR")
    p.add_argument("--model", default="tiny", help="student size")
    p.add_argument("--teacher-model", default="small", help="teacher size (DeiT-III-S: small)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is shown")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="micro student and teacher at 32²")
    p.add_argument("--compile", action="store_true", help="torch.compile each step (train.py's)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=VARIANTS,
        choices=VARIANTS,
        help="which steps to time (vmoe is always timed: the ratios need it)",
    )
    return p


def main(args):
    if args.quick:
        args.model, args.teacher_model, args.img_size, args.patch_size = "micro", "micro", 32, 4
        args.batch_size, args.repeats, args.experts = 8, 2, 8
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 16  # one compiled step per variant
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as train.py does on CPU
    with tempfile.TemporaryDirectory() as tmp:
        # a teacher with random weights in this project's checkpoint layout
        dense = build_model(args.teacher_model, "dense", 1000, args.img_size, args.patch_size)
        teacher_path = os.path.join(tmp, "teacher.pt")
        ckpt_args = {
            "model": args.teacher_model,
            "method": "dense",
            "img_size": args.img_size,
            "patch_size": args.patch_size,
            "num_classes": 1000,
        }
        torch.save({"model": dense.state_dict(), "args": ckpt_args}, teacher_path)
        variants = [v for v in VARIANTS if v in {*args.variants, "dense", "vmoe"}]
        steps = {v: step_fn(v, args, device, teacher_path) for v in variants}
    times = {v: [] for v in variants}  # round 0 is the first step: with --compile, compiling
    for _ in range(args.warmup + args.repeats):
        for v in variants:
            start = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - start)
    first = {v: t[0] for v, t in times.items()}  # the start-up cost (compilation, autotuning)
    med = {v: statistics.median(t[args.warmup :]) for v, t in times.items()}

    where = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    )
    mode = "compiled" if args.compile else "eager"
    print(
        f"student {args.model} (E={args.experts}, K=1), teacher {args.teacher_model} (random "
        f"weights), {args.img_size}², batch {args.batch_size}, {where}, {mode}, median of "
        f"{args.repeats}\n"
    )
    print("| step | images/s | time vs dense | time vs V-MoE | first step (s) |")
    print("|---|---:|---:|---:|---:|")
    for v in variants:
        ips, dense, vmoe = args.batch_size / med[v], med[v] / med["dense"], med[v] / med["vmoe"]
        print(f"| {v} | {ips:.1f} | {dense:.2f}x | {vmoe:.2f}x | {first[v]:.1f} |")
    if "tgr-after" in med:
        print("\nprojected whole-run training time of TGR relative to V-MoE (step time only):")
    for name in [v for v in ("tgr fp32 teacher", "tgr bf16 teacher") if v in med]:
        for f in (1.0, 0.5) if "tgr-after" in med else ():
            cost = (f * med[name] + (1 - f) * med["tgr-after"]) / med["vmoe"]
            print(f"  {name}, --distill-until {f}: {cost:.2f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
