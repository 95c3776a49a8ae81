"""The C heap under XLA's CPU buffers: the glibc settings behind `parallel.cpu_reuse_memory`.

XLA's CPU runtime allocates each train step's temporaries as one block per device
(`posix_memalign`, hundreds of MB) and frees it after the step. Left to glibc's defaults,
a block that large is mapped and unmapped every step, so the step faults all of it in
again, page by page (a fifth of the baby GPT's CPU step). `reuse_freed_memory` keeps freed
memory in the heap instead; whether the next step's block then fits a freed one depends on
glibc's per-thread cache (tcache):
- `posix_memalign` asks the heap for the block plus its alignment and splits off the
  few bytes it did not need on either side. Those slivers go to the tcache of the thread
  that allocated the block (XLA's device thread), where they count as in use: the blocks
  of one step, freed, do not merge across them, and each hole is exactly one block, too
  small for the next block plus its padding. So the heap grows by a block every few steps.
- With the tcache off (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`) the slivers are freed
  into the heap and merge: measured (docs/speed.md), the heap settles after a step or
  two for any block size, and glibc's trim threshold returns what exceeds it.
The tcache is fixed when the process starts (no `mallopt` changes it), so `python -m
experiments.NAME` restarts itself once with the variable (`restart_with_tcache_off`, called
from `experiments/__init__.py` before JAX loads). Where it cannot (imported as a library),
`perf.limit_reuse_memory` keeps freed memory only for steps with small temporaries.

No JAX import here: this runs before JAX loads.
"""
import contextlib
import functools
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
TUNABLES = "GLIBC_TUNABLES"
TCACHE = "glibc.malloc.tcache_count"
TCACHE_OFF = f"{TCACHE}=0"
# What `reuse_freed_memory` lets the heap keep: freed memory beyond this at the heap's top goes back
# to the kernel (the largest trim threshold `mallopt`, which takes an int, accepts: 2 GiB - 1).
KEPT_BYTES_MAX = 2**31 - 1
# Set by the restart: GLIBC_TUNABLES as the process had it before ("" for unset), for `environment_as_started`.
BEFORE_RESTART = "GPTLAB_GLIBC_TUNABLES_BEFORE_RESTART"
# The off switch: GPTLAB_ALLOCATOR_RESTART=0 in the environment keeps the process as started.
RESTART_SWITCH = "GPTLAB_ALLOCATOR_RESTART"


def is_glibc_linux() -> bool:
    try:
        return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def _tunables() -> dict:
    """GLIBC_TUNABLES as {name: value}, as this process started with it."""
    pairs = (item.partition("=") for item in os.environ.get(TUNABLES, "").split(":") if item)
    return {name: value for name, _, value in pairs}


def tcache_off() -> bool:
    """Whether this process started with glibc's tcache off, so freed step blocks merge and are reused."""
    return is_glibc_linux() and _tunables().get(TCACHE) == "0"


def may_run_on_an_accelerator(platforms: str = "") -> bool:
    """Whether JAX could pick a GPU or TPU here: JAX_PLATFORMS (or `platforms`) allows one and a plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS") or platforms or ""
    if platforms and set(platforms.lower().split(",")) <= {"cpu"}:
        return False
    import importlib.metadata
    import importlib.util

    return bool(importlib.metadata.entry_points(group="jax_plugins")) or any(
        importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def restart_with_tcache_off() -> None:
    """Re-executes this process, once, with glibc's tcache off, where the automatic CPU choices use it.

    Only on Linux with glibc, where no accelerator plugin is installed (there the step's buffers
    are on the device), and where GLIBC_TUNABLES does not choose the tcache already: a value the
    user set is kept (`GLIBC_TUNABLES=glibc.malloc.tcache_count=7` is glibc's default, and stops
    the restart), nor with GPTLAB_ALLOCATOR_RESTART=0. Same interpreter, arguments, environment
    (plus the variable) and process id. Call it before anything has started (threads, files, JAX);
    if exec fails, nothing changes. Training's log says so where it reports `parallel.cpu_reuse_memory`.
    """
    if os.environ.get(RESTART_SWITCH) == "0":
        return
    if not is_glibc_linux() or TCACHE in _tunables() or may_run_on_an_accelerator():
        return
    tunables = ":".join(filter(None, [os.environ.get(TUNABLES), TCACHE_OFF]))
    argv = getattr(sys, "orig_argv", None)
    if not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, TUNABLES: tunables, BEFORE_RESTART: os.environ.get(TUNABLES, "")}
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        pass  # carried on as it was: perf.limit_reuse_memory keeps the heap bounded


@contextlib.contextmanager
def environment_as_started():
    """os.environ without what `restart_with_tcache_off` added, for processes started meanwhile
    that should run as their users run them (the benchmark's PyTorch peers)."""
    if BEFORE_RESTART not in os.environ:
        yield
        return
    saved = {name: os.environ.get(name) for name in (TUNABLES, BEFORE_RESTART)}
    before = os.environ.pop(BEFORE_RESTART)
    if before:
        os.environ[TUNABLES] = before
    else:
        os.environ.pop(TUNABLES, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value


@functools.lru_cache(maxsize=None)
def _libc():
    """glibc, for mallopt and malloc_trim (None where it cannot be loaded)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def reuse_freed_memory() -> bool:
    """Makes glibc keep and reuse freed memory instead of unmapping it; True if it took effect.

    One arena (XLA's device threads would otherwise each take their own), no mmap, and a trim
    threshold of KEPT_BYTES_MAX. Only for allocations made afterwards: call it before JAX's
    backend starts its threads.
    """
    libc = _libc()
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, KEPT_BYTES_MAX))
    return libc is not None and all(libc.mallopt(param, value) == 1 for param, value in settings)


def unmap_freed_memory() -> bool:
    """Undoes `reuse_freed_memory` for later allocations (any time) and returns the kept memory.

    Blocks above glibc's largest dynamic mmap threshold (32 MB) are mapped and unmapped again,
    and up to twice that stays untrimmed: where glibc's own adjustment settles. `malloc_trim`
    gives the kernel back every free page the heap kept meanwhile.
    """
    libc = _libc()
    settings = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))
    if libc is None or not all(libc.mallopt(param, value) == 1 for param, value in settings):
        return False
    libc.malloc_trim(0)
    return True
