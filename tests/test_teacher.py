"""teacher.py: our loader against timm's DeiT-III and torchvision's ViT, a project dense
checkpoint, bf16 against fp32, the stop-gradients of the TGR objective, and bad input; M²oT's
final-feature teachers against timm (DeiT-III, DINOv2 with and without registers, timm models)."""

import argparse
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from teacher_models import MICRO, MICRO_ARGS, ln2_outputs, perturb, save_micro

from errors import UsageError
from losses import routing_kl
from moe import MODELS, build_model
from pretrained import HEADS_BY_WIDTH, resample_pos_embed
from teacher import TeacherRouter, load_teacher, teacher_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_features(feats, refs, atol=1e-5):
    assert len(feats) == len(refs)
    for h, ref in zip(feats, refs):
        assert h.dtype == torch.float32 and not h.requires_grad
        torch.testing.assert_close(h, ref, atol=atol, rtol=0)


# --- DeiT-III: timm's model is the reference, in timm's and in the official layout --------------


@pytest.mark.parametrize("layout", ["timm.pth", "official.pth"])
def test_deit3_features_equal_timm_ln2(deit3, layout):
    teacher = load_teacher(deit3["folder"] / layout, [8, 10, 12], dtype="fp32", student_grid=14)
    assert teacher.kind == ("timm" if layout == "timm.pth" else "deit3")
    assert (teacher.dim, teacher.grid, teacher.depth, teacher.layers) == (384, 14, 12, (8, 10, 12))
    assert teacher.vit.blocks[0].attn.num_heads == 6
    feats = teacher(deit3["images"])
    assert feats[0].shape == (2, 197, 384)
    assert_same_features(feats, deit3["refs"])


def test_every_model_of_ours_has_the_heads_its_width_gives():
    """A dense run of ours as a teacher: its heads are read from its width (no file stores
    them), so every --model must have the heads HEADS_BY_WIDTH gives its width."""
    for name, config in MODELS.items():
        assert HEADS_BY_WIDTH[config["embed_dim"]] == config["num_heads"], name


def test_teacher_runs_only_up_to_its_deepest_block(deit3):
    teacher = load_teacher(deit3["folder"] / "timm.pth", [10, 8], dtype="fp32")
    assert len(teacher.vit.blocks) == 10 and teacher.depth == 12
    assert isinstance(teacher.vit.norm, nn.Identity) and isinstance(teacher.vit.head, nn.Identity)
    images = deit3["images"][:1]
    ran = []
    for block in teacher.vit.blocks:
        if hasattr(block.mlp, "fc1"):  # a real MLP
            block.mlp.fc1.register_forward_hook(lambda *_: ran.append(1))
    feats = teacher(images)  # order as asked, block 10's MLP never runs
    assert len(ran) == 9
    assert_same_features(feats, [deit3["refs"][1][:1], deit3["refs"][0][:1]])


