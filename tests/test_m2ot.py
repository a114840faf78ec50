"""m2ot.py: targets, heads, the teacher-aware router and the objective, each against an
obvious re-implementation; then train.py's M²oT rows end to end on the micro model.

The unit tests use stub teachers (a fixed random patchify conv of any width and grid); the
end-to-end tests use two dense micro checkpoints of different shapes, as the demo does.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import train
from data import MEAN, STD
from errors import UsageError
from m2ot import (
    FixedTeacherRouter,
    M2oT,
    RunningStandardiser,
    TeacherAwareRouter,
    align_tokens,
    keep_expert_outputs,
    layer_tas,
    load_mix_routers,
    m2ot_losses,
    preference_sharpness,
    renormalise,
    semi_orthogonal,
    teacher_preference,
)
from m2ot_hook import M2oTHook
from m2ot_losses import feature_distill_loss, switch_load_loss, teacher_drop_mask
from m2ot_teachers import teacher_source
from moe import MoEMLP, build_model


class StubTeacher(nn.Module):
    """A frozen 'foundation model': patchify conv of width d on a g×g grid, CLS = mean."""

    def __init__(self, dim, grid, img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        self.dim, self.grid, self.mean, self.std = dim, grid, mean, std
        self.proj = nn.Conv2d(3, dim, img_size // grid, img_size // grid).requires_grad_(False)
        self.seen = []  # the images it was given

    def forward(self, x):
        self.seen.append(x)
        patches = self.proj(x).flatten(2).transpose(1, 2)  # (B, g², d)
        return patches.mean(1), patches


def student(k=2, experts=4, method="vmoe"):  # --method m2ot builds a vmoe student
    torch.manual_seed(0)
    model = build_model(
        "micro",
        method,
        num_classes=0,
        img_size=32,
        patch_size=4,
        num_experts=experts,
        k=k,
        moe_layers=(2, 4, 6),
        expert_hidden=384 // k,
    )
    keep_expert_outputs(model)
    return model


# ----------------------------------------------------------------------------- targets
def test_semi_orthogonal_maps_are_fixed_and_orthonormal():
    assert torch.equal(semi_orthogonal(96, 96, seed=0), torch.eye(96))
    down, up = semi_orthogonal(384, 96, seed=1), semi_orthogonal(48, 96, seed=2)  # (96, 384)
    assert down.shape == (96, 384) and up.shape == (96, 48)
    torch.testing.assert_close(down @ down.t(), torch.eye(96), atol=1e-5, rtol=0)  # rows
    torch.testing.assert_close(up.t() @ up, torch.eye(48), atol=1e-5, rtol=0)  # columns
    state = torch.get_rng_state()
    assert torch.equal(semi_orthogonal(384, 96, seed=1), down)  # seeded: the same every run
    assert torch.equal(torch.get_rng_state(), state)  # and torch's own stream untouched


def test_renormalise_gives_each_teacher_its_own_normalisation():
    raw = torch.rand(2, 3, 8, 8)  # pixels in [0, 1]
    mean_, std_ = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    loader = (raw - mean_) / std_  # what data.normalize hands the step
    scale, shift = renormalise((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # CLIP/SigLIP-style
    torch.testing.assert_close(loader * scale + shift, (raw - 0.5) / 0.5)
    scale, shift = renormalise(MEAN, STD)
    torch.testing.assert_close(loader * scale + shift, loader)


def test_align_tokens_is_bilinear_interpolation_of_the_grid():
    patches = torch.randn(2, 16, 5)  # (B, 4·4, d)
    out = align_tokens(patches, 4, 8)
    maps = patches.transpose(1, 2).reshape(2, 5, 4, 4)
    want = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, want.flatten(2).transpose(1, 2))
    assert align_tokens(patches, 4, 4) is patches


def test_running_standardiser_first_batch_whole_then_moving_average():
    norm = RunningStandardiser(3, momentum=0.1)
    a, b = torch.randn(50, 3) * 4 + 2, torch.randn(50, 3) + 1
    y = norm(a)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    norm(b)
    torch.testing.assert_close(norm.mean, 0.9 * a.mean(0) + 0.1 * b.mean(0))
    want_var = 0.9 * a.var(0, unbiased=False) + 0.1 * b.var(0, unbiased=False)
    torch.testing.assert_close(norm.var, want_var, rtol=1e-4, atol=1e-5)
    norm.eval()
    before = norm.mean.clone()
    norm(a * 100)
    assert torch.equal(norm.mean, before) and int(norm.seen) == 2  # frozen in eval


# ----------------------------------------------------------------------------- shapes
def test_heads_and_targets_fit_teachers_of_any_width_and_grid():
    widths, grids = (96, 192, 384), (8, 4, 2)  # the student's grid is 8x8
    m = M2oT([StubTeacher(d, g) for d, g in zip(widths, grids)], 96, 8, 3, 4)
    model = student()
    tokens, routings = model(torch.randn(2, 3, 32, 32), features=True)  # (2, 65, 96)
    targets = m.targets(torch.randn(2, 3, 32, 32))
    for head, d, (cls, patches) in zip(m.heads, widths, targets):
        assert cls.shape == (2, d) and patches.shape == (2, 64, d)
        assert head.cls(tokens[:, 0]).shape == (2, d)
        assert head.patch(tokens[:, 1:]).shape == (2, 64, d)
    assert m.teacher_tokens(targets).shape == (3, 2 * 65, 96)  # (N_T, T, D)
    assert len(m.pi) == 3 and m.pi[0](routings[0].inputs).shape == (130, 4, 3)  # (T, E, N_T)
    assert "teachers" not in m.state_dict() and not any("proj" in k for k in m.state_dict())


def test_each_teacher_sees_its_own_normalisation():
    t1, t2 = StubTeacher(8, 8, mean=MEAN, std=STD), StubTeacher(8, 8)
    m = M2oT([t1, t2], 96, 8)
    raw = torch.rand(1, 3, 32, 32)
    mean_, std_ = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    m.targets((raw - mean_) / std_)
    torch.testing.assert_close(t1.seen[0], (raw - mean_) / std_)
    torch.testing.assert_close(t2.seen[0], (raw - 0.5) / 0.5)


# ----------------------------------------------------------------------------- the objective
def test_distill_is_the_mean_over_teachers_of_cls_and_patch():
    m = M2oT([StubTeacher(96, 8), StubTeacher(48, 4)], 96, 8)
    tokens = torch.randn(2, 65, 96)
    targets = m.targets(torch.randn(2, 3, 32, 32))
    total, parts = m.distill(tokens, targets)
    want = []
    for head, (cls, patches) in zip(m.heads, targets):
        l_cls = feature_distill_loss(head.cls(tokens[:, 0]), cls)
        l_patch = feature_distill_loss(head.patch(tokens[:, 1:]), patches)
        want.append((l_cls + l_patch) / 2)
    torch.testing.assert_close(torch.stack(parts), torch.stack(want))
    torch.testing.assert_close(total, (want[0] + want[1]) / 2)


def ref_tas(m, routings, targets, form="mixture"):
    """L_tas token by token: π from the router's weight by hand; mixture (Eq. 8): the gap to
    T̄ = Σ_i π_i Q_i T_i; map: Σ_i π_i · the gap to Q_i T_i."""
    total = 0.0
    feats = []
    for i, (cls, patches) in enumerate(targets):
        tok = torch.cat([cls.unsqueeze(1), patches], 1).reshape(-1, cls.shape[-1]).double()
        feats.append(tok @ getattr(m, f"q{i}").double().t())  # (T, D)
    for pi, r in zip(m.pi, routings):
        layer, T = 0.0, r.inputs.shape[0]
        W = pi.weight.double()  # (E·N_T, D)
        for t in range(T):
            mix = (W @ r.inputs[t].double()).view(pi.num_experts, -1).softmax(-1)  # (E, N_T)
            for k in range(r.experts.shape[1]):
                if not r.kept[t, k]:
                    continue
                e, phi = int(r.experts[t, k]), r.expert_out[t, k].double()
                if form == "map":
                    gaps = [mix[e, i] * (phi - feats[i][t]).abs().mean() for i in range(len(feats))]
                    gap = sum(gaps)
                else:
                    t_bar = sum(mix[e, i] * feats[i][t] for i in range(len(feats)))
                    gap = (phi - t_bar).abs().mean()
                layer += r.probs[t, e].item() * gap.item()
        total += layer / T
    return total


@pytest.mark.parametrize("form", ["mixture", "map"])
def test_tas_equals_a_token_by_token_loop(form):
    m = M2oT([StubTeacher(96, 8), StubTeacher(192, 4)], 96, 8, 3, 4, tas_form=form)
    model = student()
    model.train()
    tokens, routings = model(torch.randn(2, 3, 32, 32), features=True)
    assert not all(r.kept.all() for r in routings)  # cf 1.05: some assignments dropped
    targets = m.targets(torch.randn(2, 3, 32, 32))
    got = m.tas(routings, targets).detach()
    assert got.item() == pytest.approx(ref_tas(m, routings, targets, form), rel=1e-5)


def test_dist_reduce_sum_is_eq2_as_written_and_mean_its_mean():
    teachers = [StubTeacher(96, 8), StubTeacher(48, 4), StubTeacher(32, 2)]
    tokens, images = torch.randn(2, 65, 96), torch.randn(2, 3, 32, 32)
    mean, summed = (M2oT(teachers, 96, 8, dist_reduce=r) for r in ("mean", "sum"))
    summed.load_state_dict(mean.state_dict())  # the same heads
    (l_mean, parts), (l_sum, parts_sum) = (
        m.distill(tokens, m.targets(images)) for m in (mean, summed)
    )
    torch.testing.assert_close(torch.stack(parts), torch.stack(parts_sum))
    torch.testing.assert_close(l_sum, sum(parts))  # Eq. 2: Σ_i
    torch.testing.assert_close(l_mean, sum(parts) / 3)  # N_T = 3 times smaller


def test_tas_form_and_dist_reduce_flags_reach_the_objective():
    parse = lambda *f: train.get_args_parser().parse_args([*TINY, "--method", "m2ot", *f])
    cpu = torch.device("cpu")
    build = lambda args: M2oTHook(args, [StubTeacher(96, 8)]).start(student(), cpu, 0, 1)
    m = build(parse("--teachers", "T"))
    assert (m.tas_form, m.dist_reduce) == ("mixture", "mean")  # the defaults: Eq. 8, mean
    m = build(parse("--teachers", "T", "--tas-form", "map", "--dist-reduce", "sum"))
    assert (m.tas_form, m.dist_reduce) == ("map", "sum")
    assert (m.tas_norm, m.pi_balance, m.teacher_drop, m.switch_choices) == ("mean", 0, 0, "first")
    assert isinstance(m.pi[0], TeacherAwareRouter) and len(m.tas_heads) == 0
    variants = ["--tas-norm", "sum", "--tas-pi", "fixed", "--pi-balance", "0.1"]
    variants += ["--teacher-drop", "0.5", "--switch-choices", "all", "--tas-form", "heads"]
    m = build(parse("--teachers", "T", *variants))
    assert (m.tas_norm, m.pi_balance, m.teacher_drop, m.switch_choices) == ("sum", 0.1, 0.5, "all")
    assert isinstance(m.pi[0], FixedTeacherRouter) and len(m.tas_heads) == 3  # one per layer


def test_fixed_pi_ties_expert_e_to_teacher_e_mod_n_t():
    pi = FixedTeacherRouter(5, 2)
    mix = pi(torch.randn(3, 7, 96))  # any input: (..., E, N_T)
    assert mix.shape == (3, 7, 5, 2) and not list(pi.parameters())
    assert mix[0, 0].argmax(-1).tolist() == [0, 1, 0, 1, 0] and (mix.sum(-1) == 1).all()
    m = M2oT([StubTeacher(96, 8), StubTeacher(48, 4)], 96, 8, 3, 5, tas_pi="fixed")
    assert load_mix_routers(m.state_dict(), 5) is None  # nothing learned to report


def test_switch_choices_all_counts_both_choices_and_balance_is_logged():
    m = M2oT([StubTeacher(96, 8), StubTeacher(48, 4)], 96, 8, 3, 4)
    m.switch_choices = "all"
    m.pi_balance = 0.1
    model = student()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    loss, parts = m2ot_losses(model, m, images, tas_coef=0.5, switch_coef=0.01)
    torch.manual_seed(1)  # the same noise draws: the same routings
    _, routings = model(images, features=True)
    want = sum(switch_load_loss(r.probs, r.experts) for r in routings)
    assert parts["switch"].item() == pytest.approx(want.item(), rel=1e-6)
    total = parts["dist"] + 0.5 * parts["tas"] + 0.01 * parts["switch"] + 0.1 * parts["pi_balance"]
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)


def test_teacher_drop_counts_only_the_kept_losses_in_training():
    m = M2oT([StubTeacher(96, 8), StubTeacher(48, 4)], 96, 8, teacher_drop=0.5)
    tokens = torch.randn(6, 65, 96)
    targets = m.targets(torch.randn(6, 3, 32, 32))
    per_image = m.per_image_dist(tokens, targets)  # (N_T, B)
    torch.manual_seed(3)
    total, parts = m.distill(tokens, targets)
    torch.manual_seed(3)
    mask = teacher_drop_mask(per_image, 0.5)
    torch.testing.assert_close(total, (per_image * mask).mean(dim=1).mean())
    torch.testing.assert_close(torch.stack(parts), per_image.mean(dim=1))  # logged undropped
    m.eval()  # no dropping outside training
    total, _ = m.distill(tokens, targets)
    torch.testing.assert_close(total, per_image.mean())


def test_tas_through_heads_reads_each_teacher_in_its_own_width():
    m = M2oT([StubTeacher(96, 8), StubTeacher(48, 4)], 96, 8, 3, 4, tas_form="heads")
    assert [g.out_features for g in m.tas_heads[0]] == [96, 48]  # g_i: D -> d_i
    model = student()
    _, routings = model(torch.randn(2, 3, 32, 32), features=True)
    targets = m.targets(torch.randn(2, 3, 32, 32))
    m.tas(routings, targets).backward()
    assert all(g.weight.grad.abs().sum() > 0 for g in m.tas_heads[0])
    assert model.blocks[1].mlp.w1.grad.abs().sum() > 0  # it reaches the experts


def test_teacher_source_reads_an_at_size(tmp_path):
    assert teacher_source("dinov2.pth@518", 224) == ("dinov2.pth", 518)
    assert teacher_source("timm:aimv2_large_patch14_224=a/b.pth@448", 32) == (
        "timm:aimv2_large_patch14_224=a/b.pth",
        448,
    )
    assert teacher_source("torchvision:vit_b_16", 224) == ("torchvision:vit_b_16", 224)
    odd = tmp_path / "run@3.pt"  # a file whose own name holds an @
    odd.touch()
    assert teacher_source(str(odd), 32) == (str(odd), 32)
    for bad in ("a.pth@", "a.pth@big", "a.pth@0", "a.pth@-4", "a.pth@2.5"):
        with pytest.raises(UsageError, match=r"is not a size in pixels \(SRC@SIZE") as err:
            teacher_source(bad, 32)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- Eq. 8's fixed point
def fit_one_layer(form, steps=200, seed=0, T=256, D=16, E=4):
    """One MoE layer (K = 2, no drops, no noise) and its π trained jointly on L_tas alone
    (Adam), from φ ≈ 0 and uniform π, toward two independent teachers: random GELU networks of
    the tokens, standardised per channel. -> (teachers (2, T, D), the layer's Routing, π)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, D, generator=gen) + 1.0  # (1, T, D) not centred, as LN outputs

    def teacher():  # T_i(x) = U GELU(V x + c), standardised
        h = F.gelu(
            x[0] @ torch.randn(D, 32, generator=gen) / D**0.5 + torch.randn(32, generator=gen)
        )
        f = h @ torch.randn(32, D, generator=gen)  # (T, D)
        return (f - f.mean(0)) / f.std(0)

    teachers = torch.stack([teacher(), teacher()])  # (2, T, D)
    torch.manual_seed(seed)
    layer = MoEMLP(D, 16, E, k=2, capacity_factor=float(E), noise_std=0.0, group_size=1)
    layer.keep_expert_outputs = True
    pi = TeacherAwareRouter(D, E, 2)
    opt = torch.optim.Adam([*layer.parameters(), *pi.parameters()], lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (40x on a busy CPU)
    try:
        for _ in range(steps):
            _, routing = layer(x)
            loss = layer_tas(pi, routing, teachers, form=form)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        _, routing = layer(x)
        return teachers, routing, pi(routing.inputs)  # π: (T, E, 2)


def gaps_and_sharpness(teachers, r, mix):
    """mean_c |φ − y| over the assignments for y = T_A, T_B, their mean; per-expert and
    per-token sharpness; each expert's gap to its favourite teacher and to the mean."""
    gap = lambda y, m=r.kept: (r.expert_out - y.unsqueeze(1)).abs().mean(-1)[m].mean().item()
    pref = teacher_preference(mix, r.experts, r.kept, r.num_experts)  # (E, 2)
    chosen = mix.gather(1, r.experts.unsqueeze(-1).expand(-1, -1, 2))  # (T, K, 2)
    per_expert = [
        (
            gap(teachers[int(pref[e].argmax())], r.experts == e),
            gap(teachers.mean(0), r.experts == e),
        )
        for e in range(r.num_experts)
        if (r.experts == e).any()
    ]
    sharp = (preference_sharpness(pref), chosen.max(-1).values[r.kept].mean().item())
    return [gap(teachers[0]), gap(teachers[1]), gap(teachers.mean(0))], sharp, per_expert


def test_eq8_trained_jointly_settles_on_the_teachers_mean():
    """Eq. 8 as written: ‖φ − Σ_i π_i T_i‖₁ ≤ Σ_i π_i ‖φ − T_i‖₁, so a mixture is the easier
    target; from φ ≈ 0 the nearest mixture is the teachers' mean, where π has no pull. π stays
    near 1/N_T and every expert ends near the mean (Prop. 1's compromise), not near a teacher."""
    teachers, r, mix = fit_one_layer("mixture")
    (to_a, to_b, to_mean), (per_expert, per_token), _ = gaps_and_sharpness(teachers, r, mix)
    assert per_expert < 0.6 and per_token < 0.6  # 1/N_T = 0.5: no preference
    assert to_mean < 0.5 * min(to_a, to_b)  # 0.24 vs 0.64, 0.56


def test_map_form_makes_each_expert_follow_one_teacher():
    """The MAP form (π outside the norm) from the same start: π goes one-hot and every expert
    ends nearer its favourite teacher than the teachers' mean."""
    teachers, r, mix = fit_one_layer("map")
    _, (per_expert, per_token), experts = gaps_and_sharpness(teachers, r, mix)
    assert per_expert > 0.95 and per_token > 0.95
    assert all(to_favourite < to_mean for to_favourite, to_mean in experts)


def test_switch_part_is_on_the_top1_choices_and_all_parts_are_logged():
    m = M2oT([StubTeacher(96, 8), StubTeacher(48, 4)], 96, 8, 3, 4)
    model = student()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    loss, parts = m2ot_losses(model, m, images, tas_coef=0.5, switch_coef=0.01)
    assert set(parts) == {"dist", "dist_0", "dist_1", "tas", "switch"}
    torch.manual_seed(1)  # the same noise draws: the same routings
    _, routings = model(images, features=True)
    want = sum(switch_load_loss(r.probs, r.experts[:, 0]) for r in routings)
    assert parts["switch"].item() == pytest.approx(want.item(), rel=1e-6)
    # L = L_dist + 0.5 L_tas + 0.01 L_switch (Eq. 10)
    want_total = parts["dist"] + 0.5 * parts["tas"] + 0.01 * parts["switch"]
    assert float(loss) == pytest.approx(float(want_total), rel=1e-5)


def test_without_tas_only_pi_learns_from_it():
    """--tas-coef 0 (Sparse MoE): L_tas is measured and trains π, never experts or router."""
    m = M2oT([StubTeacher(96, 8), StubTeacher(48, 4)], 96, 8, 3, 4)
    model = student()
    _, routings = model(torch.randn(2, 3, 32, 32), features=True)
    tas = m.tas(routings, m.targets(torch.randn(2, 3, 32, 32)), detach=True)
    tas.backward()
    assert all(p.grad is None for p in model.parameters())  # experts, router, backbone
    assert all(p.grad.abs().sum() > 0 for p in m.pi.parameters())
    m.zero_grad()
    _, routings = model(torch.randn(2, 3, 32, 32), features=True)
    m.tas(routings, m.targets(torch.randn(2, 3, 32, 32))).backward()
    mlp = model.blocks[1].mlp
    assert mlp.w1.grad.abs().sum() > 0 and mlp.router.weight.grad.abs().sum() > 0


def test_dense_and_soft_students_learn_from_the_distillation_alone():
    for method in ("dense", "softmoe"):
        model = student(method=method)
        m = M2oT([StubTeacher(96, 8)], 96, 8)  # no MoE layers handed over: no π
        loss, parts = m2ot_losses(model, m, torch.randn(2, 3, 32, 32))
        assert set(parts) == {"dist", "dist_0"} and len(m.pi) == 0
        torch.testing.assert_close(loss, parts["dist"])


def test_mix_routers_load_back_from_the_state():
    m = M2oT([StubTeacher(96, 8), StubTeacher(48, 4)], 96, 8, 3, 4)
    routers = load_mix_routers(m.state_dict(), 4)
    x = torch.randn(5, 96)
    for a, b in zip(routers, m.pi):
        torch.testing.assert_close(a(x), b(x))
    assert load_mix_routers(M2oT([StubTeacher(96, 8)], 96, 8).state_dict(), 4) is None


# ----------------------------------------------------------------------------- train.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "--model micro --img-size 32 --patch-size 4 --experts 4 --batch-size 16 "
    "--synthetic-train-size 64 --synthetic-val-size 32 --epochs 2 --warmup-epochs 0 "
    "--lr 2e-3 --print-freq 1000 --watch-size 16 --num-workers 0 --nb-classes 10"
).split()
KEYS = {"train_dist", "train_dist_0", "train_dist_1", "train_tas", "train_switch", "val_knn_top1"}


def run(out, *extra):
    return train.main(train.get_args_parser().parse_args([*TINY, "--output-dir", str(out), *extra]))


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two dense teachers of different shapes and tasks: patch 4, and patch 8 on seed 1."""
    a, b = tmp_path_factory.mktemp("teacher_a"), tmp_path_factory.mktemp("teacher_b")
    run(a, "--method", "dense", "--epochs", "1")
    run(b, "--method", "dense", "--epochs", "1", "--patch-size", "8", "--synthetic-seed", "1")
    return [str(a / "checkpoint.pt"), str(b / "checkpoint.pt")]


ROWS = {  # the paper's rows (Tables 1, 3, 7) with the same teachers
    "m2ot": ["--method", "m2ot"],
    "sparse-moe": ["--method", "m2ot", "--tas-coef", "0"],
    "top1": ["--method", "m2ot", "--topk", "1"],
    "dense": ["--method", "dense"],
    "softmoe": ["--method", "softmoe"],
    # the variants (docs/m2ot.md): the control and TAS through heads; the paper's weighting
    # with UNIC's teacher dropping, π balance and the Switch loss over both choices
    "control-heads": ["--method", "m2ot", "--tas-pi", "fixed", "--tas-form", "heads"],
    "variants": [
        *("--method", "m2ot", "--tas-form", "map", "--tas-norm", "sum", "--dist-reduce", "sum"),
        *("--teacher-drop", "0.5", "--pi-balance", "0.1", "--switch-choices", "all"),
    ],
}


@pytest.mark.parametrize("row", ROWS)
def test_every_m2ot_row_trains_and_logs_its_parts(row, teachers, tmp_path):
    res = run(tmp_path, *ROWS[row], "--teachers", *teachers)
    last = log(tmp_path)[-1]
    routed = row in ("m2ot", "sparse-moe", "top1", "control-heads", "variants")
    want = KEYS if routed else KEYS - {"train_tas", "train_switch"}
    if row == "variants":
        want = want | {"train_pi_balance"}
    assert want <= {k for k, v in last.items() if v is not None}
    assert last["val_top1"] is None and 0 <= last["val_knn_top1"] <= 100  # no labels, no head
    assert all(math.isfinite(last[k]) for k in want)
    model = res["model"]
    assert model.moe_layers == (() if row == "dense" else (2, 4, 6))  # every second block
    if routed:  # h = H/K: K active experts hold the dense MLP's width
        assert model.blocks[1].mlp.w1.shape == (4, 96, 384 // (1 if row == "top1" else 2))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["model_args"]["num_classes"] == 0
    assert any(k.startswith("pi.") for k in ckpt["m2ot"]) == (routed and row != "control-heads")
    if row == "control-heads":  # the heads form's read-outs are saved, π (fixed) is not
        assert any(k.startswith("tas_heads.") for k in ckpt["m2ot"])


def test_eval_reads_the_experts_against_the_teachers(teachers, tmp_path, capsys):
    """eval.py --specialisation: per MoE layer the causal and representational expert ×
    teacher matrices, SI, DI and the null, and the distances; a table without --json."""
    import eval

    run(tmp_path, "--method", "m2ot", "--teachers", *teachers)
    flags = ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--specialisation"]
    res = eval.cli([*flags, "--json", "--watch-size", "16"])
    spec = res["specialisation"]
    for reading in ("causal", "representational"):
        assert len(spec[reading]) == 3  # MoE blocks 2, 4, 6
        for layer in spec[reading]:
            assert len(layer["matrix"]) == 4 and len(layer["matrix"][0]) == 2  # E × N_T
            assert layer["si"] is None or 0.5 <= layer["si"] <= 1
    assert [len(d) for d in spec["distances"]] == [3, 3, 3]  # A, B, their mean
    capsys.readouterr()
    eval.cli([*flags, "--watch-size", "16"])
    assert "experts × teachers" in capsys.readouterr().out

    dense = tmp_path / "dense"
    run(dense, "--method", "dense", "--epochs", "1")
    with pytest.raises(SystemExit):
        eval.cli(["--checkpoint", str(dense / "checkpoint.pt"), "--specialisation"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--specialisation: needs a checkpoint" in err[0]


def test_m2ot_resume_is_exact(teachers, tmp_path, monkeypatch):
    """Heads, π and the standardisation statistics continue exactly after a kill."""
    common = ["--method", "m2ot", "--teachers", *teachers, "--epochs", "3"]
    straight = run(tmp_path / "a", *common)
    saves, real_save = [], checkpoint.save_checkpoint

    def crash_after_one(path, state):
        real_save(path, state)
        saves.append(path.name)
        if saves.count("checkpoint.pt") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *common)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    resumed = run(tmp_path / "b", *common, "--resume", "auto")
    for part in ("model", "m2ot"):
        a, b = straight[part].state_dict(), resumed[part].state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert int(resumed["m2ot"].norm_patch[1].seen) == 3 * 4  # 3 epochs of 4 steps
    drop = ("images_per_s", "epoch_time_s", "eval_time_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(log(tmp_path / "a")) == strip(log(tmp_path / "b"))


def test_upcycle_starts_the_experts_from_a_dense_checkpoint(teachers, tmp_path, capsys):
    res = run(
        tmp_path / "up",
        *("--method", "m2ot", "--teachers", *teachers, "--upcycle", teachers[0]),
        *("--epochs", "1", "--lr", "0", "--min-lr", "0", "--warmup-lr", "0"),
    )  # lr 0: the weights stay as they started
    dense = torch.load(teachers[0], weights_only=True)["model"]
    mlp = res["model"].blocks[1].mlp  # h = 192 = H/2: experts take slices e mod 2
    torch.testing.assert_close(mlp.w1[1], dense["blocks.1.mlp.fc1.weight"][192:].t())
    torch.testing.assert_close(res["model"].pos_embed, dense["pos_embed"])
    moe_ckpt = str(tmp_path / "up" / "checkpoint.pt")
    with pytest.raises(SystemExit):
        train.cli([*TINY, "--method", "m2ot", "--teachers", *teachers, "--upcycle", moe_ckpt])
    assert "not a train.py --method dense checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "m2ot"], "--method m2ot needs --teachers"),
        (["--method", "vmoe", "--teachers", "T"], "the students are m2ot, dense and softmoe"),
        (["--method", "m2ot", "--teachers", "gone.pt"], "gone.pt: no such checkpoint"),
        (["--method", "m2ot", "--teachers", "T", "--tas-coef", "-1"], "must be >= 0"),
        (["--method", "m2ot", "--teachers", "T", "--pi-balance", "-1"], "must be >= 0"),
        (["--method", "m2ot", "--teachers", "T", "--teacher-drop", "1"], "must be in [0, 1)"),
    ],
)
def test_bad_m2ot_input_gives_one_line(flags, message, teachers, tmp_path, capsys):
    flags = [teachers[0] if f == "T" else f for f in flags]
    with pytest.raises(SystemExit) as exit_:
        train.cli([*TINY, "--output-dir", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()  # checked before anything is written


DDP_HELPER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import checkpoint
import train
result = train.main(train.get_args_parser().parse_args(sys.argv[1:]))
state = {{"model": result["model"].state_dict(), "m2ot": result["m2ot"].state_dict()}}
torch.save(state, os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


def test_ddp_averages_heads_and_pi_like_one_process(teachers, tmp_path):
    """Two ranks of 8 images equal one process of 16: student (DDP), heads and π (averaged by
    hand) and the targets' statistics (all-reduced). Switch's f·P is not linear in the batch,
    so it is off; no drops (cf 4), no noise, no augmentation."""
    common = [
        *("--method", "m2ot", "--teachers", *teachers, "--switch-coef", "0", "--aa", "none"),
        *("--reprob", "0", "--no-repeated-aug", "--no-crop-flip", "--drop-path", "0"),
        *("--noise-std", "0", "--capacity-factor", "4"),
    ]
    helper = tmp_path / "helper.py"
    helper.write_text(DDP_HELPER.format(root=ROOT, out=str(tmp_path)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, str(helper), *TINY, *common, "--batch-size", "8"]
    proc = subprocess.run(
        [*cmd, "--output-dir", str(tmp_path / "ddp")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = run(tmp_path / "one", *common, "--batch-size", "16")
    for part in ("model", "m2ot"):
        for key, value in single[part].state_dict().items():
            assert torch.equal(r0[part][key], r1[part][key]), key  # ranks stay identical
            torch.testing.assert_close(r0[part][key], value, rtol=1e-4, atol=1e-5)
