"""Tables of results as Markdown, LaTeX (booktabs) and CSV: the one place rows become a table.

Cells are given as text already formatted (numbers with their digits, "±" intervals); this module only
lays them out and escapes what each format needs. `align` is one letter per column: "l" or "r".
"""
import csv
import io
import pathlib

from gptlab import files

_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "—": "--", "≈": r"$\approx$"}


def tex_escape(text) -> str:
    """Plain text as LaTeX: its special characters escaped, and the few non-ASCII signs reports use."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def _aligns(align, n: int) -> str:
    align = align or "l" * n
    if len(align) != n or set(align) - set("lr"):
        raise ValueError(f"align={align!r} must be one letter l or r per column ({n} columns)")
    return align


def markdown(header, rows, align=None) -> list:
    """A Markdown (GitHub) table as lines; '|' inside a cell is escaped and line breaks become spaces."""
    def cell(value) -> str:
        return " ".join(str(value).replace("|", "\\|").split("\n"))

    rule = {"l": "---", "r": "---:"}
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "| " + " | ".join(rule[a] for a in _aligns(align, len(header))) + " |"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells for {len(header)} columns: {row!r}")
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return lines


def latex(header, rows, align=None, caption=None, label=None, escape=True, size=None, span=None, note=None) -> list:
    """A booktabs table (needs \\usepackage{booktabs}) as lines, in a table float when it has a caption.

    escape=False keeps cells as given, for cells that already are LaTeX (math, bold). `span`: a title over
    every column but the first (the factor the columns are values of); `note`: a line under the tabular,
    inside the float (a footnote to the table). Both are LaTeX as given."""
    text = tex_escape if escape else str
    n = len(header)
    body = [r"\begin{tabular}{" + _aligns(align, n) + "}", r"\toprule"]
    if span is not None:
        body += [rf" & \multicolumn{{{n - 1}}}{{c}}{{{span}}} \\", rf"\cmidrule(lr){{2-{n}}}"]
    body += [" & ".join(text(h) for h in header) + r" \\", r"\midrule"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells for {len(header)} columns: {row!r}")
        body.append(" & ".join(text(c) for c in row) + r" \\")
    body += [r"\bottomrule", r"\end{tabular}"] + ([note] if note else [])
    if caption is None:
        return body
    head = [r"\begin{table}[t]", r"\centering"] + ([size] if size else []) + [rf"\caption{{{caption}}}"]
    head += [rf"\label{{{label}}}"] if label else []
    return head + body + [r"\end{table}"]


def csv_text(header, rows) -> str:
    """CSV with floats written exactly (repr), so a reader gets back the numbers the report used."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for row in rows:
        writer.writerow([repr(x) if isinstance(x, float) else x for x in row])
    return text.getvalue()


def write_csv(path: pathlib.Path, header, rows) -> None:
    files.write_atomic(path, csv_text(header, rows))
