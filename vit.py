"""The ViT itself, in timm's vocabulary: DeiT's blocks, with a slot for MoE layers.

The idea
--------
A Vision Transformer cuts an image into P×P patches, embeds each as a token, prepends a CLS
token and adds learned positions, then runs `depth` pre-norm blocks

    x = x + Attn(LN1(x))          every token looks at every other
    x = x + MLP(LN2(x))           every token alone: the part MoE makes sparse (moe.py)

and classifies from CLS after a final norm (DeiT, without its distillation token). This file
is only that network, written so that the weights of timm, DeiT-III, torchvision and DINOv2
load into it (checkpoint.py) and so that a block's MLP can be any module that maps
(B, N, D) -> ((B, N, D), routing): `Mlp` (routing None) or a `moe.MoEMLP`. The student
(`moe.build_model`) and every teacher (teacher.py) are this class.

Legend (timm's kwargs): D `embed_dim`, `depth` blocks, `num_heads`, H = `mlp_ratio`·D,
P `patch_size`, G = `img_size` / P the grid side, R `reg_tokens`.
Letters: B images, N tokens (CLS, R registers, G² patches), D width.

Decisions
---------
* State-dict keys are timm's (`patch_embed.proj`, `cls_token`, `pos_embed`,
  `blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2`, `norm`, `head`), LayerNorm
  eps 1e-6, qkv bias. Optional DeiT-III layer scale is timm's `ls1.gamma`/`ls2.gamma`,
  `no_embed_class=True` is timm's DeiT-III position embedding without a CLS slot, and
  `reg_tokens=R` DINOv2's registers (timm's `reg_token` (1, R, D), placed after CLS), so the
  same class also runs the teachers (the student has none: its `forward` reads token 0).
* Stochastic depth drops a block's residual branch per image (torchvision's
  `stochastic_depth`, "row" mode), its rate growing linearly with depth (DeiT).
* Every linear layer, the routers included, starts trunc-normal with std 0.02; positions
  trunc-normal, CLS and registers N(0, 1e-6) (timm's init).
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision.ops import stochastic_depth


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)  # D -> H
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)  # H -> D

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))), None  # (B, N, D), no routing


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, D/heads)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))  # (B, N, D)


class LayerScale(nn.Module):
    """DeiT-III's per-channel residual scale (timm key `ls1.gamma`)."""

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path_rate, init_values, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp if mlp is not None else Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def drop_path(self, x):
        # stochastic depth: drop the whole residual branch for a random subset of images
        return stochastic_depth(x, self.drop_path_rate, "row", self.training)  # (B, N, D)

    def forward(self, x, route_logits=None):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))  # (B, N, D)
        if route_logits is None:
            y, routing = self.mlp(self.norm2(x))
        else:
            y, routing = self.mlp(self.norm2(x), route_logits)
        return x + self.drop_path(self.ls2(y)), routing  # (B, N, D)


class VisionTransformer(nn.Module):
    """DeiT / ViT with timm's names; `moe_layers` (1-indexed) get `moe_mlp(dim, hidden)`."""

    def __init__(
        self,
        *,
        img_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        init_values=None,
        no_embed_class=False,
        reg_tokens=0,
        moe_layers=(),
        moe_mlp=None,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")

        # the sizes: G² patches after 1 + R prefix tokens, of width D
        self.grid = img_size // patch_size
        self.num_prefix_tokens = 1 + reg_tokens  # CLS, then R registers (timm's order)
        self.num_tokens = self.grid**2 + self.num_prefix_tokens  # N = patches + CLS (+ R)
        self.embed_dim = embed_dim  # D
        self.no_embed_class = no_embed_class  # positions for the patches only (DeiT-III)

        # the embedding: patches, CLS, registers and positions
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # DINOv2's registers: extra tokens that hold global state instead of high-norm patches
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        pos_len = self.grid**2 if no_embed_class else self.num_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_len, embed_dim))

        # the blocks, an MoE layer in place of the MLP in `moe_layers`; the final norm, the head
        self.moe_layers = tuple(moe_layers)
        hidden = int(embed_dim * mlp_ratio)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                dpr[i],
                init_values,
                moe_mlp(embed_dim, hidden) if i + 1 in self.moe_layers else None,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # as timm
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, images):
        """Patchify, add positions, prepend CLS and registers: (B, 3, H, W) -> (B, N, D)."""
        x = rearrange(self.patch_embed.proj(images), "b d h w -> b (h w) d")  # (B, G², D)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]  # (B, 1, D)
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))  # (B, R, D)
        if self.no_embed_class:  # DeiT-III, DINOv2-reg: position embedding has no prefix slots
            return torch.cat([*prefix, x + self.pos_embed], dim=1)  # (B, N, D)
        return torch.cat([*prefix, x], dim=1) + self.pos_embed  # (B, N, D)

    def forward_features(self, images, route=None):
        """Every token after the final norm, (B, N, D) with CLS first, and the routings.

        route: optional list of (B, N, E) logits, one per MoE layer, that choose the experts
        instead of the layers' own routers (teacher-route mode, TGR sec. 5.3).
        """
        if route is not None and len(route) != len(self.moe_layers):
            raise ValueError(f"route has {len(route)} entries, model has {len(self.moe_layers)}")
        x = self.embed(images)  # (B, N, D)
        routings = []  # one Routing per MoE layer
        outside = iter(route or [])  # the logits that route each MoE layer, if given
        for i, block in enumerate(self.blocks):
            is_moe = i + 1 in self.moe_layers
            x, routing = block(x, next(outside) if (is_moe and route is not None) else None)
            if routing is not None:
                routings.append(routing)
        return self.norm(x), routings  # (B, N, D)

    def forward(self, images, route=None, features=False):
        """logits (B, classes), routings: one Routing per MoE layer ([] for dense).

        With num_classes = 0 (a student trained without labels) the "logits" are the CLS features;
        features=True returns every token instead, (B, N, D) (through `forward`, so DDP sees it).
        """
        x, routings = self.forward_features(images, route)  # (B, N, D)
        if features:
            return x, routings
        return self.head(x[:, 0]), routings  # CLS-token classifier: (B, classes)


# ----------------------------------------------------------------------------- running a model
@contextlib.contextmanager
def evaluating(model):
    """model.eval() inside the block, its own training flag back after it (even on error):
    every measurement (eval.py, the probes, the expert→teacher preferences) runs a model
    this way."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def expert_outputs_kept(model):
    """Inside the block, every top-K MoE layer of `model` hands back φ and its input x_t in its
    Routing (moe.py's `keep_expert_outputs`); each layer's own setting back after it (even on
    error). Layers without the setting (Soft MoE) are left alone."""
    layers = [model.blocks[i - 1].mlp for i in model.moe_layers]
    layers = [layer for layer in layers if hasattr(layer, "keep_expert_outputs")]
    before = [layer.keep_expert_outputs for layer in layers]
    for layer in layers:
        layer.keep_expert_outputs = True
    try:
        yield model
    finally:
        for layer, kept in zip(layers, before):
            layer.keep_expert_outputs = kept


def amp_dtype_for(device):
    """The project's mixed-precision rule: bf16 on a CUDA device, None (fp32) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device, amp_dtype):
    """Autocast to `amp_dtype` (bf16 on CUDA, or a bf16 teacher), or nothing when it is None:
    the one mixed-precision switch of the trainer, the evaluation and the teachers."""
    enabled = amp_dtype is not None
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=enabled)
