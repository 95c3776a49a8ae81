"""The allocator restart of `python -m experiments.NAME` is explicit: switched off by a variable, named in the log."""
import os
import subprocess
import sys

import pytest

from gptlab import heap, perf

# What experiments/__init__.py does, then a child process started the way a sweep starts its cells.
_ENTRY = """
import os, subprocess, sys
from gptlab import heap
heap.restart_with_tcache_off()
print(repr(os.environ.get("GLIBC_TUNABLES")), flush=True)
if sys.argv[1:] == ["parent"]:
    subprocess.run([sys.executable, "-c", CHILD, "child"], check=True)
"""


def _run(extra_env):
    if not heap.is_glibc_linux():
        pytest.skip("the restart exists on Linux with glibc only")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", heap.BEFORE_RESTART, heap.RESTART_SWITCH)}
    script = f"CHILD = {_ENTRY!r}\n" + _ENTRY  # the child runs the same code (its argv is not "parent")
    return subprocess.run([sys.executable, "-c", script, "parent"], capture_output=True, text=True, timeout=60,
                          env={**env, "JAX_PLATFORMS": "cpu", **extra_env})


def test_the_restart_happens_once_and_children_keep_its_setting():
    out = _run({})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [repr(heap.TCACHE_OFF), repr(heap.TCACHE_OFF)]


def test_the_off_switch_keeps_the_process_as_started():
    out = _run({heap.RESTART_SWITCH: "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["None", "None"]


def test_the_log_names_the_restart_and_its_off_switch(monkeypatch):
    if not heap.is_glibc_linux():
        pytest.skip("the restart exists on Linux with glibc only")
    monkeypatch.setenv("GLIBC_TUNABLES", heap.TCACHE_OFF)
    monkeypatch.setenv(heap.BEFORE_RESTART, "")
    keep, why = perf.choose_reuse_memory()
    assert keep and "restarted itself" in why and f"{heap.RESTART_SWITCH}=0" in why
