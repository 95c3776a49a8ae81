"""Readers never disturb a run; one writer per workdir (gptlab.checkpoint.Reader, gptlab.lock)."""
import errno
import fcntl
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, needs
from gptlab import checkpoint as checkpoint_lib
from gptlab import convert, finetune, train
from gptlab import lock as lock_lib
from gptlab.errors import UserError
from gptlab.metrics import read_metrics
from gptlab.model import GPTConfig, init_params
from configs import pretrain as pretrain_config

BASE_CONFIG = pretrain_config.get_config("small")  # what experiments.convert passes

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def paused_env(marker, step):
    """ENV for a run that logs `step`, then waits until the file `marker` exists (tests/pause_hook)."""
    hook = pathlib.Path(__file__).parent / "pause_hook"
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]),
            "GPTLAB_TEST_PAUSE": json.dumps({"step": step, "marker": str(marker)})}


def pretrain_cmd(workdir, data_dir, *args):
    return [sys.executable, "-m", "experiments.pretrain", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.train.log_every=1", "--config.train.eval_every=1000",
            *args]


def snapshot(directory) -> dict:
    """Every file under `directory` with its bytes and modification time: what "changes nothing" compares."""
    directory = pathlib.Path(directory)
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(tmp_path):
    """A workdir with one small checkpoint (step 0), written as every gptlab run writes them."""
    cfg = GPTConfig(vocab_size=61, block_size=8, n_layer=1, n_head=2, n_embd=16)
    params = init_params(cfg, jax.random.key(0))
    convert.save_workdir(tmp_path / "run", params, convert.run_config(cfg, "byte", BASE_CONFIG), {"kind": "byte"}, source="test")
    return tmp_path / "run", params


def test_a_pinned_step_survives_its_rotation_and_the_reader_writes_nothing(saved):
    workdir, params = saved
    leftover = workdir / "checkpoints" / "5.orbax-checkpoint-tmp-1234"  # a live writer's save in progress
    leftover.mkdir()
    (leftover / "partial").write_text("being written")
    before = snapshot(workdir)
    reader = checkpoint_lib.Reader(workdir / "checkpoints")
    assert reader.step == 0 and reader.path != reader.source
    shutil.rmtree(reader.source)  # what the writer's rotation does to the oldest step
    restored = reader.restore_params()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pinned = reader.path
    reader.close()
    assert not pinned.exists()  # the private pin goes with the reader
    assert snapshot(workdir) == {k: v for k, v in before.items() if not k.startswith("checkpoints/0/")}


def test_every_reader_checks_the_same_fingerprints(saved):
    workdir, _ = saved
    record = workdir / "checkpoints" / "0" / "integrity" / "metadata"
    integrity = json.loads(record.read_text())
    integrity["fingerprints"]["params/wte/embedding"] += 1
    record.write_text(json.dumps(integrity))
    with pytest.raises(UserError, match="step 0 .* is damaged: array params/wte/embedding differs"):
        convert.load_workdir(workdir)
    source = finetune.Pretrained(workdir)
    try:
        with pytest.raises(UserError, match="init_from checkpoint step 0 .* is damaged: array params/wte/embedding"):
            source.restore_params(jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                               dict(source.reader.stored["params"])))
    finally:
        source.close()


def test_a_step_rotated_away_while_it_is_pinned_is_replaced_by_the_newest(saved, monkeypatch):
    workdir, _ = saved
    ckpts = workdir / "checkpoints"
    shutil.copytree(ckpts / "0", ckpts / "3")  # a newer step, as a running writer adds them
    real_pin, calls = checkpoint_lib.Reader._pin, []

    def pin_racing_rotation(self, source):
        calls.append(source.name)
        if len(calls) == 1:  # rotation deletes the chosen step while it is being linked
            shutil.rmtree(source)
            return None
        return real_pin(self, source)

    monkeypatch.setattr(checkpoint_lib.Reader, "_pin", pin_racing_rotation)
    shutil.copytree(ckpts / "0", ckpts / "7")
    with checkpoint_lib.Reader(ckpts) as reader:
        assert calls == ["7", "3"] and reader.step == 3
        reader.restore_params()


@pytest.mark.slow
def test_evaluate_sample_and_init_from_read_a_training_run_without_disturbing_it(tmp_path, data_dir):
    steps, every, keep = 160, 2, 2  # a save every 2 steps and only 2 kept: steps rotate away constantly
    # The run waits after step 150 until the entry points have finished: they always read a run in progress.
    go = tmp_path.parent / f"{tmp_path.name}-go"
    proc = subprocess.Popen(pretrain_cmd(tmp_path, data_dir, f"--config.train.num_steps={steps}",
                                         f"--config.train.checkpoint_every={every}",
                                         f"--config.checkpoint.max_to_keep={keep}"),
                            cwd=REPO, env=paused_env(go, 150), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    readers = []
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_lib.complete_steps(tmp_path / "checkpoints"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        # The real entry points, while the run trains: evaluate and sample ...
        readers = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for cmd in ([sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path}",
                                f"--config.data.data_dir={data_dir}", "--config.num_batches=1"],
                               [sys.executable, "-m", "experiments.sample", f"--workdir={tmp_path}",
                                "--prompt=def ", "--max_new_tokens=4"])]
        # ... and, over and over, the library readers they and fine-tuning's init_from use.
        steps_read, readers_done_while_training = [], False
        while proc.poll() is None:
            if not readers_done_while_training and all(r.poll() is not None for r in readers):
                readers_done_while_training = True
                go.touch()  # the run goes on to its end
            loaded = convert.load_workdir(tmp_path)
            steps_read.append(loaded.step)
            source = finetune.Pretrained(tmp_path)
            try:
                time.sleep(0.2)  # init_from holds its step while the fine-tuning run compiles
                source.restore_params(jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                                   dict(source.reader.stored["params"])))
                steps_read.append(source.step)
            finally:
                source.close()
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        (evaluated, _), (sampled, _) = [r.communicate(timeout=300) for r in readers]
    finally:
        for p in [proc, *readers]:
            if p.poll() is None:
                p.kill()
    assert [r.returncode for r in readers] == [0, 0], [r.stderr.read() for r in readers]
    assert readers_done_while_training
    assert "evaluating " in evaluated and "(step " in evaluated and "loaded step " in sampled  # say which step
    assert len(steps_read) >= 4 and all(s % every == 0 for s in steps_read), steps_read
    assert checkpoint_lib.complete_steps(tmp_path / "checkpoints") == list(range(steps - (keep - 1) * every,
                                                                                    steps + 1, every))
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, steps + 1))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]


