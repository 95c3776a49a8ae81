"""Orbax checkpoints under WORKDIR/checkpoints/, with the current `args=` API.

Each step directory holds the train state's arrays (`state`, StandardSave) and,
as JSON beside them, the data iterator's position (`data`), the resolved config
(`config`), the tokenizer (`tokenizer`) and a fingerprint of every array
(`integrity`), so a checkpoint is self-describing (fine-tuning, sampling and
evaluation need nothing else) and self-checking. `selection` (gptlab.selection)
holds the early-stopping record: best step, its validation metrics, patience.

The best checkpoint: steps saved with `metrics` (evaluations) are ranked by
Orbax itself (`best_fn`/`best_mode`, and a preservation policy that keeps the
latest `max_to_keep` steps plus the best one), so the best survives rotation.
`best_step(directory)` finds it for readers (`best` in evaluate, sample, init_from).

Safety: Orbax writes a step into `STEP.orbax-checkpoint-tmp` and renames it only
when complete, so a run killed mid-save leaves a temporary directory that is
ignored and removed at the next start. A restored state whose arrays do not
match the fingerprints taken at save time (a truncated or altered file), or a
step whose metadata cannot be read, raises `CorruptCheckpoint`.

Every read goes through one `Reader`: the writer's own resume, fine-tuning's
init_from, evaluation, sampling, export and the report. A reader never creates,
cleans or deletes anything under the checkpoint directory (no CheckpointManager:
its start-up cleans in-progress saves, which kills a live writer's save), and it
pins the step it reads (see `Reader`), so the writer's rotation cannot pull the
step away mid-read.
"""
import errno
import gc
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gptlab import selection
from gptlab.errors import UserError
from gptlab.optim import path_str

JSON_ITEMS = ("data", "config", "tokenizer", "integrity")
# Absent in older checkpoints: `selection` before early stopping existed, `progress` (the run's tokens_seen and
# the training losses since its last logged step, see train.start_and_run) before resumes kept them.
OPTIONAL_JSON_ITEMS = ("selection", "progress")


class CorruptCheckpoint(Exception):
    """A checkpoint step exists but cannot be trusted; `step` and `path` say which."""

    def __init__(self, step: int, path, reason: str):
        super().__init__(f"checkpoint step {step} at {path} is damaged: {reason}")
        self.step, self.path = step, path


@jax.jit
def fingerprint(tree):
    """One uint32 per leaf: the sum of its raw bits times odd position weights, mod 2**32.

    Any change to a single element changes the sum (odd weights are invertible
    mod 2**32). Computed on device, so sharded and multi-host states need no gather.
    """

    def leaf_print(x):
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:  # e.g. optax.apply_if_finite's state; bools have no bitcast
            x = x.astype(jnp.uint8)
        bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        raw = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).ravel()
        weights = (jnp.arange(raw.size, dtype=jnp.uint32) * jnp.uint32(2654435761)) | jnp.uint32(1)
        return jnp.sum(raw * weights, dtype=jnp.uint32)

    return [leaf_print(x) for x in jax.tree.leaves(tree)]


def first_mismatch(expected: dict, tree, checked=lambda path: True):
    """The first path of `tree` whose fingerprint differs from `expected[path]`, or None.

    Paths absent from `expected`, or for which `checked(path)` is false, are not compared.
    """
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    for path, value in zip(paths, jax.device_get(fingerprint(tree))):
        if path in expected and checked(path) and expected[path] != int(value):
            return path
    return None


def _fingerprints(state) -> dict:
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    return dict(zip(paths, (int(v) for v in jax.device_get(fingerprint(state)))))


def best_options(metric: str, max_to_keep: int) -> dict:
    """CheckpointManagerOptions fields that rank steps by `metric` and keep the best beside the latest."""
    best_mode = "max" if selection.higher_is_better(metric) else "min"
    get_metric = lambda metrics: metrics[metric]
    keep = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max_to_keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=get_metric, reverse=best_mode == "min", n=1,
                                      keep_checkpoints_without_metrics=False)])
    return dict(best_fn=get_metric, best_mode=best_mode, preservation_policy=keep)


def complete_steps(directory) -> list:
    """The finished steps under a checkpoint directory, ascending (none: [], also when it does not exist).

    Orbax writes a step into `STEP.orbax-checkpoint-tmp*` and renames it to `STEP` only when
    every item is written, so a directory named by a number holds a finished step.
    """
    try:
        return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit() and (p / "state").is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _item_handlers(state_handler) -> dict:
    # Naming each item's handler lets a fresh process read metadata and single items.
    return {"state": state_handler, **{k: ocp.JsonCheckpointHandler() for k in JSON_ITEMS + OPTIONAL_JSON_ITEMS}}


