"""Entry points: `python -m experiments.NAME`, thin scripts over the `gptlab` library."""
import sys

if sys.argv[:1] == ["-m"]:  # run as `python -m experiments.NAME` (not imported), before its module and JAX load
    from gptlab import heap

    heap.restart_with_tcache_off()  # once: freed step buffers merge and are reused (gptlab/heap.py)
