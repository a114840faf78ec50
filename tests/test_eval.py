"""eval.py: the metrics against hand-computed values, and the command line on real train.py runs.

The runs are `micro` at 32x32 / patch 4 (64 patches + CLS = 65 tokens), E = 8, a few dozen
generated images: a dense teacher (1 epoch) and a TGR student guided by it for the first of
its 2 epochs, so its final checkpoint is one taken after the switch.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import eval as ev
import probe
import train
from augment import MEAN, STD
from data import normalize, watch_images, watch_indices
from m2ot import (
    favourite_counts,
    preference_sharpness,
    preference_table,
    teacher_preference,
    teacher_preferences,
)
from moe import build_model
from report import fmt_table, for_display
from router import capacity_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, N = 8, 65  # experts, tokens per 32x32 image with 4x4 patches (+ CLS)
MICRO_KW = dict(num_classes=10, img_size=32, patch_size=4)
TINY = (
    "--model micro --img-size 32 --patch-size 4 --experts 8 --batch-size 16 --nb-classes 10 "
    "--synthetic-train-size 64 --synthetic-val-size 32 --warmup-epochs 0 --lr 2e-3 "
    "--print-freq 1000 --watch-size 16 --num-workers 0 --mixup 0 --cutmix 0 --aa none --reprob 0"
).split()


# ----------------------------------------------------------------------------- metrics by hand
def test_metric_functions_against_hand_values():
    top1 = torch.tensor([0, 0, 0, 1])
    u = ev.expert_utilisation(top1, 4)
    assert u.tolist() == [0.75, 0.25, 0.0, 0.0]
    # Ĥ = −(¾ log ¾ + ¼ log ¼) / log 4, written out
    assert ev.normalised_entropy(u) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    )
    assert ev.normalised_entropy(torch.tensor([1.0, 0, 0, 0])) == 0.0
    assert ev.routing_consistency(top1, torch.tensor([0, 1, 0, 1])) == 0.75
    student = torch.tensor([[2.0, 1.0], [0.0, 1.0], [5.0, 0.0]])  # argmax 0, 1, 0
    teacher = torch.tensor([[9.0, 1.0], [3.0, 1.0], [0.0, 1.0]])  # argmax 0, 0, 1
    assert float(ev.teacher_agreement(student, teacher)) == pytest.approx(1 / 3)


def test_stability_metrics_against_loops():
    """Soft consistency, consistency by margin, token entropy and the last-fluctuation curve
    against the obvious loops: the study's confidence-proof measures (experiments/)."""
    torch.manual_seed(0)
    logits_a, logits_b = torch.randn(50, 4), torch.randn(50, 4)
    p_a, p_b = logits_a.softmax(-1), logits_b.softmax(-1)
    tv = sum(0.5 * sum(abs(p_a[t, e] - p_b[t, e]) for e in range(4)) for t in range(50)) / 50
    assert ev.soft_consistency(p_a, p_b) == pytest.approx(1 - float(tv), rel=1e-5)
    assert ev.soft_consistency(p_a, p_a) == pytest.approx(1.0)
    gap = ev.top2_gap(logits_a)
    for t in range(50):
        best = sorted(logits_a[t].tolist(), reverse=True)
        assert float(gap[t]) == pytest.approx(best[0] - best[1], abs=1e-6)
    top_a, top_b = p_a.argmax(-1), p_b.argmax(-1)
    bins = ev.consistency_by_margin(top_a, top_b, gap, edges=(0.3, 1.0))
    for b, (lo, hi) in enumerate([(0, 0.3), (0.3, 1.0), (1.0, math.inf)]):
        members = [t for t in range(50) if lo <= gap[t] < hi]
        same = sum(int(top_a[t] == top_b[t]) for t in members)
        assert bins[b][1] == pytest.approx(len(members) / 50)
        assert bins[b][0] == (pytest.approx(same / len(members)) if members else None)
    ent = sum(-sum(p * math.log(p) for p in row.tolist()) for row in p_a) / 50 / math.log(4)
    assert ev.token_entropy(p_a) == pytest.approx(ent, rel=1e-5)
    assert ev.token_entropy(torch.full((3, 4), 0.25)) == pytest.approx(1.0)
    # four checks of three tokens: token 0 never changes, token 1 changes last between checks
    # 2 and 3, token 2 only between checks 0 and 1
    checks = [torch.tensor(x) for x in ([0, 1, 2], [0, 1, 3], [0, 1, 3], [0, 2, 3])]
    curve = ev.last_fluctuation(checks)
    want = []
    for i in range(4):  # tokens whose expert changes between some later pair of checks
        later = [
            t for t in range(3) if any(checks[j][t] != checks[j - 1][t] for j in range(i + 1, 4))
        ]
        want.append(len(later) / 3)
    assert curve == pytest.approx(want) and curve == pytest.approx([2 / 3, 1 / 3, 1 / 3, 0])


