"""What a frozen backbone knows: the k-NN of its CLS token, linear probes of its patch tokens.

The idea
--------
M²oT (sec. 5.1) measures a distilled student on three tasks, each on top of *frozen*
features: ImageNet classification, ADE20K semantic segmentation (mIoU; "a linear probe for a
ViT") and NYUd depth (RMSE; DINOv2's settings). The backbone never changes; something small
learns to read it, so the score says what the features hold. Here:

    k-NN top-1   ŷ = argmax_c Σ_{j ∈ k most similar} exp(cos(z, z_j) / T) 1[y_j = c]
                 (CLS embedding z after the final norm, DINO's k = 20, T = 0.07)
    seg probe    logits = up(W · BN(z_p)) for every patch token z_p   (DINOv2's linear head:
                 BatchNorm, a 1×1 conv, bilinear upsampling to the label's size)
    depth probe  log d̂ = up(w · BN([z_p, z_cls])) (DINOv2: the CLS token beside each patch),
                 loss L = sqrt(mean g² − λ (mean g)²), g = log d̂ − log d, λ = 0.85 (SigLoss)
    mIoU         IoU_c = n_cc / (Σ_j n_cj + Σ_j n_jc − n_cc) from the confusion matrix n
                 (rows: label, columns: prediction) of the whole split, mean over the classes
                 present in the labels or the predictions
    RMSE         sqrt(mean (d̂ − d)²) over an image's valid pixels, then the mean over images

Dense labels (`build_dense_dataset`; the layouts in docs/m2ot.md): `--data synthetic`, part
masks and pseudo-depth (`SyntheticScenes`); `ade20k`, ADEChallengeData2016's 150 classes;
`nyud`, depth in metres from BTS's rgb_N.jpg / sync_depth_N.png pairs.

Letters: B images, S image side, g patch grid side, D token width, C classes.

Decisions where the papers are silent
-------------------------------------
* Depth is regressed as log-depth, not DINOv2's 256 bins: one number, the same loss family;
  its bias starts at log 5 m, mid-range (SILog moves an overall scale slowly).
* The model's own image size S (no position-embedding interpolation): the shorter side is
  resized to S (labels: nearest), then a centre crop, or a random crop and a flip while the
  probe trains; every metric is measured on the S × S crop. Valid depth: 0.001 < d < 10 m
  (DINOv2's NYUd range), no Eigen crop; the upper bound is strict, as in the evaluation code
  of BTS, AdaBins and the Monocular-Depth-Estimation-Toolbox that DINOv2's depth evaluation
  builds on (`gt > min_depth` and `gt < max_depth`). One mask serves the loss and the metric
  (DINOv2's SigLoss alone keeps d ≤ max_depth).
* ADE20K's labels as mmseg's reduce_zero_label: 0 ("other") is ignored, v ↦ v − 1, and a raw
  255 stays ignored. A label past the classes is ignored as IGNORE is, by the loss and the
  confusion matrix (mmseg drops it from the label areas too, but still counts the pixel's
  prediction, which a (C, C) matrix has no cell for).
* A training batch without a single label (no valid depth, every pixel ignored) is skipped:
  no optimizer step, where a mean over no pixel would be NaN. Each loss is ≈ 0, with a zero
  gradient, when its own labels are empty (a batch may hold depth and no segmentation).
* Features: the last block's tokens after the final norm; `--probe-blocks n` concatenates
  the last n blocks' patch tokens, each through the final norm (DINOv2's multi-layer probe).
  Computed once per batch under `torch.no_grad()`, shared by both heads.
* Schedule: AdamW (`--probe-lr` 1e-2, weight decay 1e-4), cosine to 0 over `--probe-epochs`
  (10), batches of `--batch-size`, heads initialised from `--seed`. A small fixed budget
  (hence the learning rate, 10× DINOv2's over 40 000 steps): it compares backbones read the
  same way; it does not reproduce DINOv2's numbers. One process (eval.py's command line).
"""

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from einops import rearrange
from torchvision import tv_tensors
from torchvision.transforms import v2

