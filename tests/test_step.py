"""The training step as a GPU would run it, checked on the CPU: no host sync inside a step,
--compile compiles every method's step once (and once more at the switch), --accum-iter
equals one big batch.

All `micro` at 32x32 / patch 4, 4 experts, batches of generated images.
"""

import functools
from pathlib import Path

import pytest
import torch

import train
from data import build_dataset

TINY = (
    "--model micro --img-size 32 --patch-size 4 --experts 4 --topk 1 --batch-size 8 "
    "--synthetic-train-size 64 --synthetic-val-size 16 --epochs 2 --warmup-epochs 0 "
    "--lr 2e-3 --print-freq 100000 --watch-size 8 --num-workers 0"
).split()


def args_for(out, *extra):
    return train.get_args_parser().parse_args([*TINY, "--output-dir", str(out), *extra])


def batches(args, n, batch_size):
    """n uint8 batches of the training set, as the loader hands them over."""
    train_set, _ = build_dataset(True, args)
    images = torch.stack([train_set[i][0] for i in range(n * batch_size)])  # (n·B, 3, S, S)
    labels = torch.tensor([train_set[i][1] for i in range(n * batch_size)])
    return list(zip(images.split(batch_size), labels.split(batch_size)))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train.main(args_for(out, "--method", "dense", "--epochs", "1"))
    return str(out / "checkpoint.pt")


# ----------------------------------------------------------------------------- host syncs
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def count_syncs(monkeypatch, fn):
    """Calls of every Tensor method that hands a value to Python (a host sync on a GPU)."""
    calls = []
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    monkeypatch.undo()
    return calls


@pytest.mark.parametrize("method", ["vmoe", "tgr", "zloss", "lossfree"])
def test_a_step_hands_nothing_to_python(method, teacher_ckpt, tmp_path, monkeypatch):
    """2 steps and 6 steps make the same Python reads: those of the one progress line at the
    end of the epoch. Router noise, balance losses, the teacher, the KL, the EMA and the
    non-finite check add none per step; nor does lossfree's selection-bias update."""
    args = args_for(
        tmp_path,
        *("--method", method, "--teacher", teacher_ckpt),
        *"--mixup 0 --cutmix 0 --reprob 0.5".split(),
    )
    args.student_balance_coef = 0.0 if method in ("tgr", "lossfree") else 0.005
    args.base_lr = 1e-3
    model = train.build_student(args, 10)
    teacher = routers = None
    if method == "tgr":
        teacher, routers = train.build_teacher(args, model, torch.device("cpu"), 1)
    # the GPU's optimizer (fused AdamW, which runs on CPU too): its step counters stay tensors;
    # the CPU's foreach AdamW reads them with .item(), harmless where they live on the host
    optimizer = train.build_optimizer(model, routers, args, cuda=True)
    ema = train.build_ema(model, args, None)
    data = batches(args, 6, 8)

    def epoch(n):
        learner = train.Learner(model, train.Guides(teacher, routers), optimizer, ema=ema)
        return lambda: train.train_one_epoch(learner, data[:n], None, args, 0, 0)

    few, many = count_syncs(monkeypatch, epoch(2)), count_syncs(monkeypatch, epoch(6))
    assert few == many, (few, many)
    assert len(many) < 20  # the progress line's reads, not a few per layer


