"""Several processes, one run: a preemption signal that reaches only one of them stops them all together.

Two real processes on this machine (a localhost coordinator, one CPU device each), started the way
README "Several hosts" describes.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, restore_state_numpy, tiny_config
from gptlab.data import pipeline
from gptlab.errors import Preempted
from gptlab.metrics import read_metrics

STEPS = 16
RUN_ARGS = [f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=4", "--config.train.log_every=1",
            f"--config.train.eval_every={STEPS}", "--config.model.dropout=0.1"]


def start_two(workdir, data_dir):
    """Both processes of one run; process 0 hosts the coordinator and writes the metrics."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    common = [sys.executable, "-m", "experiments.pretrain", "--config=configs/pretrain.py:tiny",
              f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *RUN_ARGS,
              f"--config.parallel.coordinator_address=127.0.0.1:{port}", "--config.parallel.num_processes=2",
              "--config.parallel.initialization_timeout=120"]
    return [subprocess.Popen([*common, f"--config.parallel.process_id={i}"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def finish_two(procs, timeout=300):
    """(exit status, output) of each process; one still running after `timeout` seconds is killed."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # hung (the failure this file guards against): never outlive the test
                p.kill()
                p.wait()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted two-process run every preempted one must reproduce bit for bit."""
    pipeline.prepare(tiny_config(data_dir).data)  # once, here: two processes preparing it at once would race
    workdir = tmp_path_factory.mktemp("reference")
    for code, out in finish_two(start_two(workdir, data_dir)):
        assert code == 0, out[-3000:]
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [1, 0])  # the process that neither coordinates nor logs, then the one that does
def test_a_signal_to_one_process_stops_both_at_the_same_step_and_the_rerun_is_bit_exact(
        reference, tmp_path, data_dir, signalled):
    procs = start_two(tmp_path, data_dir)
    deadline = time.monotonic() + 240
    while len(read_metrics(tmp_path)) < 4 and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)  # a few steps in, well before the end
    procs[signalled].send_signal(signal.SIGTERM)
    logged_at_signal = len(read_metrics(tmp_path))
    outcomes = finish_two(procs, timeout=120)  # without a coordinated stop: a timeout here, one process waits forever
    assert [code for code, _ in outcomes] == [Preempted.EXIT_CODE] * 2, [out[-3000:] for _, out in outcomes]
    stopped_at = [int(out.split("preempted at step ")[1].split(":")[0]) for _, out in outcomes]
    print(f"SIGTERM to process {signalled} only, when {logged_at_signal} steps were logged: exit statuses "
          f"{[code for code, _ in outcomes]}, stopped at steps {stopped_at}")
    assert stopped_at[0] == stopped_at[1] < STEPS, outcomes
    assert (tmp_path / "checkpoints" / str(stopped_at[0])).is_dir()  # the same step, saved by both together
    assert [m["step"] for m in read_metrics(tmp_path)][-1] == stopped_at[0]

    reruns = finish_two(start_two(tmp_path, data_dir))
    assert [code for code, _ in reruns] == [0, 0], [out[-3000:] for _, out in reruns]
    assert f"(step {stopped_at[0]})" in reruns[0][1]  # process 0 logs where it resumed
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, STEPS + 1))
    assert [m["train_loss"] for m in read_metrics(tmp_path)] == [m["train_loss"] for m in read_metrics(reference)]
    for x, y in zip(jax.tree.leaves(restore_state_numpy(reference, STEPS)),
                    jax.tree.leaves(restore_state_numpy(tmp_path, STEPS))):
        np.testing.assert_array_equal(x, y)
