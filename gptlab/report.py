"""The report of a sweep: tables and figures computed from its stored results only.

    python -m experiments.report --workdir=DIR

writes DIR/report.md (Markdown), DIR/report.tex (LaTeX booktabs tables) and
DIR/figures/*.png (matplotlib), with each chart's numbers beside it as CSV.
Every number comes from the cells' result.json files (re-collected into
DIR/results.jsonl first) or their metrics.jsonl; nothing is typed in.

- Groups are the cells that differ only in seed; a group's entry is the mean ±
  the sample standard deviation (n - 1) over its finished seeds, with
  "(k/n seeds)" while some are missing, and the state of the rest otherwise.
- The main table pivots the sweep's `metric` (a final metric of result.json):
  rows are `report.rows` (default: the cells' labels), columns the values of the
  ablated factor `report.columns` (default: the one grid field the reported
  stages share). A row whose cells lack that factor (e.g. the pretrained model
  evaluated without fine-tuning) does not depend on it: its value fills the row.
- Selection on validation, reporting on test: a metric named `test_*` is read
  from result.json's `selection.test` (the best checkpoint, chosen on validation,
  scored on the test split); others are the final values. Grid fields in
  `report.select` (e.g. `optimizer.learning_rate`) are chosen per table entry
  (row and column): the value with the best mean `report.selection_metric`
  (default `eval_loss`) on validation wins, and its main metric is shown with the
  chosen value. Choosing on a test metric is refused (`choose`).
- Budgets: a second table gives the mean steps to the best checkpoint per entry;
  "(cap)" marks entries where a seed ended at its step budget while still improving.
- Figures: the metric against the factor (one line per row, error bars: std),
  and per stage the loss curves of every cell (train loss solid, eval loss dashed);
  readable factor names (FACTOR_NAMES), one colour per row in every figure.
"""
import csv
import datetime
import io
import math
import pathlib
import re

import numpy as np

from gptlab import files
from gptlab import selection
from gptlab import sweep as sweep_lib
from gptlab.errors import UserError
from gptlab.metrics import read_metrics
from gptlab.tables import tex_escape

MISSING = "—"
# How figures and tables name the study's factors (the raw key otherwise).
FACTOR_NAMES = {"data.train_fraction": "narrow-data fraction", "optimizer.learning_rate": "peak learning rate",
                "finetune.lora_rank": "LoRA rank", "finetune.strategy": "strategy", "seed": "seed"}


def metric_value(result: dict, metric: str):
    """`metric` of one result.json: test_* of the best checkpoint (chosen on validation), else the final value."""
    if metric.startswith("test_"):
        return ((result.get("selection") or {}).get("test") or {}).get(metric)
    return result.get(metric)


def validation_value(result: dict, metric: str):
    """The best checkpoint's validation `metric` (what every choice reads); the final value for older results."""
    validation = (result.get("selection") or {}).get("validation")
    return validation.get(metric) if validation else result.get(metric)


def choose(candidates: dict, selection_metric: str):
    """The key of `candidates` ({value: [result.json, ...]}) with the best mean validation metric.

    Every choice reads validation only: a test metric here is an error, whatever the caller.
    """
    scores = {key: [validation_value(r, selection_metric) for r in found] for key, found in candidates.items()}
    return selection.choose_on_validation(scores, selection_metric, "report.selection_metric")


def factor_name(key: str) -> str:
    return FACTOR_NAMES.get(key, key)


class Group:
    """Cells of one stage, label and factor values: the seeds of one configuration."""

    def __init__(self, stage: str, label: str, factors: dict):
        self.stage, self.label, self.factors = stage, label, factors
        self.cells = []  # Cell
        self.results = {}  # cell name -> result.json
        self.states = {}  # cell name -> state

    def values(self, metric: str, best: bool = False) -> list:
        out = []
        for result in self.results.values():
            value = result.get("best", {}).get(metric, {}).get("value") if best else metric_value(result, metric)
            if isinstance(value, (int, float)):
                out.append(float(value))
        return out

    def first(self, getter):
        for result in self.results.values():
            value = getter(result)
            if value is not None:
                return value
        return None

    def status_note(self) -> str:
        """"" when every seed finished; else what the missing ones are doing."""
        missing = [s["status"] for name, s in self.states.items() if name not in self.results]
        if not missing:
            return ""
        kinds = sorted(set(missing), key=sweep_lib.STATUSES.index)
        return f"{len(self.results)}/{len(self.cells)} seeds; " + ", ".join(
            f"{missing.count(k)} {k}" for k in kinds)


