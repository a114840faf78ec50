"""probe.py: the dense probes' metrics against loops, the frozen backbone, the data with dense
labels (generated, ADE20K's and NYUd's layouts) and a real signal: a trained teacher's features
make better probes than a random network's."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev
import probe
import train
from data import SyntheticImages
from moe import build_model

# the demo's recipe on 1000 images: a teacher that learns the 40-class task in ~30 s
TEACHER = (
    "--model micro --img-size 32 --patch-size 4 --data synthetic --nb-classes 40 --batch-size 64 "
    "--lr 8e-3 --warmup-epochs 1 --drop-path 0 --print-freq 100000 --num-workers 0 --mixup 0 "
    "--cutmix 0 --aa none --reprob 0 --no-repeated-aug --no-model-ema --method dense --epochs 8 "
    "--synthetic-train-size 1000 --synthetic-val-size 200"
).split()


# ----------------------------------------------------------------------------- metrics by hand
def test_mean_iou_against_a_confusion_loop():
    g = torch.Generator().manual_seed(0)
    C = 5
    label = torch.randint(0, C - 1, (3, 8, 8), generator=g)  # class 4 never labelled
    label[0, 0, :4] = probe.IGNORE
    pred = torch.randint(0, C - 2, (3, 8, 8), generator=g)  # class 3 never predicted
    pred[1, 1, 1] = 4  # class 4: predicted once, never labelled: IoU 0, counted
    counts = [[0] * C for _ in range(C)]
    for y, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
        if y != probe.IGNORE:
            counts[y][p] += 1
    ious = []
    for c in range(C):
        hit = counts[c][c]
        union = sum(counts[c]) + sum(row[c] for row in counts) - hit
        if union:
            ious.append(hit / union)
    conf = probe.confusion_matrix(pred, label, C)
    assert conf.tolist() == counts
    assert probe.mean_iou(conf) == pytest.approx(100 * sum(ious) / len(ious))
    assert probe.mean_iou(probe.confusion_matrix(label.clamp(max=C - 1), label, C)) == 100.0


def test_rmse_and_silog_against_plain_formulas():
    g = torch.Generator().manual_seed(1)
    depth = 0.5 + 9 * torch.rand(4, 6, 6, generator=g)
    depth[0, :2] = 0  # not measured
    depth[1] = 0  # an image without a measurement: left out
    depth[2, 0, 0] = 20  # past 10 m: not counted
    depth[2, 0, 1] = 10  # at 10 m: not counted either (NYUd's evaluation code: d < 10)
    pred = 0.5 + 9 * torch.rand(4, 6, 6, generator=g)
    want = []
    for p, d in zip(pred, depth):
        err = [
            (a - b) ** 2 for a, b in zip(p.flatten().tolist(), d.flatten().tolist()) if 0 < b < 10
        ]
        if err:
            want.append(math.sqrt(sum(err) / len(err)))
    assert probe.rmse_per_image(pred, depth).tolist() == pytest.approx(want, rel=1e-5)
    keep = (depth > 0) & (depth < 10)
    g_log = (pred.log() - depth.clamp_min(1e-6).log())[keep]
    silog = math.sqrt(float((g_log**2).mean() - 0.85 * g_log.mean() ** 2))
    assert float(probe.silog_loss(pred.log(), depth)) == pytest.approx(silog, rel=1e-5)
    assert float(probe.silog_loss(depth.clamp_min(1).log(), depth.clamp_min(1))) < 1e-5


def test_confusion_matrix_reads_uint8_labels_without_overflow():
    """ADE20K's label images are uint8: label · C + pred must not wrap around at 256."""
    g = torch.Generator().manual_seed(2)
    C = 150
    label = torch.randint(0, C, (2, 16, 16), generator=g)
    pred = torch.randint(0, C, (2, 16, 16), generator=g)
    want = probe.confusion_matrix(pred, label, C)  # int64 labels
    assert want.sum() == 2 * 16 * 16
    assert torch.equal(probe.confusion_matrix(pred, label.to(torch.uint8), C), want)
    assert torch.equal(probe.confusion_matrix(pred.to(torch.uint8), label.byte(), C), want)


