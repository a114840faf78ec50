"""train.py: every method learns, the TGR schedule, DDP equals one
process, exact resume, crash-safe checkpoints, and one clear line for each bad input.

All runs are `micro` at 32x32 / patch 4 with 4 experts on a few dozen generated images.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import schedule
import train
from data import build_dataset, normalize
from flags import check_args
from losses import importance_loss, routing_kl
from moe import METHODS as METHOD_KINDS
from moe import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "--model micro --img-size 32 --patch-size 4 --experts 4 --topk 1 --batch-size 16 "
    "--synthetic-train-size 64 --synthetic-val-size 32 --epochs 2 --warmup-epochs 0 "
    "--lr 2e-3 --print-freq 1000 --watch-size 16 --num-workers 0"
).split()
# the settings under which DDP must equal one process: no randomness that depends on the rank
QUIET = (  # cf = E (--capacity-factor 4): no token is ever dropped, whatever the group holds
    "--mixup 0 --cutmix 0 --aa none --reprob 0 --no-repeated-aug --no-crop-flip --drop-path 0 "
    "--noise-std 0 --capacity-factor 4"
).split()


def args_for(out, *extra):
    return train.get_args_parser().parse_args([*TINY, "--output-dir", str(out), *extra])


def run(out, *extra):
    return train.main(args_for(out, *extra))


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A dense micro model trained for one epoch by train.py: the offline teacher."""
    out = tmp_path_factory.mktemp("dense")
    run(out, "--method", "dense", "--epochs", "1")
    return str(out / "checkpoint.pt")


