"""M²oT's losses (m2ot_losses.py) against obvious, loop-by-loop re-implementations, and the
pulls their gradients exert on experts, π and teachers."""

import math

import pytest
import torch
import torch.nn.functional as F

from m2ot_losses import (
    feature_distill_loss,
    feature_distill_per_image,
    pi_balance_loss,
    switch_load_loss,
    tas_heads_loss,
    tas_loss,
    tas_map_loss,
    teacher_drop_mask,
)

torch.manual_seed(0)


def random_probs(T=37, E=6):
    logits = torch.randn(T, E, dtype=torch.float64) * 2
    return logits, logits.softmax(-1)


def random_tas(T=13, K=2, D=8, N_T=3, E=6):
    """M²oT Eq. 8 inputs: φ (T, K, D), p (T, K), kept (T, K), π (T, K, N_T), T_i (N_T, T, D)."""
    probs = torch.randn(T, E, dtype=torch.float64).softmax(-1).topk(K, dim=-1).values  # (T, K)
    kept = torch.rand(T, K) > 0.3  # (T, K)
    kept[0, 1], kept[1, 0] = False, True  # at least one of each
    mix = torch.randn(T, K, N_T, dtype=torch.float64).softmax(-1)  # (T, K, N_T)
    teacher_feats = torch.randn(N_T, T, D, dtype=torch.float64)  # (N_T, T, D)
    expert_out = torch.randn(T, K, D, dtype=torch.float64)  # (T, K, D)
    return expert_out, probs, kept, mix, teacher_feats


# --- obvious re-implementations: plain Python over lists --------------------------------
def ref_switch(p, top1):
    T, E = p.shape
    f = [sum(1 for t in range(T) if top1[t].item() == e) / T for e in range(E)]
    P = [sum(p[t, e].item() for t in range(T)) / T for e in range(E)]
    return E * sum(fe * pe for fe, pe in zip(f, P))


def ref_feature_distill(pred, target, beta):
    T, d = pred.shape
    cos_total, sl1_total = 0.0, 0.0
    for t in range(T):
        a, b = pred[t].tolist(), target[t].tolist()
        dot = sum(x * y for x, y in zip(a, b))
        norm_a, norm_b = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
        cos_total += 1 - dot / (norm_a * norm_b)
        for x, y in zip(a, b):
            gap = abs(x - y)
            sl1_total += 0.5 * gap**2 / beta if gap < beta else gap - 0.5 * beta
    return cos_total / T + sl1_total / (T * d)


def ref_tas(expert_out, probs, kept, mix, teacher_feats):
    T, K, D = expert_out.shape
    N_T = mix.shape[-1]
    total = 0.0
    for t in range(T):
        for k in range(K):
            if not kept[t, k]:
                continue
            l1 = 0.0
            for c in range(D):
                t_bar = sum(mix[t, k, i].item() * teacher_feats[i, t, c].item() for i in range(N_T))
                l1 += abs(expert_out[t, k, c].item() - t_bar)
            total += probs[t, k].item() * l1 / D
    return total / T


def ref_tas_map(expert_out, probs, kept, mix, teacher_feats):
    T, K, D = expert_out.shape
    N_T = mix.shape[-1]
    total = 0.0
    for t in range(T):
        for k in range(K):
            if not kept[t, k]:
                continue
            for i in range(N_T):  # π outside the norm: one L1 distance per teacher
                l1 = sum(
                    abs(expert_out[t, k, c].item() - teacher_feats[i, t, c].item())
                    for c in range(D)
                )
                total += probs[t, k].item() * mix[t, k, i].item() * l1 / D
    return total / T


def test_switch_load_loss_matches_reference_and_is_one_when_uniform():
    _, p = random_probs()
    top1 = p.argmax(-1)
    assert switch_load_loss(p, top1).item() == pytest.approx(ref_switch(p, top1), rel=1e-9)
    uniform = torch.full((12, 4), 0.25, dtype=torch.float64)
    assert switch_load_loss(uniform, torch.arange(12) % 4).item() == pytest.approx(1.0)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_feature_distill_loss_matches_reference(beta):
    # gaps of ~2 std: both branches of smooth-L1 are taken; (B, N, d) is flattened to tokens
    pred, target = 2 * torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16)
    want = ref_feature_distill(pred.reshape(15, 16), target.double().reshape(15, 16), beta)
    assert feature_distill_loss(pred, target, beta=beta).item() == pytest.approx(want, rel=1e-6)


