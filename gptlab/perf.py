"""Speed settings chosen from the machine, and the device peak FLOP/s for MFU.

`resolve_auto(config, log)` fills in every config field left to "auto" (or None) from
what can be detected: the platform JAX runs on, the cores this process may use, the
CPU's flags. It runs first in every entry point that trains (`train.run_experiment`,
`benchmark.run`), because the number of XLA CPU devices is fixed when JAX's backend
starts. What it chose, and why, is logged in one line; each choice is a config field,
so a flag overrides it (`--config.model.attention=xla`, `--config.parallel.cpu_devices=1`, ...).

The choices, and the measurements behind them, are in the README's "Speed" section.
"""
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import re
import time

import jax
import jax.numpy as jnp

from gptlab import files
from gptlab import heap

AUTO = "auto"
# More XLA CPU devices than this never pays off: each must keep enough rows of the batch
# for its matmuls, and the split only parallelises the elementwise fusions, which run on
# one thread per device.
MAX_CPU_DEVICES = 8
# CPU flags reported in logs and results (which vector / matrix units the CPU has).
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve", "bf16")


# -- what the machine is ---------------------------------------------------------------------------


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def _cgroup_cpu_quota():
    """The CPU quota in cores (cgroup v2 cpu.max or v1 cfs), or None when there is none."""
    try:
        quota, period = pathlib.Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(pathlib.Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(pathlib.Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """{"model": the CPU's name, "vendor": its vendor_id ("" if unknown), "flags": its feature flags}.

    From /proc/cpuinfo (Linux), else `platform`.
    """
    name, vendor, flags, mhz = platform.processor() or platform.machine(), "", set(), 0.0
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for key, value in re.findall(r"^(model name|vendor_id|flags|Features|cpu MHz)\s*:\s*(.*)$", text, re.M):
        if key == "model name":
            name = value.strip()
        elif key == "vendor_id":
            vendor = value.strip()
        elif key == "cpu MHz":
            try:
                mhz = max(mhz, float(value))
            except ValueError:
                pass
        else:
            flags.update(value.split())
    try:  # the highest clock the kernel knows of (absent in many VMs)
        max_mhz = int(pathlib.Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        max_mhz = None
    return {"model": name, "vendor": vendor, "flags": frozenset(flags), "mhz": mhz or None, "max_mhz": max_mhz}


def cpu_description() -> str:
    """One line: CPU model, usable cores, and which vector/matrix units it has."""
    info = cpu_info()
    units = [f for f in REPORTED_CPU_FLAGS if f in info["flags"]]
    return f"{info['model']}, {usable_cores()} cores" + (f" ({', '.join(units)})" if units else "")


def _backend_started() -> bool:
    from jax._src import xla_bridge  # no public API says whether the backends exist yet

    return xla_bridge.backends_are_initialized()


# -- the choices -------------------------------------------------------------------------------------


def choose_cpu_devices(cores: int, rows_per_step: int) -> tuple:
    """(XLA CPU devices to split each batch over, why).

    XLA runs each elementwise fusion on one thread of its device; matmuls use every core.
    With one device per core the elementwise part of the step (GELU, LayerNorm, softmax,
    their gradients: a third of a small model's step) runs on all cores too. The count
    must divide the rows each step processes.
    """
    if cores < 2:
        return 1, "1 core"
    for count in range(min(cores, MAX_CPU_DEVICES, rows_per_step), 0, -1):
        if rows_per_step % count == 0:
            why = f"one per core ({cores} cores)" if count == cores else (
                f"{cores} cores, at most {MAX_CPU_DEVICES}, dividing the {rows_per_step} rows per step")
            return count, why


def choose_attention(platform_name: str, dtype: str) -> tuple:
    """(model.attention, why) for this platform and compute dtype."""
    if platform_name == "gpu" and dtype in ("bfloat16", "float16") and _is_nvidia():
        return "cudnn", "NVIDIA GPU, 16-bit compute: cuDNN flash attention"
    if platform_name == "cpu":
        return "blocked", "CPU: causal blocks of queries, masked key blocks skipped, hand-written backward"
    return "xla", f"{platform_name}: jax.nn.dot_product_attention"


def _is_nvidia() -> bool:
    return "cuda" in jax.devices()[0].client.platform_version.lower()


def choose_dense_backward(platform_name: str) -> tuple:
    if platform_name == "cpu":
        return "narrow_transpose", "CPU: avoids XLA's transposed writes of wide gradients"
    return "xla", f"{platform_name}: XLA's own layout"


def choose_prefetch(platform_name: str) -> tuple:
    if platform_name == "cpu":
        return 0, "CPU: nothing to copy, a thread would compete with the step for the cores"
    return 2, f"{platform_name}: overlap the host-to-device copy with the step"


# The automatic `parallel.cpu_reuse_memory` keeps freed memory only for a train step whose temporaries
# (its compiled `memory_analysis().temp_size_in_bytes`, per device) are at most this, where glibc's
# tcache is on (`heap.tcache_off()` is False: imported as a library, not restarted by `python -m
# experiments.NAME`). Measured with the tcache on, on a 2-core Intel Xeon with dev/step_memory.py
# (README "Speed"): at 69 MB (the `small` preset) the heap settled within 21 steps; at 615 MB (the baby
# GPT) it grew by a whole block every few steps; at 3.5 GB (`shakespeare_char`) by 7 GB a step until
# the process was killed. With the tcache off freed blocks merge and the heap settles; the limit is
# then what the heap keeps at all (`heap.KEPT_BYTES_MAX`, over all devices): beyond it, glibc gives
# the freed blocks back after every step anyway.
REUSE_MEMORY_MAX_TEMP_MB = 256


def reuse_memory_limit_mb(devices: int) -> tuple:
    """(the most temporaries a device, in MB, for which the automatic choice keeps freed memory, why)."""
    if heap.tcache_off():
        return heap.KEPT_BYTES_MAX / 2**20 / devices, (
            f"a device can keep ({heap.KEPT_BYTES_MAX / 2**30:.1f} GiB the heap keeps, over {devices} device(s)): "
            "larger freed blocks go back to the kernel after every step anyway")
    return REUSE_MEMORY_MAX_TEMP_MB, (
        f"up to which freed memory is kept with glibc's tcache on: larger blocks fragmented the kept heap; "
        f"a process started with {heap.TUNABLES}={heap.TCACHE_OFF}, as `python -m experiments.NAME` "
        "restarts itself, keeps more")


def choose_reuse_memory() -> tuple:
    """(parallel.cpu_reuse_memory, why): keep the C allocator's freed memory for the next step."""
    if not heap.is_glibc_linux():
        return False, "not Linux with glibc"
    if heap.may_run_on_an_accelerator(jax.config.jax_platforms):
        return False, "an accelerator plugin is installed: the step's buffers are on the device"
    why = "CPU: the step's buffers stay mapped (no munmap and page faults each step)"
    if heap.tcache_off():
        why += f"; glibc's tcache is off ({heap.TCACHE_OFF}), so freed blocks merge and are reused"
        if heap.BEFORE_RESTART in os.environ:  # set by experiments/__init__.py's restart, not by the user
            why += f" (python -m experiments.NAME restarted itself with it; {heap.RESTART_SWITCH}=0 turns that off)"
    return True, f"{why}; off again if the step's temporaries are too large to keep"


def reuse_memory_choice() -> tuple:
    """(whether freed memory is kept for the next step, why), as it stands now in this process."""
    return _reuse_memory_choice


def limit_reuse_memory(train_step, log=print):
    """`train_step`, which at its first call keeps an automatic `parallel.cpu_reuse_memory` only
    while the compiled step's temporaries are at most `reuse_memory_limit_mb` a device.

    With glibc's tcache on, larger blocks fragment the kept heap (gptlab/heap.py: the next step's
    block no longer fits a freed one, so the heap grows by a whole block): memory grows without
    bound. With it off, blocks beyond what the heap keeps are given back after each step anyway.
    Checked before the first step runs (the compiled executable is jit's own, compiled once), so
    the heap has not grown yet. An explicit `parallel.cpu_reuse_memory=True` is left as it is.
    """
    if not _reuse_memory_choice[0] or _reuse_memory_choice[1] == EXPLICIT_REUSE:
        return train_step
    checked = False

    @functools.wraps(train_step)
    def step(*args):
        nonlocal checked
        if not checked:
            checked = True
            _check_reuse_memory(train_step.compiled(*args), log)
        return train_step(*args)

    return step


def _check_reuse_memory(compiled, log) -> None:
    global _reuse_memory_choice
    analysis = compiled.memory_analysis()
    temp_mb = getattr(analysis, "temp_size_in_bytes", 0) / 2**20
    limit_mb, limit_why = reuse_memory_limit_mb(jax.local_device_count())
    if temp_mb <= limit_mb or not _reuse_memory_choice[0]:
        return
    why = f"the compiled train step's temporaries are {temp_mb:,.0f} MB a device, above the {limit_mb:,.0f} MB {limit_why}"
    if not heap.unmap_freed_memory():
        log(f"warning: {why}, but glibc's mallopt refused to undo parallel.cpu_reuse_memory: "
            "rerun with --config.parallel.cpu_reuse_memory=False")
        return
    _reuse_memory_choice = (False, why)
    log(f"auto: parallel.cpu_reuse_memory=False from the first step ({why}; "
        "--config.parallel.cpu_reuse_memory=True keeps it)")


# Which library runs the CPU train step's matmuls (`parallel.cpu_matmuls`), as XLA compile options
# of the train and eval steps (`parallel.Parallel.compile`). "xla": XLA as configured (its own
# YNNPACK kernels unless XLA_FLAGS says otherwise); "onednn": each dot goes to oneDNN, which jaxlib
# has built in, and everything else stays as XLA does it. Only the steps: sampling's small
# matrix-vector products were slower with oneDNN (README "Speed").
CPU_MATMUL_OPTIONS = {
    "xla": None,
    "onednn": {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def choose_cpu_matmuls(platform_name: str, mode: str) -> tuple:
    """(parallel.cpu_matmuls, why): oneDNN's matmuls on Intel CPUs, XLA's own elsewhere.

    On a 2-core Intel Xeon (AVX-512, AMX) the whole float32 train step was 9-16% faster with
    oneDNN's dots, compiled both ways in one process and timed in alternating blocks. On a 2-core
    AMD EPYC (Zen 3, AVX2) it tied on the baby GPT and was slower on `small` (README "Speed").
    """
    if platform_name != "cpu":
        return "xla", f"{platform_name}: the matmuls run on the device"
    if mode != "jit":
        return "xla", f"parallel.mode={mode}: jax.pmap takes no compile options"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "xla", f"{platform.machine()} CPU: XLA's own"
    vendor = cpu_info()["vendor"]
    if vendor != "GenuineIntel":
        return "xla", f"{vendor or 'unknown'} CPU: XLA's own (oneDNN's matmuls were no faster on an AMD EPYC)"
    return "onednn", "Intel CPU: oneDNN's matmuls (built into jaxlib) run the step faster than XLA's own"


def matmul_compile_options(cpu_matmuls) -> "dict | None":
    """The XLA compile options of a train or eval step for `parallel.cpu_matmuls` (None: XLA's own)."""
    if cpu_matmuls not in CPU_MATMUL_OPTIONS:
        from gptlab.errors import UserError

        raise UserError(f"parallel.cpu_matmuls={cpu_matmuls!r} must be one of "
                        f"{', '.join(map(repr, CPU_MATMUL_OPTIONS))} (None: automatic)")
    return CPU_MATMUL_OPTIONS[cpu_matmuls]


# The device count start_cpu_devices chose, and why; resolve_auto logs it.
_cpu_devices_choice = (None, "")
# Whether start_cpu_devices made the allocator reuse freed memory, and why (limit_reuse_memory may undo it).
_reuse_memory_choice = (None, "")
EXPLICIT_REUSE = "parallel.cpu_reuse_memory"  # the why of a choice the config made


def start_cpu_devices(config) -> tuple:
    """Fixes how many XLA CPU devices JAX starts with; call before any JAX computation.

    Returns (devices, why); devices is None where JAX keeps its own count. An explicit
    count wins: `parallel.cpu_devices`, else `XLA_FLAGS=--xla_force_host_platform_device_count=N`
    or `JAX_NUM_CPU_DEVICES` in the environment (tests pin one device that way). Once
    the backend has started (a second experiment in one process) the count is what it
    is; multi-process runs keep JAX's one device per process.

    Before the backend starts it also applies `parallel.cpu_reuse_memory` (None:
    `choose_reuse_memory`), which must precede the backend's threads; `resolve_auto` logs it.
    """
    global _cpu_devices_choice, _reuse_memory_choice
    par = config.parallel
    requested = par.get("cpu_devices")
    if requested is not None and requested < 1:
        from gptlab.errors import UserError

        raise UserError(f"parallel.cpu_devices={requested} must be >= 1 (None: automatic)")
    flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    multi_process = (par.get("coordinator_address") or int(os.environ.get("SLURM_NTASKS", "1")) > 1
                     or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if _backend_started():
        if _cpu_devices_choice[0] is not None:  # set by an earlier call, before the backend started
            return _cpu_devices_choice
        count, why = None, "JAX's backend had already started in this process"
    elif requested is not None:
        count, why = requested, "parallel.cpu_devices"
    elif flag or os.environ.get("JAX_NUM_CPU_DEVICES"):
        count, why = None, "set in the environment (XLA_FLAGS / JAX_NUM_CPU_DEVICES)"
    elif multi_process:
        count, why = None, "multi-process run"
    else:
        rows = config.data.batch_size // max(1, config.train.grad_accum_steps)
        count, why = choose_cpu_devices(usable_cores(), max(1, rows))
    if count is not None:
        jax.config.update("jax_num_cpu_devices", count)
    _cpu_devices_choice = (count, why)
    if not _backend_started():
        reuse = par.get("cpu_reuse_memory")
        reuse, reuse_why = (reuse, EXPLICIT_REUSE) if reuse is not None else choose_reuse_memory()
        if reuse and not heap.reuse_freed_memory():
            reuse, reuse_why = False, "glibc's mallopt refused the settings"
        _reuse_memory_choice = (reuse, reuse_why)
    return count, why


def resolve_auto(config, log=print) -> dict:
    """Fills in the config's automatic speed fields (in place); logs and returns {field: (value, why)}.

    model.attention and model.dense_backward "auto"; data.prefetch, parallel.cpu_devices,
    parallel.cpu_reuse_memory and parallel.cpu_matmuls None. Call `start_cpu_devices` before anything starts JAX's
    backend (and before `jax.distributed.initialize`), then this.
    """
    chosen = {}
    count, why = _cpu_devices_choice
    platform_name = jax.default_backend()  # starts the backend
    model, data = config.model, config.data
    if config.parallel.get("cpu_devices") is None:
        devices = jax.local_device_count("cpu") if platform_name == "cpu" else count
        with config.unlocked():
            config.parallel.cpu_devices = devices
        if platform_name == "cpu":
            chosen["parallel.cpu_devices"] = (devices, why or "as started")
    if config.parallel.get("cpu_reuse_memory", False) is None and _reuse_memory_choice[0] is not None:
        with config.unlocked():
            config.parallel.cpu_reuse_memory, why = _reuse_memory_choice
        chosen["parallel.cpu_reuse_memory"] = _reuse_memory_choice
    if config.parallel.get("cpu_matmuls", False) is None:
        with config.unlocked():
            config.parallel.cpu_matmuls, why = choose_cpu_matmuls(platform_name, config.parallel.get("mode", "jit"))
        if platform_name == "cpu":
            chosen["parallel.cpu_matmuls"] = (config.parallel.cpu_matmuls, why)
    if model.get("attention") == AUTO:
        model.attention, why = choose_attention(platform_name, model.dtype or "float32")
        chosen["model.attention"] = (model.attention, why)
    if model.get("dense_backward") == AUTO:
        model.dense_backward, why = choose_dense_backward(platform_name)
        chosen["model.dense_backward"] = (model.dense_backward, why)
    if "prefetch" in data and data.prefetch is None:
        data.prefetch, why = choose_prefetch(platform_name)
        chosen["data.prefetch"] = (data.prefetch, why)
    if chosen:
        where = cpu_description() if platform_name == "cpu" else f"{platform_name}: {jax.devices()[0].device_kind}"
        log(f"auto [{where}]: " + "; ".join(f"{k}={v} ({why})" for k, (v, why) in chosen.items()))
    return chosen


def resolve_model_fields(model_config) -> dict:
    """The `model` group as a dict with "auto" fields resolved for the running backend (no logging).

    For code that builds a model from a preset without going through `resolve_auto`.
    """
    platform_name = jax.default_backend()
    values = dict(model_config)
    if values.get("attention") == AUTO:
        values["attention"] = choose_attention(platform_name, values.get("dtype") or "float32")[0]
    if values.get("dense_backward") == AUTO:
        values["dense_backward"] = choose_dense_backward(platform_name)[0]
    return values


# -- peak FLOP/s for MFU -----------------------------------------------------------------------------

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
PEAK_MATMUL_OPTIONS = {"xla": {"xla_cpu_use_onednn": False}, "onednn": CPU_MATMUL_OPTIONS["onednn"]}


def peak_matmul_libraries() -> tuple:
    """The matmul libraries the CPU peak is measured with: XLA's own, and oneDNN where the defaults train with it."""
    return ("xla", "onednn") if choose_cpu_matmuls("cpu", "jit")[0] == "onednn" else ("xla",)


def no_persistent_cache():
    """A context in which nothing compiled is written to JAX's persistent compilation cache.

    XLA cannot serialise oneDNN thunks ("UNIMPLEMENTED: ToProto is not implemented for thunk kind:
    onednn-fusion", a warning at every such compile); executables compiled with oneDNN are kept out.
    """
    from jax._src import config as jax_config  # no public API scopes this setting

    return jax_config.persistent_cache_min_compile_time_secs(float("inf"))


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
                with no_persistent_cache():
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
    info = cpu_info()
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
    cores = usable_cores()
    return (cores * ghz * 1e9 * per_cycle / 1e12,
            f"{cores} cores x {ghz:.2f} GHz ({clock}) x {per_cycle} float32 FLOPs a cycle ({unit})")


def peak_cache_path() -> pathlib.Path:
    """Where a machine's measured CPU peak is kept: $XDG_CACHE_HOME/gptlab (default ~/.cache/gptlab)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "gptlab" / "cpu_peak_tflops.json"


def _machine_key() -> str:
    info = cpu_info()
    # How it is measured is part of the key: older, shorter measurements are not reused.
    return (f"{info['model']} | {usable_cores()} cores | {','.join(sorted(info['flags']))} | jaxlib {jax.__version__}"
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
    model = cpu_info()["model"]
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


# -- profiling ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepProfiler:
    """Writes a `jax.profiler` trace of steps [first, last] into `directory` (TensorBoard / Perfetto).

    `train.profile_steps=(first, last)` turns it on; () leaves it off.
    """
    steps: tuple
    directory: str
    log: object = print
    active: bool = False

    def __post_init__(self):
        from gptlab.errors import UserError

        if self.steps and (len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]):
            raise UserError(f"train.profile_steps={tuple(self.steps)} must be (first, last) steps with "
                            "1 <= first <= last, e.g. (10, 12); () for no trace")

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step == self.steps[1]:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if not self.active:
            return
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.active = False
        self.log(f"profile of steps {self.steps[0]}-{self.steps[1]} written to {self.directory} "
                 "(tensorboard --logdir, or ui.perfetto.dev with its .trace.json.gz)")
