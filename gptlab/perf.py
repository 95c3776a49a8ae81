"""Speed settings chosen from the machine: what the machine is, the choices, and resolving "auto" fields.

`resolve_auto(config, log)` fills in every config field left to "auto" (or None) from
what can be detected: the platform JAX runs on, the cores this process may use, the
CPU's flags. It runs once, in the one start-up of every run (`train.start`, which
`train_and_evaluate` and `finetune_and_evaluate` call first; `benchmark.start_run`), after
`start_cpu_devices`, because the number of XLA CPU devices is fixed when JAX's backend
starts; below it the library refuses "auto" (`check_resolved`). What it chose, and why, is logged in one line; each choice is a config field,
so a flag overrides it (`--config.model.attention=xla`, `--config.parallel.cpu_devices=1`, ...).

The choices, and the measurements behind them, are in docs/speed.md. The peak FLOP/s behind MFU is
gptlab/peak.py; a profiler trace of chosen steps, gptlab/profiling.py.
"""
import functools
import os
import pathlib
import platform
import re

import jax

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


def no_persistent_cache():
    """A context in which nothing compiled is written to JAX's persistent compilation cache.

    XLA cannot serialise oneDNN thunks ("UNIMPLEMENTED: ToProto is not implemented for thunk kind:
    onednn-fusion", a warning at every such compile); executables compiled with oneDNN are kept out.
    """
    from jax._src import config as jax_config  # no public API scopes this setting

    return jax_config.persistent_cache_min_compile_time_secs(float("inf"))


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


# The fields "auto" stands in, resolved by `resolve_auto`.
AUTO_FIELDS = ("model.attention", "model.dense_backward")


def concrete(field: str, value):
    """`value` of the config field `field` (e.g. "model.dense_backward"); one line refusing it while it is "auto"."""
    if value == AUTO:
        from gptlab.errors import UserError

        raise UserError(f"{field}='auto' was not resolved for this machine: start the run with "
                        f"gptlab.train.start(config) (train_and_evaluate and finetune_and_evaluate do), "
                        f"or set --config.{field} to a value")
    return value


def check_resolved(config) -> None:
    """Refuses (one line naming the field) a config that still holds "auto" where a run needs a value."""
    for field in AUTO_FIELDS:
        group, name = field.split(".")
        concrete(field, config[group].get(name))


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
