"""The pretraining-vs-fine-tuning study's report: tables, figures, conclusions, Markdown and LaTeX.

`write_study(DIR)` collects a sweep workdir's results into DIR/study/ (or reads a study directory's
results.jsonl and study.json alone) and writes report.md, report.tex (report.pdf where pdflatex is
installed), figures/*.png with their CSVs and table_*.csv. The numbers come from analysis.py.
"""
import csv
import io
import json
import math
import pathlib
import shutil
import subprocess
from typing import Optional

import numpy as np

from gptlab import files
from gptlab import selection
from gptlab import sweep as sweep_lib
from gptlab.errors import UserError
from gptlab.tables import tex_escape
from projects.pretrain_vs_finetune import analysis
from projects.pretrain_vs_finetune.analysis import (PAPER, TASK_EXTRA, TASK_METRIC, Choice, compact, fmt_fraction,
                                                    fmt_int, fmt_interval, pareto)


class StudyReport(analysis.Study):
    """The study's analysis, rendered."""

    def tables(self) -> dict:
        """Every table of the report as (header, rows) of plain strings: Markdown, LaTeX and CSV share them."""
        t = {}
        frac_tokens = {}
        rows = []
        for size, arm, fraction, ch in self.efficiency():
            frac_tokens[fraction] = ch.mean_of("train_data_tokens")
            i = ch.interval("test_loss")
            rows.append([size, fmt_int(self.non_embedding(size)), "fine-tuned" if arm == "finetuned" else "scratch",
                         fmt_fraction(fraction), fmt_int(ch.mean_of("train_data_tokens")), fmt_interval(i), str(i.n) if i else "0",
                         ch.lr_text, _fmt_steps(ch)])
        for size in self.sizes:
            z = self.zero_shot(size)
            if z and z.interval("test_loss"):
                rows.append([size, fmt_int(self.non_embedding(size)), "pretrained, no fine-tuning", "—", "0",
                             fmt_interval(z.interval("test_loss")), str(z.interval("test_loss").n), "—", "—"])
        t["efficiency"] = (["size", "N (non-emb.)", "arm", "fraction", "D_F (tokens)", "test loss (95% CI)", "seeds",
                            "chosen LR", "steps to best"], rows)

        points = self.transfer_points()
        rows = []
        for size, n, fraction, p in points:
            if p.censored == "above":
                de, dt, share = f"> {fmt_int(p.bound)}", f"> {fmt_int(p.bound - p.fine_tuned_tokens)}", "—"
            elif p.censored == "below":
                de, dt, share = f"< {fmt_int(p.bound)}", "—", "—"
            else:
                de, dt = fmt_int(p.effective_tokens), fmt_int(p.transferred_tokens)
                share = f"{p.transferred_tokens / p.effective_tokens:.2f}"
            rows.append([size, fmt_int(n), fmt_fraction(fraction), fmt_int(p.fine_tuned_tokens), f"{p.loss:.4f}", de, dt,
                         share])
        t["transfer"] = (["size", "N", "fraction", "D_F", "fine-tuned test loss", "D_E", "D_T", "D_T / D_E"], rows)
        fit, why = self.transfer_fit(points)
        if fit:
            t["fit"] = (["coefficient", "this study (95% CI)", "Hernandez et al. 2021 (text -> Python)"], [
                ["alpha (D_F exponent)", f"{fit.alpha:.3f} [{fit.alpha_interval[0]:.3f}, {fit.alpha_interval[1]:.3f}]",
                 f"{PAPER['alpha']:.2f}"],
                ["beta (N exponent)", f"{fit.beta:.3f} [{fit.beta_interval[0]:.3f}, {fit.beta_interval[1]:.3f}]",
                 f"{PAPER['beta']:.2f}"],
                ["k", f"{fit.k:.3g}", "—"],
                ["points fitted / R^2", f"{fit.n} / {fit.r_squared:.3f}", "—"]])
        else:
            t["fit"] = (["coefficient", "this study", "Hernandez et al. 2021"], [["fit", f"not made: {why}", "—"]])

        table = self.task_table()
        labels = list(dict.fromkeys(label for task in table.values() for label in task["arms"]))
        columns = [(task, metric) for task in self.tasks for metric in (TASK_METRIC[task], *TASK_EXTRA.get(task, ()))]
        zero = {task: table[task]["zero"] for task in self.tasks}
        rows = [["usable examples, train / validation / test"] + [self._examples_text(zero[task])
                                                                  for task, _ in columns]]
        rows += [["pretrained, no fine-tuning"] + [fmt_interval(zero[task].interval(metric)) if zero[task] else "—"
                                                   for task, metric in columns]]
        for label in labels:
            row = [label]
            for task, metric in columns:
                ch = table[task]["arms"].get(label)
                lr = f" (LR {ch.lr_text})" if ch and metric == TASK_METRIC[task] else ""
                row.append(f"{fmt_interval(ch.interval(metric))}{lr}" if ch else "—")
            rows.append(row)
        t["tasks"] = (["strategy"] + [f"{task}: {metric}" for task, metric in columns], rows)
        rows = []
        for label in labels:
            row = [label]
            for task in self.tasks:
                arms = table[task]["arms"]
                share = (self.gain_share(arms[label], arms["full"], table[task]["zero"], TASK_METRIC[task])
                         if label in arms and "full" in arms else None)
                row.append(fmt_interval(share, 2) if share else "—")
            rows.append(row)
        t["gain"] = (["strategy"] + [f"{task}: share of full FT's gain" for task in self.tasks], rows)

        rows = []
        for label, lm, task_rows in self.cost_rows():
            rows.append([label, *task_rows, lm])
        t["cost"] = (["arm (lm task)", "trainable params", "optimizer state (bytes)", "step time (ms)",
                      "peak RSS (MiB)", "time to best (s)", "on the Pareto front", "test loss"], rows)

        rows = []
        for family, what, d, metric in self.comparisons():
            better = selection.higher_is_better(metric)
            holds = d.excludes(0.0)
            verdict = ("a better" if (d.mean > 0) == better else "b better") if holds else "no difference shown"
            rows.append([family, what, metric, f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]", str(d.n), verdict])
        t["paired"] = (["comparison", "a - b", "metric", "mean difference (95% CI)", "seeds", "verdict"], rows)
        return t

    @staticmethod
    def _examples_text(choice) -> str:
        """A task's split sizes as its runs recorded them (examples; lm: training tokens)."""
        cell = choice.cells[0] if choice and choice.cells else {}
        sizes = cell.get("data_examples")
        if sizes:
            return " / ".join(fmt_int(sizes.get(k)) if sizes.get(k) is not None else "—"
                              for k in ("train", "validation", "test"))
        return f"{fmt_int(cell['train_data_tokens'])} train tokens" if cell.get("train_data_tokens") else "—"

    def conclusions(self) -> list:
        """Sentences that say only what the intervals support, and what did not hold."""
        lines, failed = [], []
        by_family = {}
        for family, what, d, metric in self.comparisons():
            by_family.setdefault(family, []).append((what, d, metric))
        ft = by_family.get("fine-tuned vs scratch", [])
        if ft:
            wins = [w for w, d, _ in ft if d.high < 0]
            losses = [w for w, d, _ in ft if d.low > 0]
            lines.append(f"Fine-tuning the pretrained model reaches a lower test loss than training from scratch at "
                         f"{len(wins)} of {len(ft)} (size, data fraction) points, each with a 95% interval of the "
                         "paired difference below zero" + (f"; scratch is better at {len(losses)}" if losses else "")
                         + ".")
            failed += [f"fine-tuned vs scratch at {w}: no difference shown" for w, d, _ in ft if not d.excludes(0)]
            failed += [f"fine-tuned vs scratch at {w}: scratch better" for w in losses]
        for family in ("full vs LoRA", "LoRA vs head"):
            for what, d, metric in by_family.get(family, []):
                better = selection.higher_is_better(metric)
                a, b = what.split(",")[0].split(" - ")
                if d.excludes(0):
                    winner = a if (d.mean > 0) == better else b
                    lines.append(f"{what.split(', ')[1]}: {winner} is better than "
                                 f"{b if winner == a else a} ({metric} difference {d.mean:+.4f}, "
                                 f"95% CI [{d.low:+.4f}, {d.high:+.4f}]).")
                else:
                    failed.append(f"{family}, {what}: the interval [{d.low:+.4f}, {d.high:+.4f}] includes zero")
        fit, why = self.transfer_fit(self.transfer_points())
        if fit:
            def exponent(name, value, interval, of):  # what the interval supports about D_T's growth with `of`
                grows = ("grows with" if interval[0] > 0 else "shrinks with" if interval[1] < 0
                         else "has no growth shown with")
                return f"{grows} {of} ({name} {value:.2f}, 95% CI {interval[0]:.2f} to {interval[1]:.2f})"

            inside = (fit.alpha_interval[0] <= PAPER["alpha"] <= fit.alpha_interval[1]
                      and fit.beta_interval[0] <= PAPER["beta"] <= fit.beta_interval[1])
            lines.append(f"Effective data transferred, fitted as D_T = k D_F^alpha N^beta on {fit.n} points, "
                         f"{exponent('beta', fit.beta, fit.beta_interval, 'model size N')} and "
                         f"{exponent('alpha', fit.alpha, fit.alpha_interval, 'narrow data D_F')}; the paper's text -> "
                         f"Python fit has alpha {PAPER['alpha']} and beta {PAPER['beta']}"
                         + ("; both lie inside our intervals, which are too wide to confirm or refute them." if inside
                            else "."))
            for name, interval, of in (("alpha", fit.alpha_interval, "D_F"), ("beta", fit.beta_interval, "N")):
                if interval[0] <= 0 <= interval[1]:
                    failed.append(f"the transfer law's {name}: its interval [{interval[0]:.2f}, {interval[1]:.2f}] "
                                  f"includes zero, so growth of D_T with {of} is not shown")
        else:
            failed.append(f"the transfer law could not be fitted: {why}")
        return lines, failed

    def figures(self, out: pathlib.Path) -> list:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 7.5})
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("*.png")) + list(out.glob("*.csv")):
            old.unlink()
        written = [self._efficiency_figure(plt, out), self._transfer_figure(plt, out), self._pareto_figure(plt, out)]
        return [w for w in written if w]

    def _size_style(self, size):
        i = self.sizes.index(size)
        return dict(color=_palette(i), marker=MARKERS[i % len(MARKERS)])

    def _efficiency_figure(self, plt, out):
        rows = self.efficiency()
        if not rows:
            return None
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
                ax.axhline(z.interval("test_loss").mean, linestyle=":", linewidth=1, color=style["color"])
                csv_rows.append([size, "zero_shot", "", 0, z.interval("test_loss").mean, "", "", 1])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"narrow-data tokens D_F ({self._corpora()['narrow_short']})")
        ax.set_ylabel("test loss (nats/token, log scale)")
        _plain_log_ticks(ax.yaxis)
        ax.set_title("Data efficiency: fine-tuned (solid) vs scratch (dashed);\ndotted: pretrained, no fine-tuning")
        ax.grid(alpha=0.3, which="both")
        ax.legend(ncol=2)
        fig.tight_layout()
        return self._save(fig, plt, out, "data_efficiency", csv_rows,
                          ["size", "arm", "fraction", "D_F_tokens", "test_loss_mean", "ci_low", "ci_high", "seeds"],
                          "Test loss against narrow-data tokens, per model size (95% t-intervals over seeds; "
                          "dotted: the pretrained model without fine-tuning).")

    def _transfer_figure(self, plt, out):
        points = self.transfer_points()
        usable = [(s, n, p) for s, n, _, p in points if p.censored is None and (p.transferred_tokens or 0) > 0]
        if not points:
            return None
        fit, _ = self.transfer_fit(points)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        csv_rows = []
        for size in self.sizes:
            style = self._size_style(size)
            pts = [(p.fine_tuned_tokens, p.transferred_tokens) for s, _, p in usable if s == size]
            n = self.non_embedding(size)
            for s, n_, f, p in points:
                if s == size:
                    csv_rows.append([size, n_, f, p.fine_tuned_tokens, p.effective_tokens or "",
                                     p.transferred_tokens if p.transferred_tokens is not None else "",
                                     p.censored or "", p.bound or ""])
            if pts:
                d, t = zip(*sorted(pts))
                ax.plot(d, t, linestyle="none", label=f"{size} (N = {fmt_int(n)})", **style)
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
                ax.plot(grid, fit.predict(grid, n), linestyle="-", linewidth=1, color=style["color"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("narrow-data tokens D_F")
        ax.set_ylabel("effective data transferred D_T (tokens)")
        ax.yaxis.set_major_formatter(_thousands())
        ax.yaxis.set_minor_formatter(_thousands())
        title = "Effective data transferred"
        if fit:
            title += f": fit D_T = k D_F^{fit.alpha:.2f} N^{fit.beta:.2f} (lines)"
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        return self._save(fig, plt, out, "effective_data", csv_rows,
                          ["size", "N", "fraction", "D_F", "D_E", "D_T", "censored", "bound"],
                          "Effective data transferred D_T against D_F per model size: filled, D_E read inside "
                          "the scratch curve (with the fitted law where there is one); hollow, lower bounds where "
                          "the fine-tuned model beats every scratch run of its size.")

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
                ax.errorbar([trainable], [i.mean], yerr=yerr, marker=MARKERS[k % len(MARKERS)], color=_palette(k),
                            linestyle="none", capsize=2, markersize=5, label=label)
                csv_rows.append([task, label, trainable, ch.cells[0].get("optimizer_state_bytes"), metric, i.mean,
                                 i.low, i.high, i.n])
            front = pareto(points)
            xs = sorted((points[l][0], table[task]["arms"][l].interval(metric).mean) for l in front)
            if len(xs) > 1:
                ax.plot(*zip(*xs), color="0.4", linewidth=0.8, linestyle="--")
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
        write_csv(out / f"{stem}.csv", header, csv_rows)
        return f"figures/{stem}.png", caption

    def markdown(self, figures: list) -> str:
        t = self.tables()
        p = self.provenance
        lines = [f"# {p['name']}: how much is pretraining worth?", "", self.provenance.get("description", ""), "",
                 f"Made by `{p['command']}` (the report alone, from stored results: add `--report_only`); "
                 f"code version {p['commits']}; {p['device']}. {p['cells']} cells, {p['cell_hours']:.2f} cell-hours"
                 + (f"; the command's wall time {p['wall_time']}" if p.get("wall_time") else "") + ".", "",
                 "Every number is a best checkpoint (chosen on validation) scored on the **test split** of its task; "
                 "learning rates are chosen on **validation** per arm, size and fraction; intervals are 95% "
                 "Student-t over seeds; every cell's result.json is under runs/CELL/ of the study's workdir and its "
                 "summary in results.jsonl beside this report.", ""]
        figs = dict((f.split("/")[-1].split(".")[0], (f, c)) for f, c in figures)
        conclusions, failed = self.conclusions()
        lines += ["## Conclusions", ""] + [f"- {c}" for c in conclusions] + [""]
        if failed:
            lines += ["What did not hold:", ""] + [f"- {f}" for f in failed] + [""]
        sections = [("1. Data efficiency", "efficiency", "data_efficiency"),
                    ("2. Effective data transferred", "transfer", "effective_data"),
                    ("3. One pretrained model, every task and strategy", "tasks", None),
                    ("4. Cost against quality", "cost", "pareto"),
                    ("5. Paired differences", "paired", None)]
        for title, key, fig in sections:
            lines += [f"## {title}", ""]
            lines += self._notes(key)
            lines += md_table(*t[key]) + [""]
            if key == "transfer":
                lines += ["Fit of D_T = k D_F^alpha N^beta (least squares in log space; 95% t-intervals):", ""]
                lines += md_table(*t["fit"]) + [""]
            if key == "tasks":
                lines += [f"- **Check:** {w}" for w in self.leak_warnings()] + ([""] if self.leak_warnings() else [])
                lines += ["Share of full fine-tuning's gain over the untouched pretrained model, (strategy - "
                          "untouched) / (full - untouched) per seed:", ""]
                lines += md_table(*t["gain"]) + [""]
            if fig and fig in figs:
                path, caption = figs[fig]
                lines += [f"![{caption}]({path})", "", f"*{caption}* Numbers: `{path[:-4]}.csv`.", ""]
        return "\n".join(lines).rstrip() + "\n"

    def _budget_text(self) -> str:
        budgets = self.spec.get("budgets")
        if not budgets:  # studies recorded before their budgets were (scratch had twice fine-tuning's)
            return "twice the fine-tuning step budget"
        return (f"a budget of {budgets['scratch']:,} steps (fine-tuning: {budgets['finetune']:,}), evaluated every "
                f"{budgets['scratch_eval_every']} steps (fine-tuning: {budgets['eval_every']})")

    def _corpora(self) -> dict:
        return {**self._OLD_CORPORA, **self.spec.get("corpora", {})}

    def _notes(self, key: str) -> list:
        s = self.spec
        corpora = self._corpora()
        notes = {
            "efficiency": [f"Pretraining data: {corpora['broad']}. Narrow data: {corpora['narrow']}, the first "
                           "fraction of its training split (D_F tokens, byte-level); "
                           f"scratch trains a fresh model of the same size with {self._budget_text()}. "
                           f"Steps to best: mean over seeds; (cap) marks cells that ended at their budget while still "
                           f"improving. " + self._grid_note(), ""],
            "transfer": ["D_E is read off the size's mean scratch curve (made non-increasing), interpolated in log-log "
                         "space; points outside it are never extrapolated: a fine-tuned loss below every scratch loss "
                         "gives only a lower bound (D_E > the largest scratch D_F, shown '>'), one above every scratch "
                         "loss an upper bound ('<'); both are left out of the fit, as are points with D_T <= 0. "
                         "Set-up differences from the paper: models of "
                         f"{fmt_int(min(filter(None, map(self.non_embedding, self.sizes)), default=0))} to "
                         f"{fmt_int(max(filter(None, map(self.non_embedding, self.sizes)), default=0))} non-embedding "
                         "parameters (theirs are far larger), BPE-free byte tokens, "
                         + f"pretraining on {corpora['broad_short']} rather than web text"
                         + ", early stopping instead of their fixed schedule, and few points per size.", ""],
            "tasks": [f"The `{s['task_size']}` pretrained model, fine-tuned on all of each task's training split; "
                      "lm and sft report test loss (lower is better; sft on response tokens only), classify test "
                      "accuracy and macro-F1 over 8 packages (higher is better); the chosen learning rate is in "
                      "brackets. sft's generation metrics (greedy exact match, parse rate: `experiments.evaluate`) "
                      "are not part of the study: run it on a cell's workdir for them.", ""],
            "cost": ["Per arm on the lm task at the task size: trainable parameters and optimizer-state bytes "
                     "(AdamW moments of the trainable parameters) from result.json; step time from the last logged "
                     "tokens/s and peak resident memory of the cell's process (both measured while the study's other "
                     "cells ran beside it, three at a time, so compare them within this table only); time to best = the "
                     "cell's wall time x best step / last step. The Pareto front: no other arm has fewer trainable "
                     "parameters and a lower test loss.", ""],
            "paired": ["Per-seed differences a - b of the test metric between arms that share seeds (each at its own "
                       "chosen learning rate); 'a better' or 'b better' only where the 95% interval excludes zero.",
                       ""],
        }
        return notes.get(key, [])

    def latex(self, figures: list) -> str:
        t = self.tables()
        p = self.provenance
        out = [r"\documentclass[10pt]{article}", r"\usepackage[margin=2cm,landscape]{geometry}",
               r"\usepackage[T1]{fontenc}", r"\usepackage{booktabs}", r"\usepackage{graphicx}", r"\begin{document}",
               rf"\section*{{{tex_escape(p['name'])}: how much is pretraining worth?}}",
               tex_escape(p.get("description", "")) + r"\par",
               rf"\noindent Made by \texttt{{{tex_escape(p['command'])}}}; code version {tex_escape(p['commits'])}. "
               r"Test-split scores of best checkpoints chosen on validation; 95\% t-intervals over seeds.\par"]
        captions = {"efficiency": "Data efficiency (test loss)", "transfer": "Effective data transferred",
                    "fit": r"Fit of $D_T = k D_F^\alpha N^\beta$", "tasks": "Every task and strategy (test metric)",
                    "gain": "Share of full fine-tuning's gain", "cost": "Cost against quality (lm task)",
                    "paired": "Paired differences (95\\% CI)"}
        for key in ("efficiency", "transfer", "fit", "tasks", "gain", "cost", "paired"):
            header, rows = t[key]
            out += [r"\begin{table}[ht]\centering\footnotesize", rf"\caption{{{captions[key]}}}",
                    r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
                    " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
            out += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in rows]
            out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        for path, caption in figures:
            out += [r"\begin{figure}[ht]\centering", rf"\includegraphics[width=0.7\linewidth]{{{path}}}",
                    rf"\caption{{{tex_escape(caption)}}}", r"\end{figure}"]
        out.append(r"\end{document}")
        return "\n".join(out) + "\n"


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


LINESTYLES = ("-", "--", ":", "-.")


def md_table(header, rows) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]


def write_csv(path, header, rows) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for row in rows:
        writer.writerow([repr(x) if isinstance(x, float) else x for x in row])
    files.write_atomic(path, text.getvalue())


def _thousands():
    from matplotlib import ticker

    return ticker.FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}K" if v >= 1e3 else f"{v:g}")


