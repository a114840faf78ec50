"""report.py: train.py's lines (a score of 0 is shown as 0.00, a score not computed as "-", never
nan), the parameter count. eval.py's table and figures are tested with eval.py's command line
(tests/test_eval.py), on real runs."""

import torch.nn as nn

from moe import build_model, moe_num_params
from report import describe_params, epoch_line

MICRO = dict(num_classes=10, img_size=32, patch_size=4)


def test_the_epoch_line_shows_zero_as_a_score_and_nothing_as_a_dash():
    record = {"val_top1": 0.0, "routing_entropy": [0.9876, 1.0]}
    line = epoch_line(3, record, [0.5, 0.25])
    assert line == "epoch 3: val top-1 0.00  routing entropy [0.988, 1.0]  consistency [0.5, 0.25]"
    no_knn = epoch_line(0, {"val_knn_top1": None, "routing_entropy": [0.5]}, [0.1])
    assert no_knn == "epoch 0: val k-NN top-1 -  routing entropy [0.5]  consistency [0.1]"
    dense = epoch_line(2, {"val_top1": 91.25, "routing_entropy": None}, [])
    assert dense == "epoch 2: val top-1 91.25"  # no empty routing lists for a dense run
    knn = epoch_line(1, {"val_knn_top1": 0.0}, [])
    assert "val k-NN top-1 0.00" in knn and "nan" not in knn + no_knn


def test_the_parameter_count_names_what_trains_beside_the_student():
    dense = build_model("micro", "dense", **MICRO)
    assert describe_params(dense) == f"{moe_num_params(dense)[0] / 1e6:.2f}M params"
    moe = build_model("micro", "vmoe", num_experts=8, **MICRO)
    total, active = moe_num_params(moe)
    text = describe_params(moe, routers=nn.ModuleList([nn.Linear(96, 8, bias=False)] * 2))
    assert text.startswith(f"{total / 1e6:.2f}M params ({active / 1e6:.2f}M active)")
    assert text.endswith(" + 0.001M teacher router") and active < total
