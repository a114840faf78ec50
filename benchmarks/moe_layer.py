"""How fast is one sparse MoE layer? Forward+backward time against a dense MLP and two textbooks.

The idea
--------
A top-K MoE layer runs K expert MLPs per token, so its FLOPs equal those of a dense MLP with
K times the hidden width (the same *active* parameters per token). Whether it also costs the
same *time* depends on how tokens travel to their experts. This script times one layer at
DeiT-Tiny shapes (D=192, H=768, 32 images x 197 tokens) four ways, all computing the same
function from the same stacked weights w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D):

* **ours**, `moe.MoEMLP`: one index_select into an (E, G·C, D) buffer, two batched matmuls,
  one weighted index_add_ back (train mode, cf 1.05, router noise on, groups of 8 images).
* **loop over experts** (textbook 1): for e in range(E), gather the tokens routed to e, run
  MLP_e, add the weighted outputs back. Obvious, exact, no padding, but E small matmuls and
  E Python iterations.
* **one-hot einsum** (textbook 2, GShard / V-MoE): a dispatch tensor (G, S, E, C) with a 1
  where token s sits in slot c of expert e, and a combine tensor of the same shape holding
  the combine weight; dispatch and combine are einsums. Its size is S·E·C ≈ K·cf·S² per group:
  quadratic in the group size, which is why GShard and V-MoE route in groups.
* **one-hot einsum, ungrouped** (textbook 3): the same with one group of all B images, which
  makes the quadratic term T² instead of T·S.

Every time is reported as a ratio to a dense MLP fc1 -> GELU -> fc2 of hidden width K·H
(`vit.Mlp`) timed in the same run, so K=2 is compared with a 2x wider MLP. The padding
column says how much of the expert buffer is empty: the buffer has G·C·E rows for K·T
assignments, because capacity C = ceil(K·S·cf/E) is rounded up to a multiple of 4 and every
expert gets C rows per group.

Three more columns count the aten ops ours issues (`op_count.py`: top-level, in brackets
those that do work, and all): a GPU launches a kernel per op, so many small routing ops cost
time that FLOPs do not show, and the count measures that on any machine.

    python benchmarks/moe_layer.py                       # full table, ~5 min on 2 idle cores
    python benchmarks/moe_layer.py --threads 1 --clock cpu   # the same on a busy machine
    python benchmarks/moe_layer.py --glibc-default       # malloc left as it is (see below)
    python benchmarks/moe_layer.py --quick               # tiny shapes, a smoke test (seconds)
    python benchmarks/moe_layer.py --ops-only --experts 16 128   # op counts only (seconds)
    python benchmarks/moe_layer.py --device cuda --batch 256 --experts 16 128 --topk 1

Decisions
---------
* All variants share the router, `MoEMLP.route` (same noise, same drops); the textbook ones
  differ only in dispatch / experts / combine. The one-hot einsum is the layer's own
  `MoEMLP.forward_one_hot`, the version moe.py shows before the fast one. At start-up of
  every (K, E) each textbook output and input gradient is checked against ours (same seed,
  so the same router noise) to 1e-4 relative to the output's scale; the run stops if one
  differs.
* The ungrouped one-hot variant routes with one group (capacity over all T tokens); it is
  therefore checked against ours run with `group_size = B`, which computes that function.
* Loop over experts uses `w1.unbind(0)` once, which behaves like a ModuleList of E separate
  experts; indexing `w1[e]` inside the loop would make autograd allocate a full (E, D, H)
  gradient per expert and measure an artefact, not the textbook.
* Timing: warm-up rounds, then `--repeats` rounds; each round runs every variant once in
  turn (dense, ours, loop, one-hot, ...) so load from other processes on a shared machine
  hits all of them alike; the median per variant is reported. Gradients are set to None
  between steps (what `optimizer.zero_grad()` does); the loss is the sum of the output.
* Wall-clock times with several threads mean something only on an idle machine: when another
  process holds a core, every OpenMP region waits for a time slice, which punishes many small
  ops far more than a few big matmuls. `--threads 1 --clock cpu` measures this thread's CPU
  time instead (memory bandwidth is still shared); the header prints the load average.
* The ungrouped one-hot einsum costs ~10-20x dense at every E (its tensors are (T, E, C)
  with E·C ≈ K·cf·T), so by default it is timed only up to E=32 (`--ungrouped-max-experts`).
* `--device cuda`: the forward runs under bf16 autocast (as `train.py` on a GPU), each
  timing ends with `torch.cuda.synchronize()`, and ours and dense are also timed compiled
  (`torch.compile`, `--compile-mode`; `--no-compile` skips it), as a ratio to the compiled
  dense MLP. The textbook check runs in fp32 before, its 1e-4 needs no bf16 slack.
* malloc: like `train.py` on CPU, the script first calls `train.keep_freed_memory` (glibc:
  no fresh mmap pages for tensors above 32 MiB), so the table is what a training run gets.
  `--glibc-default` skips it: then the (E, D, H) weight gradients at E=128 are page-faulted
  and zeroed on every step, an allocator cost (not jemalloc's) that is not the layer's.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from op_count import op_cells, op_counts  # noqa: E402

from moe import MoEMLP  # noqa: E402
from router import capacity_for, group_size_for  # noqa: E402
from train import keep_freed_memory  # noqa: E402
from vit import Mlp  # noqa: E402

# Letters: B images, N tokens per image, D width, H hidden, E experts, K top-k, G groups,
# S tokens per group, C capacity per expert and group, T = B·N tokens.


# ----------------------------------------------------------------------------- routing
def num_groups_of(layer: MoEMLP, batch: int) -> int:
    return batch // group_size_for(batch, layer.group_size)


# ----------------------------------------------------------------------------- textbook 1
def loop_over_experts(layer: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_k g_{t,k} · MLP_{e_{t,k}}(x_t), one expert at a time."""
    B, N, D = x.shape
    tokens = x.reshape(B * N, D)  # (T, D)
    r = layer.route(tokens, B)  # the layer's own router: the same noise, the same drops
    # one view per expert, like a ModuleList of E MLPs (see the module docstring)
    w1, b1, w2, b2 = (p.unbind(0) for p in (layer.w1, layer.b1, layer.w2, layer.b2))
    y = torch.zeros_like(tokens)  # (T, D)
    for e in range(layer.num_experts):
        # the (token, choice) pairs that chose expert e and were not dropped
        tok, choice = torch.nonzero(r.experts.eq(e) & r.kept, as_tuple=True)  # (n_e,), (n_e,)
        h = F.gelu(tokens[tok] @ w1[e] + b1[e])  # (n_e, H)
        out = h @ w2[e] + b2[e]  # (n_e, D)
        y.index_add_(0, tok, out * r.weights[tok, choice].unsqueeze(1))  # (T, D)
    return y.view(B, N, D)  # (B, N, D)


