"""schedule.py: when distillation stops (the fraction's ceiling, the adaptive rule), the line
that says so, the decision's edge cases, and the LR schedule against its closed form. What the
switch does to a run is tested with train.py (tests/test_train.py)."""

import math

import pytest

from flags import get_args_parser
from schedule import (
    Switch,
    decide_switch,
    describe_schedule,
    distill_epochs,
    initial_switch,
    lr_at,
    switch_due,
)


def parse(flags):
    return get_args_parser().parse_args(flags.split())


@pytest.mark.parametrize(
    "until, epochs, distilled", [("0.5", 1, 1), ("0.5", 5, 3), ("0.3", 10, 3), ("0.01", 3, 1)]
)
def test_distilling_epochs_are_the_ceiling_of_the_fraction(until, epochs, distilled):
    """ceil(F·epochs), at least one epoch whenever F > 0 (round() gave 0 and 2 at first)."""
    args = parse(f"--distill-until {until} --epochs {epochs}")
    assert distill_epochs(args) == distilled
    line = describe_schedule(args, initial_switch(args))
    assert line == f"distilling epochs 0–{distilled - 1} of {epochs}"


def test_the_line_of_a_run_without_distillation_and_of_one_resumed_after_the_switch():
    args = parse("--method tgr --distill-until 0 --epochs 10")
    assert initial_switch(args).done and describe_schedule(args, initial_switch(args)) == (
        "distilling: no epoch"
    )
    args = parse("--method tgr --epochs 10")
    after = Switch(done=True, epoch=5, reason="--distill-until 0.5 of 10 epochs")
    line = describe_schedule(args, after)
    assert line == "distilling: over, switched before epoch 5 (--distill-until 0.5 of 10 epochs)"
    stable = parse("--method stablemoe --stable-stage1 0.3 --epochs 10")
    assert describe_schedule(stable, Switch()) == "router learning (frozen after) epochs 0–2 of 10"


def test_the_adaptive_rule_needs_patience_epochs_in_a_row_in_every_layer():
    args = parse(
        "--method tgr --distill-until adaptive --switch-consistency 0.8 --switch-patience 2"
    )
    switch = Switch()
    steps = [([0.9, 0.7], False), ([0.9, 0.85], False), ([0.95, 0.81], True)]  # layer 2 lags
    for epoch, (consistency, due) in enumerate(steps):
        got, why = switch_due(args, switch, epoch, consistency)
        assert got == due, (epoch, why)
    assert switch.streak == 2 and "for 2 epoch(s), last [0.95, 0.81]" in why
    switch_due(args, switch, 3, [0.79, 0.99])
    assert switch.streak == 0  # one layer below the threshold: the streak starts again


def test_no_switch_after_the_last_epoch_nor_for_methods_without_one():
    tgr = parse("--method tgr --distill-until 1.0 --epochs 3")
    assert decide_switch(tgr, Switch(), 2, [1.0], 1, "cpu") == (False, "")  # nothing after it
    assert not decide_switch(tgr, Switch(), 1, [1.0], 1, "cpu")[0]  # F = 1: the whole run
    half = parse("--method tgr --epochs 4")
    assert decide_switch(half, Switch(), 1, [0.0], 1, "cpu")[0]  # after epochs 0 and 1
    assert not decide_switch(half, Switch(done=True), 1, [0.0], 1, "cpu")[0]  # done already
    assert not decide_switch(parse("--method vmoe --epochs 4"), Switch(), 1, [1.0], 1, "cpu")[0]


def test_lr_warms_up_linearly_then_follows_the_cosine():
    args = parse("--epochs 10 --warmup-epochs 2 --warmup-lr 1e-6 --min-lr 1e-5")
    args.base_lr, steps = 1e-3, 100  # per epoch
    assert lr_at(0, args, steps) == pytest.approx(1e-6)
    assert lr_at(100, args, steps) == pytest.approx((1e-6 + 1e-3) / 2)  # half-way up
    assert lr_at(200, args, steps) == pytest.approx(1e-3)  # the top, where the cosine starts
    for step in (350, 600, 999):
        cosine = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (step - 200) / 800))
        assert lr_at(step, args, steps) == pytest.approx(cosine)
    assert lr_at(1000, args, steps) == pytest.approx(1e-5)
