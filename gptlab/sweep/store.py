"""A sweep's workdir as its state: which cells finished (with a result of their own configuration),
which were interrupted or failed, sweep.json, status.json and results.jsonl, rebuilt from the cells' files."""
import contextlib
import datetime
import json
import pathlib
import sys


from gptlab import files
from gptlab import lock as lock_lib
from gptlab import results
from gptlab.errors import UserError


from gptlab import selection
from gptlab.sweep.spec import FRESH, STATUSES, Cell, Sweep, build_config, cell_from_json, run_dir, value_text

def write_json(path: pathlib.Path, obj) -> None:
    files.write_json_atomic(path, obj, default=repr)


def read_json(path: pathlib.Path):
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
    recorded = read_json(directory / "sweep_status.json") or {}
    state = {"status": "pending", "error": None, "attempts": 0, "seconds": 0.0, **recorded}
    result, why = finished_result(workdir, cell)
    if result is not None:
        state.update(status="finished", error=None)
    elif why is not None and why.startswith(FOREIGN):
        state.update(status="foreign", error=why)
    elif why is not None and not (state["status"] == "running" and lock_lib.is_locked(directory / ".lock")):
        # Its result.json is there but an artefact it promises is not: rerunning completes it.
        state.update(status="interrupted" if has_checkpoint(directory) else "pending", error=why)
    elif state["status"] == "running" and lock_lib.is_locked(directory / ".lock"):
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
    result = read_json(path)
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
    stored = read_json(workdir / "sweep.json")
    if stored is None:
        if any(workdir.iterdir()):
            raise UserError(f"--workdir={workdir} is not empty and holds no sweep.json (it is not a sweep's "
                            f"workdir): {fresh}")
        return
    if stored.get("name") != sweep.name:
        raise UserError(f"--workdir={workdir} holds results of a different sweep ({stored.get('name')!r}, from "
                        f"{stored.get('source')}), not {sweep.name!r}: {fresh}")
    for cell in sweep.cells:
        recorded = read_json(run_dir(workdir, cell.name) / "sweep_cell.json")
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
    old = read_json(workdir / "sweep.json") or {}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    new = {"name": sweep.name, "description": sweep.description, "source": sweep.source, "metric": sweep.metric,
           "report": sweep.report, "study": sweep.study, "created_at": old.get("created_at", now), "updated_at": now,
           "git": results.git_state(),
           "cells": [{**c.to_json(), "command": " ".join(quote_arg(a) for a in ["python", *c.command(workdir)])}
                     for c in sweep.cells]}
    moment = ("updated_at", "git")
    if not ran and old and json.loads(json.dumps({k: v for k, v in new.items() if k not in moment}, default=repr)) \
            == {k: v for k, v in old.items() if k not in moment}:
        return
    write_json(workdir / "sweep.json", new)


