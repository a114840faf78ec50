"""moe.py and router.py: the fast dispatch against a loop over experts, the routing
invariants, timm compatibility of the ViT, upcycling, and that every method learns."""

import math

import pytest
import torch
import torch.nn.functional as F

from checkpoint import model_args_from_flags
from losses import importance_loss, load_loss
from moe import (
    MoEMLP,
    build_model,
    moe_num_params,
    upcycle,
)
from router import (
    capacity_for,
    group_size_for,
    queue_positions,
    queue_positions_one_hot,
    top_k_routing,
)

MICRO = dict(num_classes=10, img_size=32, patch_size=4)  # 8x8 patches + CLS = 65 tokens


# --- the obvious implementation: route token by token, then loop over experts --------------


def reference_moe(layer, x, noise=None):
    """V-MoE routing and the MoE output written the slow, obvious way.

    noise: the exact (T, E) noise to add to the logits (None = no noise).
    Returns y (B, N, D) and, per group, the per-expert kept-token counts.
    """
    B, N, D = x.shape
    E, k = layer.num_experts, layer.k
    tokens = x.reshape(B * N, D)
    logits = tokens @ layer.router.weight.t()
    gates = (logits if noise is None else logits + noise).softmax(-1)
    images_per_group = max(d for d in range(1, layer.group_size + 1) if B % d == 0)
    S = images_per_group * N
    capacity = 4 * math.ceil(math.ceil(k * S * layer.capacity_factor / E) / 4)
    y = torch.zeros_like(tokens)
    counts = []
    for g in range(B // images_per_group):
        group = list(range(g * S, (g + 1) * S))
        weight, expert = gates[group].topk(k, dim=-1)
        order = list(range(S))
        if layer.batch_priority:
            order.sort(key=lambda s: -weight[s, 0].item())
        # kept assignments: all top-1 choices first, then all top-2, each in `order`
        count = [0] * E
        members = [[] for _ in range(E)]  # expert -> [(token, weight)]
        for j in range(k):
            for s in order:
                e = expert[s, j].item()
                if count[e] < capacity:
                    count[e] += 1
                    members[e].append((group[s], weight[s, j]))
        counts.append(count)
        for e in range(E):  # the loop over experts
            for t, w in members[e]:
                h = F.gelu(tokens[t] @ layer.w1[e] + layer.b1[e])
                y[t] = y[t] + w * (h @ layer.w2[e] + layer.b2[e])
    return y.view(B, N, D), counts, capacity


def make_layer(E=8, k=1, cf=1.05, bpr=False, noise_std=0.0, group_size=2):
    torch.manual_seed(1)
    layer = MoEMLP(
        12,
        20,
        E,
        k=k,
        capacity_factor=cf,
        noise_std=noise_std,
        group_size=group_size,
        batch_priority=bpr,
    )
    # larger router weights make routing uneven, so capacity really drops tokens
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    for p in (layer.b1, layer.b2):
        torch.nn.init.normal_(p, std=0.1)
    return layer.train()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bpr", [False, True])
def test_fast_dispatch_equals_loop_over_experts(k, bpr):
    layer = make_layer(k=k, cf=0.5, bpr=bpr)  # cf 0.5: plenty of dropped tokens
    x = torch.randn(4, 9, 12, requires_grad=True)
    y, routing = layer(x)
    assert (~routing.kept).any(), "capacity should be small enough to drop tokens"
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, _, capacity = reference_moe(layer, x_ref)
    assert routing.capacity == capacity
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    # gradients: same loss through both paths, compare every parameter and the input
    w = torch.randn_like(y)
    fast = torch.autograd.grad((y * w).sum(), [x, *layer.parameters()])
    slow = torch.autograd.grad((y_ref * w).sum(), [x_ref, *layer.parameters()])
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_fast_dispatch_equals_loop_over_experts_in_one_group(k):
    """G = 1: the routing records come out of a reshape that can be a non-contiguous view."""
    layer = make_layer(k=k, cf=0.5, group_size=4)
    x = torch.randn(4, 9, 12, requires_grad=True)
    y, routing = layer(x)
    assert routing.num_groups == 1 and (~routing.kept).any()
    y_ref, _, _ = reference_moe(layer, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    fast = torch.autograd.grad(y.sum(), [x, *layer.parameters()])
    slow = torch.autograd.grad(y_ref.sum(), [x, *layer.parameters()])
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fast_dispatch_equals_reference_with_noise():
    layer = make_layer(k=2, cf=0.75, noise_std=4.0)
    x = torch.randn(4, 9, 12)
    torch.manual_seed(123)
    y, routing = layer(x)
    torch.manual_seed(123)  # same draw: the layer adds σ/E · randn_like(logits)
    noise = (4.0 / 8) * torch.randn(36, 8)
    y_ref, _, _ = reference_moe(layer, x, noise=noise)
    torch.testing.assert_close(routing.noisy_logits - routing.logits, noise)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bpr", [False, True])
def test_queue_positions_equal_the_one_hot_cumsum(k, bpr):
    """router.py's stable-sort positions against the textbook one-hot cumsum, group by group."""
    torch.manual_seed(0)
    G, S, E = 3, 50, 6
    logits = 2 * torch.randn(G * S, E)  # (T, E) uneven: some experts get far more than others
    r = top_k_routing(logits, k=k, capacity_factor=1.0, num_groups=G, batch_priority=bpr)
    want = torch.empty(G * S, k, dtype=torch.long)  # (T, K)
    for g in range(G):
        rows = torch.arange(g * S, (g + 1) * S)  # (S,) this group's tokens
        if bpr:  # the surest tokens (largest top-1 p) queue first
            rows = rows[r.probs[rows].max(-1).values.argsort(descending=True)]
        queue = r.experts[rows].t().reshape(-1)  # (K·S,) all top-1 choices, then all top-2
        seen = F.one_hot(queue, E).cumsum(0)  # (K·S, E) assignments to e so far, inclusive
        position = seen.gather(1, queue[:, None]).squeeze(1) - 1  # (K·S,)
        want[rows] = position.view(k, S).t()  # back to (token, choice)
    assert torch.equal(r.position, want)
    # the same numbers from router.queue_positions itself, called directly
    priority = r.probs.max(-1).values if bpr else None  # (T,) top-1 p (no noise: = q)
    assert torch.equal(queue_positions(r.experts, E, num_groups=G, priority=priority), want)
    # and from the textbook version router.py shows first
    plain = queue_positions_one_hot(r.experts, E, num_groups=G, priority=priority)
    assert torch.equal(plain, want)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("router", ["top-k", "expert-choice"])
def test_the_one_hot_textbook_layer_equals_the_fast_one(k, bpr, router):
    """MoEMLP.forward_one_hot (GShard's dispatch and combine tensors) against the slot-map
    forward: the same outputs, routing and gradients, with tokens dropped (cf 0.5)."""
    if router == "expert-choice" and bpr:
        pytest.skip("batch priority is a top-K option")
    torch.manual_seed(0)
    options = dict(capacity_factor=0.5, group_size=2, batch_priority=bpr, router=router)
    layer = MoEMLP(12, 20, 6, k=k, **options)  # noise σ = 1 (σ/E), drawn the same way twice
    torch.nn.init.normal_(layer.router.weight, std=0.5)  # uneven routing: capacity drops
    x = torch.randn(4, 9, 12, requires_grad=True)
    torch.manual_seed(1)
    y_fast, r_fast = layer(x)
    grads_fast = torch.autograd.grad(y_fast.square().sum(), [x, *layer.parameters()])
    torch.manual_seed(1)  # the same routing noise
    y_plain, r_plain = layer.forward_one_hot(x)
    grads_plain = torch.autograd.grad(y_plain.square().sum(), [x, *layer.parameters()])
    assert torch.equal(r_fast.experts, r_plain.experts) and not r_fast.kept.all()
    torch.testing.assert_close(y_plain, y_fast, atol=1e-5, rtol=1e-5)
    for plain, fast in zip(grads_plain, grads_fast):
        torch.testing.assert_close(plain, fast, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_routing_invariants(k):
    layer = make_layer(E=6, k=k, cf=0.3, noise_std=1.0, group_size=2)
    x = torch.randn(6, 11, 12)
    y, r = layer(x)
    T = 6 * 11
    assert r.experts.shape == r.weights.shape == r.kept.shape == (T, k)
    # each token reaches at most K distinct experts
    assert all(len(set(row.tolist())) == k for row in r.experts)
    assert (r.kept.sum(-1) <= k).all()
    # no expert receives more than its capacity in any group
    group = torch.arange(T) // (T // r.num_groups)
    for g in range(r.num_groups):
        chosen = r.experts[group == g][r.kept[group == g]]
        assert torch.bincount(chosen, minlength=6).max() <= r.capacity
    # combine weights in [0, 1], zero exactly where dropped; probs are a distribution
    assert (r.weights >= 0).all() and (r.weights <= 1).all()
    assert (r.weights[~r.kept] == 0).all()
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(T))
    # fully dropped tokens: the MoE adds exactly nothing ...
    dropped = ~r.kept.any(-1)
    assert dropped.any()
    assert (y.reshape(T, -1)[dropped] == 0).all()


def test_dropped_tokens_pass_through_the_residual_unchanged():
    model = build_model("micro", "vmoe", num_experts=4, capacity_factor=0.2, **MICRO).train()
    block = model.blocks[3]  # block 4 is a MoE block
    x = torch.randn(2, 65, 96)
    with torch.no_grad():
        after_attn = x + block.attn(block.norm1(x))
        out, r = block(x)
    dropped = (~r.kept.any(-1)).view(2, 65)
    assert dropped.any()
    torch.testing.assert_close(out[dropped], after_attn[dropped])


def test_every_expert_weight_gets_a_gradient():
    for method in ["vmoe", "expert-choice", "softmoe"]:
        model = build_model("micro", method, num_experts=16, **MICRO).train()
        logits, routings = model(torch.randn(4, 3, 32, 32))
        logits.sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{method}: no gradient for {missing}"


def test_capacity_and_group_rules():
    # V-MoE: ceil(K·S·cf/E) rounded up to a multiple of 4
    assert capacity_for(8 * 197, 16, 1, 1.05) == 104
    assert capacity_for(8 * 197, 128, 1, 1.05) == 16
    assert capacity_for(8 * 197, 8, 2, 1.05) == 416
    assert group_size_for(32, 8) == 8 and group_size_for(10, 8) == 5 and group_size_for(7, 8) == 7
    with pytest.raises(ValueError, match="capacity factor"):
        capacity_for(10, 4, 1, 0.0)
    with pytest.raises(ValueError, match="top-k"):
        MoEMLP(8, 16, 2, k=3)
    with pytest.raises(ValueError, match="top-k"):
        build_model("micro", "vmoe", num_experts=2, k=3, **MICRO)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("huge")
    with pytest.raises(ValueError, match="unknown method"):
        build_model("micro", "hash")
    with pytest.raises(ValueError, match="outside blocks"):
        build_model("micro", moe_layers=[7], **MICRO)


def test_eval_is_deterministic_and_uses_clean_probs():
    layer = make_layer(noise_std=1.0).eval()
    x = torch.randn(4, 9, 12)
    y1, r1 = layer(x)
    y2, r2 = layer(x)
    torch.testing.assert_close(y1, y2)
    assert r1.noisy_logits is None and r1.logit_noise_std == 0.0
    torch.testing.assert_close(r1.weights, r1.probs.gather(1, r1.experts) * r1.kept)


def test_expert_choice_never_overflows_and_matches_loop():
    layer = MoEMLP(12, 20, 4, router="expert-choice", capacity_factor=1.0, group_size=2).train()
    x = torch.randn(4, 9, 12)
    y, r = layer(x)
    S, G = 2 * 9, 2
    assert r.capacity == math.ceil(S / 4)
    kept = r.kept.view(G, S, 4)
    assert (kept.sum(1) == r.capacity).all()  # each expert takes exactly C tokens per group
    # loop over experts: expert e takes its top-C tokens of the group by p
    tokens, y_ref = x.reshape(-1, 12), torch.zeros(36, 12)
    for g in range(G):
        for e in range(4):
            top = r.probs[g * S : (g + 1) * S, e].topk(r.capacity).indices + g * S
            out = F.gelu(tokens[top] @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e]
            y_ref[top] += r.probs[top, e, None] * out
    torch.testing.assert_close(y.reshape(36, 12), y_ref, atol=1e-5, rtol=1e-5)


def test_softmoe_slots_match_an_explicit_computation():
    model = build_model("micro", "softmoe", num_experts=4, **MICRO)
    layer = model.blocks[3].mlp
    assert layer.slots_per_expert == round(65 / 4)
    x = torch.randn(2, 65, 96)
    y, r = layer(x)
    P = layer.slots_per_expert
    for b in range(2):  # one image at a time, one expert at a time
        logits = F.normalize(x[b], dim=-1) @ (layer.scale * F.normalize(layer.phi, dim=0))
        dispatch, combine = logits.softmax(0), logits.softmax(1)
        slots = dispatch.t() @ x[b]  # (E·P, D)
        outs = []
        for e in range(4):
            s = slots[e * P : (e + 1) * P]
            outs.append(F.gelu(s @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e])
        torch.testing.assert_close(y[b], combine @ torch.cat(outs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(130))


def test_teacher_route_mode_routes_by_outside_logits():
    model = build_model("micro", "teacher-route", num_experts=4, **MICRO).eval()
    images = torch.randn(2, 3, 32, 32)
    # outside logits that send every token to expert 2
    route = [torch.full((2, 65, 4), -10.0).index_fill_(2, torch.tensor([2]), 10.0)] * 2
    _, routings = model(images, route=route)
    for r in routings:
        assert (r.experts == 2).all()
        assert not torch.equal(r.student_logits, r.logits)  # own router still recorded
    with pytest.raises(ValueError, match="route has"):
        model(images, route=route[:1])


def test_moe_keys_keep_timm_names_outside_the_mlp():
    dense = set(build_model("micro", "dense", **MICRO).state_dict())
    moe = set(build_model("micro", "vmoe", **MICRO).state_dict())
    assert {
        k for k in dense if ".mlp." not in k or not k.startswith(("blocks.3", "blocks.5"))
    } <= moe
    assert {"blocks.3.mlp.router.weight", "blocks.3.mlp.w1", "blocks.5.mlp.b2"} <= moe


def test_upcycled_moe_equals_its_dense_parent():
    dense = build_model("micro", "dense", **MICRO).eval()
    moe = build_model("micro", "vmoe", num_experts=4, k=4, capacity_factor=4.0, **MICRO).eval()
    fresh = upcycle(moe, dense.state_dict())
    assert set(fresh) == {"blocks.3.mlp.router.weight", "blocks.5.mlp.router.weight"}
    mlp = moe.blocks[3].mlp
    torch.testing.assert_close(mlp.w1[2], dense.blocks[3].mlp.fc1.weight.t())
    # a zero router gives q = 1/E to each of the K = E experts, all kept:
    # Σ_e (1/E) MLP(x) = MLP(x), so the upcycled model computes exactly the dense one
    for i in moe.moe_layers:
        torch.nn.init.zeros_(moe.blocks[i - 1].mlp.router.weight)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(images)[0], dense(images)[0], atol=1e-5, rtol=1e-5)
    other = build_model("micro", "vmoe", num_classes=5, img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="head.weight"):
        upcycle(other, dense.state_dict())


def test_param_counts():
    total, active = moe_num_params(build_model("tiny", "vmoe", num_experts=16))
    dense_total, dense_active = moe_num_params(build_model("tiny", "dense"))
    assert dense_total == dense_active
    assert active == pytest.approx(dense_total + 3 * 192 * 16, rel=1e-9)  # + routers only
    assert total - dense_total == 3 * (15 * (2 * 192 * 768 + 768 + 192) + 192 * 16)


# ------------------------------------------------------------------------ M²oT's expert outputs
def test_narrow_experts_keep_the_dense_active_params():
    """M²oT's h = H/K: K = 2 experts of width 192 = 384/2 per token hold the dense MLP's
    weight count; what differs, per MoE layer, is the router's D·E weights and the K − 1 extra
    output biases b2 (D each: every expert has its own)."""
    dense_total, _ = moe_num_params(build_model("micro", "dense", **MICRO))
    moe = build_model("micro", "vmoe", num_experts=8, k=2, expert_hidden=192, **MICRO)
    assert moe.blocks[3].mlp.w1.shape == (8, 96, 192)
    _, active = moe_num_params(moe)
    assert active - dense_total == len(moe.moe_layers) * (96 * 8 + (2 - 1) * 96)


@pytest.mark.parametrize("k", [1, 2])
def test_expert_out_equals_loop_over_experts(k):
    layer = make_layer(k=k, cf=0.5)  # cf 0.5: some assignments dropped
    layer.keep_expert_outputs = True
    x = torch.randn(4, 9, 12)
    y, r = layer(x)
    assert (~r.kept).any() and r.kept.any()
    tokens, want = x.reshape(36, 12), torch.zeros(36, k, 12)
    for t in range(36):  # φ(t, e) by hand: expert e's MLP on x_t, 0 where capacity dropped it
        for j in range(k):
            e = r.experts[t, j]
            if r.kept[t, j]:
                want[t, j] = (
                    F.gelu(tokens[t] @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e]
                )
    torch.testing.assert_close(r.expert_out, want, atol=1e-5, rtol=1e-5)
    # y_t = Σ_k g_{t,k} φ(t, e_{t,k}): φ is the output before the combine weight
    torch.testing.assert_close(y.reshape(36, 12), (r.weights[..., None] * want).sum(1))


def test_expert_out_is_kept_only_when_asked():
    layer = make_layer(k=2, cf=0.5)
    x = torch.randn(4, 9, 12)
    y_off, r_off = layer(x)
    assert layer.keep_expert_outputs is False and r_off.expert_out is None
    layer.keep_expert_outputs = True
    y_on, r_on = layer(x)
    assert r_on.expert_out.shape == (36, 2, 12)
    torch.testing.assert_close(y_on, y_off)  # asking changes nothing else
    model = build_model("micro", "vmoe", num_experts=4, k=2, **MICRO)
    assert all(r.expert_out is None for r in model(torch.randn(2, 3, 32, 32))[1])


def test_expert_out_gradient_reaches_only_the_chosen_experts():
    layer = make_layer(k=2, cf=0.5)
    layer.keep_expert_outputs = True
    _, r = layer(torch.randn(4, 9, 12))
    t = int(r.kept.all(-1).nonzero()[0])  # a token with both assignments kept
    (r.expert_out[t] * torch.randn(2, 12)).sum().backward(retain_graph=True)
    for p in (layer.w1, layer.b1, layer.w2, layer.b2):
        touched = {e for e in range(8) if p.grad[e].abs().sum() > 0}
        assert touched == set(r.experts[t].tolist())
    assert layer.router.weight.grad is None  # φ comes before g: no path to the router
    layer.zero_grad()
    dropped = ~r.kept  # a dropped assignment's φ is a constant 0: no gradient anywhere
    (r.expert_out[dropped] * torch.randn(int(dropped.sum()), 12)).sum().backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in layer.parameters())


def test_upcycle_cuts_narrow_experts_from_the_dense_mlp():
    dense = build_model("micro", "dense", **MICRO)
    for p in dense.parameters():  # biases too, so b2 = fc2.bias / n is tested
        torch.nn.init.normal_(p, std=0.1)
    moe = build_model("micro", "vmoe", num_experts=4, k=2, expert_hidden=192, **MICRO)
    fresh = upcycle(moe, dense.state_dict())
    assert set(fresh) == {"blocks.3.mlp.router.weight", "blocks.5.mlp.router.weight"}
    fc1, fc2, mlp = dense.blocks[3].mlp.fc1, dense.blocks[3].mlp.fc2, moe.blocks[3].mlp
    for e in range(4):  # n = 384 // 192 = 2 slices; expert e takes slice e mod 2
        s = slice((e % 2) * 192, (e % 2 + 1) * 192)
        assert torch.equal(mlp.w1[e], fc1.weight[s].t()) and torch.equal(mlp.b1[e], fc1.bias[s])
        assert torch.equal(mlp.w2[e], fc2.weight[:, s].t()) and torch.equal(mlp.b2[e], fc2.bias / 2)
    x = torch.randn(5, 96)
    with torch.no_grad():  # each cycle of slices adds up to the dense MLP
        out = mlp.run_experts(x.expand(4, 5, 96))  # (E, 5, D)
        torch.testing.assert_close(out[0] + out[1], dense.blocks[3].mlp(x)[0])
        torch.testing.assert_close(out[2] + out[3], dense.blocks[3].mlp(x)[0])
    wide = build_model("micro", "vmoe", num_experts=4, expert_hidden=400, **MICRO)
    with pytest.raises(ValueError, match="wider"):
        upcycle(wide, dense.state_dict())


def test_expert_hidden_rebuilds_from_model_args_and_flags():
    model = build_model("micro", "vmoe", num_experts=4, k=2, expert_hidden=192, **MICRO)
    again = build_model(**model.model_args)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert again.blocks[5].mlp.w2.shape == (4, 192, 96)
    flags = dict(
        model="micro",
        method="vmoe",
        img_size=32,
        patch_size=4,
        experts=4,
        topk=2,
        moe_layers=None,
        drop_path=0.0,
        capacity_factor=1.05,
        noise_std=1.0,
        moe_group_size=8,
        batch_priority=False,
        eval_capacity_factor=4.0,
    )
    assert model_args_from_flags(flags, 10)["expert_hidden"] is None  # a run before the flag
    margs = model_args_from_flags({**flags, "expert_hidden": 192}, 10)
    assert build_model(**margs).blocks[3].mlp.w1.shape == (4, 96, 192)
    with pytest.raises(ValueError, match="expert hidden"):
        build_model("micro", "vmoe", expert_hidden=0, **MICRO)


@pytest.mark.parametrize("method", ["dense", "vmoe", "expert-choice", "softmoe"])
def test_loss_falls_on_a_fixed_batch(method):
    torch.manual_seed(0)
    model = build_model("micro", method, num_experts=4, **MICRO).train()
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        logits, routings = model(images)
        loss = F.cross_entropy(logits, labels)
        for r in routings:  # V-MoE's auxiliary losses where they apply
            if r.noisy_logits is not None:
                aux = importance_loss(r.probs) + load_loss(
                    r.logits, r.noisy_logits, r.logit_noise_std, 1
                )
                loss = loss + 0.005 * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], f"{method}: {losses[0]:.3f} -> {losses[-1]:.3f}"