class Reader:
    """One finished step of a checkpoint directory, opened read-only; `step` says which was read.

    Nothing under the directory is ever created, cleaned or deleted: steps are read with a
    plain Orbax Checkpointer, never a CheckpointManager (whose start-up removes in-progress
    saves, which fails the save a live run is writing).

    `step=None` reads the newest finished step. With `pin=True` (every reader except the
    writer's own resume) the step is first pinned: its files are hard-linked into a private
    temporary directory (copied when that is on another filesystem) and everything is read
    from there. Orbax never changes a finished step's files, it only deletes whole steps when
    it rotates them out (checkpoint.max_to_keep), and a hard link keeps a deleted file's data,
    so a pinned step stays whole however long the reader holds it (fine-tuning reads its
    parameters minutes after choosing the step), at the cost of one link per file and no copy.
    A pin that raced a deletion (the step's file list changed or it vanished while being
    linked) is dropped and the newest finished step is pinned instead; a step asked for by
    number that rotation removed is an error naming the steps left. Integrity: every array
    read is checked against the fingerprints recorded at save time (`CorruptCheckpoint`).
    """

    PIN_ATTEMPTS = 5

    def __init__(self, directory, step=None, pin: bool = True):
        self.directory = pathlib.Path(directory).expanduser().absolute()
        self._pin_root = None
        for _ in range(self.PIN_ATTEMPTS):
            steps = complete_steps(self.directory)
            chosen = step if step is not None else (steps[-1] if steps else None)
            if chosen is None or chosen not in steps:
                have = f"finished steps: {steps}" if steps else "it holds no finished step"
                raise UserError(f"{self.directory} has no checkpoint at step {chosen} ({have}): "
                                "choose one of those steps" if chosen is not None else
                                f"{self.directory} has no checkpoint ({have})")
            self.step = int(chosen)
            self.source = self.directory / str(self.step)  # the step as its run wrote it
            if not pin:
                self.path = self.source
                break
            self.path = self._pin(self.source)
            if self.path is not None:
                break
            if step is not None:
                raise UserError(f"checkpoint step {step} in {self.directory} was deleted by its run's rotation "
                                f"(checkpoint.max_to_keep) while being read; finished steps now: "
                                f"{complete_steps(self.directory)}: choose one of those")
        else:
            raise UserError(f"{self.directory} rotated its checkpoints faster than they could be read "
                            f"({self.PIN_ATTEMPTS} attempts): retry, or read a stopped run")
        try:
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_item_handlers(ocp.StandardCheckpointHandler()))) as c:
                self.stored = dict(c.metadata(self.path).item_metadata["state"])  # the state's tree of array metadata
            items = self._restore(ocp.StandardCheckpointHandler(), {k: ocp.args.JsonRestore() for k in JSON_ITEMS})
        except Exception as e:  # pylint: disable=broad-except  (missing or unparsable files)
            self.close()
            raise CorruptCheckpoint(self.step, self.source, f"its metadata cannot be read ({_first_line(e)})") from None
        self.data, self.config, self.tokenizer = items["data"], items["config"], items["tokenizer"]
        self.fingerprints = (items.get("integrity") or {}).get("fingerprints")
        self.selection = None  # the early-stopping record (gptlab.selection); absent in older checkpoints
        self.progress = None  # the run's bookkeeping (tokens_seen, unlogged losses); absent in older checkpoints
        for item in OPTIONAL_JSON_ITEMS:
            if not (self.path / item).exists():
                continue
            try:
                setattr(self, item, self._restore(ocp.StandardCheckpointHandler(),
                                                  {item: ocp.args.JsonRestore()})[item])
            except Exception as e:  # pylint: disable=broad-except
                self.close()
                raise CorruptCheckpoint(self.step, self.source, f"its {item} cannot be read ({_first_line(e)})") from None
        if not self.fingerprints:
            self.close()
            raise CorruptCheckpoint(self.step, self.source, "its integrity record is missing")

    def _pin(self, source: pathlib.Path):
        """Links (or copies) the files of `source` into a fresh private directory; None if a deletion raced it."""
        if self._pin_root is None:
            remove_dead_pins()
            self._pin_root = pathlib.Path(tempfile.mkdtemp(prefix=f"{PIN_PREFIX}{os.getpid()}@{socket.gethostname()}."))
        target = self._pin_root / source.name
        shutil.rmtree(target, ignore_errors=True)

        def listing():
            return sorted(str(p.relative_to(source)) for p in source.rglob("*") if not p.is_dir())

        try:
            before = listing()
            for name in before:
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source / name, target / name)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    shutil.copy2(source / name, target / name)  # another filesystem: a private copy
            if listing() != before:  # files disappeared meanwhile: rotation is deleting this step
                return None
        except FileNotFoundError:
            return None
        return target

    def _restore(self, state_handler, args: dict):
        _quiet_abandoned_io()  # before reading: an abandoned read can report as soon as the first one fails
        failure = None
        try:
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_item_handlers(state_handler))) as checkpointer:
                return checkpointer.restore(self.path, args=ocp.args.Composite(**args))
        except Exception as e:  # pylint: disable=broad-except  (callers turn it into CorruptCheckpoint)
            failure = _first_line(e)  # only the text: the exception's frames hold Orbax's abandoned reads
        gc.collect()  # the abandoned coroutines, now, through the hook
        raise RuntimeError(failure)

    def _check_fingerprints(self, tree, checked=lambda path: True) -> None:
        damaged = first_mismatch(self.fingerprints, tree, checked)
        if damaged is None:
            missing = [p for p in _fingerprints_paths(tree) if checked(p) and p not in self.fingerprints]
            damaged = missing[0] if missing else None
        if damaged:
            raise CorruptCheckpoint(self.step, self.source,
                                    f"array {damaged} differs from what was saved (truncated or altered file)")

    def restore_state(self, abstract_state):
        """The full train state restored into `abstract_state`, strictly (the writer's resume).

        Leaves of `abstract_state` say what to restore into: a ShapeDtypeStruct with a
        sharding restores sharded jax.Arrays, a numpy array restores numpy. The stored
        parameter tree must have exactly the paths and shapes of `abstract_state.params`
        (else a UserError names the first mismatch); the optimizer state's too.
        """
        where = f"checkpoint step {self.step} in {self.directory}"
        check_same_shapes(self.stored["params"], abstract_state.params, where=where)
        differing = sorted(set(shapes_by_path(self.stored)) ^ set(shapes_by_path(abstract_state)))
        if differing:  # the params fit, so the optimizer state's structure differs: a config change, not damage
            raise UserError(f"{where} holds a different optimizer state (first difference: {differing[0]}): the "
                            "optimizer settings changed since it was written (optimizer.grad_clip_norm, "
                            "train.skip_nonfinite_steps, finetune.strategy, ...); restore them or start a fresh --workdir")
        try:
            state = self._restore(ocp.StandardCheckpointHandler(),
                                  {"state": ocp.args.StandardRestore(abstract_state)})["state"]
        except Exception as e:  # pylint: disable=broad-except
            raise CorruptCheckpoint(self.step, self.source, f"it cannot be read ({_first_line(e)})") from None
        self._check_fingerprints(state)
        return state

    def restore_params(self, template=None) -> dict:
        """Only parameters: those named by the nested dict `template`, into its leaves' placement
        (ShapeDtypeStructs with shardings, or numpy arrays) and dtypes; by default all of them,
        on this process's first device. No optimizer state is read."""
        if template is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            template = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                    dict(self.stored["params"]))
        restore_args = ocp.checkpoint_utils.construct_restore_args(template)
        try:
            params = self._restore(ocp.PyTreeCheckpointHandler(), {"state": ocp.args.PyTreeRestore(
                {"params": template}, restore_args={"params": restore_args}, partial_restore=True)})["state"]["params"]
        except Exception as e:  # pylint: disable=broad-except  (missing or truncated files)
            raise CorruptCheckpoint(self.step, self.source, f"it cannot be read ({_first_line(e)})") from None
        stored_dtypes = {"params/" + path_str(p): m.dtype for p, m in jax.tree_util.tree_leaves_with_path(self.stored["params"])}
        loaded_dtypes = {"params/" + path_str(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(params)}
        self._check_fingerprints({"params": params}, lambda path: stored_dtypes.get(path) == loaded_dtypes[path])  # a cast changes bits
        return params

    def close(self) -> None:
        if self._pin_root is not None:
            shutil.rmtree(self._pin_root, ignore_errors=True)
            self._pin_root = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


PIN_PREFIX = "gptlab-pinned-checkpoint-"  # + "PID@HOST." + a random suffix, in the temporary directory
_PIN_NAME = re.compile(re.escape(PIN_PREFIX) + r"(\d+)@(.+)\.[^.]+$")


def remove_dead_pins(root=None) -> list:
    """Removes the pins (`Reader`) of readers that died without closing them (kill -9 mid-read); returns them.

    A pin names its process and host; only this host's pins whose process is gone are removed.
    """
    root = pathlib.Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in entries:
        match = _PIN_NAME.match(entry.name)
        if not match or match.group(2) != host or _alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def _fingerprints_paths(tree) -> list:
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


class Checkpoints:
    def __init__(self, directory, max_to_keep: int = 3, async_save: bool = True, selection_metric=None):
        self.directory = pathlib.Path(directory).absolute()
        _quiet_abandoned_io()  # before writing: a failed write (a full disk) abandons the others
        if max_to_keep < 1:
            raise UserError(f"checkpoint.max_to_keep={max_to_keep} must be at least 1")
        handlers = {**_item_handlers(ocp.StandardCheckpointHandler()),
                    **{k: ocp.JsonCheckpointHandler() for k in OPTIONAL_JSON_ITEMS}}
        keep = best_options(selection_metric, max_to_keep) if selection_metric else dict(max_to_keep=max_to_keep)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=tuple(handlers),
            item_handlers=handlers,
            options=ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True, **keep),  # leftovers of a save interrupted by a kill
        )
        self._last_saved = None
        self.accepted = False  # set by train.start_and_run once every resume check passed; a refused start writes nothing

    def latest_step(self):
        return self.manager.latest_step()

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, state, *, data: dict, config: dict, tokenizer: dict, selection=None,
             metrics=None, progress=None) -> None:
        """Starts writing `step` (in the background when async); a failed write raises UserError.

        `metrics`: the validation metrics evaluated at `step`, which rank it for the best checkpoint.
        """
        # Orbax waits for the previous background write before starting this one anyway;
        # waiting here first reports a failed previous write under its own step number.
        self.wait()
        integrity = {"fingerprints": _fingerprints(state)}
        try:
            # force: the training loop decides when to save (intervals, the last step, preemption).
            extra = {k: ocp.args.JsonSave(v) for k, v in (("selection", selection), ("progress", progress))
                     if v is not None}
            started = self.manager.save(step, force=True, metrics=metrics, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                config=ocp.args.JsonSave(config), tokenizer=ocp.args.JsonSave(tokenizer),
                integrity=ocp.args.JsonSave(integrity), **extra))
        except Exception as e:  # pylint: disable=broad-except
            self._raise_write_error(step, e)
        if not started:
            raise UserError(f"checkpoint step {step} was not written: {self.directory} already holds step "
                            f"{self.latest_step()}; use a fresh --workdir or resume from that step")
        self._last_saved = step

    def wait(self) -> None:
        """Blocks until background writes finish; a failed write raises UserError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            self._raise_write_error(self._last_saved, e)

    def _raise_write_error(self, step, error: Exception):
        self.manager.reload()
        good = [s for s in self.manager.all_steps() if s != step]
        kept = f"checkpoints up to step {max(good)} are intact" if good else "no earlier checkpoint exists"
        code = re.search(r"os_error_code='(\d+)'", str(error))  # TensorStore reports the OS error inside its text
        reason = (getattr(error, "strerror", None) or (os.strerror(int(code.group(1))) if code else None)
                  or _first_line(error))
        failure = UserError(f"could not write checkpoint step {step} to {self.directory} ({reason}); {kept}. "
                            "Free disk space or fix the directory's permissions, then rerun the same command "
                            "to resume")
        failure.reason = reason  # for callers that say in their own words what failed (the merged export)
        raise failure from None

    def read_json(self, step: int, item: str) -> dict:
        with Reader(self.directory, step, pin=False) as reader:  # the writer's own steps: nothing rotates them now
            return getattr(reader, item) if item != "integrity" else {"fingerprints": reader.fingerprints}

    def restore(self, step: int, abstract_state):
        """Restores the full train state and the JSON items of `step` (see `Reader.restore_state`)."""
        with Reader(self.directory, step, pin=False) as reader:
            state = reader.restore_state(abstract_state)
            return state, {"data": reader.data, "config": reader.config, "tokenizer": reader.tokenizer,
                           "integrity": {"fingerprints": reader.fingerprints}, "selection": reader.selection,
                           "progress": reader.progress}

    def quarantine(self, step: int) -> pathlib.Path:
        """Moves a damaged step out of checkpoints/ (kept for inspection, never deleted)."""
        target = self.directory.parent / "damaged_checkpoints" / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.step_path(step)), str(target))
        self.manager.reload()
        return target

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def best_step(directory):
    """The best step of a checkpoints/ directory, ranked by Orbax on the stored validation metrics.

    The metric comes from the latest step's `selection` record; None when no step
    was saved with metrics (the run never evaluated, or predates early stopping).
    """
    directory = pathlib.Path(directory)
    steps = complete_steps(directory)
    stored = [s for s in reversed(steps) if (directory / str(s) / "selection").exists()]
    if not stored:
        return None
    with ocp.CheckpointManager(directory, item_names=("selection",),
                               item_handlers={"selection": ocp.JsonCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False)) as reader:
        record = reader.restore(stored[0], args=ocp.args.Composite(selection=ocp.args.JsonRestore()))["selection"]
    metric = record.get("metric")
    if not metric:
        return None
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, best_fn=lambda m: m[metric], best_mode=selection.mode(metric))) as ranked:
        return ranked.best_step()  # None when no step carries metrics


def resolve_step(directory, step, where: str):
    """`step` as given by a user (None: the latest; "best"; a number) -> an int step of `directory`, or None.

    "best" without a best checkpoint is a UserError saying what to do.
    """
    if step is None or step == "":
        return None
    if str(step).strip().lower() == "best":
        found = best_step(directory)
        if found is None:
            raise UserError(f"{where} has no best checkpoint yet (no checkpoint saved with validation metrics): "
                            "let the run evaluate at least once (train.eval_every), or pass a step number")
        return found
    try:
        return int(step)
    except (TypeError, ValueError):
        raise UserError(f"step={step!r} is neither a step number nor 'best': pass e.g. --step=600 or --step=best") from None


def _quiet_abandoned_io() -> None:
    """Quiets the reads and writes Orbax abandons when one array of a checkpoint fails.

    Orbax reads and writes the arrays in parallel; the first failure (a damaged file, a full disk)
    ends the restore or save while the others are mid-flight. Python would then print their
    tracebacks after the one-line error the user is given: each abandoned coroutine's when it is
    collected ("Exception ignored in: <coroutine _read_array_index_and_device_put>"), and each
    TensorStore operation that completes after Orbax closed its event loop ("RuntimeError: Event
    loop is closed"), from another thread, possibly while the failure is still on its way out of
    Orbax. So the hook goes in before the first read or write (once per process) and drops
    exactly those two reports; any other unraisable exception is reported as before.
    """
    global _io_quieted
    if _io_quieted:
        return
    _io_quieted = True
    report = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return  # an abandoned Orbax read or write, collected
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return  # an abandoned TensorStore operation, finished after Orbax's event loop closed
        report(unraisable)

    sys.unraisablehook = hook


_io_quieted = False


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


def shapes_by_path(tree) -> dict:
    """{"blocks_0/attn/qkv/kernel": shape, ...} for arrays, ShapeDtypeStructs or Orbax metadata."""
    return {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_shapes(stored_params, expected_params, where: str) -> None:
    stored, expected = shapes_by_path(stored_params), shapes_by_path(expected_params)
    for path, shape in expected.items():
        if path not in stored:
            raise UserError(f"{where} has no parameter {path}: it was written by a different model "
                            "config; use that run's model settings or start a fresh --workdir")
        if stored[path] != shape:
            raise UserError(f"{where} does not fit this model: parameter {path} has shape {stored[path]} "
                            f"there but {shape} here; use that run's model settings or start a fresh --workdir")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise UserError(f"{where} has parameter {extra[0]} that this model lacks: it was written by a "
                        "different model config; use that run's model settings or start a fresh --workdir")


def check_writable(workdir, what: str = "--workdir=") -> pathlib.Path:
    """Creates `workdir` if needed and proves it writable before any work is done."""
    path = pathlib.Path(workdir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{os.getpid()}"  # unique: processes of one run share the workdir
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {what}{workdir} ({e.strerror or e}): "
                        "choose a directory you can write to (or fix its permissions or mount)") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write to {what}{workdir}: choose a directory you can write to")
    return path
