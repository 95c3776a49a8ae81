"""Runs a study (projects/NAME/) and writes its report: one command, resumable.

    python -m experiments.study --config=projects/pretrain_vs_finetune/config.py:small --workdir=DIR

runs every cell of the study's sweep (as `experiments.sweep` does, with the same flags: --parallel,
--only, --set, --executor, ...; rerunning resumes), then writes DIR/study/: report.md,
report.tex (and report.pdf where pdflatex is installed), figures/*.png with their CSVs,
table_*.csv, and results.jsonl + study.json, from which `--report_only --workdir=DIR/study`
regenerates the same report (--config names the study, whose `study["report"]` module writes it). Exit status as experiments.sweep's; the report is written
whatever the sweep's outcome, from the cells that finished.
"""
import importlib
import pathlib
import time

from absl import flags

from experiments import sweep as sweep_main
from gptlab import cli
from gptlab import sweep as sweep_lib
from gptlab.errors import UserError

_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the report from stored results only (a sweep "
                                 "workdir or its study/ directory); run nothing.")
flags.FLAGS.set_default("parallel", 3)  # three cells at a time: one computes while another starts up (2 cores)


def report_writer():
    """The module the study's config names in `study["report"]`, with `write_study(directory)` and `record_run`."""
    spec = sweep_lib.load_sweep(flags.FLAGS.config)
    name = (spec.study or {}).get("report")
    if not name:
        raise UserError(f"--config={flags.FLAGS.config} names no report writer: set its study['report'] to a module "
                        "with write_study(directory), e.g. 'projects.pretrain_vs_finetune.report'")
    return importlib.import_module(name)


def main() -> None:
    workdir = flags.FLAGS.workdir
    study = report_writer()
    if _REPORT_ONLY.value:
        written = study.write_study(workdir)
        print(f"study report: {written['markdown']}" + (f", {written['pdf']}" if written["pdf"] else ""))
        return
    started = time.perf_counter()
    finished = False
    try:
        sweep_main.main()
        finished = True
    finally:
        if not flags.FLAGS.dry_run:
            if (pathlib.Path(workdir) / "sweep.json").exists():
                # The invocation first: counted even when collecting or writing the report fails after it.
                study.record_run(workdir, time.perf_counter() - started, finished)
                written = study.write_study(workdir)  # collects DIR/study/ first
                print(f"study report: {written['markdown']}" + (f", {written['pdf']}" if written["pdf"] else ""))


if __name__ == "__main__":
    cli.run(main)
