"""The pretraining-vs-fine-tuning study's report: tables, figures, conclusions, Markdown and LaTeX.

`write_study(DIR)` collects a sweep workdir's results into DIR/study/ (or reads a study directory's
results.jsonl and study.json alone) and writes report.md, report.tex (report.pdf where pdflatex is
installed), figures/*.png with their CSVs and table_*.csv. The numbers come from analysis.py;
tabulate.py lays out the tables and conclusions, figures.py draws, and document.py writes the documents.
"""
import json
import pathlib
import shutil
import subprocess
from typing import Optional

from gptlab import files
from gptlab import sweep as sweep_lib
from gptlab import tables as table_lib
from gptlab.errors import UserError
from projects.pretrain_vs_finetune import analysis
from projects.pretrain_vs_finetune.analysis import compact, pareto  # noqa: F401 (tests call report.pareto)
from projects.pretrain_vs_finetune.document import Document
from projects.pretrain_vs_finetune.figures import Figures
from projects.pretrain_vs_finetune.tabulate import Tables


class StudyReport(Document, Figures, Tables, analysis.Study):
    """The study's analysis, rendered."""


STUDY_DIR = "study"


RECORDS = "results.jsonl"


SPEC = "study.json"


def collect(workdir) -> pathlib.Path:
    """DIR/study/results.jsonl and study.json from a sweep workdir (each written atomically); returns DIR/study."""
    workdir = pathlib.Path(workdir)
    sweep = sweep_lib.load_stored(workdir)
    out = workdir / STUDY_DIR
    out.mkdir(exist_ok=True)
    states = sweep_lib.collect(workdir, sweep)  # DIR/results.jsonl rebuilt from the cells that really finished
    # Cells a learning-rate choice passed over never run: not missing, so not counted in the sweep's cells
    skipped = sum(1 for state in states.values() if state["status"] == "skipped")
    lines = sweep_lib.read_results(workdir)
    files.write_atomic(out / RECORDS, "".join(json.dumps(compact(line), sort_keys=True) + "\n" for line in lines))
    previous = _read(out / SPEC) or {}
    meta = {"name": sweep.name, "description": sweep.description, "source": sweep.source, "study": sweep.study,
            "cells_in_sweep": len(sweep.cells) - skipped, "cells_skipped": skipped, "runs": previous.get("runs", [])}
    files.write_json_atomic(out / SPEC, meta)  # in the config's order: rows and columns follow it
    return out


def record_run(workdir, wall_time_s: float, finished: bool) -> None:
    """Appends one invocation of experiments.study (its wall time) to DIR/study/study.json."""
    path = pathlib.Path(workdir) / STUDY_DIR / SPEC
    path.parent.mkdir(exist_ok=True)
    meta = _read(path) or {}
    meta.setdefault("runs", []).append({"wall_time_s": round(wall_time_s, 1), "finished": finished})
    files.write_json_atomic(path, meta)


def _read(path: pathlib.Path):
    return files.read_json(path, fix="restore it, or delete it and rerun "
                                     "python -m experiments.study on the sweep's workdir to rebuild it")


def load(study_dir) -> "StudyReport":
    study_dir = pathlib.Path(study_dir)
    meta = _read(study_dir / SPEC)
    if meta is None or not (study_dir / RECORDS).exists():
        raise UserError(f"{study_dir} holds no {SPEC} and {RECORDS}: run python -m experiments.study first")
    records = files.read_jsonl(study_dir / RECORDS, fix="restore it, or rebuild it from the sweep with python -m "
                               "experiments.study --report_only --workdir=SWEEP_DIR (the directory above study/)")
    versions = {}  # what each cell ran: its commit, and whether tracked files had changed since
    for r in records:
        key = (r["commit"] or "unknown")[:7] + (" plus uncommitted changes" if r.get("dirty") else "")
        versions[key] = versions.get(key, 0) + 1
    commits = [f"{key} ({n} cells)" for key, n in sorted(versions.items())] or ["none"]
    devices = sorted({(r.get("device") or {}).get("host_cpu") or (r.get("device") or {}).get("kind", "?")
                      for r in records})
    runs = meta.get("runs") or []
    wall = sum(r["wall_time_s"] for r in runs)
    provenance = {
        "name": meta["name"], "description": meta.get("description", ""),
        "command": f"python -m experiments.study --config={_source(meta.get('source', ''))} --workdir=DIR",
        "commits": ", ".join(commits), "device": "run on " + "; ".join(devices),
        "cells": f"{len(records)} of {meta.get('cells_in_sweep', len(records))} cells" + (
            f" ({meta['cells_skipped']} more skipped: the learning rates their seed-0 choice passed over)"
            if meta.get("cells_skipped") else ""),
        "cell_hours": sum(r.get("wall_time_s") or 0 for r in records) / 3600,
        "wall_time": (f"{wall / 60:.1f} min over {len(runs)} invocation(s)") if runs else None,
    }
    return StudyReport(meta.get("study"), records, provenance)


def _source(source: str) -> str:
    """The ablation config relative to the repository (as a user would type it)."""
    path, _, preset = source.partition(":")
    try:
        path = str(pathlib.Path(path).resolve().relative_to(sweep_lib.REPO))
    except ValueError:
        pass
    return path + (f":{preset}" if preset else "")


def write_study(directory) -> dict:
    """Writes report.md, report.tex (and .pdf where pdflatex exists) and figures/ into the study directory.

    `directory` is a sweep workdir (its results are collected into DIR/study/ first) or a study
    directory holding results.jsonl and study.json (the report is regenerated from them alone).
    """
    directory = pathlib.Path(directory)
    study_dir = collect(directory) if (directory / "sweep.json").exists() else directory
    study = load(study_dir)
    figures = study.figures(study_dir / "figures")
    tables = study.tables()
    for key, (header, rows) in tables.items():
        table_lib.write_csv(study_dir / f"table_{key}.csv", header, rows)
    md, tex = study_dir / "report.md", study_dir / "report.tex"
    files.write_atomic(md, study.markdown(figures))
    files.write_atomic(tex, study.latex(figures))
    return {"markdown": md, "latex": tex, "pdf": compile_latex(tex), "figures": [f for f, _ in figures]}


def compile_latex(tex: pathlib.Path) -> Optional[pathlib.Path]:
    """report.pdf from report.tex with pdflatex, when it is installed (else None); a failure is an error."""
    if shutil.which("pdflatex") is None:
        return None
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tex.parent,
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        tail = "\n".join(run.stdout.splitlines()[-15:])
        raise UserError(f"pdflatex could not compile {tex}:\n{tail}")
    for junk in (".aux", ".log"):
        tex.with_suffix(junk).unlink(missing_ok=True)
    return tex.with_suffix(".pdf")
