"""demo.py and the README's commands: the quick demo runs, and every `python …` line of the
README runs as written on its outputs, so that a newcomer's path cannot rot.

The README's lines point at runs/demo/; here they point at the quick demo's folder, its
/path/to/images at a small generated ImageFolder, and each train.py line gets the README's own
quick-try flags (`QUICK_TRY`, which the README names). `torchrun` lines need GPUs and data sets
and are not run.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUICK_TRY = "--epochs 1 --batch-size 16 --synthetic-train-size 128 --synthetic-val-size 64"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = [sys.executable, "demo.py", "--quick", "--all", "--output-dir", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_quick(demo):
    out, printed = demo
    for name in ("dense student", "M²oT", "sparse MoE (--tas-coef 0)"):  # --all: M²oT's rows too
        assert printed.count(f"| {name} |") == 2  # two seeds
    for name in ("dense", "vmoe", "tgr", "expert-choice", "softmoe", "stablemoe", "zloss"):
        assert f"| {name} |" in printed and (out / name / "log.jsonl").is_file()
    assert "| teacher-route |" in printed  # the teacher router routes (upper bound) ...
    assert "| teacher-route, student's route |" in printed  # ... and the student's does
    assert "not a claim" in printed
    assert (out / "m2ot-teacher" / "checkpoint.pt").is_file()  # the README's M²oT command's B
    assert f"wrote {out / 'plots'}" in printed  # eval.py --plots says what it wrote


def readme_commands():
    """The README's `python …` lines, in order, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("python "):
                lines.append(" ".join(line.split()))
    return lines


def image_folder(root, classes=("cat", "dog"), per_class=(8, 2)):
    """/path/to/images for the README's own-images line: train/ and val/, the same classes."""
    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8, generator=g)
                Image.fromarray(pixels.numpy()).save(root / split / c / f"{i}.jpg")
    return root


def test_the_readme_names_its_quick_flags_and_has_commands_to_run():
    assert QUICK_TRY in " ".join(README.split())  # the only flags added are the README's own
    commands = readme_commands()
    assert any(c.startswith("python eval.py") for c in commands)
    assert any("--teachers" in c for c in commands) and any("--data folder" in c for c in commands)


def test_every_readme_python_line_runs_as_written(demo, tmp_path):
    out, _ = demo
    images = image_folder(tmp_path / "images")
    for i, line in enumerate(readme_commands()):
        line = line.replace("runs/demo", str(out)).replace("/path/to/images", str(images))
        argv = [sys.executable, *shlex.split(line)[1:]]
        if argv[1] == "train.py":
            argv += QUICK_TRY.split()
            if "--output-dir" not in argv:  # its default, runs/MODEL-METHOD, is inside the repo
                argv += ["--output-dir", str(tmp_path / f"run{i}")]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
