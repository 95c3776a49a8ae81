"""Automatic speed settings (gptlab/perf.py): resolved from the machine, logged, overridable; the
cached CPU peak; the profiler flag. No timing is asserted."""
import os
import subprocess
import sys
import types

import jax
import pytest

from gptlab import heap, perf, train
from gptlab import peak as peak_lib
from gptlab.errors import UserError


@pytest.mark.parametrize("cores,rows,expected", [
    (1, 16, 1),  # one core: nothing to parallelise
    (2, 16, 2),  # one device per core
    (4, 6, 3),  # the most devices that divide the batch
    (3, 1, 1),  # a single row cannot be split
    (64, 64, perf.MAX_CPU_DEVICES),  # capped
])
def test_cpu_device_count_follows_cores_and_divides_the_batch(cores, rows, expected):
    count, why = perf.choose_cpu_devices(cores, rows)
    assert count == expected and rows % count == 0 and why


def test_auto_fields_are_resolved_for_the_cpu_and_logged(make_config):
    config = make_config()
    assert (config.model.attention, config.model.dense_backward, config.data.prefetch) == ("auto", "auto", None)
    lines = []
    chosen = perf.resolve_auto(config, lines.append)
    assert jax.default_backend() == "cpu"
    assert (config.model.attention, config.model.dense_backward, config.data.prefetch) == (
        "blocked", "narrow_transpose", 0)
    assert config.parallel.cpu_devices == jax.local_device_count()
    assert set(chosen) >= {"model.attention", "model.dense_backward", "data.prefetch"}
    assert len(lines) == 1 and "model.attention=blocked" in lines[0] and "cores" in lines[0]


def test_explicit_values_override_the_automatic_choice(make_config):
    config = make_config(model__attention="xla", model__dense_backward="xla", data__prefetch=3)
    chosen = perf.resolve_auto(config, lambda line: None)
    assert (config.model.attention, config.model.dense_backward, config.data.prefetch) == ("xla", "xla", 3)
    assert not set(chosen) & {"model.attention", "model.dense_backward", "data.prefetch"}


def test_below_the_start_of_a_run_a_config_still_holding_auto_is_refused(make_config, tmp_path):
    # "auto" is resolved once, in train.start; the library below it never resolves it again.
    from gptlab import experiment as experiment_lib

    config = make_config(model__attention="xla")
    with pytest.raises(UserError, match=r"^model\.dense_backward='auto' was not resolved .*--config\.model\.dense_backward"):
        train.run_experiment(config, tmp_path / "run", None, print, True)
    assert not (tmp_path / "run").exists()  # refused before the workdir is touched
    with pytest.raises(UserError, match=r"model\.dense_backward='auto'"):
        experiment_lib.training_model("auto", None)
    perf.resolve_auto(config, lambda line: None)
    perf.check_resolved(config)  # resolved: accepted


