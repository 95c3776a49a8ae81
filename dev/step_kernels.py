"""Where one train step's device time goes: a few steps under `jax.profiler`, summed by kernel.

    python dev/step_kernels.py PRESET [STEPS] [TOP]      # e.g. gpt2_124m on a GPU, small on a CPU

Compiles the preset's real train step on synthetic tokens (`benchmark.synthetic_train_step`),
runs 3 untimed steps, then STEPS (default 4) under the profiler, and prints the TOP (default 40)
kernels (GPU: the compute streams' kernels, cuBLAS/cuDNN/XLA fusions; CPU: the events of XLA's
threads, its ops among them) by time per step, read back from the trace's XSpace with
`jax.profiler.ProfileData`: no TensorBoard needed, so it runs on a bare GPU machine. The whole
trace stays in $TRACE_DIR (default a temporary folder) for TensorBoard or Perfetto.
"""
import collections
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import pretrain  # noqa: E402
from gptlab import benchmark  # noqa: E402


def profiled_steps(state, train_step, batches, steps: int, trace_dir: str, python_tracer: bool = True) -> tuple:
    """(state, wall seconds a step, the trace's planes): 3 untimed steps (the first compiles), then `steps`
    under `jax.profiler`, read back from the XSpace in `trace_dir` (`dev/step_breakdown.py` uses it too)."""
    import jax

    for _ in range(3):
        state, metrics = train_step(state, next(batches))
    jax.block_until_ready((state, metrics))
    options = jax.profiler.ProfileOptions()
    if not python_tracer:
        options.python_tracer_level = 0
    with jax.profiler.trace(trace_dir, profiler_options=options):
        begin = time.perf_counter()
        for _ in range(steps):
            state, metrics = train_step(state, next(batches))
        jax.block_until_ready((state, metrics))
        wall = (time.perf_counter() - begin) / steps
    xspace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    return state, wall, jax.profiler.ProfileData.from_file(xspace).planes


def main(preset="gpt2_124m", steps=4, top=40):
    import jax

    config = pretrain.get_config(preset)
    _, state, train_step, batches = benchmark.synthetic_train_step(config, lambda line: print(line, file=sys.stderr))
    trace_dir = os.environ.get("TRACE_DIR") or tempfile.mkdtemp(prefix="step_kernels_")
    _, wall, planes = profiled_steps(state, train_step, batches, steps, trace_dir)
    on_gpu = jax.default_backend() == "gpu"
    print(f"{preset}: {wall * 1e3:.1f} ms a step (wall, {steps} steps under the profiler); trace in {trace_dir}")
    for plane in planes:
        if not plane.name.startswith("/device:GPU" if on_gpu else "/host:CPU"):
            continue
        per_kernel = collections.Counter()
        for line in plane.lines:
            # GPU: the streams' kernels, not the summary lines; CPU: XLA's threads, not Python's.
            if ("Stream" not in line.name) if on_gpu else (line.name == "python"):
                continue
            for event in line.events:
                per_kernel[event.name] += event.duration_ns
        total = sum(per_kernel.values())
        print(f"== {plane.name}: {total / steps / 1e6:.1f} ms of events a step")
        for name, ns in per_kernel.most_common(top):
            print(f"{ns / steps / 1e6:8.2f} ms {100 * ns / total:5.1f}%  {name[:110]}")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["gpt2_124m"]), *map(int, sys.argv[2:4]))
