"""The study report's tables and its conclusions, from analysis.py's numbers (report.py assembles the report).

Every table is (header, rows) of plain strings: Markdown, LaTeX and CSV (gptlab/tables.py) share them.
"""
import math

import numpy as np

from gptlab import selection
from projects.pretrain_vs_finetune.analysis import (PAPER, TASK_EXTRA, TASK_METRIC, Choice, fmt_fraction, fmt_int,
                                                    fmt_interval)


class Tables:
    """Mixed into analysis.Study by report.StudyReport."""

    def tables(self) -> dict:
        """Every table of the report as (header, rows) of plain strings: Markdown, LaTeX and CSV share them."""
        t = {}
        frac_tokens = {}
        rows = []
        for size, arm, fraction, ch in self.efficiency():
            frac_tokens[fraction] = ch.mean_of("train_data_tokens")
            i = ch.interval("test_loss")
            rows.append([size, fmt_int(self.non_embedding(size)), "fine-tuned" if arm == "finetuned" else "scratch",
                         fmt_fraction(fraction), fmt_int(ch.mean_of("train_data_tokens")), fmt_interval(i),
                         str(i.n) if i else "0",
                         ch.lr_text, _fmt_steps(ch)])
        for size in self.sizes:
            z = self.zero_shot(size)
            if z and z.interval("test_loss"):
                rows.append([size, fmt_int(self.non_embedding(size)), "pretrained, no fine-tuning", "—", "0",
                             fmt_interval(z.interval("test_loss")), str(z.interval("test_loss").n), "—", "—"])
        t["efficiency"] = (["size", "N (non-emb.)", "arm", "fraction", "D_F (tokens)", "test loss (95% CI)", "seeds",
                            "chosen LR", "steps to best"], rows)

        points = self.transfer_points()
        boot = self.bootstrap()
        seeds = {(s, f): len(ch.cells) for s, arm, f, ch in self.efficiency() if arm == "finetuned"}
        rows = []
        for size, n, fraction, p in points:
            if p.censored == "above":
                de, dt, share = f"> {fmt_int(p.bound)}", f"> {fmt_int(p.bound - p.fine_tuned_tokens)}", "—"
            elif p.censored == "below":
                de, dt, share = f"< {fmt_int(p.bound)}", "—", "—"
            else:
                de, dt = fmt_int(p.effective_tokens), fmt_int(p.transferred_tokens)
                share = f"{p.transferred_tokens / p.effective_tokens:.2f}"
            ci = boot["d_t"].get((size, fraction))
            measured = boot["d_t_measured"].get((size, fraction), 0)
            ci_text = "—" if ci is None else (f"[{fmt_int(ci[0])}, {fmt_int(ci[1])}]" + (
                f" ({measured} of {boot['replicates']})" if measured < boot["replicates"] else ""))
            rows.append([size, fmt_int(n), fmt_fraction(fraction), fmt_int(p.fine_tuned_tokens), f"{p.loss:.4f}", de,
                         dt, ci_text, share, _reads(p), str(seeds.get((size, fraction), 0))])
        t["transfer"] = (["size", "N", "fraction", "D_F", "fine-tuned test loss", "D_E", "D_T", "D_T 95% bootstrap",
                          "D_T / D_E", "censored fit reads", "seeds"], rows)
        t["fit"] = self._fit_table(points, boot)

        table = self.task_table()
        labels = list(dict.fromkeys(label for task in table.values() for label in task["arms"]))
        columns = [(task, metric) for task in self.tasks for metric in (TASK_METRIC[task], *TASK_EXTRA.get(task, ()))]
        zero = {task: table[task]["zero"] for task in self.tasks}
        rows = [["usable examples, train / validation / test"] + [self._examples_text(zero[task])
                                                                  for task, _ in columns]]
        rows += [["seeds / test examples scored"] + [self._n_text(table[task], task) for task, _ in columns]]
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
        for family, what, d, metric, p, adjusted, kept in self.tested_comparisons():
            better = selection.higher_is_better(metric)
            verdict = ("a better" if (d.mean > 0) == better else "b better") if kept else "no difference shown"
            rows.append([family, what, metric, f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]", str(d.n), _fmt_p(p),
                         _fmt_p(adjusted), verdict])
        t["paired"] = (["comparison", "a - b", "metric", "mean difference (95% CI)", "seeds", "p (paired t)",
                        "p (Holm)", "verdict (Holm, 5%)"], rows)
        rows = []
        for label, task, size, fraction, depth, forgetting, tokens in self.depth_breadth():
            rows.append([label, task, size, fmt_fraction(fraction if fraction is not None else 1.0),
                         fmt_interval(depth), fmt_interval(forgetting), str(forgetting.n), fmt_int(tokens)])
        t["breadth"] = (["strategy", "task", "size", "fraction", "depth: test gain over untouched (95% CI)",
                         "breadth lost: bits/byte after - before (95% CI)", "seeds", "tokens scored"], rows)
        capped, count, total = self.capped_cells()
        t["capped"] = (["stage", "fraction", "learning rate", "seeds at the cap, still improving"],
                       [[stage, fmt_fraction(f) if f is not None else "—", f"{lr:.2g}" if lr is not None else "—",
                         ", ".join(map(str, seeds))] for stage, f, lr, seeds in capped])
        return t

    def _fit_table(self, points, boot) -> tuple:
        """Both fits side by side: survivors-only least squares and the censored likelihood (with and without the
        D_T <= 0 points)."""
        ols, ols_why = self.transfer_fit(points)
        cens, notes, cens_why = self.censored_fit(points)
        every, every_notes, _ = self.censored_fit(points, keep_nonpositive=True)
        header = ["coefficient", "least squares, measured D_T > 0 only (95% t-CI; bootstrap)",
                  "censored likelihood, D_T <= 0 left out (95% bootstrap)",
                  "censored, D_T <= 0 as < 1 token (sensitivity)", "Hernandez et al. 2021 (text -> Python)"]

        def coef(fit, name, interval=None, boot_interval=None):
            if fit is None:
                return "—"
            text = f"{getattr(fit, name):.3f}"
            if interval:
                text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
            if boot_interval and all(map(math.isfinite, boot_interval)):
                text += (";" if interval else "") + f" [{boot_interval[0]:.3f}, {boot_interval[1]:.3f}]"
            return text

        rows = []
        for name in ("alpha", "beta"):
            label = "alpha (D_F exponent)" if name == "alpha" else "beta (N exponent)"
            rows.append([label, coef(ols, name, getattr(ols, f"{name}_interval", None), boot["ols"][name]),
                         coef(cens, name, None, boot["censored"][name]), coef(every, name), f"{PAPER[name]:.2f}"])
        rows.append(["k", f"{ols.k:.3g}" if ols else "—", f"{cens.k:.3g}" if cens else "—",
                     f"{every.k:.3g}" if every else "—", "—"])
        rows.append(["sigma (noise of log D_T)", "—", f"{cens.sigma:.3f}" if cens else "—",
                     f"{every.sigma:.3f}" if every else "—", "—"])
        rows.append(["points: measured / lower bounds / upper bounds", f"{ols.n} / 0 / 0" if ols else "—",
                     f"{cens.n_exact} / {cens.n_lower} / {cens.n_upper}" if cens else "—",
                     f"{every.n_exact} / {every.n_lower} / {every.n_upper}" if every else "—", "—"])
        rows.append(["D_T <= 0, and bounds that say only D_T > 0", f"{len(points) - ols.n} left out with every bound"
                     if ols else "—", _notes_text(notes), _notes_text(every_notes), "—"])
        rows.append(["R^2", f"{ols.r_squared:.3f}" if ols else "—", "—", "—", "—"])
        if ols is None or cens is None:
            rows.append(["not made", ols_why or "—", cens_why or "—", "—", "—"])
        return header, rows

    def _n_text(self, task_table, task: str = "") -> str:
        """Seeds per arm and the test examples each cell scored (older results did not record the latter); lm's
        examples are windows of the context's length."""
        seeds = sorted({len(ch.cells) for ch in task_table["arms"].values()})
        scored = sorted({c["test_examples"] for ch in task_table["arms"].values() for c in ch.cells
                         if c.get("test_examples")})
        return (f"{'-'.join(map(str, seeds)) or '—'} / "
                + (", ".join(fmt_int(s) for s in scored) + (" windows" if task == "lm" else "") if scored
                   else "not recorded in this run"))

    @staticmethod
    def _examples_text(choice) -> str:
        """A task's split sizes as its runs recorded them (examples; lm: training tokens)."""
        cell = choice.cells[0] if choice and choice.cells else {}
        sizes = cell.get("data_examples")
        if sizes:
            return " / ".join(fmt_int(sizes.get(k)) if sizes.get(k) is not None else "—"
                              for k in ("train", "validation", "test"))
        return f"{fmt_int(cell['train_data_tokens'])} train tokens" if cell.get("train_data_tokens") else "—"

    def conclusions(self) -> tuple:
        """(what held, what did not): sentences that say only what the intervals and Holm's correction support."""
        lines, failed = [], []
        tested = self.tested_comparisons()
        by_family = {}
        for family, what, d, metric, p, adjusted, kept in tested:
            by_family.setdefault(family, []).append((what, d, metric, kept))
        family_note = f"Holm-corrected over all {len(tested)} paired comparisons at 5%"
        ft = by_family.get("fine-tuned vs scratch", [])
        if ft:
            wins = [w for w, d, _, kept in ft if kept and d.mean < 0]
            losses = [w for w, d, _, kept in ft if kept and d.mean > 0]
            before = sum(1 for _, d, _, _ in ft if d.high < 0)
            lines.append(f"Fine-tuning the pretrained model reaches a lower test loss than training from scratch at "
                         f"{len(wins)} of {len(ft)} (size, data fraction) points ({family_note}; {before} with the "
                         "uncorrected 95% interval below zero)" + (f"; scratch is better at {len(losses)}" if losses
                                                                    else "") + ".")
            failed += [f"fine-tuned vs scratch at {w}: no difference shown after Holm" for w, d, _, kept in ft
                       if not kept]
            failed += [f"fine-tuned vs scratch at {w}: scratch better" for w in losses]
        for family in ("full vs LoRA", "LoRA vs head"):
            for what, d, metric, kept in by_family.get(family, []):
                better = selection.higher_is_better(metric)
                a, b = what.split(",")[0].split(" - ")
                if kept:
                    winner = a if (d.mean > 0) == better else b
                    lines.append(f"{what.split(', ')[1]}: {winner} is better than "
                                 f"{b if winner == a else a} ({metric} difference {d.mean:+.4f}, "
                                 f"95% CI [{d.low:+.4f}, {d.high:+.4f}], kept by Holm).")
                else:
                    failed.append(f"{family}, {what}: no difference shown after Holm (95% CI "
                                  f"[{d.low:+.4f}, {d.high:+.4f}])")
        self._transfer_conclusions(lines, failed)
        self._breadth_conclusions(lines, failed)
        return lines, failed

    def _transfer_conclusions(self, lines: list, failed: list) -> None:
        points = self.transfer_points()
        boot = self.bootstrap()
        fit, notes, why = self.censored_fit(points)
        ols, _ = self.transfer_fit(points)
        if fit is None:
            failed.append(f"the transfer law could not be fitted: {why}")
            return

        def exponent(name, value, interval, of):  # what the interval supports about D_T's growth with `of`
            grows = ("grows with" if interval[0] > 0 else "shrinks with" if interval[1] < 0
                     else "has no growth shown with")
            return f"{grows} {of} ({name} {value:.2f}, 95% bootstrap CI {interval[0]:.2f} to {interval[1]:.2f})"

        # Rounding noise (1e-16 on noiseless data) is not growth: exponents within 1e-9 of zero count as zero.
        a, b = (tuple(0.0 if abs(x) < 1e-9 else x for x in boot["censored"][k]) for k in ("alpha", "beta"))
        if not all(map(math.isfinite, a + b)):
            failed.append("the transfer law's exponents have no bootstrap interval (one seed)")
            return
        inside = [name for name, i in (("alpha", a), ("beta", b)) if i[0] <= PAPER[name] <= i[1]]
        lines.append(f"Effective data transferred, fitted as D_T = k D_F^alpha N^beta by a censored likelihood on "
                     f"{fit.n} points ({fit.n_exact} measured, {fit.n_lower} lower and {fit.n_upper} upper bounds; "
                     f"not in it: {_notes_text(notes)}), {exponent('beta', fit.beta, b, 'model size N')} and "
                     f"{exponent('alpha', fit.alpha, a, 'narrow data D_F')}; the paper's text -> Python fit has alpha "
                     f"{PAPER['alpha']} and beta {PAPER['beta']}, "
                     + (f"{' and '.join(inside)} inside our intervals" if inside else "neither inside our intervals")
                     + (f". The least-squares fit on the {ols.n} measured points alone gives alpha {ols.alpha:.2f} "
                        f"and beta {ols.beta:.2f}" + (": leaving out the bounds, where pretraining helped most, pulls "
                                                      "both down." if round(ols.alpha, 2) < round(fit.alpha, 2)
                                                      and round(ols.beta, 2) < round(fit.beta, 2)
                                                      else ".") if ols else "."))
        bounds = [(p.fine_tuned_tokens, n, p.bound - p.fine_tuned_tokens) for _, n, _, p in points
                  if p.censored == "above" and p.bound > p.fine_tuned_tokens and n]
        if bounds:
            def above(f):
                return sum(1 for d, n, b in bounds if float(f.predict(d, n)) > b)
            lines.append(f"The censored fit agrees with {above(fit)} of the {len(bounds)} informative lower bounds on D_T "
                         "(its prediction lies above the bound)" + (f"; the least-squares fit with {above(ols)}"
                                                                     if ols else "") + ".")
        for name, interval, of in (("alpha", a, "D_F"), ("beta", b, "N")):
            if interval[0] <= 0 <= interval[1]:
                failed.append(f"the transfer law's {name}: its bootstrap interval [{interval[0]:.2f}, "
                              f"{interval[1]:.2f}] includes zero, so growth of D_T with {of} is not shown")

    def _breadth_conclusions(self, lines: list, failed: list) -> None:
        """Depth against breadth, and Biderman et al. 2024's ordering (LoRA learns less and forgets less)."""
        rows = self.depth_breadth()
        if not rows:
            failed.append("breadth (what fine-tuning costs the general model) was not measured in this run")
            return
        by = {(label, task, size, 1.0 if fraction is None else fraction): (d, f)
              for label, task, size, fraction, d, f, _ in rows}
        pairs = []
        for (label, task, size, fraction), (d, f) in by.items():
            full = by.get(("full", task, size, fraction))
            if label.startswith("lora") and full and d and full[0]:
                pairs.append((f"{label}, {task}", d.mean < full[0].mean, f.mean < full[1].mean))
        if not pairs:
            failed.append("breadth was measured, but not for both LoRA and full fine-tuning on one task")
            return
        both = [w for w, learns_less, forgets_less in pairs if learns_less and forgets_less]
        lines.append(f"Against Biderman et al. 2024 (LoRA learns less and forgets less than full fine-tuning): LoRA "
                     f"learns less at {sum(p[1] for p in pairs)} of {len(pairs)} (rank, task) pairs and forgets less "
                     f"(a smaller rise in bits per byte on the pretraining corpus) at {sum(p[2] for p in pairs)}; both "
                     f"hold at {len(both)}" + (f" ({', '.join(both)})" if both else "") + " (means over seeds).")
        for what, learns_less, forgets_less in pairs:
            if not (learns_less and forgets_less):
                failed.append(f"Biderman et al.'s ordering at {what}: LoRA "
                              + ("learns less but does not forget less" if learns_less else
                                 "forgets less but does not learn less" if forgets_less else
                                 "neither learns less nor forgets less"))

    def caveats(self) -> list:
        """What limits the conclusions, from the results themselves."""
        out = []
        capped, count, total = self.capped_cells()
        if total and not count:
            out.append(f"None of the {total} scratch and fine-tuning cells ended at its step cap while still improving.")
        elif total:
            out.append(f"{count} of {total} scratch and fine-tuning cells ({100 * count / total:.0f}%) ended at their "
                       "step cap while still improving (listed in part 1; the goal is at most 10%): their best "
                       "checkpoint is the last, so those losses are upper bounds on what the arm reaches.")
        n_pre = len(self.pretrain_seeds())
        boot = self.bootstrap()
        out.append(f"{n_pre} pretraining run{'s' if n_pre != 1 else ''} per size"
                   + (": fine-tuned intervals hold only fine-tuning noise, and beta rests on "
                      f"{len(self.sizes)} pretrained models." if n_pre == 1 else
                      "; fine-tuning seed s starts from the (s mod n)-th, and the bootstrap resamples them."))
        if boot["replicates"]:
            out.append(f"The transfer fit's intervals come from {boot['replicates']} bootstrap resamples of the "
                       f"{boot['seeds']} seeds (fixed RNG seed), of which {boot['distinct']} are distinct: "
                       "with few seeds the intervals are coarse.")
        grids = {len(ch.grid) for *_, ch in self.efficiency()}
        if grids and max(grids) < 3:
            out.append(f"The learning-rate grid has {max(grids)} value(s) per arm, so it cannot bracket the optimum.")
        choices = [ch for *_, ch in self.efficiency()] + [ch for task in self.task_table().values()
                                                          for ch in task["arms"].values()]
        # each (stage, fraction) once: lm's full arm is the task size's fine-tuned cells at fraction 1
        swept = list({(ch.stage, ch.fraction): ch for ch in choices if ch.on_seed is not None}.values())
        if swept:
            edge = [ch for ch in swept if ch.at_edge]
            bracketing = [ch for ch in swept if len(ch.grid) > 2]  # with two values every choice is at an edge
            out.append(f"Learning rates were chosen by the sweep on seed {swept[0].on_seed}'s validation alone (the "
                       "other seeds ran only at the chosen rate, so every row's seeds share one rate)"
                       + (f"; {len(edge)} of {len(bracketing)} choices are at an edge of their grid"
                          + (" (marked (edge)): the best rate may lie outside it." if edge else ".")
                          if bracketing else "."))
        if not self.depth_breadth():
            out.append("Breadth (bits per byte on the pretraining corpus before and after fine-tuning) was not "
                       "measured in this run: part 6 is empty.")
        return out


def _fmt_steps(choice: Choice) -> str:
    steps = [c["best_step"] for c in choice.cells if c.get("best_step") is not None]
    capped = any(c.get("hit_budget") for c in choice.cells)
    return (f"{np.mean(steps):.0f}" if steps else "—") + (" (cap)" if capped else "")



def _reads(p) -> str:
    """What the censored fit reads of a point (analysis.Study.censored_fit; transfer.censored_observations)."""
    if p.censored is None:
        return "D_T" if p.transferred_tokens > 0 else "left out (D_T <= 0)"
    if p.censored == "above":
        return "lower bound" if p.bound > p.fine_tuned_tokens else "nothing (D_T > 0)"
    return "upper bound" if p.bound > p.fine_tuned_tokens else "left out (D_T <= 0)"


def _notes_text(notes: dict) -> str:
    return "; ".join(f"{n} {what}" for what, n in notes.items()) or "none"


def _fmt_p(p) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"
