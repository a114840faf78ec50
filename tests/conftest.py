"""Make the flat repo's modules importable from tests/; the teacher checkpoints several test
files load (`deit3`, `micro_ckpt`)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- teachers
import pytest  # noqa: E402 (after the path is set)
import torch  # noqa: E402
from teacher_models import ln2_outputs, perturb, save_micro  # noqa: E402


@pytest.fixture(scope="module")
def deit3(tmp_path_factory):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = perturb(timm.create_model("deit3_small_patch16_224", pretrained=False))
    images = torch.randn(2, 3, 224, 224)
    refs = ln2_outputs(model, [model.blocks[i - 1].norm2 for i in (8, 10, 12)], images)
    assert (refs[0] - refs[2]).abs().max() > 0.5  # the blocks in between really do something
    with torch.no_grad():
        final = model.forward_features(images)  # (2, 197, 384) after the final norm
    folder = tmp_path_factory.mktemp("deit3")
    sd = model.state_dict()
    torch.save(sd, folder / "timm.pth")
    # facebookresearch/deit names layer scale gamma_1 / gamma_2 and wraps the weights in "model"
    official = {
        k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in sd.items()
    }
    assert official["pos_embed"].shape == (1, 196, 384)  # no CLS slot
    torch.save({"model": official}, folder / "official.pth")  # told apart by keys, not names
    return dict(images=images, refs=refs, final=final, folder=folder)


@pytest.fixture
def micro_ckpt(tmp_path):
    save_micro(tmp_path / "dense.pt")
    return tmp_path / "dense.pt"