def test_confusion_matrix_ignores_labels_and_predictions_past_the_classes():
    """A label ≥ C that is not IGNORE (a stray value in a label file) is no class of ours: its
    pixel is not counted, as an IGNORE pixel, and neither is a prediction ≥ C."""
    C = 4
    label = torch.tensor([[0, 1, 2, 3, 7, 200, probe.IGNORE, 1]])
    pred = torch.tensor([[0, 2, 2, 1, 3, 0, 3, 9]])
    counts = [[0] * C for _ in range(C)]
    for y, p in [(0, 0), (1, 2), (2, 2), (3, 1)]:  # the pixels with a class and a prediction
        counts[y][p] += 1
    assert probe.confusion_matrix(pred, label, C).tolist() == counts
    assert probe.confusion_matrix(pred, label.byte(), C).tolist() == counts


def test_depth_at_max_depth_is_not_a_measurement():
    """Valid depth is 0.001 < d < MAX_DEPTH, both strict (BTS's and AdaBins' evaluation)."""
    depth = torch.tensor([0.0, 1e-3, 0.0011, 5.0, probe.MAX_DEPTH - 1e-3, probe.MAX_DEPTH, 12.0])
    assert probe.valid_depth(depth).tolist() == [False, False, True, True, True, False, False]


def test_silog_without_a_valid_pixel_is_finite_with_a_zero_gradient():
    """A batch with no valid depth (all 0, or all past MAX_DEPTH) gives a loss ≈ 0 and a
    zero gradient, not the NaN of a mean over no pixel."""
    for depth in (torch.zeros(2, 4, 4), torch.full((2, 4, 4), 2 * probe.MAX_DEPTH)):
        log_pred = torch.randn(2, 4, 4, requires_grad=True)
        loss = probe.silog_loss(log_pred, depth)
        loss.backward()
        assert torch.isfinite(loss.detach()) and loss.item() < 1e-5
        assert torch.equal(log_pred.grad, torch.zeros(2, 4, 4))


def test_the_seg_loss_ignores_labels_past_the_classes_and_empty_batches():
    """Cross-entropy over the labelled pixels: a label ≥ C counts as IGNORE (no index error),
    and a batch with every pixel ignored gives 0 with a zero gradient, not NaN."""
    torch.manual_seed(0)
    head = probe.LinearHead(8, 3)
    feats = (torch.randn(2, 8, 2, 2), torch.randn(2, 8))  # patches (B, D, g, g), CLS (B, D)
    image = torch.zeros(2, 3, 4, 4)
    seg = torch.randint(0, 3, (2, 4, 4))
    seg[0, 0] = 7  # past the 3 classes
    seg[1, 1] = probe.IGNORE
    loss = probe.probe_losses({"seg": head}, feats, {"image": image, "seg": seg})
    logits = head(feats, (4, 4)).permute(0, 2, 3, 1)  # (2, 4, 4, 3) a row per pixel
    want = F.cross_entropy(logits[seg < 3], seg[seg < 3])  # the labelled pixels alone
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)

    empty = torch.full((2, 4, 4), probe.IGNORE)
    loss = probe.probe_losses({"seg": head}, feats, {"image": image, "seg": empty})
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in head.parameters())


# ----------------------------------------------------------------------------- the generated scenes
def test_synthetic_scenes_label_what_is_painted_nearest_on_top():
    images = SyntheticImages(24, 40, 32, "val")
    scenes = probe.SyntheticScenes(images, lambda *x: x)  # no transform: the raw tensors
    for i in range(24):
        item = scenes[i]
        img, label, parts = images.render(i, far_to_near=True)
        _, _, drawn = images.render(i)  # the classification image's own order
        assert sorted(r for _, r, _ in parts) == sorted(r for _, r, _ in drawn)  # same draws
        assert torch.equal(item["image"], (img * 255).round().to(torch.uint8))
        z = 0.7 + 0.7 * (label * 0.618034 % 1.0)
        for y, x in [(3, 5), (16, 16), (20, 9), (28, 30), (10, 25)]:
            covering = [(r, p) for p, r, m in parts if m[y, x]]  # every instance over the pixel
            if covering:  # the nearest (largest) one is seen
                r, p = max(covering)
                assert item["seg"][y, x] == p + 1
                assert float(item["depth"][y, x]) == pytest.approx(z * 0.45 * 32 / r)
            else:  # the floor: 7 z at the top, 4 z at the bottom
                assert item["seg"][y, x] == 0
                assert float(item["depth"][y, x]) == pytest.approx(z * (7 - 3 * (y + 0.5) / 32))
        assert 1.4 <= float(item["depth"].min()) and float(item["depth"].max()) <= 9.8
    assert torch.equal(scenes[3]["depth"], scenes[3]["depth"])  # a pure function of i


