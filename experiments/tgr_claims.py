"""What steadies a sparse router? TGR-MoE's claims measured with seeds and controls.

The idea
--------
TGR-MoE (arXiv 2604.21330) says a frozen dense teacher's *knowledge*, carried by a teacher
router and a stop-gradient KL, steadies the student's routing early in training and so helps
it learn. A single run cannot say that: a teacher also brings a confident target (the teacher
router is trained for low entropy), a balanced one, and simply a *fixed network* to anchor the
routing to. This study trains every arm that could explain the effect otherwise, over several
seeds, in three settings, and writes what it measured into docs/evidence.md:

    python experiments/tgr_claims.py                      # fast, then hard, then demo setting
    python experiments/tgr_claims.py --settings fast --seeds 10
    python experiments/tgr_claims.py --report-only        # tables from the finished runs
    python experiments/tgr_claims.py --quick              # seconds: the plumbing (the tests)
    python experiments/tgr_claims.py --runs RUN [RUN ...] # the same numbers for any train.py runs
                                                          # (e.g. ImageNet runs on GPUs)

Each run is `train.main` on generated images (no download), one run at a time in this process
with `--threads` CPU threads (two torch processes on two cores run far slower than half speed
each). A finished run leaves `summary.json` in its folder and is never trained again, so a
killed study resumes where it stopped (an unfinished run is started over). The runs go
seed-major (every arm of seed 0, then of seed 1, ...), so a study stopped early still compares
the arms on the same seeds.

The arms (`ARMS`; each is train.py flags)
-----------------------------------------
    vmoe              V-MoE: importance + load losses, noise σ/E, the baseline
    tgr               TGR, first half (--distill-until 0.5), the paper's best
    tgr-whole         TGR for the whole run (--distill-until 1.0)
    tgr-random        TGR with the teacher's architecture at random weights (--teacher-reinit)
    tgr-strong        TGR with a second, better-trained teacher
    tgr-strong-random its random-weight twin (another seed)
    tgr-final         TGR from the teacher's last layer (--teacher-layers final ...), paper 75.83
    tgr-cls           TGR with the KL on the CLS token only (--distill-tokens cls)
    tgr-group         the teacher router's balance loss per routing group (--teacher-balance group)
    tgr-balance       TGR whose student keeps V-MoE's balance losses (--student-balance-coef)
    vmoe-ent-0.01/0.1 V-MoE plus an entropy loss on the student's router, no teacher
    vmoe-ent-match    the same at the strength whose token entropy is nearest TGR's (per setting)
    vmoe-sigma1       V-MoE with the literal σ = 1.0 on the logits (--noise-std E: σ/E = 1)
    tgr-sigma1        TGR with the same
    stablemoe, zloss  the paper's other baselines
    lossfree          auxiliary-loss-free balancing (DeepSeek-V3's selection bias), no loss
    dense             the dense student (where routing is absent)

The measurements (`summarise`, per run; the doc gives mean and a 95% t-interval over seeds,
and differences paired by seed)
    top1, auc          last and mean validation top-1 (the area under the curve / epochs)
    early_loss         mean training task loss over the first quarter of the epochs (Fig. S2)
    adj, adj_2nd       adjacent-epoch consistency, epochs 1..end and the second half (Fig. 1)
    final_half         consistency with the final routing at the last epoch of the first half
    soft               1 − total variation between a token's distributions at adjacent epochs
    margin             adjacent consistency of tokens whose earlier top-2 logit gap is < 0.1,
                       0.1-0.5, 0.5-2, >= 2 (eval.MARGIN_BINS): confidence held apart
    entropy, gap       the routers' mean token entropy / log E, median top-2 logit gap (last)
    dropped            tokens dropped at the training capacity, mean over the epochs
    still_changing     StableMoE's last-fluctuation curve at 25% and 50% of the steps

Decisions where the papers are silent
-------------------------------------
* The 95% interval is mean ± t_{0.975, n−1} · s / √n (Student's t, a table below: no SciPy).
* The literal σ = 1.0 is `--noise-std E`: train.py adds σ/E, V-MoE's reading of "std 1.0".
* Random twins are re-initialised with seeds 101 (the teacher's) and 102 (the strong one's):
  fixed across student seeds, as the trained teachers are.
* The matched entropy strength (`entropy_match`) was read from one seed-0 run per coefficient
  (fast: 0.05 → 0.80, 0.06 → 0.73 against TGR's 0.76; hard: 0.04 → 0.62, 0.06 → 0.21 against
  0.36): the loss sharpens the router abruptly, so the match is approximate; the tables give
  each arm's entropy beside its consistency.
"""

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's modules
    sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (after the path entry above)