# ----------------------------------------------------------------------------- textbook 2 and 3
def one_hot_ungrouped(layer: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """`MoEMLP.forward_one_hot` (GShard's dispatch and combine tensors) with one routing group
    of all B images: its (T, E, C) tensors grow with T², not T·S."""
    group_size = layer.group_size
    layer.group_size = x.shape[0]
    try:
        return layer.forward_one_hot(x)[0]
    finally:
        layer.group_size = group_size


# ----------------------------------------------------------------------------- set-up
def variants(layer: MoEMLP, dense: nn.Module, batch: int, ungrouped: bool):
    """name -> function x -> y, in the order each timing round runs them."""
    fns = {
        "dense": lambda x: dense(x)[0],  # vit.Mlp, the block's dense MLP, returns (y, None)
        "ours": lambda x: layer(x)[0],
        "loop": lambda x: loop_over_experts(layer, x),
        "onehot": lambda x: layer.forward_one_hot(x)[0],
    }
    if ungrouped:
        fns["ungrouped"] = lambda x: one_hot_ungrouped(layer, x)
    return fns


def check_equal(layer: MoEMLP, fns, x: torch.Tensor, seed: int = 0):
    """Every textbook variant must give ours's output and input gradient (same router noise)."""

    def run(fn):
        torch.manual_seed(seed)  # the router noise is the first random draw of every variant
        x.grad = None
        y = fn(x)
        y.sum().backward()
        return y.detach(), x.grad.clone()

    refs = {"loop": run(fns["ours"])}
    refs["onehot"] = refs["loop"]
    if "ungrouped" in fns:  # ours with one group of all B images computes that function
        group_size, layer.group_size = layer.group_size, x.shape[0]
        refs["ungrouped"] = run(fns["ours"])
        layer.group_size = group_size
    for name, ref in refs.items():
        got = run(fns[name])
        for what, a, b in zip(("output", "input gradient"), got, ref):
            err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
            if not err <= 1e-4:
                raise SystemExit(
                    f"error: textbook variant {name!r} differs from moe.MoEMLP in its {what} "
                    f"(max relative difference {err:.2e} > 1e-4, E={layer.num_experts}, "
                    f"K={layer.k}); the timings would not compare the same function"
                )


def padding(layer: MoEMLP, batch: int, tokens: int):
    """(C, buffer rows G·C·E, fraction of rows that are padding) for top-K with capacity."""
    G = num_groups_of(layer, batch)
    S = batch * tokens // G
    E, K = layer.num_experts, layer.k
    C = capacity_for(S, E, K, layer.capacity_factor)  # ceil(K·S·cf/E), up to a multiple of 4
    rows = G * C * E
    return C, rows, 1 - K * batch * tokens / rows


def time_round(fns, x, params, times, clock=time.perf_counter):
    """One timing round: each variant's forward + backward once, in turn (ABCABC...)."""
    cuda = x.device.type == "cuda"
    for name, fn in fns.items():
        for p in params:
            p.grad = None
        x.grad = None
        if cuda:  # a GPU runs behind the host: time from an idle card to an idle card
            torch.cuda.synchronize()
        start = clock()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):  # as train.py
            y = fn(x)
        y.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times[name].append(clock() - start)


