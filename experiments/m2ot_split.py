"""Do M²oT's experts split the teachers? A measure, a positive control and five variants.

The idea
--------
M²oT (*Agglomerative Vision Foundation Models via Sparse Mixture-of-Experts*) promises experts
that specialise per teacher. m2ot_measure.py reads that from the experts themselves (an
expert × teacher matrix, causal and representational; SI, DI and a permuted-teacher null);
this study asks it of every variant that might make the split happen, beside a positive
control that splits them by construction, and writes docs/m2ot_split.md:

    python experiments/m2ot_split.py                  # the toy, then the micro students (~1.5 h)
    python experiments/m2ot_split.py --part toy       # the one-layer toy alone (~10 min)
    python experiments/m2ot_split.py --report-only    # tables from the finished runs
    python experiments/m2ot_split.py --quick          # seconds: the plumbing (the tests)

Two parts:

* **The toy**: one MoE layer (m2ot's losses, moe.MoEMLP) of E ∈ {4, 8} experts, K ∈ {1, 2},
  on 1,024 tokens of width 16, distilled through a linear head per teacher into two teachers
  (independent random GELU networks of the tokens, standardised), full-batch Adam; 5 seeds.
  Every variant is an arm (`TOY_ARMS`).
* **Micro students**: train.py's `--method m2ot` on the micro ViT (E = 8, K = 2, MoE in blocks
  2, 4, 6), 3 epochs on the 40-class generated task, two teacher pairs: *trained*, a micro
  teacher (patch 4, that task) and a tiny one (patch 8, another task), and *twin*, the micro
  teacher and its random-weight twin; the arms of `STUDENT_ARMS`, 3 seeds. Each run is
  evaluated with `eval.py --specialisation --knn` and its linear probes.

"Specialised" (m2ot_measure.py): SI above the same seed's λ_1 = 0 arm and above the
permuted-teacher null's 95th percentile, and DI > 0.5; the tables count the seeds (and, for
the students, the MoE layers) where it holds.

Each run leaves `summary.json` in its folder and is never run again, so a killed study resumes
where it stopped (an unfinished run starts over). One run at a time in this process, with
`--threads` CPU threads.

Decisions where the papers are silent
-------------------------------------
* The paper's weighting (`paper`): L_dist summed over teachers and ‖·‖₁ summed over channels,
  as Eq. 2 and Eq. 8 write them, with λ_1 rescaled so that L_tas weighs against L_dist as the
  paper's λ_1 = 0.5 does at its scale (ViT-B, D = 768, seven teachers): on a mean-over-channels,
  mean-over-teachers scale that weight is 0.5 · 768 / 7 ≈ 55; here λ_1 = 55 · N_T / D.
* The variants of the toy are each added to one base: π balance to the MAP form (it acts on
  a sharp π; Eq. 8's π stays flat), teacher dropping and the Switch loss over all K to Eq. 8
  (the paper's loss).
* The toy's Switch loss and router noise are train.py's (σ/E, capacity factor 2 in training,
  none at measurement); its distance is Eq. 2's (1 − cos + smooth-L1) per token.
"""

import argparse
import json
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from tgr_claims import interval, write_doc  # noqa: E402

from m2ot import FixedTeacherRouter, TeacherAwareRouter, layer_tas  # noqa: E402
from m2ot_losses import (  # noqa: E402
    feature_distill_per_image,
    pi_balance_loss,
    switch_load_loss,
    teacher_drop_mask,
)
from m2ot_measure import (  # noqa: E402
    causal_matrix,
    expert_dropped,
    expert_samples,
    indices,
    permuted_null,
    representational_matrix,
)
from moe import MoEMLP  # noqa: E402

BEGIN = "<!-- m2ot_split tables: begin -->"
END = "<!-- m2ot_split tables: end -->"
PAPER_TAS_WEIGHT = 0.5 * 768 / 7  # λ_1 · D / N_T at the paper's ViT-B with seven teachers


# ----------------------------------------------------------------------------- the toy
RANK = 4  # each teacher: RANK nonlinear features of the tokens, written to D channels
TOY = dict(
    tokens=1024,
    dim=16,
    width=4,
    steps=400,
    lr=1e-2,
    seeds=5,
    configs=[(4, 1), (4, 2), (8, 1), (8, 2)],
)
TOY_QUICK = dict(TOY, tokens=256, steps=20, seeds=2, configs=[(4, 2)])
QUICK_ARMS = ["V0 (λ_1 0)", "Eq. 8", "control (fixed π)"]  # --quick: these arms, 2 seeds

