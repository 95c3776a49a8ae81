"""The one exception type for bad input a user can fix.

Entry points print a `UserError` as a single line (no traceback unless --verbose)
and exit non-zero; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad config value, path, dataset, prompt or checkpoint; the message says the fix."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; rerunning the command resumes."""

    EXIT_CODE = 75  # EX_TEMPFAIL: schedulers may requeue the job

    def __init__(self, step: int, workdir):
        super().__init__(f"preempted at step {step}: checkpoint saved in {workdir}; "
                         "run the same command again to resume")
        self.step = step
