"""Orbax checkpoints under WORKDIR/checkpoints/, with the current `args=` API.

Each step directory holds the train state's arrays (`state`, StandardSave) and,
as JSON beside them, the data iterator's position (`data`), the resolved config
(`config`) and the tokenizer (`tokenizer`), so a checkpoint is self-describing:
fine-tuning, sampling and evaluation need nothing else.
"""
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from gptlab.errors import UserError
from gptlab.optim import path_str

JSON_ITEMS = ("data", "config", "tokenizer")


class Checkpoints:
    def __init__(self, directory, max_to_keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        if max_to_keep < 1:
            raise UserError(f"checkpoint.max_to_keep={max_to_keep} must be at least 1")
        # Naming each item's handler lets a fresh process read metadata and single items.
        handlers = {"state": ocp.StandardCheckpointHandler(), **{k: ocp.JsonCheckpointHandler() for k in JSON_ITEMS}}
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=tuple(handlers),
            item_handlers=handlers,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, *, data: dict, config: dict, tokenizer: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config), tokenizer=ocp.args.JsonSave(tokenizer)))

    def read_json(self, step: int, item: str) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def restore(self, step: int, abstract_state):
        """Restores the full train state and the JSON items of `step` into `abstract_state`, strictly.

        The stored parameter tree must have exactly the paths and shapes of
        `abstract_state.params`; otherwise a UserError names the first mismatch.
        """
        stored = self.manager.item_metadata(step)["state"]
        check_same_shapes(stored["params"], abstract_state.params,
                          where=f"checkpoint step {step} in {self.directory}")
        # Leaves of `abstract_state` say what to restore into: a ShapeDtypeStruct with a
        # sharding restores sharded jax.Arrays, a numpy array restores numpy.
        items = dict(state=ocp.args.StandardRestore(abstract_state), **{k: ocp.args.JsonRestore() for k in JSON_ITEMS})
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], {k: restored[k] for k in JSON_ITEMS}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _shapes(tree) -> dict:
    return {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_shapes(stored_params, expected_params, where: str) -> None:
    stored, expected = _shapes(stored_params), _shapes(expected_params)
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
