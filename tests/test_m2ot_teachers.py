"""M²oT's final-feature teachers (m2ot_teachers.py): the same features as timm's own models,
at the student's size or their own, and one clear line for every bad source."""

import sys

import pytest
import torch
from einops import rearrange
from teacher_models import ln2_outputs, perturb, save_micro

from augment import MEAN, STD
from errors import UsageError
from m2ot_teachers import load_final_teacher
from teacher import load_teacher


def assert_final(teacher, images, ref, num_prefix=1):
    """cls, patches = teacher(images) are token 0 and the tokens after the prefix of `ref`."""
    cls, patches = teacher(images)
    assert cls.dtype == patches.dtype == torch.float32 and not cls.requires_grad
    torch.testing.assert_close(cls, ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(patches, ref[:, num_prefix:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["timm.pth", "official.pth"])
def test_deit3_final_features_equal_timm(deit3, layout):
    teacher = load_final_teacher(deit3["folder"] / layout, img_size=224, dtype="fp32")
    assert (teacher.dim, teacher.grid, teacher.img_size, teacher.patch_size) == (384, 14, 224, 16)
    assert teacher.has_cls and (teacher.mean, teacher.std) == (MEAN, STD)
    assert_final(teacher, deit3["images"], deit3["final"])


@pytest.mark.parametrize("layout", ["timm", "official"])
@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_final_features_equal_timm(tmp_path, registers, layout):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    small = dict(img_size=56, depth=2, embed_dim=96, num_heads=3)  # 4x4 patches of 14 px
    model = perturb(timm.create_model(name, pretrained=False, **small))
    sd = model.state_dict()
    if layout == "official":  # facebookresearch/dinov2: mask_token, registers outside positions
        sd = dict(sd, mask_token=torch.zeros(1, 96))
        if registers:  # its pos_embed has a CLS slot; timm folds it into cls_token
            slot = torch.randn(1, 1, 96)
            sd["register_tokens"] = sd.pop("reg_token")
            sd["cls_token"] = sd["cls_token"] - slot
            sd["pos_embed"] = torch.cat([slot, sd["pos_embed"]], dim=1)
    torch.save(sd, tmp_path / "dinov2.pth")
    prefix = 1 + registers
    if registers:  # TGR's teacher takes DINOv2-reg too: LN2 outputs without the registers
        images = torch.randn(2, 3, 56, 56)
        (h,) = load_teacher(tmp_path / "dinov2.pth", [2], dtype="fp32")(images)
        (ref,) = ln2_outputs(model, [model.blocks[1].norm2], images)
        torch.testing.assert_close(
            h, torch.cat([ref[:, :1], ref[:, prefix:]], 1), atol=1e-5, rtol=0
        )
    teacher = load_final_teacher(tmp_path / "dinov2.pth", img_size=64, dtype="fp32")
    assert (teacher.grid, teacher.img_size, teacher.patch_size) == (5, 70, 14)  # round(64 / 14)
    assert teacher.kind == ("dinov2" if layout == "official" else "timm")
    model.set_input_size(img_size=(70, 70))  # timm resamples its positions: the reference
    images = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        ref = model.forward_features(images)  # (2, 1 + R + 25, 96)
    assert ref.shape[1] == prefix + 25
    assert_final(teacher, images, ref, num_prefix=prefix)
    assert teacher(torch.randn(1, 3, 64, 64))[1].shape == (1, 25, 96)  # resized to 70 px


def test_project_checkpoint_final_features_at_its_own_and_another_grid(tmp_path):
    model = save_micro(tmp_path / "dense.pt")
    teacher = load_final_teacher(tmp_path / "dense.pt", img_size=32, dtype="fp32")
    assert (teacher.kind, teacher.dim, teacher.grid, teacher.img_size) == ("project", 96, 8, 32)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, _ = model.forward_features(images)  # (2, 65, 96)
    assert_final(teacher, images, ref)
    big = load_final_teacher(tmp_path / "dense.pt", img_size=48)  # 12x12 positions, bf16
    assert (big.grid, big.img_size, big.dtype) == (12, 48, "bf16")
    cls, patches = big(images)  # images resized to 48 px
    assert cls.shape == (2, 96) and patches.shape == (2, 144, 96)
    assert patches.dtype == torch.float32 and torch.isfinite(patches).all()
    big.train()
    assert not big.training and not any(p.requires_grad for p in big.parameters())
    assert not any(v.is_meta for v in big.state_dict().values())  # .to(device) will work


def test_final_teacher_at_its_own_size(micro_ckpt):
    """--teachers SRC@SIZE: the teacher runs at SIZE px (positions resampled to its grid) on
    the student's images resized to it; a bad SIZE is one line."""
    teacher = load_final_teacher(f"{micro_ckpt}@48", img_size=32, dtype="fp32")
    assert (teacher.grid, teacher.img_size, teacher.source) == (12, 48, str(micro_ckpt))
    cls, patches = teacher(torch.randn(2, 3, 32, 32))  # the student's 32 px, resized to 48
    assert cls.shape == (2, 96) and patches.shape == (2, 144, 96)
    assert load_final_teacher(f"{micro_ckpt}@30", img_size=32).grid == 8  # round(30 / 4) = 8
    for bad in ("", "big", "0", "2.5"):
        with pytest.raises(UsageError, match=r"is not a size in pixels \(SRC@SIZE") as err:
            load_final_teacher(f"{micro_ckpt}@{bad}", img_size=32)
        assert "\n" not in str(err.value)


@pytest.fixture
def tiny_hiera(monkeypatch):
    """timm's "hiera_tiny_224" made 16 wide, one block per stage: Hiera in a second."""
    timm = pytest.importorskip("timm")
    create = timm.create_model
    tiny = dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1))
    small = lambda name, **kw: create(name, **(tiny if "hiera" in name else {}), **kw)
    monkeypatch.setattr(timm, "create_model", small)
    return "timm:hiera_tiny_224"


