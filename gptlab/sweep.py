"""Sweeps: a grid of runs from one ablation config, each in its own sub-workdir.

    python -m experiments.sweep --config=configs/ablations/pretrain_vs_finetune.py:small --workdir=DIR

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
    study        what gptlab/study.py needs to read the cells as a study (optional)
    report       {"rows": "label" or a field, "columns": a grid field, "stages": [...],
                  "select": [grid fields chosen on validation, e.g. the learning rate],
                  "selection_metric": the validation metric that chooses} (optional; gptlab/report.py)

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
"""
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Optional

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from gptlab import files
from gptlab import lock as lock_lib
from gptlab import results
from gptlab.errors import Preempted, UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ("pretrain", "finetune")
SPEC_KEYS = {"name", "description", "metric", "stages", "report", "study"}
STAGE_KEYS = {"name", "experiment", "config", "overrides", "variants", "grid", "seeds", "init_from", "label"}
VARIANT_RESERVED = ("label", "config")
REPORT_KEYS = {"rows", "columns", "stages", "select", "selection_metric"}  # see gptlab/report.py
STATUSES = ("finished", "running", "interrupted", "failed", "blocked", "pending", "foreign")
FRESH = "choose a new --workdir to start fresh, or delete {dir} to discard what it holds"


class SweepInterrupted(Preempted):
    """The sweep stopped on SIGTERM/SIGINT; running cells saved a checkpoint; rerunning resumes."""

    def __init__(self, workdir, counts: dict):
        Exception.__init__(self, f"sweep interrupted ({_counts_text(counts)}): finished results are kept in "
                                 f"{workdir}; run the same command again to resume")
        self.step = None


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str  # directory under DIR/runs/
    stage: str
    experiment: str  # pretrain or finetune
    config: str  # experiment config and preset, e.g. configs/finetune.py:lora (relative to the repo when inside it)
    overrides: dict  # dotted field -> value; seed and finetune.init_from are separate
    seed: int
    label: str  # the row's name in reports
    variant: dict  # the variant's own overrides (without label/config)
    factors: dict  # the grid's values for this cell (the ablated factors)
    depends_on: Optional[str] = None  # the cell whose workdir is finetune.init_from

    @property
    def fingerprint(self) -> str:
        what = {"experiment": self.experiment, "config": self.config, "overrides": self.overrides,
                "seed": self.seed, "depends_on": self.depends_on}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()[:16]

    def command(self, workdir) -> list:
        """The entry-point command that runs this cell in `workdir`/runs/NAME (argv, without the interpreter)."""
        path, arg = split_config(self.config)
        args = ["-m", f"experiments.{self.experiment}", f"--config={resolve_path(path)}" + (f":{arg}" if arg else ""),
                f"--workdir={run_dir(workdir, self.name)}"]
        args += [f"--config.{key}={render(value)}" for key, value in self.overrides.items()]
        args.append(f"--config.seed={self.seed}")
        if self.depends_on:
            args.append(f"--config.finetune.init_from={run_dir(workdir, self.depends_on)}")
        return args

    def to_json(self) -> dict:
        return {"name": self.name, "stage": self.stage, "experiment": self.experiment, "config": self.config,
                "overrides": self.overrides, "seed": self.seed, "label": self.label, "variant": self.variant,
                "factors": self.factors, "depends_on": self.depends_on, "fingerprint": self.fingerprint}


@dataclasses.dataclass
class Sweep:
    name: str
    description: str
    metric: str
    report: dict
    cells: list  # of Cell, in run order
    source: str  # the ablation config as given on the command line
    study: Optional[dict] = None  # the spec's `study`: how gptlab/study.py reads the cells

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


# -- loading and expanding an ablation config ---------------------------------------------------


def split_config(spec: str) -> tuple:
    path, _, arg = spec.partition(":")
    return path, arg


def resolve_path(path: str) -> pathlib.Path:
    """A config path as given, relative to the current directory or else to the repository root."""
    given = pathlib.Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given.absolute()
    return REPO / given


def _display_path(path: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path.resolve())


_MODULES = {}


def load_module(path: str):
    """Imports a config file by path (once), with the repository importable (configs.pretrain, ...)."""
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise UserError(f"config file {path} does not exist: give a path like configs/ablations/NAME.py "
                        "(relative to the current directory or the repository root)")
    if resolved not in _MODULES:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        name = "_gptlab_config_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, resolved)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # pylint: disable=broad-except
            raise UserError(f"cannot load config file {path}: {type(e).__name__}: {e}") from None
        _MODULES[resolved] = module
    return _MODULES[resolved]


def experiment_config(spec: str):
    """`get_config(preset)` of an experiment config such as configs/finetune.py:lora (a fresh, locked ConfigDict)."""
    path, arg = split_config(spec)
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path} has no get_config(): point the stage's config at an experiment config "
                        "such as configs/pretrain.py:small")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise UserError(f"config {spec}: {e}") from None


def load_sweep(source: str, cli_overrides: dict = None) -> Sweep:
    """The ablation config `path.py[:preset]`, expanded into cells and checked against the experiment configs.

    `cli_overrides` ({"dotted.field": "text"}, from --set) apply to every cell whose config has the field.
    """
    path, arg = split_config(source)
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path} has no get_config(preset) returning the sweep: see configs/ablations/")
    try:
        spec = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise UserError(f"ablation config {source}: {e}") from None
    return expand(spec, source, cli_overrides or {})