# ----------------------------------------------------------------------------- every method
METHODS = ["dense", "vmoe", "tgr", "expert-choice", "softmoe", "stablemoe", "zloss", "lossfree"]
METHODS += ["teacher-route", "tgr-distill-only"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_lowers_its_loss_on_a_fixed_batch(method, teacher_ckpt, tmp_path):
    extra = ["--router-grad", "distill-only"] if method.endswith("distill-only") else []
    args = args_for(
        tmp_path,
        *("--method", method.removesuffix("-distill-only"), "--teacher", teacher_ckpt),
        *("--drop-path", "0", *extra),
    )
    check_args(args)
    args.student_balance_coef = 0.0 if args.method in ("tgr", "lossfree") else 0.005
    torch.manual_seed(0)
    train_set, classes = build_dataset(True, args)
    model = train.build_student(args, classes)
    teacher = routers = None
    params = list(model.parameters())
    if args.method in ("tgr", "teacher-route"):
        teacher, routers = train.build_teacher(args, model, torch.device("cpu"), 1)
        params += list(routers.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    images = normalize(torch.stack([train_set[i][0] for i in range(16)]))  # (16, 3, 32, 32)
    targets = torch.tensor([train_set[i][1] for i in range(16)])
    losses = []
    for _ in range(12):
        loss, teacher_loss, parts = train.compute_losses(
            model, images, targets, args, train.Guides(teacher, routers)
        )
        optimizer.zero_grad()
        (loss + teacher_loss).backward()
        optimizer.step()
        losses.append(loss.item())
        assert math.isfinite(losses[-1]) and all(math.isfinite(v) for v in parts.values())
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    assert ("distill" in parts) == (teacher is not None)


def test_distill_only_router_gradient_is_the_kl_gradient(teacher_ckpt, tmp_path):
    args = args_for(tmp_path, "--method", "tgr", "--teacher", teacher_ckpt, *QUIET)
    args.student_balance_coef = 0.0
    torch.manual_seed(0)
    train_set, classes = build_dataset(True, args)
    model = train.build_student(args, classes)
    teacher, routers = train.build_teacher(args, model, torch.device("cpu"), 1)
    images = normalize(torch.stack([train_set[i][0] for i in range(8)]))
    targets = torch.tensor([train_set[i][1] for i in range(8)])
    router_weights = [model.blocks[i - 1].mlp.router.weight for i in model.moe_layers]

    def router_grads(mode):
        args.router_grad = mode
        model.zero_grad()
        loss, _, _ = train.compute_losses(
            model, images, targets, args, train.Guides(teacher, routers)
        )
        loss.backward()
        return [w.grad.clone() for w in router_weights]

    only, full = router_grads("distill-only"), router_grads("task")
    # each router's own layer's KL, differentiated by hand (a later layer's KL would reach
    # this router only through its combine weights, the path distill-only closes)
    _, routings = model(images)
    t_logits = [R(h) for R, h in zip(routers, teacher(images))]
    scale = args.distill_coef / len(routings)
    expected = [
        torch.autograd.grad(scale * routing_kl(r.student_logits, t, from_logits=True), w)[0]
        for r, t, w in zip(routings, t_logits, router_weights)
    ]
    for g, e, f in zip(only, expected, full):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-8)
        assert not torch.allclose(f, e, atol=1e-6)  # the task does reach the router normally


def test_distill_tokens_cls_is_the_kl_of_the_cls_token_alone(teacher_ckpt, tmp_path):
    """--distill-tokens cls (the summary's "targets the CLS token routing output"): the KL of
    each layer over the CLS token (token 0 of every image), not over every token."""
    args = args_for(tmp_path, "--method", "tgr", "--teacher", teacher_ckpt, *QUIET)
    args.student_balance_coef = 0.0
    torch.manual_seed(0)
    train_set, classes = build_dataset(True, args)
    model = train.build_student(args, classes).eval()  # no router noise: two equal forwards
    teacher, routers = train.build_teacher(args, model, torch.device("cpu"), 1)
    images = normalize(torch.stack([train_set[i][0] for i in range(8)]))  # (8, 3, 32, 32)
    targets = torch.tensor([train_set[i][1] for i in range(8)])
    guides = train.Guides(teacher, routers)
    distill = {}
    for tokens in ("all", "cls"):
        args.distill_tokens = tokens
        distill[tokens] = train.compute_losses(model, images, targets, args, guides)[2]["distill"]
    _, routings = model(images)
    t_logits = [R(h) for R, h in zip(routers, teacher(images))]  # (8, N, E) each
    cls = [
        routing_kl(r.student_logits.view(8, -1, t.shape[-1])[:, 0], t[:, 0], from_logits=True)
        for r, t in zip(routings, t_logits)
    ]
    torch.testing.assert_close(distill["cls"], sum(cls), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(distill["all"], distill["cls"])


# ----------------------------------------------------------------------------- the TGR schedule
def count_teacher_calls(monkeypatch):
    calls = []
    real = train.load_teacher

    def counting(*a, **kw):
        teacher = real(*a, **kw)
        forward = teacher.forward
        # record whether the call came from a training step (grad on) or evaluation (no_grad)
        teacher.forward = lambda x: calls.append(torch.is_grad_enabled()) or forward(x)
        return teacher

    monkeypatch.setattr(train, "load_teacher", counting)
    return calls


@pytest.mark.parametrize("until, distilled", [("0.5", 2), ("1.0", 4)])
def test_kl_exactly_while_distilling_and_no_teacher_after(
    until, distilled, teacher_ckpt, tmp_path, monkeypatch
):
    calls = count_teacher_calls(monkeypatch)
    result = run(
        tmp_path,
        *("--method", "tgr", "--teacher", teacher_ckpt, "--epochs", "4"),
        *("--distill-until", until),
    )
    history = log(tmp_path)
    assert [r["distilling"] for r in history] == [e < distilled for e in range(4)]
    assert [("train_distill" in r) for r in history] == [e < distilled for e in range(4)]
    assert all(r["train_distill"] > 0 for r in history[:distilled])
    steps, val_batches = 64 // 16, 32 // 16
    # one teacher forward per training step and one per validation batch (the logged teacher
    # agreement) in every distilling epoch, none after the switch
    assert calls.count(True) == distilled * steps
    assert calls.count(False) == distilled * val_batches
    switched = [r for r in history if "switch" in r]
    if distilled < 4:
        assert switched[0]["epoch"] == distilled - 1 and result["routers"] is None
        assert "--distill-until 0.5" in switched[0]["switch"]["reason"]
    else:
        assert not switched and result["routers"] is not None


@pytest.mark.parametrize("threshold, switches", [("0.0", True), ("1.01", False)])
def test_adaptive_switch_follows_its_condition(threshold, switches, teacher_ckpt, tmp_path):
    run(
        tmp_path,
        *("--method", "tgr", "--teacher", teacher_ckpt, "--epochs", "3"),
        *("--distill-until", "adaptive", "--switch-consistency", threshold),
        *("--switch-patience", "1"),
    )
    history = log(tmp_path)
    if switches:  # consistency >= 0 always holds: switch after the first check
        assert history[0]["switch"]["reason"].startswith("adaptive")
        assert [r["distilling"] for r in history] == [True, False, False]
    else:  # consistency can never reach 1.01: distil throughout
        assert all(r["distilling"] and "switch" not in r for r in history)


def test_stablemoe_freezes_the_router_at_the_switch(tmp_path):
    result = run(tmp_path, "--method", "stablemoe", "--epochs", "2", "--stable-stage1", "0.5")
    assert [r["router_frozen"] for r in log(tmp_path)] == [False, True]
    model = result["model"]
    assert all(not model.blocks[i - 1].mlp.router.weight.requires_grad for i in model.moe_layers)


def test_stablemoe_stage_two_trains_the_task_alone(tmp_path):
    """Stage 2: router frozen, no router noise, no balance loss; its length is --stable-stage1,
    not --distill-until."""
    common = ["--method", "stablemoe", "--stable-stage1", "0.3", "--distill-until", "1.0"]
    run(tmp_path, *common, "--epochs", "2")  # ceil(0.3 · 3) = 1: epoch 0 learns the router
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    result = run(tmp_path, *common, "--epochs", "3", "--resume", "auto")
    history = log(tmp_path)
    assert [r["router_frozen"] for r in history] == [False, True, True]
    assert ["train_importance" in r for r in history] == [True, False, False]
    assert "--stable-stage1 0.3" in history[0]["switch"]["reason"]
    model = result["model"]
    for i in model.moe_layers:
        key = f"blocks.{i - 1}.mlp.router.weight"
        assert torch.equal(first[key], model.state_dict()[key])  # frozen through epoch 2
        assert model.blocks[i - 1].mlp.noise_std == 0.0
        _, routings = model.train()(torch.randn(8, 3, 32, 32))
        assert all(r.noisy_logits is None for r in routings)  # training, yet no noise


def test_log_and_checkpoint_layout(tmp_path, capsys):
    run(tmp_path, "--method", "vmoe")
    record = log(tmp_path)[-1]
    for key in (
        "epoch",
        "lr",
        "train_loss",
        "train_task",
        "train_importance",
        "train_load",
        "val_top1",
        "routing_entropy",
        "utilisation",
        "consistency_prev",
        "dropped_frac",
        "train_dropped",
        "distilling",
        "images_per_s",
        "train_top1",
        "epoch_time_s",
        "eval_time_s",
    ):
        assert key in record, key
    assert len(record["routing_entropy"]) == 2 and len(record["utilisation"][0]) == 4
    assert 0 <= record["train_top1"] <= 100  # on the un-mixed labels (MixUp/CutMix are on)
    assert 0 < record["train_dropped"] < 1  # at the training cf 1.05, noisy routing drops some
    printed = capsys.readouterr().out
    assert "recipe: AdamW lr 6.25e-05" in printed  # 2e-3 · 16 / 512, resolved
    assert "capacity factor 1.05 train / 4.0 eval" in printed  # V-MoE's eval default
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["model_args"]["eval_capacity_factor"] == 4.0
    assert build_model(**ckpt["model_args"]).blocks[3].mlp.eval_capacity_factor == 4.0
    for key in ("model", "optimizer", "lr_scheduler", "epoch", "scaler", "args", "step", "rng"):
        assert key in ckpt
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert json.loads((tmp_path / "args.json").read_text())["method"] == "vmoe"
    final = json.loads((tmp_path / "consistency_final.json").read_text())
    assert len(final) == 2 and final[-1] == [1.0, 1.0]  # the last epoch agrees with itself


def test_finetune_replaces_the_head_and_logs_consistency(tmp_path):
    run(tmp_path / "pre", "--method", "vmoe", "--epochs", "1")
    result = run(
        tmp_path / "ft",
        *("--method", "vmoe", "--epochs", "1", "--nb-classes", "5"),
        *("--finetune", str(tmp_path / "pre" / "checkpoint.pt")),
    )
    assert result["model"].head.out_features == 5
    assert len(log(tmp_path / "ft")[0]["consistency_pretrained"]) == 2


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("aa_where", ["--no-aa-on-device", "--aa-on-device"])
def test_resume_is_exact(teacher_ckpt, tmp_path, monkeypatch, aa_where):
    # everything random stays on: MixUp/CutMix, RandAugment (in the loader, or on the device
    # batch from a generator seeded by (seed, epoch, batch, rank)), crop/flip, drop-path, noise
    common = [
        *("--method", "tgr", "--teacher", teacher_ckpt, "--epochs", "4"),
        *("--distill-until", "0.75", aa_where),
    ]
    straight = run(tmp_path / "a", *common)["model"].state_dict()

    saves, real_save = [], checkpoint.save_checkpoint

    def crash_after_two(path, state):
        real_save(path, state)
        saves.append(path.name)
        if saves.count("checkpoint.pt") == 2:
            raise KeyboardInterrupt  # the job is killed right after epoch 1's checkpoint

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *common)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    resumed = run(tmp_path / "b", *common, "--resume", "auto")["model"].state_dict()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    ema_a, ema_b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in "ab")
    for key, value in ema_a["model_ema"].items():  # the EMA (on by default) resumes exactly too
        assert torch.equal(value, ema_b["model_ema"][key]), key
    drop = ("images_per_s", "epoch_time_s", "eval_time_s")  # wall-clock times
    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


