"""Sweeps: a grid of runs from one ablation config, each in its own sub-workdir.

    python -m experiments.sweep --config=projects/pretrain_vs_finetune/config.py:small --workdir=DIR

An ablation config (`configs/ablations/NAME.py`) has `get_config(preset)`
returning a plain dict:

    name         the sweep's name (a workdir holds one sweep)
    description  one paragraph for the report
    metric       main metric: a final metric of result.json, e.g. "eval_loss" (losses: lower is better)
    stages       list of stages, run in order; each a dict with
        name         stage name (the first part of its cells' names)
        experiment   "pretrain" or "finetune": the entry point experiments/EXPERIMENT.py
        config       base experiment config and preset, e.g. "configs/finetune.py:lora"
        overrides    {"dotted.field": value} for every cell of the stage
        variants     list of override dicts, one per row of the study (optional); a
                     variant may also set "label" (its name in reports) and "config"
        grid         {"dotted.field": [values]}: the ablated factors, crossed with the variants
        seeds        list of seeds (config field `seed`), crossed with everything (default [0])
        init_from    name of an earlier stage: each cell fine-tunes the matching cell of
                     that stage (same values of that stage's varied fields, and seed if it
                     varies seeds) through `finetune.init_from`
        label        the stage's name in reports (default: the stage name)
        choose       a dynamic stage (optional): {"key": a grid field, e.g. "optimizer.learning_rate",
                     "on_seed": one of the stage's seeds (default: the first), "metric": the validation
                     metric read from each cell's result.json `selection.validation` (default "eval_loss";
                     accuracies: higher is better)}. The on_seed cells run over the whole grid; once all
                     of a group's (the cells sharing every other setting) are finished, failed or blocked, the
                     value with the best metric is chosen (gptlab.selection.choose_on_validation) and the
                     other seeds run at that value only; their cells at other values are `skipped`. The
                     choice is recomputed from the stored result.json files on every run (a rerun after an
                     interruption continues where it was) and recorded in DIR/choices.json (every group:
                     values, scores, chosen, at_edge), in status.json (`choices`) and in each results.jsonl
                     line of the stage (`choice.chosen`).
    study        what projects/pretrain_vs_finetune/ (its report writer) needs to read the cells as a study (optional)
    report       {"rows": "label" or a field, "columns": a grid field, "stages": [...],
                  "select": [grid fields chosen on validation, e.g. the learning rate],
                  "selection_metric": the validation metric that chooses} (optional; gptlab/report/)

Cells are variants x grid x seeds; each runs in DIR/runs/CELL/ as the real entry
point would (`python -m experiments.pretrain|finetune --config=... --config.FIELD=...`,
one process per cell; the exact command is in DIR/sweep.json and
DIR/runs/CELL/sweep_cell.json). A cell has finished, and is skipped, when its
workdir holds a result.json of the cell's own configuration (every field the cell's
config sets, `results.config_fingerprint` intact) and every artefact that result.json
lists (e.g. a LoRA run's merged/); a result.json of another configuration (copied
in, left by another sweep) is never counted nor overwritten: the sweep refuses in one
line until the cell's folder is moved away. A cell with checkpoints but no such
result.json was interrupted and resumes (training resumes automatically); a failed cell is
recorded with its error (DIR/runs/CELL/sweep_status.json, DIR/status.json) and
the sweep goes on; its dependents are marked blocked. Rerunning the same
command retries failed cells and runs whatever is left. Every cell event
rewrites DIR/results.jsonl (one line per finished cell, with its result.json)
and DIR/status.json from the per-cell files, atomically, so a finished result
is never lost and both files can always be rebuilt. A write the disk refuses ends
the sweep in one line (exit status 2); running cells checkpoint and stop.

Where cells run: as processes on this machine (the default), or as jobs of a
cluster scheduler through `submitit` (`pip install -e ".[cluster]"`): SLURM
(`executor="slurm"`), or submitit's local executor (`"submitit_local"`, the same
code path on one machine, for trying and testing it). A job runs `run_cell` on
its node: the cell's same command, its lock and its log; SIGTERM or submitit's
preemption/timeout signal (SIGUSR2) reach the cell, which saves a checkpoint and
stops, so a preempted or timed-out job is an interrupted cell that the next run of
the sweep resumes. The sweep process itself stays on the submitting machine, which
must share the workdir's filesystem with the nodes.

The package, by job: `spec` (the format above expanded into cells and their configs), `store`
(the workdir as the sweep's state: what finished, sweep.json, status.json, results.jsonl) and
`runner` (running cells as processes or submitit jobs). What other modules use is named here.
"""
from gptlab.sweep.runner import EXECUTORS, Runner, make_executor, run_cell
from gptlab.sweep.spec import (REPO, STATUSES, Cell, Sweep, SweepInterrupted, build_config, counts_text, expand,
                               load_sweep, run_dir, value_text)
from gptlab.sweep.store import (cell_state, check_workdir, collect, count_statuses, finished_result, load_stored,
                                read_results, write_sweep_json)

__all__ = ["EXECUTORS", "Runner", "make_executor", "run_cell", "REPO", "STATUSES", "Cell", "Sweep", "SweepInterrupted",
           "build_config", "counts_text", "expand", "load_sweep", "run_dir", "value_text", "cell_state", "check_workdir",
           "collect", "count_statuses", "finished_result", "load_stored", "read_results", "write_sweep_json"]