# arm -> the toy's options: form, λ_1, π, and the variants (see the decisions)
TOY_ARMS = {
    "V0 (λ_1 0)": dict(form="mixture", tas_coef=0.0),
    "Eq. 8": dict(form="mixture"),
    "MAP": dict(form="map"),
    "control (fixed π)": dict(form="map", pi="fixed"),
    "heads": dict(form="heads"),
    "paper weighting": dict(form="mixture", paper=True),
    "MAP + π balance": dict(form="map", pi_balance=0.1),
    "Eq. 8 + teacher drop": dict(form="mixture", teacher_drop=0.5),
    "Eq. 8 + switch all K": dict(form="mixture", switch_choices="all"),
}


def toy_teachers(x, seed):
    """Two teachers: independent random GELU networks of the tokens, standardised per channel,
    (N_T, T, D)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    D = x.shape[1]
    out = []
    for _ in range(2):
        h = F.gelu(
            x @ torch.randn(D, RANK, generator=gen) / D**0.5 + torch.randn(RANK, generator=gen)
        )
        f = h @ torch.randn(RANK, D, generator=gen)  # (T, D)
        out.append((f - f.mean(0)) / f.std(0))
    return torch.stack(out)  # (2, T, D)


class ToyStudent(nn.Module):
    """One MoE layer z = MoE(x), a linear head g_i per teacher on z, and π (learned or fixed);
    the heads form adds a linear read-out per teacher of each expert's output."""

    def __init__(self, dim, width, experts, k, teachers, form, pi):
        super().__init__()
        self.moe = MoEMLP(dim, width, experts, k=k, capacity_factor=2.0, group_size=1)
        self.moe.keep_expert_outputs = True  # φ and the layer input, for L_tas and π
        self.heads = nn.ModuleList(nn.Linear(dim, dim) for _ in range(teachers))
        if pi == "fixed":  # the positive control: expert e on teacher e mod N_T
            self.pi = FixedTeacherRouter(experts, teachers)
        else:
            self.pi = TeacherAwareRouter(dim, experts, teachers)
        self.tas_heads = nn.ModuleList(
            nn.Linear(dim, dim) for _ in range(teachers if form == "heads" else 0)
        )

    def forward(self, x):
        z, routing = self.moe(x.unsqueeze(0))  # MoEMLP takes (B, N, D): one "image"
        return z[0], routing  # (T, D)

    def per_token_dist(self, z, targets):
        """Eq. 2's distance of every token to every teacher: (N_T, T)."""
        return torch.stack(
            [feature_distill_per_image(g(z), t) for g, t in zip(self.heads, targets)]
        )


def toy_loss(model, x, targets, arm):
    """Eq. 10 on the toy, with the arm's variant: L_dist + λ_1 L_tas + λ_2 L_switch (+ balance)."""
    z, r = model(x)
    per_token = model.per_token_dist(z, targets)  # (N_T, T)
    if arm.get("teacher_drop"):
        per_token = per_token * teacher_drop_mask(per_token.detach(), arm["teacher_drop"])
    per_teacher = per_token.mean(dim=1)  # (N_T,)
    paper = arm.get("paper", False)
    dist = per_teacher.sum() if paper else per_teacher.mean()

    # L_tas: its form and weight; λ_1 = 0 trains π (and the TAS heads) alone, on detached φ, p
    tas_coef = arm.get("tas_coef", 0.5)
    if paper:  # the paper's weight of L_tas against L_dist (see the decisions)
        tas_coef = PAPER_TAS_WEIGHT * len(targets) / x.shape[1]
    feats = list(targets) if arm["form"] == "heads" else targets
    heads = list(model.tas_heads) if arm["form"] == "heads" else None
    channels = "sum" if paper else "mean"
    tas = layer_tas(model.pi, r, feats, tas_coef == 0, arm["form"], channels, heads)
    loss = dist + (tas_coef or 1.0) * tas

    # L_switch on the first or all K choices; the π balance variant
    chosen = r.experts if arm.get("switch_choices") == "all" else r.experts[:, 0]
    loss = loss + 0.01 * switch_load_loss(r.probs, chosen)
    if arm.get("pi_balance"):
        loss = loss + arm["pi_balance"] * pi_balance_loss(model.pi(r.inputs.detach()))
    return loss, per_teacher


