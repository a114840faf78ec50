"""DeiT's augmentations: RandAugment, random erasing, MixUp/CutMix (DeiT's `augment.py` role).

The idea
--------
A ViT trained on ImageNet alone over-fits without heavy augmentation (DeiT sec. 6); TGR-MoE
trains with DeiT's recipe unchanged (its Table S1). Three augmentations act at three places:

    RandAugment     per image, on uint8 pixels: in the loader's workers      `RandAugment`
                    or on the uint8 device batch (--aa-on-device)            `rand_augment_batch`
    random erasing  per image, on the normalised device batch               `random_erasing`
    MixUp / CutMix  per batch, on the device batch and its labels           `build_mixup`

DeiT's `--aa rand-m9-mstd0.5-inc1` is timm's RandAugment: n = 2 ops per image drawn with
replacement, each applied with probability 0.5 at a magnitude m ~ N(9, 0.5²) clipped to
[0, 10], from timm's "increasing" op set (`RAND_OPS`), where m / 10 is the fraction of each
op's full strength (m9: rotate ≤ 27°). torchvision's own `v2.RandAugment(magnitude=9)` is 9 of
31 bins, 0.3 of full strength, and draws one op set per call: not DeiT's.

On a GPU the loader's CPUs cannot keep up with RandAugment (docs/benchmarks.md), so
`rand_augment_batch` does the same thing to a whole uint8 batch on its device: every image
still draws its own 2 ops, magnitudes and signs (per sample, not one draw per batch as
`transforms.v2` would), the images are sorted by op so each op runs once on its group, colour
ops are tensor arithmetic with a factor per image, and rotate / shear / translate are one
`affine_grid` + `grid_sample` with a 2×3 matrix per image. The per-image `RandAugment` stays
the reference; tests/test_augment.py checks the two agree op by op and draw by draw.

Letters: B images, b of them in one op's group, C channels, S (H, W) image side in pixels,
n ops per image.

Decisions where the papers are silent
-------------------------------------
* The ops are torchvision's functional ones on uint8 tensors; they differ from timm's PIL ops
  only in the resampling of the geometric ops (bilinear: DeiT asks timm for bicubic, which
  torchvision's tensor ops do not offer). The fill colour is the mean colour (DeiT's).
* Where a warped image meets the fill, a bilinear tap reads the fill colour outside the image:
  x̄ = sample + (1 − inside)·fill, with sample = Σ_t w_t x_t over the taps inside (grid_sample's
  zero padding) and inside = Σ_t w_t over them (`_fill_outside`). torchvision's own fill
  blends (sample − fill)·inside + fill, which weights the image twice on that one-pixel seam
  (sample already holds the factor `inside`): darker there by x·inside·(1 − inside), up to a
  quarter of the pixel's value (64 grey levels).
* The batched ops copy torchvision's arithmetic (float32, truncation to uint8 after blends,
  rounding after a warp) with a parameter per image; the integer parameters (posterize bits,
  solarize thresholds) are computed in float64 on the CPU exactly as the per-image ops compute
  them. Equalize is torchvision's own (per-image histograms on a batch); autocontrast replaces
  torchvision's boolean-mask writes by `torch.where`, which needs no host sync.
* The batched draws come from a `torch.Generator` on the CPU (ops, coins, magnitudes, signs:
  a few hundred numbers), moved to the device with the images' sort order in one pinned,
  non-blocking copy each: nothing waits for the GPU. `data.device_batch` seeds it from
  (seed, epoch, batch, rank), so a resumed run draws the same augmentations.
* Random erasing runs after normalisation, as timm's RandomErasing, with N(0, 1) noise per
  pixel (`pixel`) or zeros (`const`); its draws are Python's `random`, its noise is drawn on the
  images' device: no host sync.
* MixUp or CutMix, one chosen per batch (DeiT's `mixup_switch_prob` 0.5), soft labels out.
"""

import math
import random
import re

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

MEAN = (0.485, 0.456, 0.406)  # ImageNet's mean colour, as DeiT: normalisation and fill
STD = (0.229, 0.224, 0.225)  # ImageNet's standard deviations, as DeiT
FILL = [round(255 * x) for x in MEAN]  # (124, 116, 104): DeiT fills with the mean colour