from data import SyntheticImages, normalize, read_rgb
from errors import UsageError
from vit import amp_dtype_for, autocast, evaluating

IGNORE = 255  # label value that no loss or metric counts
MAX_DEPTH = 10.0  # metres: DINOv2's NYUd range; farther (or 0) is not a measurement
KNN_CHUNK = 1 << 26  # k-NN queries in chunks of KNN_CHUNK // M: (chunk, M) sims ≈ 256 MB
TASKS = {"synthetic": ("seg", "depth"), "ade20k": ("seg",), "nyud": ("depth",)}


# ------------------------------------------------------------------------- k-NN of the CLS token
def knn_top1(train_feats, train_labels, val_feats, val_labels, num_classes, k=20, temperature=0.07):
    """Weighted k-NN top-1 (%) of val embeddings (V, D) against a train bank (M, D): DINO's
    protocol and constants (Caron et al. 2021, its eval_knn.py: k = 20, T = 0.07)."""
    # > "k-NN classification using shared backbone" (M²oT sec. 5.1, its ImageNet-1k number)
    # s_j = cos(z, z_j); score_c = Σ_{j ∈ k most similar} exp(s_j / T) 1[y_j = c]; ŷ = argmax_c
    bank = F.normalize(train_feats.float(), dim=1)  # (M, D)
    device = bank.device
    bank_labels = train_labels.to(device)  # (M,)
    k = min(k, len(bank))
    rows = max(1, KNN_CHUNK // len(bank))  # queries per chunk: a (rows, M) similarity at most
    correct = 0
    for z, y in zip(val_feats.split(rows), val_labels.split(rows)):
        sim = F.normalize(z.float().to(device), dim=1) @ bank.T  # (V', M) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (V', k) the k nearest train images
        votes = torch.zeros(len(z), num_classes, device=device)  # (V', classes)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == y.to(device)).sum())
    return 100 * correct / len(val_labels)


@torch.no_grad()
def cls_embeddings(model, loader, device, amp_dtype=None):
    """The CLS token of `forward_features` (after the final norm) of every image of `loader`:
    features (n, D) float32 and labels (n,). Under DDP every rank gathers all the shards (equal
    sizes: the DistributedSampler pads), so every rank holds the same embeddings."""
    feats = []
    labels = []
    with evaluating(model):
        for images, targets in loader:
            images = normalize(images.to(device, non_blocking=True))  # uint8 -> (B, 3, S, S)
            with autocast(device, amp_dtype):
                tokens, _ = model.forward_features(images)  # (B, N, D)
            feats.append(tokens[:, 0].float())  # (B, D) the CLS token
            labels.append(targets.to(device))
    out = [torch.cat(feats), torch.cat(labels)]  # (n, D), (n,)
    if dist.is_available() and dist.is_initialized():
        for i, t in enumerate(out):
            shards = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(shards, t)
            out[i] = torch.cat(shards)  # (world·n, ...) every rank's images
    return tuple(out)


def knn_eval(model, train_loader, val_loader, device, k=20, temperature=0.07, amp_dtype=None):
    """k-NN top-1 (%) of the CLS embedding: the bank from `train_loader` (read with the
    evaluation transform: `build_dataset(True, args, augment=False)`), queries from val."""
    bank, bank_labels = cls_embeddings(model, train_loader, device, amp_dtype)  # (M, D), (M,)
    queries, labels = cls_embeddings(model, val_loader, device, amp_dtype)  # (V, D), (V,)
    classes = int(max(bank_labels.max(), labels.max())) + 1
    return knn_top1(bank, bank_labels, queries, labels, classes, k, temperature)


# ------------------------------------------------------------------------ data with dense labels
class SyntheticScenes(torch.utils.data.Dataset):
    """`data.SyntheticImages` with a part mask and a pseudo-depth map for every image.

    The same draws as the classification images, painted far to near. Depth has two cues, as
    in a photograph: an instance's size (a pinhole camera: nearer parts are larger and cover
    farther ones, d = z · 0.45 S / r) and the kind of scene, a depth scale z per class (0.7 to
    1.4, spread by the golden ratio, as a bathroom is smaller than a hall), which also scales
    the background, a floor receding from 4 z at the bottom row to 7 z at the top. Depth
    runs from 1.4 to 9.8, and reading z takes the context of the whole image: a part type
    appears in several classes. Segmentation classes: 0 background, p + 1 for part type p.
    A pure function of (seed, split, i), like the images.
    """

    def __init__(self, images, transform):
        self.images = images
        self.transform = transform
        self.num_classes = len(images.colours) + 1  # the part types and the background

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img, label, parts = self.images.render(index, far_to_near=True)  # (3, S, S) in [0, 1]
        S = img.shape[-1]
        z = 0.7 + 0.7 * (label * 0.618034 % 1.0)  # the scene's depth scale
        seg = torch.zeros(S, S, dtype=torch.long)  # (S, S) background
        depth = z * (7 - 3 * self.images.yx[0] / S)  # (S, S) the floor: 7 z at the top
        for part, r, mask in parts:  # far to near: the nearest instance is written last
            seg[mask] = part + 1
            depth[mask] = z * 0.45 * S / r
        img = tv_tensors.Image((img * 255).round().to(torch.uint8))
        img, seg, depth = self.transform(img, tv_tensors.Mask(seg), tv_tensors.Mask(depth))
        return {"image": img, "seg": seg, "depth": depth}


class PairedFolder(torch.utils.data.Dataset):
    """Image files with a label image each: ADE20K's segmentation, NYUd's depth.

    pairs: [(RGB path, label path)]; task "seg" (uint8 PNG, 0 = ignore, v -> v - 1) or "depth"
    (uint16 PNG in millimetres -> metres)."""

    def __init__(self, pairs, task, transform):
        self.pairs = pairs
        self.task = task
        self.transform = transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        rgb, label = self.pairs[index]
        io = torchvision.io
        raw = io.decode_image(io.read_file(str(label)), mode=io.ImageReadMode.UNCHANGED)[0]
        if self.task == "seg":
            # mmseg's reduce_zero_label: 0 ("other") -> IGNORE, v -> v - 1, 255 stays IGNORE
            unlabelled = (raw == 0) | (raw == IGNORE)
            label = torch.where(unlabelled, IGNORE, raw.long() - 1)  # (H, W)
        else:
            label = raw.int().float() / 1000  # (H, W) millimetres -> metres; 0: not measured
        img, label = self.transform(tv_tensors.Image(read_rgb(rgb)), tv_tensors.Mask(label))
        return {"image": img, self.task: label}


def label_pairs(data, root, is_train):
    """[(image file, label file)] of a split of ADEChallengeData2016 or of NYUd (the layouts
    in docs/m2ot.md); FileNotFoundError naming the layout if there is none or a label is
    missing."""
    root = Path(root)
    if data == "ade20k":
        split = "training" if is_train else "validation"
        images = sorted((root / "images" / split).glob("*.jpg"))
        pairs = [(p, root / "annotations" / split / f"{p.stem}.png") for p in images]
        layout = f"images/{split}/X.jpg with annotations/{split}/X.png"
    else:
        split = "train" if is_train else "test"
        images = sorted((root / split).rglob("rgb_*.jpg"))
        pairs = [(p, p.with_name(f"sync_depth_{p.stem[4:]}.png")) for p in images]
        layout = f"{split}/**/rgb_N.jpg with sync_depth_N.png beside it"
    missing = [label for _, label in pairs if not label.is_file()]
    if not pairs or missing:
        what = f"{missing[0]} is missing" if missing else f"no {layout}"
        raise FileNotFoundError(f"--data-path {root} ({data}): {what}")
    return pairs


def dense_transform(is_train, S):
    """Image and labels together (labels: nearest): the shorter side to S, then a random crop
    and a flip (training) or a centre crop; uint8 image, labels of their own dtype."""
    crop = [v2.RandomCrop(S), v2.RandomHorizontalFlip()] if is_train else [v2.CenterCrop(S)]
    return v2.Compose([v2.Resize(S, antialias=True), *crop, v2.ToPureTensor()])


def build_dense_dataset(is_train, args):
    """(data set, segmentation classes or None) of `args.data`: synthetic, ade20k or nyud.
    Every item is a dict: "image" uint8 (3, S, S), and "seg" (S, S) long or "depth" (S, S)."""
    transform = dense_transform(is_train, args.img_size)
    if args.data == "synthetic":
        split = "train" if is_train else "val"
        C = args.nb_classes or 10
        size = args.synthetic_train_size if is_train else args.synthetic_val_size
        images = SyntheticImages(size, C, args.img_size, split, seed=args.synthetic_seed)
        scenes = SyntheticScenes(images, transform)
        return scenes, scenes.num_classes
    if args.data not in TASKS:
        raise UsageError(f"--data {args.data} has no dense labels: synthetic, ade20k or nyud")
    task, C = ("seg", 150) if args.data == "ade20k" else ("depth", None)
    pairs = label_pairs(args.data, args.data_path, is_train)
    return PairedFolder(pairs, task, transform), C


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(pred, label, num_classes):
    """(C, C) counts n[label, prediction] over the pixels labelled with one of the C classes:
    IGNORE and any label past the classes are not counted, nor a prediction past them."""
    # int64 first: label · C + pred overflows the uint8 of a label image
    pred = pred.long()
    label = label.long()

    # the pixels that count: a class label and a class predicted
    keep = (label != IGNORE) & (label >= 0) & (label < num_classes)
    keep &= (pred >= 0) & (pred < num_classes)

    # n[y, ŷ]: one bincount over the index y · C + ŷ of each pixel's pair
    pairs = label[keep] * num_classes + pred[keep]  # (pixels,)
    return torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes)


