"""A run's bookkeeping never lies: refused starts write nothing, resumes count what was really seen,
finished runs are not rewritten, leftovers of dead readers are cleaned, and the MFU peak's source is said."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gptlab import checkpoint as checkpoint_lib
from gptlab import peak as peak_lib
from gptlab import perf
from gptlab import train
from gptlab import loop as loop_lib
from gptlab.errors import Preempted, UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def hashes(directory) -> dict:
    """Every file under `directory` (path -> sha256 of its bytes), and every folder."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(pathlib.Path(directory).rglob("*"))}


def short(make_config, **overrides):
    fields = dict(train__num_steps=4, train__checkpoint_every=2, train__log_every=2, train__eval_every=4,
                  train__eval_batches=1, optimizer__decay_steps=8)
    return make_config(**{**fields, **overrides})


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, data_dir):
    """A finished 4-step tiny run (checkpoints at 2 and 4), to copy and resume."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("four") / "run"
    train.train_and_evaluate(short(lambda **o: tiny_config(data_dir, **o)), workdir)
    return workdir


def copy_of(run, tmp_path) -> pathlib.Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("change", [dict(model__n_layer=3), dict(model__n_head=4), dict(model__dropout=0.1),
                                    dict(data__seq_len=32), dict(data__tokenizer="char"), dict(seed=1)])
def test_a_refused_resume_leaves_every_file_byte_identical(four_steps, make_config, tmp_path, change):
    run = copy_of(four_steps, tmp_path)
    before = hashes(run)
    config = short(make_config, train__num_steps=6)  # more steps: a resume, not the finished-run refusal
    for dotted, value in change.items():
        if "__" in dotted:
            group, field = dotted.split("__")
            setattr(config[group], field, value)
        else:
            config[dotted] = value
    with pytest.raises(UserError) as refused:
        train.train_and_evaluate(config, run)
    assert "\n" not in str(refused.value)
    assert hashes(run) == before  # config.json, the lock's record, checkpoints, metrics: all as they were


@pytest.mark.slow
def test_a_changed_batch_size_on_resume_counts_the_tokens_really_seen(four_steps, make_config, tmp_path, capsys):
    run = copy_of(four_steps, tmp_path)
    first = json.loads((run / "result.json").read_text())
    assert first["tokens_seen"] == 4 * 8 * 64
    result = train.train_and_evaluate(short(make_config, train__num_steps=6, data__batch_size=16), run)
    assert result["step"] == 6
    stored = json.loads((run / "result.json").read_text())
    assert stored["tokens_seen"] == 4 * 8 * 64 + 2 * 16 * 64  # not 6 x 16 x 64
    lines = [line for line in capsys.readouterr().out.splitlines() if "changed settings" in line]
    assert len(lines) == 1 and "data.batch_size 8 -> 16" in lines[0] and "train.num_steps 4 -> 6" in lines[0]
    # A third segment: the count survives the restart (it is in the checkpoint, not recomputed from the config).
    train.train_and_evaluate(short(make_config, train__num_steps=8, data__batch_size=8), run)
    assert json.loads((run / "result.json").read_text())["tokens_seen"] == 4 * 8 * 64 + 2 * 16 * 64 + 2 * 8 * 64


def test_a_finished_run_rerun_with_another_batch_size_is_refused(four_steps, make_config, tmp_path):
    run = copy_of(four_steps, tmp_path)
    before = hashes(run)
    with pytest.raises(UserError, match=r"finished run of 4 steps with other settings \(data.batch_size 8 -> 16\).*"
                                        r"raise --config.train.num_steps above 4.*new --workdir"):
        train.train_and_evaluate(short(make_config, data__batch_size=16), run)
    assert hashes(run) == before
    again = train.train_and_evaluate(short(make_config), run)  # identical settings: still a no-op
    assert again["step"] == 4 and hashes(run) == before


@pytest.mark.slow
def test_train_loss_logged_after_a_resume_averages_the_same_steps(make_config, tmp_path, monkeypatch):
    """Stopped by a signal at step 3 (between log steps 2 and 4), the resumed run's step-4 train_loss still
    averages steps 3 and 4, as the uninterrupted run's does."""
    config = short(make_config, train__log_every=2, train__checkpoint_every=4)
    train.train_and_evaluate(config, tmp_path / "straight")
    monkeypatch.setattr(loop_lib.PreemptionGuard, "stop_after", lambda self, steps_this_run: steps_this_run == 3)
    with pytest.raises(Preempted):  # what SIGINT does: a checkpoint at step 3, which carries step 3's loss
        train.train_and_evaluate(config, tmp_path / "stopped")
    monkeypatch.undo()
    assert checkpoint_lib.complete_steps(tmp_path / "stopped" / "checkpoints") == [3]
    train.train_and_evaluate(config, tmp_path / "stopped")
    logged = lambda run: {r["step"]: r.get("train_loss") for r in map(json.loads, (run / "metrics.jsonl").open())}
    straight, resumed = logged(tmp_path / "straight"), logged(tmp_path / "stopped")
    assert resumed[4] == straight[4]


@pytest.mark.slow
def test_the_nonfinite_message_names_the_step_0_checkpoint(make_config, tmp_path):
    config = short(make_config, optimizer__learning_rate=1e9, optimizer__warmup_steps=0, optimizer__grad_clip_norm=0.0,
                   train__eval_at_start=True, train__num_steps=6)
    with pytest.raises(UserError, match=r"the last good checkpoint \(step 0\) is kept"):
        train.train_and_evaluate(config, tmp_path)
    assert (tmp_path / "checkpoints" / "0").is_dir()