def test_watch_routing_reads_every_router_kind():
    """Soft MoE's record has no logits: its top-2 gap comes from log p, the same gaps a
    softmax router's logits give (tested on V-MoE's record, where both exist)."""
    images = torch.randn(2, 3, 32, 32)
    for method in ("vmoe", "expert-choice", "softmoe"):
        model = build_model("micro", method, num_experts=4, **MICRO_KW)
        (top1, p, gap), _ = ev.watch_routing(model, images)
        assert top1.shape == gap.shape == (2 * 65,) and p.shape == (2 * 65, 4)
        assert (gap >= 0).all()
    vmoe = build_model("micro", "vmoe", num_experts=4, **MICRO_KW).eval()
    r = vmoe(images)[1][0]
    from_logits = ev.top2_gap(r.logits)
    r.logits = None
    torch.testing.assert_close(ev.top2_gap(ev.gap_scores(r)), from_logits, atol=1e-4, rtol=1e-4)


def test_lossfree_routes_by_its_bias_in_the_metrics():
    """With a selection bias (--method lossfree) the top-1 a metric reads is the router's
    choice, argmax (p + b), not argmax p."""
    model = build_model("micro", "lossfree", num_experts=4, bias_update_rate=0.01, **MICRO_KW)
    layer = model.blocks[model.moe_layers[0] - 1].mlp
    layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # expert 2 takes every token
    _, routings = model.eval()(torch.randn(2, 3, 32, 32))
    assert ev.top1_experts(routings[0]).eq(2).all()
    assert not routings[0].probs.argmax(-1).eq(2).all()


def test_patch_map_and_display():
    top1 = torch.arange(2 * (4 + 1))  # 2 images of CLS + 2x2 patches
    assert ev.patch_map(top1, 2).tolist() == [[[1, 2], [3, 4]], [[6, 7], [8, 9]]]
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    normalised = (pixels - mean[:, None, None]) / std[:, None, None]  # what train.py feeds
    torch.testing.assert_close(for_display(normalised), pixels.permute(0, 2, 3, 1))


class Scores(torch.nn.Module):
    """A 'model' whose class scores are its input: accuracy by construction, no routing."""

    def forward(self, images, route=None):
        return images, []


def test_evaluate_accuracy_by_hand():
    scores = torch.eye(6)[[0, 1, 2, 3]] + torch.arange(6) * 0.01  # top-1 = row, then 5, 4, ...
    targets = torch.tensor([0, 0, 5, 1])  # ranks 1, 6, 2, 5 of 6: top-1 1/4, top-5 3/4
    res = ev.evaluate(Scores(), [(scores, targets)], torch.device("cpu"))
    assert res["top1"] == pytest.approx(25.0)
    assert res["top5"] == pytest.approx(75.0)
    assert "routing_entropy" not in res  # no MoE layer: no routing keys


def forced(expert_of_token):
    """A 'teacher' whose router logits put token (b, n) on expert_of_token(b, n)."""

    def route(images):
        B = images.shape[0]
        b, n = torch.meshgrid(torch.arange(B), torch.arange(N), indexing="ij")
        one_hot = torch.nn.functional.one_hot(expert_of_token(b, n), E).float() * 10
        return [one_hot, one_hot]  # (B, N, E) for both MoE layers

    return route


