"""Sweeps end to end: a tiny sweep runs, is interrupted and resumed, reports from its stored results.

One sweep, written to a temporary config file, runs through the real entry points
(one process per cell): pretrain the `tiny` preset 4 steps, fine-tune it 40 steps
(full) at two data fractions with two seeds, plus one cell that crashes (LoRA rank 0).
The sweep is SIGTERMed while a fine-tuning cell is mid-run, resumed, reported on, and
one finished cell is rerun to check that a seed reproduces its result exactly.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, needs
from gptlab import report as report_lib
from gptlab import results
from gptlab import sweep as sweep_lib
from gptlab.errors import UserError

FAST = {"train.log_every": 2, "train.eval_every": 8, "train.eval_batches": 1, "optimizer.warmup_steps": 2}
SWEEP = """
def get_config(arg=""):
    fast = {fast!r}
    return dict(
        name={name!r}, metric="eval_loss", description="test sweep",
        stages=[
            dict(name="pre", experiment="pretrain", config="configs/pretrain.py:tiny",
                 overrides={{**fast, "train.num_steps": 4, "train.checkpoint_every": 4}}),
            dict(name="ft", experiment="finetune", config="configs/finetune.py:full,tiny", init_from="pre",
                 overrides={{**fast, "train.num_steps": 40, "train.checkpoint_every": 4}},
                 grid={grid!r}, seeds=[0, 1]),
            dict(name="broken", experiment="finetune", config="configs/finetune.py:lora,tiny", init_from="pre",
                 overrides={{**fast, "train.num_steps": 2, "finetune.lora_rank": 0}}),
        ],
        report=dict(rows="label", columns="data.train_fraction"),
    )
