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

model.py computes the report (groups, choices, the tables' numbers); text.py writes it as Markdown and
LaTeX, figures.py as PNGs and CSVs, all their tables through gptlab.tables.
"""
from gptlab import files
from gptlab.report import figures as figures_lib
from gptlab.report import text
from gptlab.report.model import (FACTOR_NAMES, MISSING, Group, Report, choose, factor_name, fmt, mean_std,
                                 metric_value, validation_value)

__all__ = ["FACTOR_NAMES", "MISSING", "Group", "Report", "choose", "factor_name", "fmt", "mean_std", "metric_value",
           "validation_value", "write_report"]


def write_report(workdir) -> dict:
    """Writes DIR/report.md, DIR/report.tex and DIR/figures/; returns their paths."""
    report = Report(workdir)
    figures = figures_lib.figures(report)
    md, tex = report.workdir / "report.md", report.workdir / "report.tex"
    files.write_atomic(md, text.markdown(report, figures))
    files.write_atomic(tex, text.latex(report))
    return {"markdown": md, "latex": tex, "figures": [p for p, _ in figures], "states": report.states}