# ----------------------------------------------------------------------------- the frozen backbone
def test_patch_features_are_the_model_tokens_and_the_backbone_stays_frozen():
    torch.manual_seed(0)
    model = build_model("micro", "vmoe", num_classes=10, img_size=16, patch_size=4, num_experts=4)
    images = torch.randn(3, 3, 16, 16)
    model.train()  # the probe evaluates it anyway, and gives the flag back
    patches, cls = probe.patch_features(model, images)
    assert model.training
    with torch.no_grad():
        tokens, _ = model.eval().forward_features(images)  # (3, 17, 96)
    assert torch.allclose(patches.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-6)
    assert torch.allclose(cls, tokens[:, 0], atol=1e-6)
    two, _ = probe.patch_features(model, images, blocks=2)  # (3, 2·96, 4, 4)
    assert two.shape == (3, 192, 4, 4) and torch.allclose(two[:, 96:], patches, atol=1e-6)

    args = train.get_args_parser().parse_args([*TEACHER[:8], "--synthetic-train-size", "40"])
    args.synthetic_val_size, args.img_size, args.nb_classes = 16, 16, 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = probe.dense_probes(model, args, torch.device("cpu"), ["seg", "depth"], epochs=1)
    assert set(res) == {"seg_miou", "depth_rmse"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unchanged
    assert all(p.grad is None for p in model.parameters())  # no gradient ever reached it
    again = probe.dense_probes(model, args, torch.device("cpu"), ["seg", "depth"], epochs=1)
    assert again == res  # seeded


def test_a_batch_without_a_label_makes_no_step():
    """train_probes skips a batch with no valid depth: the heads come out as if it were not in
    the loader (and finite), where its NaN loss used to reach every weight."""
    torch.manual_seed(0)
    model = build_model("micro", "dense", num_classes=10, img_size=16, patch_size=4)
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    measured = {"image": image, "depth": 1 + 8 * torch.rand(4, 16, 16, generator=g)}
    unmeasured = {"image": image, "depth": torch.zeros(4, 16, 16)}  # no valid pixel
    trained = []
    for loader in ([unmeasured, measured], [measured]):
        torch.manual_seed(2)
        D = model.embed_dim
        heads = torch.nn.ModuleDict({"depth": probe.LinearHead(D, 1, with_cls_dim=D)})
        probe.train_probes(model, heads, loader, torch.device("cpu"), epochs=1, lr=1e-2)
        trained.append(heads.state_dict())
    skipped, alone = trained
    assert all(torch.isfinite(v.float()).all() for v in skipped.values())
    assert all(torch.equal(skipped[k], alone[k]) for k in alone)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train.main(train.get_args_parser().parse_args([*TEACHER, "--output-dir", str(out)]))
    return out / "checkpoint.pt"


def test_a_trained_teacher_makes_better_probes_than_a_random_network(teacher, capsys):
    # the margins measured here (docs/m2ot.md): mIoU 42.2 vs 37.7, RMSE 1.47 vs 1.58
    argv = ["--checkpoint", teacher, "--seg-probe", "--depth-probe", "--batch-size", "32"]
    trained = ev.cli([str(a) for a in argv] + ["--json"])
    assert json.loads(capsys.readouterr().out)["seg_miou"] == trained["seg_miou"]
    ckpt = torch.load(teacher, weights_only=False)
    torch.manual_seed(0)
    ckpt["model"] = build_model(**ckpt["model_args"]).state_dict()  # the same net, random
    torch.save(ckpt, teacher.with_name("random.pt"))
    random = ev.cli(["--checkpoint", str(teacher.with_name("random.pt")), *argv[2:]])
    assert trained["top1"] > 50 and random["top1"] < 10
    assert trained["seg_miou"] > random["seg_miou"] + 2
    assert trained["depth_rmse"] < 0.97 * random["depth_rmse"]


# ----------------------------------------------------------------------------- ADE20K and NYUd
def fake_ade20k(root, n=3):
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.new("RGB", (48, 40), (i * 60, 90, 30)).save(
                root / "images" / split / f"{name}.jpg"
            )
            label = torch.arange(48 * 40).reshape(40, 48) % 151  # 0 ("other") .. 150
            Image.fromarray(label.to(torch.uint8).numpy()).save(
                root / "annotations" / split / f"{name}.png"
            )


def fake_nyud(root, n=3):
    for split in ("train", "test"):
        scene = root / split / "bedroom_0001"
        scene.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (48, 40), (i * 60, 90, 30)).save(scene / f"rgb_{i:05d}.jpg")
            mm = (torch.arange(48 * 40).reshape(40, 48) * 7).numpy().astype("uint16")
            Image.fromarray(mm).save(scene / f"sync_depth_{i:05d}.png")


