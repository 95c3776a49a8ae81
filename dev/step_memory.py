"""Each train step's time, page faults and resident memory, to see how the C heap behaves on a CPU.

    python dev/step_memory.py [baby|PRESET] [STEPS] [auto|on|off]      # default: baby, 40 steps, auto

Runs the config's real train step on synthetic tokens (`benchmark.synthetic_train_step`) STEPS
times with `parallel.cpu_reuse_memory` automatic, on or off, and prints one line a step: seconds, minor page faults during it, and the process's VmRSS after
it; then the mean and median of steps 1.. (step 0 compiles) and how many of them faulted.
A step that faults while the setting is on is one whose temporaries did not fit a freed block,
so the heap grew (docs/speed.md, `parallel.cpu_reuse_memory`). `baby` is as in `dev/step_breakdown.py`.
Like `python -m experiments.NAME` it restarts itself with glibc's tcache off (gptlab/heap.py);
`GLIBC_TUNABLES=glibc.malloc.tcache_count=7` (glibc's default) keeps the tcache, and with it the
automatic choice's limit on the step's temporaries (`perf.limit_reuse_memory`).
"""
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_breakdown  # noqa: E402
from gptlab import benchmark  # noqa: E402


def resident_mb() -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) // 1024


def main(shapes="baby", steps=40, reuse="auto"):
    import jax

    from gptlab import perf

    if reuse not in ("auto", "on", "off"):
        sys.exit(f"step_memory.py: the third argument is auto, on or off (parallel.cpu_reuse_memory), not {reuse!r}")
    config = step_breakdown.get_config(shapes)
    config.parallel.cpu_reuse_memory = {"auto": None, "on": True, "off": False}[reuse]
    _, state, train_step, batches = benchmark.synthetic_train_step(config, lambda line: print(line, file=sys.stderr))
    times, faulted = [], 0
    for step in range(steps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        begin = time.perf_counter()
        state, metrics = train_step(state, next(batches))
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - begin
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"step {step:3d} {seconds:6.2f} s  page faults {faults:8d}  resident {resident_mb()} MB", flush=True)
        if step:
            times.append(seconds)
            faulted += faults > 0
    if times:
        reuse += f" ({'kept' if perf.reuse_memory_choice()[0] else 'not kept'})" if reuse == "auto" else ""
        print(f"{shapes}, cpu_reuse_memory {reuse}: steps 1-{steps - 1}: mean {statistics.mean(times):.3f} s, "
              f"median {statistics.median(times):.3f} s; {faulted} of {len(times)} faulted")


if __name__ == "__main__":
    from gptlab import heap

    heap.restart_with_tcache_off()  # as `python -m experiments.NAME` does
    main(*(sys.argv[1:2] or ["baby"]), *map(int, sys.argv[2:3]), *sys.argv[3:4])