def test_evaluate_with_a_known_router():
    torch.manual_seed(0)
    model = build_model("micro", "vmoe", 10, img_size=32, patch_size=4, num_experts=E, k=1)
    model.eval()
    loader = [(torch.randn(8, 3, 32, 32), torch.arange(8))]  # one group of 8 images, 520 tokens
    cpu = torch.device("cpu")
    everyone_to_0 = forced(lambda b, n: torch.zeros_like(n))
    res = ev.evaluate(model, loader, cpu, route_logits=everyone_to_0, route_by_teacher=True)
    assert res["utilisation"] == [[1.0] + [0.0] * 7] * 2  # one-hot
    assert res["routing_entropy"] == [0.0, 0.0]
    C = capacity_for(8 * N, E, 1, 1.05)  # expert 0 keeps C of the 520 tokens, drops the rest
    assert res["dropped_frac"] == pytest.approx([1 - C / (8 * N)] * 2)
    round_robin = forced(lambda b, n: (b * N + n) % E)  # 520 tokens, 65 per expert: uniform
    res = ev.evaluate(model, loader, cpu, route_logits=round_robin, route_by_teacher=True)
    assert res["utilisation"] == [[1 / E] * E] * 2
    assert res["routing_entropy"] == pytest.approx([1.0, 1.0])
    assert res["dropped_frac"] == [0.0, 0.0]  # 65 <= C: nothing dropped
    # agreement is the student's own router against the teacher's: compute it the long way
    images = loader[0][0]
    _, routings = model(images)
    own = [r.probs.argmax(-1) for r in routings]
    res = ev.evaluate(model, loader, cpu, route_logits=round_robin)  # the student routes, compared
    want = [float((o == (torch.arange(8 * N) % E)).float().mean()) for o in own]
    assert res["teacher_agreement"] == pytest.approx(want)
    want = [ev.expert_utilisation(o, E).tolist() for o in own]
    assert res["utilisation"] == [pytest.approx(u, abs=1e-4) for u in want]


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"dense": .../checkpoint.pt, "tgr": .../checkpoint.pt, "vmoe": ...} from train.py."""
    root, paths = tmp_path_factory.mktemp("runs"), {}
    for name, extra in [
        ("dense", ["--method", "dense", "--epochs", "1"]),
        (
            "tgr",
            ["--method", "tgr", "--epochs", "2", "--teacher", str(root / "dense/checkpoint.pt")],
        ),
    ]:
        out = root / name
        train.main(train.get_args_parser().parse_args([*TINY, "--output-dir", str(out), *extra]))
        paths[name] = str(out / "checkpoint.pt")
    return paths


def cli(*argv):
    """eval.py's main in this process: (result dict, printed text)."""
    return ev.cli([str(a) for a in argv])


def cli_json(capsys, *argv):
    cli(*argv, "--json")
    return json.loads(capsys.readouterr().out)


def test_json_has_the_documented_keys(runs, capsys):
    res = cli_json(capsys, "--checkpoint", runs["tgr"])
    keys = {"top1", "top5", "moe_layers", "routing_entropy", "utilisation", "dropped_frac"}
    assert keys | {"teacher_agreement", "route", "method", "epoch", "images"} <= set(res)
    assert res["moe_layers"] == [4, 6] and res["route"] == "student" and res["epoch"] == 1
    for util, h in zip(res["utilisation"], res["routing_entropy"]):
        assert len(util) == E and sum(util) == pytest.approx(1, abs=1e-3)
        assert h == pytest.approx(ev.normalised_entropy(torch.tensor(util)), abs=1e-3)
    assert all(0 <= a <= 1 for a in res["teacher_agreement"])


def test_route_teacher_after_the_switch(runs, capsys):
    """TGR frees the teacher at the switch, but its last teacher router stays in the checkpoint."""
    ckpt = torch.load(runs["tgr"], weights_only=True)
    assert ckpt["switch"]["done"] and ckpt["teacher_router"] is not None
    student = cli_json(capsys, "--checkpoint", runs["tgr"])
    teacher = cli_json(capsys, "--checkpoint", runs["tgr"], "--route", "teacher")
    assert teacher["route"] == "teacher"
    assert teacher["utilisation"] != student["utilisation"]  # another router chose