def mean_std(values: list) -> tuple:
    """(mean, sample std with n - 1, or None for one value); (None, None) for none."""
    if not values:
        return None, None
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def fmt(mean, std, digits: int = 4) -> str:
    if mean is None:
        return MISSING
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _num(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _sorted_values(values) -> list:
    values = list(values)
    unique = list(dict.fromkeys(repr(v) for v in values))
    by_repr = {repr(v): v for v in values}
    items = [by_repr[r] for r in unique]
    if all(_num(v) is not None for v in items):
        return sorted(items)
    return items


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _value_text(value) -> str:
    return sweep_lib.value_text(value)


class Report:
    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir).expanduser().absolute()
        self.sweep = sweep_lib.load_stored(self.workdir)
        self.states = sweep_lib.collect(self.workdir, self.sweep)  # results.jsonl from the result.json files
        self.rows = sweep_lib.read_results(self.workdir)
        self.metric = self.sweep.metric
        self.lower_is_better = not selection.higher_is_better(self.metric)
        by_name = {row["cell"]: row["result"] for row in self.rows}
        self.groups = {}
        for cell in self.sweep.cells:
            key = (cell.stage, cell.label, tuple((k, repr(v)) for k, v in cell.factors.items()))
            group = self.groups.setdefault(key, Group(cell.stage, cell.label, cell.factors))
            group.cells.append(cell)
            group.states[cell.name] = self.states[cell.name]
            if cell.name in by_name:
                group.results[cell.name] = by_name[cell.name]
        spec = self.sweep.report
        upstream = {c.depends_on for c in self.sweep.cells if c.depends_on}
        upstream_stages = {c.stage for c in self.sweep.cells if c.name in upstream}
        stages = list(dict.fromkeys(c.stage for c in self.sweep.cells))
        self.main_stages = list(spec.get("stages") or [s for s in stages if s not in upstream_stages] or stages)
        unknown = [s for s in self.main_stages if s not in stages]
        if unknown:
            raise UserError(f"the sweep's report.stages names stage {unknown[0]!r}, which it does not have "
                            f"(stages: {stages})")
        self.main_groups = [g for g in self.groups.values() if g.stage in self.main_stages]
        self.select = list(spec.get("select") or [])
        self.selection_metric = spec.get("selection_metric", "eval_loss")
        choose({}, self.selection_metric)  # refuses a test metric before anything is written
        self.row_key = spec.get("rows", "label")
        self.column_key = spec.get("columns", self._default_column())
        self.columns = _sorted_values(g.factors[self.column_key] for g in self.main_groups
                                      if self.column_key in g.factors) if self.column_key else []
        self.row_names = list(dict.fromkeys(self._row_of(g) for g in self.main_groups))

    def color_of(self, plt, row: str):
        """One colour per row (strategy), the same in every figure of the report."""
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        labels = list(dict.fromkeys(self._row_of(g) for g in self.groups.values()))
        return colors[labels.index(row) % len(colors)] if row in labels else colors[0]

    def _default_column(self):
        keys = [set(g.factors) - set(self.select) for g in self.main_groups if g.factors]
        common = set.intersection(*keys) if keys else set()
        return sorted(common)[0] if len(common) == 1 else None

    def _row_of(self, group: Group) -> str:
        if self.row_key == "label":
            return group.label
        value = group.factors.get(self.row_key, group.cells[0].overrides.get(self.row_key))
        return f"{_short(self.row_key)}={_value_text(value)}"

    def pivot_groups(self, row: str, column) -> list:
        """The groups in the main table's cell (row, column); a row's groups without the factor fill every column."""
        return [g for g in self.main_groups if self._row_of(g) == row
                and (self.column_key not in g.factors or repr(g.factors[self.column_key]) == repr(column))]

    def pivot(self, best: bool = False) -> list:
        """[(row, [(mean, std, note, n) per column])] for the main table (n: seeds averaged).

        With `report.select`, each entry is the candidate chosen on validation (`chosen`), and
        its note names the chosen value(s); steps to the best checkpoint and budget-cap flags too.
        """
        table = []
        for row in self.row_names:
            entries = []
            for column in (self.columns or [None]):
                groups = self.pivot_groups(row, column) if self.column_key else \
                    [g for g in self.main_groups if self._row_of(g) == row]
                groups, choice = self.chosen(groups)
                values = [v for g in groups for v in g.values(self.metric, best)]
                notes = [g.status_note() for g in groups if g.status_note()] + choice
                entries.append((*mean_std(values), "; ".join(notes), len(values)))
            table.append((row, entries))
        return table

    def chosen(self, groups: list) -> tuple:
        """(the groups of the candidate chosen on validation, ["field=value" notes]); all groups without select."""
        if not self.select:
            return groups, []
        candidates = {}
        for g in groups:
            key = tuple((k, repr(g.factors.get(k))) for k in self.select if k in g.factors)
            candidates.setdefault(key, []).append(g)
        if len(candidates) <= 1:
            return groups, []
        pick = choose({k: [r for g in gs for r in g.results.values()] for k, gs in candidates.items()},
                      self.selection_metric)
        if pick is None:
            return groups, ["no candidate finished"]
        shown = candidates[pick][0].factors
        return candidates[pick], [", ".join(f"{_short(k)}={_value_text(shown[k])}" for k, _ in pick)]

    def budget_table(self) -> list:
        """[(row, [text per column])]: mean steps to the best checkpoint of the chosen entry, of the budget;
        "(cap)" where a seed hit its budget while still improving. Empty when no result has a selection record."""
        table, any_record = [], False
        for row in self.row_names:
            texts = []
            for column in (self.columns or [None]):
                groups = self.pivot_groups(row, column) if self.column_key else \
                    [g for g in self.main_groups if self._row_of(g) == row]
                records = [r["selection"] for g in self.chosen(groups)[0] for r in g.results.values()
                           if r.get("selection") and r["selection"].get("best_step") is not None]
                any_record = any_record or bool(records)
                if not records:
                    texts.append(MISSING)
                    continue
                steps = np.mean([s["best_step"] for s in records])
                cap = any(s.get("hit_budget_while_improving") for s in records)
                stopped = sum(bool(s.get("stopped_early")) for s in records)
                texts.append(f"{steps:.0f} / {records[0].get('budget_steps')} ({stopped}/{len(records)} stopped early)"
                             + (" (cap)" if cap else ""))
            table.append((row, texts))
        return table if any_record else []

    def _best_per_column(self, table) -> list:
        best = []
        for i in range(len(table[0][1]) if table else 0):
            means = [entries[i][0] for _, entries in table if entries[i][0] is not None]
            best.append((min(means) if self.lower_is_better else max(means)) if means else None)
        return best

    # -- Markdown ------------------------------------------------------------------------------

    def markdown(self, figures: list) -> str:
        sweep = self.sweep
        counts = sweep_lib.count_statuses(self.states)
        lines = [f"# Sweep `{sweep.name}`", ""]
        if sweep.description:
            lines += [sweep.description, ""]
        lines += [f"Produced by `python -m experiments.sweep --config={sweep.source} --workdir=DIR` and "
                  "`python -m experiments.report --workdir=DIR`; every number below is read from the cells' "
                  f"`result.json` (collected in `DIR/results.jsonl`). Cells: {len(sweep.cells)} "
                  f"({sweep_lib.counts_text(counts)}).", ""]
        lines += self._provenance() + [""]
        better = "lower" if self.lower_is_better else "higher"
        source = ("of the best checkpoint (chosen on the validation split), scored on the test split"
                  if self.metric.startswith("test_") else
                  "of the best checkpoint, on the validation split" if self.metric.startswith("eval_") else "")
        what = (f"`{self.metric}` {source} ({better} is better), mean ± sample std over seeds; "
                "bold: the best mean in each column")
        if self.select:
            what += (f"; {', '.join(f'`{k}`' for k in self.select)} chosen per entry on validation "
                     f"`{self.selection_metric}` (the chosen value in brackets)")

        factor = f"{factor_name(self.column_key)} (`{self.column_key}`)" if self.column_key else None
        lines += [f"## Main table: {what}", ""]
        lines += self._md_pivot(self.pivot())
        if factor:
            lines += ["", f"Columns: {factor}. Rows without that factor do not depend on it; their value fills the row."]
        budget = self.budget_table()
        if budget:
            lines += ["", "## Steps to the best checkpoint (mean over seeds) / step budget", ""]
            lines += ["| " + " | ".join([self._row_title()] + [self._column_title(c) for c in self.columns or [None]])
                      + " |", "| --- |" + " ---: |" * len(self.columns or [None])]
            lines += ["| " + " | ".join([row] + texts) + " |" for row, texts in budget]
            lines += ["", "(cap): a seed ended at its step budget while its validation metric was still improving: "
                          "its number is a lower bound on what more steps would give."]
        if not self.metric.startswith("test_"):  # the protocol's own table already is the best checkpoint's
            lines += ["", f"## Best `{self.metric}` reached during training (over the evaluations logged; chosen and "
                          "measured on the same split, so optimistic: report test_* metrics for a study)", ""]
            lines += self._md_pivot(self.pivot(best=True))
        lines += ["", "## Every configuration", ""] + self._md_long()
        lines += ["", "## Cells not finished", ""] + self._md_unfinished()
        if figures:
            lines += ["", "## Figures", ""]
            for path, caption in figures:
                lines += [f"![{caption}]({path.relative_to(self.workdir).as_posix()})", "", f"*{caption}*", ""]
        return "\n".join(lines).rstrip() + "\n"

    def _provenance(self) -> list:
        commits, versions, devices = set(), set(), set()
        for row in self.rows:
            result = row["result"]
            git = result.get("git") or {}
            if git.get("commit"):
                commits.add(git["commit"][:12] + (" (uncommitted changes)" if git.get("dirty") else ""))
            versions.add(", ".join(f"{k} {v}" for k, v in (result.get("versions") or {}).items() if v))
            device = result.get("device") or {}
            devices.add(f"{device.get('count', '?')} x {device.get('kind', '?')}")
        return [f"- code: git {', '.join(sorted(commits)) or 'unknown'}",
                f"- packages: {'; '.join(sorted(versions)) or 'unknown'}",
                f"- devices: {', '.join(sorted(devices)) or 'unknown'}",
                f"- report written {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"]

    def _column_title(self, column) -> str:
        return f"{_short(self.column_key)}={_value_text(column)}" if self.column_key else self.metric

    def _md_pivot(self, table) -> list:
        columns = self.columns or [None]
        lines = ["| " + " | ".join([self._row_title()] + [self._column_title(c) for c in columns]) + " |",
                 "| --- |" + " ---: |" * len(columns)]
        best = self._best_per_column(table)
        for row, entries in table:
            texts = []
            for (mean, std, note, _), top in zip(entries, best):
                text = fmt(mean, std)
                if mean is not None and top is not None and mean == top and len(table) > 1:
                    text = f"**{text}**"
                texts.append(text + (f" ({note})" if note else ""))
            lines.append("| " + " | ".join([row] + texts) + " |")
        return lines

    def _row_title(self) -> str:
        return "run" if self.row_key == "label" else _short(self.row_key)

    def _factor_keys(self) -> list:
        return list(dict.fromkeys(k for g in self.groups.values() for k in g.factors))

    def long_rows(self) -> list:
        """One row per group (all stages): the values of the long table, as text."""
        rows = []
        for group in self.groups.values():
            params = group.first(lambda r: r.get("params"))
            steps = group.first(lambda r: r.get("steps"))
            tokens = group.first(lambda r: r.get("tokens_seen"))
            times = [r["timing"]["wall_time_s"] for r in group.results.values() if r.get("timing")]
            rows.append({
                "stage": group.stage, "run": group.label,
                **{_short(k): (_value_text(group.factors[k]) if k in group.factors else MISSING)
                   for k in self._factor_keys()},
                "seeds": f"{len(group.results)}/{len(group.cells)}",
                self.metric: fmt(*mean_std(group.values(self.metric))),
                f"best {self.metric}": fmt(*mean_std(group.values(self.metric, best=True))),
                "trainable": (f"{params['trainable']:,} ({params['trainable_percent']:.2f}%)" if params else MISSING),
                "steps": str(steps) if steps is not None else MISSING,
                "tokens seen": f"{tokens:,}" if tokens is not None else MISSING,
                "train time (s)": f"{np.mean(times):.1f}" if times else MISSING,
                "status": group.status_note() or "finished",
            })
        return rows

    def _md_long(self) -> list:
        rows = self.long_rows()
        if not rows:
            return ["(no cells)"]
        keys = list(rows[0])
        lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
        lines += ["| " + " | ".join(row[k] for k in keys) + " |" for row in rows]
        return lines + ["", "Trainable: parameters that train, position embeddings included (percent of all). "
                            "Train time: wall time of the run's own process from start-up to result.json, "
                            "compilation included, data preparation excluded (mean over seeds)."]

    def _md_unfinished(self) -> list:
        rows = [(cell, self.states[cell.name]) for cell in self.sweep.cells
                if self.states[cell.name]["status"] != "finished"]
        if not rows:
            return [f"None: all {len(self.sweep.cells)} cells finished."]
        lines = ["| cell | status | attempts | error |", "| --- | --- | ---: | --- |"]
        for cell, state in rows:
            error = (state.get("error") or "").replace("|", "\\|")
            lines.append(f"| {cell.name} | {state['status']} | {state.get('attempts', 0)} | {error} |")
        return lines

    # -- LaTeX ---------------------------------------------------------------------------------

    def latex(self) -> str:
        table = self.pivot()
        columns = self.columns or [None]
        best = self._best_per_column(table)
        name = tex_escape(self.sweep.name)
        lines = ["% Generated by python -m experiments.report from the sweep's result.json files; do not edit.",
                 "% Needs \\usepackage{booktabs}.", "",
                 "\\begin{table}[t]", "\\centering",
                 f"\\caption{{{name}: final {tex_escape(self.metric)} "
                 f"({'lower' if self.lower_is_better else 'higher'} is better), mean $\\pm$ std over seeds.}}",
                 f"\\label{{tab:{re.sub(r'[^A-Za-z0-9]+', '-', self.sweep.name)}}}",
                 "\\begin{tabular}{l" + "r" * len(columns) + "}", "\\toprule"]
        if self.column_key:
            lines.append(f" & \\multicolumn{{{len(columns)}}}{{c}}{{{tex_escape(_short(self.column_key))}}} \\\\")
            lines.append(f"\\cmidrule(lr){{2-{len(columns) + 1}}}")
            lines.append(tex_escape(self._row_title()) + " & " + " & ".join(tex_escape(_value_text(c)) for c in columns) + " \\\\")
        else:
            lines.append(tex_escape(self._row_title()) + " & " + tex_escape(self.metric) + " \\\\")
        lines.append("\\midrule")
        for row, entries in table:
            texts = []
            for (mean, std, note, _), top in zip(entries, best):
                if mean is None:
                    texts.append("--")
                    continue
                text = f"{mean:.4f}" + (f" \\pm {std:.4f}" if std is not None else "")
                if top is not None and mean == top and len(table) > 1:
                    text = f"\\mathbf{{{text}}}"
                texts.append(f"${text}$" + ("$^*$" if note else ""))
            lines.append(tex_escape(row) + " & " + " & ".join(texts) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        if any(entry[2] for _, entries in table for entry in entries):
            lines.append("\\\\[2pt]{\\footnotesize $^*$ not every seed has finished.}")
        lines += ["\\end{table}", ""]
        lines += self._latex_long()
        return "\n".join(lines) + "\n"

    def _latex_long(self) -> list:
        rows = self.long_rows()
        if not rows:
            return []
        keys = [k for k in rows[0] if k != "status"]
        lines = ["\\begin{table}[t]", "\\centering", "\\small",
                 f"\\caption{{{tex_escape(self.sweep.name)}: every configuration.}}",
                 "\\begin{tabular}{" + "l" * 2 + "r" * (len(keys) - 2) + "}", "\\toprule",
                 " & ".join(tex_escape(k) for k in keys) + " \\\\", "\\midrule"]
        for row in rows:
            cells = [tex_escape(row[k]).replace("±", "$\\pm$") for k in keys]
            lines.append(" & ".join(cells) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
        return lines

    # -- figures ---------------------------------------------------------------------------------

    def figures(self) -> list:
        """Writes the PNGs (and the metric chart's CSV); returns [(path, caption)]."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        out = self.workdir / "figures"
        out.mkdir(exist_ok=True)
        for old in list(out.glob("*.png")) + list(out.glob("*.csv")):
            old.unlink()  # figures of cells or factors that no longer exist
        written = []
        chart = self._metric_chart(plt, out)
        if chart:
            written.append(chart)
        for stage in dict.fromkeys(c.stage for c in self.sweep.cells):
            curves = self._curves(plt, out, stage)
            if curves:
                written.append(curves)
        return written

    def chart_data(self) -> list:
        """[(row, x or None, mean, std, n)]: what the metric chart plots (also written as CSV).

        x is None for a row that does not depend on the factor (drawn as a flat line).
        """
        data = []
        for row, entries in self.pivot():
            flat = not self.column_key or all(self.column_key not in g.factors
                                              for g in self.main_groups if self._row_of(g) == row)
            for column, (mean, std, _, n) in zip(self.columns or [None], entries):
                if mean is not None:
                    data.append((row, None if flat else column, mean, std, n))
                if flat:
                    break
        return data

    def _metric_chart(self, plt, out: pathlib.Path):
        data = self.chart_data()
        if not data:
            return None
        factor = _short(self.column_key) if self.column_key else None
        stem = f"{self.metric}_vs_{factor}" if factor else self.metric
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["row", self.column_key or "", f"{self.metric}_mean", f"{self.metric}_std", "seeds"])
        for row, x, mean, std, n in data:
            writer.writerow([row, "" if x is None else x, repr(mean), "" if std is None else repr(std), n])
        files.write_atomic(out / f"{stem}.csv", text.getvalue())
        fig, ax = plt.subplots(figsize=(7, 4.5))
        numeric = bool(self.columns) and all(_num(c) is not None for c in self.columns)
        rows = list(dict.fromkeys(d[0] for d in data))
        if self.column_key:
            positions = {repr(c): (c if numeric else i) for i, c in enumerate(self.columns)}
            for i, row in enumerate(rows):
                points = [(positions[repr(x)], m, s) for r, x, m, s, _ in data if r == row and x is not None]
                flat = [(m, s) for r, x, m, s, _ in data if r == row and x is None]
                color = self.color_of(plt, row)
                if points:
                    xs, ms, ss = zip(*points)
                    ax.errorbar(xs, ms, yerr=[s or 0.0 for s in ss], marker="o", capsize=3, label=row, color=color)
                for m, s in flat:
                    ax.axhline(m, linestyle="--", color=color, label=row)
                    if s:
                        ax.axhspan(m - s, m + s, color=color, alpha=0.12)
            if numeric and min(self.columns) > 0 and max(self.columns) / min(self.columns) >= 10:
                ax.set_xscale("log")
            ax.set_xticks([positions[repr(c)] for c in self.columns])
            ax.set_xticklabels([_value_text(c) for c in self.columns])
            ax.set_xlabel(factor_name(self.column_key))
            ax.legend(fontsize=8, ncol=2)
            caption = (f"{self.metric} against {factor_name(self.column_key)} (mean ± std over seeds; dashed: "
                       "runs that do not depend on it)")
        else:
            xs = np.arange(len(data))
            ax.bar(xs, [d[2] for d in data], yerr=[d[3] or 0.0 for d in data], capsize=3,
                   color=[self.color_of(plt, d[0]) for d in data])
            ax.set_xticks(xs)
            ax.set_xticklabels([d[0] for d in data], rotation=30, ha="right")
            caption = f"{self.metric} per configuration (mean ± std over seeds)"
        ax.set_ylabel(_metric_label(self.metric))
        ax.set_title(self.sweep.name, fontsize=10, wrap=True)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path, caption

    def _curves(self, plt, out: pathlib.Path, stage: str):
        groups = [g for g in self.groups.values() if g.stage == stage]
        curves = {g.cells[0].name: {c.name: read_metrics(sweep_lib.run_dir(self.workdir, c.name)) for c in g.cells}
                  for g in groups}
        if not any(records for per_cell in curves.values() for records in per_cell.values()):
            return None  # nothing logged (e.g. evaluation-only cells)
        labels = list(dict.fromkeys(g.label for g in groups))
        by_column = self.column_key and all(self.column_key in g.factors for g in groups)
        if by_column:
            columns = _sorted_values(g.factors[self.column_key] for g in groups)
            layout = {id(g): (labels.index(g.label), [repr(c) for c in columns].index(repr(g.factors[self.column_key])))
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
                train = [(r["step"], r["train_loss"]) for r in records if _num(r.get("train_loss")) is not None]
                evals = [(r["step"], r["eval_loss"]) for r in records if _num(r.get("eval_loss")) is not None]
                if train:
                    ax.plot(*zip(*train), color=color, linewidth=1, label=f"train, seed {cell.seed}")
                if evals:
                    ax.plot(*zip(*evals), color=color, linestyle="--", marker=".", linewidth=1,
                            label=f"eval, seed {cell.seed}")
            title = g.label + "".join(f", {factor_name(k)} {_value_text(v)}" for k, v in g.factors.items())
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


def write_report(workdir) -> dict:
    """Writes DIR/report.md, DIR/report.tex and DIR/figures/; returns their paths."""
    report = Report(workdir)
    figures = report.figures()
    md, tex = report.workdir / "report.md", report.workdir / "report.tex"
    files.write_atomic(md, report.markdown(figures))
    files.write_atomic(tex, report.latex())
    return {"markdown": md, "latex": tex, "figures": [p for p, _ in figures], "states": report.states}