def test_feature_distill_loss_zero_when_equal_and_only_cosine_is_scale_invariant():
    pred, target = torch.randn(20, 16), torch.randn(20, 16)
    assert feature_distill_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    # pred = 2·target: the cosine part is 0, the smooth-L1 part sees the gap
    doubled = feature_distill_loss(2 * target, target).item()
    assert doubled > 0.1
    assert doubled == pytest.approx(F.smooth_l1_loss(2 * target, target).item(), rel=1e-6)
    # with β huge the smooth-L1 part vanishes and the rest ignores the scale of pred
    huge = 1e6
    assert feature_distill_loss(3 * pred, target, beta=huge).item() == pytest.approx(
        feature_distill_loss(pred, target, beta=huge).item(), rel=1e-4
    )
    assert feature_distill_loss(3 * pred, target).item() != pytest.approx(
        feature_distill_loss(pred, target).item(), rel=1e-2
    )


def test_feature_distill_loss_bf16_gives_float32_and_target_gets_no_gradient():
    pred = torch.randn(4, 7, 16).bfloat16().requires_grad_()
    target = torch.randn(4, 7, 16).bfloat16().requires_grad_()
    loss = feature_distill_loss(pred, target)
    assert loss.dtype == torch.float32
    want = feature_distill_loss(pred.detach().float(), target.detach().float())
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert target.grad is None  # the teacher's feature is a target, never trained
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_tas_loss_matches_reference():
    args = random_tas()
    assert tas_loss(*args).item() == pytest.approx(ref_tas(*args), rel=1e-6)


def test_tas_loss_zero_when_each_expert_equals_its_mixture():
    _, probs, kept, mix, teacher_feats = random_tas()
    kept[:] = True
    # T̄(t, k) = Σ_i π(t, k, i) T_i(t), written with broadcasting instead of an einsum
    t_bar = (mix.unsqueeze(-1) * teacher_feats.permute(1, 0, 2).unsqueeze(1)).sum(dim=2)
    assert tas_loss(t_bar, probs, kept, mix, teacher_feats).item() == pytest.approx(0, abs=1e-6)
    off = tas_loss(t_bar + 0.1, probs, kept, mix, teacher_feats).item()  # a gap of 0.1 everywhere
    assert off == pytest.approx(0.1 * probs.sum(dim=-1).mean().item(), rel=1e-5)


@pytest.mark.parametrize("tas", [tas_loss, tas_map_loss], ids=["eq8", "map"])
def test_tas_losses_ignore_dropped_assignments_and_leave_teachers_alone(tas):
    expert_out, probs, kept, mix, teacher_feats = random_tas()
    base = tas(expert_out, probs, kept, mix, teacher_feats).item()
    # whatever a dropped slot holds (garbage, even NaN) changes nothing and gets no gradient
    garbage = 100 * torch.randn_like(expert_out)
    garbage[0, 1, 0] = float("nan")  # kept[0, 1] is False
    changed = torch.where(kept.unsqueeze(-1), expert_out, garbage).requires_grad_()
    probs, mix = probs.clone().requires_grad_(), mix.clone().requires_grad_()
    feats = teacher_feats.clone().requires_grad_()
    loss = tas(changed, probs, kept, mix, feats)
    assert loss.item() == pytest.approx(base, rel=1e-6)
    loss.backward()
    assert (changed.grad[~kept] == 0).all() and changed.grad[kept].abs().sum() > 0
    assert (probs.grad[~kept] == 0).all() and (mix.grad[~kept] == 0).all()
    assert feats.grad is None  # frozen teachers


def test_tas_loss_with_one_hot_mix_is_p_weighted_l1_to_that_teacher():
    expert_out, probs, kept, _, teacher_feats = random_tas()
    T, K, _ = expert_out.shape
    teacher = torch.randint(3, (T, K))  # (T, K) the one teacher of each assignment
    mix = F.one_hot(teacher, 3).double()  # (T, K, N_T)
    target = teacher_feats[teacher, torch.arange(T).unsqueeze(1)]  # (T, K, D)
    l1 = (expert_out - target).abs().mean(dim=-1)  # (T, K)
    want = (probs * l1 * kept).sum() / T
    got = tas_loss(expert_out, probs, kept, mix, teacher_feats)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def two_teachers(T=4, D=8):
    """Teacher B sits 3 away from teacher A in every channel."""
    t_a = torch.randn(T, D)
    return torch.stack([t_a, t_a + 3.0])  # (2, T, D)


def l1_dist(a, b):
    return (a - b).abs().sum().item()