def test_the_last_teacher_router_survives_the_switch_and_a_resume(teacher_ckpt, tmp_path):
    """After the switch the teacher router no longer trains, but eval.py --route teacher needs
    it: every later checkpoint, resumed or not, carries its state at the switch."""
    common = ["--method", "tgr", "--teacher", teacher_ckpt, "--distill-until", "0.5"]
    run(tmp_path, *common, "--epochs", "2")  # switch after epoch 0
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    run(tmp_path, *common, "--epochs", "3", "--resume", "auto")  # epoch 2, after the switch
    later = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert first["switch"]["done"] and later["epoch"] == 2
    assert first["teacher_router"].keys() == later["teacher_router"].keys()
    for key, value in first["teacher_router"].items():
        assert torch.equal(value, later["teacher_router"][key]), key


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    run(tmp_path, "--method", "vmoe", "--epochs", "1")
    real_save = torch.save

    def dies_half_way(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip file")  # a partial write, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--method", "vmoe", "--epochs", "2", "--resume", "auto")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


# ----------------------------------------------------------------------------- bad input
def cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        train.cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def test_bad_input_gives_one_line(tmp_path, capsys, teacher_ckpt):
    base = [*TINY, "--output-dir", str(tmp_path)]
    moe_ckpt = tmp_path / "moe"
    run(moe_ckpt, "--method", "vmoe", "--epochs", "1")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((moe_ckpt / "checkpoint.pt").read_bytes()[:1000])
    cases = {
        "--model huge": "invalid choice: 'huge'",
        "--method magic": "invalid choice: 'magic'",
        "--data mnist": "invalid choice: 'mnist'",
        f"--data imagenet --data-path {tmp_path}/nowhere": "no train/CLASS",
        "--method tgr": "needs --teacher",
        "--method tgr --teacher missing.pth": "--teacher missing.pth: no such checkpoint",
        f"--method tgr --teacher {moe_ckpt}/checkpoint.pt": "must be dense",
        f"--method tgr --teacher {teacher_ckpt} --patch-size 8": "token grids differ",
        "--topk 5": "top-k (5) cannot exceed the number of experts (4)",
        "--capacity-factor 0": "capacity",
        f"--resume {tmp_path}/none.pt": "no such checkpoint",
        f"--resume {truncated}": "truncated",
        "--distill-until half": "--distill-until 'half'",
        "--stable-stage1 adaptive": "--stable-stage1 'adaptive': give a fraction",
        "--eval-crop-ratio 0": "--eval-crop-ratio 0.0",
        "--aa rand-m9-inc0": "only timm's rand-...-inc1",
        "--aa rand-x9": "cannot read 'x9'",
        "--reprob 2": "--reprob 2.0",
    }
    for flags, message in cases.items():
        line = cli_error(capsys, [*base, *flags.split()])
        assert line.startswith("error: ") and message in line, (flags, line)