def test_compare_with_itself_and_with_a_fresh_router(runs, capsys, tmp_path):
    res = cli_json(capsys, "--checkpoint", runs["tgr"], "--compare", runs["tgr"])
    assert res["consistency"] == [1.0, 1.0]
    ckpt = torch.load(runs["tgr"], weights_only=True)
    torch.manual_seed(1)
    for block in (4, 6):  # a router nobody trained: agreement with it is chance, about 1/E
        key = f"blocks.{block - 1}.mlp.router.weight"
        ckpt["model"][key] = torch.nn.init.normal_(torch.empty_like(ckpt["model"][key]), std=0.5)
    torch.save(ckpt, tmp_path / "fresh.pt")
    res = cli_json(capsys, "--checkpoint", runs["tgr"], "--compare", tmp_path / "fresh.pt")
    assert all(abs(c - 1 / E) < 0.08 for c in res["consistency"]), res["consistency"]


def test_a_moved_teacher_and_the_eval_capacity(runs, capsys, tmp_path):
    res = cli("--checkpoint", runs["tgr"], "--teacher", tmp_path / "gone.pt")
    assert "teacher_agreement" not in res and "top1" in res  # the rest is still measured
    assert "note: no teacher agreement" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # routing by the teacher cannot do without it
        cli("--checkpoint", runs["tgr"], "--teacher", tmp_path / "gone.pt", "--route", "teacher")
    roomy = cli_json(capsys, "--checkpoint", runs["tgr"], "--eval-capacity-factor", E)
    assert roomy["dropped_frac"] == [0.0, 0.0]  # cf = E: every expert could take every token


def test_image_folder_needs_only_its_val_split(runs, capsys, tmp_path):
    """eval.py reads val/ alone: no train/ folder (ImageNet's 1.28M files are never scanned)."""
    for c in range(10):
        (tmp_path / "val" / f"class{c}").mkdir(parents=True)
        Image.new("RGB", (32, 32), (25 * c, 0, 0)).save(tmp_path / "val" / f"class{c}" / "a.png")
    res = cli_json(capsys, "--checkpoint", runs["tgr"], "--data", "folder", "--data-path", tmp_path)
    assert res["images"] == 10 and 0 <= res["top1"] <= 100


def test_plots_are_pngs_of_the_expected_size(runs, tmp_path):
    res = cli("--checkpoint", runs["tgr"], "--plots", tmp_path, "--map-images", 3)
    names = sorted(os.path.basename(p) for p in res["plots"])
    assert names == ["curves.png", "expert_maps.png", "utilisation.png"]
    # figsize × 100 dpi: 4 in per MoE layer × 3; 10 × 7; (image + 2 layers × student, teacher)
    # columns × 3 rows, 2 in each
    want = {
        "utilisation.png": (800, 300),
        "curves.png": (1000, 700),
        "expert_maps.png": (1000, 600),
    }
    for name, size in want.items():
        with Image.open(tmp_path / name) as img:
            assert img.size == size
            assert (
                len(img.convert("RGB").getcolors(maxcolors=1 << 20) or range(2)) > 20
            )  # not blank


def test_a_dense_checkpoint_says_no_routing(runs, capsys, tmp_path):
    res = cli("--checkpoint", runs["dense"], "--plots", tmp_path)
    assert "dense: no routing" in capsys.readouterr().out
    assert res["moe_layers"] == [] and "utilisation" not in res
    assert [os.path.basename(p) for p in res["plots"]] == ["curves.png"]  # accuracy curve only