def _plain_log_ticks(axis) -> None:
    """Log-axis ticks written as plain numbers (2, 3) rather than 2 x 10^0: losses span less than a decade."""
    from matplotlib import ticker

    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def _palette(i: int) -> str:
    # Dark to light blue-greens with distinct markers: distinguishable in colour and in greyscale.
    return ("#1b3a6b", "#2a7f62", "#c2731b", "#7a3b8f", "#8c8c8c", "#b03a2e", "#4a90c2", "#000000")[i % 8]


def _fmt_steps(choice: Choice) -> str:
    steps = [c["best_step"] for c in choice.cells if c.get("best_step") is not None]
    capped = any(c.get("hit_budget") for c in choice.cells)
    return (f"{np.mean(steps):.0f}" if steps else "—") + (" (cap)" if capped else "")


STUDY_DIR = "study"


RECORDS = "results.jsonl"


SPEC = "study.json"


def collect(workdir) -> pathlib.Path:
    """DIR/study/results.jsonl and study.json from a sweep workdir (each written atomically); returns DIR/study."""
    workdir = pathlib.Path(workdir)
    sweep = sweep_lib.load_stored(workdir)
    out = workdir / STUDY_DIR
    out.mkdir(exist_ok=True)
    sweep_lib.collect(workdir, sweep)  # DIR/results.jsonl rebuilt from the cells that really finished
    lines = sweep_lib.read_results(workdir)
    files.write_atomic(out / RECORDS, "".join(json.dumps(compact(line), sort_keys=True) + "\n" for line in lines))
    previous = _read(out / SPEC) or {}
    meta = {"name": sweep.name, "description": sweep.description, "source": sweep.source, "study": sweep.study,
            "cells_in_sweep": len(sweep.cells), "runs": previous.get("runs", [])}
    files.write_json_atomic(out / SPEC, meta)  # in the config's order: rows and columns follow it
    return out


