"""Results are files: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events."""
import json
import math
import os
import pathlib


class MetricsWriter:
    """Appends logged metrics to metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

    def __init__(self, workdir, enabled: bool = True, resume_step: int = 0):
        """`resume_step`: records after it (written after the checkpoint a run resumes from,
        before the run was killed) are dropped, so the file reads like an uninterrupted run."""
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imported here: only process 0 writes

        path = pathlib.Path(workdir) / "metrics.jsonl"
        if path.exists():
            kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)  # atomic: a kill here leaves the old or the new file, never half
        self._jsonl = open(path, "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


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