def test_script_runs_as_a_command(runs):
    """`python eval.py` (train.py imports eval.py: the import order must work both ways)."""
    proc = subprocess.run(
        [sys.executable, "eval.py", "--checkpoint", runs["tgr"]],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| MoE block | routing entropy" in proc.stdout and "teacher agreement" in proc.stdout


@pytest.mark.parametrize(
    "case",
    ["missing", "not-ours", "route-teacher-on-dense", "compare-other-arch", "no-matplotlib"],
)
def test_bad_input_is_one_line(runs, case, tmp_path, capsys, monkeypatch):
    argv, want = ["--checkpoint", runs["tgr"]], ""
    if case == "missing":
        argv, want = ["--checkpoint", tmp_path / "nope.pt"], "no such checkpoint"
    elif case == "not-ours":
        torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "weights.pth")
        argv, want = ["--checkpoint", tmp_path / "weights.pth"], "not a train.py checkpoint"
    elif case == "route-teacher-on-dense":
        argv, want = ["--checkpoint", runs["dense"], "--route", "teacher"], "no teacher router"
    elif case == "compare-other-arch":
        argv, want = [*argv, "--compare", runs["dense"]], "another architecture"
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        argv, want = [*argv, "--plots", tmp_path / "p"], "needs matplotlib"
    with pytest.raises(SystemExit) as exit_:
        cli(*argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and want in err
    assert err.count("\n") == 1  # one line, no traceback


# ----------------------------------------------------------------------------- without the trainer
def test_eval_imports_nothing_of_the_trainer():
    code = "import sys, eval; print('train' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_an_old_checkpoint_without_model_args_still_loads(runs, capsys, tmp_path):
    """Checkpoints written before `model_args` / `teacher_args` existed: rebuilt from flags."""
    new = cli_json(capsys, "--checkpoint", runs["tgr"])
    ckpt = torch.load(runs["tgr"], weights_only=True)
    del ckpt["model_args"], ckpt["teacher_args"]
    torch.save(ckpt, tmp_path / "old.pt")
    old = cli_json(capsys, "--checkpoint", tmp_path / "old.pt")
    for key in ("top1", "utilisation", "teacher_agreement", "dropped_frac"):
        assert old[key] == new[key], key


# ----------------------------------------------------------------------------- the watch set
def test_watch_set_is_class_stratified_and_seeded(tmp_path):
    """An ImageFolder is sorted by class: the watch set is not its first images (1-2 classes)."""
    from torchvision.datasets import ImageFolder

    for c in range(12):
        (tmp_path / f"class{c:02d}").mkdir()
        for i in range(5):  # 12 classes x 5 images, class-ordered as ImageFolder lists them
            Image.new("RGB", (8, 8), (20 * c, 10 * i, 0)).save(tmp_path / f"class{c:02d}/{i}.png")
    folder = ImageFolder(tmp_path)
    labels = torch.tensor(folder.targets)
    for n in (6, 16, 40):
        idx = watch_indices(labels, n)
        assert len(set(idx.tolist())) == len(idx) == n  # n distinct images
        classes = labels[idx].unique()
        assert len(classes) >= min(12, n // 2)  # at least half the classes ...
        assert len(classes) == min(12, n)  # ... and in fact every class, round-robin
        counts = labels[idx].bincount(minlength=12)
        assert counts.max() - counts[counts > 0].min() <= 1  # as even as n allows
    assert torch.equal(watch_indices(labels, 16), watch_indices(labels, 16))  # seeded
    assert not torch.equal(watch_indices(labels, 16), watch_indices(labels, 16, seed=1))
    assert watch_indices(labels, 16).tolist() != list(range(16))  # not the first images

    # watch_images reads those very images, labels from the folder's own list (none decoded)
    def first_pixel(im):  # (3, 1, 1) uint8: the image's colour
        return torch.tensor(im.getpixel((0, 0)), dtype=torch.uint8).view(3, 1, 1)

    images = watch_images(ImageFolder(tmp_path, transform=first_pixel), 16)
    picked = [first_pixel(folder[int(i)][0]) for i in watch_indices(labels, 16)]
    assert torch.equal(images, normalize(torch.stack(picked)))


# ----------------------------------------------------------------------------- M²oT's metrics
def knn_by_hand(bank, bank_labels, queries, labels, classes, k, T):
    """DINO's weighted k-NN, one query at a time in plain Python."""
    correct = 0
    for z, y in zip(queries.tolist(), labels.tolist()):
        cos = [
            sum(a * b for a, b in zip(z, x)) / math.hypot(*z) / math.hypot(*x)
            for x in bank.tolist()
        ]
        nearest = sorted(range(len(cos)), key=lambda j: -cos[j])[:k]
        votes = [0.0] * classes
        for j in nearest:
            votes[int(bank_labels[j])] += math.exp(cos[j] / T)
        correct += max(range(classes), key=lambda c: votes[c]) == y
    return 100 * correct / len(labels)


@pytest.mark.parametrize("k", [1, 5, 20, 100])
def test_knn_top1_against_a_loop(k, monkeypatch):
    g = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(40, 8, generator=g)
    bank_labels, labels = torch.randint(0, 5, (60,), generator=g), torch.randint(0, 5, (40,))
    want = knn_by_hand(bank, bank_labels, queries, labels, 5, k, 0.07)  # k = 100: all 60 vote
    assert probe.knn_top1(bank, bank_labels, queries, labels, 5, k) == pytest.approx(want)
    monkeypatch.setattr(probe, "KNN_CHUNK", 7 * 60)  # queries in chunks of 7: the same answer
    assert probe.knn_top1(bank, bank_labels, queries, labels, 5, k) == pytest.approx(want)


def test_knn_top1_on_separated_clusters():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(25)  # (100,) 4 classes
    feats = 10 * torch.eye(4, 16)[labels] + torch.randn(100, 16, generator=g)  # far apart
    assert probe.knn_top1(feats[:80], labels[:80], feats[80:], labels[80:], 4) == 100.0
    assert probe.knn_top1(feats[:80], labels[:80], feats[80:], (labels[80:] + 1) % 4, 4) == 0.0


def test_teacher_preference_against_a_loop():
    g = torch.Generator().manual_seed(0)
    T, E, K, NT = 40, 5, 2, 3
    mix = torch.randn(T, E, NT, generator=g).softmax(-1)  # π: (T, E, N_T)
    experts = torch.rand(T, E - 1, generator=g).topk(K, dim=-1).indices  # expert 4: never chosen
    kept = torch.rand(T, K, generator=g) < 0.7
    pref = teacher_preference(mix, experts, kept, E)
    for e in range(E):
        took = [t for t in range(T) for k in range(K) if kept[t, k] and experts[t, k] == e]
        if not took:
            assert e == E - 1 and pref[e].isnan().all()  # took nothing: a NaN row
            continue
        want = [sum(float(mix[t, e, i]) for t in took) / len(took) for i in range(NT)]
        assert pref[e].tolist() == pytest.approx(want)
        assert float(pref[e].sum()) == pytest.approx(1.0)  # still a distribution over teachers


def test_preference_sharpness_by_hand():
    nan = float("nan")
    assert preference_sharpness(torch.tensor([[0.5, 0.5], [1.0, 0.0], [nan, nan]])) == 0.75
    assert preference_sharpness(torch.full((4, 3), 1 / 3)) == pytest.approx(1 / 3)  # none
    assert preference_sharpness(torch.eye(3)) == 1.0  # every expert serves one teacher


def test_favourite_counts_tell_one_teacher_from_a_split():
    nan = float("nan")
    same = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [nan, nan]])  # all lean to A
    split = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.2, 0.8]])
    assert preference_sharpness(same) == pytest.approx(preference_sharpness(split))  # 0.8 each
    assert favourite_counts(same) == [3, 0]  # the expert without a token counts for none
    assert favourite_counts(split) == [2, 2]
    assert favourite_counts(torch.eye(3)[[0, 0, 2]]) == [2, 0, 1]