# --- auxiliary-loss-free balancing (--method lossfree) --------------------------------------


def test_a_selection_bias_chooses_and_never_weighs():
    torch.manual_seed(0)
    logits = torch.randn(12, 4)
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    r = top_k_routing(logits, k=2, capacity_factor=4.0, num_groups=1, selection_bias=bias)
    q = logits.softmax(-1)
    for t in range(12):  # the obvious way: rank experts by q + b, weigh by q
        order = sorted(range(4), key=lambda e: -(q[t, e] + bias[e]).item())[:2]
        assert r.experts[t].tolist() == order
        torch.testing.assert_close(r.weights[t], q[t, order])
    plain = top_k_routing(logits, k=2, capacity_factor=4.0, num_groups=1)
    assert not torch.equal(plain.experts, r.experts)


def test_the_expert_bias_follows_the_sign_of_each_experts_load_error():
    layer = MoEMLP(8, 16, 4, k=1, capacity_factor=4.0, bias_update_rate=0.01).train()
    experts = torch.tensor([[0], [0], [0], [1], [1], [2], [3], [3]])  # loads 3, 2, 1, 2
    layer.update_expert_bias(experts)
    # mean load 2: expert 0 over (bias falls), expert 2 under (rises), 1 and 3 on it (stay)
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.01, 0.0, 0.01, 0.0]))
    before = layer.expert_bias.clone()
    layer.eval()(torch.randn(2, 5, 8))
    assert torch.equal(layer.expert_bias, before)  # evaluation uses b, never moves it
    layer.train()(torch.randn(2, 5, 8))
    assert not torch.equal(layer.expert_bias, before) and not layer.expert_bias.requires_grad
    assert "expert_bias" in layer.state_dict()
    assert "expert_bias" not in MoEMLP(8, 16, 4).state_dict()  # V-MoE's layer has none


def test_lossfree_evens_the_load_a_skewed_router_gives():
    torch.manual_seed(0)
    layer = MoEMLP(8, 16, 4, k=1, capacity_factor=4.0, noise_std=0.0, bias_update_rate=0.02)
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # expert 0 scores higher for most tokens
    x = torch.randn(4, 16, 8) + 1.0
    share = lambda: layer(x)[1].experts[:, 0].eq(0).float().mean()
    first = float(share())
    for _ in range(50):
        share()
    assert first > 0.5 and float(share()) < first - 0.2
