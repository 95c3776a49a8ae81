"""The study report's figures, each a PNG with its numbers in a CSV beside it (report.py assembles the report)."""
import math
import pathlib

import numpy as np

from gptlab import selection
from gptlab import tables as table_lib
from projects.pretrain_vs_finetune.analysis import CLASSIFY_CHANCE, TASK_METRIC, fmt_int, pareto


class Figures:
    """Mixed into analysis.Study by report.StudyReport."""

    def figures(self, out: pathlib.Path) -> list:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 7.5})
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("*.png")) + list(out.glob("*.csv")):
            old.unlink()
        written = [self._efficiency_figure(plt, out), self._transfer_figure(plt, out), self._pareto_figure(plt, out),
                   self._breadth_figure(plt, out)]
        return [w for w in written if w]

    def _size_style(self, size):
        i = self.sizes.index(size)
        return dict(color=size_colour(i, len(self.sizes)), marker=MARKERS[i % len(MARKERS)])

    def _strategy_style(self, label, labels):
        k = labels.index(label)
        return dict(color=STRATEGY_COLOURS[k % len(STRATEGY_COLOURS)],
                    marker=STRATEGY_MARKERS[k % len(STRATEGY_MARKERS)])

    def _efficiency_figure(self, plt, out):
        rows = self.efficiency()
        if not rows:
            return None
        fig, ax = plt.subplots(figsize=(6.4, 5.2))
        csv_rows = []
        for size in self.sizes:
            style = self._size_style(size)
            for arm, ls in (("finetuned", "-"), ("scratch", "--")):
                pts = []
                for s, a, fraction, ch in rows:
                    i = ch.interval("test_loss")
                    if s == size and a == arm and i:
                        d = ch.mean_of("train_data_tokens")
                        pts.append((d, i.mean, i.low, i.high))
                        csv_rows.append([size, arm, fraction, d, i.mean, i.low, i.high, i.n])
                if pts:
                    d, m, lo, hi = map(np.array, zip(*sorted(pts)))
                    yerr = [np.nan_to_num(m - lo, posinf=0), np.nan_to_num(hi - m, posinf=0)]
                    ax.errorbar(d, m, yerr=yerr, linestyle=ls, capsize=2, markersize=4, linewidth=1.2,
                                label=f"{size} {'fine-tuned' if arm == 'finetuned' else 'scratch'}", **style)
            z = self.zero_shot(size)
            if z and z.interval("test_loss"):
                ax.axhline(z.interval("test_loss").mean, linestyle=":", linewidth=1, color=style["color"],
                           label=f"{size} pretrained, no fine-tuning")
                csv_rows.append([size, "zero_shot", "", 0, z.interval("test_loss").mean, "", "", 1])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"narrow-data tokens D_F ({self._corpora()['narrow_short']})")
        ax.set_ylabel("test loss (nats/token, log scale)")
        _plain_log_ticks(ax.yaxis)
        ax.set_title("Data efficiency: fine-tuned (solid) vs scratch (dashed);\ndotted: pretrained, no fine-tuning")
        ax.grid(alpha=0.3, which="both")
        ax.legend(ncol=3, fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: no data hidden
        fig.tight_layout()
        return self._save(fig, plt, out, "data_efficiency", csv_rows,
                          ["size", "arm", "fraction", "D_F_tokens", "test_loss_mean", "ci_low", "ci_high", "seeds"],
                          "Test loss against narrow-data tokens, per model size (95% t-intervals over seeds; "
                          "dotted: the pretrained model without fine-tuning).")

    def _transfer_figure(self, plt, out):
        points = self.transfer_points()
        if not points:
            return None
        fit, _, _ = self.censored_fit(points)
        boot = self.bootstrap()
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        csv_rows = []
        for size in self.sizes:
            style = self._size_style(size)
            pts = [(p.fine_tuned_tokens, p.transferred_tokens, boot["d_t"].get((size, f)))
                   for s, _, f, p in points if s == size and p.censored is None and (p.transferred_tokens or 0) > 0]
            n = self.non_embedding(size)
            for s, n_, f, p in points:
                if s == size:
                    ci = boot["d_t"].get((size, f)) or ("", "")
                    csv_rows.append([size, n_, f, p.fine_tuned_tokens, p.effective_tokens or "",
                                     p.transferred_tokens if p.transferred_tokens is not None else "",
                                     ci[0], ci[1], p.censored or "", p.bound or ""])
            if pts:
                d, t, ci = zip(*sorted(pts, key=lambda x: x[0]))
                # Error bars: the bootstrap's 95% interval of D_T, clipped to the axis (a bound of 0 or less).
                low = [max(m - c[0], 0) if c and c[0] > 0 else 0.999 * m if c else 0 for m, c in zip(t, ci)]
                high = [max(c[1] - m, 0) if c else 0 for m, c in zip(t, ci)]
                ax.errorbar(d, t, yerr=[low, high], linestyle="none", capsize=2, markersize=5,
                            label=f"{size} (N = {fmt_int(n)})", **style)
            # Beyond the scratch curve D_E is only bounded below: D_T > bound - D_F, drawn hollow.
            bounds = sorted((p.fine_tuned_tokens, p.bound - p.fine_tuned_tokens) for s, _, _, p in points
                            if s == size and p.censored == "above" and p.bound > p.fine_tuned_tokens)
            if bounds:
                d, t = zip(*bounds)
                ax.plot(d, t, linestyle=":", fillstyle="none", color=style["color"], marker=style["marker"],
                        label=f"{size} (N = {fmt_int(n)}): lower bound")
            if fit and n:
                grid = np.geomspace(min(p.fine_tuned_tokens for _, _, _, p in points),
                                    max(p.fine_tuned_tokens for _, _, _, p in points), 20)
                ax.plot(grid, fit.predict(grid, n), linestyle="-", linewidth=1, color=style["color"],
                        label=f"{size}: censored fit")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("narrow-data tokens D_F")
        ax.set_ylabel("effective data transferred D_T (tokens)")
        ax.yaxis.set_major_formatter(_thousands())
        ax.yaxis.set_minor_formatter(_thousands())
        title = "Effective data transferred"
        if fit:
            title += f": censored fit D_T = k D_F^{fit.alpha:.2f} N^{fit.beta:.2f} (lines)"
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=6.5, ncol=2)
        fig.tight_layout()
        return self._save(fig, plt, out, "effective_data", csv_rows,
                          ["size", "N", "fraction", "D_F", "D_E", "D_T", "D_T_ci_low", "D_T_ci_high", "censored",
                           "bound"],
                          "Effective data transferred D_T against D_F per model size: filled, D_E read inside "
                          "the scratch curve, with the 95% bootstrap interval over seeds; hollow, lower bounds where "
                          "the fine-tuned model beats every scratch run of its size; lines, the censored fit.")

    def _breadth_figure(self, plt, out):
        rows = self.depth_breadth()
        if not rows:
            return None
        labels = list(dict.fromkeys(r[0] for r in rows))
        tasks = list(dict.fromkeys(r[1] for r in rows))
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.4), squeeze=False)
        csv_rows = []
        for ax, task in zip(axes[0], tasks):
            for label in labels:
                pts = sorted(((f if f is not None else 1.0), d, b) for l, t, size, f, d, b, _ in rows
                             if l == label and t == task and d is not None and size == self.spec["task_size"])
                if not pts:
                    continue
                f, d, b = zip(*pts)
                err = lambda ivs: [[i.mean - i.low if math.isfinite(i.low) else 0 for i in ivs],
                                   [i.high - i.mean if math.isfinite(i.high) else 0 for i in ivs]]
                ax.errorbar([i.mean for i in d], [i.mean for i in b], xerr=err(d), yerr=err(b), capsize=2,
                            markersize=5, linewidth=0.8, linestyle="-" if len(pts) > 1 else "none", label=label,
                            **self._strategy_style(label, labels))
                csv_rows += [[task, label, fr, di.mean, di.low, di.high, bi.mean, bi.low, bi.high, bi.n]
                             for fr, di, bi in pts]
            ax.axhline(0, color="0.5", linewidth=0.8, linestyle=":", label="no forgetting")
            ax.set_xlabel(f"depth: {task} test gain over untouched")
            ax.set_ylabel("breadth lost: bits/byte after - before")
            ax.set_title(task)
            ax.grid(alpha=0.3)
        legend = {}
        for ax in axes[0]:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(name, handle)
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(8, len(legend)),
                   bbox_to_anchor=(0.5, 0.0))
        fig.suptitle("Depth against breadth per strategy (full on lm: a line over data fractions at the task size)")
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        return self._save(fig, plt, out, "depth_breadth", csv_rows,
                          ["task", "strategy", "fraction", "depth", "depth_ci_low", "depth_ci_high", "breadth_lost",
                           "breadth_ci_low", "breadth_ci_high", "seeds"],
                          "Depth (test gain on the task) against breadth lost (bits per byte on the pretraining "
                          "corpus's validation split, after - before), per strategy, 95% t-intervals over seeds.")

    def _pareto_figure(self, plt, out):
        table = self.task_table()
        if not any(t["arms"] for t in table.values()):
            return None
        fig, axes = plt.subplots(1, len(self.tasks), figsize=(3.3 * len(self.tasks), 3.4), squeeze=False)
        csv_rows = []
        labels = list(dict.fromkeys(label for t in table.values() for label in t["arms"]))
        for ax, task in zip(axes[0], self.tasks):
            metric = TASK_METRIC[task]
            points = {}
            for k, label in enumerate(labels):
                ch = table[task]["arms"].get(label)
                i = ch.interval(metric) if ch else None
                if not i:
                    continue
                trainable = ch.cells[0]["params"].get("trainable")
                points[label] = (trainable, i.mean if not selection.higher_is_better(metric) else -i.mean)
                yerr = [[i.mean - i.low if math.isfinite(i.low) else 0], [i.high - i.mean if math.isfinite(i.high)
                                                                          else 0]]
                ax.errorbar([trainable], [i.mean], yerr=yerr, linestyle="none", capsize=2, markersize=5, label=label,
                            **self._strategy_style(label, labels))
                csv_rows.append([task, label, trainable, ch.cells[0].get("optimizer_state_bytes"), metric, i.mean,
                                 i.low, i.high, i.n])
            front = pareto(points)
            xs = sorted((points[l][0], table[task]["arms"][l].interval(metric).mean) for l in front)
            if len(xs) > 1:
                ax.plot(*zip(*xs), color="0.4", linewidth=0.8, linestyle="--", label="Pareto front")
            if metric == "test_accuracy":
                ax.axhline(CLASSIFY_CHANCE, color="0.3", linewidth=0.8, linestyle=":", label="chance (1/8)")
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel(metric.replace("_", " ") + (" (higher is better)" if selection.higher_is_better(metric)
                                                      else " (nats/token)"))
            ax.set_title(task)
            ax.grid(alpha=0.3, which="both")
        legend = {}  # label -> handle, over every panel (a task may lack some arms)
        for ax in axes[0]:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(name, handle)
        if legend:
            fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(7, len(legend)),
                       bbox_to_anchor=(0.5, 0.0))
        fig.suptitle("Cost against quality per task (dashed: the Pareto front)")
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        return self._save(fig, plt, out, "pareto", csv_rows,
                          ["task", "strategy", "trainable_params", "optimizer_state_bytes", "metric", "mean", "ci_low",
                           "ci_high", "seeds"],
                          "Test metric against trainable parameters, per task and strategy (95% t-intervals over "
                          "seeds; dashed: the Pareto front).")

    @staticmethod
    def _save(fig, plt, out, stem, csv_rows, header, caption):
        fig.savefig(out / f"{stem}.png", dpi=150)
        plt.close(fig)
        table_lib.write_csv(out / f"{stem}.csv", header, csv_rows)
        return f"figures/{stem}.png", caption


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


LINESTYLES = ("-", "--", ":", "-.")

def _thousands():
    from matplotlib import ticker

    return ticker.FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}K" if v >= 1e3 else f"{v:g}")


def _plain_log_ticks(axis) -> None:
    """Log-axis ticks written as plain numbers (2, 3) rather than 2 x 10^0: losses span less than a decade."""
    from matplotlib import ticker

    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def size_colour(i: int, n: int) -> str:
    """Model sizes: one blue ramp, dark (smallest) to light, so size reads as an order in colour and in greyscale."""
    ramp = ("#08306b", "#08519c", "#2171b5", "#4292c6", "#6baed6", "#9ecae1")
    return ramp[round(i * (len(ramp) - 1) / max(n - 1, 1))] if n <= len(ramp) else ramp[i % len(ramp)]


# Strategies: qualitative colours with no blue, so they never read as a model size.
STRATEGY_COLOURS = ("#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f")
STRATEGY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