def test_tas_loss_sgd_step_pulls_each_expert_toward_its_teacher():
    teacher_feats = two_teachers()
    t_a, t_b = teacher_feats
    T, D = t_a.shape
    # both experts start halfway between the teachers; slot 0 follows A, slot 1 follows B
    halfway = (t_a + t_b) / 2 + 0.1 * torch.randn(T, 2, D).transpose(0, 1)  # (2, T, D)
    expert_out = torch.nn.Parameter(halfway.transpose(0, 1).clone())  # (T, 2, D)
    mix = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(T, 2, 2)  # (T, K, N_T) one-hot
    probs = torch.tensor([[0.6, 0.3]]).expand(T, 2)  # (T, K)
    kept = torch.ones(T, 2, dtype=torch.bool)
    before = expert_out.detach().clone()
    opt = torch.optim.SGD([expert_out], lr=1.0)
    tas_loss(expert_out, probs, kept, mix, teacher_feats).backward()
    opt.step()
    after = expert_out.detach()
    assert l1_dist(after[:, 0], t_a) < l1_dist(before[:, 0], t_a)
    assert l1_dist(after[:, 0], t_b) > l1_dist(before[:, 0], t_b)
    assert l1_dist(after[:, 1], t_b) < l1_dist(before[:, 1], t_b)
    assert l1_dist(after[:, 1], t_a) > l1_dist(before[:, 1], t_a)


def test_tas_loss_mix_gradient_favours_the_nearer_teacher_and_teachers_get_none():
    teacher_feats = two_teachers().requires_grad_()  # a leaf that *could* collect gradient
    t_a, t_b = teacher_feats.detach()
    T = t_a.shape[0]
    # slot 0's expert already sits near teacher A, slot 1's near teacher B
    expert_out = torch.stack([t_a, t_b], dim=1) + 0.1 * torch.randn(T, 2, t_a.shape[1])
    expert_out.requires_grad_()  # (T, K, D)
    mix_logits = torch.zeros(T, 2, 2, requires_grad=True)  # π uniform to start
    probs = torch.full((T, 2), 0.4, requires_grad=True)
    kept = torch.ones(T, 2, dtype=torch.bool)
    tas_loss(expert_out, probs, kept, mix_logits.softmax(-1), teacher_feats).backward()
    g = mix_logits.grad  # (T, K, N_T); descent raises the logit with the smaller gradient
    assert (g[:, 0, 0] < g[:, 0, 1]).all()  # slot 0 leans toward A
    assert (g[:, 1, 1] < g[:, 1, 0]).all()  # slot 1 leans toward B
    assert teacher_feats.grad is None  # frozen teachers: detached inside the loss
    assert (probs.grad > 0).all()  # p keeps its gradient (a larger weight on a gap costs more)
    assert expert_out.grad.abs().sum() > 0


def test_tas_map_loss_matches_reference():
    args = random_tas()
    assert tas_map_loss(*args).item() == pytest.approx(ref_tas_map(*args), rel=1e-6)


def test_tas_map_loss_bounds_eq8_and_equals_it_for_one_hot_mix():
    expert_out, probs, kept, mix, teacher_feats = random_tas()
    # Σ_i π_i ‖φ − T_i‖₁ ≥ ‖φ − Σ_i π_i T_i‖₁: a mixture is never a harder target
    args = (expert_out, probs, kept, mix, teacher_feats)
    assert tas_map_loss(*args).item() >= tas_loss(*args).item()
    one_hot = F.one_hot(torch.randint(3, mix.shape[:2]), 3).double()  # (T, K, N_T)
    both = [
        f(expert_out, probs, kept, one_hot, teacher_feats).item() for f in (tas_loss, tas_map_loss)
    ]
    assert both[0] == pytest.approx(both[1], rel=1e-9)


def test_tas_map_loss_gradient_moves_pi_to_the_nearer_teacher():
    """Eq. 8's gradient on π vanishes at φ = the teachers' mean; the MAP form's does not: it
    raises the weight of whichever teacher φ is nearer, however slightly."""
    t_a = torch.randn(4, 8)
    teacher_feats = torch.stack([t_a, t_a + 3.0])  # (2, T, D)
    offset = torch.tensor([-0.1, 0.1]).view(1, 2, 1)  # slot 0 a little nearer A, slot 1 B
    phi = teacher_feats.mean(0).unsqueeze(1) + offset  # (T, 2, D)
    kept, probs = torch.ones(4, 2, dtype=torch.bool), torch.full((4, 2), 0.5)
    logits = torch.zeros(4, 2, 2, requires_grad=True)  # π uniform
    tas_map_loss(phi, probs, kept, logits.softmax(-1), teacher_feats).backward()
    assert (logits.grad[:, 0, 0] < logits.grad[:, 0, 1]).all()  # slot 0, nearer A: toward A
    assert (logits.grad[:, 1, 1] < logits.grad[:, 1, 0]).all()  # slot 1, nearer B: toward B
    logits.grad = None
    at_mean = teacher_feats.mean(0).unsqueeze(1).expand(4, 2, 8)  # (T, 2, D) exactly the mean
    tas_loss(at_mean, probs, kept, logits.softmax(-1), teacher_feats).backward()
    assert logits.grad.abs().max() < 1e-6  # Eq. 8 at its minimum, 0: nothing moves π


