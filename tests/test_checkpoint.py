"""checkpoint.py: a checkpoint's layout (DeiT's, then ours), a fresh run's start, the starting
weights' checks. Reading other projects' ViTs is tested against timm and torchvision in
tests/test_teacher.py; atomic saves and exact resume with train.py (tests/test_train.py)."""

import argparse
import json

import pytest
import torch

import checkpoint
from errors import UsageError
from flags import get_args_parser
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
    """`restore` only reads; `start_run_folder` writes args.json and cuts the log back to the
    epochs before the start (all of them for a fresh run)."""
    lines = [json.dumps({"epoch": e}) + "\n" for e in range(3)]
    (tmp_path / "log.jsonl").write_text("".join(lines))
    assert checkpoint.restore(None, "", None, tmp_path, rank=0, world=2) == checkpoint.Progress()
    assert (tmp_path / "log.jsonl").read_text() == "".join(lines)  # restore writes nothing
    args = get_args_parser().parse_args(["--model", "micro"])
    checkpoint.start_run_folder(tmp_path, args, start_epoch=2)  # a resume at epoch 2
    assert (tmp_path / "log.jsonl").read_text() == "".join(lines[:2])
    assert json.loads((tmp_path / "args.json").read_text())["model"] == "micro"
    checkpoint.start_run_folder(tmp_path, args, start_epoch=0)  # a fresh run
    assert (tmp_path / "log.jsonl").read_text() == ""


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
    torch.save({"model": moe.state_dict()}, tmp_path / "checkpoint.pt")  # now a run is there
    with pytest.raises(UsageError, match="holds a run .* --overwrite"):
        checkpoint.read_starts(get_args_parser().parse_args([]), tmp_path)
    overwrite = get_args_parser().parse_args(["--overwrite"])
    assert checkpoint.read_starts(overwrite, tmp_path) == ("", None, None)