@torch.no_grad()
def toy_readings(model, x, targets):
    """m2ot_measure's two readings of the toy's experts, tokens as the samples, and each
    teacher's L_dist."""
    model.eval()
    unchanged = lambda per_sample: per_sample

    # causal: each teacher's rise, token by token, with expert e's assignments dropped
    base = model.per_token_dist(model(x)[0], targets)  # (N_T, T)
    rises = []  # E × (N_T, T)
    for e in range(model.moe.num_experts):
        with expert_dropped(model.moe, e):
            rises.append(model.per_token_dist(model(x)[0], targets) - base)
    causal_of = partial(causal_matrix, torch.stack(rises, dim=2))  # (N_T, T, E)

    # representational: linear CKA of each expert's outputs with each teacher on its tokens
    _, r = model(x)
    phis, tokens = expert_samples(r, model.moe.num_experts)  # E × (n_e, D), E × (n_e,)
    representational_of = partial(representational_matrix, phis, tokens, targets)
    return {
        "causal": indices(causal_of(unchanged), permuted_null(causal_of)),
        "representational": indices(
            representational_of(unchanged), permuted_null(representational_of)
        ),
        "dist": base.mean(dim=1).tolist(),
    }


def run_toy(arm_name, experts, k, seed, sizes):
    """One toy run -> its summary: per reading SI, DI, null, and each teacher's L_dist."""
    arm = TOY_ARMS[arm_name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sizes["tokens"], sizes["dim"], generator=gen) + 1.0  # not centred, as LN's
    targets = toy_teachers(x, seed)
    torch.manual_seed(seed)
    model = ToyStudent(
        sizes["dim"],
        sizes["width"],
        experts,
        k,
        len(targets),
        arm["form"],
        arm.get("pi", "learned"),
    )
    opt = torch.optim.Adam(model.parameters(), lr=sizes["lr"])
    for _ in range(sizes["steps"]):
        model.train()
        loss, _ = toy_loss(model, x, targets, arm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return toy_readings(model, x, targets)


# ----------------------------------------------------------------------------- micro students
RECIPE = (  # every run: the micro ViT on the 40-class generated task, minutes on a CPU
    "--img-size 32 --data synthetic --synthetic-train-size 2500 --synthetic-val-size 500 "
    "--batch-size 64 --lr 8e-3 --warmup-epochs 1 --drop-path 0 --print-freq 100000 "
    "--num-workers 0 --mixup 0 --cutmix 0 --aa none --reprob 0 --no-repeated-aug "
    "--no-model-ema --no-compile --device cpu"
).split()
QUICK_RECIPE = (
    "--synthetic-train-size 64 --synthetic-val-size 32 --batch-size 16 --watch-size 32".split()
)
TEACHERS = {  # name -> flags of a dense teacher, seed 0
    "A": "--model micro --patch-size 4 --nb-classes 40 --method dense --epochs 6".split(),
    "B": (
        "--model tiny --patch-size 8 --nb-classes 10 --synthetic-seed 1 --method dense --epochs 6"
    ).split(),
}
PAIRS = {"trained": ("A", "B"), "twin": ("A", "A-random")}  # the teacher pairs
STUDENT = (
    "--model micro --patch-size 4 --nb-classes 40 --method m2ot --epochs 3 "
    "--teacher-dtype fp32 --knn-every 0"
).split()
PAPER_WEIGHTING = [  # L_dist summed over the 2 teachers, ‖·‖₁ over D = 96 channels
    *("--dist-reduce", "sum", "--tas-norm", "sum"),
    *("--tas-coef", f"{PAPER_TAS_WEIGHT * 2 / 96:.3f}"),  # λ_1 · D / N_T = 55, as at ViT-B
]
STUDENT_ARMS = {
    "V0 (λ_1 0)": ["--tas-coef", "0"],
    "Eq. 8": [],
    "MAP": ["--tas-form", "map"],
    "control (fixed π)": ["--tas-pi", "fixed"],
    "heads": ["--tas-form", "heads"],
    "paper weighting": PAPER_WEIGHTING,
    "control, paper weighting": [*PAPER_WEIGHTING, "--tas-pi", "fixed"],
}
TRAINED_PAIR_ONLY = {"paper weighting", "control, paper weighting"}  # (time: the CPU's)
STUDENT_SEEDS = 3


def train_quietly(out, flags):
    """train.main on `flags` with its output in OUT/train.txt."""
    import contextlib

    import train

    out.mkdir(parents=True, exist_ok=True)
    args = train.get_args_parser().parse_args([*flags, "--output-dir", str(out)])
    with open(out / "train.txt", "w") as log, contextlib.redirect_stdout(log):
        train.main(args)


def teachers(root, recipe, quick):
    """The dense teachers (trained once) and A's random-weight twin: name -> checkpoint."""
    from moe import build_model

    paths = {}
    for name, flags in TEACHERS.items():
        out = root / "teachers" / name
        if not (out / "done").exists():
            shutil.rmtree(out, ignore_errors=True)
            epochs = ["--epochs", "1"] if quick else []
            train_quietly(out, [*recipe, *flags, *epochs])
            (out / "done").touch()
        paths[name] = out / "checkpoint.pt"

    # A's architecture with fresh weights (seed 101), in A's checkpoint format
    twin = root / "teachers" / "A-random" / "checkpoint.pt"
    if not twin.exists():
        ckpt = torch.load(paths["A"], map_location="cpu", weights_only=True)
        torch.manual_seed(101)
        ckpt["model"] = build_model(**ckpt["model_args"]).state_dict()
        twin.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, twin)
    paths["A-random"] = twin
    return paths