# -- one writer per workdir -------------------------------------------------------------------


def test_lock_records_its_holder_and_refuses_a_second_taker(tmp_path):
    held = lock_lib.FileLock(tmp_path / "x.lock")
    try:
        with pytest.raises(lock_lib.LockHeld, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            lock_lib.FileLock(tmp_path / "x.lock")
        assert lock_lib.is_locked(tmp_path / "x.lock")
    finally:
        held.release()
    assert not lock_lib.is_locked(tmp_path / "x.lock")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_without_flock_the_exclusive_file_is_taken_over_only_from_a_provably_dead_holder(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / "x.lock"
    held = lock_lib.FileLock(path)
    assert held.exclusive_file and lock_lib.read_holder(path)["pid"] == os.getpid()
    with pytest.raises(lock_lib.LockHeld, match=f"pid {os.getpid()}"):
        lock_lib.FileLock(path)  # a live holder on this host
    held.release()
    assert not path.exists()
    stale = {**lock_lib.this_process(), "pid": dead_pid(), "process_start": 1}
    path.write_text(json.dumps(stale))  # left by a process killed with -9
    taken = lock_lib.FileLock(path)
    assert lock_lib.read_holder(path)["pid"] == os.getpid()
    taken.release()
    path.write_text(json.dumps({**stale, "host": "another-host"}))  # cannot be judged from here
    with pytest.raises(lock_lib.LockHeld, match=f"host another-host .*if that process is gone, delete {path}"):
        lock_lib.FileLock(path)


@pytest.mark.slow
def test_a_second_writer_is_refused_in_one_line_and_changes_nothing(make_config, tmp_path):
    train.train_and_evaluate(make_config(train__num_steps=2, train__checkpoint_every=1), tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gptlab import lock; "
                               f"lock.FileLock({str(tmp_path / train.WRITER_LOCK)!r}); print('held', flush=True); "
                               "time.sleep(120)"], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        with pytest.raises(UserError, match=rf"is in use by another run: .* held by pid {holder.pid} on host "
                                            rf"{socket.gethostname()} .*kill {holder.pid}"):
            train.train_and_evaluate(make_config(train__num_steps=4, train__checkpoint_every=1), tmp_path)
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    final = train.train_and_evaluate(make_config(train__num_steps=4, train__checkpoint_every=1), tmp_path)
    assert final["step"] == 4  # the holder died (kill -9): its lock went with it


@pytest.mark.slow
@pytest.mark.parametrize("step", [1, 5, 12])
def test_the_same_command_started_twice_runs_once(tmp_path, data_dir, step):
    """The second start arrives while the first holds the workdir (paused after `step`): it is refused, the first
    trains to the end; started again after that, the same command finds the run finished."""
    cmd = pretrain_cmd(tmp_path, data_dir, "--config.train.num_steps=12", "--config.train.checkpoint_every=4")
    go = tmp_path.parent / f"{tmp_path.name}-go"
    first = subprocess.Popen(cmd, cwd=REPO, env=paused_env(go, step), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a hang guard, not a measurement
    while not go.with_name(go.name + ".paused").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    go.touch()
    outcomes = sorted([(first.wait(timeout=300), first.stderr.read()), (second.returncode, second.stderr)])
    (ok, _), (refused, message) = outcomes
    assert ok == 0 and refused == 2, outcomes
    last = message.strip().splitlines()[-1]
    assert last.startswith("error: --workdir=") and "is in use by another run: " in last and "Traceback" not in message
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 13))  # one run's records, once each
    assert checkpoint_lib.complete_steps(tmp_path / "checkpoints") == [4, 8, 12]
    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 13))


@pytest.mark.slow
def test_a_lock_left_by_kill_9_is_taken_over_and_the_run_resumes(tmp_path, data_dir):
    cmd = pretrain_cmd(tmp_path, data_dir, "--config.train.num_steps=30", "--config.train.checkpoint_every=2")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(checkpoint_lib.complete_steps(tmp_path / "checkpoints")) < 1:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert lock_lib.read_holder(tmp_path / train.WRITER_LOCK)["pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from" in rerun.stdout


def test_a_truncated_safetensors_file_is_refused_in_one_line(tmp_path):
    transformers = needs("transformers", "bench")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=8,
                                                              vocab_size=61))
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = subprocess.run([sys.executable, "-m", "experiments.convert", f"--from_hf={tmp_path / 'hf'}",
                             f"--workdir={tmp_path / 'out'}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {weights} cannot be read") and "truncated or damaged" in last
    assert not (tmp_path / "out" / "checkpoints").exists()
