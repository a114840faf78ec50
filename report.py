"""What a person reads: eval.py's table and figures, and train.py's lines.

The idea
--------
`eval.main` returns one dict of numbers (what `--json` prints). This file turns it into
what a reader looks at: `fmt_table`, a Markdown table per MoE layer (routing entropy, dropped
fraction, the busiest expert's share × E, teacher agreement, consistency with another
checkpoint), and with `--plots DIR` three figures:

    utilisation.png          one bar chart per MoE layer: the share of tokens whose top-1 is e
    curves.png               the run's log.jsonl: top-1, routing entropy, adjacent-epoch
                             consistency, the distillation KL; distilling epochs shaded
    expert_maps.png          every patch coloured by its top-1 expert, student beside teacher

(an M²oT run adds its own table and figure, m2ot.py's `preference_table` and
`plot_teacher_preference`).

train.py prints its parameter count once (`describe_params`: total, active per token, and what
trains beside the student only while it is taught) and one line per epoch (`epoch_line`).
`for_display` and `patch_map` turn normalised images and top-1 experts into pictures.

Decisions
---------
* matplotlib is optional (not in requirements.txt): `--plots` without it is one error line,
  raised before any model runs (`require_matplotlib`).
* Every figure is figsize × `DPI` pixels, no tight bounding box: sizes are known, so a figure
  reruns to the same picture.
* Expert colours come from a qualitative map (tab10, tab20; hues spread beyond 20 experts).
* The epoch line shows a score with two decimals (0.00 is a score) and "-" where the epoch
  computed none (the k-NN top-1 between `--knn-every` epochs): never `nan` for either.
"""

import datetime

import torch

from augment import MEAN, STD
from errors import UsageError
from moe import moe_num_params