def test_timm_teachers_vit_and_hierarchical(tmp_path, tiny_hiera):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = perturb(timm.create_model("test_vit", pretrained=False))  # 160 px, 1000-class head
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "vit.pth")
    teacher = load_final_teacher(f"timm:test_vit={tmp_path / 'vit.pth'}", img_size=64, dtype="fp32")
    assert (teacher.kind, teacher.dim, teacher.grid, teacher.patch_size) == ("timm", 64, 4, 16)
    assert teacher.has_cls and teacher.pretrained and teacher.mean == (0.5, 0.5, 0.5)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = vit.forward_features(images)  # dynamic size: timm resamples its positions too
    assert_final(teacher, images, ref)
    conv = perturb(timm.create_model("test_convnext", pretrained=False))  # stride 32, no CLS
    torch.save(conv.state_dict(), tmp_path / "conv.pth")
    source = f"timm:test_convnext={tmp_path / 'conv.pth'}"
    teacher = load_final_teacher(source, img_size=64, dtype="fp32")  # CPU bf16 convs: slow
    assert (teacher.dim, teacher.grid, teacher.img_size, teacher.has_cls) == (64, 2, 64, False)
    with torch.no_grad():
        ref = rearrange(conv.forward_features(images), "b d h w -> b (h w) d")  # (2, 4, 64)
    assert_final(teacher, images, torch.cat([ref.mean(1, keepdim=True), ref], 1))  # CLS: mean
    state = torch.get_rng_state()  # Hiera: no norm over its map; random weights, stream kept
    hiera = load_final_teacher(tiny_hiera, img_size=224, dtype="fp32", random_ok=True)
    assert torch.equal(state, torch.get_rng_state()) and not hiera.pretrained
    assert hiera.timm_opts["norm"] is False and (hiera.dim, hiera.grid) == (128, 7)
    assert [x.shape for x in hiera(torch.randn(1, 3, 224, 224))] == [(1, 128), (1, 49, 128)]


def test_final_teacher_bad_inputs_raise_one_clear_line(
    tmp_path, micro_ckpt, tiny_hiera, monkeypatch
):
    timm = pytest.importorskip("timm")
    save_micro(tmp_path / "moe.pt", method="vmoe")
    sd = timm.create_model("test_vit", pretrained=False).state_dict()
    torch.save({**sd, "blocks.0.attn.qkv.weight": torch.zeros(3, 64)}, tmp_path / "shape.pth")
    torch.save({**sd, "blocks.0.adapter": torch.zeros(3)}, tmp_path / "extra.pth")
    cases = [
        (tmp_path / "nope.pth", "no such checkpoint"),
        (tmp_path / "moe.pt", "method vmoe.*--method dense"),
        (f"timm:test_vit={tmp_path / 'shape.pth'}", r"qkv.weight is \(3, 64\) .* \(192, 64\)"),
        (f"timm:test_vit={tmp_path / 'extra.pth'}", "timm's test_vit lacks: blocks.0.adapter"),
        (f"timm:test_vit={tmp_path / 'nope.pth'}", "timm:test_vit .*nope.pth: no such checkpoint"),
        ("timm:test_vit", r"timm:test_vit=PATH, or --teacher-random"),
        ("timm:no_such_net", "unknown timm model 'no_such_net'"),
    ]
    for source, message in cases:
        with pytest.raises(UsageError, match=message) as err:
            load_final_teacher(source, img_size=32)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"cannot run at 64x64 px") as err:
        load_final_teacher(tiny_hiera, img_size=64, random_ok=True)  # its positions: 224 px only
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="bf16 or fp32"):
        load_final_teacher(micro_ckpt, img_size=32, dtype="fp16")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(UsageError, match=r"^timm:test_vit needs timm: pip install timm$"):
        load_final_teacher("timm:test_vit=x.pth", img_size=32)
    assert load_final_teacher(micro_ckpt, img_size=32).dim == 96  # ViT sources need no timm