def _check_keys(given, allowed, where: str) -> None:
    if not isinstance(given, dict):
        raise UserError(f"{where} must be a dict, got {type(given).__name__}")
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise UserError(f"{where} has unknown key {unknown[0]!r}: the keys are {sorted(allowed)}")


def expand(spec: dict, source: str, cli_overrides: dict) -> Sweep:
    where = f"ablation config {source}"
    _check_keys(spec, SPEC_KEYS, where)
    for key in ("name", "stages"):
        if not spec.get(key):
            raise UserError(f"{where} sets no {key!r}: see configs/ablations/pretrain_vs_finetune.py")
    cells, by_stage = [], {}
    used_cli = set()
    for index, stage in enumerate(spec["stages"]):
        stage_where = f"{where}, stage {stage.get('name', index) if isinstance(stage, dict) else index}"
        _check_keys(stage, STAGE_KEYS, stage_where)
        name = stage.get("name")
        if not name or not re.fullmatch(r"[A-Za-z0-9_.]+", name) or name in by_stage:
            raise UserError(f"{stage_where}: every stage needs a unique name of letters, digits, '_' and '.'")
        if stage.get("experiment") not in EXPERIMENTS:
            raise UserError(f"{stage_where}: experiment={stage.get('experiment')!r}; choose one of {EXPERIMENTS}")
        if not stage.get("config"):
            raise UserError(f"{stage_where} sets no config, e.g. configs/{stage['experiment']}.py:small")
        by_stage[name] = _expand_stage(stage, stage_where, by_stage, cli_overrides, used_cli)
        cells += by_stage[name]
    unused = sorted(set(cli_overrides) - used_cli)
    if unused:
        raise UserError(f"--set {unused[0]}=...: no cell's config has the field {unused[0]}; check its spelling")
    names = [c.name for c in cells]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"{where}: two cells are both named {duplicate}: give their variants distinct labels")
    report = dict(spec.get("report") or {})
    _check_keys(report, REPORT_KEYS, f"{where}, report")
    return Sweep(spec["name"], spec.get("description", ""), spec.get("metric", "eval_loss"), report, cells, source,
                 spec.get("study"))


def _short_names(keys) -> dict:
    """dotted key -> its last part, or the whole key where two keys share a last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text).strip("_")


def _value_text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_value_text(v) for v in value)
    return str(value)


def _expand_stage(stage: dict, where: str, earlier: dict, cli_overrides: dict, used_cli: set) -> list:
    overrides = dict(stage.get("overrides") or {})
    grid = dict(stage.get("grid") or {})
    variants = list(stage.get("variants") or [{}])
    seeds = list(stage.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise UserError(f"{where}: seeds={seeds!r} must be a non-empty list of non-negative integers")
    if "seed" in overrides or "seed" in grid or any("seed" in v for v in variants):
        raise UserError(f"{where}: set seeds with the stage's `seeds` list, not as an override")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise UserError(f"{where}: grid[{key!r}] must be a non-empty list of values")
    upstream = None
    if stage.get("init_from") is not None:
        upstream = earlier.get(stage["init_from"])
        if upstream is None:
            raise UserError(f"{where}: init_from={stage['init_from']!r} names no earlier stage "
                            f"(earlier stages: {sorted(earlier)})")
        if stage["experiment"] != "finetune":
            raise UserError(f"{where}: init_from needs experiment='finetune'")
    variant_keys = [k for v in variants for k in v if k not in VARIANT_RESERVED]
    short = _short_names(list(dict.fromkeys(variant_keys + list(grid))))
    cells = []
    for seed in seeds:
        for variant in variants:
            if not isinstance(variant, dict):
                raise UserError(f"{where}: every variant must be a dict of overrides, got {variant!r}")
            own = {k: v for k, v in variant.items() if k not in VARIANT_RESERVED}
            config = variant.get("config", stage["config"])
            label = variant.get("label") or stage.get("label") or (
                " ".join(f"{short[k]}={_value_text(v)}" for k, v in own.items()) or stage["name"])
            for values in itertools.product(*grid.values()):
                factors = dict(zip(grid, values))
                cell_overrides = {**overrides, **own, **factors}
                for key, text in cli_overrides.items():
                    if key in own or key in factors:
                        raise UserError(f"--set {key}=... conflicts with the ablated field {key} of {where}: "
                                        "drop it from --set")
                parts = [stage["name"]]
                if variant.get("label"):
                    parts.append(variant["label"])
                else:
                    parts += [f"{short[k]}={_value_text(v)}" for k, v in own.items()]
                parts += [f"{short[k]}={_value_text(v)}" for k, v in factors.items()]
                parts.append(f"seed{seed}")
                name = "-".join(_slug(p) for p in parts)
                if len(name) > 150:
                    name = name[:130] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
                cell_overrides.update(_cli_values(config, cli_overrides, used_cli))
                cell = Cell(name=name, stage=stage["name"], experiment=stage["experiment"],
                            config=_normalise_config(config), overrides=cell_overrides, seed=seed,
                            label=label, variant=own, factors=factors)
                if upstream is not None:
                    cell = dataclasses.replace(cell, depends_on=_match_upstream(cell, upstream, where).name)
                build_config(cell, init_from="<checked>")  # every field exists and has the right type
                cells.append(cell)
    return cells


def _normalise_config(spec: str) -> str:
    path, arg = split_config(spec)
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise UserError(f"config file {path} does not exist: give a path like configs/pretrain.py:small")
    return _display_path(resolved) + (f":{arg}" if arg else "")


def _cli_values(config_spec: str, cli_overrides: dict, used: set) -> dict:
    """--set values for the fields this config has, parsed by ml_collections' own flag parser, exactly as
    the entry point would parse `--config.FIELD=VALUE`."""
    if not cli_overrides:
        return {}
    config = experiment_config(config_spec)
    present = [key for key in cli_overrides if _has_field(config, key)]
    used.update(present)
    argv = ["sweep"] + [f"--config.{key}={cli_overrides[key]}" for key in present]
    parser = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=parser, sys_argv=argv)
    try:
        parser(argv)
    except flags.Error as e:
        raise UserError(f"--set: {str(e).splitlines()[0]}") from None
    return {key: config_path.get_value(key, parser.config) for key in present}


def _has_field(config, dotted: str) -> bool:
    try:
        config_path.get_value(dotted, config)
        return True
    except (KeyError, AttributeError, IndexError, ValueError):
        return False


def _match_upstream(cell: Cell, upstream: list, where: str) -> Cell:
    """The upstream cell agreeing with `cell` on every field the upstream stage varies (and seed if it varies)."""
    varied = {k for c in upstream for k in c.overrides if len({repr(u.overrides.get(k)) for u in upstream}) > 1}
    seeds_vary = len({c.seed for c in upstream}) > 1
    matches = [u for u in upstream
               if all(k in cell.overrides and repr(cell.overrides[k]) == repr(u.overrides.get(k)) for k in varied)
               and (not seeds_vary or u.seed == cell.seed)]
    if len(matches) != 1:
        keys = sorted(varied) + (["seed"] if seeds_vary else [])
        raise UserError(f"{where}: cell {cell.name} matches {len(matches)} cells of stage {upstream[0].stage} "
                        f"(they differ in {keys}): give the stage the same values of {keys} so each cell "
                        "has exactly one run to fine-tune")
    return matches[0]


def build_config(cell: Cell, init_from: Optional[str] = None):
    """The cell's experiment config: the preset with the cell's overrides, seed and init_from applied.

    A field that does not exist or a value of the wrong type is a UserError naming the cell.
    """
    config = experiment_config(cell.config)
    where = f"sweep cell {cell.name} ({cell.config})"
    values = dict(cell.overrides, seed=cell.seed)
    if cell.depends_on:
        values["finetune.init_from"] = init_from
    for dotted, value in values.items():
        if not _has_field(config, dotted):
            parent = dotted.rpartition(".")[0]
            node = config_path.get_value(parent, config) if parent and _has_field(config, parent) else None
            known = f"fields of {parent}: {', '.join(sorted(node.keys()))}" if hasattr(node, "keys") else \
                f"groups: {', '.join(sorted(config.keys()))}"
            raise UserError(f"{where}: {dotted!r} is not a config field ({known}); fix the key in the ablation config")
        current = config_path.get_value(dotted, config)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            config_path.set_value(dotted, config, value)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: {dotted}={value!r} has the wrong type for a field holding "
                            f"{current!r} ({e}); fix the value in the ablation config") from None
    return config


def render(value) -> str:
    """A value as the text of a --config.FIELD= flag, which ml_collections parses back to it."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = tuple(value)
    return repr(value)