def quote_arg(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def load_stored(workdir) -> Sweep:
    """The sweep recorded in DIR/sweep.json (for reports)."""
    stored = read_json(pathlib.Path(workdir) / "sweep.json")
    if stored is None:
        raise UserError(f"--workdir={workdir} holds no sweep.json: point it at a directory written by "
                        "python -m experiments.sweep")
    cells = [cell_from_json(c) for c in stored["cells"]]
    return Sweep(stored["name"], stored.get("description", ""), stored.get("metric", "eval_loss"),
                 stored.get("report") or {}, cells, stored.get("source", ""), stored.get("study"))


# -- choosing stages: one seed over the grid, then the other seeds at the chosen value -----------------

TERMINAL = ("finished", "failed", "blocked")  # an on_seed cell in none of these may still change the choice


def _value_key(value):
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value_text(value)


def choice_score(result: dict, metric: str):
    """The validation `metric` a choice reads from a result.json: its best checkpoint's (`selection`)."""
    validation = (result.get("selection") or {}).get("validation") or {}
    value = validation.get(metric, result.get(metric))
    return float(value) if isinstance(value, (int, float)) else None


def group_choice(workdir, sweep: Sweep, group: str, states: dict) -> dict:
    """The choice of one group of a choosing stage, from the stored result.json files of its on_seed cells.

    {"stage", "key", "metric", "on_seed", "values", "scores" ([{"value", "score"}] of the finished on_seed
    cells), "waiting_on" (on_seed cells not yet finished, failed or blocked), "decided", "chosen" (None until
    decided, or when none finished), "at_edge" (the chosen value is the grid's smallest or largest)}.
    """
    cells = [c for c in sweep.cells if c.choice is not None and c.choice["group"] == group]
    first = cells[0].choice
    key, on_seed, metric = first["key"], first["on_seed"], first["metric"]
    values, scores, waiting = [], {}, []
    for cell in cells:
        value = cell.factors[key]
        if value not in values:
            values.append(value)
        if cell.seed != on_seed:
            continue
        status = states[cell.name]["status"]
        if status == "finished":
            result, _ = finished_result(workdir, cell)
            score = choice_score(result, metric) if result is not None else None
            if score is not None:
                scores[_value_key(value)] = (value, score)
        elif status not in TERMINAL:
            waiting.append(cell.name)
    decided = not waiting
    chosen = None
    if decided:
        best = selection.choose_on_validation({k: [s] for k, (_, s) in scores.items()}, metric,
                                              f"the choice of {key} in stage {cells[0].stage}")
        chosen = None if best is None else scores[best][0]
    ordered = sorted(values, key=_value_key) if all(isinstance(v, (int, float)) for v in values) else values
    return {"group": group, "stage": cells[0].stage, "key": key, "metric": metric, "on_seed": on_seed,
            "values": values, "scores": [{"value": v, "score": s} for v, s in scores.values()],
            "waiting_on": waiting, "decided": decided, "chosen": chosen,
            "at_edge": chosen is not None and len(values) > 1 and chosen in (ordered[0], ordered[-1])}


def verdict(cell: Cell, choice: dict) -> str:
    """What its group's choice means for a cell: "run" (not waiting, or at the chosen value), "wait" (not
    decided yet), "skip" (another value was chosen) or "block" (no on_seed cell finished to choose on)."""
    if not cell.waits_for_choice:
        return "run"
    if not choice["decided"]:
        return "wait"
    if choice["chosen"] is None:
        return "block"
    return "run" if _value_key(cell.factors[choice["key"]]) == _value_key(choice["chosen"]) else "skip"


def gate(cell: Cell, choice: dict, state: dict) -> dict:
    """`state` of a cell as its group's choice makes it: skipped at a value not chosen, blocked when no on_seed
    cell finished, else as it was (a finished cell stays finished)."""
    if state["status"] in ("finished", "foreign", "running"):
        return state
    what = verdict(cell, choice)
    if what == "block":
        return {**state, "status": "blocked", "error": f"no cell of seed {choice['on_seed']} finished with "
                                                       f"{choice['metric']} to choose {choice['key']} on"}
    if what == "skip":
        return {**state, "status": "skipped", "error": None}
    return state


def collect(workdir, sweep: Sweep) -> dict:
    """Rewrites DIR/results.jsonl (finished cells, in sweep order), DIR/status.json and, for a sweep with
    choosing stages, DIR/choices.json (every group's choice, recomputed from the stored results); returns
    the states."""
    workdir = pathlib.Path(workdir)
    states, stored = {}, {}
    for cell in sweep.cells:
        states[cell.name], stored[cell.name] = _cell_state(workdir, cell)
    choices = {}
    for cell in sweep.cells:
        if cell.choice is not None and cell.choice["group"] not in choices:
            choices[cell.choice["group"]] = group_choice(workdir, sweep, cell.choice["group"], states)
    lines = []
    for cell in sweep.cells:
        choice = choices.get((cell.choice or {}).get("group"))
        if choice is not None:
            states[cell.name] = gate(cell, choice, states[cell.name])
        result, state = stored[cell.name], states[cell.name]
        if result is not None:
            record = {"cell": cell.name, "stage": cell.stage, "label": cell.label, "variant": cell.variant,
                      "factors": cell.factors, "seed": cell.seed, "workdir": f"runs/{cell.name}",
                      "cell_seconds": state.get("seconds")}
            if choice is not None:  # whether this cell is at its group's chosen value (None: not decided yet)
                record["choice"] = {"key": choice["key"], "group": choice["group"], "on_seed": choice["on_seed"],
                                    "chosen": None if choice["chosen"] is None else
                                    _value_key(cell.factors[choice["key"]]) == _value_key(choice["chosen"]),
                                    "at_edge": choice["at_edge"]}
            lines.append(json.dumps({**record, "result": result}, default=repr))
    files.write_atomic(workdir / "results.jsonl", "".join(line + "\n" for line in lines))
    status = {"sweep": sweep.name, "counts": count_statuses(states), "cells": states}
    if choices:
        write_json(workdir / "choices.json", {"sweep": sweep.name, "choices": list(choices.values())})
        status["choices"] = {g: c["chosen"] for g, c in choices.items() if c["decided"]}
    write_json(workdir / "status.json", status)
    return states


def read_results(workdir) -> list:
    """DIR/results.jsonl's records (a damaged line is refused: `collect` rebuilds the file from the cells)."""
    return files.read_jsonl(pathlib.Path(workdir) / "results.jsonl",
                            fix=f"rebuild it from the cells' result.json files with python -m experiments.report "
                                f"--workdir={pathlib.Path(workdir).absolute()}")


@contextlib.contextmanager
def first_error_only():
    """Cleanup after a failure: an OSError inside (the same full disk again) is dropped when another
    exception is already on its way out, so the user sees the first failure, in one line."""
    failing = sys.exc_info()[1] is not None
    try:
        yield
    except OSError:
        if not failing:
            raise


def count_statuses(states: dict) -> dict:
    counts = {s: 0 for s in STATUSES}
    for state in states.values():
        counts[state["status"]] += 1
    return {s: n for s, n in counts.items() if n}