def compiled(fns, mode):
    """Ours and dense through torch.compile, timed beside the eager ones."""
    torch._dynamo.reset()  # fresh caches: the same lambda recompiled per E would hit the limit
    opts = dict(mode=mode, dynamic=False)
    return {f"{n} compiled": torch.compile(fns[n], **opts) for n in ("dense", "ours")}


# ----------------------------------------------------------------------------- main
def get_args_parser():
    p = argparse.ArgumentParser("MoE layer benchmark", add_help=True)
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--topk", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=10, help="timed rounds; the median is shown")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (196 + CLS)")
    p.add_argument("--dim", type=int, default=192, help="D (DeiT-Tiny)")
    p.add_argument("--hidden", type=int, default=768, help="H per expert (DeiT-Tiny)")
    p.add_argument("--capacity-factor", type=float, default=1.05)
    p.add_argument("--group-size", type=int, default=8, help="images per routing group")
    p.add_argument("--noise-std", type=float, default=1.0, help="σ; the router adds σ/E")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all CPUs)")
    ungrouped = "time the ungrouped one-hot einsum only up to this E ('-' above: ~10-20x dense)"
    p.add_argument("--ungrouped-max-experts", type=int, default=32, help=ungrouped)
    p.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc alone")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=None,
        help="cpu: this thread's CPU time, for a shared machine (needs --threads 1); default "
        "wall, cpu with --quick",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    compile_help = "also time ours and dense compiled (default: with --device cuda)"
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help=compile_help)
    p.add_argument("--compile-mode", default="default", help="torch.compile's mode")
    p.add_argument("--ops-only", action="store_true", help="only count ops: no timing (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test in seconds")
    return p