# -- the sweep workdir ----------------------------------------------------------------------------


def run_dir(workdir, name: str) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "runs" / name


def _write_json(path: pathlib.Path, obj) -> None:
    files.write_json_atomic(path, obj, default=repr)


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def has_checkpoint(directory: pathlib.Path) -> bool:
    ckpts = directory / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def cell_state(workdir, cell: Cell) -> dict:
    """{"status", "error", "attempts", "seconds", ...}: what the files of the cell's run say.

    "finished" needs a result.json of this cell's configuration and every artefact it lists
    (`finished_result`); a result.json of another configuration makes the cell "foreign".
    """
    return _cell_state(workdir, cell)[0]


def _cell_state(workdir, cell: Cell) -> tuple:
    """(state, the cell's result.json when it finished, else None)."""
    directory = run_dir(workdir, cell.name)
    recorded = _read_json(directory / "sweep_status.json") or {}
    state = {"status": "pending", "error": None, "attempts": 0, "seconds": 0.0, **recorded}
    result, why = finished_result(workdir, cell)
    if result is not None:
        state.update(status="finished", error=None)
    elif why is not None and why.startswith(FOREIGN):
        state.update(status="foreign", error=why)
    elif why is not None and not (state["status"] == "running" and _is_locked(directory / ".lock")):
        # Its result.json is there but an artefact it promises is not: rerunning completes it.
        state.update(status="interrupted" if has_checkpoint(directory) else "pending", error=why)
    elif state["status"] == "running" and _is_locked(directory / ".lock"):
        pass  # a sweep (or a child of a killed one) is running it now
    elif state["status"] in ("running", "finished") or (state["status"] == "pending" and has_checkpoint(directory)):
        state["status"] = "interrupted" if has_checkpoint(directory) else "pending"  # a killed sweep's leftovers
    return state, result


FOREIGN = "its result.json is of another configuration"


def finished_result(workdir, cell: Cell) -> tuple:
    """(result.json, None) when the cell's run finished; else (None, why not), why being None without a result.json.

    A result.json counts only when it records this cell's configuration (every field the cell's
    config sets, its fingerprint intact) and every artefact the run promises exists beside it.
    """
    directory = run_dir(workdir, cell.name)
    path = directory / results.FILENAME
    if not path.exists():
        return None, None
    result = _read_json(path)
    if not isinstance(result, dict) or not isinstance(result.get("config"), dict):
        return None, f"{FOREIGN} or damaged ({path} is not a run's result)"
    stored = result["config"]
    if "config_fingerprint" in result and result["config_fingerprint"] != results.config_fingerprint(stored):
        return None, f"{FOREIGN} or edited (its config does not match its config_fingerprint)"
    differences = _config_differences(cell, stored)
    if differences:
        shown = "; ".join(f"{key} {theirs!r}, not {ours!r}" for key, ours, theirs in differences[:3])
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        return None, f"{FOREIGN} ({shown}{more})"
    missing = [name for name in results.promised_artefacts(result) if not (directory / name).exists()]
    if missing:
        return None, f"its result.json promises {', '.join(missing)}, which {directory} lacks"
    return result, None


