"""How the one pure train/eval step is compiled, and where the train state lives.

`parallel.mode` picks the compilation of the *same* step functions:

- `jit` (default): `jax.jit` over a `jax.make_mesh` mesh with axes (`data`, `fsdp`).
  Batches are split over both axes (FSDP shards parameters, not work); parameters
  and optimizer state are replicated over `data` and, when `fsdp > 1`, sharded over
  `fsdp` along their largest dimension divisible by it (a leaf with no such
  dimension is replicated, and said so at start-up). The axes are `Auto`: the
  model code stays free of sharding annotations and XLA inserts the all-gathers
  and reduce-scatters FSDP needs.
- `pmap`: classic data parallelism over the local devices with `jax.pmap`; the
  step sums losses and gradients with `lax.psum` over the `batch` axis (sums
  divided by the global count: the mean over the global batch, as `pmean` of
  equal shards would give) and the state is replicated on every device.

Either way checkpoints hold one unreplicated copy, so a run saved under one mode
resumes under the other. Each process feeds only its own rows of every global
batch (`WindowBatches` splits them by process index), assembled with
`jax.make_array_from_process_local_data` under `jit`.
"""
import contextlib
import os
import socket
import time

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from gptlab import model as model_lib
from gptlab import perf
from gptlab.errors import UserError
from gptlab.optim import path_str

MODES = ("jit", "pmap")
PMAP_AXIS = "batch"