# --- the variants -------------------------------------------------------------------------
def test_switch_over_all_k_choices_counts_every_assignment():
    _, p = random_probs()
    chosen = p.topk(2, dim=-1).indices  # (T, 2)
    T, E = p.shape
    # f_e = #{(t, k): e_{t,k} = e} / (T·K),  P_e = mean_t p_{t,e}
    f = [
        sum(1 for t in range(T) for k in range(2) if chosen[t, k] == e) / (2 * T) for e in range(E)
    ]
    P = [p[:, e].mean().item() for e in range(E)]
    want = E * sum(fe * pe for fe, pe in zip(f, P))
    assert switch_load_loss(p, chosen).item() == pytest.approx(want, rel=1e-9)


def test_feature_distill_per_image_is_each_images_own_loss():
    pred, target = 2 * torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16)
    got = feature_distill_per_image(pred, target)  # (B,)
    want = [ref_feature_distill(pred[b], target[b].double(), 1.0) for b in range(3)]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    cls = feature_distill_per_image(pred[:, 0], target[:, 0])  # (B, d): one token per image
    assert cls.tolist() == pytest.approx(
        [ref_feature_distill(pred[b, :1], target[b, :1].double(), 1.0) for b in range(3)], rel=1e-6
    )


def test_teacher_drop_keeps_the_worst_fit_teacher_and_drops_the_others_at_rate_p():
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(3, 4000, generator=gen)  # (N_T, B)
    worst = losses.argmax(dim=0)
    for p in (0.0, 0.5, 0.9):
        mask = teacher_drop_mask(losses, p, generator=gen)
        assert (mask.gather(0, worst.unsqueeze(0)) == 1).all()  # the worst fit always counts
        others = torch.ones_like(mask, dtype=torch.bool).scatter_(0, worst.unsqueeze(0), False)
        kept = mask[others].mean().item()
        assert kept == pytest.approx(1 - p, abs=0.02)


def ref_tas_heads(predictions, probs, kept, mix, targets, channels):
    T, K = probs.shape
    total = 0.0
    for t in range(T):
        for k in range(K):
            if not kept[t, k]:
                continue
            for i, (g, y) in enumerate(zip(predictions, targets)):
                l1 = sum(abs(g[t, k, c].item() - y[t, c].item()) for c in range(y.shape[1]))
                l1 = l1 if channels == "sum" else l1 / y.shape[1]
                total += probs[t, k].item() * mix[t, k, i].item() * l1
    return total / T


@pytest.mark.parametrize("channels", ["mean", "sum"])
def test_tas_heads_loss_matches_reference(channels):
    _, probs, kept, mix, _ = random_tas(N_T=2)
    predictions = [
        torch.randn(13, 2, 5, dtype=torch.float64),
        torch.randn(13, 2, 7, dtype=torch.float64),
    ]
    targets = [torch.randn(13, 5, dtype=torch.float64), torch.randn(13, 7, dtype=torch.float64)]
    got = tas_heads_loss(predictions, probs, kept, mix, targets, channels).item()
    want = ref_tas_heads(predictions, probs, kept, mix, targets, channels)
    assert got == pytest.approx(want, rel=1e-6)


def test_tas_norm_sum_is_eq8_as_written():
    """‖·‖₁ summed over the channels: D times the per-channel mean, for both forms."""
    args = random_tas(D=8)
    for loss in (tas_loss, tas_map_loss):
        mean = loss(*args).item()
        assert loss(*args, channels="sum").item() == pytest.approx(8 * mean, rel=1e-9)


def test_pi_balance_is_one_when_even_and_n_t_when_one_teacher_takes_all():
    even = torch.full((10, 4, 2), 0.5)
    one = torch.zeros(10, 4, 2)
    one[..., 0] = 1.0
    assert pi_balance_loss(even).item() == pytest.approx(1.0)
    assert pi_balance_loss(one).item() == pytest.approx(2.0)
    mix = torch.randn(10, 4, 3).softmax(-1)
    share = [mix[:, :, i].mean().item() for i in range(3)]
    assert pi_balance_loss(mix).item() == pytest.approx(3 * sum(s * s for s in share), rel=1e-6)
