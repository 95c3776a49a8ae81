"""The device's peak FLOP/s, the denominator of MFU: a table of accelerators, and a CPU's measured once and cached.

On a CPU the peak is the best float32 matmul throughput of the libraries training uses (`peak_matmul_libraries`),
measured on an idle machine and kept in a cache keyed by the machine (`peak_cache_path`); on a busy one the run
takes an upper-bound estimate from the CPU's flags instead (`estimated_cpu_peak`).
"""
import datetime
import functools
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp

from gptlab import files
from gptlab import perf

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


PEAK_MIN_SECONDS = 2.0  # how long each matmul size is sampled for the cached CPU peak


# Each matmul library the CPU peak may be measured with, as compile options. The peak is the best of the
# libraries this machine's training picks by default (`peak_matmul_libraries`), so MFU has one denominator
# on a machine. oneDNN is measured only where training uses it: on a 2-core AMD EPYC (Zen 3) processes that
# compiled and ran its matmuls aborted at random when an executable was destroyed (SIGABRT in XLA's
# OneDnnFusionThunk destructor): 5 of 100 with the persistent compilation cache on, 2 of 100 with the
# executables kept out of it, 0 of 150 measuring XLA's matmuls only (dev/stress_peak.py, 2026-12-07).
# An optional measurement must never end a run.
PEAK_MATMUL_OPTIONS = {"xla": {"xla_cpu_use_onednn": False}, "onednn": perf.CPU_MATMUL_OPTIONS["onednn"]}


def peak_matmul_libraries() -> tuple:
    """The matmul libraries the CPU peak is measured with: XLA's own, and oneDNN where the defaults train with it."""
    return ("xla", "onednn") if perf.choose_cpu_matmuls("cpu", "jit")[0] == "onednn" else ("xla",)


def measured_matmul_tflops(sizes=(1024, 2048), min_repeats: int = 8, min_seconds: float = PEAK_MIN_SECONDS,
                           libraries=None) -> float:
    """Best float32 matmul throughput of the default device, in TFLOP/s, over `libraries` (default
    `peak_matmul_libraries()`).

    The best of many is the machine's capability; a busy moment only lowers single samples.
    Each size runs at least `min_repeats` times and for at least `min_seconds` per library: on a
    shared 2-core VM the best of 8 quick repeats was 0.17-0.26 TFLOP/s in three runs a minute apart,
    and the best of 2 s per size 0.25-0.27 (2026-11-30), so a short window under-measures the peak.
    """
    best = 0.0
    for size in sizes:
        a = jnp.ones((size, size), jnp.float32)
        lowered = jax.jit(lambda x: x @ x).lower(a)
        for library in libraries or peak_matmul_libraries():
            try:
                with perf.no_persistent_cache():
                    matmul = lowered.compile(compiler_options=PEAK_MATMUL_OPTIONS[library])
            except Exception:  # noqa: BLE001  # a jaxlib without this library: the others measure the peak
                continue
            matmul(a).block_until_ready()
            began, repeats = time.perf_counter(), 0
            while repeats < min_repeats or time.perf_counter() - began < min_seconds:
                start = time.perf_counter()
                matmul(a).block_until_ready()
                best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e12)
                repeats += 1
    return best


def estimated_cpu_peak() -> tuple:
    """(float32 peak TFLOP/s, how it was estimated): cores x clock x float32 FLOPs per cycle from the CPU's flags.

    Meant as an upper bound, so MFU against it is never overstated: two FMA units per core, every
    usable core a full core, and the highest clock the kernel reports (else at least 3.5 GHz, a
    typical boost clock). On the 2-core AMD EPYC (Zen 3) of these tests: 0.224 TFLOP/s, measured
    0.187 idle (the highest measured there under any load was 0.223).
    """
    info = perf.cpu_info()
    flags = info.get("flags", frozenset())
    if "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, unit = 32, "AVX2+FMA"
    elif "avx" in flags:
        per_cycle, unit = 16, "AVX"
    elif "sve" in flags or "asimd" in flags:
        per_cycle, unit = 32, "SVE" if "sve" in flags else "NEON"
    else:
        per_cycle, unit = 16, "unknown vector unit"
    if info.get("max_mhz"):
        ghz, clock = info["max_mhz"] / 1000, "its highest clock"
    else:
        ghz, clock = max(info.get("mhz") or 0.0, 3500.0) / 1000, "an assumed boost clock"
    cores = perf.usable_cores()
    return (cores * ghz * 1e9 * per_cycle / 1e12,
            f"{cores} cores x {ghz:.2f} GHz ({clock}) x {per_cycle} float32 FLOPs a cycle ({unit})")


