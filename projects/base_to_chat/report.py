"""The base -> chat SFT -> DPO report card: each stage's depth, breadth, cost and sample conversations.

`write_study(DIR)`: from a sweep workdir, measures every finished run that has not been measured
(card.py; each measurement cached in DIR/card/CELL.json, so a rerun measures only what is new).
DPO runs at several learning rates: each SFT and DPO run's preference accuracy on the validation
pairs is measured first (DIR/card/CELL.validation.json), the learning rate with the best mean over
seeds is kept (a tie: the smaller), and only its runs are measured on the test split. It then
collects DIR/study/ (results.jsonl: the runs' records; card.json: the measurements; study.json: the
study and its invocations) and writes report.md and table_*.csv there. From a study directory it
regenerates the same report from those files alone. Intervals: 95% Student t over seeds
(gptlab/stats.py); paired differences pair the runs of one seed (DPO seed s starts from SFT seed s).
"""
import json
import math
import os
import pathlib
import platform
import subprocess

from gptlab import files, perf, stats, tables
from gptlab import sweep as sweep_lib
from gptlab.errors import UserError

STUDY_DIR, RECORDS, CARD, SPEC = "study", "results.jsonl", "card.json", "study.json"
STAGES = ("base", "sft", "dpo")
NAMES = {"base": "base", "sft": "chat SFT", "dpo": "DPO"}
# metric -> (column title, digits, as a percentage)
METRICS = {"assistant_loss": ("assistant-token loss", 3, False), "exact_match": ("exact match (write)", 1, True),
           "parse_rate": ("parse rate (write)", 1, True), "stop_rate": ("stop rate", 1, True),
           "preference_accuracy": ("preference accuracy", 1, True), "bits_per_byte": ("bits per byte", 4, False)}
TARGETS = dict(sft_stop_rate=0.95, sft_loss_drop=0.30, dpo_breadth_worsening=0.05)


# -- collecting -------------------------------------------------------------------------------------


def _read(path: pathlib.Path):
    return files.read_json(path, fix="delete it and rerun python -m experiments.study "
                                     "with the same --config and --workdir to rebuild it")


def _record(line: dict) -> dict:
    """What the card needs of a run's result.json."""
    r = line["result"]
    return {"cell": line["cell"], "stage": line["stage"], "seed": line["seed"], "workdir": line["workdir"],
            # every attempt of the cell, process start to end (an interrupted run resumes in a later attempt)
            "wall_time_s": line.get("cell_seconds") or (r.get("timing") or {}).get("wall_time_s"),
            "last_attempt_train_s": (r.get("timing") or {}).get("wall_time_s"), "steps": r.get("steps"),
            "trainable": (r.get("params") or {}).get("trainable"), "total": (r.get("params") or {}).get("total"),
            "commit": (r.get("git") or {}).get("commit"), "dirty": (r.get("git") or {}).get("dirty"),
            "host_cpu": (r.get("device") or {}).get("host_cpu") or (r.get("device") or {}).get("kind"),
            "data_examples": r.get("data_examples"), "factors": line.get("factors") or {}}


