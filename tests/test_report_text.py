"""The sweep report's pivot cells: the best mean of each column is bold in Markdown and LaTeX alike."""
from gptlab.report import text


class _Pivot:
    """What the row builder asks of a report: the best mean per column (lower is better here)."""

    @staticmethod
    def best_per_column(table):
        return [min(e[i][0] for _, e in table if e[i][0] is not None) for i in range(len(table[0][1]))]


TABLE = [("full", [(1.5, 0.1, "", None), (2.0, None, "", None)]),
         ("lora", [(1.7, 0.2, "1/3 seeds", None), (None, None, "", None)])]


def test_markdown_cells_bold_the_best_of_each_column_and_carry_their_notes():
    rows = text._pivot_rows(_Pivot, TABLE, text._md_cell)
    assert rows == [["full", "**1.5000 ± 0.1000**", "**2.0000**"], ["lora", "1.7000 ± 0.2000 (1/3 seeds)", "—"]]


def test_latex_cells_bold_the_best_in_math_mode_and_star_unfinished_entries():
    rows = text._pivot_rows(_Pivot, TABLE, text._tex_cell)
    assert rows == [["full", r"$\mathbf{1.5000 \pm 0.1000}$", r"$\mathbf{2.0000}$"],
                    ["lora", r"$1.7000 \pm 0.2000$$^*$", "--"]]


def test_a_one_row_table_has_no_bold():
    rows = text._pivot_rows(_Pivot, TABLE[:1], text._md_cell)
    assert rows == [["full", "1.5000 ± 0.1000", "2.0000"]]
