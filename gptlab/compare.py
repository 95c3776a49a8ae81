"""Comparing runs: several workdirs evaluated on the same text, one table.

    python -m experiments.compare --workdirs=A,B,C [--config.data.include="('email/*',)"] [--output=compare.md]
    python -m experiments.compare --workdirs=A --workdirs="runs/lr=1e-3,bs=8"  # a path with a comma: its own flag

The numbers of two `experiments.evaluate` calls are only comparable when both
read the same text. Here the text is fixed once for all runs: the fields that
choose it (`TEXT_FIELDS`: dataset, split, include/exclude, ...) come from
`--config.data.*` where set, else from the first workdir's run; every run keeps
its own tokenizer, window length and batch size (bits per byte compares across
tokenizers). Each run is scored by its task's evaluator (gptlab.evaluate.TASKS).
Every row reports the bytes it read: they agree when the text is the same, and
a run that read different text is an error. Runs of different tasks get a table each:
a classifier's loss and a language model's are different quantities.
"""
import pathlib
import time

from gptlab import convert
from gptlab import evaluate as evaluate_lib
from gptlab import files
from gptlab import tables
from gptlab.errors import UserError

# The data fields that choose which text is evaluated: shared by every compared run.
TEXT_FIELDS = ("dataset", "eval_split", "text_key", "data_dir", "manual_dir", "text_dir", "text_glob",
               "include", "exclude")
# Leading columns of the table; every other metric an evaluator reports follows them.
COLUMNS = ("run", "step", "task", "loss", "perplexity", "bits_per_byte", "accuracy", "tokens", "bytes")


def shared_text(reference: dict, overrides) -> dict:
    """The text fields every run is evaluated with: `overrides` where set, else the reference run's."""
    data = evaluate_lib.data_config(reference, overrides)
    text = {field: data.get(field) for field in TEXT_FIELDS if field in data}
    return {**text, "include": tuple(text.get("include") or ()), "exclude": tuple(text.get("exclude") or ())}


def compare(workdirs, config, step=None, log=print) -> dict:
    """Evaluates every workdir (latest checkpoint, or `step`: a number or "best") on the same text; returns the table."""
    if len(workdirs) < 1:
        raise UserError("--workdirs is empty: give one or more workdirs separated by commas")
    loaded = [convert.load_workdir(w, step, strict=False) for w in workdirs]
    text = shared_text(loaded[0].config, config.data)
    rows = []
    for workdir, run in zip(workdirs, loaded):
        task = evaluate_lib.task_of(run.config)
        if task not in evaluate_lib.TASKS:
            raise UserError(f"{workdir} is a {task!r} run and this gptlab has no evaluator for that task: "
                            f"it evaluates {sorted(evaluate_lib.TASKS)}")
        own = {k: v for k, v in config.data.items() if k not in TEXT_FIELDS}
        data_cfg = evaluate_lib.data_config(run.config, {**own, **text})
        log(f"evaluating {run.directory} (step {run.step}, task {task}) on {_describe(text)}")
        start = time.perf_counter()
        metrics = evaluate_lib.TASKS[task](run, data_cfg, config, log)
        rows.append({"run": str(workdir), "step": run.step, "task": task, **metrics,
                     "seconds": round(time.perf_counter() - start, 2)})
    sizes = {row["bytes"] for row in rows if "bytes" in row}
    if len(sizes) > 1:  # the text fields are shared, so only a changed dataset on disk can do this
        raise UserError(f"the runs read different amounts of text ({sorted(sizes)} bytes) although the data fields "
                        "were the same: the dataset changed between evaluations; rerun the comparison")
    return {"text": text, "rows": rows}


def _describe(text: dict) -> str:
    parts = [f"{text['dataset']}/{text['eval_split']}"]
    parts += [f"{k}={tuple(text[k])}" for k in ("include", "exclude") if text.get(k)]
    parts += [f"{k}={text[k]}" for k in ("text_dir", "text_glob") if text.get(k)]
    return " ".join(parts)


def markdown(table: dict) -> str:
    """The table in Markdown, headed by the text every run was evaluated on: one table per task, since
    the tasks' losses measure different things (next-token against class cross-entropy)."""
    lines = [f"Evaluated on {_describe(table['text'])} (the same text for every run)."]
    tasks = list(dict.fromkeys(row["task"] for row in table["rows"]))
    for task in tasks:
        rows = [row for row in table["rows"] if row["task"] == task]
        if len(tasks) > 1:
            lines += ["", f"Task {task} ({TASK_LOSS.get(task, 'its own loss')}; not comparable with the other tasks'):"]
        lines += [""] + _markdown_rows(rows)
    return "\n".join(lines) + "\n"


TASK_LOSS = {"lm": "loss: next-token cross-entropy", "sft": "loss: next-token cross-entropy on responses",
             "classify": "loss: class cross-entropy"}


def _markdown_rows(rows) -> list:
    extra = [k for row in rows for k in row if k not in COLUMNS and k != "seconds"]
    columns = [c for c in COLUMNS if any(c in row for row in rows)] + list(dict.fromkeys(extra))
    cell = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    return tables.markdown(columns, [[cell(row.get(c)) for c in columns] for row in rows])


def split_workdirs(values) -> list:
    """--workdirs values (the flag may be repeated) as workdirs: each value is split at commas, except a value
    naming an existing path as a whole (a path with a comma in it: give it as its own --workdirs)."""
    workdirs = []
    for value in values:
        if "," in value and pathlib.Path(value).expanduser().exists():
            workdirs.append(value)
        else:
            workdirs += [part for part in value.split(",") if part]
    return workdirs


def write(table: dict, output) -> tuple:
    """Writes OUTPUT (Markdown) and OUTPUT with .json (the rows and the text) beside it."""
    path = pathlib.Path(output).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, markdown(table))
        json_path = path.with_suffix(".json")
        files.write_json_atomic(json_path, table, default=list)
    except OSError as e:
        raise UserError(f"cannot write --output={output} ({e.strerror or e}): choose a writable path") from None
    return path, json_path