def collect(workdir, measure=None, validate=None) -> pathlib.Path:
    """DIR/study/ from a sweep workdir: the runs' records, DPO's learning rate chosen on validation, the
    chosen runs measured (every measurement cached)."""
    if measure is None or validate is None:
        from projects.base_to_chat import card as card_lib  # jax and the data code: only where something is measured

        measure, validate = measure or card_lib.measure, validate or card_lib.validate
    workdir = pathlib.Path(workdir)
    sweep = sweep_lib.load_stored(workdir)
    out = workdir / STUDY_DIR
    out.mkdir(exist_ok=True)
    sweep_lib.collect(workdir, sweep)
    records = [_record(line) for line in sweep_lib.read_results(workdir)]
    files.write_jsonl_atomic(out / RECORDS, records)
    settings = sweep.study["card"]
    base = next((r for r in records if r["stage"] == "base"), None)

    def cached(r, suffix, fn):
        cache = workdir / "card" / f"{r['cell']}{suffix}.json"
        key = {"settings": settings, "fingerprint": sweep.cell(r["cell"]).fingerprint}
        stored = _read(cache)
        if stored is None or stored.get("key") != key:
            stored = {"key": key, "cell": r["cell"], "stage": r["stage"], "seed": r["seed"], **fn()}
            cache.parent.mkdir(exist_ok=True)
            files.write_json_atomic(cache, stored)
        return {k: v for k, v in stored.items() if k != "key"}

    validation = {r["cell"]: cached(r, ".validation", lambda r=r: validate(workdir / r["workdir"], settings))
                  for r in records if r["stage"] in ("sft", "dpo")}
    candidates = {}  # DPO learning rate -> {seed: validation preference accuracy}
    for r in records:
        if r["stage"] == "dpo":
            lr = r["factors"].get("optimizer.learning_rate")
            candidates.setdefault(lr, {})[r["seed"]] = validation[r["cell"]]["validation_preference_accuracy"]
    chosen = max(sorted(candidates, key=lambda lr: (lr is None, lr)),
                 key=lambda lr: sum(candidates[lr].values()) / len(candidates[lr]), default=None)
    selection = {"chosen_learning_rate": chosen, "candidates": [
        {"learning_rate": lr, "seeds": sorted(v), "validation_preference_accuracy": sum(v.values()) / len(v)}
        for lr, v in sorted(candidates.items(), key=lambda kv: (kv[0] is None, kv[0]))]}
    measured = []
    for r in records:
        if r["stage"] == "dpo" and r["factors"].get("optimizer.learning_rate") != chosen:
            continue
        base_config = json.loads((workdir / base["workdir"] / "config.json").read_text())
        m = cached(r, "", lambda r=r: measure(workdir / r["workdir"], base_config, settings))
        measured.append({**m, **{k: v for k, v in validation.get(r["cell"], {}).items()
                                 if k.startswith("validation_")}})
    files.write_json_atomic(out / CARD, {"measured": measured, "dpo_selection": selection})
    previous = _read(out / SPEC) or {}
    files.write_json_atomic(out / SPEC, {"name": sweep.name, "description": sweep.description,
                                         "source": sweep.source, "study": sweep.study,
                                         "cells_in_sweep": len(sweep.cells), "runs": previous.get("runs", [])})
    return out


def record_run(workdir, wall_time_s: float, finished: bool) -> None:
    """Appends one invocation of experiments.study (wall time, load average, CPU) to DIR/study/study.json."""
    path = pathlib.Path(workdir) / STUDY_DIR / SPEC
    path.parent.mkdir(exist_ok=True)
    meta = _read(path) or {}
    meta.setdefault("runs", []).append({"wall_time_s": round(wall_time_s, 1), "finished": finished,
                                        "load_average": [round(x, 2) for x in os.getloadavg()],
                                        "cpu": cpu_model(), "cores": os.cpu_count()})
    files.write_json_atomic(path, meta)