def m2ot_student(**options):
    """An untrained M²oT student: micro, no classifier, E = 4, K = 2, MoE in blocks 2, 4, 6."""
    torch.manual_seed(0)
    return build_model(
        "micro",
        method="vmoe",  # what --method m2ot builds (m2ot_flags.BUILT_AS)
        num_classes=0,
        img_size=32,
        patch_size=4,
        num_experts=4,
        k=2,
        moe_layers=(2, 4, 6),
        **options,
    )


def test_teacher_preferences_sum_over_batches_and_restore_the_layers():
    """Batches of 4 + 2 images give the preference of one pass over all 6 (sums and counts,
    not a mean of means); nothing is dropped (cf 4), so the batching routes alike."""
    from m2ot import TeacherAwareRouter

    model = m2ot_student(eval_capacity_factor=4.0).eval()
    torch.manual_seed(1)
    routers = torch.nn.ModuleList(TeacherAwareRouter(96, 4, 2) for _ in range(3))
    for pi in routers:
        torch.nn.init.normal_(pi.weight)  # strong preferences, not π's near-uniform init
    images = torch.randn(6, 3, 32, 32)
    got, per_token = teacher_preferences(model, routers, images, batch_size=4)
    layers = [model.blocks[i - 1].mlp for i in model.moe_layers]
    assert not any(layer.keep_expert_outputs for layer in layers)  # restored
    for layer in layers:
        layer.keep_expert_outputs = True
    with torch.no_grad():
        _, routings = model(images)
        want = [
            teacher_preference(pi(r.inputs), r.experts, r.kept, 4)
            for pi, r in zip(routers, routings)
        ]
        # per token: mean over the kept assignments (t, k) of max_i π(t, e_{t,k}, i)
        want_token = []
        for pi, r in zip(routers, routings):
            mix = pi(r.inputs)  # (T, E, N_T)
            peaks = [
                float(mix[t, r.experts[t, k]].max())
                for t in range(r.experts.shape[0])
                for k in range(r.experts.shape[1])
                if r.kept[t, k]
            ]
            want_token.append(sum(peaks) / len(peaks))
    torch.testing.assert_close(got, want, equal_nan=True)
    assert per_token == pytest.approx(want_token, rel=1e-5)
    teacher_preferences(model, routers, images)
    assert all(layer.keep_expert_outputs for layer in layers)  # left as the caller set them