def test_bf16_features_and_routing_targets_match_fp32(deit3):
    # measured on this CPU: 1 - cos <= 5e-5 per token; a trained router's top-1 agrees on
    # 100% of tokens (98.7-100% for an untrained one); we require cos >= 0.999 and >= 95% agreement
    teacher = load_teacher(deit3["folder"] / "timm.pth", [8, 10, 12])  # bf16 is the default
    assert teacher.dtype == "bf16"
    feats, refs = teacher(deit3["images"]), deit3["refs"]
    torch.manual_seed(0)
    routers = nn.ModuleList(TeacherRouter(384, 8) for _ in refs)
    opt = torch.optim.Adam(routers.parameters(), lr=1e-2)
    for _ in range(30):  # a teacher router trained on its objective: confident, as in training
        loss, _ = teacher_objective([r(h) for r, h in zip(routers, refs)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for router, h, ref in zip(routers, feats, refs):
        assert h.dtype == torch.float32
        assert F.cosine_similarity(h, ref, dim=-1).min() >= 0.999
        with torch.no_grad():
            agree = (router(h).argmax(-1) == router(ref).argmax(-1)).float().mean()
        assert agree >= 0.95


# --- torchvision: vit_b_16 from a (fake) torchvision cache, and a state-dict file ---------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache; any attempt to download fails like an offline machine."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "hub" / "checkpoints"


def test_torchvision_vit_b_16_from_cache_equals_torchvision(offline_hub):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = perturb(torchvision.models.vit_b_16(weights=None))
    offline_hub.mkdir(parents=True)
    torch.save(model.state_dict(), offline_hub / "vit_b_16-c867db91.pth")  # torchvision's name
    teacher = load_teacher("torchvision:vit_b_16", [3, 6], dtype="fp32", student_grid=14)
    assert (teacher.kind, teacher.pretrained, teacher.dim, teacher.grid) == (
        "torchvision",
        True,
        768,
        14,
    )
    images = torch.randn(1, 3, 224, 224)
    layers = [model.encoder.layers[i - 1].ln_2 for i in (3, 6)]
    assert_same_features(teacher(images), ln2_outputs(model, layers, images))


def test_torchvision_name_offline_needs_explicit_random(offline_hub):
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(UsageError, match="--teacher-random"):
        load_teacher("torchvision:vit_b_32", [1])
    with pytest.raises(UsageError, match="unknown torchvision ViT 'vit_x'"):
        load_teacher("torchvision:vit_x", [1])
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        teacher = load_teacher("torchvision:vit_b_32", [2], dtype="fp32", random_ok=True)
    assert not teacher.pretrained and teacher.grid == 7
    torch.manual_seed(0)
    model = torchvision.models.vit_b_32(weights=None).eval()  # the same random draw
    images = torch.randn(1, 3, 224, 224)
    assert_same_features(
        teacher(images), ln2_outputs(model, [model.encoder.layers[1].ln_2], images)
    )


@pytest.mark.parametrize("old_names", [False, True])
def test_torchvision_state_dict_file(tmp_path, old_names):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=3, num_heads=3, hidden_dim=96, mlp_dim=384
    )
    sd = perturb(model).state_dict()
    if old_names:  # torchvision < 0.13 called the MLP layers linear_1 / linear_2
        sd = {
            k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
            for k, v in sd.items()
        }
    torch.save(sd, tmp_path / "tv.pth")
    teacher = load_teacher(tmp_path / "tv.pth", [1, 3], dtype="fp32", student_grid=8)
    assert teacher.kind == "torchvision" and teacher.depth == 3
    images = torch.randn(2, 3, 32, 32)
    layers = [model.encoder.layers[i].ln_2 for i in (0, 2)]
    assert_same_features(teacher(images), ln2_outputs(model, layers, images))


# --- this project's own dense checkpoint ------------------------------------------------------


@pytest.mark.parametrize("namespace", [False, True])
def test_project_dense_checkpoint_equals_its_ln2(tmp_path, namespace):
    args = argparse.Namespace(**MICRO_ARGS) if namespace else None  # a Namespace needs pickle
    model = save_micro(tmp_path / "checkpoint.pt", args=args)
    teacher = load_teacher(tmp_path / "checkpoint.pt", [4, 6], dtype="fp32", student_grid=8)
    assert (teacher.kind, teacher.dim, teacher.depth, teacher.grid) == ("project", 96, 6, 8)
    images = torch.randn(2, 3, 32, 32)
    feats = teacher(images)
    assert feats[0].shape == (2, 65, 96)
    assert_same_features(
        feats, ln2_outputs(model, [model.blocks[3].norm2, model.blocks[5].norm2], images)
    )


def test_final_layer_is_the_last_block_after_the_final_norm(tmp_path):
    """--teacher-layers final (the paper's last-layer ablation): the model's own final
    features, after every block and the final norm, beside an LN2 output."""
    model = save_micro(tmp_path / "checkpoint.pt")
    teacher = load_teacher(tmp_path / "checkpoint.pt", [4, "final"], dtype="fp32")
    assert teacher.final and teacher.layers == (4, 7)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, _ = model.forward_features(images)  # (2, 65, 96), after model.norm
    refs = ln2_outputs(model, [model.blocks[3].norm2], images) + [final]
    assert_same_features(teacher(images), refs)
    plain = load_teacher(tmp_path / "checkpoint.pt", [4, 6], dtype="fp32")
    assert not plain.final and isinstance(plain.vit.norm, nn.Identity)


# --- stop-gradients: the TGR objective trains the student and the teacher router only ---------


def test_tgr_step_leaves_teacher_untouched_and_trains_teacher_router(micro_ckpt):
    torch.manual_seed(0)
    student = build_model("micro", "tgr", num_experts=4, **MICRO)
    teacher = load_teacher(micro_ckpt, student.moe_layers, dtype="fp32")
    routers = nn.ModuleList(TeacherRouter(teacher.dim, 4) for _ in student.moe_layers)
    outer = nn.ModuleDict(dict(student=student, teacher=teacher, routers=routers))
    outer.train()  # a careless train() on the whole thing ...
    assert student.training and not teacher.training  # ... leaves the teacher in eval
    assert not any(m.training for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    router_before = [r.weight.detach().clone() for r in routers]
    opt = torch.optim.AdamW(outer.parameters(), lr=1e-3, weight_decay=0.05)  # teacher included

    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, routings = student(images)
    teacher_logits = [r(h) for r, h in zip(routers, teacher(images))]  # (B, N, E) each
    kl = sum(
        routing_kl(rt.logits, lt, from_logits=True) for rt, lt in zip(routings, teacher_logits)
    )
    kl.backward(retain_graph=True)  # the KL alone: the teacher side is detached
    assert all(r.weight.grad is None for r in routers)
    assert student.blocks[3].mlp.router.weight.grad.abs().sum() > 0
    opt.zero_grad()

    l_teacher, parts = teacher_objective(teacher_logits)
    loss = F.cross_entropy(logits, labels) + 5.0 / len(routings) * kl + l_teacher
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    opt.step()
    assert set(parts) == {"importance", "ent"} and torch.isfinite(l_teacher)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not torch.equal(r.weight, w) for r, w in zip(routers, router_before))


def test_teacher_objective_is_the_weighted_sum_of_the_losses():
    torch.manual_seed(0)
    logits = [torch.randn(2, 5, 4), torch.randn(2, 5, 4)]
    total, parts = teacher_objective(logits, load_coef=0.5, ent_coef=2.0)
    probs = [x.softmax(-1).reshape(-1, 4) for x in logits]
    imp = sum((p.mean(0).std(unbiased=False) / p.mean(0).mean()) ** 2 for p in probs)
    ent = sum(-(p * p.log()).sum(-1).mean() for p in probs)
    torch.testing.assert_close(parts["importance"], imp)
    torch.testing.assert_close(parts["ent"], ent)
    torch.testing.assert_close(total, 0.5 * imp + 2.0 * ent)
    assert TeacherRouter(96, 4)(torch.randn(2, 65, 96)).shape == (2, 65, 4)


# --- token grids ------------------------------------------------------------------------------


def test_grid_mismatch_and_resampling(micro_ckpt):
    with pytest.raises(UsageError, match=r"teacher 8x8 .* student 16x16"):
        load_teacher(micro_ckpt, [4], student_grid=16)
    teacher = load_teacher(micro_ckpt, [4], dtype="fp32", student_grid=16, resample=True)
    assert teacher.grid == 16 and teacher.img_size == 64
    assert teacher(torch.randn(2, 3, 64, 64))[0].shape == (2, 257, 96)
    assert teacher(torch.randn(2, 3, 32, 32))[0].shape == (2, 257, 96)  # images resized too
    plain = load_teacher(micro_ckpt, [4], dtype="fp32")
    with pytest.raises(UsageError, match=r"expects 32x32 images"):
        plain(torch.randn(2, 3, 64, 64))
    pos = torch.randn(1, 65, 96)
    torch.testing.assert_close(resample_pos_embed(pos, 8, 8, num_prefix=1), pos)
    assert resample_pos_embed(pos[:, 1:], 8, 4, num_prefix=0).shape == (1, 16, 96)


# --- bad input: one clear line each -----------------------------------------------------------


def test_bad_inputs_raise_one_clear_line(tmp_path, micro_ckpt):
    torchvision = pytest.importorskip("torchvision")
    cases = []
    cases.append((tmp_path / "nope.pth", "no such checkpoint"))
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    cases.append((tmp_path / "notes.txt", "not a PyTorch checkpoint"))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pth")
    cases.append((tmp_path / "resnet.pth", r"not a ViT checkpoint: no 'patch_embed.*conv1.weight"))
    sd = torch.load(micro_ckpt)["model"]
    torch.save(
        {"model": {**sd, "blocks.2.mlp.fc2.weight": torch.zeros(96, 100)}}, tmp_path / "a.pt"
    )
    cases.append((tmp_path / "a.pt", r"blocks.2.mlp.fc2.weight is \(96, 100\) .* \(96, 384\)"))
    torch.save({**sd, "dist_token": torch.zeros(1, 1, 96)}, tmp_path / "b.pt")
    cases.append((tmp_path / "b.pt", "dist_token"))
    save_micro(tmp_path / "moe.pt", method="vmoe")
    cases.append((tmp_path / "moe.pt", "method vmoe.*--method dense"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases.append((tmp_path / "list.pt", "not a state dict"))
    for source, message in cases:
        with pytest.raises(UsageError, match=message) as err:
            load_teacher(source, [4])
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"block 7 does not exist: .* has 1\.\.6"):
        load_teacher(micro_ckpt, [4, 7])
    with pytest.raises(UsageError, match=r"block 7 does not exist: .* has 1\.\.6"):
        load_teacher(micro_ckpt, ["final", 7])  # "final" is depth + 1, not a block number
    with pytest.raises(UsageError, match="bf16 or fp32"):
        load_teacher(micro_ckpt, [4], dtype="fp16")


def run_cli(*argv):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "teacher.py"), *map(str, argv)],
        capture_output=True,
        text=True,
    )


