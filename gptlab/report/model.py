"""The model of a sweep's report: its groups of seeds, choices on validation and the tables' numbers.

What the report computes, from the cells' result.json files only; text.py writes it as Markdown and LaTeX,
figures.py as PNGs with their CSVs (the package's docstring says what the report is).
"""
import pathlib

import numpy as np

from gptlab import selection
from gptlab import sweep as sweep_lib
from gptlab.errors import UserError

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


def number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def sorted_values(values) -> list:
    values = list(values)
    unique = list(dict.fromkeys(repr(v) for v in values))
    by_repr = {repr(v): v for v in values}
    items = [by_repr[r] for r in unique]
    if all(number(v) is not None for v in items):
        return sorted(items)
    return items


def short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1]


class Report:
    """A sweep's stored results as groups of seeds, and the tables computed from them (`pivot`, `budget_table`,
    `long_rows`, `chart_data`); gptlab/report/text.py and figures.py lay them out."""

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
        self.columns = sorted_values(g.factors[self.column_key] for g in self.main_groups
                                      if self.column_key in g.factors) if self.column_key else []
        self.row_names = list(dict.fromkeys(self.row_of(g) for g in self.main_groups))

    def _default_column(self):
        keys = [set(g.factors) - set(self.select) for g in self.main_groups if g.factors]
        common = set.intersection(*keys) if keys else set()
        return sorted(common)[0] if len(common) == 1 else None

    def row_of(self, group: Group) -> str:
        if self.row_key == "label":
            return group.label
        value = group.factors.get(self.row_key, group.cells[0].overrides.get(self.row_key))
        return f"{short_key(self.row_key)}={sweep_lib.value_text(value)}"

    def pivot_groups(self, row: str, column) -> list:
        """The groups in the main table's cell (row, column); a row's groups without the factor fill every column."""
        return [g for g in self.main_groups if self.row_of(g) == row
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
                    [g for g in self.main_groups if self.row_of(g) == row]
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
        return candidates[pick], [", ".join(f"{short_key(k)}={sweep_lib.value_text(shown[k])}" for k, _ in pick)]

    def budget_table(self) -> list:
        """[(row, [text per column])]: mean steps to the best checkpoint of the chosen entry, of the budget;
        "(cap)" where a seed hit its budget while still improving. Empty when no result has a selection record."""
        table, any_record = [], False
        for row in self.row_names:
            texts = []
            for column in (self.columns or [None]):
                groups = self.pivot_groups(row, column) if self.column_key else \
                    [g for g in self.main_groups if self.row_of(g) == row]
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

    def best_per_column(self, table) -> list:
        best = []
        for i in range(len(table[0][1]) if table else 0):
            means = [entries[i][0] for _, entries in table if entries[i][0] is not None]
            best.append((min(means) if self.lower_is_better else max(means)) if means else None)
        return best

    def row_title(self) -> str:
        return "run" if self.row_key == "label" else short_key(self.row_key)

    def column_title(self, column) -> str:
        return f"{short_key(self.column_key)}={sweep_lib.value_text(column)}" if self.column_key else self.metric

    def factor_keys(self) -> list:
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
                **{short_key(k): (sweep_lib.value_text(group.factors[k]) if k in group.factors else MISSING)
                   for k in self.factor_keys()},
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

    def chart_data(self) -> list:
        """[(row, x or None, mean, std, n)]: what the metric chart plots (also written as CSV).

        x is None for a row that does not depend on the factor (drawn as a flat line).
        """
        data = []
        for row, entries in self.pivot():
            flat = not self.column_key or all(self.column_key not in g.factors
                                              for g in self.main_groups if self.row_of(g) == row)
            for column, (mean, std, _, n) in zip(self.columns or [None], entries):
                if mean is not None:
                    data.append((row, None if flat else column, mean, std, n))
                if flat:
                    break
        return data