def test_ade20k_and_nyud_readers(tmp_path):
    fake_ade20k(tmp_path / "ade")
    fake_nyud(tmp_path / "nyu")
    args = train.get_args_parser().parse_args(["--img-size", "16"])
    args.data, args.data_path = "ade20k", tmp_path / "ade"
    val, classes = probe.build_dense_dataset(False, args)
    item = val[1]
    assert classes == 150 and len(val) == 3 and item["image"].shape == (3, 16, 16)
    raw = torch.arange(48 * 40).reshape(40, 48) % 151
    assert set(item["seg"].unique().tolist()) <= set((raw - 1).unique().tolist()) | {255}
    full = probe.PairedFolder(val.pairs, "seg", lambda *x: x)[0]["seg"]  # no resize: every pixel
    assert torch.equal(full, torch.where(raw == 0, 255, raw - 1))
    args.data, args.data_path = "nyud", tmp_path / "nyu"
    train_set, classes = probe.build_dense_dataset(True, args)
    assert classes is None and len(train_set) == 3 and train_set[0]["depth"].shape == (16, 16)
    full = probe.PairedFolder(train_set.pairs, "depth", lambda *x: x)[2]["depth"]
    assert torch.allclose(full, torch.arange(48 * 40).reshape(40, 48) * 7 / 1000)


def test_ade20k_labels_reduce_zero_and_keep_255_ignored(tmp_path):
    """mmseg's reduce_zero_label: 0 ("other") -> IGNORE, v -> v − 1, and a raw 255 stays
    IGNORE (not 254, a class index past ADE20K's 150)."""
    raw = torch.tensor([[0, 1, 2, 150], [151, 254, 255, 0]], dtype=torch.uint8)  # (2, 4)
    Image.fromarray(raw.numpy()).save(tmp_path / "label.png")
    Image.new("RGB", (4, 2)).save(tmp_path / "image.jpg")
    pairs = [(tmp_path / "image.jpg", tmp_path / "label.png")]
    seg = probe.PairedFolder(pairs, "seg", lambda *x: x)[0]["seg"]  # no resize: every pixel
    ignore = probe.IGNORE
    assert seg.tolist() == [[ignore, 0, 1, 149], [150, 253, ignore, ignore]]