def cpu_model() -> str:
    """lscpu's model name (else what gptlab.perf reads)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return perf.cpu_description() or platform.processor()


# -- the numbers ------------------------------------------------------------------------------------


class Card:
    """The measurements by stage and seed, and what the tables and targets make of them."""

    def __init__(self, meta: dict, records: list, card: dict):
        measured, self.selection = card["measured"], card.get("dpo_selection") or {}
        self.meta, self.study = meta, meta.get("study") or {}
        self.records = {r["cell"]: r for r in records}
        self.by_stage = {s: {} for s in STAGES}  # stage -> seed -> measurements plus the run's record
        for m in measured:
            self.by_stage[m["stage"]][m["seed"]] = {**self.records.get(m["cell"], {}), **m}

    def values(self, stage: str, metric: str) -> dict:
        return {seed: m[metric] for seed, m in sorted(self.by_stage[stage].items())
                if m.get(metric) is not None and not (isinstance(m[metric], float) and math.isnan(m[metric]))}

    def interval(self, stage: str, metric: str):
        values = self.values(stage, metric)
        return stats.t_interval(list(values.values())) if values else None

    def base_value(self, metric: str):
        values = list(self.values("base", metric).values())
        return values[0] if values else None

    def paired(self, a: str, b: str, metric: str, relative: bool = False):
        """a - b per seed (b's base: the one base run), relative to b when `relative`."""
        va, vb = self.values(a, metric), self.values(b, metric)
        if b == "base" and vb:
            vb = {seed: next(iter(vb.values())) for seed in va}
        if not set(va) & set(vb):
            return None
        if relative:
            va = {s: va[s] / vb[s] - 1.0 for s in va if s in vb and vb[s]}
            vb = {s: 0.0 for s in va}
        return stats.paired_difference(va, vb)

    def comparisons(self) -> list:
        """(what, metric, interval, better is higher) for the paired comparisons the targets read."""
        out = []
        for a, b, metric, relative, higher in (
                ("sft", "base", "assistant_loss", True, False), ("sft", "base", "stop_rate", False, True),
                ("dpo", "sft", "preference_accuracy", False, True), ("sft", "base", "preference_accuracy", False, True),
                ("dpo", "sft", "bits_per_byte", True, False), ("sft", "base", "bits_per_byte", True, False),
                ("dpo", "base", "bits_per_byte", True, False), ("dpo", "sft", "assistant_loss", True, False),
                ("dpo", "sft", "stop_rate", False, True)):
            d = self.paired(a, b, metric, relative)
            if d is not None:
                out.append((f"{NAMES[a]} - {NAMES[b]}", metric + (" (relative)" if relative else ""), d, higher))
        return out

    def targets(self) -> list:
        """(target, measured, met: True / False / None when not measured)."""
        rows = []
        stop = self.interval("sft", "stop_rate")
        rows.append((f"chat SFT stop rate >= {TARGETS['sft_stop_rate']:.0%}",
                     fmt(stop, 1, True) if stop else "not measured",
                     None if stop is None else stop.mean >= TARGETS["sft_stop_rate"]))
        drop = self.paired("sft", "base", "assistant_loss", relative=True)
        rows.append((f"chat SFT assistant-token test loss >= {TARGETS['sft_loss_drop']:.0%} below base",
                     f"{-drop.mean:.1%} below (95% CI {-drop.high:.1%} to {-drop.low:.1%}, n={drop.n})" if drop
                     else "not measured", None if drop is None else -drop.mean >= TARGETS["sft_loss_drop"]))
        pref = self.paired("dpo", "sft", "preference_accuracy")
        rows.append(("DPO preference accuracy above SFT's, paired 95% CI excluding zero",
                     f"{pref.mean:+.1%} (95% CI {pref.low:+.1%} to {pref.high:+.1%}, n={pref.n})" if pref
                     else "not measured", None if pref is None else pref.low > 0))
        worse = self.paired("dpo", "sft", "bits_per_byte", relative=True)
        rows.append((f"DPO breadth (bits per byte) at most {TARGETS['dpo_breadth_worsening']:.0%} worse than SFT's",
                     f"{worse.mean:+.2%} (95% CI {worse.low:+.2%} to {worse.high:+.2%}, n={worse.n})" if worse
                     else "not measured", None if worse is None else worse.mean <= TARGETS["dpo_breadth_worsening"]))
        return rows

    def tables(self) -> dict:
        """Every table as (header, rows, align) of plain strings: Markdown and CSV share them."""
        t = {}
        header = ["stage", "seeds"] + [METRICS[m][0] for m in METRICS] + ["wall time (s)", "trainable params"]
        rows = []
        for stage in STAGES:
            if not self.by_stage[stage]:
                continue
            row = [NAMES[stage], str(len(self.by_stage[stage]))]
            for metric, (_, digits, percent) in METRICS.items():
                i = self.interval(stage, metric)
                row.append(fmt(i, digits, percent) if i else "—")
            wall = self.interval(stage, "wall_time_s")
            row.append(fmt(wall, 0) if wall else "—")
            trainable = self.values(stage, "trainable")
            row.append(f"{next(iter(trainable.values())):,}" if trainable else "—")
            rows.append(row)
        t["stages"] = (header, rows, "ll" + "r" * (len(header) - 2))
        header = ["stage", "seed", "step"] + list(METRICS) + ["validation_preference_accuracy", "stop: replies",
                                                             "write turns", "pairs", "wall_time_s", "trainable",
                                                             "measure_seconds"]
        rows = []
        for stage in STAGES:
            for seed, m in sorted(self.by_stage[stage].items()):
                rows.append([stage, seed, m.get("step")] + [m.get(k) for k in METRICS] +
                            [m.get("validation_preference_accuracy"), m.get("replies"), m.get("write_turns"), m.get("pairs"), m.get("wall_time_s"),
                             m.get("trainable"), m.get("measure_seconds")])
        t["seeds"] = (header, rows, "lrr" + "r" * (len(header) - 3))
        rows = []
        for what, metric, d, higher in self.comparisons():
            percent = metric.endswith("(relative)") or metric.split()[0] in ("stop_rate", "preference_accuracy")
            cell = (f"{d.mean:+.2%} [{d.low:+.2%}, {d.high:+.2%}]" if percent
                    else f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")
            verdict = (("better" if (d.mean > 0) == higher else "worse") if d.excludes(0) else "no difference shown")
            rows.append([what, metric, cell, str(d.n), verdict])
        t["paired"] = (["comparison (a - b)", "metric", "mean difference (95% CI)", "seeds", "a is"], rows, "lllrl")
        rows = [[target, measured, "—" if met is None else ("met" if met else "not met")]
                for target, measured, met in self.targets()]
        t["targets"] = (["target", "measured", "verdict"], rows, "lll")
        chosen = self.selection.get("chosen_learning_rate")
        rows = [[f"{c['learning_rate']:g}", str(len(c["seeds"])), f"{c['validation_preference_accuracy']:.1%}",
                 "chosen" if c["learning_rate"] == chosen else ""] for c in self.selection.get("candidates", [])]
        sft = self.values("sft", "validation_preference_accuracy")
        if sft:
            rows.append(["chat SFT (no DPO)", str(len(sft)), f"{sum(sft.values()) / len(sft):.1%}", ""])
        t["dpo_selection"] = (["DPO learning rate", "seeds", "validation preference accuracy (mean)", ""], rows,
                              "lrrl")
        return t

    def samples(self) -> list:
        """[(stage, [[user, reply, stopped], ...] per prompt)] from the lowest seed of each stage."""
        out = []
        for stage in STAGES:
            if self.by_stage[stage]:
                first = self.by_stage[stage][min(self.by_stage[stage])]
                out.append((stage, first.get("samples") or []))
        return out


def fmt(interval, digits: int, percent: bool = False) -> str:
    """mean ± half-width (n=1: the value alone)."""
    scale, unit = (100.0, "%") if percent else (1.0, "")
    mean = f"{interval.mean * scale:.{digits}f}"
    if interval.n < 2:
        return mean + unit
    return f"{mean} ± {interval.half_width * scale:.{digits}f}{unit}"


# -- writing ----------------------------------------------------------------------------------------


def load(study_dir) -> Card:
    study_dir = pathlib.Path(study_dir)
    meta, measured = _read(study_dir / SPEC), _read(study_dir / CARD)
    if meta is None or measured is None or not (study_dir / RECORDS).exists():
        raise UserError(f"{study_dir} holds no {SPEC}, {CARD} and {RECORDS}: run python -m experiments.study "
                        "--config=projects/base_to_chat/config.py:cpu --workdir=DIR first")
    records = files.read_jsonl(study_dir / RECORDS, fix="rebuild it with python -m experiments.study "
                               "--report_only --workdir=SWEEP_DIR (the directory above study/)")
    return Card(meta, records, measured)


def markdown(card: Card, tables_: dict) -> str:
    meta, study = card.meta, card.study
    runs = meta.get("runs") or []
    source = meta.get("source", "")
    try:
        path, _, preset = source.partition(":")
        source = str(pathlib.Path(path).resolve().relative_to(sweep_lib.REPO)) + (f":{preset}" if preset else "")
    except ValueError:
        pass
    commits = sorted({(r.get("commit") or "unknown")[:7] + (" plus uncommitted changes" if r.get("dirty") else "")
                      for r in card.records.values()})
    cpus = sorted({r["cpu"] for r in runs if r.get("cpu")}) or sorted(
        {r.get("host_cpu") or "?" for r in card.records.values()})
    settings = study.get("card") or {}
    lines = [f"# From base model to assistant: the report card ({meta.get('name', '')})", "",
             meta.get("description", ""), "",
             f"Command: `python -m experiments.study --config={source} --workdir=DIR` (rerunning resumes; "
             "`--report_only --workdir=DIR/study` rewrites this report from the files beside it).", "",
             f"Commit: {', '.join(commits) or 'unknown'}. CPU: {'; '.join(cpus)}."]
    if runs:
        total = sum(r["wall_time_s"] for r in runs)
        loads = "; ".join(f"{r['wall_time_s'] / 60:.1f} min, load average {', '.join(map(str, r.get('load_average') or []))}"
                          f"{'' if r.get('finished') else ' (interrupted)'}" for r in runs)
        lines.append(f"Wall time of the command: {total / 60:.1f} min over {len(runs)} invocation(s) ({loads}; the load "
                     "average is the 1-, 5- and 15-minute one at the end of each).")
    lines += ["", "## The stages", "",
              f"Depth on the held-out chat test split: {settings.get('conversations')} conversations (assistant-token "
              f"loss; the first user turn answered greedily within {settings.get('cap')} tokens: stop rate, and for the "
              f"write-this-function turns among them exact match and parse rate) and {settings.get('pairs')} preference "
              "pairs (preference accuracy: the model's own summed log-probability of the chosen answer above the "
              "rejected one's). Breadth: bits per byte on the pretraining corpus's validation split "
              f"({settings.get('breadth_batches')} batches). Cost: the run's wall time (every attempt of it, start-up "
              "included: a run interrupted and resumed counts both parts) and its trainable parameters. "
              "Mean ± half-width of the 95% t-interval over seeds (the base: one run). "
              "projects/base_to_chat/card.py defines each number.", ""]
    header, rows, align = tables_["stages"]
    lines += tables.markdown(header, rows, align)
    lines += ["", "## Targets", ""]
    header, rows, align = tables_["targets"]
    lines += tables.markdown(header, rows, align)
    lines += ["", "## DPO's learning rate, chosen on the validation pairs", "",
              "Every candidate ran for every seed; the report keeps the one with the best mean preference accuracy "
              "on the validation pairs (the same measure as the test column above, on the validation split) and "
              "reports only its runs.", ""]
    header, rows, align = tables_["dpo_selection"]
    lines += tables.markdown(header, rows, align)
    lines += ["", "## Paired differences", "",
              "Per seed, a - b (relative: a / b - 1); DPO seed s starts from SFT seed s, and both from the one base.", ""]
    header, rows, align = tables_["paired"]
    lines += tables.markdown(header, rows, align)
    lines += ["", "## Sample conversations", "",
              "The same three prompts (one of each kind of the test split) for each stage, greedy, seed "
              "0's run; a reply that did not end by itself within the cap is marked (cut).", ""]
    for stage, conversations in card.samples():
        lines += [f"### {NAMES[stage]}", ""]
        for i, turns in enumerate(conversations, 1):
            lines.append(f"{i}.")
            for user, reply, stopped in turns:
                lines += [f"   - **user**: {_quote(user)}",
                          f"   - **assistant**: {_quote(reply) or '(empty)'}{'' if stopped else ' (cut)'}"]
            lines.append("")
    lines += ["## Files", "", "table_stages.csv, table_targets.csv, table_dpo_selection.csv, table_paired.csv and "
              "table_seeds.csv (every stage and seed's numbers) hold the tables; card.json the measurements with the sample "
              "conversations; results.jsonl the runs' records (wall time, parameters, commit, CPU); study.json "
              "the study's settings and invocations.", ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    """A turn on one Markdown line: code in backticks-free form, newlines shown as ⏎."""
    text = text.replace("`", "'").replace("\n", " ⏎ ")
    return f"`{text}`" if text.strip() else ""


def write_study(directory, measure=None) -> dict:
    """report.md and table_*.csv in DIR/study/ (from a sweep workdir, after measuring) or in a study directory."""
    directory = pathlib.Path(directory)
    study_dir = collect(directory, measure) if (directory / "sweep.json").exists() else directory
    card = load(study_dir)
    t = card.tables()
    for key, (header, rows, _) in t.items():
        tables.write_csv(study_dir / f"table_{key}.csv", header, rows)
    md = study_dir / "report.md"
    files.write_atomic(md, markdown(card, t))
    return {"markdown": md, "pdf": None}
