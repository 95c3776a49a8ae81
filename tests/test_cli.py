"""The entry point as a user runs it: a real subprocess from the repository root."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def pretrain(*args, data_dir):
    cmd = [sys.executable, "-m", "experiments.pretrain", "--config=configs/pretrain.py:tiny",
           f"--config.data.data_dir={data_dir}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_nested_overrides_reach_the_run_and_its_files(tmp_path, data_dir):
    result = pretrain(f"--workdir={tmp_path}", "--config.train.num_steps=3", "--config.model.n_layer=1",
                      "--config.data.exclude=('test/*', 'email/*', 'collections/*')", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["num_steps"] == 3 and config["model"]["n_layer"] == 1
    assert config["model"]["vocab_size"] == 257 and config["data"]["seq_len"] == 64  # resolved
    assert config["data"]["exclude"] == ["test/*", "email/*", "collections/*"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3 and "eval_loss" in lines[-1]
    assert (tmp_path / "checkpoints" / "3").is_dir()


@pytest.mark.parametrize("override,message", [
    ("--config.train.num_stepz=5", 'Did you mean "num_steps"'),
    ("--config.train.num_steps=abc", "num_steps=abc"),
    ("--config.model.n_head=3", "not divisible by model.n_head"),
    ("--config.data.seq_len=4096", "exceeds the model's context"),
])
def test_bad_overrides_end_in_one_line_and_a_nonzero_exit(tmp_path, data_dir, override, message):
    result = pretrain(f"--workdir={tmp_path / 'run'}", override, data_dir=data_dir)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unwritable_workdir_is_refused(tmp_path, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = pretrain(f"--workdir={blocker / 'run'}", data_dir=data_dir)
    assert result.returncode == 2 and "cannot write to --workdir" in result.stderr