def test_nan_loss_stops_naming_the_step(tmp_path, capsys, monkeypatch):
    run(tmp_path, "--method", "vmoe", "--epochs", "1")
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    real, calls = train.compute_losses, []

    def poisoned(*a, **kw):
        loss, teacher_loss, parts = real(*a, **kw)
        calls.append(1)
        return (loss * math.nan if len(calls) == 3 else loss), teacher_loss, parts

    monkeypatch.setattr(train, "compute_losses", poisoned)
    argv = [*TINY, "--output-dir", str(tmp_path), "--epochs", "2", "--resume", "auto"]
    line = cli_error(capsys, argv)
    assert "loss is nan at step 6" in line  # 4 steps in epoch 0, the third of epoch 1
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(good[k], kept[k]) for k in good)


def test_cli_subprocess_reports_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            *TINY,
            *("--resume", str(tmp_path / "gone.pt"), "--output-dir", str(tmp_path)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --resume {tmp_path}/gone.pt: no such checkpoint"
    ]


# ----------------------------------------------------------------------------- DDP
DDP_HELPER = """
import functools, os, sys, torch
sys.path.insert(0, {root!r})
import train
from data import build_dataset
from moe import METHODS as METHOD_KINDS
from moe import build_model
if "--compile" in sys.argv:  # dynamo and AOTAutograd through DDP, without inductor's C++ build
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
result = train.main(train.get_args_parser().parse_args(sys.argv[1:]))
state = {{"model": result["model"].state_dict(), "routers": result["routers"].state_dict()}}
state["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # 0: never compiled
torch.save(state, os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


@pytest.mark.parametrize("compiled", [False, True])
def test_ddp_two_ranks_equal_one_process(teacher_ckpt, tmp_path, compiled):
    # TGR while distilling: the student (DDP) and the teacher routers (averaged by hand) both
    # train. The teacher router's importance loss is a CV² over the *local* batch, not linear
    # in the batch, so it is off here: then every loss is a mean and two ranks of 8 images
    # must equal one process of 16. Compiled (a GPU run's default), the ranks' step goes
    # through dynamo's DDP graph splitting, and each rank accumulates 2 batches of 4 (DDP's
    # no_sync inside a compiled step); the one process stays eager.
    common = [
        *QUIET,
        *("--method", "tgr", "--teacher", teacher_ckpt, "--distill-until", "1"),
        *("--teacher-load-coef", "0"),
    ]
    helper = tmp_path / "helper.py"
    helper.write_text(DDP_HELPER.format(root=ROOT, out=str(tmp_path)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    batches = ["--batch-size", "4", "--accum-iter", "2"] if compiled else ["--batch-size", "8"]
    cmd = [*torchrun, str(helper), *TINY, *common, *batches]
    cmd += ["--output-dir", str(tmp_path / "ddp"), "--compile" if compiled else "--no-compile"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["graphs"] > 0) == compiled and ("compiled (" in proc.stdout) == compiled
    for part in ("model", "routers"):
        for key in r0[part]:  # DDP keeps ranks bit-identical
            assert torch.equal(r0[part][key], r1[part][key]), key
    single = run(tmp_path / "one", *common, "--batch-size", "16")
    # same global batch and LR (16 x 1 = 8 x 2): the same weights up to float reassociation
    for part, module in (("model", single["model"]), ("routers", single["routers"])):
        for key, value in module.state_dict().items():
            torch.testing.assert_close(r0[part][key], value, rtol=1e-4, atol=1e-5)
    assert log(tmp_path / "ddp")[-1]["val_top1"] == pytest.approx(
        log(tmp_path / "one")[-1]["val_top1"]
    )


# ----------------------------------------------------------------------------- the demo
# ----------------------------------------------------------------------------- what a run prints
def test_one_epoch_tgr_distils_and_says_so(teacher_ckpt, tmp_path, capsys):
    run(tmp_path, "--method", "tgr", "--teacher", teacher_ckpt, "--epochs", "1")
    out = capsys.readouterr().out.splitlines()
    # the run's header (parameters, then the recipe), then the schedule, then the epochs
    assert [ln.split(":")[0].split(" ")[0] for ln in out[:3]] == ["micro", "recipe", "distilling"]
    assert out[2] == "distilling epochs 0–0 of 1"
    assert [r["distilling"] for r in log(tmp_path)] == [True]
    assert log(tmp_path)[0]["train_distill"] > 0


def test_inputs_are_checked_before_any_data_or_file(tmp_path, capsys, monkeypatch, teacher_ckpt):
    """Every input file fails in one line before a data set is built or anything is written,
    whatever the schedule (a 0-epoch distillation once skipped loading the teacher at all)."""
    monkeypatch.setattr(data, "build_dataset", lambda *a: pytest.fail("a data set was built"))
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    for split, classes in (("train", "abc"), ("val", "ac")):  # val/ lacks b: labels would shift
        for c in classes:
            (tmp_path / "folder" / split / c).mkdir(parents=True)
    cases = {
        f"--method tgr --teacher {junk} --epochs 1": "not a PyTorch checkpoint",
        f"--method tgr --teacher {tmp_path}/gone.pth --distill-until 0": "no such checkpoint",
        f"--method teacher-route --teacher {junk}": "not a PyTorch checkpoint",
        f"--resume {tmp_path}/gone.pt": "no such checkpoint",
        f"--finetune {junk}": "not a PyTorch checkpoint",
        f"--data folder --data-path {tmp_path}/nowhere": "no train/CLASS",
        f"--data folder --data-path {tmp_path}/folder": "val/ lacks the class folder 'b'",
    }
    for flags, message in cases.items():
        out = tmp_path / "out"
        line = cli_error(capsys, [*TINY, "--output-dir", str(out), *flags.split()])
        assert message in line and not out.exists(), (flags, line)


def test_a_bad_teacher_fails_on_resume_after_the_switch(teacher_ckpt, tmp_path, capsys):
    common = ["--method", "tgr", "--distill-until", "0.5", "--output-dir", str(tmp_path)]
    run(tmp_path, *common, "--teacher", teacher_ckpt, "--epochs", "2")  # switched after epoch 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    argv = [*TINY, *common, "--teacher", str(tmp_path / "gone.pth"), "--epochs", "3"]
    line = cli_error(capsys, [*argv, "--resume", "auto"])
    assert "no such checkpoint" in line
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing already written is lost


ROUTED = [m for m, kind in METHOD_KINDS.items() if kind in ("top-k", "expert-choice")]


@pytest.mark.parametrize("method", ROUTED)
def test_routing_flags_reach_the_router_of_every_method(method, tmp_path):
    """--capacity-factor, --eval-capacity-factor and --moe-group-size change what the layer
    does for every method with a router (expert choice once ignored all three)."""

    def routing(*flags, training=True):
        model = train.build_student(args_for(tmp_path, "--method", method, *flags), 10)
        _, routings = model.train(training)(torch.randn(8, 3, 32, 32))
        return routings[0]

    base = routing()
    assert routing("--capacity-factor", "2").capacity > base.capacity
    at_eval = routing(training=False).capacity
    assert routing("--eval-capacity-factor", "3", training=False).capacity > at_eval
    assert base.num_groups == 1 and routing("--moe-group-size", "2").num_groups == 4


def test_checkpoint_rebuilds_its_model_without_the_trainer(tmp_path):
    run(tmp_path, "--method", "expert-choice", "--epochs", "1", "--capacity-factor", "1.5")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    model = build_model(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])  # strict: every key and shape fits
    assert ckpt["model_args"]["capacity_factor"] == 1.5 and ckpt["teacher_args"] is None
    assert ckpt["model_args"]["eval_capacity_factor"] == 1.5  # expert choice evaluates as trained


def test_the_teacher_router_group_is_removed_by_name(teacher_ckpt, tmp_path):
    args = args_for(tmp_path, "--method", "tgr", "--teacher", teacher_ckpt)
    model = train.build_student(args, 10)
    teacher, routers = train.build_teacher(args, model, torch.device("cpu"), 1)
    optimizer = train.build_optimizer(model, routers, args, cuda=False)
    for p in routers.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # the routers now have optimizer state (Adam moments)
    assert all(p in optimizer.state for p in routers.parameters())
    optimizer.param_groups.reverse()  # not the last group any more
    _, state = schedule.switch_off(args, schedule.Switch(), 0, "test", model, optimizer, routers)
    assert [g.get("name") for g in optimizer.param_groups] == [None, None]
    assert state.keys() == routers.state_dict().keys()
    assert not any(p in optimizer.state for p in routers.parameters())


# ------------------------------------------------------------------------ fine-tuning a TGR run
class Started(Exception):
    """Raised instead of the first training epoch: the run's set-up is what a test inspects."""