_EXPECTED = {}  # cell fingerprint -> the cell's config as JSON (built once per process)


def _config_differences(cell: Cell, stored: dict) -> list:
    """[(dotted field, the cell's value, the stored value)] where a run's stored config contradicts the cell."""
    if cell.fingerprint not in _EXPECTED:
        try:
            expected = json.loads(build_config(cell, init_from="<checked>").to_json_best_effort())
        except UserError:  # the experiment config changed or went since: check what the cell itself sets
            expected = {}
            for dotted, value in {**cell.overrides, "seed": cell.seed}.items():
                node = expected
                *parents, leaf = dotted.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = json.loads(json.dumps(value, default=repr))
        _EXPECTED[cell.fingerprint] = expected
    found = []
    _compare(_EXPECTED[cell.fingerprint], stored, "", found)
    init_from = ((stored.get("finetune") or {}).get("init_from") or "") if cell.depends_on else None
    if cell.depends_on and pathlib.Path(init_from).name != cell.depends_on:  # compared by name: a sweep may move
        found.append(("finetune.init_from", f".../runs/{cell.depends_on}", init_from))
    return found


def _compare(expected: dict, stored: dict, prefix: str, found: list) -> None:
    for key, value in expected.items():
        dotted = prefix + key
        if dotted == "finetune.init_from" or key not in stored:  # init_from: above; absent: a field newer than the run
            continue
        if isinstance(value, dict) and isinstance(stored[key], dict):
            _compare(value, stored[key], dotted + ".", found)
        elif value is not None and value != "auto" and value != stored[key]:  # None and auto: resolved by the run
            found.append((dotted, value, stored[key]))


def check_workdir(workdir, sweep: Sweep) -> None:
    """Refuses a workdir that holds something other than this sweep's runs."""
    workdir = pathlib.Path(workdir).absolute()
    fresh = FRESH.format(dir=workdir)
    if not workdir.exists():
        return
    if not workdir.is_dir():
        raise UserError(f"--workdir={workdir} is a file: {fresh}")
    stored = _read_json(workdir / "sweep.json")
    if stored is None:
        if any(workdir.iterdir()):
            raise UserError(f"--workdir={workdir} is not empty and holds no sweep.json (it is not a sweep's "
                            f"workdir): {fresh}")
        return
    if stored.get("name") != sweep.name:
        raise UserError(f"--workdir={workdir} holds results of a different sweep ({stored.get('name')!r}, from "
                        f"{stored.get('source')}), not {sweep.name!r}: {fresh}")
    for cell in sweep.cells:
        recorded = _read_json(run_dir(workdir, cell.name) / "sweep_cell.json")
        if recorded and recorded.get("fingerprint") != cell.fingerprint:
            changed = [k for k in ("experiment", "config", "overrides", "seed", "depends_on")
                       if json.dumps(recorded.get(k), sort_keys=True, default=repr)
                       != json.dumps(cell.to_json()[k], sort_keys=True, default=repr)]
            raise UserError(f"--workdir={workdir} holds cell {cell.name} run with different settings ({', '.join(changed)} "
                            f"changed in the ablation config or --set since): restore them to resume, or {fresh}")


def write_sweep_json(workdir, sweep: Sweep, ran: bool = False) -> None:
    """DIR/sweep.json: the sweep's cells and commands. `updated_at` and `git` change only when cells
    ran (`ran`) or the sweep's description changed, so a rerun that runs nothing leaves the file as it was."""
    workdir = pathlib.Path(workdir)
    old = _read_json(workdir / "sweep.json") or {}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    new = {"name": sweep.name, "description": sweep.description, "source": sweep.source, "metric": sweep.metric,
           "report": sweep.report, "study": sweep.study, "created_at": old.get("created_at", now), "updated_at": now,
           "git": results.git_state(),
           "cells": [{**c.to_json(), "command": " ".join(_quote(a) for a in ["python", *c.command(workdir)])}
                     for c in sweep.cells]}
    moment = ("updated_at", "git")
    if not ran and old and json.loads(json.dumps({k: v for k, v in new.items() if k not in moment}, default=repr)) \
            == {k: v for k, v in old.items() if k not in moment}:
        return
    _write_json(workdir / "sweep.json", new)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def load_stored(workdir) -> Sweep:
    """The sweep recorded in DIR/sweep.json (for reports)."""
    stored = _read_json(pathlib.Path(workdir) / "sweep.json")
    if stored is None:
        raise UserError(f"--workdir={workdir} holds no sweep.json: point it at a directory written by "
                        "python -m experiments.sweep")
    cells = [_cell_from_json(c) for c in stored["cells"]]
    return Sweep(stored["name"], stored.get("description", ""), stored.get("metric", "eval_loss"),
                 stored.get("report") or {}, cells, stored.get("source", ""), stored.get("study"))


