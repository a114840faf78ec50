"""The benchmark scripts run (speed is measured by them, never asserted here).

`--quick` runs tiny shapes; the MoE-layer script also checks at start-up that both
textbook implementations compute the same outputs and gradients as moe.MoEMLP, and exits
non-zero if one differs, so this smoke test fails on a wrong textbook or a wrong layer.
The MoE layer's aten-op count, a count and not a timing, has an upper bound.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe import MoEMLP
from vit import Mlp

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # op_count.py, as moe_layer.py imports it
from op_count import op_counts  # noqa: E402


@pytest.mark.parametrize(
    "script, flags, expected",
    [
        ("moe_layer.py", ["--repeats", "2"], ["| E |", "loop over experts"]),
        ("train_step.py", ["--threads", "1"], ["| tgr bf16 teacher |", "--distill-until 0.5"]),
        ("data_loader.py", [], ["| 1 |", "12 kB vs 49 kB"]),  # uint8 is a quarter of float32
    ],
)
def test_benchmark_runs_quick(script, flags, expected):
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(text in out.stdout for text in expected), out.stdout[-2000:]


# upper bounds: (fwd top-level, of which work), (fwd+bwd top-level, of which work), fwd+bwd
# all; the same at every E; 2 threads (docs/benchmarks.md, "Fewer, larger ops")
OPS_PIN = {1: ((50, 29), (95, 51), 262), 2: ((50, 31), (95, 53), 269)}


@pytest.mark.parametrize("k", [1, 2])
def test_moe_layer_issues_no_more_ops_than_pinned(k):
    """On a GPU each op that does work is a kernel launch: routing glue added to moe.py or
    router.py fails here. Lower counts are welcome; then lower the pin. Nested ops ("all")
    can move with a torch release: re-measure with `benchmarks/moe_layer.py --ops-only`."""
    torch.manual_seed(0)
    x = torch.randn(32, 197, 192)  # the benchmark's DeiT-Tiny shapes, groups of 8 images
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a parallel reduction nests a few more ops than a serial one
    try:
        assert op_counts(Mlp(192, 768), x)[0] == (3, 3)  # the counter: linear, gelu, linear
        counts = {E: op_counts(MoEMLP(192, 768, E, k=k).train(), x) for E in (16, 128)}
    finally:
        torch.set_num_threads(threads)
    (pin_fwd, pin_fwd_work), (pin_both, pin_both_work), pin_every = OPS_PIN[k]
    for got in counts.values():
        (fwd, fwd_work), (both, both_work), every = got
        assert fwd <= pin_fwd and fwd_work <= pin_fwd_work, counts
        assert both <= pin_both and both_work <= pin_both_work, counts
        assert every <= pin_every, counts
