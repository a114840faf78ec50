"""The benchmark scripts run (speed is measured by them, never asserted here).

`--quick` runs tiny shapes; the MoE-layer script also checks at start-up that both
textbook implementations compute the same outputs and gradients as moe.MoEMLP, and exits
non-zero if one differs, so this smoke test fails on a wrong textbook or a wrong layer.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(text in out.stdout for text in expected), out.stdout[-2000:]
