"""Scale-out: the same train step under jit on a mesh, pmap, and two real processes.

Every run is the real entry point in a subprocess, because the number of CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) is fixed when JAX
starts. Equal means equal to float32 reduction-order tolerance: RTOL below.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, restore_state_numpy

pytestmark = pytest.mark.slow  # every test starts several multi-device processes (CI runs them)

RTOL = 1e-5  # observed: ~4e-7 relative on losses after 20 steps
ATOL_PARAMS = 1e-5
STEPS = 20


def launch(workdir, data_dir, devices, *overrides, process=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "experiments.pretrain", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
           f"--config.train.eval_every={STEPS}", "--config.train.checkpoint_every=10", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def losses(workdir):
    return [json.loads(line)["train_loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    np.testing.assert_allclose(losses(a), losses(b), rtol=RTOL)
    for x, y in zip(jax.tree.leaves(restore_state_numpy(a, STEPS)), jax.tree.leaves(restore_state_numpy(b, STEPS))):
        np.testing.assert_allclose(x, y, atol=ATOL_PARAMS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Reference runs, each made once: one device, and 8 devices under jit (8,1), jit (2,4) and pmap."""
    root = tmp_path_factory.mktemp("parallel")
    specs = {"one": (1, []), "jit_8x1": (8, ["--config.parallel.mesh=(8, 1)"]),
             "jit_2x4": (8, ["--config.parallel.mesh=(2, 4)"]), "pmap_8": (8, ["--config.parallel.mode=pmap"])}
    logs = {name: finish(launch(root / name, data_dir, devices, *args)) for name, (devices, args) in specs.items()}
    return root, logs


def test_one_device_jit_mesh_fsdp_and_pmap_train_identically(runs):
    root, logs = runs
    assert "mesh data=2 fsdp=4" in logs["jit_2x4"] and "pmap over 8 device(s)" in logs["pmap_8"]
    assert len(losses(root / "one")) == STEPS
    for name in ("jit_8x1", "jit_2x4", "pmap_8"):
        assert_same_run(root / "one", root / name)


def test_accumulation_4x2_equals_1x8(runs, data_dir):
    root, _ = runs  # jit_8x1: 8 devices x 1 micro-batch of the global batch of 8
    finish(launch(root / "accum_4x2", data_dir, 2, "--config.train.grad_accum_steps=4"))
    assert_same_run(root / "jit_8x1", root / "accum_4x2")


@pytest.mark.parametrize("saved,resumed_with", [("pmap_8", "--config.parallel.mode=jit"),
                                                ("jit_2x4", "--config.parallel.mode=pmap")])
def test_a_checkpoint_resumes_under_the_other_mode(runs, data_dir, saved, resumed_with):
    root, _ = runs
    workdir = root / f"{saved}_resumed"
    shutil.copytree(root / saved, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if stopped after the step-10 checkpoint:
    (workdir / "result.json").unlink()  # no final checkpoint and no result.json (a finished run is never rewritten)
    metrics = (workdir / "metrics.jsonl").read_text().splitlines()[:10]
    (workdir / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    log = finish(launch(workdir, data_dir, 8, resumed_with))
    assert "resumed from" in log and "(step 10)" in log
    assert_same_run(root / saved, workdir)


def test_two_processes_train_like_one_process_with_eight_devices(runs, data_dir):
    root, _ = runs
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [f"--config.parallel.coordinator_address=127.0.0.1:{port}", "--config.parallel.num_processes=2",
              "--config.parallel.initialization_timeout=120"]
    procs = [launch(root / "two_processes", data_dir, 4, *common, f"--config.parallel.process_id={i}")
             for i in range(2)]
    logs = [finish(p) for p in procs]
    assert "process 0 of 2, 4 local / 8 global devices" in logs[0]
    assert_same_run(root / "jit_8x1", root / "two_processes")


def test_bad_parallel_settings_fail_in_one_line(tmp_path, data_dir):
    cases = [
        (8, ["--config.parallel.mesh=(2, 2)"], "needs 4 devices but 8 are available"),
        (8, ["--config.data.batch_size=12"], "must be divisible by the 8 devices"),
        (1, ["--config.parallel.mode=pmapp"], "parallel.mode='pmapp' is not one of"),
        (1, ["--config.parallel.coordinator_address=127.0.0.1:1", "--config.parallel.num_processes=2",
             "--config.parallel.process_id=1", "--config.parallel.initialization_timeout=2"],
         "cannot reach the coordinator at 127.0.0.1:1"),
    ]
    for devices, args, message in cases:
        proc = launch(tmp_path / "bad", data_dir, devices, *args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("error: ") and message in err, err[-2000:]
        assert not (tmp_path / "bad" / "checkpoints" / "10").exists()