def mean_iou(confusion):
    """mIoU (%) over the classes present in the labels or the predictions."""
    hit = confusion.diag().double()  # (C,) n_cc
    union = confusion.sum(0) + confusion.sum(1) - hit  # (C,) labelled c or predicted c
    present = union > 0
    return float(100 * (hit[present] / union[present]).mean())


def valid_depth(depth):
    """The pixels that hold a measurement: 0.001 < d < MAX_DEPTH metres, (B, S, S) bool (the
    NYUd evaluation code's bounds, both strict)."""
    return (depth > 1e-3) & (depth < MAX_DEPTH)


def rmse_per_image(pred, depth):
    """sqrt(mean (d̂ − d)²) over each image's valid pixels, (B,); images with none dropped."""
    valid = valid_depth(depth)  # (B, S, S)
    count = valid.sum((1, 2))  # (B,)
    squared = torch.where(valid, (pred - depth) ** 2, 0).sum((1, 2))  # (B,)
    return (squared[count > 0] / count[count > 0]).sqrt()


def silog_loss(log_pred, depth, lam=0.85):
    """The scale-invariant log loss sqrt(mean g² − λ (mean g)²), g = log d̂ − log d over the
    valid pixels. Without a valid pixel it is ~0 with a zero gradient, not NaN (a mean over
    nothing), and needs no host sync to find out."""
    valid = valid_depth(depth)  # (B, S, S)
    count = valid.sum().clamp_min(1)  # 1 when none is valid: the sums below are then 0

    # g on the valid pixels, 0 elsewhere (d clamped: no log 0 = −inf in the unused branch)
    g = torch.where(valid, log_pred - depth.clamp_min(1e-3).log(), 0)  # (B, S, S)
    mean_g = g.sum() / count
    mean_g2 = g.pow(2).sum() / count

    # L = sqrt(mean g² − λ (mean g)²); the clamp passes no gradient at 0 (nothing valid)
    return (mean_g2 - lam * mean_g**2).clamp_min(1e-12).sqrt()