def peak_cache_path() -> pathlib.Path:
    """Where a machine's measured CPU peak is kept: $XDG_CACHE_HOME/gptlab (default ~/.cache/gptlab)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "gptlab" / "cpu_peak_tflops.json"


def _machine_key() -> str:
    info = perf.cpu_info()
    # How it is measured is part of the key: older, shorter measurements are not reused.
    return (f"{info['model']} | {perf.usable_cores()} cores | {','.join(sorted(info['flags']))} | jaxlib {jax.__version__}"
            f" | best of {PEAK_MIN_SECONDS:g} s | of {' and '.join(peak_matmul_libraries())} matmuls")


# A machine whose other processes use more than this share of its CPU time is busy: the peak is not measured
# there (a busy machine under-measures it: 0.032-0.223 TFLOP/s on one 2-core AMD EPYC, so MFU 0.87 in a quick
# start; and each measurement costs 8 s), and the run takes `estimated_cpu_peak` instead. A measurement that
# other processes disturbed anyway is discarded the same way.
PEAK_BUSY_SHARE_MAX = 0.1
PEAK_PROBE_SECONDS = 0.5  # how long the machine is watched before deciding to measure


def _machine_cpu_seconds():
    """CPU seconds all processes have run or were kept from running by the hypervisor (/proc/stat), or None."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(t) for t in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_share_of_others(measure) -> tuple:
    """(measure()'s result, the share (0..1) of the machine's CPU time other processes took meanwhile).

    The share is 0 where /proc/stat cannot be read or the measurement took under a quarter of a second
    (too short for the kernel's 10 ms ticks to tell).
    """
    machine, own, began = _machine_cpu_seconds(), time.process_time(), time.perf_counter()
    result = measure()
    wall, after = time.perf_counter() - began, _machine_cpu_seconds()
    if machine is None or after is None or wall < 0.25:
        return result, 0.0
    others = (after - machine) - (time.process_time() - own)
    return result, min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def cached_cpu_peak():
    """(TFLOP/s, when measured) from this machine's entry in the peak cache, or None."""
    try:
        entry = json.loads(peak_cache_path().read_text()).get(_machine_key())
        return float(entry["tflops"]), str(entry["measured"])
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return None


@functools.lru_cache(maxsize=None)
def cpu_peak_tflops() -> tuple:
    """(float32 matmul peak of this CPU, its source): "measured DATE ..." or "estimate: ...".

    Measured once per machine, on an idle machine, and cached on disk, so MFU has the same
    denominator in every run on a machine; the key is the CPU model, its usable cores, its flags
    and the JAX version, and a change measures again. While the machine is busy (or the measurement
    was disturbed) the run takes `estimated_cpu_peak` instead, measures nothing more and caches nothing.
    """
    cached = cached_cpu_peak()
    model = perf.cpu_info()["model"]
    if cached:
        return cached[0], f"measured {cached[1]} ({model}, float32 matmul), cached in {peak_cache_path()}"
    estimate, how = estimated_cpu_peak()
    _, busy = cpu_share_of_others(lambda: time.sleep(PEAK_PROBE_SECONDS))
    if busy > PEAK_BUSY_SHARE_MAX:
        return estimate, (f"estimate: {how}; not measured, other processes took {busy:.0%} of the CPU "
                          "(measured and cached once a run finds the machine idle)")
    tflops, busy = cpu_share_of_others(measured_matmul_tflops)
    if busy > PEAK_BUSY_SHARE_MAX:
        return estimate, (f"estimate: {how}; a measurement of {tflops:.3g} was discarded, other processes took "
                          f"{busy:.0%} of the CPU meanwhile")
    measured = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = cache_cpu_peak(tflops, measured)
    return tflops, f"measured {measured} ({model}, float32 matmul), {where}"


def cache_cpu_peak(tflops: float, measured: str) -> str:
    """Writes this machine's CPU peak into the cache (`peak_cache_path`, keyed as `cpu_peak_tflops` reads it).

    Returns where it went ("cached in PATH", or why not) for the peak's source line.
    """
    path = peak_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[_machine_key()] = {"tflops": tflops, "measured": measured}
        files.write_json_atomic(path, table, indent=1)
        return f"cached in {path}"
    except OSError as e:
        return f"not cached ({e.strerror})"


def peak_tflops(override=None) -> tuple:
    """(peak TFLOP/s of one device, where the number came from)."""
    if override:
        return float(override), "config train.peak_tflops"
    device = jax.devices()[0]
    for name, tflops in KNOWN_PEAK_TFLOPS:
        if name.lower() in device.device_kind.lower():
            return tflops, f"table ({device.device_kind})"
    if device.platform == "cpu":
        return cpu_peak_tflops()
    return float("nan"), f"unknown device {device.device_kind!r}: set train.peak_tflops"


def total_peak_tflops(override=None) -> tuple:
    """(peak TFLOP/s of all devices together, source): the MFU denominator.

    XLA CPU devices share one CPU (the split is a software one), so on a CPU the peak
    is the CPU's, however many devices the batch is split over.
    """
    peak, source = peak_tflops(override)
    devices = 1 if jax.devices()[0].platform == "cpu" else jax.device_count()
    return peak * devices, source + (f", x {devices} devices" if devices > 1 else "")
