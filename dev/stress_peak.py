"""Fresh processes that each measure the CPU peak and take a tiny train step; counts the aborts.

    python dev/stress_peak.py [PROCESSES] [PARALLEL]      # default 50 processes, 2 at a time
    STRESS_LIBRARIES=xla,onednn STRESS_CACHE_GUARD=0 python dev/stress_peak.py   # the peak as it was measured

By default the peak is measured as gptlab measures it (`gptlab.peak.peak_matmul_libraries()`: oneDNN only where
the training defaults use it, and never offered to the persistent cache). STRESS_LIBRARIES forces the
libraries; STRESS_CACHE_GUARD=0 lets their executables reach the persistent cache (the code before the fix).

Each child does what a sweep or study cell does at start-up: the persistent compilation cache on
(one directory shared by all children, as `train.compilation_cache_dir` in a sweep), the MFU peak
measured as `gptlab.peak.cpu_peak_tflops` measures it (shortened: only aborts are counted here, not
speed), then a jitted gradient step. An XLA abort (SIGABRT in oneDNN's thunk destructor, after
"ToProto is not implemented for thunk kind: onednn-fusion") ends a child with signal 6; the script
prints every child that did not exit 0 and a count per outcome. Not in the test suite: 50
processes take minutes.
"""
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CHILD = r"""
import os, sys
sys.path.insert(0, os.environ["STRESS_REPO"])
import jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", os.environ["STRESS_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from gptlab import perf
from gptlab import peak as peak_lib
if os.environ.get("STRESS_CACHE_GUARD") == "0":  # as before the fix: oneDNN executables offered to the cache
    import contextlib
    perf.no_persistent_cache = contextlib.nullcontext
libraries = tuple(os.environ["STRESS_LIBRARIES"].split(",")) if os.environ.get("STRESS_LIBRARIES") else None
peak = peak_lib.measured_matmul_tflops(sizes=(256, 512), min_repeats=2, min_seconds=0.01, libraries=libraries)
w = jnp.ones((128, 128), jnp.float32)
step = jax.jit(lambda w, x: w - 0.1 * jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w))
w = step(w, jnp.ones((64, 128), jnp.float32)).block_until_ready()
print(f"peak {peak:.3f}")
"""


def one(index: int, cache: str) -> tuple:
    env = {**os.environ, "STRESS_REPO": REPO, "STRESS_CACHE": cache, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    lines = run.stderr.strip().splitlines() or [""]
    telling = [line for line in lines if "Check failed" in line or "onednn" in line.lower()]
    return index, run.returncode, " | ".join(telling[:2] or lines[-1:])[:400]


def main(processes: int = 50, parallel: int = 2) -> int:
    began = time.time()
    outcomes = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="gptlab-stress-cache-") as cache:
        with ThreadPoolExecutor(parallel) as pool:
            for index, code, last in pool.map(lambda i: one(i, cache), range(processes)):
                name = "ok" if code == 0 else (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}")
                outcomes[name] += 1
                if code:
                    print(f"process {index}: {name}: {last}", flush=True)
    print(f"{processes} processes in {time.time() - began:.0f}s: " +
          ", ".join(f"{n} {name}" for name, n in outcomes.most_common()))
    return 1 if processes - outcomes["ok"] else 0


if __name__ == "__main__":
    sys.exit(main(*map(int, sys.argv[1:3])))
