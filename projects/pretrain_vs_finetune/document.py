"""The study report as Markdown and LaTeX documents (report.py writes them)."""
from gptlab import tables as table_lib
from gptlab.tables import tex_escape
from projects.pretrain_vs_finetune.analysis import fmt_int


class Document:
    """Mixed into analysis.Study by report.StudyReport."""

    def markdown(self, figures: list) -> str:
        t = self.tables()
        p = self.provenance
        lines = [f"# {p['name']}: how much is pretraining worth?", "", self.provenance.get("description", ""), "",
                 f"Made by `{p['command']}` (the report alone, from stored results: add `--report_only`); "
                 f"code version {p['commits']}; {p['device']}. {p['cells']}, {p['cell_hours']:.2f} cell-hours"
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
        lines += ["Caveats:", ""] + [f"- {c}" for c in self.caveats()] + [""]
        for title, key, fig in SECTIONS:
            lines += [f"## {title}", ""]
            lines += self._notes(key)
            lines += table_lib.markdown(*t[key]) + [""] if t[key][1] or key != "breadth" else []
            if key == "efficiency":
                lines += self._capped_lines(t, markdown=True)
            if key == "transfer":
                lines += [FIT_TITLE + ":", ""] + table_lib.markdown(*t["fit"]) + [""]
            if key == "tasks":
                lines += [f"- **Check:** {w}" for w in self.leak_warnings()] + ([""] if self.leak_warnings() else [])
                lines += [GAIN_TITLE + ":", ""] + table_lib.markdown(*t["gain"]) + [""]
            if fig and fig in figs:
                path, caption = figs[fig]
                lines += [f"![{caption}]({path})", "", f"*{caption}* Numbers: `{path[:-4]}.csv`.", ""]
        return "\n".join(lines).rstrip() + "\n"

    def _capped_lines(self, t, markdown: bool) -> list:
        _, count, total = self.capped_cells()
        text = (f"Cells that ended at their step cap while still improving: {count} of {total} scratch and "
                f"fine-tuning cells ({100 * count / total:.0f}%; pretraining runs a fixed schedule and is not counted)"
                if total else "No scratch or fine-tuning cells.")
        if not count:
            return [text + ".", ""]
        if markdown:
            return [text + ":", ""] + table_lib.markdown(*t["capped"]) + [""]
        return [tex_escape(text) + r" (table \ref{tab:capped})."]

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
                         "loss an upper bound ('<'). The old least-squares fit leaves all of these out; the censored "
                         "likelihood (a Tobit model of log D_T with normal noise) keeps every bound: a lower bound "
                         "adds the normal's survival term, an upper bound its distribution function; a bound D_T > 0 "
                         "adds nothing. Points that say D_T <= 0 (no better than scratch with the same data) are left "
                         "out and counted: a law of positive D_T has no room for them, and entering them as bounds "
                         "at any c > 0 makes the fit depend on that arbitrary c (the last column enters them at one "
                         "token to show how much). D_T's bootstrap interval is over the resamples in which it is "
                         "measured (their count shown when not all). "
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
                       "chosen learning rate), with the paired t-test's p-value and Holm's adjustment over all "
                       f"{len(self.comparisons())} comparisons of this table as one family; 'a better' or 'b better' "
                       "only where the Holm-adjusted p-value is at most 0.05.", ""],
            "breadth": ["Depth: the test gain on the narrow task over the untouched pretrained model (lm, sft: "
                        "test loss saved; classify: accuracy gained), per seed. Breadth lost: bits per byte on the "
                        "pretraining corpus's validation split after fine-tuning (the best checkpoint) minus before "
                        "(the pretrained model it starts from); positive is forgetting. Full fine-tuning at every "
                        "data fraction of every size, and every strategy at the task size.", ""]
                       + ([BREADTH_NOT_MEASURED, ""] if not self.depth_breadth() else []),
        }
        return notes.get(key, [])

    def latex(self, figures: list) -> str:
        """The paper: its first page holds the setup in one paragraph, the conclusions, what did not hold and the
        caveats; the tables (gptlab/tables.py) and figures follow."""
        t = self.tables()
        p = self.provenance
        conclusions, failed = self.conclusions()

        def items(title, entries):
            if not entries:
                return []
            return ([rf"\paragraph{{{title}}}", r"\begin{itemize}\setlength{\itemsep}{0pt}"]
                    + [rf"\item {tex_escape(e)}" for e in entries] + [r"\end{itemize}"])

        out = [r"\documentclass[10pt]{article}", r"\usepackage[margin=2cm,landscape]{geometry}",
               r"\usepackage[T1]{fontenc}", r"\usepackage{booktabs}", r"\usepackage{graphicx}", r"\begin{document}",
               rf"\section*{{{tex_escape(p['name'])}: how much is pretraining worth?}}",
               r"\small",  # the first page holds the setup, the conclusions, what did not hold and the caveats
               r"\paragraph{Setup} " + tex_escape(p.get("description", "")) + " "
               + tex_escape(f"Made by {p['command']}; code version {p['commits']}; {p['cells']}. Test-split "
                            "scores of best checkpoints chosen on validation; learning rates chosen on validation; "
                            "95% t-intervals over seeds; paired comparisons Holm-corrected; the transfer law's "
                            "intervals from a bootstrap over seeds.") + r"\par"]
        out += items("Conclusions", conclusions) + items("What did not hold", failed)
        out += items("Caveats", self.caveats()) + [r"\normalsize", r"\clearpage"]
        for key in ("efficiency", "capped", "transfer", "fit", "tasks", "gain", "cost", "paired", "breadth"):
            header, rows = t[key]
            if key == "capped":
                out += self._capped_lines(t, markdown=False)
                if not rows:
                    continue
            if key == "breadth" and not rows:
                out += [tex_escape(BREADTH_NOT_MEASURED) + r"\par"]
                continue
            out += [r"\begin{table}[ht]\centering\footnotesize", rf"\caption{{{CAPTIONS[key]}}}",
                    rf"\label{{tab:{key}}}"] + table_lib.latex(header, rows)[:] + [r"\end{table}"]
        for path, caption in figures:
            out += [r"\begin{figure}[ht]\centering", rf"\includegraphics[width=0.7\linewidth]{{{path}}}",
                    rf"\caption{{{tex_escape(caption)}}}", r"\end{figure}"]
        out.append(r"\end{document}")
        return "\n".join(out) + "\n"


