"""Bookkeeping that never lies: which sweep cells count as finished, results files under a full disk.

A cell counts only with a result.json of its own configuration and every artefact that
result.json lists (a LoRA run's merged export is written before it); a damaged results
line is refused naming file and line; a full disk ends in one line with nothing half-written.
Most cells here are fabricated (a result.json built from the cell's own config), so no
training runs except in the merged-export test.
"""
import errno
import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from gptlab import checkpoint as checkpoint_lib
from gptlab import compare
from gptlab import results
from projects.pretrain_vs_finetune import report as study_lib
from gptlab import sweep as sweep_lib
from gptlab.errors import UserError

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
SWEEP = """
def get_config(arg=""):
    return dict(name="books", metric="eval_loss", stages=[
        dict(name="pre", experiment="pretrain", config="configs/pretrain.py:tiny",
             overrides={"train.num_steps": 40}, grid={"data.train_fraction": [0.1, 1.0]})],
        study=dict(report="projects.pretrain_vs_finetune.report"))  # experiments.study's writer (collect is tested)
"""


@pytest.fixture
def fabricated(tmp_path):
    """A sweep of two pretraining cells whose result.json files are written by hand, as a run would."""
    config = tmp_path / "books.py"
    config.write_text(SWEEP)
    sweep = sweep_lib.load_sweep(str(config))
    workdir = tmp_path / "sweep"
    sweep_lib.write_sweep_json(workdir.mkdir() or workdir, sweep)
    for cell in sweep.cells:
        write_result(workdir, cell, fake_result(cell))
    return config, sweep, workdir


def fake_result(cell, **changes) -> dict:
    config = json.loads(sweep_lib.build_config(cell).to_json_best_effort())
    for dotted, value in changes.items():
        group, field = dotted.split(".")
        config[group][field] = value
    return {"step": config["train"]["num_steps"], "eval_loss": 4.4 if config["data"]["train_fraction"] < 1 else 4.2,
            "steps": config["train"]["num_steps"], "config": config,
            "config_fingerprint": results.config_fingerprint(config), "artefacts": []}


def write_result(workdir, cell, result) -> pathlib.Path:
    directory = sweep_lib.run_dir(workdir, cell.name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / results.FILENAME).write_text(json.dumps(result))
    return directory


def one_line_error(completed, *fragments):
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    lines = completed.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), lines[-1]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def leftovers(directory) -> list:
    return sorted(str(p) for p in pathlib.Path(directory).rglob("*.tmp"))


def test_a_result_json_of_another_configuration_is_not_counted(fabricated):
    config, sweep, workdir = fabricated
    small, full = sweep.cells  # train_fraction 0.1 and 1.0
    assert {n: s["status"] for n, s in sweep_lib.collect(workdir, sweep).items()} == \
           {small.name: "finished", full.name: "finished"}
    # The case: a run with train_fraction 1.0 and 20 steps copied into the 0.1 cell.
    foreign = fake_result(full, **{"train.num_steps": 20})
    write_result(workdir, small, foreign)
    states = sweep_lib.collect(workdir, sweep)
    assert states[small.name]["status"] == "foreign" and states[full.name]["status"] == "finished"
    assert "data.train_fraction 1.0, not 0.1" in states[small.name]["error"]
    assert "train.num_steps 20, not 40" in states[small.name]["error"]
    assert [row["cell"] for row in sweep_lib.read_results(workdir)] == [full.name]  # no row built from it
    # The sweep refuses in one line, naming the cell and what to do, and runs nothing.
    run = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--config={config}", f"--workdir={workdir}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    one_line_error(run, small.name, "another configuration", "move or delete")
    assert json.loads((sweep_lib.run_dir(workdir, small.name) / results.FILENAME).read_text()) == foreign
    with pytest.raises(UserError, match="hold files of another run"):
        sweep_lib.Runner(sweep, workdir, log=lambda *_: None).run()


def test_an_edited_result_or_a_missing_artefact_is_not_finished(fabricated):
    _, sweep, workdir = fabricated
    small, full = sweep.cells
    edited = fake_result(small)
    edited["config"]["optimizer"]["learning_rate"] = 1.0  # the config changed by hand, its fingerprint not
    write_result(workdir, small, edited)
    state = sweep_lib.cell_state(workdir, small)
    assert state["status"] == "foreign" and "config_fingerprint" in state["error"]
    # A LoRA-style promise: result.json lists merged/, which is missing: the cell resumes (it has a checkpoint).
    promised = {**fake_result(full), "artefacts": ["merged"]}
    directory = write_result(workdir, full, promised)
    (directory / "checkpoints" / "40").mkdir(parents=True)
    state = sweep_lib.cell_state(workdir, full)
    assert state["status"] == "interrupted" and "merged" in state["error"]
    (directory / "merged").mkdir()
    assert sweep_lib.cell_state(workdir, full)["status"] == "finished"