# ----------------------------------------------------------------------------- RandAugment
# timm's increasing ops in torchvision's functional API; each maps (image, m, fill) -> image.
def _signed(x):
    return x if random.random() < 0.5 else -x  # timm's _randomly_negate


def _enhance(m):
    return max(0.1, 1.0 + _signed(0.9 * m / 10))  # factor 1 ± 0.9·m/10 (timm: ≥ 0.1)


def _solarize_add(img, m):  # add 110·m/10 to the pixels below 128
    return torch.where(img < 128, (img.int() + int(110 * m / 10)).clamp(max=255), img).to(img.dtype)


def _fill_blend(warped, fill):  # (..., 4, H, W) -> (..., 3, H, W) uint8: the image, filled
    # x̄ = Σ_t w_t x_t + (1 − Σ_{t inside} w_t)·fill: every bilinear tap outside reads the fill
    sample = warped[..., :3, :, :]  # (..., 3, H, W) Σ_t w_t x_t, the taps outside read 0
    inside = warped[..., 3:, :, :]  # (..., 1, H, W) Σ_{t inside} w_t: the warped ones
    return (sample + (1 - inside) * fill).round().to(torch.uint8)


def _fill_outside(img, fill, warp):
    """`warp` (bilinear, zeros outside: TF.affine, TF.rotate or grid_sample) of uint8 images
    (..., 3, H, W), the fill colour outside them: one (3,) or one (..., 3, 1, 1) per image.
    The images and a channel of ones are warped together; the premultiplied blend
    `_fill_blend` follows (not torchvision's fill, see the decisions)."""
    ones = torch.ones_like(img[..., :1, :, :], dtype=torch.float32)  # (..., 1, H, W)
    stacked = torch.cat([img.float(), ones], dim=-3)  # (..., 4, H, W)
    warped = warp(stacked)  # (..., 4, H, W): sample, inside
    fill = torch.as_tensor(fill, dtype=torch.float32, device=img.device)
    fill = fill.reshape(*img.shape[:-3], 3, 1, 1)  # (..., 3, 1, 1)
    return _fill_blend(warped, fill)  # (..., 3, H, W)


def _rotate(img, fill, angle):  # about the centre, as PIL
    bilinear = TF.InterpolationMode.BILINEAR
    return _fill_outside(img, fill, lambda x: TF.rotate(x, angle, interpolation=bilinear))


def _affine(img, fill, translate=(0.0, 0.0), shear=(0.0, 0.0)):  # about the corner, as PIL
    bilinear = TF.InterpolationMode.BILINEAR
    warp = lambda x: TF.affine(
        x,
        angle=0.0,
        translate=list(translate),
        scale=1.0,
        shear=list(shear),
        interpolation=bilinear,
        center=[0, 0],
    )
    return _fill_outside(img, fill, warp)


def _shear(m):  # timm's shear factor 0.3·m/10, as an angle in degrees
    return math.degrees(math.atan(_signed(0.3 * m / 10)))


RAND_OPS = {  # timm's _RAND_INCREASING_TRANSFORMS
    "AutoContrast": lambda img, m, fill: TF.autocontrast(img),
    "Equalize": lambda img, m, fill: TF.equalize(img),
    "Invert": lambda img, m, fill: TF.invert(img),
    "Rotate": lambda img, m, fill: _rotate(img, fill, _signed(30 * m / 10)),
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

    # "rand", then options such as "m9": a letter code and a number each, timm's defaults first
    parts = policy.split("-")
    opts = {"n": 2, "m": 10, "mstd": 0.0, "inc": 0}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)", part)  # "m9" -> ("m", "9")
        if match is None or match[1] not in opts:
            raise ValueError(f"--aa {policy}: cannot read {part!r} (n, m, mstd, inc are known)")
        opts[match[1]] = float(match[2])

    # timm's RandAugment with the increasing ops is the only policy here (DeiT's)
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
        self.num_ops = num_ops  # n: ops per image, drawn with replacement
        self.magnitude = magnitude  # m: the mean magnitude, on timm's 0..10 scale
        self.magnitude_std = magnitude_std  # the spread of m per op (timm's mstd)
        self.prob = prob  # each drawn op is applied with this probability
        self.fill = fill or FILL

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


