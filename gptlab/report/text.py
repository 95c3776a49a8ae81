"""A sweep report as text: report.md (Markdown) and report.tex (LaTeX booktabs tables), from a `model.Report`."""
import datetime
import re

from gptlab import sweep as sweep_lib
from gptlab import tables
from gptlab.report.model import factor_name, fmt, short_key
from gptlab.tables import tex_escape


def markdown(report, figures: list) -> str:
    sweep = report.sweep
    counts = sweep_lib.count_statuses(report.states)
    lines = [f"# Sweep `{sweep.name}`", ""]
    if sweep.description:
        lines += [sweep.description, ""]
    lines += [f"Produced by `python -m experiments.sweep --config={sweep.source} --workdir=DIR` and "
              "`python -m experiments.report --workdir=DIR`; every number below is read from the cells' "
              f"`result.json` (collected in `DIR/results.jsonl`). Cells: {len(sweep.cells)} "
              f"({sweep_lib.counts_text(counts)}).", ""]
    lines += _provenance(report) + [""]
    better = "lower" if report.lower_is_better else "higher"
    source = ("of the best checkpoint (chosen on the validation split), scored on the test split"
              if report.metric.startswith("test_") else
              "of the best checkpoint, on the validation split" if report.metric.startswith("eval_") else "")
    what = (f"`{report.metric}` {source} ({better} is better), mean ± sample std over seeds; "
            "bold: the best mean in each column")
    if report.select:
        what += (f"; {', '.join(f'`{k}`' for k in report.select)} chosen per entry on validation "
                 f"`{report.selection_metric}` (the chosen value in brackets)")

    factor = f"{factor_name(report.column_key)} (`{report.column_key}`)" if report.column_key else None
    lines += [f"## Main table: {what}", ""]
    lines += _md_pivot(report, report.pivot())
    if factor:
        lines += ["", f"Columns: {factor}. Rows without that factor do not depend on it; their value fills the row."]
    budget = report.budget_table()
    if budget:
        lines += ["", "## Steps to the best checkpoint (mean over seeds) / step budget", ""]
        columns = report.columns or [None]
        lines += tables.markdown([report.row_title()] + [report.column_title(c) for c in columns],
                                 [[row] + texts for row, texts in budget], "l" + "r" * len(columns))
        lines += ["", "(cap): a seed ended at its step budget while its validation metric was still improving: "
                      "its number is a lower bound on what more steps would give."]
    if not report.metric.startswith("test_"):  # the protocol's own table already is the best checkpoint's
        lines += ["", f"## Best `{report.metric}` reached during training (over the evaluations logged; chosen and "
                      "measured on the same split, so optimistic: report test_* metrics for a study)", ""]
        lines += _md_pivot(report, report.pivot(best=True))
    lines += ["", "## Every configuration", ""] + _md_long(report)
    lines += ["", "## Cells not finished", ""] + _md_unfinished(report)
    if figures:
        lines += ["", "## Figures", ""]
        for path, caption in figures:
            lines += [f"![{caption}]({path.relative_to(report.workdir).as_posix()})", "", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _provenance(report) -> list:
    commits, versions, devices = set(), set(), set()
    for row in report.rows:
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


def _pivot_rows(report, table, cell) -> list:
    """The pivot's rows as [row, cell text...]: cell(mean, std, note, is_best) formats one entry (is_best: the
    best mean of its column, in a table of more than one row)."""
    best = report.best_per_column(table)
    return [[row] + [cell(mean, std, note, mean is not None and top is not None and mean == top and len(table) > 1)
                     for (mean, std, note, _), top in zip(entries, best)]
            for row, entries in table]


def _md_cell(mean, std, note, is_best) -> str:
    text = f"**{fmt(mean, std)}**" if is_best else fmt(mean, std)
    return text + (f" ({note})" if note else "")


def _tex_cell(mean, std, note, is_best) -> str:
    if mean is None:
        return "--"
    text = f"{mean:.4f}" + (f" \\pm {std:.4f}" if std is not None else "")
    return (f"$\\mathbf{{{text}}}$" if is_best else f"${text}$") + ("$^*$" if note else "")


def _md_pivot(report, table) -> list:
    columns = report.columns or [None]
    rows = _pivot_rows(report, table, _md_cell)
    return tables.markdown([report.row_title()] + [report.column_title(c) for c in columns], rows,
                           "l" + "r" * len(columns))


def _md_long(report) -> list:
    rows = report.long_rows()
    if not rows:
        return ["(no cells)"]
    keys = list(rows[0])
    return tables.markdown(keys, [[row[k] for k in keys] for row in rows]) + ["", "Trainable: parameters that train, position embeddings included (percent of all). "
                        "Train time: wall time of the run's own process from start-up to result.json, "
                        "compilation included, data preparation excluded (mean over seeds)."]


def _md_unfinished(report) -> list:
    skipped = sum(report.states[cell.name]["status"] == "skipped" for cell in report.sweep.cells)
    # skipped cells are not missing: their stage's choice (made on one seed) did not pick their value
    note = [f"{skipped} cells skipped: a choosing stage ran them only on its choice seed."] if skipped else []
    rows = [(cell, report.states[cell.name]) for cell in report.sweep.cells
            if report.states[cell.name]["status"] not in ("finished", "skipped")]
    if not rows:
        return [f"None: all {len(report.sweep.cells) - skipped} cells to run finished."] + (["", *note] if note else [])
    return tables.markdown(["cell", "status", "attempts", "error"],
                           [[cell.name, state["status"], state.get("attempts", 0), state.get("error") or ""]
                            for cell, state in rows], "llrl") + (["", *note] if note else [])


def latex(report) -> str:
    table = report.pivot()
    columns = report.columns or [None]
    rows = [[tex_escape(row)] + texts for row, *texts in _pivot_rows(report, table, _tex_cell)]
    if report.column_key:
        header, span = [report.row_title()] + [sweep_lib.value_text(c) for c in columns], tex_escape(short_key(report.column_key))
    else:
        header, span = [report.row_title(), report.metric], None
    unfinished = any(entry[2] for _, entries in table for entry in entries)
    lines = ["% Generated by python -m experiments.report from the sweep's result.json files; do not edit.",
             "% Needs \\usepackage{booktabs}.", ""]
    lines += tables.latex(
        [tex_escape(h) for h in header], rows, "l" + "r" * len(columns), escape=False, span=span,
        caption=(f"{tex_escape(report.sweep.name)}: final {tex_escape(report.metric)} "
                 f"({'lower' if report.lower_is_better else 'higher'} is better), mean $\\pm$ std over seeds."),
        label=f"tab:{re.sub(r'[^A-Za-z0-9]+', '-', report.sweep.name)}",
        note="\\\\[2pt]{\\footnotesize $^*$ not every seed has finished.}" if unfinished else None)
    lines += [""] + _latex_long(report)
    return "\n".join(lines) + "\n"


def _latex_long(report) -> list:
    rows = report.long_rows()
    if not rows:
        return []
    keys = [k for k in rows[0] if k != "status"]
    return tables.latex(keys, [[row[k] for k in keys] for row in rows], "l" * 2 + "r" * (len(keys) - 2),
                        caption=f"{tex_escape(report.sweep.name)}: every configuration.", size="\\small") + [""]