from eval import last_fluctuation  # noqa: E402

# ----------------------------------------------------------------------------- the settings
# Flags every run of a setting shares: a micro ViT on generated images, the DeiT recipe's
# augmentations off (minute-long runs), lr 8e-3 at DeiT's 512 = 1e-3 at our batch of 64.
RECIPE = [
    *("--model", "micro", "--img-size", "32", "--batch-size", "64"),
    *("--warmup-epochs", "1", "--lr", "8e-3", "--min-lr", "1e-4", "--drop-path", "0"),
    *("--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--smoothing", "0"),
    *("--no-repeated-aug", "--no-model-ema", "--no-compile", "--num-workers", "0"),
    *("--print-freq", "100000", "--device", "cpu"),
]

SETTINGS = {
    # notebook 04's configuration: 17 tokens per image, 10 steps per epoch
    "fast": dict(
        flags=[
            *("--patch-size", "8", "--experts", "8", "--nb-classes", "10"),
            *("--synthetic-train-size", "640", "--synthetic-val-size", "256"),
            *("--watch-size", "256", "--watch-every", "5"),
        ],
        epochs=12,
        teachers={"teacher": 8, "strong": 24},  # dense epochs: two strengths
        entropy_match=0.055,  # --student-entropy-coef of vmoe-ent-match
        seeds=10,
        arms="all",
    ),
    # more classes, fewer images per class, more experts: where routing has more to decide
    "hard": dict(
        flags=[
            *("--patch-size", "8", "--experts", "16", "--nb-classes", "100"),
            *("--synthetic-train-size", "2000", "--synthetic-val-size", "500"),
            *("--watch-size", "256", "--watch-every", "10"),
        ],
        epochs=15,
        teachers={"teacher": 15},
        entropy_match=0.05,
        seeds=5,
        arms=["dense", "vmoe", "tgr", "tgr-random", "vmoe-ent-0.1", "vmoe-ent-match"],
    ),
    # make demo's scale: 65 tokens per image, 40 classes, 39 steps per epoch
    "demo": dict(
        flags=[
            *("--patch-size", "4", "--experts", "8", "--nb-classes", "40"),
            *("--synthetic-train-size", "2500", "--synthetic-val-size", "500"),
            *("--watch-size", "256", "--watch-every", "13"),
        ],
        epochs=10,
        teachers={"teacher": 6},
        entropy_match=0.04,
        seeds=5,
        arms=["vmoe", "tgr", "tgr-random", "vmoe-ent-0.1", "vmoe-ent-match"],
    ),
}
QUICK = dict(  # --quick: every setting shrunk to seconds, two seeds, a few arms
    flags=[
        *("--synthetic-train-size", "128", "--synthetic-val-size", "64"),
        *("--watch-size", "32", "--watch-every", "1"),
    ],
    epochs=2,
    teacher_epochs=1,
    seeds=2,
    arms=["vmoe", "tgr", "tgr-random", "vmoe-ent-match", "lossfree"],
)
REINIT = {"teacher": 101, "strong": 102}  # the random twins' seeds


def arm_flags(arm, setting, teachers):
    """train.py flags of one arm; `teachers`: name -> checkpoint path of the setting's teachers."""
    experts = setting_value(setting, "--experts")
    entropy_match = setting["entropy_match"]
    tgr = ["--method", "tgr", "--teacher", str(teachers["teacher"])]
    arms = {
        "dense": ["--method", "dense"],
        "vmoe": ["--method", "vmoe"],
        "tgr": tgr,
        "tgr-whole": [*tgr, "--distill-until", "1.0"],
        "tgr-random": [*tgr, "--teacher-reinit", str(REINIT["teacher"])],
        "tgr-final": [*tgr, "--teacher-layers", "final", "final"],
        "tgr-cls": [*tgr, "--distill-tokens", "cls"],
        "tgr-group": [*tgr, "--teacher-balance", "group"],
        "tgr-balance": [*tgr, "--student-balance-coef", "0.005"],
        "vmoe-ent-0.01": ["--method", "vmoe", "--student-entropy-coef", "0.01"],
        "vmoe-ent-0.1": ["--method", "vmoe", "--student-entropy-coef", "0.1"],
        "vmoe-ent-match": ["--method", "vmoe", "--student-entropy-coef", str(entropy_match)],
        "vmoe-sigma1": ["--method", "vmoe", "--noise-std", experts],
        "tgr-sigma1": [*tgr, "--noise-std", experts],
        "stablemoe": ["--method", "stablemoe"],
        "zloss": ["--method", "zloss"],
        "lossfree": ["--method", "lossfree"],
    }
    if "strong" in teachers:
        strong = ["--method", "tgr", "--teacher", str(teachers["strong"])]
        arms["tgr-strong"] = strong
        arms["tgr-strong-random"] = [*strong, "--teacher-reinit", str(REINIT["strong"])]
    return arms[arm]


