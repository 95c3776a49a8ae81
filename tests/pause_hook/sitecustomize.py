"""Test hook: a gptlab process started with this folder first on PYTHONPATH and GPTLAB_TEST_PAUSE set waits
at a chosen point, so tests of concurrent processes order them with files instead of racing the clock.

GPTLAB_TEST_PAUSE is JSON with a `marker` path and one of:
- "step": N (and optionally "workdir": an fnmatch pattern over the run's workdir path, and "nth": k): when
  the run logs step N, it writes MARKER.paused and waits until MARKER exists (the test creates it to let the
  run go on); with "nth", only the k-th process to get there waits (of a sweep's cells, say);
- "checkpoint_commit": true: the first time a checkpoint's temporary folder would be renamed into place,
  it writes MARKER.paused and waits for ever (mid-save: the test kills it there).
Every process started with the variable inherits it (a sweep's cells too); only gptlab runs act on it.
"""
import fnmatch
import json
import os
import pathlib
import time

_SPEC = json.loads(os.environ.get("GPTLAB_TEST_PAUSE") or "null")


def _pause(marker: pathlib.Path, forever: bool = False) -> None:
    marker.with_name(marker.name + ".paused").write_text(str(os.getpid()))
    while forever or not marker.exists():
        time.sleep(0.02)


def _my_turn(marker: pathlib.Path, nth: int) -> bool:
    """Whether this process is the nth to arrive: each takes the first free ticket file (created exclusively)."""
    for k in range(1, nth + 1):
        try:
            os.close(os.open(marker.with_name(f"{marker.name}.ticket{k}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return k == nth
        except FileExistsError:
            continue
    return False


if _SPEC and "step" in _SPEC:
    from gptlab import metrics as _metrics

    _init, _write = _metrics.MetricsWriter.__init__, _metrics.MetricsWriter.write

    def _recording_init(self, workdir, *args, **kwargs):
        self._test_workdir = str(workdir)
        _init(self, workdir, *args, **kwargs)

    def _pausing_write(self, step, metrics):
        _write(self, step, metrics)
        if int(step) == _SPEC["step"] and fnmatch.fnmatch(getattr(self, "_test_workdir", ""), _SPEC.get("workdir", "*")):
            if _my_turn(pathlib.Path(_SPEC["marker"]), _SPEC.get("nth", 1)):
                _pause(pathlib.Path(_SPEC["marker"]))

    _metrics.MetricsWriter.__init__, _metrics.MetricsWriter.write = _recording_init, _pausing_write

if _SPEC and _SPEC.get("checkpoint_commit"):
    _rename = os.rename

    def _pausing_rename(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(src))
        if "tmp" in name and os.path.basename(os.path.dirname(os.fspath(src))) == "checkpoints":
            _pause(pathlib.Path(_SPEC["marker"]), forever=True)
        return _rename(src, dst, *args, **kwargs)

    os.rename = _pausing_rename
