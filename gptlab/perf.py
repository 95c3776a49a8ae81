"""Device peak FLOP/s for MFU: a table of known accelerators, a measured peak on CPUs."""
import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak TFLOP/s per device, by a substring of `device.device_kind`.
# Ordered: the first match wins (so "H100 PCIe" is found before "H100").
KNOWN_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("V100", 125.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 197.0),  # v5e / v5 lite
    ("TPU v4", 275.0),
)


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 matmul throughput of the default device, in TFLOP/s."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(override=None) -> tuple:
    """(peak TFLOP/s of one device, where the number came from)."""
    if override:
        return float(override), "config train.peak_tflops"
    device = jax.devices()[0]
    for name, tflops in KNOWN_PEAK_TFLOPS:
        if name.lower() in device.device_kind.lower():
            return tflops, f"table ({device.device_kind})"
    if device.platform == "cpu":
        return measured_matmul_tflops(), "measured float32 matmul on this CPU"
    return float("nan"), f"unknown device {device.device_kind!r}: set train.peak_tflops"
