"""The one exception type for bad input a user can fix.

Entry points print a `UserError` as a single line (no traceback unless --verbose)
and exit non-zero; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad config value, path, dataset, prompt or checkpoint; the message says the fix."""