# ----------------------------------------------------------------------------- RandAugment, batched
# The same ops on a uint8 batch (B, 3, S, S) with a parameter per image. The images are sorted by
# op (rotate, shear and translate last, as one block) and each op runs once on its group.
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OP_ORDER = [name for name in RAND_OPS if name not in GEOMETRIC] + list(GEOMETRIC)
_SORT_KEY = torch.tensor([OP_ORDER.index(name) for name in RAND_OPS])  # RAND_OPS index -> order


def sample_ops(batch, generator, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
    """timm's draws for `batch` images on the CPU, as `RandAugment.forward` makes them one image
    at a time: ops (B, n) indices into RAND_OPS drawn with replacement, applied (B, n) with
    probability `prob`, magnitudes (B, n) float64 ~ N(m, std²) clipped to [0, 10], signs (B, n)
    ±1 (timm's _randomly_negate; only the ops that use one read it)."""
    shape = (batch, num_ops)
    f64 = torch.float64
    ops = torch.randint(len(RAND_OPS), shape, generator=generator)  # (B, n)
    applied = torch.rand(shape, generator=generator, dtype=f64) < prob  # (B, n)
    noise = torch.randn(shape, generator=generator, dtype=f64)  # (B, n)
    magnitudes = (magnitude + magnitude_std * noise).clamp(0.0, 10.0)  # (B, n)
    signs = torch.where(torch.rand(shape, generator=generator, dtype=f64) < 0.5, 1.0, -1.0)
    return ops, applied, magnitudes, signs


def _inverse_affine(angle, shear_x, shear_y, tx, ty, cx, cy):
    """torchvision's `_get_inverse_affine_matrix` (scale 1) with a value per image: the 2×3
    matrices (B, 2, 3) that take an output pixel to its source, in pixels about the centre."""
    # the angles in radians: rotation, shear along x, shear along y
    rot = angle.deg2rad()
    sx = shear_x.deg2rad()
    sy = shear_y.deg2rad()

    # the forward map M = T C (R Sh) C⁻¹ (torchvision's comments); R Sh = [[a, b], [c, d]]
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)

    # M⁻¹ = C (R Sh)⁻¹ C⁻¹ T⁻¹, where (R Sh)⁻¹ = [[d, −b], [−c, a]]
    row0 = [d, -b, cx - d * (cx + tx) + b * (cy + ty)]  # det [[a, b], [c, d]] = 1
    row1 = [-c, a, cy + c * (cx + tx) - a * (cy + ty)]
    return torch.stack([torch.stack(row0, -1), torch.stack(row1, -1)], -2)  # (B, 2, 3)


# The parameter tensor (B, 13) that `_op_params` fills: a row per image, a group of columns per
# argument. Each image's op reads its own columns; the other columns of its row go unread.
#
#   columns  name                what the op does with it
#   0        FACTOR              colour, contrast, brightness, sharpness: blend factor 1 ± 0.9·m/10
#   1        POSTERIZE_MASK      posterize: x & mask keeps the high bits (0xF0 ... 0x00)
#   2        SOLARIZE_THRESHOLD  solarize: inverts the values at or above it
#   3        SOLARIZE_ADD        solarize-add: adds it to the values below 128
#   4..9     AFFINE              rotate, shear, translate: the 2×3 sampling matrix, row by row
#   10..12   FILL_COLOUR         rotate, shear, translate: the colour outside the image
FACTOR = slice(0, 1)
POSTERIZE_MASK = slice(1, 2)
SOLARIZE_THRESHOLD = slice(2, 3)
SOLARIZE_ADD = slice(3, 4)
AFFINE = slice(4, 10)
FILL_COLOUR = slice(10, 13)
NUM_PARAMS = 13


