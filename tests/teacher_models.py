"""Small ViTs with every weight moved off its initial value, saved as teacher checkpoints:
the models the teacher tests (test_teacher.py, test_m2ot_teachers.py) load and compare with.
Their fixtures (`deit3`, `micro_ckpt`) live in conftest.py."""

import torch

from moe import build_model

MICRO = dict(num_classes=10, img_size=32, patch_size=4)  # 8x8 patches + CLS = 65 tokens
MICRO_ARGS = {"model": "micro", "method": "dense", "img_size": 32, "patch_size": 4}


def perturb(model, seed=0):
    """Move every weight off its initial value (LayerNorms start at 1/0, DeiT-III's layer scale
    at 1e-6), so that a swapped, dropped or mis-scaled key cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.add_(0.05 * noise)
    return model.eval()


class _Enough(Exception):
    pass


def ln2_outputs(model, norm2_modules, images):
    """The model's own LN2 outputs, captured by forward hooks while it runs (and stopped
    once the last one has been seen: the rest of the model cannot change them)."""
    out = {}

    def keep(j, y):
        out[j] = y
        if len(out) == len(norm2_modules):
            raise _Enough

    hooks = [
        m.register_forward_hook(lambda mod, args, y, j=j: keep(j, y))
        for j, m in enumerate(norm2_modules)
    ]
    try:
        with torch.no_grad():
            model(images)
    except _Enough:
        pass
    finally:
        for h in hooks:
            h.remove()
    return [out[j] for j in range(len(norm2_modules))]


def save_micro(path, method="dense", args=None):
    torch.manual_seed(0)
    model = perturb(build_model("micro", method, num_experts=4, **MICRO))
    args = dict(MICRO_ARGS, method=method) if args is None else args
    ckpt = {"model": model.state_dict(), "args": args, "model_args": model.model_args}
    torch.save({**ckpt, "epoch": 3, "step": 90}, path)  # as train.py writes it
    return model