def record_run(workdir, wall_time_s: float, finished: bool) -> None:
    """Appends one invocation of experiments.study (its wall time) to DIR/study/study.json."""
    path = pathlib.Path(workdir) / STUDY_DIR / SPEC
    path.parent.mkdir(exist_ok=True)
    meta = _read(path) or {}
    meta.setdefault("runs", []).append({"wall_time_s": round(wall_time_s, 1), "finished": finished})
    files.write_json_atomic(path, meta)


def _read(path: pathlib.Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is damaged (not JSON: {e}): restore it, or delete it and rerun "
                        "python -m experiments.study on the sweep's workdir to rebuild it") from None


def load(study_dir) -> "StudyReport":
    study_dir = pathlib.Path(study_dir)
    meta = _read(study_dir / SPEC)
    if meta is None or not (study_dir / RECORDS).exists():
        raise UserError(f"{study_dir} holds no {SPEC} and {RECORDS}: run python -m experiments.study first")
    records = files.read_jsonl(study_dir / RECORDS, fix="restore it, or rebuild it from the sweep with python -m "
                               "experiments.study --report_only --workdir=SWEEP_DIR (the directory above study/)")
    versions = {}  # what each cell ran: its commit, and whether tracked files had changed since
    for r in records:
        key = (r["commit"] or "unknown")[:7] + (" plus uncommitted changes" if r.get("dirty") else "")
        versions[key] = versions.get(key, 0) + 1
    commits = [f"{key} ({n} cells)" for key, n in sorted(versions.items())] or ["none"]
    devices = sorted({(r.get("device") or {}).get("host_cpu") or (r.get("device") or {}).get("kind", "?")
                      for r in records})
    runs = meta.get("runs") or []
    wall = sum(r["wall_time_s"] for r in runs)
    provenance = {
        "name": meta["name"], "description": meta.get("description", ""),
        "command": f"python -m experiments.study --config={_source(meta.get('source', ''))} --workdir=DIR",
        "commits": ", ".join(commits), "device": "run on " + "; ".join(devices),
        "cells": f"{len(records)} of {meta.get('cells_in_sweep', len(records))}",
        "cell_hours": sum(r.get("wall_time_s") or 0 for r in records) / 3600,
        "wall_time": (f"{wall / 60:.1f} min over {len(runs)} invocation(s)") if runs else None,
    }
    return StudyReport(meta.get("study"), records, provenance)


