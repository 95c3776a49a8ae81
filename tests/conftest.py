"""Shared fixtures: a TFDS data dir prepared once per session, tiny configs, no network.

Optional packages and offline data: the quick run (README) skips a test that needs one that is
missing, saying what to install or where to put the data; with GPTLAB_TEST_FULL=1 (.ci/run) such
a test fails instead, so CI runs everything.
"""
import atexit
import importlib
import os
import pathlib
import shutil
import socket
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ and experiments/ import like the entry points see them

from configs import pretrain as pretrain_config  # noqa: E402

FULL = os.environ.get("GPTLAB_TEST_FULL") == "1"  # .ci/run: every optional package and the offline data must be there
# Real text the tests read offline (see ../shared/data/README.md); GPTLAB_TEST_DATA points elsewhere.
TEST_DATA = pathlib.Path(os.environ.get("GPTLAB_TEST_DATA") or REPO.parent / "shared" / "data")


def needs(module: str, extra: str):
    """Imports an optional package for a test (or, at module level, a test file); skips without it."""
    if FULL:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f'needs {module}: pip install -e ".[{extra}]" (.ci/run installs it)')


def needs_file(path: pathlib.Path) -> None:
    """Skips a test whose offline data file is missing (fails under GPTLAB_TEST_FULL)."""
    if not path.is_file():
        message = (f"needs the offline data file {path}: put ../shared/data next to the repository or set "
                   "GPTLAB_TEST_DATA=/path/to/data (see docs/development.md, Tests)")
        pytest.fail(message) if FULL else pytest.skip(message)


# Tests run on one XLA CPU device (training would split the batch over one per core, gptlab/perf.py),
# so a test's in-process and subprocess runs compute the same numbers. Tests of several devices set their own.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()

# MFU's CPU peak: tests neither measure it (seconds a process, under the suite's own load) nor write the
# user's cache (a peak measured under that load would overstate MFU in their later runs). Every process
# of the run (the xdist workers and the subprocesses they start inherit the environment) reads one
# stand-in from a temporary cache; tests of the cache itself point XDG_CACHE_HOME elsewhere.
if "GPTLAB_TEST_CACHE" not in os.environ:
    from gptlab import peak as peak_lib  # noqa: E402  (after XLA_FLAGS; importing JAX does not start its backend)

    os.environ["GPTLAB_TEST_CACHE"] = os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gptlab-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GPTLAB_TEST_CACHE"], ignore_errors=True)
    peak_lib.cache_cpu_peak(1.0, "tests/conftest.py")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data dir for the whole session, so each corpus is prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))


def refuse_network(monkeypatch) -> None:
    """Any attempt to open a network connection (while `monkeypatch` is active) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    refuse_network(monkeypatch)


def tiny_config(data_dir, **overrides):
    """The `tiny` preset with a test data dir, synchronous checkpoints and `group.field=value` overrides."""
    config = pretrain_config.get_config("tiny")
    config.data.data_dir = data_dir
    config.checkpoint.async_save = False
    for dotted, value in overrides.items():
        group, field = dotted.split("__")
        setattr(config[group], field, value)
    return config


@pytest.fixture
def make_config(data_dir):
    return lambda **overrides: tiny_config(data_dir, **overrides)


def restore_state_numpy(workdir, step):
    """A checkpoint's train state as numpy arrays, whatever devices or shardings wrote it."""
    import orbax.checkpoint as ocp

    from gptlab import checkpoint as checkpoint_lib

    ckpts = checkpoint_lib.Checkpoints(pathlib.Path(workdir) / "checkpoints")
    try:
        meta = ckpts.manager.item_metadata(step)["state"]
        import jax
        import numpy as np

        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), dict(meta))
        return ckpts.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    finally:
        ckpts.close()