def test_tgr_finetune_continues_the_pretrained_teacher_router(teacher_ckpt, tmp_path, monkeypatch):
    pre = ["--method", "tgr", "--teacher", teacher_ckpt, "--epochs", "1"]
    run(tmp_path / "pre", *pre)
    trained = torch.load(tmp_path / "pre" / "checkpoint.pt", weights_only=True)["teacher_router"]

    def first_epoch(learner, *a, **kw):
        raise Started(learner.guides.routers.state_dict())

    monkeypatch.setattr(train, "train_one_epoch", first_epoch)
    ft = [*pre, "--finetune", str(tmp_path / "pre" / "checkpoint.pt"), "--nb-classes", "5"]
    with pytest.raises(Started) as started:  # a 0-step fine-tune start
        run(tmp_path / "ft", *ft)
    start = started.value.args[0]
    assert start.keys() == trained.keys()
    assert all(torch.equal(start[k], trained[k]) for k in trained)
    with pytest.raises(Started) as started:  # --fresh-teacher-router: a new one
        run(tmp_path / "fresh", *ft, "--fresh-teacher-router")
    assert not torch.equal(started.value.args[0]["0.weight"], trained["0.weight"])


def test_tgr_finetune_without_a_teacher_router_is_one_line(teacher_ckpt, tmp_path, capsys):
    run(tmp_path / "pre", "--method", "vmoe", "--epochs", "1")  # a V-MoE run has none
    argv = [
        *TINY,
        *("--output-dir", str(tmp_path / "ft"), "--method", "tgr", "--teacher", teacher_ckpt),
        *("--finetune", str(tmp_path / "pre" / "checkpoint.pt")),
    ]
    assert "no teacher router" in cli_error(capsys, argv)