def collect(workdir, sweep: Sweep) -> dict:
    """Rewrites DIR/results.jsonl (finished cells, in sweep order) and DIR/status.json; returns the states."""
    workdir = pathlib.Path(workdir)
    states, lines = {}, []
    for cell in sweep.cells:
        states[cell.name], result = _cell_state(workdir, cell)
        state = states[cell.name]
        if result is not None:
            lines.append(json.dumps({"cell": cell.name, "stage": cell.stage, "label": cell.label,
                                     "variant": cell.variant, "factors": cell.factors, "seed": cell.seed,
                                     "workdir": f"runs/{cell.name}", "cell_seconds": state.get("seconds"),
                                     "result": result}, default=repr))
    files.write_atomic(workdir / "results.jsonl", "".join(line + "\n" for line in lines))
    _write_json(workdir / "status.json", {"sweep": sweep.name, "counts": _count(states), "cells": states})
    return states


def read_results(workdir) -> list:
    """DIR/results.jsonl's records (a damaged line is refused: `collect` rebuilds the file from the cells)."""
    return files.read_jsonl(pathlib.Path(workdir) / "results.jsonl",
                            fix=f"rebuild it from the cells' result.json files with python -m experiments.report "
                                f"--workdir={pathlib.Path(workdir).absolute()}")


@contextlib.contextmanager
def _first_error_only():
    """Cleanup after a failure: an OSError inside (the same full disk again) is dropped when another
    exception is already on its way out, so the user sees the first failure, in one line."""
    failing = sys.exc_info()[1] is not None
    try:
        yield
    except OSError:
        if not failing:
            raise


def _count(states: dict) -> dict:
    counts = {s: 0 for s in STATUSES}
    for state in states.values():
        counts[state["status"]] += 1
    return {s: n for s, n in counts.items() if n}


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing run"


# -- running ----------------------------------------------------------------------------------


_Lock = lock_lib.FileLock  # one lock implementation for sweeps and training workdirs
_is_locked = lock_lib.is_locked