def _op_params(ops, m, sign, height, width):
    """Every op's argument for every image, as RAND_OPS computes it (float64, on the CPU):
    (B, 13), the columns named above (the sampling matrix in affine_grid's normalised units)."""
    is_op = lambda *names: sum(ops == list(RAND_OPS).index(name) for name in names).bool()
    zero = torch.zeros_like(m)

    # the colour ops' arguments
    factor = (1.0 + sign * 0.9 * m / 10).clamp(min=0.1)  # _enhance
    bits = 4 - (4 * m / 10).floor()  # PosterizeIncreasing: keep 4..0 high bits
    mask = 256 - 2 ** (8 - bits)  # 0xF0 ... 0x00
    threshold = 256 - (256 * m / 10).floor()  # SolarizeIncreasing: invert at or above it
    add = (110 * m / 10).floor()  # SolarizeAdd: add to the pixels below 128

    # the geometric ops' arguments, zero for the ops that do not use them
    angle = torch.where(is_op("Rotate"), -((sign * 30 * m / 10) % 360), zero)  # TF.rotate's −angle
    shear = (sign * 0.3 * m / 10).atan().rad2deg()  # _shear
    shear_x = torch.where(is_op("ShearX"), shear, zero)
    shear_y = torch.where(is_op("ShearY"), shear, zero)
    tx = torch.where(is_op("TranslateXRel"), sign * 0.45 * m / 10 * width, zero)
    ty = torch.where(is_op("TranslateYRel"), sign * 0.45 * m / 10 * height, zero)

    # RAND_OPS' affines turn about the corner (PIL's), rotate about the centre
    corner = ~is_op("Rotate")
    cx = torch.where(corner, -width / 2, zero)
    cy = torch.where(corner, -height / 2, zero)
    theta = _inverse_affine(angle, shear_x, shear_y, tx, ty, cx, cy)  # (B, 2, 3) in pixels

    # pixels about the centre -> affine_grid's units, where ±1 are the image's edges
    theta = theta * m.new_tensor([[1, height / width, 2 / width], [width / height, 1, 2 / height]])

    # one row per image, in the columns named above
    params = m.new_zeros(len(m), NUM_PARAMS)  # (B, 13)
    params[:, FACTOR] = factor[:, None]
    params[:, POSTERIZE_MASK] = mask[:, None]
    params[:, SOLARIZE_THRESHOLD] = threshold[:, None]
    params[:, SOLARIZE_ADD] = add[:, None]
    params[:, AFFINE] = theta.flatten(1)  # (B, 6)
    params[:, FILL_COLOUR] = m.new_tensor(FILL)  # the mean colour for every image
    return params


def _blend(x, y, factor):  # torchvision's _blend with a factor per image: f·x + (1 − f)·y
    return (x * factor).add_(y * (1 - factor)).clamp_(0, 255).to(torch.uint8)


def _grey(x):  # (b, 3, S, S) -> (b, 1, S, S): torchvision's luma, floored as for uint8 images
    r, g, b = x.unbind(-3)
    return (r * 0.2989 + g * 0.587 + b * 0.114).floor().unsqueeze(-3)


def _autocontrast(x):  # TF.autocontrast, its boolean-mask writes as torch.where (no host sync)
    lo = x.amin((-2, -1), keepdim=True)  # (b, 3, 1, 1) each channel's darkest value
    hi = x.amax((-2, -1), keepdim=True)  # (b, 3, 1, 1) and its brightest
    flat = hi == lo  # a constant channel stays as it is
    inv_scale = torch.where(flat, 1.0, (hi.float() - lo) * (1.0 / 255))
    out = x.float().sub_(torch.where(flat, 0.0, lo.float())).div_(inv_scale)
    return out.clamp_(0, 255).to(torch.uint8)


def _sharpen(x, factor):  # TF.adjust_sharpness: blend with a 3×3 blur, the border kept
    out = x.float()
    # torchvision's blur [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as sums of shifted slices (a
    # grouped conv2d is slow on a CPU); integer sums are exact, so the rounding is the same
    rows = out[..., :-2, :] + out[..., 1:-1, :] + out[..., 2:, :]  # (b, 3, S − 2, S)
    inner = out[..., 1:-1, 1:-1]  # (b, 3, S − 2, S − 2), a view: the blend writes into `out`
    blurred = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + 4 * inner) / 13
    inner += (blurred.round_() - inner) * (1 - factor)
    return out.clamp_(0, 255).to(torch.uint8)


def _warp(x, theta, fill):  # TF.affine / TF.rotate, bilinear, with a matrix per image
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (b, S, S, 2)
    sample = lambda stacked: F.grid_sample(stacked, grid, align_corners=False)  # zeros outside
    return _fill_outside(x, fill, sample)  # (b, 3, S, S), as the per-image ops


