"""m2ot_measure.py: the indices by hand, linear CKA against its kernel form, the dropped expert
against a loop, the null's relabelling, and the positive control: experts tied to teachers by
construction must read as specialised, and the λ_1 = 0 toy must not."""

import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from m2ot_measure import (
    causal_matrix,
    diversity_index,
    expert_dropped,
    linear_cka,
    permuted_null,
    relabel,
    shares,
    split_index,
)
from moe import MoEMLP

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import m2ot_split  # noqa: E402


# ----------------------------------------------------------------------------- the indices
def test_shares_split_and_diversity_by_hand():
    # each expert serves one teacher: columns [2, 0] and [0, 1] -> shares one-hot
    s = shares(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(s, torch.eye(2))
    assert split_index(s) == 1.0 and diversity_index(s) == 1.0

    # one teacher louder for every expert is no specialisation: columns [1, 2] and [3, 6]
    s = shares(torch.tensor([[1.0, 3.0], [2.0, 6.0]]))
    torch.testing.assert_close(s, torch.full((2, 2), 0.5))
    assert split_index(s) == pytest.approx(0.5)

    # three experts leaning to A, none to B: DI = 0; a negative rise counts as 0
    m = torch.tensor([[3.0, 1.0], [3.0, 1.0], [3.0, 1.0], [-1.0, 1.0]])
    s = shares(m)
    # column A: 1/3, 1/3, 1/3, 0; column B: 1/4 each -> rows (4/7, 3/7) x3, (0, 1)
    torch.testing.assert_close(s[0], torch.tensor([4 / 7, 3 / 7]))
    torch.testing.assert_close(s[3], torch.tensor([0.0, 1.0]))
    assert split_index(s) == pytest.approx((3 * 4 / 7 + 1) / 4)
    # favourites A, A, A, B: H = −(¾ log ¾ + ¼ log ¼), over log 2
    want = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert diversity_index(s) == pytest.approx(want)
    assert diversity_index(shares(torch.tensor([[2.0, 1.0], [2.0, 1.0]]))) == 0.0


def test_an_expert_without_tokens_is_left_out():
    m = torch.tensor([[1.0, 0.0], [float("nan"), float("nan")], [0.0, 1.0]])
    s = shares(m)
    assert s[1].isnan().all() and split_index(s) == 1.0 and diversity_index(s) == 1.0


def test_linear_cka_equals_its_kernel_form():
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = XXᵀ, L = YYᵀ, HSIC = tr(KHLH)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen)
    y = x @ torch.randn(6, 4, generator=gen) + 0.5 * torch.randn(50, 4, generator=gen)
    H = torch.eye(50, dtype=torch.float64) - 1 / 50  # centring
    hsic = lambda a, b: torch.trace(a @ H @ b @ H).item()
    K = (x @ x.T).double()
    L = (y @ y.T).double()
    want = hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))
    assert linear_cka(x, y) == pytest.approx(want, rel=1e-6)
    # invariant to a rotation and a scale (so to the fixed Q_i), 1 against itself
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the null
def test_relabel_permutes_each_samples_teachers():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 100 * 3).float().view(2, 100, 3)  # (N_T, n, E)
    y = relabel(x, gen)
    for s in range(100):  # the sample's two rows, in either order, never mixed with another's
        rows = {tuple(y[0, s].tolist()), tuple(y[1, s].tolist())}
        assert rows == {tuple(x[0, s].tolist()), tuple(x[1, s].tolist())}
    swapped = (y[0, :, 0] != x[0, :, 0]).float().mean()
    assert 0.3 < swapped < 0.7  # about half the samples swap


def test_the_null_sits_near_no_lean_and_below_a_split():
    """Rises per (teacher, image, expert) where experts 0, 2 carry teacher A and 1, 3 B: the
    matrix splits, the null (each image's teachers relabelled) does not."""
    gen = torch.Generator().manual_seed(0)
    rises = 0.1 * torch.rand(2, 64, 4, generator=gen)  # (N_T, B, E)
    rises[0, :, 0::2] += 1.0  # A's loss rises when 0 or 2 is dropped
    rises[1, :, 1::2] += 1.0
    matrix_of = partial(causal_matrix, rises)
    s = shares(matrix_of(lambda x: x))
    mean, bar = permuted_null(matrix_of)
    assert split_index(s) > 0.9 and diversity_index(s) == 1.0
    assert mean < 0.55 and split_index(s) > bar


# ----------------------------------------------------------------------------- dropping an expert
def test_expert_dropped_matches_a_loop_and_restores_the_layer():
    torch.manual_seed(0)
    layer = MoEMLP(8, 16, 4, k=2, capacity_factor=4.0, noise_std=0.0, group_size=1).eval()
    layer.keep_expert_outputs = True
    x = torch.randn(1, 30, 8)
    _, r = layer(x)
    with expert_dropped(layer, 2):
        y, r2 = layer(x)
    assert "route" not in vars(layer)  # the method is back
    # y_t = Σ_{k kept, e_k ≠ 2} g_{t,k} φ(t, e_k)
    want = torch.zeros(30, 8)
    for t in range(30):
        for k in range(2):
            if r.kept[t, k] and r.experts[t, k] != 2:
                want[t] += r.weights[t, k] * r.expert_out[t, k]
    torch.testing.assert_close(y[0], want)
    assert not (r2.kept & (r2.experts == 2)).any()


# ----------------------------------------------------------------------------- the positive control
def test_the_measure_sees_the_positive_control():
    """The one-layer toy (E 4, K 2): experts tied to teachers by a fixed one-hot π read as
    specialised against the λ_1 = 0 toy of the same seed; the λ_1 = 0 toy's SI is the bar."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    try:
        control = m2ot_split.run_toy("control (fixed π)", 4, 2, 0, m2ot_split.TOY)
        baseline = m2ot_split.run_toy("V0 (λ_1 0)", 4, 2, 0, m2ot_split.TOY)
    finally:
        torch.set_num_threads(threads)
    control = control["representational"]  # 0.83 (the study's seed 0)
    baseline = baseline["representational"]  # 0.63
    assert m2ot_split.is_specialised(control, baseline)
    assert control["si"] > baseline["si"] + 0.1
    assert not m2ot_split.is_specialised(baseline, baseline)
