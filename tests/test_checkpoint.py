"""checkpoint.py: a checkpoint's layout (DeiT's, then ours), a fresh run's start, the starting
weights' checks. Reading other projects' ViTs is tested against timm and torchvision in
tests/test_teacher.py; atomic saves and exact resume with train.py (tests/test_train.py)."""

import argparse
import json

import pytest
import torch

import checkpoint
from flags import UsageError, get_args_parser
from moe import build_model
from schedule import Switch

MICRO = dict(num_classes=10, img_size=32, patch_size=4)


def test_a_checkpoint_holds_deits_layout_then_ours(tmp_path):
    model = build_model("micro", "vmoe", num_experts=4, **MICRO)
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(base_lr=1e-3, model="micro")
    ours = dict(rng=[checkpoint.rng_state()], probe_prev=None, ref_assign=None)
    ours.update(teacher_router=None, teacher_args=None)
    state = checkpoint.training_state(
        model, optimizer, args, 2, 40, switch=Switch(done=True), model_ema=None, m2ot=None, **ours
    )
    deit = ["model", "optimizer", "lr_scheduler", "epoch", "scaler", "args"]
    assert list(state)[:6] == deit and state["epoch"] == 2 and state["step"] == 40
    assert set(state) == {*deit, "step", "switch", "model_args", "model_ema", "m2ot", *ours}
    assert state["switch"]["done"] and state["model_args"] == model.model_args
    checkpoint.save_checkpoint(tmp_path / "c.pt", state)
    again = torch.load(tmp_path / "c.pt", weights_only=True)  # plain containers and tensors only
    rebuilt, flags, _ = checkpoint.load_run(tmp_path / "c.pt", "cpu")
    assert again["args"] == vars(args) and flags.model == "micro" and not rebuilt.training


def test_a_fresh_run_starts_at_epoch_zero_with_a_new_log(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 0}) + "\n")
    assert checkpoint.restore(None, "", None, tmp_path, rank=1, world=2) == (0, 0, None, {})
    assert (tmp_path / "log.jsonl").exists()  # only rank 0 writes
    checkpoint.restore(None, "", None, tmp_path, rank=0, world=2)
    assert not (tmp_path / "log.jsonl").exists()


def test_the_starting_weights_are_checked_before_the_run(tmp_path):
    moe = build_model("micro", "vmoe", num_experts=4, **MICRO)
    torch.save({"model": moe.state_dict(), "args": {"method": "vmoe"}}, tmp_path / "moe.pt")
    args = get_args_parser().parse_args(["--upcycle", str(tmp_path / "moe.pt")])
    with pytest.raises(UsageError, match="not a train.py --method dense checkpoint"):
        checkpoint.read_starts(args, tmp_path)
    args = get_args_parser().parse_args(["--method", "tgr", "--finetune", str(tmp_path / "moe.pt")])
    with pytest.raises(UsageError, match="has no teacher router to continue TGR with"):
        checkpoint.read_starts(args, tmp_path)
    auto = get_args_parser().parse_args(["--resume", "auto"])
    assert checkpoint.read_starts(auto, tmp_path) == ("", None, None)  # nothing yet: fresh