def _error_line(log_path: pathlib.Path, offset: int) -> str:
    """The informative last line of this attempt's output: the `error: ...` line, else the traceback's last."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "no output"
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    return lines[-1][:500] if lines else "no output"


# -- cells as cluster jobs (submitit) --------------------------------------------------------------

EXECUTORS = ("local", "submitit_local", "slurm")  # local: processes of this machine, without submitit
SUBMITIT_DEFAULTS = {"timeout_min": 24 * 60}  # submitit's own default (5 minutes locally) would stop long cells


def make_executor(kind: str, folder, parameters: dict):
    """A submitit executor for `kind` ("submitit_local" or "slurm") with `parameters` (submitit's
    AutoExecutor names: timeout_min, gpus_per_node, cpus_per_task, mem_gb, slurm_partition, ...)."""
    if kind == "local":
        if parameters:
            raise UserError("--submitit=... needs --executor=slurm or --executor=submitit_local")
        return None
    try:
        import submitit
    except ImportError:
        raise UserError(f'--executor={kind} needs submitit: pip install -e ".[cluster]"') from None
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if kind == "submitit_local" else "slurm")
    except RuntimeError as e:  # no SLURM here ("Could not detect srun")
        raise UserError(f"--executor={kind}: {e}; run the sweep on a SLURM login node, or use --executor=local") from None
    try:
        executor.update_parameters(**{**SUBMITIT_DEFAULTS, **parameters})
    except (ValueError, TypeError, NameError, AssertionError) as e:  # submitit: unknown or mistyped parameters
        raise UserError(f"--submitit: {str(e).splitlines()[0]} (the generic ones: timeout_min, mem_gb, "
                        "cpus_per_task, gpus_per_node, nodes, tasks_per_node; SLURM's: slurm_partition, ...)") from None
    return executor


def run_cell(command: list, log_path: str, lock_path: str, env: dict) -> int:
    """A cell's job on its node: runs `command` in the repository holding the cell's lock; returns its exit status.

    SIGTERM and SIGUSR2 (submitit's preemption/timeout signal) become one SIGTERM to the cell,
    which saves a checkpoint and exits with Preempted.EXIT_CODE; a second one stops it at once.
    """
    try:
        lock = _Lock(pathlib.Path(lock_path))
    except OSError:
        with open(log_path, "a", encoding="utf-8") as out:
            out.write(f"error: another process is running this cell (pid in {lock_path})\n")
        return 1
    try:
        cell_json = _read_json(pathlib.Path(lock_path).parent / "sweep_cell.json") or {}
        if (pathlib.Path(lock_path).parent / results.FILENAME).exists() and cell_json.get("name") and \
                finished_result(pathlib.Path(lock_path).parents[2], _cell_from_json(cell_json))[0] is not None:
            return 0  # a job that was queued twice (a sweep restarted meanwhile): the cell already finished
        with open(log_path, "ab") as out:
            process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env={**os.environ, **env})
        os.ftruncate(lock.fd, 0)
        os.pwrite(lock.fd, str(process.pid).encode(), 0)  # the sweep signals it through this pid (same machine)
        forward = lambda signum, frame: process.send_signal(signal.SIGTERM)
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR2)}
        try:
            return process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        lock.release()


class _Job:
    """A cell submitted through submitit, with the part of subprocess.Popen's interface the runner uses."""

    def __init__(self, job, lock_path: pathlib.Path, on_slurm: bool):
        self.job, self.lock_path, self.on_slurm = job, lock_path, on_slurm
        self.returncode = None

    def poll(self):
        if self.returncode is None and self.job.done():
            try:
                self.returncode = int(self.job.result())
            except Exception:  # pylint: disable=broad-except  # cancelled, killed, or lost by the scheduler
                self.returncode = -signal.SIGKILL
        return self.returncode

    def wait(self):
        while self.poll() is None:
            time.sleep(0.5)
        return self.returncode

    def send_signal(self, sig) -> None:
        """Asks the cell to stop at a checkpoint (a job still queued is cancelled)."""
        if self.on_slurm and self.job.state not in ("PENDING", "REQUEUED"):
            subprocess.call(["scancel", f"--signal={signal.Signals(sig).name[3:]}", str(self.job.job_id)])
            return
        pid = _read_pid(self.lock_path) if not self.on_slurm else None
        if pid is not None and _is_locked(self.lock_path):
            os.kill(pid, sig)
        else:
            self.job.cancel(check=False)

    def kill(self) -> None:
        pid = None if self.on_slurm else _read_pid(self.lock_path)
        if pid is not None and _is_locked(self.lock_path):
            os.kill(pid, signal.SIGKILL)
        self.job.cancel(check=False)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _cell_from_json(stored: dict) -> Cell:
    keys = {f.name for f in dataclasses.fields(Cell)}
    return Cell(**{k: v for k, v in stored.items() if k in keys})


def _read_pid(path: pathlib.Path):
    return lock_lib.read_holder(path).get("pid")


class Runner:
    """Runs a sweep's cells: in order (or `parallel` at once), skipping finished ones, recording every outcome.

    `executor`: one of EXECUTORS; `submitit`: parameters of its submitit executor (`make_executor`).
    """

    def __init__(self, sweep: Sweep, workdir, parallel: int = 1, in_process: bool = False,
                 compilation_cache: Optional[str] = None, log: Callable = print, executor: str = "local",
                 submitit: Optional[dict] = None):
        if parallel < 1:
            raise UserError(f"--parallel={parallel} must be at least 1")
        if executor not in EXECUTORS:
            raise UserError(f"--executor={executor!r}: choose one of {', '.join(EXECUTORS)}")
        if in_process and (parallel != 1 or executor != "local"):
            raise UserError("--in_process runs one cell at a time in this process: drop --parallel, --executor "
                            "or --in_process")
        self.sweep, self.parallel, self.in_process = sweep, parallel, in_process
        self.executor_kind, self.submitit, self.executor = executor, dict(submitit or {}), None
        self.workdir = pathlib.Path(workdir).expanduser().absolute()
        self.compilation_cache = compilation_cache
        self._print = log
        self.stopping = False
        self.signals = 0
        self.running = {}  # name -> (process, lock, started, log offset)

    def log(self, message: str) -> None:
        self._print(message)
        try:
            with open(self.workdir / "sweep.log", "a", encoding="utf-8") as f:
                f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {message}\n")
        except OSError:
            pass  # a copy of what was printed: a full disk is reported by the writes of the sweep's state

    # -- the whole sweep --

    def run(self, only: Optional[str] = None) -> dict:
        check_workdir(self.workdir, self.sweep)
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "runs").mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to --workdir={self.workdir} ({e.strerror or e}): choose a directory "
                            "you can write to") from None
        try:
            lock = _Lock(self.workdir / ".sweep.lock")
        except OSError:
            raise UserError(f"another sweep is running in {self.workdir} (pid in {self.workdir / '.sweep.lock'}): "
                            "wait for it to finish or stop it") from None
        try:
            write_sweep_json(self.workdir, self.sweep)
            self.executor = make_executor(self.executor_kind, self.workdir / "submitit", self.submitit)
            return self._run_locked(only)
        except OSError as e:  # a full disk or lost permissions in the sweep's own files (every write is atomic)
            raise UserError(f"could not write {e.filename or self.workdir} ({e.strerror or e}): finished cells and "
                            "their results are kept; free disk space (or fix the permissions) and rerun the same "
                            "command to go on") from None
        finally:
            lock.release()

    def _selected(self, only: Optional[str]) -> list:
        if not only:
            return list(self.sweep.cells)
        try:
            pattern = re.compile(only)
        except re.error as e:
            raise UserError(f"--only={only!r} is not a valid regex ({e})") from None
        wanted = {c.name for c in self.sweep.cells if pattern.search(c.name)}
        if not wanted:
            raise UserError(f"--only={only!r} matches no cell: list them with --dry_run")
        for cell in reversed(self.sweep.cells):  # dependencies come along
            if cell.name in wanted and cell.depends_on:
                wanted.add(cell.depends_on)
        return [c for c in self.sweep.cells if c.name in wanted]

    def plan(self, only: Optional[str] = None) -> list:
        """(cell, state) for the selected cells: what a run would do."""
        return [(cell, cell_state(self.workdir, cell)) for cell in self._selected(only)]

    def _run_locked(self, only) -> dict:
        cells = self._selected(only)
        states = collect(self.workdir, self.sweep)
        for cell in cells:  # a child of a killed sweep may still be running a cell
            path = run_dir(self.workdir, cell.name) / ".lock"
            if path.exists():
                try:
                    _Lock(path, record=False).release()
                except OSError:
                    raise UserError(f"cell {cell.name} is still being run by a process of an earlier sweep (pid in "
                                    f"{path}): wait for it to finish or stop it, then rerun") from None
        foreign = [c.name for c in cells if states[c.name]["status"] == "foreign"]
        if foreign:  # never resumed or overwritten: whose files they are is not known, so the user decides
            raise UserError(f"{len(foreign)} cell(s) hold files of another run: {foreign[0]}: "
                            f"{states[foreign[0]]['error']}; move or delete {run_dir(self.workdir, foreign[0])} "
                            "(and any other such cell) to run it here")
        todo = [c for c in cells if states[c.name]["status"] != "finished"]
        kinds = _count({c.name: states[c.name] for c in cells})
        self.log(f"sweep {self.sweep.name}: {len(cells)} cells in {self.workdir} "
                 f"({_counts_text(kinds)}); {len(todo)} to run, "
                 + (f"{self.parallel} at a time" if self.parallel > 1 else "one at a time")
                 + (" in this process" if self.in_process else "")
                 + (f", as {self.executor_kind} jobs through submitit" if self.executor is not None else ""))
        self.total, self.done_before = len(cells), len(cells) - len(todo)
        self.finished_now, self.seconds_now = 0, 0.0
        self.outcomes = {}
        main_thread = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        try:
            self._schedule(todo, states)
        except OSError:  # the sweep cannot record outcomes (a full disk): running cells checkpoint and stop
            self.stopping = True
            for process, *_ in self.running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for name in list(self.running):  # after a second signal (they were killed) or a write error
                with _first_error_only():
                    self._finish(name, interrupted=True)
            if self.outcomes:  # something ran: the sweep's record says when (a rerun that ran nothing leaves it)
                with _first_error_only():
                    write_sweep_json(self.workdir, self.sweep, ran=True)
            with _first_error_only():
                states = collect(self.workdir, self.sweep)
        counts = _count({c.name: states[c.name] for c in cells})
        if self.stopping:
            raise SweepInterrupted(self.workdir, counts)
        self.log(f"sweep {self.sweep.name} done: {_counts_text(counts)}; results in {self.workdir / 'results.jsonl'}"
                 + "; report: python -m experiments.report --workdir=" + str(self.workdir))
        for cell in cells:
            if states[cell.name]["status"] in ("failed", "blocked"):
                self.log(f"  {states[cell.name]['status']}: {cell.name}: {states[cell.name]['error']}")
        return states

    def _on_signal(self, signum, frame):
        del frame
        self.signals += 1
        if self.signals == 1:
            self.stopping = True
            self.log(f"{signal.Signals(signum).name}: stopping; running cells save a checkpoint and stop "
                     "(a second signal kills them)")
            for process, *_ in self.running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        else:
            for process, *_ in self.running.values():
                if process.poll() is None:
                    process.kill()

    def _schedule(self, todo: list, states: dict) -> None:
        pending = list(todo)
        while pending or self.running:
            if not self.stopping:
                for cell in list(pending):
                    if len(self.running) >= self.parallel or self.stopping:
                        break
                    dep = cell.depends_on
                    if dep:
                        dep_status = states[dep]["status"]
                        if dep_status in ("failed", "blocked") and dep not in self.running and \
                                all(c.name != dep for c in pending):
                            pending.remove(cell)
                            self._record(cell, {"status": "blocked", "error": f"its init_from cell {dep} {dep_status}"})
                            states[cell.name]["status"] = "blocked"
                            self._progress(cell, states[cell.name])
                            continue
                        if dep_status != "finished":
                            continue
                    pending.remove(cell)
                    if self.in_process:
                        states[cell.name] = self._run_in_process(cell)
                    else:
                        self._start(cell)
            if not self.running and self.stopping:
                break
            for name in list(self.running):
                if self.running[name][0].poll() is not None:
                    states[name] = self._finish(name)
            if self.running:
                time.sleep(0.2)
            elif pending and not self.stopping and not self._startable(pending, states):
                # Waiting on nothing: every pending cell's dependency is neither running nor runnable.
                for cell in pending:
                    self._record(cell, {"status": "blocked", "error": f"its init_from cell {cell.depends_on} "
                                                                      f"{states[cell.depends_on]['status']}"})
                    states[cell.name]["status"] = "blocked"
                    self._progress(cell, states[cell.name])
                pending = []

    @staticmethod
    def _startable(pending, states) -> bool:
        names = {c.name for c in pending}
        return any(not c.depends_on or states[c.depends_on]["status"] == "finished" or c.depends_on in names
                   or states[c.depends_on]["status"] in ("failed", "blocked") for c in pending)

    # -- one cell --

    def _prepare(self, cell: Cell) -> tuple:
        directory = run_dir(self.workdir, cell.name)
        directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, *cell.command(self.workdir)]
        _write_json(directory / "sweep_cell.json", {**cell.to_json(), "command": command})
        state = cell_state(self.workdir, cell)
        resuming = has_checkpoint(directory)
        log_path = directory / "log.txt"
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n=== sweep {self.sweep.name}, attempt {state['attempts'] + 1}, "
                    f"{datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(map(_quote, command))}\n")
        offset = log_path.stat().st_size
        self._record(cell, {"status": "running", "error": None, "attempts": state["attempts"] + 1,
                            "seconds": state["seconds"]})
        self.log(f"[{self._position()}] {'resuming' if resuming else 'starting'} {cell.name}")
        return directory, command, log_path, offset, state

    def _start(self, cell: Cell) -> None:
        directory, command, log_path, offset, _ = self._prepare(cell)
        cache = {}
        if self.compilation_cache and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
            # Cells of one strategy share their compiled steps (seeds and data fractions change no shapes).
            cache = dict(JAX_COMPILATION_CACHE_DIR=self.compilation_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                         JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
        if self.executor is not None:  # the job takes the cell's lock where it runs
            job = self.executor.submit(run_cell, command, str(log_path), str(directory / ".lock"), cache)
            self._record(cell, {"status": "running", "job_id": str(job.job_id)})
            self.log(f"  submitted {cell.name} as job {job.job_id}")
            self.running[cell.name] = (_Job(job, directory / ".lock", self.executor.cluster == "slurm"), None,
                                       time.perf_counter(), offset)
            return
        lock = _Lock(directory / ".lock")
        env = {**os.environ, **cache}
        with open(log_path, "ab") as out:
            # Own session: a terminal's Ctrl-C reaches the sweep only, which forwards exactly one SIGTERM.
            # The child inherits the cell's lock, so a cell outliving a killed sweep is never started twice.
            process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       pass_fds=(lock.fd,))
        os.ftruncate(lock.fd, 0)
        os.pwrite(lock.fd, str(process.pid).encode(), 0)  # who holds the cell, should the sweep die
        self.running[cell.name] = (process, lock, time.perf_counter(), offset)

    def _finish(self, name: str, interrupted: bool = False) -> dict:
        process, lock, started, offset = self.running.pop(name)
        code = process.wait()
        if lock is not None:  # a submitit job released its own
            lock.release()
        cell = self.sweep.cell(name)
        directory = run_dir(self.workdir, name)
        seconds = time.perf_counter() - started
        finished, why = finished_result(self.workdir, cell)
        if code == 0 and finished is not None:
            outcome = {"status": "finished", "error": None}
        elif code == Preempted.EXIT_CODE or (code < 0 and (self.stopping or interrupted)):
            outcome = {"status": "interrupted", "error": "stopped by a signal; rerun the sweep to resume"}
        elif code == 0:
            outcome = {"status": "failed", "error": f"exited with 0 but {why}" if why else
                       "exited without writing result.json"}
        elif code < 0:  # the signal alone: its cause (memory, a crash in a library, a user) is not known here
            outcome = {"status": "failed", "error": f"killed by signal {_signal_name(-code)}"}
        else:
            outcome = {"status": "failed", "error": _error_line(directory / "log.txt", offset)}
        return self._done(cell, outcome, seconds, code)

    def _run_in_process(self, cell: Cell) -> dict:
        """Runs the cell by calling the library in this process (no isolation; for tests and debugging)."""
        directory, _, log_path, _, _ = self._prepare(cell)
        from gptlab import finetune, train  # imported on demand: the sweep's own process stays light

        function = train.train_and_evaluate if cell.experiment == "pretrain" else finetune.finetune_and_evaluate
        started = time.perf_counter()
        lock = _Lock(directory / ".lock")
        with open(log_path, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(out):
            try:
                config = build_config(cell, init_from=str(run_dir(self.workdir, cell.depends_on))
                                      if cell.depends_on else None)
                function(config, directory)
                outcome = {"status": "finished", "error": None}
            except Preempted as e:
                self.stopping = True
                outcome = {"status": "interrupted", "error": str(e)}
            except UserError as e:
                outcome = {"status": "failed", "error": str(e)}
            except Exception as e:  # pylint: disable=broad-except
                traceback.print_exc(file=out)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                outcome = {"status": "failed", "error": f"{type(e).__name__}: {first}"}
            finally:
                lock.release()
        why = finished_result(self.workdir, cell)[1] if outcome["status"] == "finished" else None
        if outcome["status"] == "finished" and (why or not (directory / results.FILENAME).exists()):
            outcome = {"status": "failed", "error": f"finished but {why}" if why else
                       "finished without writing result.json"}
        return self._done(cell, outcome, time.perf_counter() - started, 0)

    def _done(self, cell: Cell, outcome: dict, seconds: float, code: int) -> dict:
        state = cell_state(self.workdir, cell)
        record = {"status": outcome["status"], "error": outcome["error"], "attempts": state["attempts"],
                  "seconds": state["seconds"] + seconds, "last_attempt_seconds": seconds, "returncode": code}
        self._record(cell, record)
        if outcome["status"] == "finished":
            self.finished_now += 1
            self.seconds_now += seconds
        collect(self.workdir, self.sweep)
        self._progress(cell, record, seconds)
        return record

    def _record(self, cell: Cell, record: dict) -> None:
        directory = run_dir(self.workdir, cell.name)
        directory.mkdir(parents=True, exist_ok=True)
        old = _read_json(directory / "sweep_status.json") or {}
        _write_json(directory / "sweep_status.json", {**old, **record})
        self.outcomes[cell.name] = record["status"]

    def _position(self) -> str:
        done = self.done_before + sum(1 for s in self.outcomes.values() if s in ("finished", "failed", "blocked"))
        return f"{done}/{self.total}"

    def _progress(self, cell: Cell, record: dict, seconds: float = 0.0) -> None:
        status = record["status"]
        text = f"[{self._position()}] {status} {cell.name}"
        if status == "finished":
            result = results.read_result(run_dir(self.workdir, cell.name)) or {}
            value = result.get(self.sweep.metric)
            text += f" in {seconds:.1f}s" + (f", {self.sweep.metric} {value:.4f}" if isinstance(value, float) else "")
        elif record.get("error"):
            text += f": {record['error']}"
        counts = _count({n: {"status": s} for n, s in self.outcomes.items()})
        failed = counts.get("failed", 0) + counts.get("blocked", 0)
        left = self.total - self.done_before - sum(counts.get(s, 0) for s in ("finished", "failed", "blocked"))
        if self.finished_now and left > 0:
            eta = self.seconds_now / self.finished_now * left / self.parallel
            text += f" | {left} left, about {eta / 60:.0f} min"
        if failed:
            text += f" | {failed} failed or blocked so far"
        self.log(text)
