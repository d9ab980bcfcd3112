"""The exceptions that end a script with one line and a documented exit code (docs/failures.md)."""

EXIT_INTERNAL = 1  # an unforeseen failure (a bug): one line naming it; its traceback in the details log
EXIT_USER_ERROR = 2  # bad config, data, checkpoint or CLI input: nothing was written
EXIT_NONFINITE = 3  # a non-finite loss or gradient (train.nonfinite); the last good checkpoint is kept
EXIT_PREEMPTED = 75  # SIGTERM / SIGINT: a checkpoint was saved; rerun with --resume (sysexits' EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # a second Ctrl-C (or one outside training): stopped at once, nothing saved


class UserError(Exception):
  """A problem in the user's input; the message names it and says how to fix it."""


class Stopped(Exception):
  """Training ended early on purpose; `code` is the process exit code, the message the one line printed.

  `abandon`: writes still in flight are given up (the process exits at once, as a kill would): a store that
  failed one write would hold the others until their timeouts, and what was committed is whole anyway.
  """

  def __init__(self, message: str, code: int, abandon: bool = False):
    super().__init__(message)
    self.code = code
    self.abandon = abandon