# ----------------------------------------------------------------------------- the probes
class LinearHead(nn.Module):
    """DINOv2's linear head: BatchNorm and a 1×1 conv (one linear map per patch token),
    upsampled bilinearly to the label's size; with_cls: the CLS token beside every patch
    token (DINOv2's depth probe; its segmentation probe reads the patch tokens alone)."""

    def __init__(self, dim, out, with_cls_dim=0):
        super().__init__()
        self.with_cls = bool(with_cls_dim)
        self.bn = nn.BatchNorm2d(dim + with_cls_dim)
        self.conv = nn.Conv2d(dim + with_cls_dim, out, 1)

    def forward(self, feats, size):  # (B, n·D, g, g) and (B, D) -> (B, out, S, S)
        patches, cls = feats
        if self.with_cls:
            g = patches.shape[-1]
            patches = torch.cat([patches, cls[:, :, None, None].expand(-1, -1, g, g)], 1)
        out = self.conv(self.bn(patches))  # (B, out, g, g)
        return F.interpolate(out, size, mode="bilinear", align_corners=False)


@torch.no_grad()
def patch_features(model, images, blocks=1):
    """The patch tokens of the last `blocks` blocks, each through the final norm, concatenated,
    (B, n·D, g, g), and the last block's CLS token (B, D); the backbone in eval mode, without
    gradients."""
    outs = []
    keep = lambda module, inputs, out: outs.append(out[0])  # a Block returns (x, routing)
    hooks = [b.register_forward_hook(keep) for b in model.blocks[len(model.blocks) - blocks :]]
    try:
        with evaluating(model):
            model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    tokens = [model.norm(x).float() for x in outs]  # (B, N, D) each
    patches = torch.cat([x[:, -(model.grid**2) :] for x in tokens], -1)  # (B, g², n·D)
    return rearrange(patches, "b (h w) d -> b d h w", h=model.grid), tokens[-1][:, 0]


