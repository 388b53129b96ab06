"""The DiCO-versus-SCST figure of `dico_scale.compare`: validation curves over the steps, each run's selected
checkpoint marked, and a table of the captions of the same held-out images."""
from __future__ import annotations

import textwrap

PANELS = [("evaluator_score", "evaluator score (reward)"), ("cider", "CIDEr"), ("mean_length", "mean length (words)"),
          ("repetition", "repetition (share of captions)"), ("vocab_size", "vocabulary (distinct words)")]
STYLES = {"DiCO": ("tab:blue", "-"), "SCST": ("tab:red", "-"), "SCST (CIDEr-D)": ("tab:orange", "--")}


def draw(path: str, runs: dict, start: dict, test: dict, title: str = "") -> None:
    """runs: {label: {"curves": {metric: [(step, value)]}, "best_step"}}; start: the XE captioner's validation
    metrics (drawn at step 0 of every curve); test: {label: {"examples": records}} for the caption table."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 12))
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 1.25], hspace=0.35, wspace=0.25)
    for i, (metric, name) in enumerate(PANELS):
        ax = fig.add_subplot(grid[i // 3, i % 3])
        for label, run in runs.items():
            color, style = STYLES.get(label, (None, "-"))
            points = list(run["curves"].get(metric, []))
            if metric in start:  # every run starts from the XE captioner
                points.insert(0, (0, start[metric]))
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, style, color=color, marker=".", label=label)
            best = dict(points).get(run.get("best_step"))
            if best is not None:
                ax.plot([run["best_step"]], [best], "*", color=color, markersize=15, markeredgecolor="black")
        if metric in start:
            ax.plot([0], [start[metric]], "o", color="black", label="XE (step 0)")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    legend = fig.add_subplot(grid[1, 2])
    legend.axis("off")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], marker="*", color="grey", markeredgecolor="black", markersize=15, ls=""))
    labels.append("selected checkpoint (train.select_best)")
    legend.legend(handles, labels, loc="center", fontsize=12)
    _caption_table(fig.add_subplot(grid[2, :]), test)
    if title:
        fig.suptitle(title, fontsize=14)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _caption_table(ax, test: dict) -> None:
    """One row per held-out image: its first reference, then each model's caption."""
    ax.axis("off")
    labels = list(test)
    rows = list(zip(*(test[label]["examples"] for label in labels)))
    if not rows:
        return
    wrap = lambda text: "\n".join(textwrap.wrap(text or "(empty)", 34))  # noqa: E731
    cells = [[wrap(r[0]["refs"][0])] + [wrap(x["caption"]) for x in r] for r in rows]
    table = ax.table(cellText=cells, colLabels=["reference"] + labels, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 3.2)
    ax.set_title("captions of the same held-out test images (selected checkpoints)")