ALL_ARMS = [
    "vmoe",
    "tgr",
    "tgr-random",
    "vmoe-ent-0.1",
    "vmoe-ent-0.01",
    "vmoe-ent-match",
    "tgr-whole",
    "tgr-final",
    "tgr-strong",
    "tgr-strong-random",
    "tgr-cls",
    "tgr-group",
    "tgr-balance",
    "vmoe-sigma1",
    "tgr-sigma1",
    "stablemoe",
    "zloss",
    "lossfree",
    "dense",
]


def setting_value(setting, flag):
    flags = setting["flags"]
    return flags[flags.index(flag) + 1]


def arms_of(setting):
    return ALL_ARMS if setting["arms"] == "all" else setting["arms"]


# ----------------------------------------------------------------------------- running
def train_quietly(out, flags, threads):
    """train.main on `flags` with its output in OUT/train.txt; returns the wall time (s)."""
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    args = train.get_args_parser().parse_args([*flags, "--output-dir", str(out)])
    start = time.time()
    with open(out / "train.txt", "w") as log, contextlib.redirect_stdout(log):
        train.main(args)
    return time.time() - start


def train_teachers(name, setting, root, threads):
    """The setting's dense teachers (seed 0), trained once: name -> checkpoint path."""
    paths = {}
    for teacher, epochs in setting["teachers"].items():
        out = root / name / teacher
        if not (out / "summary.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            flags = [*RECIPE, *setting["flags"], "--method", "dense", "--epochs", str(epochs)]
            seconds = train_quietly(out, flags, threads)
            top1 = read_log(out)[-1]["val_top1"]
            (out / "summary.json").write_text(json.dumps({"top1": top1, "seconds": seconds}))
        paths[teacher] = out / "checkpoint.pt"
    return paths


def run_study(names, root, threads, seeds=None, quick=False):
    """Train every missing run of the settings `names`, seed-major; print one line per run."""
    for name in names:
        setting = dict(SETTINGS[name])
        if quick:
            setting["flags"] = [*setting["flags"], *QUICK["flags"]]
            setting["epochs"] = QUICK["epochs"]
            setting["teachers"] = {t: QUICK["teacher_epochs"] for t in setting["teachers"]}
            setting["arms"] = [a for a in QUICK["arms"] if a in arms_of(setting)]
        teachers = train_teachers(name, setting, root, threads)
        for seed in range(seeds or (QUICK["seeds"] if quick else setting["seeds"])):
            for arm in arms_of(setting):
                out = root / name / arm / f"seed{seed}"
                if (out / "summary.json").exists():
                    continue
                shutil.rmtree(out, ignore_errors=True)  # an unfinished run starts over
                flags = [*RECIPE, *setting["flags"], *arm_flags(arm, setting, teachers)]
                flags += ["--epochs", str(setting["epochs"]), "--seed", str(seed)]
                seconds = train_quietly(out, flags, threads)
                summary = {**summarise(out), "seconds": seconds}
                (out / "summary.json").write_text(json.dumps(summary))
                line = f"{name} {arm} seed {seed}: top-1 {summary['top1']:.1f}, {seconds:.0f} s"
                print(line, flush=True)  # a study runs for hours in the background


# ----------------------------------------------------------------------------- one run's numbers
def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(out):
    """One run's measurements (see the module docstring), from the files train.py wrote."""
    log = read_log(out)
    epochs = len(log)
    s = {
        "top1": log[-1]["val_top1"],
        "auc": mean([r["val_top1"] for r in log]),
        "early_loss": mean([r["train_task"] for r in log[: max(1, epochs // 4)]]),
        "top1_curve": [r["val_top1"] for r in log],
    }
    if not log[-1]["moe_layers"]:  # dense: no routing to measure
        return s
    layer_mean = lambda r, key: mean(r[key]) if r.get(key) else None
    later = log[1:]  # epoch 0 compares with the random initial routing: left out
    half = math.ceil(epochs / 2)
    s["adj_curve"] = [layer_mean(r, "consistency_prev") for r in log]
    s["adj"] = mean([layer_mean(r, "consistency_prev") for r in later])
    s["adj_2nd"] = mean([layer_mean(r, "consistency_prev") for r in log[half:]])
    s["soft"] = mean([layer_mean(r, "consistency_soft_prev") for r in later])
    # consistency within each margin bin, pooled over layers and epochs 1..end
    bins = [r["consistency_by_margin_prev"] for r in later]
    s["margin"] = [
        mean([layer[b][0] for epoch in bins for layer in epoch]) for b in range(len(bins[0][0]))
    ]
    s["margin_share"] = [
        mean([layer[b][1] for epoch in bins for layer in epoch]) for b in range(len(bins[0][0]))
    ]
    # consistency with the final routing, per epoch (train.py's consistency_final.json)
    final = json.loads((out / "consistency_final.json").read_text())
    s["final_curve"] = [mean(layers) for layers in final]
    s["final_half"] = s["final_curve"][half - 1]
    s["entropy"] = layer_mean(log[-1], "probe_token_entropy")
    s["gap"] = layer_mean(log[-1], "probe_gap_median")
    s["dropped"] = mean([r.get("train_dropped") for r in log])
    s["agreement"] = mean([r.get("train_teacher_agreement") for r in log if r["distilling"]])
    steps = out / "probe_steps.pt"
    history = torch.load(steps, weights_only=True) if steps.exists() else {}
    if len(history) > 1:  # StableMoE's last-fluctuation curve, averaged over the MoE layers
        order = sorted(history)
        per_layer = zip(*(history[step] for step in order))
        curves = [last_fluctuation(list(checks)) for checks in per_layer]
        curve = [mean(values) for values in zip(*curves)]
        s["fluct_steps"], s["fluct_curve"] = order, curve
        at = lambda f: curve[min(len(curve) - 1, int(f * len(curve)))]
        s["still_changing_25"], s["still_changing_50"] = at(0.25), at(0.5)
    return s


# ----------------------------------------------------------------------------- statistics
# t_{0.975, df} for df = 1..30; beyond that the normal 1.96 is within 2%
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


def interval(xs):
    """(mean, half-width of the 95% t-interval, n) of a list of numbers (None left out)."""
    xs = [x for x in xs if x is not None]
    n = len(xs)
    if n == 0:
        return None, None, 0
    m = sum(xs) / n
    if n == 1:
        return m, None, 1
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return m, t * sd / math.sqrt(n), n


def collect(root):
    """{setting: {arm: {seed: summary}}} from every finished run under `root`."""
    found = {}
    for path in sorted(root.glob("*/*/seed*/summary.json")):
        setting, arm, seed = path.parts[-4], path.parts[-3], int(path.parts[-2][4:])
        found.setdefault(setting, {}).setdefault(arm, {})[seed] = json.loads(path.read_text())
    return found


def paired(runs, arm, base, key):
    """(mean, 95% half-width, n) of arm − base over the seeds both have (paired by seed)."""
    a, b = runs.get(arm, {}), runs.get(base, {})
    both = [s for s in a if s in b and None not in (a[s].get(key), b[s].get(key))]
    return interval([a[s][key] - b[s][key] for s in both])


# ----------------------------------------------------------------------------- the report
def fmt(m, h, scale=1.0, digits=3):
    if m is None:
        return "–"
    text = f"{m * scale:.{digits}f}"
    return text + (f" ± {h * scale:.{digits}f}" if h is not None else "")


COLUMNS = [  # (key, header, scale, digits)
    ("top1", "top-1 %", 1, 1),
    ("auc", "mean top-1 over epochs", 1, 1),
    ("early_loss", "early train loss", 1, 3),
    ("adj", "adjacent consistency", 1, 3),
    ("adj_2nd", "adjacent, 2nd half", 1, 3),
    ("final_half", "consistency with final at half", 1, 3),
    ("soft", "soft consistency (1 − TV)", 1, 3),
    ("entropy", "token entropy / log E", 1, 2),
    ("gap", "median top-2 gap", 1, 2),
    ("dropped", "dropped at train cf", 100, 1),
    ("still_changing_50", "still changing after 50% of steps", 1, 3),
]
DIFFS = [  # (arm, base): paired differences the verdicts read
    ("tgr", "vmoe"),
    ("tgr-random", "vmoe"),
    ("tgr", "tgr-random"),
    ("vmoe-ent-0.1", "vmoe"),
    ("tgr", "vmoe-ent-0.1"),
    ("vmoe-ent-match", "vmoe"),
    ("tgr", "vmoe-ent-match"),
    ("tgr-whole", "tgr"),
    ("tgr-final", "tgr"),
    ("tgr-strong", "tgr-strong-random"),
    ("tgr-strong", "tgr"),
    ("tgr-group", "tgr"),
    ("tgr-balance", "tgr"),
    ("tgr-cls", "tgr"),
    ("stablemoe", "vmoe"),
    ("lossfree", "vmoe"),
    ("vmoe-sigma1", "vmoe"),
    ("tgr-sigma1", "tgr"),
    ("tgr", "dense"),
    ("vmoe", "dense"),
]
DIFF_KEYS = ["top1", "auc", "early_loss", "adj", "final_half", "soft", "dropped"]
DIFF_FORMAT = {"top1": (1, 1), "auc": (1, 1), "dropped": (100, 1)}  # (scale, digits); else (1, 3)


def report(root, names):
    """Markdown tables of every setting found under `root`, and the results JSON."""
    found = collect(root)
    lines, results = [], {}
    for name in names:
        runs = found.get(name)
        if not runs:
            continue
        order = [a for a in ALL_ARMS if a in runs]
        teachers = {
            t: json.loads((root / name / t / "summary.json").read_text())["top1"]
            for t in SETTINGS[name]["teachers"]
            if (root / name / t / "summary.json").exists()
        }
        seconds = sum(s["seconds"] for arm in runs.values() for s in arm.values())
        seeds = sorted({s for arm in runs.values() for s in arm})
        lines += [f"### Setting `{name}`", ""]
        strengths = ", ".join(f"{t} {v:.1f}%" for t, v in teachers.items())
        lines += [
            f"Teachers (dense, val top-1): {strengths}. "
            f"Seeds {seeds[0]}–{seeds[-1]}; {sum(len(a) for a in runs.values())} runs, "
            f"{seconds / 60:.0f} min of training on this CPU. Mean ± 95% interval over seeds.",
            "",
        ]
        header = ["arm", "n", *[c[1] for c in COLUMNS]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        results[name] = {"teachers": teachers, "arms": {}, "diffs": {}}
        for arm in order:
            cells = [arm, str(len(runs[arm]))]
            stats = {}
            for key, _, scale, digits in COLUMNS:
                m, h, n = interval([s.get(key) for s in runs[arm].values()])
                stats[key] = dict(mean=m, ci95=h, n=n)
                cells.append(fmt(m, h, scale, digits))
            results[name]["arms"][arm] = stats
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Paired by seed (arm − base), mean ± 95% interval:", ""]
        header = ["arm − base", "n", *DIFF_KEYS]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for arm, base in DIFFS:
            if arm not in runs or base not in runs:
                continue
            cells, stats, n = [f"{arm} − {base}"], {}, 0
            for key in DIFF_KEYS:
                m, h, n_key = paired(runs, arm, base, key)
                n = max(n, n_key)
                stats[key] = dict(mean=m, ci95=h, n=n_key)
                scale, digits = DIFF_FORMAT.get(key, (1, 3))  # top-1 in points, drops in %
                cells.append(fmt(m, h, scale, digits))
            results[name]["diffs"][f"{arm} - {base}"] = stats
            lines.append("| " + " | ".join([cells[0], str(n), *cells[1:]]) + " |")
        lines += ["", margin_table(runs, order), ""]
        results[name]["curves"] = curves(runs, order)
    return "\n".join(lines), results


def margin_table(runs, order):
    """Adjacent-epoch consistency within bins of the earlier check's top-2 logit gap."""
    edges = ["< 0.1", "0.1–0.5", "0.5–2", "≥ 2"]
    lines = [
        "Adjacent consistency by the earlier epoch's top-2 logit gap (share of tokens in the bin):",
        "",
        "| arm | " + " | ".join(edges) + " |",
        "|---|" + "---|" * len(edges),
    ]
    for arm in order:
        summaries = [s for s in runs[arm].values() if s.get("margin")]
        if not summaries:
            continue
        cells = []
        for b in range(len(edges)):
            c = mean([s["margin"][b] for s in summaries])
            share = mean([s["margin_share"][b] for s in summaries])
            cells.append("–" if c is None else f"{c:.3f} ({100 * share:.0f}%)")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(runs, order):
    """Per arm, the seed-mean of each per-epoch (or per-check) curve, for the figures."""
    out = {}
    for arm in order:
        per_seed = list(runs[arm].values())
        out[arm] = {}
        for key in ("top1_curve", "adj_curve", "final_curve", "fluct_curve"):
            rows = [s[key] for s in per_seed if s.get(key)]
            if rows:
                out[arm][key] = [mean(col) for col in zip(*rows)]
    return out


def plot(results, path):
    """One row of four panels per setting: top-1, adjacent consistency, consistency with the
    final routing, and the last-fluctuation curve; matplotlib is optional (a dev package)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return
    shown = ["vmoe", "tgr", "tgr-random", "vmoe-ent-0.1", "vmoe-ent-match", "tgr-whole", "lossfree"]
    names = list(results)
    fig, axes = plt.subplots(len(names), 4, figsize=(16, 3.2 * len(names)), squeeze=False)
    titles = {
        "top1_curve": "validation top-1 (%)",
        "adj_curve": "adjacent-epoch consistency",
        "final_curve": "consistency with the final routing",
        "fluct_curve": "share of tokens still changing expert",
    }
    for row, name in zip(axes, names):
        for ax, (key, title) in zip(row, titles.items()):
            for arm in shown:
                values = results[name]["curves"].get(arm, {}).get(key)
                if values:
                    color = f"C{shown.index(arm)}"  # one colour per arm in every row
                    ax.plot(range(len(values)), values, label=arm, color=color)
            xlabel = "watch check (every --watch-every steps)" if key == "fluct_curve" else "epoch"
            ax.set(title=f"{name}: {title}", xlabel=xlabel)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"wrote {path}")


BEGIN, END = "<!-- tables: begin (experiments/tgr_claims.py) -->", "<!-- tables: end -->"


def write_doc(doc, tables, begin=BEGIN, end=END):
    """Put the tables between the doc's markers `begin` and `end` (the text around them is
    written by hand)."""
    text = doc.read_text() if doc.exists() else f"# Evidence\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    doc.write_text(f"{head}{begin}\n\n{tables}\n\n{end}{tail}")
    print(f"wrote {doc}")


# ----------------------------------------------------------------------------- command line
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=["fast", "hard", "demo"], choices=SETTINGS)
    p.add_argument("--seeds", type=int, help="seeds per arm (default: each setting's own)")
    p.add_argument("--out", default="runs/evidence", help="the runs (cached: a study resumes)")
    p.add_argument("--doc", default="docs/evidence.md", help="the doc whose tables are rewritten")
    p.add_argument("--results", default="docs/evidence.json", help="the results JSON")
    p.add_argument("--figure", default="docs/evidence.png", help="the curves ('' for none)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the one run at a time")
    p.add_argument("--report-only", action="store_true", help="tables from the finished runs")
    p.add_argument("--quick", action="store_true", help="seconds: a few arms, 2 seeds, 2 epochs")
    p.add_argument("--runs", nargs="+", help="only print the measurements of these run folders")
    return p


def print_runs(folders):
    """`--runs`: one line of measurements per train.py run folder (finished or not)."""
    keys = ["top1", "auc", "early_loss", "adj", "adj_2nd", "final_half", "soft", "entropy"]
    keys += ["dropped", "still_changing_50"]
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for folder in folders:
        s = summarise(Path(folder))
        cells = ["–" if s.get(k) is None else f"{s[k]:.3f}" for k in keys]
        print(f"| {folder} | " + " | ".join(cells) + " |")


def main(args):
    if args.runs:
        return print_runs(args.runs)
    root = Path(args.out)
    if not args.report_only:
        run_study(args.settings, root, args.threads, args.seeds, args.quick)
    tables, results = report(root, args.settings)
    Path(args.results).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.results}")
    write_doc(Path(args.doc), tables)
    if args.figure:
        plot(results, args.figure)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
