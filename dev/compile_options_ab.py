"""gptlab's real train step compiled with several sets of XLA compile options, timed in ONE process.

    python dev/compile_options_ab.py baby|small [BLOCKS] [STEPS_PER_BLOCK]
    VARIANTS='{"xla": {"xla_cpu_use_onednn": false}}' python dev/compile_options_ab.py baby

Separate benchmark processes on a shared VM drift by 20-45% within minutes; here every variant
runs on the same state and batches, in alternating blocks (the order reversed every other block),
so a slow moment slows all alike. Prints each variant's median step time and, per block, the
first variant's step time over its own (above 1: faster than the first). Default variants: XLA's
own matmuls and oneDNN's (`perf.CPU_MATMUL_OPTIONS`), the comparison behind docs/speed.md's
`parallel.cpu_matmuls` figures.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import step_breakdown  # noqa: E402
from gptlab import benchmark, perf  # noqa: E402
from gptlab import peak as peak_lib  # noqa: E402


def main(shape="baby", blocks=6, per_block=3):
    config = step_breakdown.get_config(shape)  # baby: nanoGPT's baby GPT, as docs/speed.md's tables
    if shape == "baby":
        config.model.dtype = os.environ.get("DTYPE", "float32")
    variants = json.loads(os.environ.get("VARIANTS") or json.dumps(
        {"xla": peak_lib.PEAK_MATMUL_OPTIONS["xla"], "onednn": perf.CPU_MATMUL_OPTIONS["onednn"]}))
    par, state, train_step, batches = benchmark.synthetic_train_step(config, lambda line: print(line, file=sys.stderr))
    import jax

    # The step's jitted function, compiled per variant: the same lowering, other compile options.
    with jax.set_mesh(par.mesh):
        lowered = train_step.jitted.lower(state, par.place_batch(next(batches)))
    compiled = {name: lowered.compile(compiler_options=options) for name, options in variants.items()}

    def step(name):
        nonlocal state
        begin = time.perf_counter()
        state, metrics = compiled[name](state, par.place_batch(next(batches)))
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - begin

    for name in compiled:  # warm up
        step(name)
    medians = {name: [] for name in compiled}
    for block in range(blocks):
        for name in (list(compiled) if block % 2 == 0 else list(compiled)[::-1]):
            medians[name].append(float(np.median([step(name) for _ in range(per_block)])))
    first = np.array(medians[next(iter(medians))])
    for name, times in medians.items():
        ratio = first / np.array(times)
        print(f"{name:12s} median step {np.median(times):.3f} s; first variant's step over this one, per block: "
              f"{np.round(ratio, 3).tolist()}, median {np.median(ratio):.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "baby", *(int(a) for a in sys.argv[2:4]))
