"""On a GPU only (skipped elsewhere; benchmarks/gpu_check.sh runs them): the training step
under bf16 autocast makes no host sync (CUDA's sync debug mode raises on one), and
--compile with the real compiler (inductor) trains TGR through its switch.
"""

import pytest
import torch

import train
from augment import build_mixup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = (
    "--model micro --img-size 32 --patch-size 4 --experts 4 --topk 1 --batch-size 16 --device cuda "
    "--synthetic-train-size 64 --synthetic-val-size 32 --warmup-epochs 0 --lr 2e-3 "
    "--print-freq 100000 --watch-size 16 --num-workers 2 --no-compile"
).split()  # eager unless a test asks for --compile (on CUDA train.py compiles by default)


def args_for(out, *extra):
    return train.get_args_parser().parse_args([*TINY, "--output-dir", str(out), *extra])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train.main(args_for(out, "--method", "dense", "--epochs", "1"))
    return str(out / "checkpoint.pt")


@pytest.mark.parametrize("method", ["vmoe", "tgr"])
def test_the_step_never_waits_for_the_gpu(method, teacher_ckpt, tmp_path, monkeypatch):
    """3 steps (RandAugment on the device, MixUp, random erasing, EMA, TGR's teacher and KL)
    under CUDA's sync debug mode "error": any .item(), bool() or blocking copy raises. The
    epoch's one progress line, which reads the sums on purpose, switches the mode off first."""
    args = args_for(tmp_path, "--method", method, "--teacher", teacher_ckpt, "--aa-on-device")
    args.student_balance_coef, args.base_lr = (0.0 if method == "tgr" else 0.005), 1e-3
    device = torch.device("cuda")
    model = train.build_student(args, 10).to(device)
    teacher = routers = None
    if method == "tgr":
        teacher, routers = train.build_teacher(args, model, device, 1)
    optimizer = train.build_optimizer(model, routers, args, cuda=True)
    ema, mix = train.build_ema(model, args, None), build_mixup(args, 10)
    shape = (16, 3, 32, 32)
    images = torch.randint(0, 256, shape, dtype=torch.uint8).pin_memory()  # as the loader's
    data = [(images, torch.randint(0, 10, (16,)).pin_memory())] * 3

    def epoch(batches, step):
        learner = train.Learner(model, train.Guides(teacher, routers), optimizer, ema=ema)
        return train.train_one_epoch(learner, batches, mix, args, 0, step)

    epoch(data[:1], 0)  # first step: lazy initialisation may synchronise
    torch.cuda.synchronize()
    real_check = train.check_finite

    def progress_line(*a):
        torch.cuda.set_sync_debug_mode(0)
        return real_check(*a)

    monkeypatch.setattr(train, "check_finite", progress_line)
    torch.cuda.set_sync_debug_mode("error")
    try:
        epoch(data, 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_compiled_tgr_trains_through_the_switch(teacher_ckpt, tmp_path):
    res = train.main(
        args_for(
            tmp_path, "--method", "tgr", "--teacher", teacher_ckpt, "--epochs", "2", "--compile"
        )
    )
    log = res["history"]
    assert [r["distilling"] for r in log] == [True, False]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in log)


def test_dense_probes_on_the_gpu(teacher_ckpt):
    """eval.py's linear probes with the backbone under bf16 autocast on the GPU: both heads
    train and measure (the CPU tests pin their values; here, that the device path runs)."""
    import eval

    argv = ["--checkpoint", teacher_ckpt, "--seg-probe", "--depth-probe", "--probe-epochs", "2"]
    res = eval.main(eval.get_args_parser().parse_args([*argv, "--device", "cuda"]))
    assert 0 < res["seg_miou"] <= 100 and 0 < res["depth_rmse"] < 10