def initialize_distributed(parallel_cfg, log=print) -> None:
    """Joins a multi-process run before anything touches devices.

    Explicit: `parallel.coordinator_address`, `num_processes`, `process_id`.
    Detected: a SLURM job with several tasks, an Open MPI launch, or a TPU pod
    slice (JAX's own cluster detection fills in the addresses).
    """
    explicit = (parallel_cfg.coordinator_address, parallel_cfg.num_processes, parallel_cfg.process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise UserError("set all of parallel.coordinator_address, parallel.num_processes and parallel.process_id "
                        "(or none, to rely on cluster detection)")
    detected = (int(os.environ.get("SLURM_NTASKS", "1")) > 1
                or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
    if explicit[0] is None and not detected:
        return
    kwargs = dict(initialization_timeout=parallel_cfg.initialization_timeout)
    if explicit[0] is not None:
        kwargs.update(coordinator_address=explicit[0], num_processes=explicit[1], process_id=explicit[2])
        if explicit[2] != 0:  # process 0 hosts the coordinator; the others must reach it
            _wait_for_coordinator(explicit[0], parallel_cfg.initialization_timeout)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # pylint: disable=broad-except
        where = explicit[0] or "the detected cluster's coordinator"
        raise UserError(f"cannot join the distributed run at {where} within "
                        f"parallel.initialization_timeout={parallel_cfg.initialization_timeout}s "
                        f"({str(e).splitlines()[0][:200]}): check the address and port, and that process 0 "
                        "is running") from None
    log(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices")


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Fails in one line when the coordinator cannot be reached.

    JAX aborts the whole process (a C++ fatal error, not an exception) when its
    connection deadline passes, so the reachability check is done here first.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"parallel.coordinator_address={address!r} must look like host:port")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(f"cannot reach the coordinator at {address} within parallel.initialization_timeout="
                                f"{timeout}s ({e.strerror or e}): check the address and port, and that process 0 "
                                "is running") from None
            time.sleep(0.5)


def fsdp_spec(shape, fsdp: int) -> P:
    """Shards the largest dimension divisible by `fsdp`; replicates when there is none."""
    if fsdp == 1:
        return P()
    candidates = [(size, dim) for dim, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, dim = max(candidates)
    return P(*([None] * dim + ["fsdp"]))


class Parallel:
    """Places the train state and batches, and compiles the step functions, for one mode."""

    def __init__(self, parallel_cfg, batch_size: int, grad_accum_steps: int, log=print):
        self.mode = parallel_cfg.mode
        self.log = log
        if self.mode not in MODES:
            raise UserError(f"parallel.mode={self.mode!r} is not one of {MODES}")
        # XLA compile options of the steps: which library runs a CPU step's matmuls (gptlab/perf.py).
        self.compile_options = perf.matmul_compile_options(parallel_cfg.get("cpu_matmuls", "xla") or "xla")
        if self.compile_options and self.mode != "jit":
            raise UserError(f"parallel.cpu_matmuls={parallel_cfg.cpu_matmuls!r} needs parallel.mode='jit' "
                            "(jax.pmap takes no compile options): use --config.parallel.cpu_matmuls=xla with pmap")
        num_devices = jax.device_count()
        if self.mode == "jit":
            data, fsdp = tuple(parallel_cfg.mesh)
            if data == -1 and fsdp > 0 and num_devices % fsdp == 0:
                data = num_devices // fsdp
            if data < 1 or fsdp < 1 or data * fsdp != num_devices:
                raise UserError(f"parallel.mesh={tuple(parallel_cfg.mesh)} (data, fsdp) needs {data * fsdp} devices "
                                f"but {num_devices} are available: make data*fsdp equal {num_devices} "
                                "(data=-1 takes what fsdp leaves)")
            self.mesh = jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))
            self.fsdp = fsdp
            self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
            self.replicated = NamedSharding(self.mesh, P())
        else:
            self.local_devices = jax.local_devices()
            self.mesh = None
        shards = num_devices  # the batch is split over every device in both modes
        if batch_size % (shards * grad_accum_steps):
            raise UserError(f"data.batch_size={batch_size} must be divisible by the {shards} devices x "
                            f"train.grad_accum_steps={grad_accum_steps}: choose a multiple of "
                            f"{shards * grad_accum_steps}")
        log(f"parallel: {self.mode} over {num_devices} device(s)"
            + (f", mesh data={self.mesh.shape['data']} fsdp={self.mesh.shape['fsdp']}" if self.mesh else ""))

    # -- state -----------------------------------------------------------------

    def _state_shardings(self, abstract_state):
        """NamedShardings for a TrainState: FSDP rule on params and optimizer state."""
        replicated_leaves = []

        def rule(path, leaf):
            spec = fsdp_spec(leaf.shape, self.fsdp)
            if self.fsdp > 1 and spec == P() and leaf.ndim > 0:
                replicated_leaves.append(f"{path_str(path)} {tuple(leaf.shape)}")
            return NamedSharding(self.mesh, spec)

        shardings = abstract_state.replace(
            step=self.replicated, rng=self.replicated,
            params=jax.tree_util.tree_map_with_path(rule, abstract_state.params),
            opt_state=jax.tree.map(lambda leaf: NamedSharding(self.mesh, fsdp_spec(leaf.shape, self.fsdp)),
                                   abstract_state.opt_state))
        if replicated_leaves:
            self.log(f"parallel: fsdp={self.fsdp} divides no dimension of {len(replicated_leaves)} parameter(s), "
                     f"replicated instead: {', '.join(replicated_leaves[:6])}"
                     + (" ..." if len(replicated_leaves) > 6 else ""))
        return shardings

    def init_state(self, make_state):
        """Builds the state with `make_state()` directly in its final placement.

        Under `jit` it is created sharded (a model too large for one device never
        exists whole); under `pmap` it is built once and replicated.
        """
        if self.mode == "jit":
            self.state_shardings = self._state_shardings(jax.eval_shape(make_state))
            with jax.set_mesh(self.mesh):
                return jax.jit(make_state, out_shardings=self.state_shardings)()
        return self._replicate(make_state())

    def abstract_state(self, state):
        """What a checkpoint restores into: sharded under `jit`, one host copy under `pmap`."""
        if self.mode == "jit":
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        return jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), state)

    def place_restored(self, state):
        return state if self.mode == "jit" else self._replicate(state)

    def checkpointable(self, state):
        """One unreplicated copy: sharded arrays under `jit`, host arrays of replica 0 under `pmap`."""
        if self.mode == "jit":
            return state
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], state)

    def _replicate(self, tree):
        devices = self.local_devices
        sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), (PMAP_AXIS,)), P(PMAP_AXIS))
        return jax.tree.map(
            lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), sharding), tree)

    # -- batches and steps -------------------------------------------------------

    def place_batch(self, local_batch: dict) -> dict:
        if self.mode == "jit":  # arrays already placed (by `prefetch_place`) pass through
            return {k: v if isinstance(v, jax.Array) else jax.make_array_from_process_local_data(self.batch_sharding, v)
                    for k, v in local_batch.items()}
        n = len(self.local_devices)
        return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in local_batch.items()}

    def prefetch_place(self, local_batch: dict) -> dict:
        """What a prefetching thread does ahead of the step: the device transfer under `jit`.

        Under `pmap` the host batch is kept as is; the pmapped step shards it when called.
        """
        return self.place_batch(local_batch) if self.mode == "jit" else local_batch

    def compile(self, make_train_step, make_eval_step):
        """Compiles `make_train_step(axis_name)` and `make_eval_step(axis_name)` for this mode.

        Call after `init_state`, whose shardings the compiled steps keep.

        Returns functions that take host batches (this process's rows) and
        return metrics that `fetch` brings to the host. The train step's `compiled(state, batch)`
        is the XLA executable its calls run (e.g. for its `memory_analysis()`).
        """
        if self.mode == "jit":
            # Fixed in/out shardings: the state keeps its layout from step to step (no recompiles).
            state_sh, batch_sh, replicated = self.state_shardings, self.batch_sharding, self.replicated
            train_step = jax.jit(make_train_step(None), in_shardings=(state_sh, batch_sh),
                                 out_shardings=(state_sh, replicated), donate_argnums=0,
                                 compiler_options=self.compile_options)
            eval_step = jax.jit(make_eval_step(None), in_shardings=(state_sh.params, batch_sh),
                                out_shardings=replicated, compiler_options=self.compile_options)

            # oneDNN executables never go to the persistent compilation cache: XLA cannot serialise them
            # (perf.no_persistent_cache).
            uncached = (perf.no_persistent_cache if (self.compile_options or {}).get("xla_cpu_use_onednn")
                        else contextlib.nullcontext)

            def run_train(state, batch):
                with jax.set_mesh(self.mesh), uncached():
                    return train_step(state, self.place_batch(batch))

            def run_eval(params, batch):
                with jax.set_mesh(self.mesh), uncached():
                    return eval_step(params, self.place_batch(batch))

            def compile_train(state, batch):
                with jax.set_mesh(self.mesh), uncached():
                    return train_step.lower(state, self.place_batch(batch)).compile()

            run_train.jitted = train_step  # for tools that compile it with other options (dev/compile_options_ab.py)
            run_train.compiled = compile_train  # the executable a call runs (compiled once: jit's cache is shared)
            return run_train, run_eval
        train_step = jax.pmap(make_train_step(PMAP_AXIS), axis_name=PMAP_AXIS, donate_argnums=0)
        eval_step = jax.pmap(make_eval_step(PMAP_AXIS), axis_name=PMAP_AXIS)
        first = lambda tree: jax.tree.map(lambda x: x.addressable_shards[0].data.reshape(x.shape[1:]), tree)

        def run_train(state, batch):
            state, metrics = train_step(state, self.place_batch(batch))
            return state, first(metrics)  # psum made every replica's metrics equal

        run_train.compiled = lambda state, batch: train_step.lower(state, self.place_batch(batch)).compile()
        return run_train, lambda params, batch: first(eval_step(params, self.place_batch(batch)))


def describe_shardings(state) -> str:
    """`path: spec` for every sharded parameter (for logs and tests)."""
    lines = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        spec = getattr(leaf.sharding, "spec", None)
        if spec and any(s is not None for s in spec):
            lines.append(f"{model_lib.any_layer(path_str(path))}: {spec}")
    return "\n".join(sorted(set(lines)))
