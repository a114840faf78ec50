"""experiments/tgr_claims.py: the study's plumbing in its --quick mode (seconds), its statistics
by hand, and that a finished run is never trained again (a killed study resumes)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import m2ot_split  # noqa: E402
import tgr_claims  # noqa: E402


def test_interval_and_paired_differences_by_hand():
    m, h, n = tgr_claims.interval([1.0, 2.0, 3.0, None])
    # mean 2, s = 1, t_{0.975, 2} = 4.303: half-width 4.303 / √3
    assert (m, n) == (2.0, 3) and h == pytest.approx(4.303 / math.sqrt(3))
    assert tgr_claims.interval([5.0]) == (5.0, None, 1)
    runs = {
        "a": {0: {"top1": 10.0}, 1: {"top1": 12.0}, 2: {"top1": 11.0}},
        "b": {0: {"top1": 9.0}, 1: {"top1": 10.0}},  # seed 2 missing: left out of the pairs
    }
    m, h, n = tgr_claims.paired(runs, "a", "b", "top1")
    # differences 1 and 2: s = 1/√2, so s/√2 = 1/2
    assert (m, n) == (1.5, 2) and h == pytest.approx(12.706 * 0.5)


def test_quick_study_writes_tables_json_and_resumes(tmp_path, capsys):
    doc = tmp_path / "evidence.md"
    markers = f"{tgr_claims.BEGIN}\nold\n{tgr_claims.END}"
    doc.write_text(f"# Evidence\n\nhand-written text\n\n{markers}\n\nverdicts\n")
    argv = [
        *("--quick", "--settings", "fast", "--threads", "1", "--out", str(tmp_path / "runs")),
        *("--doc", str(doc), "--results", str(tmp_path / "r.json"), "--figure", ""),
    ]
    results = tgr_claims.main(tgr_claims.get_args_parser().parse_args(argv))
    printed = capsys.readouterr().out
    assert printed.count("fast vmoe seed") == 2 and "fast tgr-random seed 1" in printed
    arms = results["fast"]["arms"]
    assert set(arms) == {"vmoe", "tgr", "tgr-random", "vmoe-ent-match", "lossfree"}
    assert arms["tgr"]["top1"]["n"] == 2 and arms["tgr"]["adj"]["mean"] is not None
    assert "tgr - tgr-random" in results["fast"]["diffs"]
    assert "tgr - vmoe-ent-match" in results["fast"]["diffs"]
    flags = json.loads((tmp_path / "runs/fast/vmoe-ent-match/seed0/args.json").read_text())
    assert flags["student_entropy_coef"] == tgr_claims.SETTINGS["fast"]["entropy_match"]
    assert json.loads((tmp_path / "r.json").read_text())["fast"]["teachers"].keys() == {
        "teacher",
        "strong",
    }
    text = doc.read_text()
    assert "hand-written text" in text and "verdicts" in text and "old" not in text
    assert "| tgr − vmoe | 2 |" in text and "| tgr-random | 2 |" in text
    summary = json.loads((tmp_path / "runs/fast/tgr/seed0/summary.json").read_text())
    assert len(summary["final_curve"]) == 2 and summary["final_curve"][-1] == 1.0
    assert 0 <= summary["still_changing_50"] <= 1 and len(summary["margin"]) == 4

    tgr_claims.main(tgr_claims.get_args_parser().parse_args(argv))  # every run is cached
    assert "seed" not in capsys.readouterr().out
    run = tmp_path / "runs/fast/tgr/seed0"
    tgr_claims.main(tgr_claims.get_args_parser().parse_args(["--runs", str(run)]))
    line = capsys.readouterr().out.splitlines()[-1]  # any train.py run, read the same way
    assert line.startswith(f"| {run} | {summary['top1']:.3f} |")


def test_m2ot_split_quick_writes_tables_json_and_resumes(tmp_path, capsys):
    doc = tmp_path / "split.md"
    doc.write_text(f"# Split\n\nby hand\n\n{m2ot_split.BEGIN}\nold\n{m2ot_split.END}\n")
    argv = ["--quick", "--threads", "1", "--out", str(tmp_path / "runs")]
    argv += ["--doc", str(doc), "--results", str(tmp_path / "r.json")]
    results = m2ot_split.main(m2ot_split.get_args_parser().parse_args(argv))
    printed = capsys.readouterr().out
    assert printed.count("toy E4 K2") == 6  # 3 arms, 2 seeds
    assert printed.count("students trained") == 3  # 3 arms, 1 seed
    control = results["toy"]["E4-K2 control-fixed-pi"][0]
    assert {"causal", "representational", "dist"} <= set(control)
    student = results["students"]["trained control-fixed-pi"][0]
    assert len(student["representational"]) == 3 and len(student["distances"]) == 3
    assert student["seg"] is not None and student["knn"] is not None
    text = doc.read_text()
    assert "by hand" in text and "old" not in text and "| E4-K2 | control (fixed π) |" in text
    assert "| trained | V0 (λ_1 0) |" in text

    m2ot_split.main(m2ot_split.get_args_parser().parse_args(argv))  # every run is cached
    assert "toy E4" not in capsys.readouterr().out