def _source(source: str) -> str:
    """The ablation config relative to the repository (as a user would type it)."""
    path, _, preset = source.partition(":")
    try:
        path = str(pathlib.Path(path).resolve().relative_to(sweep_lib.REPO))
    except ValueError:
        pass
    return path + (f":{preset}" if preset else "")


def write_study(directory) -> dict:
    """Writes report.md, report.tex (and .pdf where pdflatex exists) and figures/ into the study directory.

    `directory` is a sweep workdir (its results are collected into DIR/study/ first) or a study
    directory holding results.jsonl and study.json (the report is regenerated from them alone).
    """
    directory = pathlib.Path(directory)
    study_dir = collect(directory) if (directory / "sweep.json").exists() else directory
    study = load(study_dir)
    figures = study.figures(study_dir / "figures")
    tables = study.tables()
    for key, (header, rows) in tables.items():
        write_csv(study_dir / f"table_{key}.csv", header, rows)
    md, tex = study_dir / "report.md", study_dir / "report.tex"
    files.write_atomic(md, study.markdown(figures))
    files.write_atomic(tex, study.latex(figures))
    return {"markdown": md, "latex": tex, "pdf": compile_latex(tex), "figures": [f for f, _ in figures]}


def compile_latex(tex: pathlib.Path) -> Optional[pathlib.Path]:
    """report.pdf from report.tex with pdflatex, when it is installed (else None); a failure is an error."""
    if shutil.which("pdflatex") is None:
        return None
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tex.parent,
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        tail = "\n".join(run.stdout.splitlines()[-15:])
        raise UserError(f"pdflatex could not compile {tex}:\n{tail}")
    for junk in (".aux", ".log"):
        tex.with_suffix(junk).unlink(missing_ok=True)
    return tex.with_suffix(".pdf")