def test_cpu_device_count_before_the_backend_starts(make_config, monkeypatch):
    """The count JAX starts with: automatic, parallel.cpu_devices, or left to XLA_FLAGS."""
    updates, reuse_calls = [], []
    monkeypatch.setattr(perf, "_cpu_devices_choice", (None, ""))  # restored afterwards
    monkeypatch.setattr(perf, "_reuse_memory_choice", (None, ""))
    monkeypatch.setattr(heap, "reuse_freed_memory", lambda: reuse_calls.append(1) or True)
    monkeypatch.setattr(perf, "_backend_started", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    monkeypatch.setattr(perf, "usable_cores", lambda: 4)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    assert perf.start_cpu_devices(make_config())[0] == 4  # tiny: batch 8
    assert perf.start_cpu_devices(make_config(data__batch_size=6))[0] == 3
    assert perf.start_cpu_devices(make_config(parallel__cpu_devices=1)) == (1, "parallel.cpu_devices")
    assert updates == [("jax_num_cpu_devices", 4), ("jax_num_cpu_devices", 3), ("jax_num_cpu_devices", 1)]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert perf.start_cpu_devices(make_config())[0] is None and len(updates) == 3  # the environment's count stands
    with pytest.raises(UserError, match="parallel.cpu_devices=0"):
        perf.start_cpu_devices(make_config(parallel__cpu_devices=0))
    # The allocator: automatic (on here, a CPU-only Linux), or as parallel.cpu_reuse_memory says.
    assert perf._reuse_memory_choice[0] == perf.choose_reuse_memory()[0] is True
    assert len(reuse_calls) == 4
    perf.start_cpu_devices(make_config(parallel__cpu_reuse_memory=False))
    assert perf._reuse_memory_choice == (False, "parallel.cpu_reuse_memory") and len(reuse_calls) == 4


def test_memory_is_reused_only_where_jax_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(heap, "may_run_on_an_accelerator", lambda platforms: True)
    assert perf.choose_reuse_memory()[0] is False
    monkeypatch.setattr(heap, "may_run_on_an_accelerator", lambda platforms: False)
    assert perf.choose_reuse_memory()[0] is True  # Linux with glibc, as the test machines are
    monkeypatch.undo()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert heap.may_run_on_an_accelerator() is False


@pytest.mark.parametrize("platform_name,mode,machine,vendor,expected", [
    ("cpu", "jit", "x86_64", "GenuineIntel", "onednn"),
    ("cpu", "jit", "x86_64", "AuthenticAMD", "xla"),  # oneDNN's matmuls were no faster on an AMD EPYC
    ("cpu", "jit", "aarch64", "", "xla"),
    ("cpu", "pmap", "x86_64", "GenuineIntel", "xla"),  # jax.pmap takes no compile options
    ("gpu", "jit", "x86_64", "GenuineIntel", "xla"),  # the matmuls run on the device
])
def test_matmul_library_follows_the_cpu(monkeypatch, platform_name, mode, machine, vendor, expected):
    monkeypatch.setattr(perf.platform, "machine", lambda: machine)
    monkeypatch.setattr(perf, "cpu_info", lambda: {"model": "some CPU", "vendor": vendor, "flags": frozenset()})
    value, why = perf.choose_cpu_matmuls(platform_name, mode)
    assert value == expected and why


def test_a_bad_matmul_library_is_a_user_error(make_config):
    from gptlab import parallel as parallel_lib

    with pytest.raises(UserError, match="parallel.cpu_matmuls='mkl' must be one of 'xla', 'onednn'"):
        parallel_lib.Parallel(make_config(parallel__cpu_matmuls="mkl").parallel, 8, 1, lambda line: None)
    with pytest.raises(UserError, match="needs parallel.mode='jit'"):
        config = make_config(parallel__cpu_matmuls="onednn", parallel__mode="pmap")
        parallel_lib.Parallel(config.parallel, 8, 1, lambda line: None)


def _three_steps(config):
    from gptlab.benchmark import synthetic_train_step

    par, state, step, batches = synthetic_train_step(config, lambda line: None)
    losses = []
    for _ in range(3):
        state, metrics = step(state, next(batches))
        losses.append(float(metrics["train_loss"]))
    return par, losses


def test_onednn_matmuls_are_used_and_train_as_xlas_do(make_config):
    # The options reach XLA (a dot compiled with them is a oneDNN fusion), and a train step with
    # oneDNN's matmuls computes what XLA's own compute, to float32 rounding.
    x = jax.numpy.ones((64, 64))
    compiled = jax.jit(jax.numpy.dot, compiler_options=perf.CPU_MATMUL_OPTIONS["onednn"]).lower(x, x).compile()
    assert "__onednn_fusion" in compiled.as_text()
    assert "__onednn_fusion" not in jax.jit(jax.numpy.dot).lower(x, x).compile().as_text()
    onednn, onednn_losses = _three_steps(make_config(parallel__cpu_matmuls="onednn"))
    xla, xla_losses = _three_steps(make_config(parallel__cpu_matmuls="xla"))
    assert onednn.compile_options == perf.CPU_MATMUL_OPTIONS["onednn"] and xla.compile_options is None
    assert onednn_losses == pytest.approx(xla_losses, rel=1e-5)
    assert onednn_losses[-1] < onednn_losses[0]  # it trains


TCACHE_ON = "glibc.malloc.tcache_count=7"
# The pages of the 160 MB buffer below (40,000 of 4 KiB): the fault bounds are shares of it, whatever the page size.
# glibc's allocator decides what these tests see, so they run with CI's full suite (slow), not the quick one.
BUFFER_PAGES = 20000 * 2000 * 4 // os.sysconf("SC_PAGE_SIZE")  # glibc's default, set so that the shell's GLIBC_TUNABLES cannot change it

# Calls `step` (a jitted function with a 160 MB intermediate, the first product, in XLA's temporary
# buffer, as a train step's activations are) 20 times and prints the page faults of a steady call:
# the median of the last ten. A call now and then still faults, where small allocations have split
# the freed block and the heap grows once more; the growth stops.
_FAULTS_PER_CALL = """
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)
step = wrap(f)
x, w, v = jnp.ones((20000, 64)), jnp.ones((64, 2000)), jnp.ones((2000, 8))
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x, w, v).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[10:])[5])
"""
_PAGE_FAULTS_PER_CALL = """
import sys
from gptlab import heap
if sys.argv[1] == "reuse":
    assert heap.reuse_freed_memory()
wrap = lambda f: f
""" + _FAULTS_PER_CALL


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reuse", "default"])
def test_reused_memory_stops_each_step_from_faulting_its_buffers_in_again(mode):
    # What parallel.cpu_reuse_memory is for: without it, glibc unmaps XLA's large per-call buffer
    # and every call faults its 40,000 pages in again; with it, most calls reuse a freed buffer.
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS_PER_CALL, mode], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": TCACHE_ON}, timeout=300)
    assert out.returncode == 0, out.stderr
    faults = int(out.stdout.split()[-1])
    if mode == "reuse":
        assert faults < BUFFER_PAGES / 20
    else:
        assert faults > BUFFER_PAGES / 2