def test_cli(tmp_path, micro_ckpt):
    bad = run_cli(tmp_path / "missing.pth", "--layers", "8")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "no such checkpoint" in bad.stderr
    ok = run_cli(micro_ckpt, "--layers", 4, 6, "--img-size", 32, "--patch-size", 4)
    assert ok.returncode == 0, ok.stderr
    assert "D_t=96" in ok.stdout and "block 6: LN2 output (2, 65, 96)" in ok.stdout


def test_loading_a_teacher_draws_nothing_from_the_random_stream(micro_ckpt):
    """The teacher is built on the meta device and assigned its weights: the student's
    initialisation (drawn after it) does not depend on whether or when a teacher was loaded."""
    state = torch.get_rng_state()
    load_teacher(micro_ckpt, [4, 6])
    assert torch.equal(state, torch.get_rng_state())


# --- controls: a random-weight twin, the balance loss per routing group ------------------------


def test_a_random_twin_has_the_architecture_and_none_of_the_weights(micro_ckpt):
    """--teacher-reinit SEED: the teacher's shapes and blocks with the random weights a dense
    run starts from, the same for the same seed, drawn without touching the run's RNG."""
    trained = load_teacher(micro_ckpt, [4, 6], dtype="fp32")
    state = torch.get_rng_state()
    twin = load_teacher(micro_ckpt, [4, 6], dtype="fp32", reinit=7)
    assert torch.equal(state, torch.get_rng_state())
    again = load_teacher(micro_ckpt, [4, 6], dtype="fp32", reinit=7)
    other = load_teacher(micro_ckpt, [4, 6], dtype="fp32", reinit=8)
    a, b = trained.state_dict(), twin.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["vit.blocks.0.attn.qkv.weight"], b["vit.blocks.0.attn.qkv.weight"])
    for k, v in again.state_dict().items():
        assert torch.equal(v, b[k]), k
    assert not torch.equal(other.state_dict()["vit.pos_embed"], b["vit.pos_embed"])
    torch.manual_seed(7)  # what a dense run of seed 7 starts from
    fresh = build_model("micro", "dense", **{**MICRO, "num_classes": 0}).state_dict()
    torch.testing.assert_close(b["vit.blocks.3.mlp.fc1.weight"], fresh["blocks.3.mlp.fc1.weight"])
    assert "re-initialised (seed 7)" in twin.kind
    images = torch.randn(2, 3, 32, 32)
    assert [f.shape for f in twin(images)] == [f.shape for f in trained(images)]


def test_teacher_balance_per_group_is_the_mean_of_each_groups_cv2():
    torch.manual_seed(0)
    logits = [torch.randn(4, 5, 3)]  # 4 images of 5 tokens; 2 groups of 2 images
    _, parts = teacher_objective(logits, groups=2)
    p = logits[0].softmax(-1)
    cv2 = lambda q: (q.mean(0).std(unbiased=False) / q.mean(0).mean()) ** 2
    want = (cv2(p[:2].reshape(-1, 3)) + cv2(p[2:].reshape(-1, 3))) / 2
    torch.testing.assert_close(parts["importance"], want)
    _, whole = teacher_objective(logits)
    assert not torch.allclose(whole["importance"], want)
