"""vit.py: the ViT against timm's (keys, order and outputs), with and without registers."""

import pytest
import torch

from moe import build_model
from vit import VisionTransformer, amp_dtype_for

MICRO = dict(num_classes=10, img_size=32, patch_size=4)  # 8x8 patches + CLS = 65 tokens


def test_dense_vit_matches_timm():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    ours = build_model("tiny", "dense", num_classes=10).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())  # same keys, same order
    ours.load_state_dict(ref.state_dict())
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, routings = ours(images)
        torch.testing.assert_close(logits, ref(images), atol=1e-5, rtol=1e-5)
    assert routings == []


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_register_tokens_follow_cls_as_in_timm(no_embed_class):
    timm = pytest.importorskip("timm")
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0)
    cfg.update(reg_tokens=3, no_embed_class=no_embed_class)
    ref = timm.models.vision_transformer.VisionTransformer(**cfg).eval()
    ours = VisionTransformer(**cfg).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())  # reg_token (1, 3, 48) included
    assert ours.num_prefix_tokens == 4 and ours.num_tokens == 4 + 16
    with torch.no_grad():
        for p in ref.parameters():  # cls, registers and positions off their zero/tiny init
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images)[0], ref.forward_features(images))
    assert "reg_token" not in build_model("micro", "dense", **MICRO).state_dict()  # R = 0


def test_mixed_precision_is_bf16_on_cuda_only():
    """The one rule the trainer, eval.py, the probes and the k-NN share (a device need not
    exist to be asked about)."""
    assert amp_dtype_for(torch.device("cuda")) is torch.bfloat16
    assert amp_dtype_for(torch.device("cuda:1")) is torch.bfloat16
    assert amp_dtype_for(torch.device("cpu")) is None