def test_eval_crop_ratio_sets_the_resize(tmp_path):
    """DeiT: resize to S / ratio, then centre-crop S (0.875 by default; DeiT-III uses 1.0)."""
    from data import build_transform

    for ratio, resized in (("0.875", 109), ("1.0", 96)):  # int(96 / 0.875) = 109
        args = args_for(
            tmp_path, "--img-size", "96", "--patch-size", "16", "--eval-crop-ratio", ratio
        )
        resize = build_transform(False, args).transforms[1]
        assert resize.size == [resized]


def test_model_ema_is_logged_saved_and_averages(tmp_path):
    """decay 0: the EMA is the weights themselves; decay 1: the first step's weights forever."""
    run(tmp_path / "zero", "--model-ema-decay", "0.0")
    ckpt = torch.load(tmp_path / "zero" / "checkpoint.pt", weights_only=True)
    assert ckpt["model_ema"].keys() == ckpt["model"].keys()
    assert all(torch.equal(ckpt["model_ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    assert all("val_top1_ema" in r for r in log(tmp_path / "zero"))
    run(tmp_path / "one", "--model-ema-decay", "1.0")
    ckpt = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(ckpt["model_ema"][key], ckpt["model"][key])  # frozen at step 1
    run(tmp_path / "off", "--no-model-ema")
    assert torch.load(tmp_path / "off" / "checkpoint.pt", weights_only=True)["model_ema"] is None
    assert "val_top1_ema" not in log(tmp_path / "off")[-1]


def test_training_top1_counts_the_unmixed_labels(tmp_path):
    args = args_for(tmp_path)
    args.student_balance_coef = 0.005
    model = train.build_student(args, 10).eval()
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    soft = torch.nn.functional.one_hot(labels.roll(1), 10).float()  # mixed targets: other classes
    _, _, parts = train.compute_losses(model, images, soft, args, train.Guides(), labels)
    logits, _ = model(images)
    assert parts["top1"] == pytest.approx(100 * (logits.argmax(-1) == labels).float().mean())


def test_vmoe_balance_losses_are_taken_per_routing_group(tmp_path):
    # --moe-group-size 2 on 8 images: 4 groups, each with its own CV², averaged (V-MoE)
    args = args_for(tmp_path, "--moe-group-size", "2", "--noise-std", "0")
    args.student_balance_coef = 0.005
    model = train.build_student(args, 10).eval()
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _, _, parts = train.compute_losses(model, images, labels, args, train.Guides())
    with torch.no_grad():
        _, routings = model(images)
    want = 0.0
    for r in routings:
        assert r.num_groups == 4
        groups = r.probs.reshape(4, -1, r.probs.shape[-1])  # (G, S, E): 2 images each
        want += sum(importance_loss(g) for g in groups) / 4
    assert parts["importance"] == pytest.approx(float(want), rel=1e-5)
    batch_level = sum(float(importance_loss(r.probs)) for r in routings)
    assert parts["importance"] != pytest.approx(batch_level, rel=1e-3)  # the grouping matters


# ----------------------------------------------------------------------------- the study's controls
def test_student_entropy_coef_adds_the_entropy_of_the_students_own_router(tmp_path):
    """--student-entropy-coef c: L = L_task + L_balance + c · Σ_i L_ent(p^(i)), p the clean
    softmax of each MoE layer's own router: the teacher router's confidence, without a teacher."""
    args = args_for(tmp_path, "--noise-std", "0", *QUIET)
    args.student_balance_coef = 0.005
    model = train.build_student(args, 10).eval()
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    base, _, _ = train.compute_losses(model, images, labels, args, train.Guides())
    args.student_entropy_coef = 0.3
    loss, _, parts = train.compute_losses(model, images, labels, args, train.Guides())
    with torch.no_grad():
        _, routings = model(images)
    ent = sum(-(r.probs * r.probs.log()).sum(-1).mean() for r in routings)
    assert parts["student_ent"] == pytest.approx(float(ent), rel=1e-5)
    assert float((loss - base).detach()) == pytest.approx(0.3 * float(ent), rel=1e-4)


def test_study_flags_reach_the_teacher_and_its_objective(teacher_ckpt, tmp_path):
    """--teacher-reinit reaches load_teacher (a random twin, saved in teacher_args so eval.py
    rebuilds the same one); --teacher-balance group takes the teacher's L_imp per group."""
    args = args_for(
        tmp_path,
        *("--method", "tgr", "--teacher", teacher_ckpt, "--teacher-reinit", "5"),
        *("--teacher-balance", "group", "--moe-group-size", "2", *QUIET),
    )
    check_args(args)
    args.student_balance_coef = 0.0
    model = train.build_student(args, 10)
    teacher, routers = train.build_teacher(args, model, torch.device("cpu"), 1)
    assert "re-initialised (seed 5)" in teacher.kind
    assert train.flags.teacher_args_from_flags(args, model.moe_layers)["reinit"] == 5
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _, _, parts = train.compute_losses(model, images, labels, args, train.Guides(teacher, routers))
    t_logits = [R(h) for R, h in zip(routers, teacher(images))]
    want = sum(importance_loss(t.softmax(-1), 4) for t in t_logits)  # 4 groups of 2 images
    assert parts["teacher_importance"] == pytest.approx(float(want), rel=1e-5)


def test_watch_every_and_the_stability_log_survive_a_resume(tmp_path, monkeypatch):
    """--watch-every N writes the watch set's top-1 after every N-th step (probe_steps.pt); the log
    carries the soft and by-margin consistency, token entropy and top-2 gap; a killed run
    resumes to the same files as a straight one."""
    common = ["--method", "lossfree", "--epochs", "3", "--watch-every", "2", *QUIET]
    run(tmp_path / "a", *common)
    steps = torch.load(tmp_path / "a" / "probe_steps.pt", weights_only=True)
    assert sorted(steps) == [2, 4, 6, 8, 10, 12] and len(steps[2]) == 2  # 4 steps per epoch
    assert steps[2][0].dtype == torch.uint8 and steps[2][0].numel() == 16 * 65
    record = log(tmp_path / "a")[-1]
    for key in ("consistency_soft_prev", "consistency_by_margin_prev", "probe_token_entropy"):
        assert len(record[key]) == 2, key
    assert len(record["consistency_by_margin_prev"][0]) == 4  # eval.MARGIN_BINS: 4 bins
    assert sum(share for _, share in record["consistency_by_margin_prev"][0]) == pytest.approx(1)
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    rebuilt = build_model(**ckpt["model_args"])
    rebuilt.load_state_dict(ckpt["model"])  # the selection biases are part of the weights
    assert not torch.equal(rebuilt.blocks[3].mlp.expert_bias, torch.zeros(4))

    saves, real_save = [], checkpoint.save_checkpoint

    def crash_after_one(path, state):
        real_save(path, state)
        saves.append(path.name)
        if saves.count("checkpoint.pt") == 1 and path.name == "probe_steps.pt":
            raise KeyboardInterrupt  # killed after epoch 0's files

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *common)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    run(tmp_path / "b", *common, "--resume", "auto")
    resumed = torch.load(tmp_path / "b" / "probe_steps.pt", weights_only=True)
    assert sorted(resumed) == sorted(steps)
    assert all(torch.equal(resumed[s][i], steps[s][i]) for s in steps for i in range(2))
    drop = ("images_per_s", "epoch_time_s", "eval_time_s")
    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


@pytest.mark.parametrize("flag", ["--student-entropy-coef", "--bias-update-rate", "--watch-every"])
def test_negative_study_flags_are_one_line(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.cli([*TINY, "--output-dir", str(tmp_path), flag, "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be >= 0" in err[0]


# ----------------------------------------------------------------------------- nothing lost
def folder_bytes(out):
    """Every file of a run folder, name -> contents."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_a_new_run_never_writes_into_another_runs_folder(tmp_path, capsys):
    """A folder that holds a run's checkpoint is continued (--resume) or, said explicitly,
    started over (--overwrite); a plain new run there is one line and leaves it as it was."""
    run(tmp_path, "--epochs", "1")
    before = folder_bytes(tmp_path)
    line = cli_error(capsys, [*TINY, "--output-dir", str(tmp_path), "--method", "dense"])
    assert "holds a run" in line and "--resume auto" in line and "--overwrite" in line, line
    assert folder_bytes(tmp_path) == before

    run(tmp_path, "--epochs", "1", "--method", "dense", "--overwrite")
    assert [r["epoch"] for r in log(tmp_path)] == [0]  # a new log
    assert json.loads((tmp_path / "args.json").read_text())["method"] == "dense"


def test_a_failed_resume_leaves_the_folder_as_it_was(tmp_path, capsys):
    """--resume auto with flags that do not fit the run's checkpoint (another E) stops before
    args.json, the log or anything else in the folder is touched."""
    run(tmp_path, "--epochs", "1")
    before = folder_bytes(tmp_path)
    argv = [*TINY, "--output-dir", str(tmp_path), "--resume", "auto", "--experts", "8"]
    line = cli_error(capsys, argv)
    assert "does not fit" in line, line
    assert folder_bytes(tmp_path) == before


def test_a_truncated_image_stops_the_run_naming_the_file(tmp_path, capsys):
    from PIL import Image

    pixels = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte()
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "images" / split / c).mkdir(parents=True)
            for i in range(4):
                path = tmp_path / "images" / split / c / f"{i}.jpg"
                Image.fromarray(pixels.numpy()).save(path, format="JPEG")
    bad = tmp_path / "images" / "train" / "b" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    argv = [*TINY, "--output-dir", str(tmp_path / "out"), "--data", "folder"]
    argv += ["--data-path", str(tmp_path / "images"), "--batch-size", "4", "--no-repeated-aug"]
    line = cli_error(capsys, argv)
    assert line.startswith("error: cannot read image") and str(bad) in line, line
