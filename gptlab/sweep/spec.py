"""The sweep language: an ablation config's stages, variants, grid and seeds expanded into cells,
and each cell's experiment config (gptlab/sweep/__init__.py documents the format)."""
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import pathlib
import re
import sys
from typing import Optional

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from gptlab import selection
from gptlab.errors import Preempted, UserError


REPO = pathlib.Path(__file__).resolve().parents[2]  # gptlab/sweep/spec.py -> the repository
EXPERIMENTS = ("pretrain", "finetune")
SPEC_KEYS = {"name", "description", "metric", "stages", "report", "study"}
STAGE_KEYS = {"name", "experiment", "config", "overrides", "variants", "grid", "seeds", "init_from", "label", "choose"}
CHOOSE_KEYS = {"key", "on_seed", "metric"}  # a stage's dynamic choice (gptlab/sweep/__init__.py)
VARIANT_RESERVED = ("label", "config")
REPORT_KEYS = {"rows", "columns", "stages", "select", "selection_metric"}  # see gptlab/report/
# skipped: a cell of a choosing stage at a value its group did not choose (never run)
STATUSES = ("finished", "running", "interrupted", "failed", "blocked", "pending", "foreign", "skipped")
FRESH = "choose a new --workdir to start fresh, or delete {dir} to discard what it holds"


class SweepInterrupted(Preempted):
    """The sweep stopped on SIGTERM/SIGINT; running cells saved a checkpoint; rerunning resumes."""

    def __init__(self, workdir, counts: dict):
        Exception.__init__(self, f"sweep interrupted ({counts_text(counts)}): finished results are kept in "
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
    # A choosing stage's cells: {"key", "on_seed", "metric", "group"}; the group is the cells that share every
    # setting but `key` and the seed. Not part of the fingerprint: the choice decides whether a cell runs, not how.
    choice: Optional[dict] = None

    @property
    def waits_for_choice(self) -> bool:
        """Runs only at its group's chosen value, once the `on_seed` cells have finished."""
        return self.choice is not None and self.seed != self.choice["on_seed"]

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
                "factors": self.factors, "depends_on": self.depends_on, "fingerprint": self.fingerprint,
                **({"choice": self.choice} if self.choice else {})}


@dataclasses.dataclass
class Sweep:
    name: str
    description: str
    metric: str
    report: dict
    cells: list  # of Cell, in run order
    source: str  # the ablation config as given on the command line
    study: Optional[dict] = None  # the spec's `study`: how projects/pretrain_vs_finetune/ (its report writer) reads the cells

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
            raise UserError(f"{where} sets no {key!r}: see projects/pretrain_vs_finetune/config.py")
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


def value_text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(value_text(v) for v in value)
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
    choose = _check_choose(stage.get("choose"), grid, seeds, where)
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
                " ".join(f"{short[k]}={value_text(v)}" for k, v in own.items()) or stage["name"])
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
                    parts += [f"{short[k]}={value_text(v)}" for k, v in own.items()]
                parts += [f"{short[k]}={value_text(v)}" for k, v in factors.items()]
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
                if choose is not None:
                    group = {"variant": own, **{k: v for k, v in factors.items() if k != choose["key"]}}
                    cell = dataclasses.replace(cell, choice={
                        **choose, "group": stage["name"] + ":" + json.dumps(group, sort_keys=True, default=repr)})
                build_config(cell, init_from="<checked>")  # every field exists and has the right type
                cells.append(cell)
    return cells


def _check_choose(choose, grid: dict, seeds: list, where: str):
    """A stage's `choose` ({"key": a grid field, "on_seed": one of its seeds, "metric": a validation metric}),
    checked; None when the stage sets none."""
    if choose is None:
        return None
    _check_keys(choose, CHOOSE_KEYS, f"{where}, choose")
    key, on_seed, metric = choose.get("key"), choose.get("on_seed", seeds[0]), choose.get("metric", "eval_loss")
    if key not in grid:
        raise UserError(f"{where}: choose key={key!r} is not one of the stage's grid fields {sorted(grid)}: "
                        "choose among the values of a gridded field")
    if on_seed not in seeds:
        raise UserError(f"{where}: choose on_seed={on_seed!r} is not one of the stage's seeds {seeds}")
    if not isinstance(metric, str):
        raise UserError(f"{where}: choose metric={metric!r} must name a validation metric, e.g. eval_loss")
    try:
        selection.check_validation_metric(metric, f"{where}: choose metric")
    except UserError as e:
        raise UserError(str(e)) from None
    return {"key": key, "on_seed": on_seed, "metric": metric}


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


def counts_text(counts: dict) -> str:
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing run"


# -- running ----------------------------------------------------------------------------------


def cell_from_json(stored: dict) -> Cell:
    keys = {f.name for f in dataclasses.fields(Cell)}
    return Cell(**{k: v for k, v in stored.items() if k in keys})
