"""DeiT's augmentations: RandAugment, random erasing, MixUp/CutMix (DeiT's `augment.py` role).

The idea
--------
A ViT trained on ImageNet alone over-fits without heavy augmentation (DeiT sec. 6); TGR-MoE
trains with DeiT's recipe unchanged (its Table S1). Three augmentations act at three places:

    RandAugment     per image, on uint8 pixels, in the loader's workers    `RandAugment`
    random erasing  per image, on the normalised device batch              `random_erasing`
    MixUp / CutMix  per batch, on the device batch and its labels          `build_mixup`

DeiT's `--aa rand-m9-mstd0.5-inc1` is timm's RandAugment: n = 2 ops per image drawn with
replacement, each applied with probability 0.5 at a magnitude m ~ N(9, 0.5²) clipped to
[0, 10], from timm's "increasing" op set (`RAND_OPS`), where m / 10 is the fraction of each
op's full strength (m9: rotate ≤ 27°). torchvision's own `v2.RandAugment(magnitude=9)` is 9 of
31 bins, 0.3 of full strength, and draws one op set per call: not DeiT's.

Letters: B images, C channels, S (H, W) image side in pixels.

Decisions where the papers are silent
-------------------------------------
* The ops are torchvision's functional ones on uint8 tensors; they differ from timm's PIL ops
  only in the resampling of the geometric ops (bilinear: DeiT asks timm for bicubic, which
  torchvision's tensor ops do not offer). The fill colour is the mean colour (DeiT's).
* Random erasing runs after normalisation, as timm's RandomErasing, with N(0, 1) noise per
  pixel (`pixel`) or zeros (`const`); its draws are Python's `random`, its noise is drawn on the
  images' device: no host sync.
* MixUp or CutMix, one chosen per batch (DeiT's `mixup_switch_prob` 0.5), soft labels out.
"""

import math
import random
import re

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as DeiT: norm and fill


# ----------------------------------------------------------------------------- RandAugment
# timm's increasing ops in torchvision's functional API; each maps (image, m, fill) -> image.
def _signed(x):
    return x if random.random() < 0.5 else -x  # timm's _randomly_negate


def _enhance(m):
    return max(0.1, 1.0 + _signed(0.9 * m / 10))  # factor 1 ± 0.9·m/10 (timm: ≥ 0.1)


def _solarize_add(img, m):  # add 110·m/10 to the pixels below 128
    return torch.where(img < 128, (img.int() + int(110 * m / 10)).clamp(max=255), img).to(img.dtype)


def _affine(img, fill, translate=(0.0, 0.0), shear=(0.0, 0.0)):  # about the corner, as PIL
    bilinear = TF.InterpolationMode.BILINEAR
    return TF.affine(
        img,
        angle=0.0,
        translate=list(translate),
        scale=1.0,
        shear=list(shear),
        interpolation=bilinear,
        fill=fill,
        center=[0, 0],
    )


def _shear(m):  # timm's shear factor 0.3·m/10, as an angle in degrees
    return math.degrees(math.atan(_signed(0.3 * m / 10)))


RAND_OPS = {  # timm's _RAND_INCREASING_TRANSFORMS
    "AutoContrast": lambda img, m, fill: TF.autocontrast(img),
    "Equalize": lambda img, m, fill: TF.equalize(img),
    "Invert": lambda img, m, fill: TF.invert(img),
    "Rotate": lambda img, m, fill: TF.rotate(
        img, _signed(30 * m / 10), interpolation=TF.InterpolationMode.BILINEAR, fill=fill),
    "PosterizeIncreasing": lambda img, m, fill: TF.posterize(img, 4 - int(4 * m / 10)),
    "SolarizeIncreasing": lambda img, m, fill: TF.solarize(img, 256 - int(256 * m / 10))
    if m >= 10 / 256 else img,  # threshold 256: nothing is inverted
    "SolarizeAdd": lambda img, m, fill: _solarize_add(img, m),
    "ColorIncreasing": lambda img, m, fill: TF.adjust_saturation(img, _enhance(m)),
    "ContrastIncreasing": lambda img, m, fill: TF.adjust_contrast(img, _enhance(m)),
    "BrightnessIncreasing": lambda img, m, fill: TF.adjust_brightness(img, _enhance(m)),
    "SharpnessIncreasing": lambda img, m, fill: TF.adjust_sharpness(img, _enhance(m)),
    "ShearX": lambda img, m, fill: _affine(img, fill, shear=(_shear(m), 0.0)),
    "ShearY": lambda img, m, fill: _affine(img, fill, shear=(0.0, _shear(m))),
    "TranslateXRel": lambda img, m, fill: _affine(
        img, fill, translate=(_signed(0.45 * m / 10) * img.shape[-1], 0.0)),
    "TranslateYRel": lambda img, m, fill: _affine(
        img, fill, translate=(0.0, _signed(0.45 * m / 10) * img.shape[-2])),
}  # fmt: skip


