"""Logs that work off a terminal (SLURM, nohup, pipes), the end-of-run summary, and W&B offline logging."""
import datetime
import io
import json
import re

import pytest

from conftest import needs
from gptlab import progress, train
from gptlab.metrics import read_metrics

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| step (\d+)/(\d+) \((\d+)%\) \| elapsed (\d+:\d\d:\d\d) \| "
                  r"ETA (\d+:\d\d:\d\d) \| ([\d.]+) step/s \| ([\d,]+) tokens/s \| train_loss [\d.]+")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_off_a_terminal_progress_is_timestamped_lines_every_interval():
    stream, clock = io.StringIO(), FakeClock()  # StringIO is no terminal, like a SLURM log file
    when = datetime.datetime(2026, 11, 29, 19, 40, 12)
    bar = progress.Progress(total=100, initial=20, every_s=30.0, stream=stream, clock=clock, now=lambda: when)
    assert bar.lines and bar.bar.disable
    for step in range(21, 101):
        clock.now += 10.0 if step == 21 else 1.0  # compiling the first step takes 10 s, then one step per second
        if step == 25:
            bar.observe({"train_loss": 2.5, "tokens_per_sec": 12345.6, "learning_rate": 1e-3})
        bar.update(step)
    bar.close()
    lines = stream.getvalue().splitlines()
    # Every 30 seconds (steps 41 and 71), and the last step; nothing else is written (no bar).
    assert [int(LINE.match(line).group(1)) for line in lines] == [41, 71, 100], lines
    # step/s and ETA leave out the first step's compilation; elapsed counts it.
    assert lines[0].startswith("2026-11-29 19:40:12 | step 41/100 (41%) | elapsed 0:00:30 | ETA 0:00:59 | "
                               "1 step/s | 12,346 tokens/s | train_loss 2.5000")
    assert "ETA 0:00:00" in lines[-1] and "elapsed 0:01:29" in lines[-1]


def test_a_disabled_progress_writes_nothing():
    stream, clock = io.StringIO(), FakeClock()
    bar = progress.Progress(total=10, enabled=False, every_s=0.0, stream=stream, clock=clock)
    for step in range(1, 11):
        clock.now += 1
        bar.update(step)
    bar.close()
    assert stream.getvalue() == ""


def test_a_run_off_a_terminal_logs_progress_lines_and_ends_with_a_summary(make_config, tmp_path, capsys):
    config = make_config(train__progress_every_s=0.0, train__num_steps=10, train__log_every=5,
                         train__eval_every=10, train__checkpoint_every=10)
    train.train_and_evaluate(config, tmp_path)
    out, err = capsys.readouterr()  # pytest's captured stderr is no terminal
    lines = [line for line in err.splitlines() if LINE.match(line)]
    assert "| step 1/10 " not in err  # the first step only starts the clock for step/s and ETA (compilation)
    assert "| step 2/10 (20%) |" in err
    assert [int(LINE.match(line).group(1)) for line in lines] == list(range(5, 11)), err  # from the first logged step (tokens/s)
    assert "eval_loss" in lines[-1]
    result = json.loads((tmp_path / "result.json").read_text())
    summary = out[out.index("run finished: step 10"):]
    assert f"final: train_loss {result['train_loss']:.4f}, eval_loss {result['eval_loss']:.4f}" in summary
    assert f"best:  train_loss {result['best']['train_loss']['value']:.4f}" in summary
    assert f"checkpoints: {tmp_path}/checkpoints/" in summary
    for command in (f"python -m experiments.sample --workdir={tmp_path}",
                    f"python -m experiments.evaluate --workdir={tmp_path}",
                    f"--config.finetune.init_from={tmp_path}", f"tensorboard --logdir={tmp_path}/tensorboard"):
        assert command in summary


def test_wandb_offline_logs_the_metrics_config_and_result(make_config, tmp_path, monkeypatch):
    wandb = needs("wandb", "wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written under WORKDIR/wandb/
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # not the user's ~/.config/wandb
    workdir = tmp_path / "run"
    config = make_config(train__num_steps=10, train__log_every=5, train__eval_every=10, train__checkpoint_every=10)
    config.wandb.project, config.wandb.name = "gptlab-test", "tiny"
    train.train_and_evaluate(config, workdir)
    assert wandb.run is None  # finished
    run_id = (workdir / "wandb_id.txt").read_text().strip()
    [run_dir] = (workdir / "wandb").glob(f"offline-run-*-{run_id}")
    files = run_dir / "files"
    result = json.loads((workdir / "result.json").read_text())
    assert json.loads((files / "result.json").read_text()) == result
    # Offline, W&B keeps the run's records (config, history, summary) in one binary log for `wandb sync`.
    [log] = run_dir.glob(f"run-{run_id}.wandb")
    records = log.read_bytes()
    # The config, as W&B wrote it (its own float formatting, e.g. 0.00001 for 1e-05): parse, then compare.
    model_json = records[records.index(b'{"n_layer"'):].decode("utf-8", errors="replace")
    assert json.JSONDecoder().raw_decode(model_json)[0] == result["config"]["model"]
    assert json.dumps(result["eval_loss"]).encode() in records  # the history and the summary
    assert b'"gptlab-test"' in records and b"result.json" in records


def test_a_resumed_run_continues_the_same_wandb_run(make_config, tmp_path, monkeypatch):
    wandb = needs("wandb", "wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    workdir = tmp_path / "run"
    config = lambda steps: make_config(train__num_steps=steps, train__log_every=2, train__eval_every=2,
                                       train__checkpoint_every=2)
    first = config(2)
    first.wandb.project = "gptlab-test"
    train.train_and_evaluate(first, workdir)
    run_id = (workdir / "wandb_id.txt").read_text().strip()
    second = config(4)
    second.wandb.project = "gptlab-test"
    result = train.train_and_evaluate(second, workdir)  # resumes step 2
    assert wandb.run is None and (workdir / "wandb_id.txt").read_text().strip() == run_id
    # Offline, each process writes its own folder; both carry the one run id, so `wandb sync` joins them.
    runs = sorted((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    later = max(runs, key=lambda r: r.name)
    [log] = later.glob(f"run-{run_id}.wandb")
    assert json.dumps(result["eval_loss"]).encode() in log.read_bytes()  # the resumed steps went to it
    assert [m["step"] for m in read_metrics(workdir)] == [2, 4]


def test_wandb_project_without_the_package_is_one_clear_error(make_config, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "wandb" else real_import(name, *a, **k))
    config = make_config(train__num_steps=2)
    config.wandb.project = "p"
    with pytest.raises(train.UserError, match=r'pip install -e "\.\[wandb\]"'):
        train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "result.json").exists()


def test_tensorboard_logging_does_not_import_pytorch(tmp_path):
    """tensorboardX imports torch when it can (seconds per run); the metrics writer keeps it out."""
    import subprocess
    import sys

    needs("torch", "bench")
    code = ("import sys; from gptlab.metrics import MetricsWriter; w = MetricsWriter(sys.argv[1]); "
            "w.write(1, {'train_loss': 1.5}); w.close(); print('torch' in sys.modules); "
            "import torch; print(torch.zeros(1).shape)")  # torch stays importable afterwards
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "torch.Size([1])"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