def test_a_dead_readers_pin_is_removed_by_the_next_reader(four_steps, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    dead_pin = tmp_path / f"{checkpoint_lib.PIN_PREFIX}{int(dead.stdout)}@{socket.gethostname()}.abc123"
    (dead_pin / "4").mkdir(parents=True)
    live_pin = tmp_path / f"{checkpoint_lib.PIN_PREFIX}{os.getpid()}@{socket.gethostname()}.def456"
    live_pin.mkdir()
    other_host = tmp_path / f"{checkpoint_lib.PIN_PREFIX}{int(dead.stdout)}@another-host.ghi789"
    other_host.mkdir()
    with checkpoint_lib.Reader(four_steps / "checkpoints") as reader:
        assert reader.path.parent.name.startswith(f"{checkpoint_lib.PIN_PREFIX}{os.getpid()}@")
    assert not dead_pin.exists() and live_pin.exists() and other_host.exists()


def run_entry(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


@pytest.mark.parametrize("config_text", ["{not json", "[1, 2]", json.dumps({"model_type": "gpt2", "n_layer": "two"})])
def test_convert_refuses_a_malformed_hf_config_in_one_line(tmp_path, config_text):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(config_text)
    run = run_entry("experiments.convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "config.json" in run.stderr, run.stderr


def test_sample_refuses_an_absurd_max_new_tokens_in_one_line(four_steps):
    run = run_entry("experiments.sample", f"--workdir={four_steps}", "--prompt=def ", "--max_new_tokens=1000000000000")
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "max_new_tokens" in run.stderr, run.stderr


# -- the MFU peak: where it comes from -----------------------------------------------------------------


@pytest.fixture
def fresh_peak(tmp_path, monkeypatch):
    """An empty peak cache and a CPU that measures 0.2 TFLOP/s; returns the list of measurements taken."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []

    def measure():
        measured.append(1)
        return 0.2

    monkeypatch.setattr(peak_lib, "measured_matmul_tflops", measure)
    peak_lib.cpu_peak_tflops.cache_clear()
    yield measured
    peak_lib.cpu_peak_tflops.cache_clear()


def test_an_idle_machine_measures_the_peak_once_and_caches_it(fresh_peak, monkeypatch):
    monkeypatch.setattr(peak_lib, "cpu_share_of_others", lambda measure, seconds=None: (measure(), 0.0))
    peak, source = peak_lib.cpu_peak_tflops()
    assert peak == 0.2 and source.startswith("measured ") and len(fresh_peak) == 1
    peak_lib.cpu_peak_tflops.cache_clear()  # a new process
    again, cached = peak_lib.cpu_peak_tflops()
    assert again == 0.2 and cached.startswith("measured ") and "cached" in cached and len(fresh_peak) == 1


def test_a_busy_machine_takes_the_estimate_without_measuring(fresh_peak, monkeypatch):
    monkeypatch.setattr(peak_lib, "cpu_share_of_others", lambda measure, seconds=None: (measure(), 0.5))
    monkeypatch.setattr(perf, "cpu_info", lambda: {"model": "Some CPU", "vendor": "AuthenticAMD",
                                                   "flags": frozenset({"avx2", "fma"}), "mhz": 2000.0,
                                                   "max_mhz": 3000.0})
    monkeypatch.setattr(perf, "usable_cores", lambda: 2)
    peak, source = peak_lib.cpu_peak_tflops()
    assert fresh_peak == []  # no 8 s measurement on a busy machine
    assert peak == pytest.approx(2 * 3.0e9 * 32 / 1e12) and source.startswith("estimate")
    peak_lib.cpu_peak_tflops.cache_clear()
    assert peak_lib.cpu_peak_tflops()[0] == peak and fresh_peak == []  # every busy run: the same denominator


def test_a_measurement_disturbed_by_load_is_replaced_by_the_estimate(fresh_peak, monkeypatch):
    shares = iter([0.0, 0.6])  # idle before, busy during the measurement
    monkeypatch.setattr(peak_lib, "cpu_share_of_others", lambda measure, seconds=None: (measure(), next(shares)))
    peak, source = peak_lib.cpu_peak_tflops()
    assert len(fresh_peak) == 1 and source.startswith("estimate")
    assert not peak_lib.peak_cache_path().exists() or peak_lib.cached_cpu_peak() is None


def test_the_tests_stand_in_peak_is_what_runs_read():
    peak_lib.cpu_peak_tflops.cache_clear()
    assert peak_lib.cpu_peak_tflops()[0] == 1.0  # tests/conftest.py's, never a measurement


def test_the_peak_measures_onednn_only_where_training_uses_it(monkeypatch):
    monkeypatch.setattr(perf, "cpu_info", lambda: {"model": "AMD EPYC", "vendor": "AuthenticAMD",
                                                   "flags": frozenset({"avx2"})})
    assert "onednn" not in peak_lib.peak_matmul_libraries()
    monkeypatch.setattr(perf, "cpu_info", lambda: {"model": "Xeon", "vendor": "GenuineIntel", "flags": frozenset()})
    monkeypatch.setattr(perf.platform, "machine", lambda: "x86_64")
    assert "onednn" in peak_lib.peak_matmul_libraries()
    monkeypatch.setattr(peak_lib, "measured_matmul_tflops", None)  # any measurement here would fail the test
    assert np.isfinite(peak_lib.estimated_cpu_peak()[0])