def test_a_rerun_that_runs_nothing_leaves_sweep_json_as_it_was(fabricated):
    _, sweep, workdir = fabricated
    sweep_lib.Runner(sweep, workdir, log=lambda *_: None).run()
    before = (workdir / "sweep.json").read_bytes()
    stat = (workdir / "sweep.json").stat().st_mtime_ns
    time.sleep(1.1)  # updated_at has one-second resolution
    states = sweep_lib.Runner(sweep, workdir, log=lambda *_: None).run()
    assert all(s["status"] == "finished" for s in states.values())
    assert (workdir / "sweep.json").read_bytes() == before and (workdir / "sweep.json").stat().st_mtime_ns == stat


class _Exited:
    """What the runner needs of a finished child process."""

    def __init__(self, returncode):
        self.returncode = returncode

    def poll(self):
        return self.returncode

    wait = poll


def test_a_cell_killed_by_a_signal_is_reported_with_that_signal_only(fabricated):
    _, sweep, workdir = fabricated
    cell = sweep.cells[0]
    (sweep_lib.run_dir(workdir, cell.name) / results.FILENAME).unlink()
    runner = sweep_lib.Runner(sweep, workdir, log=lambda *_: None)
    runner.total, runner.done_before, runner.finished_now, runner.seconds_now, runner.outcomes = 2, 1, 0, 0.0, {}
    runner.running[cell.name] = (_Exited(-signal.SIGABRT), None, time.perf_counter(), 0)
    record = runner._finish(cell.name)  # pylint: disable=protected-access
    assert record["status"] == "failed" and record["error"] == "killed by signal SIGABRT"  # no guessed cause


def test_a_damaged_results_line_is_refused_naming_file_and_line(fabricated, tmp_path):
    _, sweep, workdir = fabricated
    sweep_lib.collect(workdir, sweep)
    path = workdir / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:40] + "\n")  # the second line cut short
    with pytest.raises(UserError, match=rf"{path} line 2 is damaged .*experiments.report"):
        sweep_lib.read_results(workdir)
    sweep_lib.collect(workdir, sweep)  # what experiments.report does first: rebuilt from the cells
    assert len(sweep_lib.read_results(workdir)) == 2
    # A study directory's results.jsonl has no cells to rebuild it from: --report_only refuses it.
    study_dir = study_lib.collect(workdir)
    records = (study_dir / study_lib.RECORDS).read_text().splitlines()
    (study_dir / study_lib.RECORDS).write_text(records[0] + "\n[1, 2]\n")
    with pytest.raises(UserError, match=rf"{study_dir / study_lib.RECORDS} line 2 is damaged"):
        study_lib.load(study_dir)


def _limited(limit_bytes: int):
    def apply():  # in the child: writes past the limit fail with EFBIG (as on a full disk) instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_full_disk_during_collect_ends_in_one_line_with_nothing_half_written(fabricated):
    config, sweep, workdir = fabricated
    for cell in sweep.cells:  # large results: results.jsonl outgrows the limit, the small state files do not
        path = sweep_lib.run_dir(workdir, cell.name) / results.FILENAME
        path.write_text(json.dumps({**json.loads(path.read_text()), "notes": "x" * 40_000}))
    command = [sys.executable, "-m", "experiments.sweep", f"--config={config}", f"--workdir={workdir}"]
    assert subprocess.run(command, cwd=REPO, capture_output=True, timeout=300, env=ENV).returncode == 0
    first = (workdir / "results.jsonl").read_bytes()
    for cell in sweep.cells:  # the results change, and cannot be written
        path = sweep_lib.run_dir(workdir, cell.name) / results.FILENAME
        path.write_text(json.dumps({**json.loads(path.read_text()), "notes": "y" * 60_000}))
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV,
                         preexec_fn=_limited(100_000))
    one_line_error(run, "results.jsonl", "free disk space")
    assert (workdir / "results.jsonl").read_bytes() == first and leftovers(workdir) == []
    # The study's collect (it rebuilds the sweep's results.jsonl first): one line, and the invocation is counted.
    study = [sys.executable, "-m", "experiments.study", f"--config={config}", f"--workdir={workdir}"]
    run = subprocess.run(study, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV,
                         preexec_fn=_limited(100_000))
    one_line_error(run, "results.jsonl", "free disk space")
    assert (workdir / "results.jsonl").read_bytes() == first and leftovers(workdir) == []
    assert len(json.loads((workdir / "study" / study_lib.SPEC).read_text())["runs"]) == 1


