"""The DiCO-versus-SCST figure of `dico_scale.compare`: validation curves over the steps, each run's selected
checkpoint marked, and a table of the captions of the same held-out images."""
from __future__ import annotations

import textwrap

PANELS = [("evaluator_score", "evaluator score (reward)"), ("cider", "CIDEr"), ("mean_length", "mean length (words)"),
          ("repetition", "repetition (share of captions)"), ("vocab_size", "vocabulary (distinct words)")]
STYLES = {"DiCO": ("tab:blue", "-"), "SCST": ("tab:red", "-"), "SCST (CIDEr-D)": ("tab:orange", "--")}


def draw(path: str, runs: dict, start: dict, test: dict, title: str = "",
         table: str = "selected checkpoints") -> None:
    """runs: {label: [{"curves": {metric: [(step, value)]}, "best_step"} per seed]}; start: the XE captioner's
    validation metrics (drawn at step 0 of every curve); test: {label: {"examples": records}} for the caption
    table. Several seeds: each seed's curve thin, their mean bold."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 12))
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 1.25], hspace=0.35, wspace=0.25)
    for i, (metric, name) in enumerate(PANELS):
        ax = fig.add_subplot(grid[i // 3, i % 3])
        for label, seeds in runs.items():
            color, style = STYLES.get(label, (None, "-"))
            curves = [_points(run, metric, start) for run in seeds]
            for run, points in zip(seeds, curves):
                if points:
                    _curve(ax, run, points, color, style, label if len(seeds) == 1 else None, thin=len(seeds) > 1)
            mean = _mean(curves)
            if len(seeds) > 1 and mean:
                ax.plot(*zip(*mean), style, color=color, linewidth=2.5, label=f"{label} (mean of {len(seeds)} seeds)")
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
    _caption_table(fig.add_subplot(grid[2, :]), test, table)
    if title:
        fig.suptitle(title, fontsize=14)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _points(run: dict, metric: str, start: dict) -> list:
    points = list(run["curves"].get(metric, []))
    if metric in start:  # every run starts from the XE captioner
        points.insert(0, (0, start[metric]))
    return points


def _curve(ax, run: dict, points: list, color, style: str, label, thin: bool) -> None:
    """One run's curve, its selected checkpoint a star."""
    steps, values = zip(*points)
    ax.plot(steps, values, style, color=color, marker="" if thin else ".", label=label,
            alpha=0.45 if thin else 1.0, linewidth=1.0 if thin else 1.5)
    best = dict(points).get(run.get("best_step"))
    if best is not None:
        ax.plot([run["best_step"]], [best], "*", color=color, markersize=10 if thin else 15, markeredgecolor="black")


def _mean(curves: list) -> list:
    """(step, mean) at the steps every curve has."""
    steps = sorted(set.intersection(*(set(dict(c)) for c in curves))) if curves and all(curves) else []
    return [(s, sum(dict(c)[s] for c in curves) / len(curves)) for s in steps]


def _caption_table(ax, test: dict, which: str) -> None:
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
    ax.set_title(f"captions of the same held-out test images ({which})")