BATCH_OPS = {  # the colour ops of RAND_OPS on (b, 3, S, S) uint8, params p (b, 13, 1, 1)
    "AutoContrast": lambda x, p: _autocontrast(x),
    "Equalize": lambda x, p: TF.equalize(x),  # per-image, per-channel histograms already
    "Invert": lambda x, p: x.bitwise_not(),
    "PosterizeIncreasing": lambda x, p: x & p[:, POSTERIZE_MASK].to(torch.uint8),
    "SolarizeIncreasing": lambda x, p: torch.where(
        x >= p[:, SOLARIZE_THRESHOLD], x.bitwise_not(), x
    ),
    "SolarizeAdd": lambda x, p: torch.where(
        x < 128, (x + p[:, SOLARIZE_ADD]).clamp(max=255), x
    ).byte(),
    "ColorIncreasing": lambda x, p: _blend(x, _grey(x), p[:, FACTOR]),
    "ContrastIncreasing": lambda x, p: _blend(x, _grey(x).mean((-3, -2, -1), True), p[:, FACTOR]),
    "BrightnessIncreasing": lambda x, p: _blend(x, 0.0, p[:, FACTOR]),
    "SharpnessIncreasing": lambda x, p: _sharpen(x, p[:, FACTOR]),
}


def _to(tensor, device):  # a CPU tensor to the device without waiting for it (pinned, async)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def apply_sorted(x, params, counts):
    """Apply the ops to images sorted by op: counts[i] images of OP_ORDER[i] in a row.

    x (b, 3, S, S) uint8 and params (b, 13) on the device (the columns named above
    `_op_params`), counts Python ints."""
    p = params[:, :, None, None]  # (b, 13, 1, 1): broadcast over the pixels

    # the colour ops, one group of images each
    start = 0
    for name, count in zip(OP_ORDER, counts):
        group = slice(start, start + count)
        start += count
        if count and name in BATCH_OPS:
            x[group] = BATCH_OPS[name](x[group], p[group])

    # rotate, shear, translate: the last groups, one warp with a matrix per image
    warped = slice(sum(counts[: len(BATCH_OPS)]), start)
    if warped.stop > warped.start:
        theta = params[warped, AFFINE].view(-1, 2, 3)  # (w, 2, 3)
        x[warped] = _warp(x[warped], theta, p[warped, FILL_COLOUR])
    return x


def rand_augment_batch(images, generator, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
    """`RandAugment` on a uint8 batch (B, 3, S, S) on any device, per image: the same draws
    (`sample_ops`, from `generator`, a CPU torch.Generator), the same ops, the mean-colour fill.

    Each of the n op slots sorts the images by their op (skipped ones last), gathers the
    applied ones, runs `apply_sorted` on them and scatters them back. No host sync: the sort
    and the group sizes come from the CPU draws."""
    B, _, H, W = images.shape
    ops, applied, magnitudes, signs = sample_ops(
        B, generator, num_ops, magnitude, magnitude_std, prob
    )
    for k in range(num_ops):
        # this slot's images sorted by op on the CPU, the skipped ones last
        key = torch.where(applied[:, k], _SORT_KEY[ops[:, k]], len(OP_ORDER))  # (B,)
        order = key.argsort(stable=True)  # (B,)
        counts = key.bincount(minlength=len(OP_ORDER) + 1).tolist()  # CPU: no sync
        n = B - counts[-1]  # applied images
        if n == 0:
            continue

        # the applied images' rows and their ops' arguments, sent to the device without a wait
        rows = order[:n]  # (n,)
        params = _op_params(ops[rows, k], magnitudes[rows, k], signs[rows, k], H, W)  # (n, 13)
        rows = _to(rows, images.device)
        params = _to(params.float(), images.device)

        # gathered, augmented by op group, scattered back
        out = apply_sorted(images[rows], params, counts[:-1])  # (n, 3, S, S)
        images = images.index_copy(0, rows, out)  # (B, 3, S, S)
    return images


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
                # a rectangle's area and aspect (log-uniform), then its sides: timm's draws
                area = H * W * random.uniform(0.02, 1 / 3)
                aspect = math.exp(random.uniform(math.log(0.3), math.log(3.3)))
                h = round(math.sqrt(area * aspect))
                w = round(math.sqrt(area / aspect))

                # where it fits, at a uniform corner: noise or zeros; else another try
                if h < H and w < W:
                    y = random.randint(0, H - h)
                    x = random.randint(0, W - w)
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