_LIMITED_REUSE = """
import sys
from gptlab import heap, perf
perf.REUSE_MEMORY_MAX_TEMP_MB = int(sys.argv[1])
explicit = sys.argv[2] == "explicit"
heap.KEPT_BYTES_MAX = int(sys.argv[3]) << 20
perf._reuse_memory_choice = (heap.reuse_freed_memory(), perf.EXPLICIT_REUSE if explicit else "automatic")


def wrap(f):
    step = lambda *args: f(*args)
    step.compiled = lambda *args: f.lower(*args).compile()
    return perf.limit_reuse_memory(step, log=lambda line: print(line, file=sys.stderr))
""" + _FAULTS_PER_CALL + """
print(perf.reuse_memory_choice()[0])
"""


@pytest.mark.slow
@pytest.mark.parametrize("tcache, limit_mb, kept_max_mb, choice, kept", [
    (TCACHE_ON, 256, 2048, "automatic", True), (TCACHE_ON, 100, 2048, "automatic", False),
    (TCACHE_ON, 100, 2048, "explicit", True),
    (heap.TCACHE_OFF, 100, 2048, "automatic", True), (heap.TCACHE_OFF, 256, 100, "automatic", False)])
def test_automatic_reuse_is_undone_for_a_step_whose_temporaries_would_fragment_the_heap(tcache, limit_mb, kept_max_mb,
                                                                                         choice, kept):
    # With glibc's tcache on, a kept heap grew by a whole block every few steps above the limit (README): the
    # automatic choice is undone before the first step runs, so every call maps its block afresh; an explicit
    # True stays. A process started with the tcache off (as `python -m experiments.NAME` restarts) keeps it up
    # to what the heap keeps at all (heap.KEPT_BYTES_MAX; one device here).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", GLIBC_TUNABLES=tcache)
    out = subprocess.run([sys.executable, "-c", _LIMITED_REUSE, str(limit_mb), choice, str(kept_max_mb)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    faults, still_on = out.stdout.split()[-2:]
    assert still_on == str(kept)
    # Undone: every call faults its 40,000 pages in again. Kept: most calls fault none (with the tcache on,
    # now and then a call grows the heap by a block, so the bound is on the median call).
    assert (int(faults) < BUFFER_PAGES / 2) if kept else (int(faults) > BUFFER_PAGES / 2), faults
    undone = "parallel.cpu_reuse_memory=False from the first step (the compiled train step's temporaries are 153 MB a device, above the 100 MB"
    assert (undone in out.stderr) != kept


@pytest.mark.slow
def test_with_glibcs_tcache_off_the_freed_block_is_reused_from_the_second_call():
    # The tcache kept the slivers posix_memalign splits off beside each block, so freed blocks did not merge
    # and the heap grew by a block on several of the first calls (4 and 5 more blocks in two runs; gptlab/heap.py).
    # With it off, the first call maps its 40,000 pages and the heap settles: the 19 calls after it faulted no more
    # block in most runs, at most two (in 1 of 14 runs), so the bound is fewer than 2.5 blocks' pages in all.
    script = _PAGE_FAULTS_PER_CALL.replace("print(sorted(faults[10:])[5])", "print(*faults)")
    out = subprocess.run([sys.executable, "-c", script, "reuse"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": heap.TCACHE_OFF})
    assert out.returncode == 0, out.stderr
    faults = [int(f) for f in out.stdout.split()[-20:]]
    assert faults[0] > BUFFER_PAGES / 2 and sum(faults[1:]) < 2.5 * BUFFER_PAGES, faults


_RESTART = """
import os, sys
from gptlab import heap
print(repr(os.environ.get("GLIBC_TUNABLES")), sys.argv[1:], flush=True)
heap.restart_with_tcache_off()
"""


@pytest.mark.parametrize("tunables, runs", [
    (None, [None, heap.TCACHE_OFF]),
    ("glibc.malloc.arena_max=4", ["glibc.malloc.arena_max=4", "glibc.malloc.arena_max=4:" + heap.TCACHE_OFF]),
    (TCACHE_ON, [TCACHE_ON])])  # the user's own choice of the tcache stands
def test_an_entry_point_restarts_once_with_glibcs_tcache_off(tunables, runs):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", heap.BEFORE_RESTART)}
    env = {**env, "JAX_PLATFORMS": "cpu", **({"GLIBC_TUNABLES": tunables} if tunables else {})}
    out = subprocess.run([sys.executable, "-c", _RESTART, "--flag=1"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    # Each line is one run of the same command: same arguments, the variable added once, no second restart.
    assert out.stdout.splitlines() == [f"{value!r} ['--flag=1']" for value in runs]


def test_the_benchmarks_peers_start_without_the_restarts_setting(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", heap.TCACHE_OFF)
    monkeypatch.setenv(heap.BEFORE_RESTART, "")  # unset before the restart
    with heap.environment_as_started():
        assert "GLIBC_TUNABLES" not in os.environ and heap.BEFORE_RESTART not in os.environ
    assert os.environ["GLIBC_TUNABLES"] == heap.TCACHE_OFF
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4:" + heap.TCACHE_OFF)
    monkeypatch.setenv(heap.BEFORE_RESTART, "glibc.malloc.arena_max=4")
    with heap.environment_as_started():
        assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4:" + heap.TCACHE_OFF


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = iter([0.123, 0.456])
    monkeypatch.setattr(peak_lib, "measured_matmul_tflops", lambda: next(measured))
    monkeypatch.setattr(peak_lib, "cpu_share_of_others", lambda measure: (measure(), 0.0))  # an idle machine
    peak_lib.cpu_peak_tflops.cache_clear()
    try:
        first, source = peak_lib.cpu_peak_tflops()
        peak_lib.cpu_peak_tflops.cache_clear()  # a new process
        again, cached_source = peak_lib.cpu_peak_tflops()
    finally:
        peak_lib.cpu_peak_tflops.cache_clear()
    assert first == again == 0.123
    assert "measured" in source and str(tmp_path) in cached_source
    assert (tmp_path / "gptlab" / "cpu_peak_tflops.json").is_file()


def test_a_peak_measured_while_other_processes_were_busy_is_not_used_nor_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # (TFLOP/s, others' share of the CPU meanwhile): the idle probe, a disturbed measurement; then an idle one.
    measurements = iter([(None, 0.0), (0.132, 0.45), (None, 0.0), (0.187, 0.02)])
    monkeypatch.setattr(peak_lib, "cpu_share_of_others", lambda measure: next(measurements))
    peak_lib.cpu_peak_tflops.cache_clear()
    try:
        busy, busy_source = peak_lib.cpu_peak_tflops()
        peak_lib.cpu_peak_tflops.cache_clear()  # the next run measures again
        idle, idle_source = peak_lib.cpu_peak_tflops()
        peak_lib.cpu_peak_tflops.cache_clear()
        cached, _ = peak_lib.cpu_peak_tflops()
    finally:
        peak_lib.cpu_peak_tflops.cache_clear()
    assert busy == peak_lib.estimated_cpu_peak()[0] and "discarded, other processes took 45% of the CPU" in busy_source
    assert idle == cached == 0.187 and str(tmp_path) in idle_source


def test_the_cpu_time_other_processes_take_during_a_measurement_is_counted(monkeypatch):
    # The machine's CPU seconds (/proc/stat) count what a child burned: a lower bound, whatever the load.
    before = peak_lib._machine_cpu_seconds()
    child = subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                            "while time.process_time() - t < 0.5: pass"], timeout=120)
    after = peak_lib._machine_cpu_seconds()
    assert child.returncode == 0
    assert after - before >= 0.5 - 2 / os.sysconf("SC_CLK_TCK")  # the child's 0.5 s, to the kernel's ticks
    # The share: others' CPU seconds over the wall time times the CPUs, from a clock and counters set here.
    clock = iter([100.0, 102.0])  # perf_counter: a 2 s measurement
    own = iter([10.0, 11.5])  # this process's CPU seconds: 1.5 of them
    machine = iter([1000.0, 1004.3])  # everybody's: 4.3
    monkeypatch.setattr(peak_lib, "time", types.SimpleNamespace(perf_counter=lambda: next(clock),
                                                            process_time=lambda: next(own)))
    monkeypatch.setattr(peak_lib, "_machine_cpu_seconds", lambda: next(machine))
    monkeypatch.setattr(peak_lib.os, "cpu_count", lambda: 2)
    result, share = peak_lib.cpu_share_of_others(lambda: "done")
    assert result == "done" and share == pytest.approx((4.3 - 1.5) / (2.0 * 2))
    # Under a second of wall time, or no /proc/stat: too little to tell, 0.
    clock, own = iter([0.0, 0.5]), iter([0.0, 0.0])
    monkeypatch.setattr(peak_lib, "_machine_cpu_seconds", lambda: 5.0)
    assert peak_lib.cpu_share_of_others(lambda: 1) == (1, 0.0)
    clock, own = iter([0.0, 2.0]), iter([0.0, 0.0])
    monkeypatch.setattr(peak_lib, "_machine_cpu_seconds", lambda: None)
    assert peak_lib.cpu_share_of_others(lambda: 1) == (1, 0.0)


def test_measured_peak_keeps_sampling_for_the_time_asked(monkeypatch):
    # A short window under-measures the peak on a shared machine: the best is taken over min_seconds.
    # A clock that moves 10 ms a reading: every timed matmul takes 10 ms, and the loop must read it past 0.3 s.
    now = [0.0]

    def perf_counter():
        now[0] += 0.01
        return now[0]

    monkeypatch.setattr(peak_lib, "time", types.SimpleNamespace(perf_counter=perf_counter))
    tflops = peak_lib.measured_matmul_tflops(sizes=(64,), min_repeats=3, min_seconds=0.3)
    assert tflops == pytest.approx(2 * 64**3 / 0.01 / 1e12)
    assert now[0] >= 0.3  # sampled for at least min_seconds of its clock


def test_mfu_peak_on_a_cpu_is_the_cpus_whatever_the_device_split():
    assert peak_lib.total_peak_tflops(0.5) == (0.5, "config train.peak_tflops")


def test_profile_steps_write_a_trace(make_config, tmp_path):
    config = make_config(train__num_steps=4, train__profile_steps=(2, 3), train__eval_every=4,
                         train__checkpoint_every=4)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


@pytest.mark.parametrize("steps", [(3,), (0, 2), (5, 4)])
def test_bad_profile_steps_are_user_errors(make_config, tmp_path, steps):
    with pytest.raises(UserError, match="train.profile_steps"):
        train.train_and_evaluate(make_config(train__profile_steps=steps), str(tmp_path / "run"))


def test_step_kernels_tool_lists_where_the_step_time_goes(capsys, monkeypatch, tmp_path):
    # dev/step_kernels.py reads the kernels back from the trace without TensorBoard (a bare GPU
    # machine has none): a line per kernel with its time a step, and the trace kept.
    import glob
    import re

    monkeypatch.setenv("TRACE_DIR", str(tmp_path))
    tool = _tool("step_kernels.py")
    tool["main"]("tiny", 2, 5)
    out = capsys.readouterr().out
    assert re.search(r"^tiny: [\d.]+ ms a step", out, re.M)
    kernels = re.findall(r"^\s+([\d.]+) ms\s+[\d.]+%  (.+)$", out, re.M)
    assert 1 <= len(kernels) <= 5 and all(float(ms) >= 0 for ms, _ in kernels)
    assert glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)


def _tool(name):
    """A script of dev/ as a dict of its globals (it is not a package)."""
    import runpy

    return runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "dev", name))


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_fused_cross_entropy_equals_optax_in_value_and_gradient(dtype, tolerance):
    # dev/loss_ab.py's fused variant computes the logits' gradient in the forward pass; a GPU
    # measurement of it means something only if it is the same loss with the same gradient.
    import jax.numpy as jnp
    import numpy as np
    import optax

    fused = _tool("loss_ab.py")["fused_cross_entropy"]
    logits = (3 * jax.random.normal(jax.random.key(0), (2, 5, 11))).astype(dtype)
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    weights = jax.random.uniform(jax.random.key(2), (2, 5))  # a non-uniform cotangent per token
    reference = lambda z: jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(
        z.astype(jnp.float32), targets))
    ours = lambda z: jnp.sum(weights * fused(z, targets))
    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
    got, want = jax.grad(ours)(logits), jax.grad(reference)(logits)
    assert got.dtype == logits.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance)