def test_no_classifier_no_top1_and_the_knn_of_its_cls_token():
    model = m2ot_student().eval()
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(12) % 3
    bank, queries = [(images[:8], labels[:8])], [(images[8:], labels[8:])]
    cpu = torch.device("cpu")
    res = ev.evaluate(model, bank + queries, cpu)
    assert "top1" not in res and "top5" not in res and len(res["utilisation"]) == 3
    feats, got_labels = probe.cls_embeddings(model, bank + queries, cpu)
    with torch.no_grad():
        batches = [model.forward_features(normalize(x))[0] for x, _ in bank + queries]
    want = torch.cat(batches)[:, 0]  # (12, D) the CLS token after the final norm
    torch.testing.assert_close(feats, want)
    assert torch.equal(got_labels, labels)
    assert probe.knn_eval(model, bank, queries, cpu, k=3) == pytest.approx(
        probe.knn_top1(want[:8], labels[:8], want[8:], labels[8:], 3, k=3)
    )


CLS_RANKS = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import probe
from data import SyntheticImages
from moe import build_model
from torch.utils.data import DataLoader, DistributedSampler
dist.init_process_group("gloo")
torch.manual_seed(0)
model = build_model("micro", "dense", num_classes=0, img_size=16, patch_size=4)
data = SyntheticImages(11, 3, 16, "val")  # 11 images: the sampler pads rank 1 with image 0
sampler = DistributedSampler(data, dist.get_world_size(), dist.get_rank(), shuffle=False)
loader = DataLoader(data, 4, sampler=sampler)
feats, labels = probe.cls_embeddings(model, loader, torch.device("cpu"))
if dist.get_rank() == 0:
    torch.save((feats, labels), {out!r})
