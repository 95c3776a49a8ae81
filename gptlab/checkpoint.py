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
"""
import os
import pathlib
import re
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gptlab import selection
from gptlab.errors import UserError
from gptlab.optim import path_str

JSON_ITEMS = ("data", "config", "tokenizer", "integrity")
OPTIONAL_JSON_ITEMS = ("selection",)  # absent in checkpoints written before early stopping existed


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


class Checkpoints:
    def __init__(self, directory, max_to_keep: int = 3, async_save: bool = True, selection_metric=None):
        self.directory = pathlib.Path(directory).absolute()
        if max_to_keep < 1:
            raise UserError(f"checkpoint.max_to_keep={max_to_keep} must be at least 1")
        # Naming each item's handler lets a fresh process read metadata and single items.
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    **{k: ocp.JsonCheckpointHandler() for k in JSON_ITEMS + OPTIONAL_JSON_ITEMS}}
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

    def latest_step(self):
        return self.manager.latest_step()

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, state, *, data: dict, config: dict, tokenizer: dict, selection=None,
             metrics=None) -> None:
        """Starts writing `step` (in the background when async); a failed write raises UserError.

        `metrics`: the validation metrics evaluated at `step`, which rank it for the best checkpoint.
        """
        # Orbax waits for the previous background write before starting this one anyway;
        # waiting here first reports a failed previous write under its own step number.
        self.wait()
        integrity = {"fingerprints": _fingerprints(state)}
        try:
            # force: the training loop decides when to save (intervals, the last step, preemption).
            extra = {} if selection is None else {"selection": ocp.args.JsonSave(selection)}
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
        raise UserError(f"could not write checkpoint step {step} to {self.directory} ({reason}); {kept}. "
                        "Free disk space or fix the directory's permissions, then rerun the same command "
                        "to resume") from None

    def read_json(self, step: int, item: str) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # pylint: disable=broad-except
            raise CorruptCheckpoint(step, self.step_path(step), f"its {item} cannot be read ({_first_line(e)})") from None

    def restore(self, step: int, abstract_state):
        """Restores the full train state and the JSON items of `step` into `abstract_state`, strictly.

        Leaves of `abstract_state` say what to restore into: a ShapeDtypeStruct
        with a sharding restores sharded jax.Arrays, a numpy array restores numpy.
        The stored parameter tree must have exactly the paths and shapes of
        `abstract_state.params` (else a UserError names the first mismatch), and
        the arrays must match their save-time fingerprints (else CorruptCheckpoint).
        """
        try:
            stored = self.manager.item_metadata(step)["state"]
            stored_params = stored["params"]
        except Exception as e:  # pylint: disable=broad-except
            raise CorruptCheckpoint(step, self.step_path(step), f"its metadata cannot be read ({_first_line(e)})") from None
        where = f"checkpoint step {step} in {self.directory}"
        check_same_shapes(stored_params, abstract_state.params, where=where)
        differing = sorted(set(shapes_by_path(stored)) ^ set(shapes_by_path(abstract_state)))
        if differing:  # the params fit, so the optimizer state's structure differs: a config change, not damage
            raise UserError(f"{where} holds a different optimizer state (first difference: {differing[0]}): the "
                            "optimizer settings changed since it was written (optimizer.grad_clip_norm, "
                            "train.skip_nonfinite_steps, finetune.strategy, ...); restore them or start a fresh --workdir")
        optional = tuple(k for k in OPTIONAL_JSON_ITEMS if (self.step_path(step) / k).exists())
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     **{k: ocp.args.JsonRestore() for k in JSON_ITEMS + optional})
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # pylint: disable=broad-except
            raise CorruptCheckpoint(step, self.step_path(step), f"it cannot be read ({_first_line(e)})") from None
        expected = (restored.get("integrity") or {}).get("fingerprints")
        if not expected:
            raise CorruptCheckpoint(step, self.step_path(step), "its integrity record is missing")
        actual = _fingerprints(restored["state"])
        for path, value in actual.items():
            if expected.get(path) != value:
                raise CorruptCheckpoint(step, self.step_path(step),
                                        f"array {path} differs from what was saved (truncated or altered file)")
        return restored["state"], {k: restored[k] for k in JSON_ITEMS + optional}

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
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
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


def check_writable(workdir) -> pathlib.Path:
    """Creates `workdir` if needed and proves it writable before any work is done."""
    path = pathlib.Path(workdir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{os.getpid()}"  # unique: processes of one run share the workdir
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --workdir={workdir} ({e.strerror or e}): "
                        "choose a directory you can write to") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write to --workdir={workdir}: choose a directory you can write to")
    return path
