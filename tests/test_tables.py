"""The one table writer: the layout each format needs, and cells escaped so a table never breaks."""
import csv
import io

import pytest

from gptlab import tables


def test_markdown_aligns_columns_and_escapes_pipes_and_line_breaks():
    lines = tables.markdown(["arm", "loss"], [["lora | r4", "1.5000 ± 0.0100"], ["full\nrun", "1.2"]], align="lr")
    assert lines == ["| arm | loss |", "| --- | ---: |",
                     "| lora \\| r4 | 1.5000 ± 0.0100 |", "| full run | 1.2 |"]


def test_a_row_of_the_wrong_width_or_a_bad_alignment_is_refused():
    with pytest.raises(ValueError, match="2 columns"):
        tables.markdown(["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="one letter l or r per column"):
        tables.markdown(["a", "b"], [], align="lc")


def test_latex_escapes_text_cells_and_keeps_latex_cells_when_asked():
    body = tables.latex(["task_name", "loss"], [["50%", "1 ± 2"]], align="lr")
    assert body == [r"\begin{tabular}{lr}", r"\toprule", r"task\_name & loss \\", r"\midrule",
                    r"50\% & 1 $\pm$ 2 \\", r"\bottomrule", r"\end{tabular}"]
    floating = tables.latex(["x"], [[r"$\mathbf{1}$"]], caption="Cap", label="tab:x", escape=False)
    assert floating[:4] == [r"\begin{table}[t]", r"\centering", r"\caption{Cap}", r"\label{tab:x}"]
    assert r"$\mathbf{1}$ \\" in floating and floating[-1] == r"\end{table}"


def test_csv_keeps_floats_exact_and_quotes_commas(tmp_path):
    value = 0.1 + 0.2
    tables.write_csv(tmp_path / "t.csv", ["name", "value"], [["a, b", value], ["c", 3]])
    rows = list(csv.reader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert rows == [["name", "value"], ["a, b", repr(value)], ["c", "3"]]
    assert float(rows[1][1]) == value