def seg_target(labels, num_classes):
    """The labels a head of `num_classes` learns: IGNORE for a label past the classes."""
    return torch.where(labels < num_classes, labels, IGNORE)


def has_labels(heads, batch):
    """Whether a batch holds one pixel that a head learns from: a class label or a valid
    depth. Read on the loader's CPU tensors, before they move: no host sync."""
    labelled = False
    if "seg" in heads:
        target = seg_target(batch["seg"], heads["seg"].conv.out_channels)  # (B, S, S)
        labelled |= bool((target != IGNORE).any())
    if "depth" in heads:
        labelled |= bool(valid_depth(batch["depth"]).any())
    return labelled


def probe_losses(heads, feats, batch):
    """The sum of the heads' losses on one batch: cross-entropy (ignoring IGNORE), SILog;
    each 0, with a zero gradient, when the batch has none of its labels."""
    size = batch["image"].shape[-2:]
    loss = 0
    if "seg" in heads:
        # CE = Σ_labelled −log p_y / #labelled, the sum over none is 0 (the mean would be NaN)
        logits = heads["seg"](feats, size)  # (B, C, S, S)
        target = seg_target(batch["seg"], logits.shape[1])  # (B, S, S)
        total = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
        loss = loss + total / (target != IGNORE).sum().clamp_min(1)
    if "depth" in heads:
        loss = loss + silog_loss(heads["depth"](feats, size)[:, 0], batch["depth"])
    return loss