def evaluate_student(out, quick):
    """eval.py on a student: specialisation, and the linear probes (seg, depth)."""
    import eval

    flags = ["--checkpoint", str(out / "checkpoint.pt"), "--specialisation", "--device", "cpu"]
    flags += ["--seg-probe", "--depth-probe", "--probe-epochs", "1" if quick else "5"]
    return eval.main(eval.get_args_parser().parse_args(flags))


def summarise_student(out, res):
    """One student's numbers: the last epoch's log, eval's readings."""
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    spec = res["specialisation"]
    return {
        "dist": [last["train_dist_0"], last["train_dist_1"]],
        "tas": last.get("train_tas"),
        "knn": last.get("val_knn_top1"),
        "seg": res.get("seg_miou"),
        "depth": res.get("depth_rmse"),
        "causal": spec["causal"],
        "representational": spec["representational"],
        "distances": spec["distances"],
    }


# ----------------------------------------------------------------------------- running
def run_all(root, parts, threads, quick):
    """Every missing run of the parts asked for, seed-major; one line per run."""
    torch.set_num_threads(threads)
    if "toy" in parts:
        run_toys(root, quick)
    if "students" in parts:
        run_students(root, quick)


def run_toys(root, quick):
    """The toy's runs: seeds × (E, K) × arms."""
    sizes = TOY_QUICK if quick else TOY
    for seed in range(sizes["seeds"]):
        for experts, k in sizes["configs"]:
            for arm in QUICK_ARMS if quick else TOY_ARMS:
                out = root / "toy" / f"E{experts}-K{k}" / slug(arm) / f"seed{seed}"
                if (out / "summary.json").exists():
                    continue
                start = time.time()
                summary = run_toy(arm, experts, k, seed, sizes)
                out.mkdir(parents=True, exist_ok=True)
                (out / "summary.json").write_text(json.dumps(summary))
                si = summary["representational"]["si"]
                seconds = time.time() - start
                print(
                    f"toy E{experts} K{k} {arm} seed {seed}: SI {si}, {seconds:.0f} s", flush=True
                )