@pytest.mark.slow
def test_a_failed_merged_export_leaves_the_cell_unfinished_and_the_rerun_completes_it(tmp_path, data_dir,
                                                                                     monkeypatch):
    fast = {"train.log_every": 2, "train.eval_every": 4, "train.eval_batches": 1, "optimizer.warmup_steps": 2,
            "train.num_steps": 4, "train.checkpoint_every": 4, "checkpoint.async_save": False}
    config = tmp_path / "lora.py"
    config.write_text(f"""
def get_config(arg=""):
    fast = {fast!r}
    return dict(name="lora_export", metric="eval_loss", stages=[
        dict(name="pre", experiment="pretrain", config="configs/pretrain.py:tiny", overrides=fast),
        dict(name="lora", experiment="finetune", config="configs/finetune.py:lora,tiny", init_from="pre",
             overrides=fast)])
""")
    sweep = sweep_lib.load_sweep(str(config), {"data.data_dir": data_dir})
    workdir = tmp_path / "sweep"
    save = checkpoint_lib.Checkpoints.save

    def disk_full_in_the_export(self, step, *args, **kwargs):
        if self.directory.parent.name == "merged.tmp":
            (self.directory / str(step)).mkdir(parents=True)  # half written when the disk filled
            self._raise_write_error(step, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.Checkpoints, "save", disk_full_in_the_export)
    states = sweep_lib.Runner(sweep, workdir, in_process=True, log=lambda *_: None).run()
    lora = sweep_lib.run_dir(workdir, sweep.cells[1].name)
    error = states[sweep.cells[1].name]["error"]
    assert states[sweep.cells[0].name]["status"] == "finished"
    assert states[sweep.cells[1].name]["status"] == "failed", states
    assert "could not write the merged export" in error and "No space left on device" in error, error
    assert "no earlier checkpoint" not in error
    assert not (lora / results.FILENAME).exists() and not (lora / "merged.tmp").exists()
    assert sweep_lib.cell_state(workdir, sweep.cells[1])["status"] == "failed"
    monkeypatch.setattr(checkpoint_lib.Checkpoints, "save", save)  # space freed
    states = sweep_lib.Runner(sweep, workdir, in_process=True, log=lambda *_: None).run()
    assert {s["status"] for s in states.values()} == {"finished"}, states
    result = results.read_result(lora)
    assert result["artefacts"] == ["merged"] and (lora / "merged" / "checkpoints" / "4").is_dir()
    assert result["config_fingerprint"] == results.config_fingerprint(result["config"])
    assert not (lora / "merged.tmp").exists() and leftovers(workdir) == []


def test_compare_puts_each_tasks_loss_in_its_own_table():
    table = {"text": {"dataset": "d", "eval_split": "validation", "include": (), "exclude": ()},
             "rows": [{"run": "cls", "step": 4, "task": "classify", "loss": 2.06, "accuracy": 0.5},
                      {"run": "lm", "step": 8, "task": "lm", "loss": 3.34, "perplexity": 28.2}]}
    text = compare.markdown(table)
    classify, lm = text.split("Task lm")
    assert "Task classify (loss: class cross-entropy" in classify and "| cls | 4 | classify | 2.0600 |" in classify
    assert "3.3400" not in classify and "| lm | 8 | lm | 3.3400 |" in lm and "2.0600" not in lm


def test_compare_takes_a_workdir_path_with_a_comma(tmp_path, data_dir):
    from configs import evaluate as evaluate_config
    from test_compare import _save_run

    odd, plain = tmp_path / "lr=1e-3,bs=8", tmp_path / "plain"
    assert compare.split_workdirs([f"{plain},{tmp_path / 'other'}"]) == [str(plain), str(tmp_path / "other")]
    _save_run(odd, data_dir, 0, ("[a-c]*",))
    _save_run(plain, data_dir, 1, ("[a-c]*",))
    workdirs = compare.split_workdirs([str(odd), f"{plain}"])  # repeated flag: the existing path stays whole
    assert workdirs == [str(odd), str(plain)]
    config = evaluate_config.get_config()
    config.num_batches = 1
    table = compare.compare(workdirs, config, log=lambda *_: None)
    assert [row["run"] for row in table["rows"]] == workdirs