dist.destroy_process_group()
"""


def test_cls_embeddings_gather_every_rank(tmp_path):
    """Two gloo processes embed their shards; each gets all of them (rank 0's shard, then
    rank 1's), the numbers of one process."""
    from data import SyntheticImages

    script, out = tmp_path / "ranks.py", tmp_path / "feats.pt"
    script.write_text(CLS_RANKS.format(root=ROOT, out=str(out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*cmd, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    feats, labels = torch.load(out)
    torch.manual_seed(0)
    model = build_model("micro", "dense", num_classes=0, img_size=16, patch_size=4)
    whole = list(torch.utils.data.DataLoader(SyntheticImages(11, 3, 16, "val"), 11))
    want, want_labels = probe.cls_embeddings(model, whole, torch.device("cpu"))
    order = [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 0]  # DistributedSampler's shards, padded
    torch.testing.assert_close(feats, want[order], atol=1e-5, rtol=1e-5)
    assert labels.tolist() == want_labels[order].tolist()


@pytest.fixture(scope="module")
def m2ot_run(tmp_path_factory):
    """A fake M²oT checkpoint: `m2ot_student`, random π for N_T = 2 teachers, TINY's flags."""
    model = m2ot_student()
    flags = vars(train.get_args_parser().parse_args(TINY))
    flags.update(method="m2ot", experts=4, topk=2, teachers=["runs/a/dino.pt", "torchvision:clip"])
    torch.manual_seed(1)
    state = {f"pi.{j}.weight": torch.randn(4 * 2, 96) for j in range(3)}  # (E·N_T, D)
    state["heads.0.cls.0.weight"] = torch.zeros(96, 96)  # the rest of the module: ignored
    path = tmp_path_factory.mktemp("m2ot") / "checkpoint.pt"
    torch.save(
        {
            "model": model.state_dict(),
            # saved under M²oT's own method name, as runs written before BUILT_AS were
            "model_args": {**model.model_args, "method": "m2ot"},
            "args": flags,
            "epoch": 0,
            "m2ot": state,
        },
        path,
    )
    return path


def test_an_m2ot_checkpoint_knn_and_teacher_preference(m2ot_run, capsys):
    from data import SyntheticImages

    res = cli_json(capsys, "--checkpoint", m2ot_run, "--knn", "--watch-size", 16)
    assert "top1" not in res and "top5" not in res  # no classifier
    assert res["teachers"] == ["dino.pt", "torchvision:clip"]
    assert len(res["teacher_preference"]) == 3 == len(res["preference_sharpness"])
    for pref, sharpness in zip(res["teacher_preference"], res["preference_sharpness"]):
        assert len(pref) == 4 and all(len(row) == 2 for row in pref)  # E × N_T
        rows = [row for row in pref if None not in row]  # null: an expert with no watched token
        assert rows and all(sum(row) == pytest.approx(1, abs=1e-3) for row in rows)
        assert sharpness == pytest.approx(sum(map(max, rows)) / len(rows), abs=1e-3)
        assert 0.5 <= sharpness <= 1
    assert len(res["token_sharpness"]) == 3 and all(0.5 <= x <= 1 for x in res["token_sharpness"])
    for pref, counts, distinct in zip(
        res["teacher_preference"], res["favourite_counts"], res["distinct_favourites"]
    ):
        favourites = [max(range(2), key=row.__getitem__) for row in pref if None not in row]
        assert counts == [favourites.count(0), favourites.count(1)]
        assert distinct == len(set(favourites))
    # the bank: TINY's 64 train images as generated (at 32 px the eval transform keeps them)
    model = m2ot_student()
    whole = lambda split, n: list(torch.utils.data.DataLoader(SyntheticImages(n, 10, 32, split), n))
    want = probe.knn_eval(model, whole("train", 64), whole("val", 32), torch.device("cpu"))
    assert res["knn_top1"] == pytest.approx(want)
    printed = fmt_table({**res, "checkpoint": "c.pt"})
    assert printed.splitlines()[1] == f"k-NN top-1 {want:.2f}"  # and no top-1 before it
    assert "teacher preference" not in printed  # M²oT's section is m2ot.py's
    assert "teacher preference, block 6" in preference_table(res)
    assert "| expert | dino.pt | torchvision:clip |" in preference_table(res)
    # the routing table, then M²oT's own: sharpness per expert and per token, favourites
    printed += preference_table(res)
    heads = [line for line in printed.splitlines() if line.startswith("| MoE block")]
    assert "sharpness" not in heads[0]
    assert "per-token sharpness" in heads[1] and "experts per favourite" in heads[1]
    row = [line for line in printed.splitlines() if line.startswith("| 2 |")][1]
    counts = "/".join(map(str, res["favourite_counts"][0]))
    assert row.endswith(f"| {res['token_sharpness'][0]:.3f} | {counts} |")


def test_an_m2ot_checkpoint_plots_the_teacher_preference(m2ot_run, tmp_path):
    pytest.importorskip("matplotlib")
    res = cli("--checkpoint", m2ot_run, "--plots", tmp_path, "--watch-size", 16)
    assert "teacher_preference.png" in [os.path.basename(p) for p in res["plots"]]
    with Image.open(tmp_path / "teacher_preference.png") as img:
        assert img.size == (990, 270)  # 3 layers × (1.5 + 0.9 × 2 teachers) in × (1.3 + 0.35 × 4)
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or range(2)) > 20


def test_knn_on_a_classifier_checkpoint(runs, capsys):
    res = cli_json(capsys, "--checkpoint", runs["tgr"], "--knn", "--knn-k", 5)
    assert 0 <= res["top1"] <= 100 and 0 <= res["knn_top1"] <= 100
    assert "teacher_preference" not in res  # not an M²oT run
