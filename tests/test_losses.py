"""Every loss in losses.py against an obvious, loop-by-loop re-implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import entropy_loss, importance_loss, load_loss, routing_kl, z_loss

torch.manual_seed(0)


def random_probs(T=37, E=6, batch_shape=None):
    logits = torch.randn(T, E, dtype=torch.float64) * 2
    return logits, logits.softmax(-1)


# --- obvious re-implementations: plain Python over lists --------------------------------


def ref_cv_squared(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)  # population variance
    return var / mean**2


def ref_importance(p):
    T, E = p.shape
    imp = [sum(p[t, e].item() for t in range(T)) / T for e in range(E)]
    return ref_cv_squared(imp)


def ref_load(logits, noisy, noise_std, k):
    T, E = logits.shape
    means = []
    for e in range(E):
        total = 0.0
        for t in range(T):
            threshold = sorted(noisy[t].tolist(), reverse=True)[k - 1]
            z = (threshold - logits[t, e].item()) / noise_std
            phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
            total += 1 - phi
        means.append(total / T)
    return ref_cv_squared(means)


def ref_entropy(p):
    T, E = p.shape
    h = 0.0
    for t in range(T):
        for e in range(E):
            v = p[t, e].item()
            h -= v * math.log(v) if v > 0 else 0.0
    return h / T


def ref_kl(ps, pt):
    T, E = ps.shape
    total = 0.0
    for t in range(T):
        for e in range(E):
            a, b = pt[t, e].item(), ps[t, e].item()
            total += a * (math.log(a) - math.log(b)) if a > 0 else 0.0
    return total / T


def ref_z(logits):
    T, E = logits.shape
    return sum(math.log(sum(math.exp(v) for v in logits[t].tolist())) ** 2 for t in range(T)) / T


# --- the tests ----------------------------------------------------------------------------


def test_importance_loss_matches_reference():
    _, p = random_probs()
    assert importance_loss(p).item() == pytest.approx(ref_importance(p), rel=1e-9)


def test_importance_loss_zero_when_balanced_and_flattens_leading_dims():
    # perfectly balanced hard assignment: every expert gets the same number of tokens
    p = F.one_hot(torch.arange(24) % 6, 6).double()
    assert importance_loss(p).item() == pytest.approx(0.0, abs=1e-12)
    _, p = random_probs(T=24)
    assert importance_loss(p.view(4, 6, 6)).item() == pytest.approx(importance_loss(p).item())


def test_importance_loss_large_when_collapsed():
    p = F.one_hot(torch.zeros(20, dtype=torch.long), 4).double()  # every token to expert 0
    assert importance_loss(p).item() == pytest.approx(ref_importance(p)) == pytest.approx(3.0)


@pytest.mark.parametrize("k", [1, 2])
def test_load_loss_matches_reference(k):
    logits, _ = random_probs(T=23, E=5)
    noise_std = 0.3
    noisy = logits + noise_std * torch.randn_like(logits)
    got = load_loss(logits, noisy, noise_std, k).item()
    assert got == pytest.approx(ref_load(logits, noisy, noise_std, k), rel=1e-7)


@pytest.mark.parametrize("groups", [1, 3, 4])
def test_balance_losses_per_group_equal_a_loop_over_groups(groups):
    # V-MoE: CV² within each group of images (the groups capacity is counted in), averaged;
    # the reference slices the groups by hand and calls the obvious loop implementations
    logits, p = random_probs(T=24, E=5)
    noisy = logits + 0.3 * torch.randn_like(logits)
    S = 24 // groups
    slices = [slice(g * S, (g + 1) * S) for g in range(groups)]
    want_imp = sum(ref_importance(p[s]) for s in slices) / groups
    want_load = sum(ref_load(logits[s], noisy[s], 0.3, 2) for s in slices) / groups
    assert importance_loss(p, groups=groups).item() == pytest.approx(want_imp, rel=1e-9)
    assert load_loss(logits, noisy, 0.3, 2, groups=groups).item() == pytest.approx(
        want_load, rel=1e-7
    )


def test_per_group_balance_differs_from_batch_balance():
    # each group sends everything to its own expert: balanced over the batch, collapsed in
    # every group, which is what V-MoE's per-group capacity would punish by dropping tokens
    p = F.one_hot(torch.arange(4).repeat_interleave(6), 4).double()  # (24, 4), groups of 6
    assert importance_loss(p).item() == pytest.approx(0.0, abs=1e-12)
    assert importance_loss(p, groups=4).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="equal groups"):
        importance_loss(p, groups=5)


def test_load_loss_has_gradient_and_zero_noise_limit():
    logits = torch.randn(30, 4, requires_grad=True)
    noisy = logits.detach() + 0.25 * torch.randn(30, 4)
    load_loss(logits, noisy, 0.25, 1).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # noise off: the CDF is a step, the value is the CV² of the hard top-k indicator
    hard = load_loss(logits.detach(), logits.detach(), 0.0, 1).item()
    indicator = F.one_hot(logits.detach().argmax(-1), 4).double()
    assert hard == pytest.approx(ref_cv_squared(indicator.mean(0).tolist()), rel=1e-6)


def test_entropy_loss_matches_reference_and_bounds():
    _, p = random_probs()
    assert entropy_loss(p).item() == pytest.approx(ref_entropy(p), rel=1e-9)
    onehot = F.one_hot(torch.arange(10) % 3, 3).double()  # exact zeros must not give NaN
    assert entropy_loss(onehot).item() == 0.0
    uniform = torch.full((5, 8), 1 / 8, dtype=torch.float64)
    assert entropy_loss(uniform).item() == pytest.approx(math.log(8))


def test_routing_kl_matches_reference_and_kl_div():
    ls, ps = random_probs()
    lt, pt = random_probs()
    expected = ref_kl(ps, pt)
    assert routing_kl(ps, pt).item() == pytest.approx(expected, rel=1e-9)
    assert routing_kl(ls, lt, from_logits=True).item() == pytest.approx(expected, rel=1e-6)
    # torch's own KL: kl_div(input=log q, target=p) = Σ p (log p − log q), batchmean = / T
    torch_kl = F.kl_div(ps.log(), pt, reduction="batchmean").item()
    assert routing_kl(ps, pt).item() == pytest.approx(torch_kl, rel=1e-9)


def test_routing_kl_zero_when_equal_positive_otherwise():
    logits, p = random_probs()
    assert routing_kl(p, p).item() == pytest.approx(0.0, abs=1e-12)
    assert routing_kl(logits, logits, from_logits=True).item() == pytest.approx(0.0, abs=1e-6)
    assert routing_kl(p, p.roll(1, dims=-1)).item() > 0


def test_routing_kl_gives_teacher_no_gradient():
    student = torch.nn.Linear(8, 4, bias=False)
    teacher_router = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8)
    for from_logits in (False, True):
        student.zero_grad(set_to_none=True)
        s, t = student(x), teacher_router(x)
        if not from_logits:
            s, t = s.softmax(-1), t.softmax(-1)
        routing_kl(s, t, from_logits=from_logits).backward()
        assert teacher_router.weight.grad is None  # stop-gradient: never reaches the teacher
        assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0


def test_routing_kl_from_logits_is_finite_where_probs_underflow():
    # KL = ½(log ½ − 0) + ½(log ½ + 200) = 100 − log 2, with p_student[1] = e^-200 = 0 in fp32
    s = torch.tensor([[0.0, -200.0]])
    t = torch.tensor([[0.0, 0.0]])
    kl = routing_kl(s, t, from_logits=True)
    assert torch.isfinite(kl) and kl.item() == pytest.approx(100 - math.log(2), rel=1e-5)


def test_z_loss_matches_reference():
    logits, _ = random_probs()
    assert z_loss(logits).item() == pytest.approx(ref_z(logits), rel=1e-6)
    assert z_loss(torch.full((3, 4), -math.log(4))).item() == pytest.approx(0.0, abs=1e-10)