def on_device(batch, device):
    """A batch dict on the device, its image normalised to float."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {**batch, "image": normalize(batch["image"])}  # (B, 3, S, S) float32


def train_probes(model, heads, loader, device, epochs, lr, blocks=1, amp_dtype=None):
    """Train the heads on the frozen features of `loader`: AdamW, cosine to 0 over every step."""
    params = [p for head in heads.values() for p in head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    heads.train()
    for _ in range(epochs):
        for batch in loader:
            # nothing to learn from (no valid depth, every pixel ignored): no step at all
            if not has_labels(heads, batch):
                continue

            batch = on_device(batch, device)
            with autocast(device, amp_dtype):
                feats = patch_features(model, batch["image"], blocks)  # patches, CLS
            loss = probe_losses(heads, feats, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def eval_probes(model, heads, loader, device, num_classes, blocks=1, amp_dtype=None):
    """{"seg_miou": %, "depth_rmse": metres} of the heads on `loader` (one per head)."""
    confusion = 0  # (C, C) counts, summed over the batches
    rmse = []  # per image
    out = {}
    heads.eval()
    for batch in loader:
        batch = on_device(batch, device)
        with autocast(device, amp_dtype):
            feats = patch_features(model, batch["image"], blocks)  # patches, CLS
        size = batch["image"].shape[-2:]
        if "seg" in heads:
            pred = heads["seg"](feats, size).argmax(1)  # (B, S, S)
            confusion = confusion + confusion_matrix(pred, batch["seg"], num_classes)
        if "depth" in heads:
            pred = heads["depth"](feats, size)[:, 0].exp()  # (B, S, S) metres
            rmse.append(rmse_per_image(pred, batch["depth"]))
    if "seg" in heads:
        out["seg_miou"] = mean_iou(confusion)
    if "depth" in heads:
        out["depth_rmse"] = float(torch.cat(rmse).mean())
    return out


def check_probes(data, tasks, blocks, depth):
    """One line (UsageError) if `data` lacks a task's labels or the model has < `blocks`."""
    for task in tasks:
        if task not in TASKS.get(data, ()):
            has = "; ".join(f"{d}: {' and '.join(t)}" for d, t in TASKS.items())
            raise UsageError(f"--{task}-probe: --data {data} has no {task} labels ({has})")
    if not 1 <= blocks <= depth:
        raise UsageError(f"--probe-blocks {blocks}: the model has {depth} blocks")


def dense_probes(model, args, device, tasks, *, epochs=10, lr=1e-2, blocks=1, workers=0):
    """Train linear probes for `tasks` ("seg", "depth") on the frozen `model` over the train
    split of `args.data` (its dense labels) and measure them on its validation split."""
    check_probes(args.data, tasks, blocks, len(model.blocks))
    train_set, classes = build_dense_dataset(True, args)
    val_set, _ = build_dense_dataset(False, args)
    cuda = device.type == "cuda"
    batches = lambda data, train: torch.utils.data.DataLoader(
        data,
        args.batch_size,
        shuffle=train,
        num_workers=workers,
        pin_memory=cuda,
        drop_last=train and len(data) > args.batch_size,  # BatchNorm: no batch of one
    )
    amp_dtype = amp_dtype_for(device)
    with torch.random.fork_rng(devices=[]):  # seeded heads and crops; the caller's RNG kept
        torch.manual_seed(args.seed)
        outs = {t: classes if t == "seg" else 1 for t in tasks}
        dim = model.embed_dim * blocks  # the concatenated blocks' width
        cls = {"seg": 0, "depth": model.embed_dim}  # DINOv2: the CLS token for depth only
        heads = nn.ModuleDict({t: LinearHead(dim, n, cls[t]) for t, n in outs.items()})
        heads = heads.to(device)
        if "depth" in heads:  # log-depth starts mid-range: SILog moves the scale slowly
            nn.init.constant_(heads["depth"].conv.bias, math.log(MAX_DEPTH / 2))
        train_probes(model, heads, batches(train_set, True), device, epochs, lr, blocks, amp_dtype)
    return eval_probes(model, heads, batches(val_set, False), device, classes, blocks, amp_dtype)