def run_students(root, quick):
    """The micro students' runs: seeds × teacher pairs × arms, each trained then evaluated."""
    recipe = [*RECIPE, *(QUICK_RECIPE if quick else [])]
    paths = teachers(root, recipe, quick)
    for seed in range(1 if quick else STUDENT_SEEDS):
        for pair, (a, b) in PAIRS.items():
            for arm, flags in STUDENT_ARMS.items():
                if quick and (pair != "trained" or arm not in QUICK_ARMS):
                    continue
                if pair != "trained" and arm in TRAINED_PAIR_ONLY:
                    continue
                out = root / "students" / pair / slug(arm) / f"seed{seed}"
                if (out / "summary.json").exists():
                    continue
                shutil.rmtree(out, ignore_errors=True)  # an unfinished run starts over
                start = time.time()
                run_flags = [*recipe, *STUDENT, "--teachers", str(paths[a]), str(paths[b])]
                run_flags += [*flags, "--seed", str(seed)]
                run_flags += ["--epochs", "1"] if quick else []
                train_quietly(out, run_flags)
                summary = summarise_student(out, evaluate_student(out, quick))
                (out / "summary.json").write_text(json.dumps(summary))
                si = [layer["si"] for layer in summary["representational"]]
                seconds = time.time() - start
                print(f"students {pair} {arm} seed {seed}: SI {si}, {seconds:.0f} s", flush=True)


def slug(arm):
    """An arm's folder name: "control (fixed π)" -> "control-fixed-pi"."""
    text = arm.replace("π", "pi").replace("λ_1", "lambda1").replace(".", "")
    return "-".join("".join(c if c.isalnum() else " " for c in text).split()).lower()


# ----------------------------------------------------------------------------- the tables
def collect(root, part):
    """{(group, arm): {seed: summary}} of the finished runs of a part; group = "E4-K2" (toy) or
    the teacher pair (students)."""
    runs = {}
    for path in sorted((root / part).glob("*/*/seed*/summary.json")):
        group, arm_slug, seed = path.parts[-4], path.parts[-3], int(path.parts[-2][4:])
        runs.setdefault((group, arm_slug), {})[seed] = json.loads(path.read_text())
    return runs


def runs_from_results(part):
    """One part of the results JSON ({"GROUP ARM": {"seed": summary}}) back into `collect`'s
    form, so the tables can be drawn from docs/m2ot_split.json alone (notebook 07)."""
    runs = {}
    for key, seeds in part.items():
        group, arm_slug = key.split(" ", 1)
        runs[(group, arm_slug)] = {int(seed): summary for seed, summary in seeds.items()}
    return runs


def is_specialised(reading, baseline):
    """m2ot_measure's verdict: SI above the λ_1 = 0 run's and the null's bar, DI > 0.5."""
    si, bar, di = reading["si"], reading["null_si_bar"], reading["di"]
    if None in (si, bar, di) or baseline["si"] is None:
        return False
    return si > baseline["si"] and si > bar and di > 0.5


def fmt(stat, digits=3):
    """ "m ± h (n)" of an `interval`; "–" when empty."""
    m, h, n = stat
    if m is None:
        return "–"
    return f"{m:.{digits}f}" + (f" ± {h:.{digits}f}" if h is not None else "") + f" ({n})"


def toy_table(runs, reading):
    """The toy's table for one reading: per (E, K) and arm, over seeds."""
    head = "| E, K | arm | SI | SI − V0 (paired) | null bar | DI | specialised | L_dist A, B |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    groups = sorted({g for g, _ in runs})
    for group in groups:
        base = runs.get((group, slug("V0 (λ_1 0)")), {})
        for arm in TOY_ARMS:
            seeds = runs.get((group, slug(arm)), {})
            if not seeds:
                continue
            r = {s: v[reading] for s, v in seeds.items()}
            si = interval([v["si"] for v in r.values()])
            diff = interval(
                [
                    r[s]["si"] - base[s][reading]["si"]
                    for s in r
                    if s in base and r[s]["si"] is not None and base[s][reading]["si"] is not None
                ]
            )
            bar = interval([v["null_si_bar"] for v in r.values()])[0]
            di = interval([v["di"] for v in r.values()])[0]
            hits = sum(is_specialised(r[s], base[s][reading]) for s in r if s in base)
            dist = [interval([v["dist"][i] for v in seeds.values()])[0] for i in range(2)]
            lines.append(
                f"| {group} | {arm} | {fmt(si)} | {fmt(diff)} | {bar:.3f} | {di:.2f} | "
                f"{hits}/{len(r)} | {dist[0]:.3f}, {dist[1]:.3f} |"
            )
    return "\n".join(lines)


def layer_mean(readings, key):
    values = [r[key] for r in readings if r[key] is not None]
    return sum(values) / len(values) if values else None