def test_loss_ab_tool_times_each_variant_after_checking_they_agree(capsys):
    import re

    _tool("loss_ab.py")["main"]("tiny", 2, 1)
    out = capsys.readouterr().out
    rows = re.findall(r"^(\w+)\s+first loss ([\d.]+), gradient's largest difference from optax's ([\d.e+-]+); "
                      r"median step [\d.]+ ms, [\d,]+ tokens/s, MFU [\d.]+; .* per block: \[(.*)\]$", out, re.M)
    assert [name for name, *_ in rows] == ["optax", "f32_logits", "fused"]
    assert len({loss for _, loss, _, _ in rows}) == 1  # float32 on the CPU: the same loss
    assert all(float(difference) < 1e-5 for _, _, difference, _ in rows)
    assert all(len(blocks.split(",")) == 2 for *_, blocks in rows)


def test_step_breakdown_puts_each_xla_op_in_its_component():
    # dev/step_breakdown.py compares gptlab's step with PyTorch's by component: an op filed under
    # the wrong one would point the next speed work at the wrong place.
    component = _tool("step_breakdown.py")["xla_component"]
    cases = {
        ("onednn_fusion.3", "jit(train_step)/jvp(GPT)/blocks_0/mlp/fc/dot_general"): "dense matmuls",
        ("transpose_copy_fusion.2", "jit(train_step)/transpose(jvp(GPT))/blocks_5/attn/qkv/transpose"): "dense matmuls",
        ("onednn_fusion.9", "jit(train_step)/jvp(GPT)/wte/dot_general"): "dense matmuls",
        ("ynn_fusion.138", "jit(train_step)/jvp(GPT)/blocks_0/attn/reduce_max"): "attention",
        ("onednn_fusion.7", "jit(train_step)/transpose(jvp(GPT))/blocks_1/attn/hbts,hbtd->hbsd/dot_general"): "attention",
        ("multiply_tanh_fusion", "jit(train_step)/jvp(GPT)/blocks_3/mlp/tanh"): "GELU",
        ("ynn_fusion.25", "jit(train_step)/transpose(jvp(GPT))/blocks_2/ln_2/reduce_sum"): "LayerNorm",
        ("multiply_add_fusion.82", "jit(train_step)/add"): "optimizer",
        ("subtract_exponential_fusion", "jit(train_step)/jvp()/exp"): "other ops",
        ("all-reduce.41", ""): "waiting for devices",
    }
    assert {key: component(*key) for key in cases} == cases


