"""The benchmark scripts run (speed is measured by them, never asserted here).

`--quick` runs tiny shapes; the MoE-layer script also checks at start-up that both
textbook implementations compute the same outputs and gradients as moe.MoEMLP, and exits
non-zero if one differs, so this smoke test fails on a wrong textbook or a wrong layer.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_moe_layer_benchmark_quick():
    out = subprocess.run(
        [sys.executable, "benchmarks/moe_layer.py", "--quick", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| E |" in out.stdout and "loop over experts" in out.stdout


def test_train_step_benchmark_quick():
    out = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--quick", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| tgr bf16 teacher |" in out.stdout and "--distill-until 0.5" in out.stdout
