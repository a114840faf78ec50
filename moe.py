"""The student: a DeiT whose chosen MLPs become sparse Mixture-of-Experts layers.

The idea
--------
A ViT block is `x + Attn(LN1(x))` then `x + MLP(LN2(x))`. V-MoE (Riquelme et al. 2021)
replaces the MLP of some blocks with E expert MLPs and a router that sends each token to
K of them, so parameters grow with E while the compute per token stays that of K MLPs:

    y_t = Σ_{k ≤ K, kept} g_{t,k} · MLP_{e_{t,k}}(x_t)          x_t = LN2 output of token t

with e_{t,k} the chosen experts and g_{t,k} their combine weights (`router.py`). A dropped
assignment (expert full, see capacity) adds nothing; the residual carries the token on.

How it runs fast (the required design): the E experts are *stacked* weights
w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D). Every kept assignment (t, k) gets a row, its
slot, in an (E, G·C, D) buffer: slot = e·(G·C) + g·C + its queue position. The layer inverts
that once into the token and the combine weight of every slot; then dispatch is one
index_select (buf_r = x_{token_r}), two batched matmuls with the biases folded in (baddbmm)
run all experts at once, and combine is one weighted index_add_ (y_{token_r} += g_r · out_r).
There is no (T, E, C) one-hot tensor, no Python loop over experts and no boolean-mask
indexing (which would wait for the GPU), so the cost stays flat as E grows, and every expert
weight takes part in every step (DDP needs no `find_unused_parameters`).

The textbook comes first: `MoEMLP.forward_one_hot` writes the layer as GShard and V-MoE do,
with one-hot dispatch and combine tensors (G, S, E, C) and two einsums, and router.py's
`queue_positions_one_hot` counts queue positions with a one-hot cumsum. Both are tested equal
to the fast versions (tests/test_moe.py), which keep the same numbers and drop the one-hot
tensors.

Variants, one `--method` each (all share the stacked experts):
* `vmoe` (and `tgr`, `stablemoe`, `zloss`, `teacher-route`, which differ only in training):
  noisy top-K token choice with capacity, `MoEMLP`.
* `lossfree`: the same router without a balance loss; a per-expert bias added to the scores
  for the choice only keeps the load even (auxiliary-loss-free balancing, DeepSeek-V3).
* `expert-choice`: each expert takes its top-C tokens, `MoEMLP(router="expert-choice")`.
* `softmoe`: Soft MoE (Puigcerver et al. 2024), `SoftMoEMLP`: every slot is a softmax-weighted
  average of all tokens, so nothing is discrete and nothing is dropped.
* `dense`: the plain DeiT, the baseline and the usual teacher.

Legend: D `embed_dim`, H hidden (`mlp_ratio · D`), h an expert's hidden width (`expert_hidden`,
default H), E `num_experts`, K `k`, cf `capacity_factor`, σ `noise_std`, S_MoE `moe_layers`
(1-indexed blocks, V-MoE "Last n"), φ(t, e) expert e's output for token t.

Decisions where the papers are silent
-------------------------------------
* The ViT around the experts is vit.py's, in timm's vocabulary; a MoE block keeps its router
  and experts under `blocks.{i}.mlp.` (`router.weight`, `w1`, `b1`, `w2`, `b2`).
* Router weights start like every other linear layer (trunc-normal, std 0.02).
* Soft MoE uses n = max(1, round(K·N/E)) slots per expert, so E experts process about K·N
  slots per image, the compute of top-K routing (TGR supplementary sec. A). Its `Routing`
  record reports, per token, the share of its output each expert wrote (combine weights
  summed over that expert's slots) as `probs`, and that share's argmax as `experts`.
* Experts may be narrower than the dense MLP: h = H/K (`expert_hidden`) makes K active
  experts hold the dense MLP's weight count plus the router's D·E and K − 1 extra output
  biases b2 (fine-grained experts, as a student of several teachers uses by default).
* `layer.keep_expert_outputs = True` also returns φ(t, e_{t,k}), the gathered expert rows
  before the combine weight, as `Routing.expert_out` (T, K, D), 0 where dropped, in the graph
  (a loss on each expert's own output trains the experts through it), and the layer's input
  x_t as `Routing.inputs` (T, D) (a second router may read it). Off, nothing more is kept.
* `lossfree`'s bias steps by u = `bias_update_rate` (DeepSeek-V3's 0.001) after every
  training *batch* (with --accum-iter, every batch of a step), from the choices before capacity;
  the loads are this process's (under DDP, DDP broadcasts rank 0's buffers at each forward, so
  the bias follows rank 0's batches). Evaluation uses b and never moves it.
* Upcycling (`upcycle`) copies a dense checkpoint of the same size into a MoE model: every
  expert of block i starts from block i's MLP, routers stay fresh (see `upcycle` for h < H).
* Few, large ops: on a GPU every small op is a kernel launch, so the routing and dispatch
  glue, not the expert matmuls, sets the layer's cost. Queue positions come from one stable
  sort and one searchsorted; slots are computed once and one slot -> token map serves both
  dispatch and combine; the combine weight is applied per slot. What remains is the function
  itself: router, clean p and noisy q, top-k, the record the losses read (position, kept,
  weights), two baddbmm. The op counts and what they cost on a GPU: docs/benchmarks.md
  (`benchmarks/moe_layer.py --ops-only` counts them).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from router import Routing, check_routing, expert_choice_routing, group_size_for, top_k_routing
from vit import VisionTransformer

# Letters: B images, N tokens (patches + CLS), D width, H hidden, E experts, K top-k,
# C capacity per expert and group, G groups, T tokens (B·N), P slots per expert (Soft MoE).

MODELS = {  # VisionTransformer keyword arguments per --model (mlp_ratio 4 throughout), as timm
    "micro": dict(embed_dim=96, depth=6, num_heads=3, moe_layers=(4, 6)),  # CPU demos, tests
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, moe_layers=(8, 10, 12)),  # DeiT-Ti
    "small": dict(embed_dim=384, depth=12, num_heads=6, moe_layers=(8, 10, 12)),  # DeiT-S
    "base": dict(embed_dim=768, depth=12, num_heads=12, moe_layers=(8, 10, 12)),  # DeiT-B
}
# --method -> which MLP the MoE blocks get; the rest of a method lives in train.py
METHODS = {
    "dense": None,
    "vmoe": "top-k",
    "tgr": "top-k",
    "stablemoe": "top-k",
    "zloss": "top-k",
    "teacher-route": "top-k",
    "expert-choice": "expert-choice",
    "softmoe": "soft",
    "lossfree": "top-k",  # V-MoE's router balanced by a selection bias, no auxiliary loss
}


# ----------------------------------------------------------------------------- experts
class StackedExperts(nn.Module):
    """E two-layer GELU MLPs stored as stacked weights, run with two batched matmuls."""

    def __init__(self, dim, hidden, num_experts):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # (E, D, H)
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))  # (E, H)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # (E, H, D)
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))  # (E, D)
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    def run_experts(self, buf):
        # MLP_e(x) = W2_e · GELU(W1_e · x + b1_e) + b2_e, all experts in one bmm each
        h = torch.baddbmm(self.b1.unsqueeze(1), buf, self.w1)  # (E, rows, H)
        return torch.baddbmm(self.b2.unsqueeze(1), F.gelu(h), self.w2)  # (E, rows, D)


class MoEMLP(StackedExperts):
    """A sparse MoE layer that replaces a block's MLP: y, routing = layer(x), x: (B, N, D)."""

    def __init__(
        self,
        dim,
        hidden,
        num_experts,
        *,
        k=1,
        capacity_factor=1.05,
        noise_std=1.0,
        group_size=8,
        batch_priority=False,
        eval_capacity_factor=None,
        router="top-k",
        bias_update_rate=0.0,
    ):
        super().__init__(dim, hidden, num_experts)
        check_routing(num_experts, k, capacity_factor, eval_capacity_factor)  # one line if not
        if router not in ("top-k", "expert-choice"):
            raise ValueError(f"unknown router {router!r}: use 'top-k' or 'expert-choice'")

        # how tokens are routed (router.py)
        self.k = k  # K
        self.noise_std = noise_std  # σ: the logits get noise of std σ/E in training
        self.group_size = group_size  # images per routing group
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor or capacity_factor
        self.batch_priority = batch_priority  # BPR
        self.router_type = router  # "top-k" or "expert-choice"
        self.router = nn.Linear(dim, num_experts, bias=False)  # W_r: (D -> E)
        self.keep_expert_outputs = False  # True: also hand back φ and x_t in the Routing

        # auxiliary-loss-free balancing (`--method lossfree`): a per-expert bias b that only
        # chooses, nudged by u after every training batch (`update_expert_bias`); a buffer, so
        # it is saved, resumed and used at evaluation, but never trained by a gradient
        self.bias_update_rate = bias_update_rate
        if bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(num_experts))  # (E,) b
        else:
            self.expert_bias = None

    def route(self, tokens, num_images, route_logits=None):
        """Every token's experts, combine weights and queue positions (router.py): a `Routing`.

        tokens: (T, D), the images' tokens in order; route_logits: (B, N, E) logits that
        choose instead of our own router's (teacher-route), or None.
        """
        B = num_images
        logits = self.router(tokens)  # (T, E) the student's own router
        groups = B // group_size_for(B, self.group_size)
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.router_type == "expert-choice":
            return expert_choice_routing(logits, k=self.k, capacity_factor=cf, num_groups=groups)

        # teacher-route mode: outside logits choose; our own are recorded for the KL
        chooser = logits if route_logits is None else route_logits.reshape(tokens.shape[0], -1)
        noise = self.noise_std / self.num_experts if self.training else 0.0  # σ/E
        options = dict(logit_noise_std=noise, batch_priority=self.batch_priority)
        if route_logits is None:  # the bias belongs to our own router's scores
            options["selection_bias"] = self.expert_bias
        routing = top_k_routing(chooser, k=self.k, capacity_factor=cf, num_groups=groups, **options)
        routing.student_logits = logits
        if self.training and self.expert_bias is not None:
            self.update_expert_bias(routing.experts)
        return routing

    def forward_one_hot(self, x, route_logits=None):
        """The same layer as GShard and V-MoE write it, the textbook before the fast `forward`:
        one-hot dispatch and combine tensors and two einsums. Equal to `forward` (tested), but
        it builds two (G, S, E, C) tensors, whose size grows with E·C: `forward` never does.

            dispatch[g, s, e, c] = 1           if token s of group g sits in slot c of expert e
            combine[g, s, e, c]  = g_{s,k}     for that same assignment, else 0
            x_in[e, g, c] = Σ_s dispatch[g, s, e, c] · x[g, s]       every slot gets its token
            y[g, s]       = Σ_{e,c} combine[g, s, e, c] · MLP_e(x_in[e, g, c])
        """
        B, N, D = x.shape
        tokens = rearrange(x, "b n d -> (b n) d")  # (T, D)
        routing = self.route(tokens, B, route_logits)
        G = routing.num_groups
        E = self.num_experts
        C = routing.capacity

        # the one-hot tensors: expert and slot of every assignment, dropped ones zeroed
        expert_1h = F.one_hot(routing.experts, E).to(x.dtype)  # (T, K, E)
        slot_1h = F.one_hot(torch.where(routing.kept, routing.position, 0), C).to(x.dtype)
        kept = routing.kept.to(x.dtype).unsqueeze(-1)  # (T, K, 1)
        weights = routing.weights.to(x.dtype).unsqueeze(-1)  # (T, K, 1)
        # an outer product per choice, summed over the K choices (they never share an expert)
        dispatch = torch.einsum("tke,tkc->tec", expert_1h * kept, slot_1h)  # (T, E, C)
        combine = torch.einsum("tke,tkc->tec", expert_1h * weights, slot_1h)  # (T, E, C)
        dispatch = dispatch.view(G, -1, E, C)  # (G, S, E, C)
        combine = combine.view(G, -1, E, C)  # (G, S, E, C)

        # dispatch, run every expert on its slots, combine
        x_in = torch.einsum("gsec,gsd->egcd", dispatch, tokens.view(G, -1, D))  # (E, G, C, D)
        out = self.run_experts(rearrange(x_in, "e g c d -> e (g c) d"))  # (E, G·C, D)
        out = rearrange(out, "e (g c) d -> e g c d", g=G)  # (E, G, C, D)
        y = torch.einsum("gsec,egcd->gsd", combine, out)  # (G, S, D)
        return y.reshape(B, N, D), routing

    def forward(self, x, route_logits=None):
        """The fast layer: every kept assignment gets a row (slot) of one expert buffer, and
        dispatch and combine are one index_select and one index_add_ (the module's idea)."""
        B, N, D = x.shape
        tokens = rearrange(x, "b n d -> (b n) d")  # (T, D)
        routing = self.route(tokens, B, route_logits)

        # dispatch every kept assignment to its slot, run all experts at once, combine
        slot = self.slots(routing)  # (T, K) each assignment's row of the expert buffer
        token_of_slot, weight_of_slot = self.slot_contents(slot, routing)  # (E·G·C,) each
        out = self.run_experts(self.dispatch(tokens, token_of_slot))  # (E, G·C, D)
        y = self.combine(out, token_of_slot, weight_of_slot, num_tokens=B * N)  # (T, D)

        if self.keep_expert_outputs:  # φ for a loss on each expert's output, x_t for a router
            routing.expert_out = self.expert_outputs(out, slot, routing.kept)  # (T, K, D)
            routing.inputs = tokens  # (T, D), already in memory: a reference, no copy
        return rearrange(y, "(b n) d -> b n d", b=B), routing

    @torch.no_grad()
    def update_expert_bias(self, experts):
        """Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 sec. 2.1.2), per batch.

        experts: (T, K) this batch's choices, before capacity. An overloaded expert's bias
        falls and an underloaded one's rises by a fixed step u, whatever the size of the error:

            c_e = #{(t, k): e_{t,k} = e},     b_e ← b_e + u · sign(mean_e' c_e' − c_e)

        In place and on the device (no host sync), outside autograd: no loss, no gradient.
        """
        ones = torch.ones(experts.numel(), device=experts.device)  # (T·K,)
        counts = torch.zeros_like(self.expert_bias).index_add_(0, experts.reshape(-1), ones)  # (E,)
        self.expert_bias.add_(torch.sign(counts.mean() - counts), alpha=self.bias_update_rate)

    def slots(self, routing):
        """Row of every assignment in the (E·G·C) buffer: (T, K) long, meaningful where kept."""
        T, K = routing.experts.shape
        G = routing.num_groups
        C = routing.capacity
        # slot = e·(G·C) + g·C + position   (rows of expert e are contiguous: one bmm batch)
        slot = torch.add(routing.position, routing.experts, alpha=G * C)  # (T, K) without g·C
        group_start = torch.arange(0, G * C, C, device=slot.device).view(G, 1, 1)  # (G, 1, 1)
        return (slot.view(G, T // G, K) + group_start).view(T, K)  # (T, K)

    def slot_contents(self, slot, routing):
        """The inverse map, slot -> assignment: the token in every slot and its weight g.

        One index_put_ each writes them at the kept assignments' slots; dropped assignments
        all write to one spare entry past the end (index E·G·C) that is cut off. An empty
        slot keeps token 0 and weight 0: the experts compute its row anyway (the buffer has a
        fixed size) and the combine adds 0 · that row, so it reaches neither y nor a gradient.
        """
        T, K = slot.shape
        rows = self.num_experts * routing.num_groups * routing.capacity  # E·G·C
        dest = torch.where(routing.kept, slot, rows)  # (T, K)
        token_of_slot = torch.zeros(rows + 1, dtype=torch.long, device=slot.device)  # (rows + 1,)
        token = torch.arange(T, device=slot.device).unsqueeze(1)  # (T, 1) broadcast over K
        token_of_slot.index_put_((dest,), token)  # token_of_slot[dest_{t,k}] = t
        weight_of_slot = routing.weights.new_zeros(rows + 1)  # (rows + 1,)
        weight_of_slot.index_put_((dest,), routing.weights)  # weight_of_slot[dest_{t,k}] = g_{t,k}
        return token_of_slot[:rows], weight_of_slot[:rows]  # (E·G·C,), (E·G·C,)

    def dispatch(self, tokens, token_of_slot):
        """buf_r = x_{token_of_slot[r]}: one index_select fills the whole expert buffer."""
        buf = tokens.index_select(0, token_of_slot)  # (E·G·C, D)
        return buf.view(self.num_experts, -1, tokens.shape[1])  # (E, G·C, D)

    def combine(self, expert_out, token_of_slot, weight_of_slot, num_tokens):
        """y_t = Σ_k g_{t,k} · out[slot_{t,k}], added slot by slot: y[token_r] += w_r · out_r."""
        out = expert_out.view(-1, expert_out.shape[-1])  # (E·G·C, D)
        w = weight_of_slot.to(out.dtype).unsqueeze(1)  # (E·G·C, 1)
        y = out.new_zeros(num_tokens, out.shape[1])  # (T, D) a fully dropped token stays 0
        return y.index_add_(0, token_of_slot, out * w)  # (T, D) one weighted index_add_

    def expert_outputs(self, expert_out, slot, kept):
        """φ(t, e_{t,k}) = MLP_{e_{t,k}}(x_t): the rows before the weight g, 0 where dropped."""
        T, K = slot.shape
        out = expert_out.view(-1, expert_out.shape[-1])  # (E·G·C, D)
        picked = out.index_select(0, torch.where(kept, slot, 0).reshape(-1))  # (T·K, D)
        return picked.view(T, K, -1) * kept.unsqueeze(-1)  # (T, K, D)


class SoftMoEMLP(StackedExperts):
    """Soft MoE: slots are softmax mixtures of all tokens; no choice, no dropping.

    logits = norm(X) · (scale · norm(Φ))       X: (N, D) tokens, Φ: (D, E·P) slot params
    Dispatch = softmax over tokens (columns)   slot inputs  X̃ = Dispatchᵀ X
    Combine  = softmax over slots (rows)       output       Y  = Combine · MLP(X̃)
    """

    def __init__(self, dim, hidden, num_experts, *, num_tokens, k=1):
        super().__init__(dim, hidden, num_experts)
        self.slots_per_expert = max(1, round(k * num_tokens / num_experts))  # P
        self.phi = nn.Parameter(torch.empty(dim, num_experts * self.slots_per_expert))
        nn.init.normal_(self.phi, std=dim**-0.5)
        self.scale = nn.Parameter(torch.ones(()))  # learned scale of the L2-normalised logits

    def forward(self, x, route_logits=None):
        if route_logits is not None:
            raise ValueError("softmoe has no discrete route to take from outside")
        B, N, D = x.shape
        E = self.num_experts

        # logits = norm(X) · (scale · norm(Φ)), normalised two ways
        logits = F.normalize(x, dim=-1) @ (self.scale * F.normalize(self.phi, dim=0))  # (B, N, E·P)
        dispatch = logits.softmax(dim=1)  # (B, N, E·P) each slot mixes the tokens
        combine = logits.softmax(dim=2)  # (B, N, E·P) each token mixes the slots

        # X̃ = Dispatchᵀ X, every expert on its P slots of every image, Y = Combine · MLP(X̃)
        slots_in = torch.einsum("bns,bnd->bsd", dispatch, x)  # (B, E·P, D)
        buf = rearrange(slots_in, "b (e p) d -> e (b p) d", e=E)  # (E, B·P, D)
        out = rearrange(self.run_experts(buf), "e (b p) d -> b (e p) d", b=B)  # (B, E·P, D)
        y = torch.einsum("bns,bsd->bnd", combine, out)  # (B, N, D)

        # the record: each expert's share of every token's output, and its argmax
        share = rearrange(combine, "b n (e p) -> (b n) e p", e=E).sum(-1)  # (T, E)
        experts = share.argmax(-1, keepdim=True)  # (T, 1)
        return y, Routing(logits=None, probs=share, experts=experts, weights=None, kept=None)


# ----------------------------------------------------------------------------- builders
def build_model(
    name,
    method="vmoe",
    num_classes=1000,
    img_size=224,
    patch_size=16,
    num_experts=16,
    k=1,
    moe_layers=None,
    expert_hidden=None,
    **options,
):
    """Build a DeiT (`method="dense"`) or its MoE student.

    expert_hidden: every expert's hidden width h (None: the dense MLP's H; e.g. H // K).
    options: drop_path_rate, capacity_factor, eval_capacity_factor, noise_std, group_size,
    batch_priority, bias_update_rate (MoE); init_values, no_embed_class, in_chans, qkv_bias (ViT).
    The model keeps these keyword arguments as `model.model_args`; train.py's checkpoints
    store them, so `build_model(**ckpt["model_args"])` rebuilds a model without the trainer.
    """
    model_args = dict(
        name=name,
        method=method,
        num_classes=num_classes,
        img_size=img_size,
        patch_size=patch_size,
        num_experts=num_experts,
        k=k,
        moe_layers=moe_layers,
        expert_hidden=expert_hidden,
        **options,
    )

    # the model's configuration, checked before anything is built
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    config = dict(MODELS[name])  # embed_dim, depth, num_heads
    default_layers = config.pop("moe_layers")
    moe_layers = tuple(default_layers if moe_layers is None else moe_layers)
    if METHODS[method] is None:
        moe_layers = ()
    bad = [i for i in moe_layers if not 1 <= i <= config["depth"]]
    if bad:
        raise ValueError(f"MoE layers {bad} are outside blocks 1..{config['depth']} of {name}")
    if METHODS[method]:
        check_routing(num_experts, k)
    if expert_hidden is not None and expert_hidden < 1:
        raise ValueError(f"expert hidden width must be >= 1, got {expert_hidden}")

    # the ViT's own options; the rest go to every MoE layer
    vit_keys = ("drop_path_rate", "init_values", "no_embed_class", "in_chans", "qkv_bias")
    vit_opts = {key: options.pop(key) for key in vit_keys if key in options}
    num_tokens = (img_size // patch_size) ** 2 + 1

    def moe_mlp(d, hidden):
        hidden = expert_hidden or hidden  # h: the experts' width, H unless narrowed
        if METHODS[method] == "soft":
            return SoftMoEMLP(d, hidden, num_experts, num_tokens=num_tokens, k=k)
        return MoEMLP(d, hidden, num_experts, k=k, router=METHODS[method], **options)

    # the ViT, with `moe_mlp` in the MoE blocks
    vit = dict(img_size=img_size, patch_size=patch_size, num_classes=num_classes, **config)
    model = VisionTransformer(moe_layers=moe_layers, moe_mlp=moe_mlp, **vit, **vit_opts)
    model.method = method
    model.num_experts = num_experts if moe_layers else 0
    model.model_args = model_args
    return model


def dense_to_experts(sd, prefix, num_experts, h):
    """Block `prefix`'s dense MLP cut into E stacked experts of width h (see `upcycle`)."""
    fc1_w = sd[f"{prefix}.fc1.weight"]  # (H, D)
    fc1_b = sd[f"{prefix}.fc1.bias"]  # (H,)
    n = fc1_w.shape[0] // h  # n = H // h slices
    if n < 1:
        raise ValueError(f"cannot upcycle: experts ({h}) are wider than {prefix} ({len(fc1_b)})")
    start = (torch.arange(num_experts, device=fc1_w.device) % n) * h  # (E,) slice e mod n
    units = start.unsqueeze(1) + torch.arange(h, device=fc1_w.device)  # (E, h) hidden units
    return dict(
        w1=fc1_w[units].transpose(1, 2),  # (E, D, h)
        b1=fc1_b[units],  # (E, h)
        w2=sd[f"{prefix}.fc2.weight"].t()[units],  # (E, h, D)
        b2=(sd[f"{prefix}.fc2.bias"] / n).expand(num_experts, -1),
    )  # (E, D)


@torch.no_grad()
def upcycle(model, dense_state_dict):
    """Sparse upcycling: start a MoE model from a dense checkpoint of the same size.

    Every non-MLP weight is copied; each MoE block's experts are cut from its dense MLP
    (fc1.weight (H, D) -> w1 (E, D, h), fc2.weight (D, H) -> w2 (E, h, D)); routers (and Soft
    MoE's slots) stay fresh. At h = H every expert is a copy of the MLP. Narrower experts
    (h = H/K) take slice s = e mod n of the n = H // h slices of hidden units,
    [s·h, (s+1)·h), and b2 = fc2.bias / n, so that (h dividing H; GELU acts unit by unit)

        Σ_{s < n} MLP_s(x) = W2 · GELU(W1 x + b1) + b2 = MLP(x):

    every dense unit survives and experts differ from the start (one shared slice would lose
    the rest).
    Returns the list of keys left at their initial values.
    """
    own = model.state_dict()
    fresh = []
    for key, value in own.items():
        parts = key.split(".")
        # a MoE block's MLP: experts cut from the dense MLP, router and slots fresh
        if len(parts) > 3 and parts[2] == "mlp" and int(parts[1]) + 1 in model.moe_layers:
            prefix = ".".join(parts[:3])
            if parts[3] not in ("w1", "b1", "w2", "b2"):
                fresh.append(key)  # router / slot parameters
                continue
            E, h = own[f"{prefix}.b1"].shape
            value.copy_(dense_to_experts(dense_state_dict, prefix, E, h)[parts[3]])
        # every other weight the dense checkpoint has: copied as it is
        elif key in dense_state_dict:
            if dense_state_dict[key].shape != value.shape:
                raise ValueError(
                    f"cannot upcycle: {key} is {tuple(dense_state_dict[key].shape)} in the dense "
                    f"checkpoint but {tuple(value.shape)} in the MoE model"
                )
            value.copy_(dense_state_dict[key])
        else:
            fresh.append(key)
    return fresh


def moe_num_params(model):
    """(total, active per token) parameter counts: active counts K of the E experts."""
    total = sum(p.numel() for p in model.parameters())
    is_expert = lambda name: name.split(".")[-1] in ("w1", "b1", "w2", "b2")
    expert = sum(p.numel() for n, p in model.named_parameters() if is_expert(n))
    active = total - expert
    for i in model.moe_layers:
        mlp = model.blocks[i - 1].mlp
        per_expert = sum(p[0].numel() for p in (mlp.w1, mlp.b1, mlp.w2, mlp.b2))
        active += per_expert * getattr(mlp, "k", 1)
    return total, active