def test_step_breakdown_tool_prints_both_steps_by_component(capsys):
    import re

    from conftest import needs

    needs("torch", "bench")
    tool = _tool("step_breakdown.py")
    tool["main"]("tiny", 1)
    out = capsys.readouterr().out
    rows = dict((name, (float(ours), float(peer))) for name, ours, peer in
                re.findall(r"^\| \**([^|*]+?)\** \| \**(-?[\d.]+)\** \| \**(-?[\d.]+)\** \|$", out, re.M))
    assert list(rows) == [*tool["COMPONENTS"], "wall time a step"]
    assert rows["dense matmuls"][0] > 0 and rows["dense matmuls"][1] > 0
    assert all(ours >= 0 and peer >= 0 for name, (ours, peer) in rows.items() if name != "rest of the wall time")


def test_step_memory_tool_prints_each_steps_faults_and_resident_memory(capsys):
    # dev/step_memory.py is how the README's cpu_reuse_memory figures were measured.
    import re

    _tool("step_memory.py")["main"]("tiny", 3, "off")
    out = capsys.readouterr().out
    steps = re.findall(r"^step +(\d+) +[\d.]+ s  page faults +(\d+)  resident (\d+) MB$", out, re.M)
    assert [int(step) for step, _, _ in steps] == [0, 1, 2] and all(int(mb) > 0 for *_, mb in steps)
    assert re.search(r"^tiny, cpu_reuse_memory off: steps 1-2: mean [\d.]+ s, median [\d.]+ s; \d of 2 faulted$",
                     out, re.M)