SECTIONS = [("1. Data efficiency", "efficiency", "data_efficiency"),
            ("2. Effective data transferred", "transfer", "effective_data"),
            ("3. One pretrained model, every task and strategy", "tasks", None),
            ("4. Cost against quality", "cost", "pareto"),
            ("5. Paired differences", "paired", None),
            ("6. Depth against breadth", "breadth", "depth_breadth")]
FIT_TITLE = ("Fit of D_T = k D_F^alpha N^beta, the old least squares on the measured points beside the censored "
             "likelihood that keeps the bounds (intervals: 95% t and bootstrap over seeds)")
GAIN_TITLE = ("Share of full fine-tuning's gain over the untouched pretrained model, (strategy - untouched) / "
              "(full - untouched) per seed")
BREADTH_NOT_MEASURED = ("Breadth was not measured in this run: its cells' result.json hold no `breadth` (bits per "
                        "byte on the pretraining corpus's validation split before and after fine-tuning).")
CAPTIONS = {"efficiency": "Data efficiency (test loss)", "capped": "Cells at their step cap, still improving",
            "transfer": "Effective data transferred",
            "fit": r"Fit of $D_T = k D_F^\alpha N^\beta$: least squares on measured points vs censored likelihood",
            "tasks": "Every task and strategy (test metric)", "gain": "Share of full fine-tuning's gain",
            "cost": "Cost against quality (lm task)", "paired": r"Paired differences (95\% CI; Holm-corrected)",
            "breadth": "Depth (test gain) against breadth lost (bits per byte on the pretraining corpus)"}
