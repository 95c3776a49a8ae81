"""Entry points: `python -m experiments.NAME`, thin scripts over the `gptlab` library.

Run that way (not imported), an entry point first restarts itself once with glibc's tcache off on
Linux CPU machines, so that the train step's freed buffers merge and are reused (gptlab/heap.py,
docs/speed.md); a training run's log says so where it reports `parallel.cpu_reuse_memory`.
GPTLAB_ALLOCATOR_RESTART=0 in the environment turns it off.
"""
import sys

if sys.argv[:1] == ["-m"]:  # run as `python -m experiments.NAME`, before its module and JAX load
    from gptlab import heap

    heap.restart_with_tcache_off()
