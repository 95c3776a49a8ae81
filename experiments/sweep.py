"""Runs an ablation sweep: every cell in its own sub-workdir; rerunning resumes.

    python -m experiments.sweep --config=projects/pretrain_vs_finetune/config.py:small --workdir=DIR \
        [--parallel=2] [--only=REGEX] [--set=data.data_dir=/data/tfds] [--dry_run]
        [--executor=slurm --submitit=slurm_partition=gpu --submitit=gpus_per_node=1 --submitit=timeout_min=240]

Then `python -m experiments.report --workdir=DIR` writes the tables and figures.
Exit status: 0 when every selected cell finished; 75 when stopped by SIGTERM/SIGINT (rerun to
resume); 2 with one line when a cell failed (it is recorded, the others still ran) or on bad input.
"""
import ast

from absl import flags

from gptlab import cli
from gptlab import sweep as sweep_lib
from gptlab.errors import UserError

_CONFIG = flags.DEFINE_string("config", None, "Ablation config file and preset, e.g. "
                              "projects/pretrain_vs_finetune/config.py:small.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep: runs/CELL/ per cell, results.jsonl, "
                               "status.json, sweep.json.", required=True)
_PARALLEL = flags.DEFINE_integer("parallel", 1, "How many cells run at once, each its own process.")
_ONLY = flags.DEFINE_string("only", None, "Run only cells whose name matches this regex (and what they "
                            "fine-tune from).")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE applied to every cell whose config has FIELD, e.g. "
                                 "data.data_dir=/data/tfds (part of the cells' settings: resume with the same).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the cells, their state and commands; run nothing.")
_IN_PROCESS = flags.DEFINE_bool("in_process", False, "Run cells in this process instead of one process each "
                                "(no isolation: a crash ends the sweep; for debugging).")
_EXECUTOR = flags.DEFINE_enum("executor", "local", sweep_lib.EXECUTORS, "Where cells run: local (a process each on "
                               "this machine), slurm (a SLURM job each, through submitit), submitit_local (submitit's "
                               "local executor: the cluster code path on this machine).")
_SUBMITIT = flags.DEFINE_multi_string("submitit", [], "KEY=VALUE parameters of submitit's AutoExecutor for every "
                                      "cell's job, e.g. slurm_partition=gpu, gpus_per_node=1, timeout_min=240, "
                                      "mem_gb=32 (values are Python literals or text).")
_CACHE = flags.DEFINE_string("compilation_cache", None, "JAX persistent compilation cache shared by the cells "
                             "(default WORKDIR/compilation_cache; 'off' disables; JAX_COMPILATION_CACHE_DIR wins).")


def parse_set(items, flag: str = "set") -> dict:
    overrides = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise UserError(f"--{flag}={item!r}: write it as KEY=VALUE, e.g. --set=data.data_dir=/data/tfds or "
                            "--submitit=slurm_partition=gpu")
        overrides[field.strip()] = value
    return overrides


def parse_submitit(items) -> dict:
    parameters = {}
    for key, value in parse_set(items, "submitit").items():
        try:
            parameters[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parameters[key] = value  # text, e.g. a partition name
    return parameters


def main() -> None:
    import pathlib
    import shlex

    sweep = sweep_lib.load_sweep(_CONFIG.value, parse_set(_SET.value))
    workdir = pathlib.Path(_WORKDIR.value).expanduser().absolute()
    cache = _CACHE.value if _CACHE.value is not None else str(workdir / "compilation_cache")
    runner = sweep_lib.Runner(sweep, workdir, parallel=_PARALLEL.value, in_process=_IN_PROCESS.value,
                              compilation_cache=None if cache == "off" else cache, executor=_EXECUTOR.value,
                              submitit=parse_submitit(_SUBMITIT.value))
    if _DRY_RUN.value:
        sweep_lib.check_workdir(workdir, sweep)
        plan = runner.plan(_ONLY.value)
        print(f"sweep {sweep.name}: {len(plan)} cells")
        for cell, state in plan:
            command = " ".join(shlex.quote(arg) for arg in cell.command(workdir))
            print(f"  {state['status']:11s} {cell.name}\n              python {command}")
        return
    selected = [cell.name for cell, _ in runner.plan(_ONLY.value)]
    states = runner.run(_ONLY.value)
    bad = [name for name in selected if states[name]["status"] in ("failed", "blocked")]
    if bad:  # finished results are kept; the exit status says the sweep is not complete
        first = states[bad[0]]
        raise UserError(f"{len(bad)} of {len(selected)} cells did not finish (first: {bad[0]} {first['status']}: "
                        f"{first['error']}); finished results are in {workdir / 'results.jsonl'}, every cell's "
                        f"state in {workdir / 'status.json'}: fix the cause and rerun the same command to retry them")


if __name__ == "__main__":
    cli.run(main)