# ----------------------------------------------------------------------------- the table
def fmt_table(res):
    """The readable form of `eval.main`'s result (what is printed without --json)."""
    # the checkpoint, the data, the scores
    head = f"{res['checkpoint']}: {res['model']} {res['method']}, epoch {res['epoch']}; "
    head += f"{res['data']} val, {res['images']} images" if "images" in res else res["data"]
    lines = [head + (f"; route: {res['route']}" if res.get("route") else "")]
    names = {"top1": "top-1", "top5": "top-5", "knn_top1": "k-NN top-1"}
    names.update(seg_miou="seg mIoU", depth_rmse="depth RMSE")  # probe.py's linear probes
    scores = [
        f"{name} {res[key]:.{3 if 'rmse' in key else 2}f}"
        for key, name in names.items()
        if key in res
    ]
    lines.append("   ".join(scores) or "no classifier: no top-1 (--knn: the k-NN top-1)")
    lines += [f"wrote {path}" for path in res.get("plots", [])]  # --plots: where they are
    if not res["moe_layers"] or "utilisation" not in res:  # dense, or the probes alone
        return "\n".join(lines + [res.get("note", "")]).rstrip()

    # one row per MoE layer, one column per measure the result has
    cols = {
        "routing entropy": res["routing_entropy"],
        "dropped": res["dropped_frac"],
        "busiest expert ×E": [max(u) * len(u) for u in res["utilisation"]],
        "teacher agreement": res.get("teacher_agreement"),
        f"consistency vs {res.get('compare')}": res.get("consistency"),
    }
    cols = {k: v for k, v in cols.items() if v is not None}
    lines += ["", "| MoE block | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    cell = lambda x: "/".join(map(str, x)) if isinstance(x, list) else f"{x:.3f}"
    for i, block in enumerate(res["moe_layers"]):
        lines.append(f"| {block} | " + " | ".join(cell(v[i]) for v in cols.values()) + " |")

    # each layer's utilisation
    for block, u in zip(res["moe_layers"], res["utilisation"]):
        lines.append(f"utilisation, block {block}: " + " ".join(f"{x:.3f}" for x in u))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- train.py's lines
def describe_params(model, routers=None):
    """The start line's parameter count: the student's (total, and active per token for a
    MoE: K of the E experts), and the teacher router, which trains beside it only while it
    is taught (a hook adds its own part: m2ot_hook.py)."""
    total, active = (n / 1e6 for n in moe_num_params(model))
    text = f"{total:.2f}M params" + (f" ({active:.2f}M active)" if model.moe_layers else "")
    if routers is not None:  # TGR Table S2's "+ router"
        router = sum(p.numel() for p in routers.parameters()) / 1e6
        text += f" + {router:.3f}M teacher router"
    return text


def progress_line(epoch, done, batches, sums, lr, seen, elapsed):
    """A progress line within an epoch: each logged part's mean over the `done` batches so
    far (this reads the device sums: the step's one host sync), images/s, the epoch's ETA."""
    eta = datetime.timedelta(seconds=round(elapsed * (batches / done - 1)))
    shown = " ".join(f"{k} {float(v) / done:.4f}" for k, v in sums.items())
    return (
        f"epoch {epoch} [{done}/{batches}] {shown} lr {lr:.2e} {seen / elapsed:.0f} img/s eta {eta}"
    )


def epoch_line(epoch, record, consistency):
    """The epoch's printed line. A score is shown as computed (0.00 is a score), "-" where
    this epoch computed none (the k-NN top-1 of an epoch between --knn-every). A model
    without a classifier (no top-1) shows its k-NN top-1."""
    labelled = record.get("val_top1") is not None
    name, key = ("val top-1", "val_top1") if labelled else ("val k-NN top-1", "val_knn_top1")
    score = "-" if record.get(key) is None else f"{record[key]:.2f}"
    line = f"epoch {epoch}: {name} {score}"
    if not record.get("routing_entropy"):  # dense: no routing to show
        return line
    entropy = [round(e, 3) for e in record["routing_entropy"]]
    return f"{line}  routing entropy {entropy}  consistency {[round(c, 3) for c in consistency]}"


# ----------------------------------------------------------------------------- pictures
DPI = 100  # every figure is figsize × DPI pixels (no tight bounding box: sizes are known)


def for_display(images):
    """(B, 3, S, S) images normalised as data.py does -> (B, S, S, 3) in [0, 1] for imshow."""
    mean = torch.tensor(MEAN)[:, None, None]  # (3, 1, 1)
    std = torch.tensor(STD)[:, None, None]  # (3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def patch_map(top1, grid):
    """Top-1 experts of B images' tokens, (B·N,) or (B, N) with CLS first -> (B, grid, grid)."""
    return top1.reshape(-1, grid * grid + 1)[:, 1:].reshape(-1, grid, grid)  # CLS dropped


def require_matplotlib():
    """matplotlib.pyplot on a file-only backend, or one UsageError line: it is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # write files, open no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plots needs matplotlib (optional): pip install matplotlib") from None
    return plt


def expert_colours(plt, E):
    """A qualitative colour map with one colour per expert (hues spread when E > 20)."""
    from matplotlib.colors import ListedColormap

    base = plt.get_cmap("tab10" if E <= 10 else "tab20" if E <= 20 else "hsv")
    return ListedColormap([base(i if E <= 20 else i / E) for i in range(E)])


def plot_utilisation(plt, res):
    """utilisation.png: one bar chart per MoE layer, the share of tokens whose top-1 is e."""
    layers = res["moe_layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3), squeeze=False)
    for ax, block, u, h in zip(axes[0], layers, res["utilisation"], res["routing_entropy"]):
        ax.bar(range(len(u)), u)
        ax.axhline(1 / len(u), color="k", ls="--", lw=1)  # named in the title: no legend on a bar
        ax.set_title(f"block {block}: entropy {h:.3f}\n(dashed: balanced, 1/E)", fontsize=10)
        ax.set(xlabel="expert", ylabel="utilisation")
    fig.tight_layout()
    return fig


def plot_curves(plt, res, history):
    """curves.png: the run's log.jsonl, one point per epoch; shaded: epochs that distilled."""
    layers = res["moe_layers"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax in axes.flat:  # sharex hides the top row's epoch numbers: show them on every panel
        ax.tick_params(labelbottom=True)

    # four panels: (title, one series per line, the lines' names)
    epochs = [r["epoch"] for r in history]
    per_layer = lambda key: zip(*[r[key] or [] for r in history])
    blocks = [f"block {b}" for b in layers]
    panels = [
        (
            "val top-1 (%)",
            [[r.get(k) for r in history] for k in ("val_top1", "val_knn_top1")],
            ["classifier", "k-NN (CLS embedding)"],
        ),
        ("routing entropy H(u)/log E", per_layer("routing_entropy"), blocks),
        ("adjacent-epoch consistency", per_layer("consistency_prev"), blocks),
        (
            "distillation KL (train mean, Σ layers)",
            [[r.get("train_distill") for r in history]],
            [None],
        ),
    ]

    # each panel: its lines, the distilling epochs shaded, a note where nothing was logged
    for ax, (title, series, names) in zip(axes.flat, panels):
        for name, ys in zip(names, series):
            xy = [(x, y) for x, y in zip(epochs, ys) if y is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=name)
        for e in (r["epoch"] for r in history if r["distilling"]):
            ax.axvspan(e - 0.5, e + 0.5, color="tab:orange", alpha=0.12, lw=0)
        if not ax.lines:
            ax.text(
                0.5,
                0.5,
                "dense: no routing" if not layers else "not logged: no teacher",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.set(title=title, xlabel="epoch")
        if len(ax.lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{res['model']} {res['method']} (shaded: distilling epochs)")
    fig.tight_layout()
    return fig


def plot_expert_maps(plt, res, images, maps):
    """expert_maps.png: each patch coloured by its top-1 expert; student next to teacher."""
    pics = for_display(images)  # (B, S, S, 3)

    # one column for the images, then student (and teacher) per MoE layer
    columns = [("image", None)]
    for block, (s, t) in zip(res["moe_layers"], maps):
        columns += [(f"block {block}: student", s)] + (
            [(f"block {block}: teacher", t)] * (t is not None)
        )
    rows = len(pics)  # B
    E = res["num_experts"]
    S = pics.shape[1]

    # one row per image
    fig, axes = plt.subplots(
        rows, len(columns), figsize=(2 * len(columns), 2 * rows), squeeze=False
    )
    cmap = expert_colours(plt, E)
    for r, pic in enumerate(pics):
        for c, (title, m) in enumerate(columns):
            ax = axes[r, c]
            if m is None:  # the image itself
                ax.imshow(pic.numpy())
            else:  # the image in grey (shapes stay visible) under the expert colours
                ax.imshow(pic.mean(-1).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.imshow(
                    m[r].numpy(),
                    cmap=cmap,
                    vmin=-0.5,
                    vmax=E - 0.5,
                    alpha=0.7,
                    extent=(0, S, S, 0),
                    interpolation="nearest",
                )
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle(f"top-1 expert of every patch (colour = expert, E = {E})", fontsize=9)
    return fig


def write_plots(plt, out, res, history, images, maps, extra=None):
    """utilisation.png, curves.png (needs the run's log.jsonl), expert_maps.png and the
    `extra` figures ({file name: a function drawing it}: an M²oT run's teacher_preference.png,
    m2ot.py); returns the paths."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--plots {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    # the figures this result has data for, drawn one at a time and closed
    figures = {}
    if res["moe_layers"]:
        figures["utilisation.png"] = lambda: plot_utilisation(plt, res)
    if history:
        figures["curves.png"] = lambda: plot_curves(plt, res, history)
    if res["moe_layers"]:
        figures["expert_maps.png"] = lambda: plot_expert_maps(plt, res, images, maps)
    figures.update(extra or {})
    for name, draw in figures.items():
        fig = draw()
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
    return [str(out / name) for name in figures]