def student_table(runs):
    """The students' table: per teacher pair and arm, over seeds (SI: the mean over layers)."""
    distances = "\\|φ − T_A\\| / \\|φ − T_B\\| / \\|φ − mean\\|"  # escaped for markdown
    head = (
        "| pair | arm | SI (CKA) | SI − V0 (paired) | DI | specialised layers | SI (causal) | "
        f"L_dist A, B | k-NN | seg mIoU | depth RMSE | {distances} |"
    )
    lines = [head, "|---" * 12 + "|"]
    for pair in PAIRS:
        base = runs.get((pair, slug("V0 (λ_1 0)")), {})
        for arm in STUDENT_ARMS:
            seeds = runs.get((pair, slug(arm)), {})
            if seeds:
                lines.append(f"| {pair} | {arm} | " + " | ".join(student_cells(seeds, base)) + " |")
    return "\n".join(lines)


def student_cells(seeds, base):
    """One arm's cells of the students' table: seeds {seed: summary}, base the V0 arm's."""
    si = {s: layer_mean(v["representational"], "si") for s, v in seeds.items()}
    base_si = {s: layer_mean(v["representational"], "si") for s, v in base.items()}
    diff = interval([si[s] - base_si[s] for s in si if s in base_si])
    di = interval([layer_mean(v["representational"], "di") for v in seeds.values()])[0]

    # per layer and seed: specialised against the V0 student's same layer
    hits = 0
    layers = 0
    for s, v in seeds.items():
        if s in base:
            pairs = zip(v["representational"], base[s]["representational"])
            hits += sum(is_specialised(layer, b) for layer, b in pairs)
            layers += len(v["representational"])

    causal = interval([layer_mean(v["causal"], "si") for v in seeds.values()])
    dist = [interval([v["dist"][i] for v in seeds.values()])[0] for i in range(2)]
    over_seeds = {k: interval([v[k] for v in seeds.values()]) for k in ("knn", "seg", "depth")}
    # the experts' distances to A, B and their mean, each the mean over the layers
    gaps = [
        interval([sum(d[j] for d in v["distances"]) / len(v["distances"]) for v in seeds.values()])[
            0
        ]
        for j in range(3)
    ]
    return [
        fmt(interval(list(si.values()))),
        fmt(diff),
        f"{di:.2f}",
        f"{hits}/{layers}",
        fmt(causal),
        f"{dist[0]:.3f}, {dist[1]:.3f}",
        fmt(over_seeds["knn"], 1),
        fmt(over_seeds["seg"], 1),
        fmt(over_seeds["depth"]),
        f"{gaps[0]:.2f} / {gaps[1]:.2f} / {gaps[2]:.2f}",
    ]


def report(root):
    """The tables (markdown) and the results (JSON-ready) of the finished runs."""
    toy = collect(root, "toy")
    students = collect(root, "students")
    tables = []
    if toy:
        tables += [
            "### The toy, representational reading (linear CKA)",
            toy_table(toy, "representational"),
        ]
        tables += [
            "### The toy, causal reading (L_dist rise with the expert dropped)",
            toy_table(toy, "causal"),
        ]
    if students:
        tables += ["### Micro students", student_table(students)]
    results = {
        "toy": {f"{g} {a}": v for (g, a), v in toy.items()},
        "students": {f"{g} {a}": v for (g, a), v in students.items()},
    }
    return "\n\n".join(tables), results


# ----------------------------------------------------------------------------- command line
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", nargs="+", default=["toy", "students"], choices=["toy", "students"])
    p.add_argument("--out", default="runs/m2ot_split", help="the runs (cached: a study resumes)")
    p.add_argument("--doc", default="docs/m2ot_split.md", help="the doc whose tables are rewritten")
    p.add_argument("--results", default="docs/m2ot_split.json", help="the results JSON")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the one run at a time")
    p.add_argument("--report-only", action="store_true", help="tables from the finished runs")
    p.add_argument("--quick", action="store_true", help="seconds: the plumbing, 2 seeds")
    return p


def main(args):
    root = Path(args.out)
    if not args.report_only:
        run_all(root, args.part, args.threads, args.quick)
    tables, results = report(root)
    Path(args.results).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.results}")
    write_doc(Path(args.doc), tables, BEGIN, END)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