"""
GRID = {"data.train_fraction": [0.5, 1.0]}
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def write_sweep(path, name="tiny_sweep", grid=None):
    path.write_text(SWEEP.format(fast=FAST, name=name, grid=grid or GRID))
    return str(path)


def sweep_command(config, workdir, data_dir, *args):
    return [sys.executable, "-m", "experiments.sweep", f"--config={config}", f"--workdir={workdir}",
            f"--set=data.data_dir={data_dir}", *args]


def run_cli(command):
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)


def one_line_error(completed, starts_with: str):
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {starts_with}"), last
    return last


def result_mtimes(workdir) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in (workdir / "runs").glob(f"*/{results.FILENAME}")}


def status(workdir) -> dict:
    return json.loads((workdir / "status.json").read_text())["cells"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, data_dir):
    """The tiny sweep: SIGTERMed mid-cell, then resumed to the end; what each phase left behind."""
    tmp = tmp_path_factory.mktemp("sweep")
    config, workdir = write_sweep(tmp / "tiny_sweep.py"), tmp / "sweep"
    command = sweep_command(config, workdir, data_dir)
    log = open(tmp / "first.log", "w+", encoding="utf-8")
    # Interrupted once one fine-tuning cell has finished and another has saved a checkpoint mid-run: the second
    # fine-tuning cell waits after logging step 8 (its step-4 checkpoint saved) until SIGTERM has been sent.
    go = tmp / "go"
    pause = {"step": 8, "workdir": "*/runs/ft-*", "nth": 2, "marker": str(go)}
    env = {**ENV, "GPTLAB_TEST_PAUSE": json.dumps(pause),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "pause_hook"), str(REPO)])}
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600  # a hang guard, not a measurement
    while not go.with_name("go.paused").exists():
        assert process.poll() is None and time.monotonic() < deadline, log.seek(0) or log.read()[-3000:]
        time.sleep(0.05)
    runs = workdir / "runs"
    finished = {p.parent.name for p in runs.glob(f"ft-*/{results.FILENAME}")}
    midway = [p.parents[1].name for p in runs.glob("ft-*/checkpoints/[0-9]*") if p.parents[1].name not in finished]
    assert len(finished) == 1 and midway, (finished, midway)
    process.send_signal(signal.SIGTERM)
    go.touch()
    first_code = process.wait(timeout=120)
    log.seek(0)
    first_log = log.read()
    interrupted = {name: s for name, s in status(workdir).items() if s["status"] != "finished"}
    before = result_mtimes(workdir)
    partial = report_lib.write_report(workdir)  # a report over an unfinished sweep
    partial_md = partial["markdown"].read_text()
    resumed = run_cli(command)
    return dict(config=config, workdir=workdir, command=command, first_code=first_code, first_log=first_log,
                interrupted=interrupted, before=before, partial_md=partial_md, resumed=resumed)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_finished_cells(swept):
    workdir = swept["workdir"]
    assert swept["first_code"] == 75, swept["first_log"]  # Preempted: rerun to resume
    assert "SIGTERM: stopping" in swept["first_log"]
    assert swept["before"] and "pre-seed0" in swept["before"]
    # A cell interrupted mid-run kept its checkpoint and is recorded as interrupted.
    assert any(s["status"] == "interrupted" for s in swept["interrupted"].values()), swept["interrupted"]
    # The partial report marks what has not finished and reports what has.
    assert "## Cells not finished" in swept["partial_md"]
    assert any(name in swept["partial_md"] for name in swept["interrupted"])

    # The resumed sweep: finished cells untouched, interrupted ones resumed from their checkpoint,
    # the crashing cell recorded with its error; the sweep ends with a one-line error.
    resumed = swept["resumed"]
    one_line_error(resumed, "1 of 6 cells did not finish (first: broken-seed0 failed: finetune.lora_rank=0")
    after = result_mtimes(workdir)
    assert {name: after[name] for name in swept["before"]} == swept["before"]
    assert len(after) == 5
    assert re.search(r"\[\d/6\] resuming ft-", resumed.stdout), resumed.stdout
    states = status(workdir)
    for name, before in swept["interrupted"].items():
        if before["status"] == "interrupted":
            result = results.read_result(workdir / "runs" / name)
            assert result["timing"]["resumed_from_step"] > 0 and result["steps"] == 40
            assert states[name]["attempts"] == 2
    assert all(states[name]["attempts"] == 1 for name in swept["before"])
    assert states["broken-seed0"]["status"] == "failed"
    assert "LoRA needs a rank of at least 1" in states["broken-seed0"]["error"]
    lines = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert sorted(line["cell"] for line in lines) == sorted(after)
    for line in lines:
        assert line["result"] == results.read_result(workdir / line["workdir"])


@pytest.mark.slow
def test_result_json_holds_what_a_run_needs_to_be_reproduced(swept):
    result = results.read_result(swept["workdir"] / "runs" / "ft-train_fraction=0.5-seed1")
    assert result["steps"] == result["step"] == 40 and result["seed"] == 1
    assert result["tokens_seen"] == 40 * 8 * 64  # steps x batch x seq_len of the tiny preset
    assert result["params"]["trainable"] == result["params"]["total"] > 0
    assert result["best"]["eval_loss"]["value"] <= result["eval_loss"]
    assert result["config"]["data"]["train_fraction"] == 0.5
    assert result["config"]["finetune"]["init_from"].endswith("pre-seed0")
    assert {"jax", "flax", "optax", "orbax-checkpoint"} <= set(result["versions"])
    assert "commit" in result["git"] and result["timing"]["wall_time_s"] > 0


def md_table(text: str, heading: str) -> dict:
    """{row: [cell texts]} of the Markdown table under `heading`."""
    block = text.split(heading, 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
    return {row[0]: row[1:] for row in rows[2:]}


@pytest.mark.slow
def test_report_numbers_equal_the_result_files(swept):
    workdir = swept["workdir"]
    completed = run_cli([sys.executable, "-m", "experiments.report", f"--workdir={workdir}"])
    one_line_error(completed, "1 of 6 cells have not finished (1 failed): the report covers the 5 finished")
    markdown = (workdir / "report.md").read_text()
    latex = (workdir / "report.tex").read_text()
    pngs = sorted(p.name for p in (workdir / "figures").glob("*.png"))
    assert pngs == ["curves_ft.png", "curves_pre.png", "eval_loss_vs_train_fraction.png"]  # broken logged nothing
    assert all((workdir / "figures" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    table = md_table(markdown, "## Main table")
    csv_rows = (workdir / "figures" / "eval_loss_vs_train_fraction.csv").read_text().splitlines()[1:]
    for column, fraction in enumerate(GRID["data.train_fraction"]):
        values = [results.read_result(workdir / "runs" / f"ft-train_fraction={fraction}-seed{s}")["eval_loss"]
                  for s in (0, 1)]
        mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
        assert table["ft"][column].strip("*") == f"{mean:.4f} ± {std:.4f}"
        assert f"${mean:.4f} \\pm {std:.4f}$" in latex or f"$\\mathbf{{{mean:.4f} \\pm {std:.4f}}}$" in latex
        row = next(r.split(",") for r in csv_rows if r.split(",")[1] == str(fraction))
        assert float(row[2]) == pytest.approx(mean, abs=1e-12) and float(row[3]) == pytest.approx(std, abs=1e-12)
    # The crashed cell is reported with its error, not as a number.
    unfinished = md_table(markdown, "## Cells not finished")
    assert unfinished["broken-seed0"][0] == "failed" and "LoRA needs a rank" in unfinished["broken-seed0"][2]
    assert "\\begin{tabular}" in latex and "\\toprule" in latex and "\\bottomrule" in latex


@pytest.mark.slow
def test_same_cell_and_seed_reproduce_result_json(swept):
    """Two runs of one cell with one seed give identical metrics (everything but timing and provenance)."""
    workdir = swept["workdir"]
    name = next(n for n in swept["before"] if n.startswith("ft-"))  # finished before the interruption
    first = results.read_result(workdir / "runs" / name)
    assert first["timing"]["resumed_from_step"] == 0
    subprocess.run(["rm", "-rf", str(workdir / "runs" / name)], check=True)
    others = {n: t for n, t in result_mtimes(workdir).items() if n != name}
    completed = run_cli(swept["command"] + [f"--only=^{re.escape(name)}$"])
    assert completed.returncode == 0, completed.stderr
    second = results.read_result(workdir / "runs" / name)
    assert results.comparable(second) == results.comparable(first)
    assert second["finished_at"] >= first["finished_at"]
    assert {n: t for n, t in result_mtimes(workdir).items() if n != name} == others  # nothing else reran


# -- bad input -------------------------------------------------------------------------------------


def test_grid_key_that_is_not_a_config_field(tmp_path):
    config = write_sweep(tmp_path / "bad.py", grid={"data.train_fractoin": [0.5]})
    with pytest.raises(UserError, match=r"'data.train_fractoin' is not a config field .*train_fraction"):
        sweep_lib.load_sweep(config)
    completed = run_cli(sweep_command(config, tmp_path / "w", tmp_path / "d"))
    one_line_error(completed, "sweep cell ft-train_fractoin=0.5-seed0 (configs/finetune.py:full,tiny): "
                              "'data.train_fractoin' is not a config field")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_workdir_of_another_sweep_or_no_sweep_is_refused(swept, tmp_path):
    workdir = swept["workdir"]
    other = sweep_lib.load_sweep(write_sweep(tmp_path / "other.py", name="other_sweep"))
    before = (workdir / "sweep.json").read_text()
    with pytest.raises(UserError, match=r"holds results of a different sweep \('tiny_sweep'.*choose a new --workdir"):
        sweep_lib.Runner(other, workdir).run()
    assert (workdir / "sweep.json").read_text() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no sweep.json"):
        sweep_lib.Runner(other, tmp_path / "notes").run()
    # Changing a cell's settings under the same name is refused too, never mixed into one table.
    changed = sweep_lib.load_sweep(swept["config"], {"train.eval_batches": "2"})
    with pytest.raises(UserError, match="holds cell pre-seed0 run with different settings"):
        sweep_lib.check_workdir(workdir, changed)
    with pytest.raises(UserError, match="holds no sweep.json"):
        report_lib.write_report(tmp_path / "notes")


def test_bad_sweep_specs_are_one_line_errors(tmp_path):
    def expand(**changes):
        spec = {"name": "s", "stages": [{"name": "a", "experiment": "pretrain", "config": "configs/pretrain.py:tiny"}]}
        stage = spec["stages"][0]
        stage.update(changes)
        return sweep_lib.expand(spec, "test", {}).cells

    assert [c.name for c in expand(grid={"train.num_steps": [1, 2]})] == ["a-num_steps=1-seed0", "a-num_steps=2-seed0"]
    with pytest.raises(UserError, match="experiment='train'; choose one of"):
        expand(experiment="train")
    with pytest.raises(UserError, match="unknown key 'gird'"):
        expand(gird={})
    with pytest.raises(UserError, match="has the wrong type"):
        expand(grid={"train.num_steps": ["many"]})
    with pytest.raises(UserError, match="init_from='nope' names no earlier stage"):
        expand(experiment="finetune", init_from="nope")
    with pytest.raises(UserError, match="set seeds with the stage's `seeds` list"):
        expand(overrides={"seed": 3})
    with pytest.raises(UserError, match="does not exist"):
        sweep_lib.load_sweep(str(tmp_path / "missing.py"))


@pytest.mark.slow
def test_sweep_through_submitits_local_executor_is_interrupted_and_resumed(tmp_path, data_dir):
    """The cluster code path (one submitit job per cell), run by submitit's local executor."""
    needs("submitit", "cluster")
    config = write_sweep(tmp_path / "jobs_sweep.py", name="jobs_sweep", grid={"data.train_fraction": [1.0]})
    workdir = tmp_path / "sweep"
    command = sweep_command(config, workdir, data_dir, "--executor=submitit_local", "--submitit=timeout_min=30")
    log = open(tmp_path / "first.log", "w+", encoding="utf-8")
    # SIGTERM once a fine-tuning job saved a checkpoint: the first one waits after step 8 until it is sent.
    go = tmp_path / "go"
    env = {**ENV, "GPTLAB_TEST_PAUSE": json.dumps({"step": 8, "workdir": "*/runs/ft-*", "marker": str(go)}),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "pause_hook"), str(REPO)])}
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline, runs = time.monotonic() + 600, workdir / "runs"  # a hang guard, not a measurement
    while not go.with_name("go.paused").exists():
        assert process.poll() is None and time.monotonic() < deadline, log.seek(0) or log.read()[-3000:]
        time.sleep(0.05)
    assert [p.parents[1].name for p in runs.glob("ft-*/checkpoints/[0-9]*")
            if not (p.parents[2] / results.FILENAME).exists()]
    process.send_signal(signal.SIGTERM)
    go.touch()
    assert process.wait(timeout=120) == 75
    log.seek(0)
    first_log = log.read()
    assert "submitted pre-seed0 as job" in first_log and "SIGTERM: stopping" in first_log, first_log
    states = status(workdir)
    [interrupted] = [name for name, s in states.items() if s["status"] == "interrupted"]
    assert states[interrupted]["job_id"] and (runs / interrupted / "checkpoints").is_dir()
    assert list((workdir / "submitit").glob("*_log.out"))  # submitit's own job logs

    resumed = run_cli(command)
    one_line_error(resumed, "1 of 4 cells did not finish (first: broken-seed0 failed: finetune.lora_rank=0")
    assert f"resuming {interrupted}" in resumed.stdout
    states = status(workdir)
    assert [s["status"] for s in states.values()] == ["finished", "finished", "finished", "failed"]
    result = results.read_result(runs / interrupted)
    assert result["timing"]["resumed_from_step"] > 0 and result["steps"] == 40 and states[interrupted]["attempts"] == 2
    # The report reads the same stored files as for a local sweep.
    written = report_lib.write_report(workdir)
    ft_losses = [results.read_result(p)["eval_loss"] for p in sorted(runs.glob("ft-*"))]
    assert len(ft_losses) == 2 and f"{np.mean(ft_losses):.4f} ± {np.std(ft_losses, ddof=1):.4f}" in \
        written["markdown"].read_text()  # the interrupted cell's seed is in the mean over seeds


def test_bad_executor_settings_are_one_line_errors(tmp_path):
    needs("submitit", "cluster")
    with pytest.raises(UserError, match="--submitit: Unknown executor 'bogus'"):
        sweep_lib.make_executor("submitit_local", tmp_path / "a", {"bogus_key": 1})
    with pytest.raises(UserError, match='--submitit: Parameter "timeout_min" expected type'):
        sweep_lib.make_executor("submitit_local", tmp_path / "b", {"timeout_min": "many"})
    with pytest.raises(UserError, match="--submitit=... needs --executor=slurm"):
        sweep_lib.make_executor("local", tmp_path / "c", {"timeout_min": 5})
    with pytest.raises(UserError, match="--executor='lsf': choose one of local, submitit_local, slurm"):
        sweep_lib.Runner(sweep_lib.load_sweep("configs/ablations/smoke.py"), tmp_path / "d", executor="lsf")
    if shutil.which("srun") is None:
        with pytest.raises(UserError, match="--executor=slurm: .*srun.*use --executor=local"):
            sweep_lib.make_executor("slurm", tmp_path / "e", {})