def parse_aa(policy):
    """--aa: "none", or timm's "rand-m9-mstd0.5-inc1" -> dict(num_ops, magnitude, std)."""
    if policy in ("none", ""):
        return None
    parts, opts = policy.split("-"), {"n": 2, "m": 10, "mstd": 0.0, "inc": 0}  # timm's defaults
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)", part)  # "m9" -> ("m", "9")
        if match is None or match[1] not in opts:
            raise ValueError(f"--aa {policy}: cannot read {part!r} (n, m, mstd, inc are known)")
        opts[match[1]] = float(match[2])
    if parts[0] != "rand" or opts["inc"] != 1:
        raise ValueError(f"--aa {policy}: only timm's rand-...-inc1 (DeiT's) is implemented")
    return dict(num_ops=int(opts["n"]), magnitude=opts["m"], magnitude_std=opts["mstd"])


class RandAugment(torch.nn.Module):
    """timm's RandAugment (increasing ops) on uint8 images; see RAND_OPS above.

    Differs from timm only in the pixels: torchvision's bilinear resampling for the geometric
    ops (DeiT asks timm for bicubic, which torchvision's tensor ops do not offer).
    """

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=None):
        super().__init__()
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = (
            num_ops,
            magnitude,
            magnitude_std,
            prob,
        )
        self.fill = fill or [round(255 * x) for x in MEAN]  # DeiT fills with the mean colour

    def sample_magnitude(self):
        # m ~ N(magnitude, std²) per op, clipped to timm's [0, 10]
        m = (
            random.gauss(self.magnitude, self.magnitude_std)
            if self.magnitude_std
            else self.magnitude
        )
        return min(10.0, max(0.0, m))

    def forward(self, img):  # img: (3, S, S) uint8
        for name in random.choices(list(RAND_OPS), k=self.num_ops):  # with replacement, as timm
            if random.random() < self.prob:
                img = RAND_OPS[name](img, self.sample_magnitude(), self.fill)
        return img


# ----------------------------------------------------------------------------- on the device batch
def random_erasing(images, prob, mode="pixel", count=1):
    """DeiT's random erasing (timm's RandomErasing, after normalisation), on a batch in place.

    Each image, with probability `prob`, gets 1..count rectangles (count drawn uniformly)
    of 2%-33% of its area and aspect 0.3-3.3 (10 tries to fit each), filled with N(0, 1)
    noise per pixel (`pixel`, the normalised units' scale) or zeros (`const`). The draws are
    Python's `random` and the noise is drawn on the images' device: no host sync.
    """
    B, C, H, W = images.shape
    for b in range(B):
        if random.random() >= prob:
            continue
        for _ in range(random.randint(1, count)):
            for _attempt in range(10):
                area = H * W * random.uniform(0.02, 1 / 3)
                aspect = math.exp(random.uniform(math.log(0.3), math.log(3.3)))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if h < H and w < W:
                    y, x = random.randint(0, H - h), random.randint(0, W - w)
                    images[b, :, y : y + h, x : x + w] = (  # (C, h, w)
                        torch.randn((C, h, w), device=images.device, dtype=images.dtype)
                        if mode == "pixel"
                        else 0
                    )
                    break
    return images


def build_mixup(args, num_classes):
    """DeiT's batch mixing: MixUp (α --mixup) or CutMix (α --cutmix), one chosen per batch.

    Runs on a collated batch (images, labels) and returns soft labels (B, classes); None when
    both are off."""
    mixes = [v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []
    mixes += [v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else []
    return v2.RandomChoice(mixes) if mixes else None