# ----------------------------------------------------------------------------- --compile
def compiled_graphs(monkeypatch, out, *flags):
    """train.main with --compile through a backend that counts the graphs it is handed."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward  # run the captured graph as it is: no codegen, fast on CPU

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    torch._dynamo.reset()
    train.main(args_for(out, "--compile", "--synthetic-train-size", "16", *flags))  # 2 steps
    return graphs


def test_compile_compiles_once_and_once_more_at_the_switch(teacher_ckpt, tmp_path, monkeypatch):
    """TGR over 4 epochs of 2 steps, distilling the first 2: one graph for the distilling
    step (teacher, routers, KL inside it: no graph break) and one after the switch. Nothing
    recompiles per step or per epoch."""
    graphs = compiled_graphs(
        monkeypatch,
        tmp_path,
        *("--method", "tgr", "--teacher", teacher_ckpt, "--epochs", "4"),
        *("--distill-until", "0.5"),
    )
    assert len(graphs) == 2 and graphs[0] > graphs[1]  # the teacher's part is gone after


def test_compile_recompiles_once_at_the_stablemoe_freeze(tmp_path, monkeypatch):
    graphs = compiled_graphs(monkeypatch, tmp_path, "--method", "stablemoe", "--epochs", "2")
    assert len(graphs) == 2 and graphs[0] > graphs[1]  # no noise, no balance loss after


def test_compile_takes_the_whole_m2ot_step_as_one_graph(teacher_ckpt, tmp_path, monkeypatch):
    """M²oT over 2 epochs of 2 steps: teachers, targets, heads, π, TAS and the Switch loss in one
    graph (the Switch loss's bincount once broke it into pieces), never recompiled."""
    graphs = compiled_graphs(
        monkeypatch,
        tmp_path,
        *("--method", "m2ot", "--topk", "2", "--teachers", teacher_ckpt, teacher_ckpt),
        *("--epochs", "2"),
    )
    assert len(graphs) == 1


@pytest.mark.parametrize(
    "method", ["dense", "vmoe", "zloss", "expert-choice", "softmoe", "teacher-route", "lossfree"]
)
def test_every_other_method_compiles_to_one_graph(method, teacher_ckpt, tmp_path, monkeypatch):
    """--compile is a GPU run's default: a graph break in any method's step would cost every
    such run its speed, silently. Over 2 epochs of 2 steps: one graph, never recompiled.
    (Inductor itself, checked by hand on this CPU, 2026-12-06: every method trains.)"""
    teacher = ["--teacher", teacher_ckpt] if method == "teacher-route" else []
    graphs = compiled_graphs(monkeypatch, tmp_path, "--method", method, *teacher)
    assert len(graphs) == 1


# ----------------------------------------------------------------------------- --accum-iter
def test_accumulating_two_batches_equals_one_step_on_both(tmp_path):
    """Dense: 2 batches of 8 with --accum-iter 2 give the optimizer step the gradient of one
    batch of 16 (compared as gradients: Adam's first step, ≈ lr·sign(g), would turn float
    noise in a near-zero gradient into a full ±lr)."""
    quiet = "--method dense --mixup 0 --cutmix 0 --reprob 0 --aa none --no-crop-flip --drop-path 0"

    def step_gradient(batch_size, accum, n=None):
        args = args_for(
            tmp_path, *quiet.split(), "--batch-size", str(batch_size), "--accum-iter", str(accum)
        )
        args.student_balance_coef, args.base_lr = 0.0, 1e-3
        torch.manual_seed(0)
        model = train.build_student(args, 10)
        optimizer = train.build_optimizer(model, None, args, cuda=False)
        data = batches(args, n or accum, batch_size)
        learner = train.Learner(model, train.Guides(), optimizer)
        step, *_ = train.train_one_epoch(learner, data, None, args, 0, 0)
        assert step == 1  # one optimizer step
        return {k: p.grad for k, p in model.named_parameters()}

    big, accumulated = step_gradient(16, 1), step_gradient(8, 2)
    half = step_gradient(8, 1)  # the first batch alone: another gradient (the test can fail)
    key = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(half[key], big[key], rtol=1e-3)
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=1e-4, atol=1e-7)


def test_accumulation_scales_the_lr_and_counts_optimizer_steps(tmp_path, capsys):
    res = train.main(args_for(tmp_path, "--method", "dense", "--epochs", "1", "--accum-iter", "2"))
    out = capsys.readouterr().out
    assert "recipe: AdamW lr 6.25e-05 (= 0.002 × 8·world·2/512)" in out  # the step's 16 images
    assert "4 steps/epoch" in out  # 64 images, 8 a batch, 2 batches a step
    assert res["history"][-1]["step"] == 4
    assert Path(tmp_path / "checkpoint.pt").is_file()


def test_a_slow_step_still_prints_a_progress_line_every_30_s(tmp_path, monkeypatch, capsys):
    """One process, --print-freq far away: a step that takes over 30 s (a clock that jumps
    31 s per reading) gets its own progress line; the epoch's last step always has one."""
    args = args_for(tmp_path, "--method", "dense", "--mixup", "0", "--cutmix", "0")
    args.student_balance_coef, args.base_lr = 0.0, 1e-3
    model = train.build_student(args, 10)
    optimizer = train.build_optimizer(model, None, args, cuda=False)
    data = batches(args, 3, 8)
    learner = train.Learner(model, train.Guides(), optimizer)
    train.train_one_epoch(learner, data, None, args, 0, 0)
    assert [ln.split("]")[0] for ln in capsys.readouterr().out.splitlines()] == ["epoch 0 [3/3"]
    clock = iter(range(0, 10_000, 31))
    monkeypatch.setattr(train.time, "time", lambda: next(clock))
    train.train_one_epoch(learner, data, None, args, 1, 3)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("]")[0] for ln in lines] == ["epoch 1 [1/3", "epoch 1 [2/3", "epoch 1 [3/3"]