def check_args(p, args):
    if args.quick:  # D=32, H=64, 4 images of 17 tokens, groups of 2 images
        args.dim, args.hidden, args.batch, args.tokens, args.group_size = 32, 64, 4, 17, 2
        args.experts, args.topk, args.repeats, args.warmup = [4, 8], [1, 2], 2, 1
        # tiny ops gain nothing from threads, and OpenMP threads that must wait for a CPU
        # another process holds make each op cost a scheduler time slice
        args.threads = args.threads or 1
    args.threads = args.threads or os.cpu_count()
    args.clock = args.clock or ("cpu" if args.quick and args.threads == 1 else "wall")
    if args.clock == "cpu" and args.threads != 1:
        # CPU-side autograd runs in the calling thread, so with one thread its CPU time is the
        # whole step, minus the time other processes held the CPU
        p.error("--clock cpu measures one thread: add --threads 1")
    for name in ("repeats", "batch", "tokens", "dim", "hidden", "group_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.capacity_factor <= 0 or args.noise_std < 0:
        p.error("--warmup and --noise-std must be >= 0 and --capacity-factor > 0")
    if min(args.topk) < 1 or max(args.topk) > min(args.experts):
        p.error(f"every --topk must lie in 1..{min(args.experts)} (the smallest --experts)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("moe_layer.py: --device cuda, but torch sees no CUDA device here")
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu measures the host thread, not the GPU: use the wall clock")
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1: the first call compiles")


def measure(args, K, E):
    """Check the textbooks, then time every variant: {name: median seconds}, and op counts."""
    B, N, D, H, device = args.batch, args.tokens, args.dim, args.hidden, args.device
    opts = dict(capacity_factor=args.capacity_factor, noise_std=args.noise_std)
    layer = MoEMLP(D, H, E, k=K, group_size=args.group_size, **opts).train().to(device)
    dense = Mlp(D, K * H).to(device)  # fc1 -> GELU -> fc2, hidden K·H: same active parameters
    x = torch.randn(B, N, D, device=device, requires_grad=True)  # the LN2 output an MLP reads
    result = dict(padding=padding(layer, B, N), times={})
    result["ops"], result["dense ops"] = op_counts(layer, x), op_counts(dense, x)
    if args.ops_only:
        return result
    fns = variants(layer, dense, B, ungrouped=E <= args.ungrouped_max_experts)
    check_equal(layer, fns, x, seed=args.seed)  # fp32: no autocast outside time_round
    if args.compile:
        fns.update(compiled(fns, args.compile_mode))
    params = [*layer.parameters(), *dense.parameters()]
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times = {name: [] for name in fns}
    for _ in range(args.warmup):  # the first compiled call compiles
        time_round(fns, x, params, {name: [] for name in fns}, clock)
    for _ in range(args.repeats):
        time_round(fns, x, params, times, clock)
    result["times"] = {name: statistics.median(t) for name, t in times.items()}
    return result


def main(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kept = not args.glibc_default and keep_freed_memory()  # as train.py does on CPU
    B, N, D, H = args.batch, args.tokens, args.dim, args.hidden
    on = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    print(
        f"# one MoE layer, forward+backward, x: ({B}, {N}, {D}), H={H}, cf {args.capacity_factor}"
        f", noise σ={args.noise_std}, groups of {args.group_size} images\n# torch "
        f"{torch.__version__} on {on}{', bf16 autocast' if args.device == 'cuda' else ''}, "
        f"{args.clock} clock, median of {args.repeats} rounds, malloc "
        f"{'keeps freed memory' if kept else 'default'}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start\n"
    )
    names = {
        "ours": "ours",
        "loop": "loop over experts",
        "onehot": f"one-hot einsum, groups of {args.group_size}",
        "ungrouped": f"one-hot einsum, 1 group of {B}",
    }
    extra = ["dense compiled ms", "ours compiled"] if args.compile else []
    ops = ["ops fwd (work)", "ops fwd+bwd (work)", "all ops fwd+bwd"]
    results = {}  # (K, E) -> measure's result
    for K in args.topk:
        print(f"## K={K}: time / dense MLP with hidden {K}·H = {K * H} (same active parameters)\n")
        cols = ["E", *ops] if args.ops_only else ["E", "C", "buffer rows (padding)", "dense ms"]
        cols += [] if args.ops_only else [*names.values(), *extra, *ops]
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---:" for _ in cols) + "|")
        for E in args.experts:
            result = results[K, E] = measure(args, K, E)
            print("| " + " | ".join([str(E), *row_cells(args, names, result)]) + " |", flush=True)
        dense_ops = op_cells(result["dense ops"])
        print(f"\ndense MLP: ops fwd {dense_ops[0]}, fwd+bwd {dense_ops[1]}, all {dense_ops[2]}")
        lo, hi = min(args.experts), max(args.experts)
        if lo != hi and not args.ops_only:
            t_hi, t_lo = results[K, hi]["times"], results[K, lo]["times"]
            r = t_hi["ours"] / t_lo["ours"]
            rr = (t_hi["ours"] / t_hi["dense"]) / (t_lo["ours"] / t_lo["dense"])
            print(f"ours, E={hi} / E={lo}: {r:.2f}x in time ({rr:.2f}x in ratio to dense)")
        print()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def row_cells(args, names, result):
    """The cells of one table row after E: capacity, padding, time ratios, op counts."""
    if args.ops_only:
        return op_cells(result["ops"])
    (C, rows, pad), med = result["padding"], result["times"]
    cells = [str(C), f"{rows} ({100 * pad:.0f}%)", f"{1e3 * med['dense']:.1f}"]
    cells += [f"{med[n] / med['dense']:.2f}x" if n in med else "-" for n in names]
    if args.compile:  # compiled ours against the compiled dense MLP
        dense_c = med["dense compiled"]
        cells += [f"{1e3 * dense_c:.1f}", f"{med['ours compiled'] / dense_c:.2f}x"]
    return cells + op_cells(result["ops"])


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    main(args)
