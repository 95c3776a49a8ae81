"""A sweep report's figures: the metric against the ablated factor, and each stage's loss curves (PNG, matplotlib).

The metric chart's numbers are written beside it as CSV (gptlab.tables); one colour per row in every figure.
"""
import math
import pathlib

import numpy as np

from gptlab import selection
from gptlab import sweep as sweep_lib
from gptlab import tables
from gptlab.metrics import read_metrics
from gptlab.report.model import factor_name, number, short_key, sorted_values


def figures(report) -> list:
    """Writes the PNGs (and the metric chart's CSV); returns [(path, caption)]."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out = report.workdir / "figures"
    out.mkdir(exist_ok=True)
    for old in list(out.glob("*.png")) + list(out.glob("*.csv")):
        old.unlink()  # figures of cells or factors that no longer exist
    written = []
    chart = _metric_chart(report, plt, out)
    if chart:
        written.append(chart)
    for stage in dict.fromkeys(c.stage for c in report.sweep.cells):
        curves = _curves(report, plt, out, stage)
        if curves:
            written.append(curves)
    return written


def color_of(report, plt, row: str):
    """One colour per row (strategy), the same in every figure of the report."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(report.row_of(g) for g in report.groups.values()))
    return colors[labels.index(row) % len(colors)] if row in labels else colors[0]


def _metric_chart(report, plt, out: pathlib.Path):
    data = report.chart_data()
    if not data:
        return None
    factor = short_key(report.column_key) if report.column_key else None
    stem = f"{report.metric}_vs_{factor}" if factor else report.metric
    tables.write_csv(out / f"{stem}.csv",  # None: an empty cell (a flat row's x, one seed's std)
                     ["row", report.column_key or "", f"{report.metric}_mean", f"{report.metric}_std", "seeds"], data)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    numeric = bool(report.columns) and all(number(c) is not None for c in report.columns)
    rows = list(dict.fromkeys(d[0] for d in data))
    if report.column_key:
        positions = {repr(c): (c if numeric else i) for i, c in enumerate(report.columns)}
        for i, row in enumerate(rows):
            points = [(positions[repr(x)], m, s) for r, x, m, s, _ in data if r == row and x is not None]
            flat = [(m, s) for r, x, m, s, _ in data if r == row and x is None]
            color = color_of(report, plt, row)
            if points:
                xs, ms, ss = zip(*points)
                ax.errorbar(xs, ms, yerr=[s or 0.0 for s in ss], marker="o", capsize=3, label=row, color=color)
            for m, s in flat:
                ax.axhline(m, linestyle="--", color=color, label=row)
                if s:
                    ax.axhspan(m - s, m + s, color=color, alpha=0.12)
        if numeric and min(report.columns) > 0 and max(report.columns) / min(report.columns) >= 10:
            ax.set_xscale("log")
        ax.set_xticks([positions[repr(c)] for c in report.columns])
        ax.set_xticklabels([sweep_lib.value_text(c) for c in report.columns])
        ax.set_xlabel(factor_name(report.column_key))
        ax.legend(fontsize=8, ncol=2)
        caption = (f"{report.metric} against {factor_name(report.column_key)} (mean ± std over seeds; dashed: "
                   "runs that do not depend on it)")
    else:
        xs = np.arange(len(data))
        ax.bar(xs, [d[2] for d in data], yerr=[d[3] or 0.0 for d in data], capsize=3,
               color=[color_of(report, plt, d[0]) for d in data])
        ax.set_xticks(xs)
        ax.set_xticklabels([d[0] for d in data], rotation=30, ha="right")
        caption = f"{report.metric} per configuration (mean ± std over seeds)"
    ax.set_ylabel(_metric_label(report.metric))
    ax.set_title(report.sweep.name, fontsize=10, wrap=True)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, caption


def _curves(report, plt, out: pathlib.Path, stage: str):
    groups = [g for g in report.groups.values() if g.stage == stage]
    curves = {g.cells[0].name: {c.name: read_metrics(sweep_lib.run_dir(report.workdir, c.name)) for c in g.cells}
              for g in groups}
    if not any(records for per_cell in curves.values() for records in per_cell.values()):
        return None  # nothing logged (e.g. evaluation-only cells)
    labels = list(dict.fromkeys(g.label for g in groups))
    by_column = report.column_key and all(report.column_key in g.factors for g in groups)
    if by_column:
        columns = sorted_values(g.factors[report.column_key] for g in groups)
        layout = {id(g): (labels.index(g.label), [repr(c) for c in columns].index(repr(g.factors[report.column_key])))
                  for g in groups}
        shape = (len(labels), len(columns))
    else:
        ncols = min(4, len(groups))
        layout = {id(g): divmod(i, ncols) for i, g in enumerate(groups)}
        shape = (math.ceil(len(groups) / ncols), ncols)
    fig, axes = plt.subplots(*shape, figsize=(3.4 * shape[1], 2.5 * shape[0]), squeeze=False,
                             sharex=True, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    from matplotlib.ticker import MaxNLocator

    for g in groups:
        ax = axes[layout[id(g)]]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))  # steps are whole numbers
        for cell in g.cells:
            records = curves[g.cells[0].name][cell.name]
            color = colors[cell.seed % len(colors)]
            train = [(r["step"], r["train_loss"]) for r in records if number(r.get("train_loss")) is not None]
            evals = [(r["step"], r["eval_loss"]) for r in records if number(r.get("eval_loss")) is not None]
            if train:
                ax.plot(*zip(*train), color=color, linewidth=1, label=f"train, seed {cell.seed}")
            if evals:
                ax.plot(*zip(*evals), color=color, linestyle="--", marker=".", linewidth=1,
                        label=f"eval, seed {cell.seed}")
        title = g.label + "".join(f", {factor_name(k)} {sweep_lib.value_text(v)}" for k, v in g.factors.items())
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("loss (nats/token)", fontsize=7)
    used = set(layout.values())
    for index in np.ndindex(*shape):
        if index not in used:
            axes[index].set_visible(False)
    handles, names = next(((ax.get_legend_handles_labels()) for ax in axes.flat if ax.lines), ([], []))
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(6, len(handles)), fontsize=7,
                   bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"stage {stage}: loss against step\n(solid: train, dashed: validation)", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path = out / f"curves_{stage}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, f"Loss curves of stage {stage}, every cell (colour: seed)"


def _metric_label(metric: str) -> str:
    unit = ("nats/token" if metric.endswith("loss") else "bits/byte" if metric.endswith("bits_per_byte")
            else "fraction" if selection.higher_is_better(metric) else "")
    return f"{metric} ({unit})" if unit else metric
