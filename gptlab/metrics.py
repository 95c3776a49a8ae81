"""Results are files: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events.

TensorBoard reads WORKDIR/tensorboard/ (`pip install -e ".[tensorboard]"`, then
`tensorboard --logdir=WORKDIR`). With `wandb.project` set (`pip install -e ".[wandb]"`)
the same records also go to a Weights & Biases run: one run per workdir (its id is
kept in WORKDIR/wandb_id.txt, so a resumed run continues it), with the resolved
config, and `result.json` attached and its final metrics in the run summary when the
run finishes. `WANDB_MODE=offline` (or `wandb.mode=offline`) logs with no network
into WORKDIR/wandb/, to upload later with `wandb sync`.
"""
import json
import math
import pathlib
import uuid

from gptlab import files
from gptlab.errors import UserError

_wandb_run = None  # the open W&B run of this process, finished by finish_wandb()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch at module level whenever it is installed (to accept torch
    tensors): seconds of start-up in every run of an environment with the `bench` extra.
    gptlab logs Python floats only, so torch is hidden while tensorboardX is first imported
    (a None entry in sys.modules makes `import torch` raise ImportError, which it handles).
    """
    import sys

    if "tensorboardX.writer" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            import tensorboardX  # pylint: disable=unused-import
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter


class MetricsWriter:
    """Appends logged metrics to metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

    def __init__(self, workdir, enabled: bool = True, resume_step: int = 0, wandb_config=None):
        """`resume_step`: records after it (written after the checkpoint a run resumes from,
        before the run was killed) are dropped, so the file reads like an uninterrupted run.
        `wandb_config`: the config's `wandb` group; W&B logging is on when its `project` is set."""
        self.enabled = enabled
        if not enabled:
            return
        SummaryWriter = _summary_writer_class()  # imported here: only process 0 writes

        path = pathlib.Path(workdir) / "metrics.jsonl"
        if path.exists():
            kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
            files.write_jsonl_atomic(path, kept)  # a kill here leaves the old or the new file, never half
        self._jsonl = open(path, "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
        self._wandb = start_wandb(workdir, wandb_config) if wandb_config and wandb_config.get("project") else None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def start_wandb(workdir, wandb_config):
    """Opens (or, after a resume, continues) the workdir's W&B run, with WORKDIR/config.json as its config."""
    global _wandb_run
    try:
        import wandb
    except ImportError:
        raise UserError(f"wandb.project={wandb_config.project!r} needs the wandb package: "
                        'pip install -e ".[wandb]", or unset wandb.project') from None
    workdir = pathlib.Path(workdir)
    id_file = workdir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12] + "\n")
    config_path = workdir / "config.json"
    try:
        _wandb_run = wandb.init(
            project=wandb_config.project, entity=wandb_config.get("entity"), name=wandb_config.get("name") or
            workdir.name, id=id_file.read_text().strip(), resume="allow", dir=str(workdir),
            mode=wandb_config.get("mode"), config=json.loads(config_path.read_text()) if config_path.exists() else None)
    except (wandb.errors.Error, ValueError) as e:
        raise UserError(f"W&B could not start a run in project {wandb_config.project!r} ({e}): run `wandb login`, "
                        "or log offline with WANDB_MODE=offline, or unset wandb.project") from None
    return _wandb_run


def finish_wandb(workdir=None, result: dict = None) -> None:
    """Ends this process's W&B run, if one is open: with `result` (a finished run) its result.json is
    attached and its final metrics become the run summary; without, the run is marked failed."""
    global _wandb_run
    run, _wandb_run = _wandb_run, None
    if run is None:
        return
    if result is None:
        run.finish(exit_code=1)
        return
    run.summary.update({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.save(str(pathlib.Path(workdir) / "result.json"), base_path=str(workdir), policy="now")
    run.finish()


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def read_metrics(workdir) -> list:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill: everything after it is lost anyway
    return records
