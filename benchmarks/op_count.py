"""How many ops does a layer issue? A count from the profiler, a proxy for GPU kernel launches.

The idea
--------
A GPU runs each PyTorch op as one or more kernels, and launching one costs the host a few
microseconds whatever the kernel does. A layer made of many small ops (routing arithmetic,
index bookkeeping) therefore takes longer on a GPU than its FLOPs say, and no CPU timing
shows it. Counting the ops does, on any machine: `torch.profiler` records every aten op the
dispatcher runs, with the op that called it (`cpu_parent`).

Three numbers, for the forward and for forward + backward (`y.sum().backward()`):

* **top-level**: ops called by Python (forward) or by the autograd engine (backward), not by
  another aten op. `linear` counts once, the `t` and `mm` it calls do not.
* **of which work**: top-level ops that do some, or call one that does: not a view, a
  reshape that is a view, a bare allocation or a dtype no-op (`NO_WORK`). Views cost no
  kernel on a GPU; these are the ops a faster layer has to remove.
* **all**: every aten op, nested ones included (the 314 of the MoE layer before its rewrite,
  `docs/benchmarks.md`).

Decisions
---------
* Counted after one untraced call (first calls may set things up), with fresh gradient
  leaves (no `add_` into an existing `.grad`), under bf16 autocast on a GPU as `train.py`
  runs, on whatever device the inputs are on: the profiler sees the host side of each op.
* The count is exact and the same on every run of the same code and torch version; nested
  ops ("all") may move between torch versions, the top-level ones only with our code.
"""

import torch

# ops that only make a view, allocate or check: no work of their own (no kernel on a GPU)
NO_WORK = {
    f"aten::{n}"
    for n in "view reshape _reshape_alias _unsafe_view unsqueeze squeeze transpose t slice "
    "select expand expand_as permute as_strided alias detach flatten empty empty_like "
    "empty_strided new_empty to lift_fresh contiguous view_as conj resolve_conj resolve_neg "
    "is_same_size".split()
}


def op_counts(mlp, x):
    """Aten ops of y = mlp(x)[0] (fwd) and of y.sum().backward() (fwd+bwd).

    Returns (fwd top-level, of which work), (fwd+bwd top-level, of which work), fwd+bwd all.
    """
    is_aten = lambda e: e is not None and e.name.startswith("aten::")

    def works(e):  # an op, or one it calls, that is not a view, allocation or no-op
        return e.name not in NO_WORK or any(works(c) for c in e.cpu_children if is_aten(c))

    def count(backward):
        x_ = x.detach().requires_grad_()  # a fresh leaf: no gradient to accumulate into
        for p in mlp.parameters():
            p.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            mlp(x_)  # once untraced
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                y = mlp(x_)[0]
                if backward:
                    y.sum().backward()
        aten = [e for e in p.events() if is_aten(e)]
        top = [e for e in aten if not is_aten(e.cpu_parent)]  # called by Python or autograd
        return len(top), sum(map(works, top)), len(aten)

    both = count(backward=True)
    return count(backward=False)[:2], both[:2], both[2]


def op_cells(counts):
    """Table cells: "top-level (work)" forward, the same forward+backward, and all."""
    (fwd, fwd_work), (both, both_work), every = counts
    return [f"{fwd} ({fwd_work})", f"{both} ({both_work})", str(every)]