def test_eval_probes_ade20k_and_nyud_folders(teacher, tmp_path, capsys):
    fake_ade20k(tmp_path / "ade", n=6)
    fake_nyud(tmp_path / "nyu", n=6)
    common = ["--checkpoint", str(teacher), "--probe-epochs", "1", "--batch-size", "4", "--json"]
    ev.cli([*common, "--data", "ade20k", "--data-path", str(tmp_path / "ade"), "--seg-probe"])
    res = json.loads(capsys.readouterr().out)
    assert 0 <= res["seg_miou"] <= 100 and "top1" not in res and "depth_rmse" not in res
    ev.cli([*common, "--data", "nyud", "--data-path", str(tmp_path / "nyu"), "--depth-probe"])
    res = json.loads(capsys.readouterr().out)
    assert res["depth_rmse"] > 0 and "seg_miou" not in res
    ev.cli([*common[:-1], "--data", "nyud", "--data-path", str(tmp_path / "nyu"), "--depth-probe"])
    printed = capsys.readouterr().out.splitlines()  # the table: the data set, then the score
    assert printed[0].endswith("epoch 7; nyud") and printed[1].startswith("depth RMSE ")


@pytest.mark.parametrize(
    "case, flags, message",
    [
        ("no layout", ["--data", "ade20k", "--seg-probe"], "no images/training/X.jpg"),
        ("no depth", ["--data", "ade20k", "--depth-probe"], "has no depth labels"),
        ("no seg", ["--data", "nyud", "--seg-probe"], "has no seg labels"),
        ("no probe", ["--data", "nyud"], "give --seg-probe/--depth-probe"),
        ("classes only", ["--data", "cifar10", "--seg-probe"], "has no seg labels"),
        ("blocks", ["--seg-probe", "--probe-blocks", "7"], "the model has 6 blocks"),
    ],
)
def test_bad_probe_input_is_one_line(teacher, tmp_path, capsys, case, flags, message):
    (tmp_path / "ade").mkdir()
    argv = ["--checkpoint", str(teacher), "--data-path", str(tmp_path / "ade"), *flags]
    with pytest.raises(SystemExit) as exit:
        ev.cli(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code != 0 and len(err.splitlines()) == 1 and message in err, err


def test_a_missing_label_file_is_named(tmp_path, capsys):
    fake_ade20k(tmp_path / "ade")
    missing = next((tmp_path / "ade" / "annotations" / "validation").glob("*.png"))
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=missing.name):
        probe.label_pairs("ade20k", tmp_path / "ade", False)


def test_a_backbone_file_is_probed_on_the_runs_data(teacher, tmp_path, capsys):
    """--backbone: a dense ViT file (here the run's own weights, read as a teacher file is)
    probed on the run's data gives the run's own probe numbers; at a coarser patch grid it
    runs with resampled positions."""
    common = ["--checkpoint", str(teacher), "--seg-probe", "--depth-probe", "--probe-epochs", "1"]
    own = ev.cli([*common, "--json"])
    capsys.readouterr()
    ckpt = torch.load(teacher, weights_only=False)
    torch.save({"model": ckpt["model"]}, tmp_path / "weights.pth")  # a bare state dict
    other = ev.cli([*common, "--backbone", str(tmp_path / "weights.pth")])
    assert other["seg_miou"] == own["seg_miou"] and other["depth_rmse"] == own["depth_rmse"]
    assert other["checkpoint"] == str(tmp_path / "weights.pth") and "top1" not in other
    assert "a frozen backbone on the data of" in capsys.readouterr().out
    torch.manual_seed(0)  # a tiny ViT at patch 8: a 4 x 4 grid on the run's 32 pixels
    wide = build_model("tiny", "dense", num_classes=10, img_size=64, patch_size=8)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    res = ev.cli([*common, "--backbone", str(tmp_path / "wide.pth"), "--json"])
    assert 0 < res["seg_miou"] <= 100 and res["depth_rmse"] > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "the probes alone; give --seg-probe/--depth-probe"),
        (["--seg-probe", "--probe-blocks", "13"], "the model has 12 blocks"),
    ],
)
def test_bad_backbone_input_is_one_line(teacher, tmp_path, capsys, flags, message):
    torch.save(build_model("tiny", "dense", num_classes=10).state_dict(), tmp_path / "t.pth")
    with pytest.raises(SystemExit) as exit:
        ev.cli(["--checkpoint", str(teacher), "--backbone", str(tmp_path / "t.pth"), *flags])
    err = capsys.readouterr().err.strip()
    assert exit.value.code != 0 and len(err.splitlines()) == 1 and message in err, err
